-- The durable log of cache invalidations (see shared/invalidation.py).
--
-- Every status change of a certificate (revoke, renew, delete, the lifecycle
-- worker's expiry and renewals) inserts a row naming the device and its name in
-- the same statement as the change. The service fences both cache entries and
-- deletes the row; a row whose application failed stays until some replica's
-- guard applies it, and until then no replica trusts Redis for reads.
CREATE TABLE certificate_cache_invalidations (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       text        NOT NULL,
    uuid_subdomain  text        NOT NULL,
    created_at      timestamptz NOT NULL
);
