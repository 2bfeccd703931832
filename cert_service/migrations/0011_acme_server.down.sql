DROP TABLE IF EXISTS acme_device_orders;
DROP TABLE IF EXISTS acme_nonces;
DROP TABLE IF EXISTS acme_device_accounts;
DROP TABLE IF EXISTS acme_eab_keys;
