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

-- Revocations to send to the ACME CA: relying parties learn revocation from the CA that
-- issued the certificate, not from us. Written by triggers in the transaction that revokes
-- (or deletes the device of) a certificate the ACME CA issued (certificate_data names its
-- directory), so an acknowledged revocation is never forgotten; the worker sends them
-- (revokeCert) and deletes the row, retrying with back-off.
CREATE TABLE acme_revocations (
    serial_number    text        PRIMARY KEY,
    device_id        text        NOT NULL,
    certificate_pem  text        NOT NULL,
    reason           text        NOT NULL,
    created_at       timestamptz NOT NULL,
    due_at           timestamptz NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    last_error       text
);

CREATE INDEX idx_acme_revocations_due ON acme_revocations (due_at);

CREATE FUNCTION device_certificates_acme_revocation() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cert device_certificates;
    why text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        cert := OLD;
        why := 'cessation_of_operation';
    ELSE
        cert := NEW;
        why := coalesce(NEW.revocation_reason, 'unspecified');
    END IF;
    IF NOT cert.certificate_data ? 'acme_directory' THEN
        RETURN NULL;
    END IF;
    INSERT INTO acme_revocations
        (serial_number, device_id, certificate_pem, reason, created_at, due_at)
    VALUES (cert.serial_number, cert.device_id, cert.certificate_data->>'chain_pem', why,
            statement_timestamp(), statement_timestamp())
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER device_certificates_acme_revoked
    AFTER UPDATE OF status ON device_certificates
    FOR EACH ROW WHEN (NEW.status = 'revoked' AND OLD.status <> 'revoked')
    EXECUTE FUNCTION device_certificates_acme_revocation();

CREATE TRIGGER device_certificates_acme_deleted_active
    AFTER DELETE ON device_certificates
    FOR EACH ROW WHEN (OLD.status = 'active')
    EXECUTE FUNCTION device_certificates_acme_revocation();
