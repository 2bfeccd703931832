-- The durable log of cache invalidations (see shared/invalidation.py).
--
-- A revocation, rotation or device-wide revocation inserts one row per changed
-- key in the same transaction as the change. The service applies it to Redis
-- (writing the key's current record) and deletes the row; a row whose
-- application failed stays until some replica's guard applies it. Until then no
-- replica trusts Redis for verification. Rows hold the key's hash only, which
-- the Redis key name already is; never the key.
CREATE TABLE api_key_cache_invalidations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash    bytea       NOT NULL CHECK (octet_length(key_hash) = 32),
    created_at  timestamptz NOT NULL
);
