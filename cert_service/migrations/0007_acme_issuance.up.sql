-- Asynchronous issuance by an ACME CA (CERT_ISSUER=acme; cert_service.acme_worker).
--
-- * status 'pending': provisioned, the CA's certificate not issued yet. Such a row has no
--   certificate: serial_number and fingerprint_sha256 are empty, issued_at = expires_at =
--   the provision time, and certificate_data holds only the public key and the CSR.
-- * The issuance columns are the job queue: a row with issuance_csr set wants a certificate
--   for that CSR (a first issuance, a renewal or the lifecycle's). Workers of every replica
--   claim due rows with FOR UPDATE SKIP LOCKED and lease them (issuance_lease, _until): one
--   order per certificate at a time; the order's URL is recorded as soon as it is placed, so
--   a replica taking over an expired lease resumes that order instead of placing another.
-- * acme_accounts: the account registered once per directory and key, reused by every
--   replica.
-- * acme_order_budget: one GCRA bucket (its theoretical arrival time) for the configured
--   orders-per-period budget, spent in the statement that claims a job.
ALTER TABLE device_certificates DROP CONSTRAINT device_certificates_status_check;
ALTER TABLE device_certificates ADD CONSTRAINT device_certificates_status_check
    CHECK (status IN ('pending', 'active', 'expired', 'revoked')) NOT VALID;
ALTER TABLE device_certificates VALIDATE CONSTRAINT device_certificates_status_check;

ALTER TABLE device_certificates
    ADD COLUMN issuance_csr          text,
    ADD COLUMN issuance_occasion     text,
    ADD COLUMN issuance_requested_at timestamptz,
    ADD COLUMN issuance_due_at       timestamptz,
    ADD COLUMN issuance_attempts     integer NOT NULL DEFAULT 0,
    ADD COLUMN issuance_error        text,
    ADD COLUMN issuance_lease        uuid,
    ADD COLUMN issuance_lease_until  timestamptz,
    ADD COLUMN acme_order_url        text;

-- The queue: only rows with an issuance wanted are indexed, so it stays small.
CREATE INDEX idx_device_certificates_issuance_due
    ON device_certificates (issuance_due_at) WHERE issuance_csr IS NOT NULL;

CREATE TABLE acme_accounts (
    directory_url   text        NOT NULL,
    key_thumbprint  text        NOT NULL,
    account_url     text        NOT NULL,
    created_at      timestamptz NOT NULL,
    PRIMARY KEY (directory_url, key_thumbprint)
);

CREATE TABLE acme_order_budget (
    directory_url  text        PRIMARY KEY,
    tat            timestamptz NOT NULL
);
