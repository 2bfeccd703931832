-- The secret that seals cached certificates (shared/seal.py): one row, made by the first
-- replica that asks; Redis never sees it.
CREATE TABLE certificate_cache_secret (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    secret     bytea       NOT NULL CHECK (length(secret) = 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
