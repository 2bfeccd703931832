DROP TABLE IF EXISTS api_key_cache_invalidations;
