-- Each change of what a key may do (its revocation, expiry, permissions, limit, device)
-- gives its row a new version, in the order the changes commit (they take the row's lock).
-- The cached record carries it: a record is replaced only by a newer version of the row, so
-- a revocation undone (a rotation whose caller never heard of it) reaches the cache at once,
-- and two replicas publishing out of order cannot bring back an older state.
ALTER TABLE device_api_keys ADD COLUMN version bigint NOT NULL DEFAULT 1;

CREATE FUNCTION device_api_keys_next_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER device_api_keys_version
    BEFORE UPDATE OF revoked_at, expires_at, permissions, rate_limit, device_id
    ON device_api_keys
    FOR EACH ROW EXECUTE FUNCTION device_api_keys_next_version();
