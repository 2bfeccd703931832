-- AIP-155 request ids of RevokeDeviceApiKeys (shared/idempotency.py).
--
-- The first attempt records how many keys it revoked in the transaction that
-- revokes them; a retry within 24 hours returns that count and revokes nothing
-- that was created since. A row older than the window is taken over by the
-- next request with its id. (GenerateApiKey and RotateApiKey keep theirs on the
-- key they create, migration 0004.)
CREATE TABLE api_key_requests (
    request_id    uuid        PRIMARY KEY,
    method        text        NOT NULL,
    request_hash  bytea       NOT NULL,
    device_id     text        NOT NULL,
    revoked_count integer     NOT NULL,
    created_at    timestamptz NOT NULL
);
