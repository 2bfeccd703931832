-- AIP-155 request ids (shared/idempotency.py).
--
-- The key a GenerateApiKey or RotateApiKey request created carries that
-- request's id and a fingerprint of the request. A retry revokes it and moves
-- the id to the key it creates instead, so one request id names one live key.
ALTER TABLE device_api_keys
    ADD COLUMN request_id uuid,
    ADD COLUMN request_hash bytea;

CREATE UNIQUE INDEX device_api_keys_request_id_key
    ON device_api_keys (request_id) WHERE request_id IS NOT NULL;
