-- The durable log of cache invalidations (see shared/invalidation.py).
--
-- A revocation, rotation or device-wide revocation inserts one row per changed
-- key in the same transaction as the change. The service applies it to Redis
-- (writing the key's current record) and marks it applied; a row whose
-- application failed stays pending until some replica's guard applies it, and
-- until then no replica trusts Redis for verification. Applied rows are kept
-- for the cache TTL: after Redis failed (a failover or a restart can lose
-- writes it had acknowledged) they are applied again. Rows hold the key's hash
-- only, which the Redis key name already is; never the key.
CREATE TABLE api_key_cache_invalidations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash    bytea       NOT NULL CHECK (octet_length(key_hash) = 32),
    created_at  timestamptz NOT NULL,
    applied_at  timestamptz
);

CREATE INDEX idx_api_key_cache_invalidations_pending
    ON api_key_cache_invalidations (id) WHERE applied_at IS NULL;
CREATE INDEX idx_api_key_cache_invalidations_applied
    ON api_key_cache_invalidations (applied_at) WHERE applied_at IS NOT NULL;
