DROP TABLE certificate_cache_secret;
