DROP TABLE IF EXISTS device_api_keys;
