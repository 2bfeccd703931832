-- Device events that other services must hear about, delivered at least once.
--
-- DeleteDevice inserts a 'device_deleted' row in the same transaction as the
-- delete; a relay calls key_service's RevokeDeviceApiKeys and removes the row
-- only after that call succeeded, so the cascade survives a key_service outage
-- and a crash of cert_service. Relays claim rows with FOR UPDATE SKIP LOCKED
-- and a lease (next_attempt_at moved forward), so several replicas never
-- deliver the same row at the same time. device_id leads the primary key: it
-- is the distribution column, as in device_certificates.
CREATE TABLE device_events_outbox (
    device_id        text        NOT NULL,
    id               bigint      GENERATED ALWAYS AS IDENTITY,
    event_type       text        NOT NULL CHECK (event_type IN ('device_deleted')),
    created_at       timestamptz NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL,
    last_error       text,
    PRIMARY KEY (device_id, id)
);

-- The relay's queue: due rows, oldest first.
CREATE INDEX idx_device_events_outbox_due ON device_events_outbox (next_attempt_at, id);

-- Lifecycle worker: certificates it may have to renew, as a covering partial
-- index (renewal is due at issued_at + fraction * (expires_at - issued_at),
-- with the fraction from configuration).
CREATE INDEX idx_device_certificates_auto_renewal
    ON device_certificates (expires_at, issued_at)
    WHERE status = 'active' AND auto_renewal;
