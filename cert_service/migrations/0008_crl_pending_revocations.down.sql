-- Back to 0005's one mark per shard; every shard with a queued revocation stays marked. The
-- migration command refuses to drop crl_pending while it holds rows (revocations not yet
-- published, normally for under a second); --discard-data loses nothing here, the rows become
-- marks first.
LOCK TABLE device_certificates IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE crl_dirty (
    issuer_key_id  text    NOT NULL,
    crl_shard      integer NOT NULL,
    PRIMARY KEY (issuer_key_id, crl_shard)
);

INSERT INTO crl_dirty (issuer_key_id, crl_shard)
SELECT DISTINCT issuer_key_id, crl_shard FROM crl_pending;

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
    INSERT INTO crl_dirty (issuer_key_id, crl_shard)
    VALUES (cert.certificate_data->>'issuer_key_id', cert.crl_shard)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

DROP TABLE crl_pending;
