DROP TRIGGER IF EXISTS device_certificates_deleted_active ON device_certificates;
DROP TRIGGER IF EXISTS device_certificates_revoked ON device_certificates;
DROP TRIGGER IF EXISTS device_certificates_crl_shard ON device_certificates;
DROP FUNCTION IF EXISTS device_certificates_record_revocation();
DROP FUNCTION IF EXISTS device_certificates_crl_shard();
DROP TABLE IF EXISTS crls;
DROP TABLE IF EXISTS crl_dirty;
DROP TABLE IF EXISTS revoked_certificates;
ALTER TABLE device_certificates DROP COLUMN IF EXISTS crl_shard;
