-- The RFC 8555 server devices use (cert_service.acme_server): External Account Binding keys,
-- the accounts bound with them, replay nonces and orders. All state lives here, so every
-- replica answers every request (a nonce one replica issued is good at any other).
--
-- * acme_eab_keys: one row per EAB credential. The HMAC key itself is not stored: it is
--   derived from the service's secret and the kid (cert_service.acme_server.EabKeys), so the
--   table holds nothing a reader could bind an account with. Single use (used_at), expiring.
-- * acme_device_accounts: an account is bound to one device, for the life of that device's
--   row (device_created_at: a device deleted and provisioned again is another device).
-- * acme_nonces: issued nonces until used or expired; using one deletes it.
-- * acme_device_orders: orders; their authorizations are derived (valid on creation: the
--   platform allocated the name to the device), and a valid order keeps the certificate it
--   was answered with.
CREATE TABLE acme_eab_keys (
    kid               text        PRIMARY KEY,
    device_id         text        NOT NULL,
    device_created_at timestamptz NOT NULL,
    created_at        timestamptz NOT NULL,
    expires_at        timestamptz NOT NULL,
    used_at           timestamptz,
    account_id        text
);

CREATE TABLE acme_device_accounts (
    account_id        text        PRIMARY KEY,
    key_thumbprint    text        NOT NULL UNIQUE,
    jwk               jsonb       NOT NULL,
    device_id         text        NOT NULL,
    device_created_at timestamptz NOT NULL,
    eab_kid           text        NOT NULL,
    status            text        NOT NULL DEFAULT 'valid'
                      CHECK (status IN ('valid', 'deactivated', 'revoked')),
    contact           jsonb       NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL
);
CREATE INDEX idx_acme_device_accounts_device ON acme_device_accounts (device_id);

CREATE TABLE acme_nonces (
    nonce      text        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX idx_acme_nonces_expires ON acme_nonces (expires_at);

CREATE TABLE acme_device_orders (
    order_id         text        PRIMARY KEY,
    account_id       text        NOT NULL REFERENCES acme_device_accounts ON DELETE CASCADE,
    device_id        text        NOT NULL,
    identifiers      jsonb       NOT NULL,
    certificate_type text        NOT NULL CHECK (certificate_type IN ('wildcard', 'single')),
    status           text        NOT NULL
                     CHECK (status IN ('ready', 'processing', 'valid', 'invalid')),
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    -- The device's serial when finalize asked for a certificate: an asynchronous issuer's
    -- order is done when the device's row carries another one, active.
    previous_serial  text,
    serial_number    text,
    certificate_pem  text,
    error            jsonb
);
CREATE INDEX idx_acme_device_orders_account ON acme_device_orders (account_id, created_at);
CREATE INDEX idx_acme_device_orders_serial ON acme_device_orders (serial_number)
    WHERE serial_number IS NOT NULL;
