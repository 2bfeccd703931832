DROP TABLE api_key_cache_secret;
