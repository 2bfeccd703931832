-- The durable log of cache invalidations (see shared/invalidation.py).
--
-- Revoke, renew and delete insert a row naming the device and its name in the
-- same statement as the change. The service fences both cache entries and
-- marks the row applied; a row whose application failed stays pending until
-- some replica's guard applies it, and until then no replica trusts Redis for
-- reads. Applied rows are kept for the cache TTL: after Redis failed (a
-- failover or a restart can lose writes it had acknowledged) they are applied
-- again.
CREATE TABLE certificate_cache_invalidations (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       text        NOT NULL,
    uuid_subdomain  text        NOT NULL,
    created_at      timestamptz NOT NULL,
    applied_at      timestamptz
);

CREATE INDEX idx_certificate_cache_invalidations_pending
    ON certificate_cache_invalidations (id) WHERE applied_at IS NULL;
CREATE INDEX idx_certificate_cache_invalidations_applied
    ON certificate_cache_invalidations (applied_at) WHERE applied_at IS NOT NULL;
