DROP TRIGGER IF EXISTS device_certificates_acme_deleted_active ON device_certificates;
DROP TRIGGER IF EXISTS device_certificates_acme_revoked ON device_certificates;
DROP FUNCTION IF EXISTS device_certificates_acme_revocation();
DROP TABLE IF EXISTS acme_revocations;
DROP TABLE IF EXISTS acme_order_budget;
DROP TABLE IF EXISTS acme_accounts;
DROP INDEX IF EXISTS idx_device_certificates_issuance_due;
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM device_certificates WHERE status = 'pending') THEN
        RAISE EXCEPTION 'certificates are still pending at the ACME CA; let them complete '
            'or delete those devices before rolling back';
    END IF;
END
$$;
ALTER TABLE device_certificates
    DROP COLUMN IF EXISTS issuance_csr,
    DROP COLUMN IF EXISTS issuance_occasion,
    DROP COLUMN IF EXISTS issuance_requested_at,
    DROP COLUMN IF EXISTS issuance_due_at,
    DROP COLUMN IF EXISTS issuance_attempts,
    DROP COLUMN IF EXISTS issuance_error,
    DROP COLUMN IF EXISTS issuance_lease,
    DROP COLUMN IF EXISTS issuance_lease_until,
    DROP COLUMN IF EXISTS acme_order_url;
ALTER TABLE device_certificates DROP CONSTRAINT device_certificates_status_check;
ALTER TABLE device_certificates ADD CONSTRAINT device_certificates_status_check
    CHECK (status IN ('active', 'expired', 'revoked'));
