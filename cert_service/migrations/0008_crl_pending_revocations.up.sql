-- Every committed revocation reaches its shard's CRL, whatever the interleaving of revoking
-- transactions and publisher passes (cert_service.crl argues why).
--
-- 0005 marked a shard with one row in crl_dirty, inserted ON CONFLICT DO NOTHING. A revocation
-- whose transaction was still open during a publisher pass found the mark already there (left
-- by an earlier revocation) and added nothing; the pass deleted that mark and read the log
-- without the revocation, which then committed with no mark left: off the CRL until another
-- revocation in the shard or the 12-hour refresh.
--
-- * crl_pending: one row per revocation, inserted by the trigger in the revoking transaction
--   and never shared, so never in conflict. A pass deletes only the rows committed when its
--   DELETE began, then reads the log in a later statement of the same transaction: what it
--   deleted is in what it signs, and a row it could not see stays for the next pass.
--
-- Writes to device_certificates wait for this migration (reads go on), so no revocation runs
-- the old trigger against the dropped table. Every shard that has a revocation in the log is
-- queued once, so the first pass re-signs it, listing any revocation the old marks lost.
-- Replicas still running the old code fail their CRL passes (logged) until they are replaced.
LOCK TABLE device_certificates IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE crl_pending (
    id             bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    issuer_key_id  text    NOT NULL,
    crl_shard      integer NOT NULL
);

CREATE INDEX idx_crl_pending_shard ON crl_pending (issuer_key_id, crl_shard);

INSERT INTO crl_pending (issuer_key_id, crl_shard)
SELECT issuer_key_id, crl_shard FROM revoked_certificates
UNION
SELECT issuer_key_id, crl_shard FROM crl_dirty;

DROP TABLE crl_dirty;

CREATE OR REPLACE FUNCTION device_certificates_record_revocation() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cert device_certificates;
    revoked timestamptz;
    why text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        cert := OLD;
        revoked := statement_timestamp();
        why := 'cessation_of_operation';
    ELSE
        cert := NEW;
        revoked := coalesce(NEW.revoked_at, statement_timestamp());
        why := coalesce(NEW.revocation_reason, 'unspecified');
    END IF;
    IF cert.crl_shard IS NULL OR NOT cert.certificate_data ? 'issuer_key_id' THEN
        RETURN NULL;
    END IF;
    INSERT INTO revoked_certificates
        (issuer_key_id, serial_number, crl_shard, device_id, revoked_at, reason, not_after)
    VALUES (cert.certificate_data->>'issuer_key_id', cert.serial_number, cert.crl_shard,
            cert.device_id, revoked, why, cert.expires_at)
    ON CONFLICT DO NOTHING;
    INSERT INTO crl_pending (issuer_key_id, crl_shard)
    VALUES (cert.certificate_data->>'issuer_key_id', cert.crl_shard);
    RETURN NULL;
END
$$;
