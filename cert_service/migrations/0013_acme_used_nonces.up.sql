-- acme_nonces now holds used nonces, not issued ones (cert_service.acme_server.Nonces): a
-- nonce carries a MAC and its expiry, so issuing one writes nothing, and using one inserts it
-- here, where the primary key refuses a second use on every replica. The rows written under
-- the earlier meaning (issued, unused) mean nothing now.
TRUNCATE acme_nonces;
COMMENT ON TABLE acme_nonces IS
    'Used ACME replay nonces, kept until they expire (cert_service.acme_server.Nonces)';
