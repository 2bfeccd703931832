-- The device's current certificate and its subdomain: one row per device.
--
-- Deviations from the seed table:
-- * device_id is the primary key (one current certificate per device) and the
--   distribution column, so the table can move to Citus without redesign.
-- * No private key is ever stored: certificate_data holds only public material
--   (PEM chain, serial, fingerprints, public key, issuer, CSR).
-- * Status and type are constrained to the values the service knows.
CREATE TABLE device_certificates (
    device_id          text        PRIMARY KEY,
    uuid_subdomain     text        NOT NULL,
    certificate_type   text        NOT NULL DEFAULT 'wildcard'
                                   CHECK (certificate_type IN ('wildcard', 'single')),
    status             text        NOT NULL DEFAULT 'active'
                                   CHECK (status IN ('active', 'expired', 'revoked')),
    certificate_data   jsonb       NOT NULL,
    serial_number      text        NOT NULL,
    fingerprint_sha256 text        NOT NULL,
    issued_at          timestamptz NOT NULL,
    expires_at         timestamptz NOT NULL,
    auto_renewal       boolean     NOT NULL DEFAULT true,
    renewal_count      integer     NOT NULL DEFAULT 0,
    revoked_at         timestamptz,
    revocation_reason  text,
    last_accessed_at   timestamptz,
    access_count       bigint      NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT device_certificates_subdomain_key UNIQUE (uuid_subdomain),
    CONSTRAINT device_certificates_subdomain_lower CHECK (uuid_subdomain = lower(uuid_subdomain))
);

-- Lifecycle worker: active certificates by expiry.
CREATE INDEX idx_device_certificates_status_expires
    ON device_certificates (status, expires_at);
-- Listing, newest first, with keyset pagination.
CREATE INDEX idx_device_certificates_created
    ON device_certificates (created_at DESC, device_id DESC);
