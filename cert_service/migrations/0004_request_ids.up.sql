-- AIP-155 request ids (shared/idempotency.py).
--
-- A provision records its request id and a fingerprint of the request on the
-- row it creates, so that its retry is recognised by the same row.
-- Renewals and deletions record theirs in certificate_requests (a deletion in
-- the statement that deletes). Rows older than the 24-hour window are removed
-- by the lifecycle worker.
ALTER TABLE device_certificates
    ADD COLUMN request_id uuid,
    ADD COLUMN request_hash bytea;

CREATE TABLE certificate_requests (
    request_id    uuid        NOT NULL,
    method        text        NOT NULL,
    request_hash  bytea       NOT NULL,
    device_id     text        NOT NULL,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (request_id, method)
);
CREATE INDEX idx_certificate_requests_created ON certificate_requests (created_at);
