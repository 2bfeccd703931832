DROP TABLE IF EXISTS api_key_unconfirmed_writes;
