DROP TABLE IF EXISTS certificate_requests;
ALTER TABLE device_certificates DROP COLUMN IF EXISTS request_id, DROP COLUMN IF EXISTS request_hash;
