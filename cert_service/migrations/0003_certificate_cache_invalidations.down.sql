DROP TABLE IF EXISTS certificate_cache_invalidations;
