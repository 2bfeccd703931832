-- Per-device API keys.
--
-- Deviations from the seed table, both for safety:
-- * No plaintext api_key column: only the SHA-256 of the key (key_hash) and a
--   short display prefix are stored. A database leak yields no usable key.
-- * No foreign key to device_certificates: that table belongs to cert_service.
--   key_service asks cert_service over gRPC whether a device exists before it
--   issues a key, and cert_service revokes a deleted device's keys through
--   key_service's contract (see the outbox in cert_service).
-- device_id is NULL for operator keys, which are not bound to one device.
CREATE TABLE device_api_keys (
    id                 uuid        PRIMARY KEY,
    device_id          text,
    key_hash           bytea       NOT NULL,
    key_prefix         text        NOT NULL,
    device_name        text        NOT NULL DEFAULT '',
    user_initials      text        NOT NULL DEFAULT '',
    uuid_subdomain     text        NOT NULL DEFAULT '',
    permissions        text[]      NOT NULL DEFAULT ARRAY['ssl:read', 'device:read', 'api:access'],
    rate_limit         integer     NOT NULL DEFAULT 1000 CHECK (rate_limit > 0),
    is_active          boolean     NOT NULL DEFAULT true,
    expires_at         timestamptz NOT NULL,
    revoked_at         timestamptz,
    revocation_reason  text,
    rotated_from       uuid,
    usage_count        bigint      NOT NULL DEFAULT 0,
    last_used_at       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT device_api_keys_key_hash_key UNIQUE (key_hash),
    CONSTRAINT device_api_keys_key_hash_len CHECK (octet_length(key_hash) = 32)
);

CREATE INDEX idx_device_api_keys_device ON device_api_keys (device_id, created_at DESC, id);
CREATE INDEX idx_device_api_keys_expires ON device_api_keys (expires_at) WHERE is_active;
