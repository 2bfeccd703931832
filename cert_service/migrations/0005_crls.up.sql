-- Revocation that relying parties can learn: the log of revoked certificates and the signed
-- CRLs, sharded as Boulder does (a certificate's shard is chosen at issuance and named in its
-- CRL distribution point).
--
-- * device_certificates.crl_shard: the shard of the row's current certificate, copied from
--   certificate_data (where the issuer put it) by a BEFORE trigger, so no write path has to
--   remember it. NULL for certificates issued before CRLs existed (they name no CRL).
-- * revoked_certificates: every revoked certificate, kept while it is unexpired. The
--   device_certificates row holds only the current certificate (renewal replaces it, deletion
--   removes it), so the log is written by an AFTER trigger in the same transaction as the
--   revocation: a revocation that is acknowledged is in the log. Deleting a device whose
--   certificate is still active revokes that certificate (cessation of operation): its name is
--   free again and may go to another device.
-- * crl_dirty: shards with revocations not yet in a published CRL. The trigger inserts, the
--   publisher deletes in the transaction that signs the new CRL; a revocation committed after
--   the publisher read the log inserts the row again, so none is ever missed.
-- * crls: the current CRL of each shard, with its CRL number. The publisher locks the row
--   (FOR UPDATE SKIP LOCKED) while it signs, so replicas never sign the same shard at once
--   and numbers only grow.
ALTER TABLE device_certificates ADD COLUMN crl_shard integer;

CREATE TABLE revoked_certificates (
    issuer_key_id  text        NOT NULL,
    serial_number  text        NOT NULL,
    crl_shard      integer     NOT NULL,
    device_id      text        NOT NULL,
    revoked_at     timestamptz NOT NULL,
    reason         text        NOT NULL,
    not_after      timestamptz NOT NULL,
    PRIMARY KEY (issuer_key_id, serial_number)
);

-- One shard's unexpired entries, in the order they go into the CRL.
CREATE INDEX idx_revoked_certificates_shard
    ON revoked_certificates (issuer_key_id, crl_shard, not_after);

CREATE TABLE crl_dirty (
    issuer_key_id  text    NOT NULL,
    crl_shard      integer NOT NULL,
    PRIMARY KEY (issuer_key_id, crl_shard)
);

CREATE TABLE crls (
    issuer_key_id  text        NOT NULL,
    crl_shard      integer     NOT NULL,
    crl_number     bigint      NOT NULL,
    this_update    timestamptz NOT NULL,
    next_update    timestamptz NOT NULL,
    entries        integer     NOT NULL,
    der            bytea       NOT NULL,
    PRIMARY KEY (issuer_key_id, crl_shard)
);

CREATE FUNCTION device_certificates_crl_shard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.crl_shard := (NEW.certificate_data->>'crl_shard')::integer;
    RETURN NEW;
END
$$;

CREATE TRIGGER device_certificates_crl_shard
    BEFORE INSERT OR UPDATE OF certificate_data ON device_certificates
    FOR EACH ROW EXECUTE FUNCTION device_certificates_crl_shard();

CREATE FUNCTION device_certificates_record_revocation() RETURNS trigger
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
    INSERT INTO crl_dirty (issuer_key_id, crl_shard)
    VALUES (cert.certificate_data->>'issuer_key_id', cert.crl_shard)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER device_certificates_revoked
    AFTER UPDATE OF status ON device_certificates
    FOR EACH ROW WHEN (NEW.status = 'revoked' AND OLD.status <> 'revoked')
    EXECUTE FUNCTION device_certificates_record_revocation();

CREATE TRIGGER device_certificates_deleted_active
    AFTER DELETE ON device_certificates
    FOR EACH ROW WHEN (OLD.status = 'active')
    EXECUTE FUNCTION device_certificates_record_revocation();
