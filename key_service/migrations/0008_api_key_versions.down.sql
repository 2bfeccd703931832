DROP TRIGGER device_api_keys_version ON device_api_keys;
DROP FUNCTION device_api_keys_next_version();
ALTER TABLE device_api_keys DROP COLUMN version;
