DROP INDEX IF EXISTS device_api_keys_request_id_key;
ALTER TABLE device_api_keys DROP COLUMN IF EXISTS request_id, DROP COLUMN IF EXISTS request_hash;
