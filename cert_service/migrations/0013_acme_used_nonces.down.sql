-- Back to issued-nonce rows: the used ones recorded here would read as issued, unused ones.
TRUNCATE acme_nonces;
COMMENT ON TABLE acme_nonces IS NULL;
