-- Append-only audit trail of key lifecycle events: create, rotate, revoke and
-- the cascade revoke that follows a device's deletion.
--
-- * Never holds a key or its hash: the display prefix identifies the key.
-- * Rows cannot be changed or removed: triggers refuse UPDATE, DELETE and
--   TRUNCATE for every role (no code path tries). DROP TABLE (the down
--   migration) still works.
-- * `seq` orders events (newest first) and is the keyset for pagination;
--   created_at comes from the service's clock.
-- * device_id is NULL for operator keys and is the distribution column, as in
--   device_api_keys.
CREATE TABLE api_key_audit_events (
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL,
    action          text        NOT NULL
                                CHECK (action IN ('create', 'rotate', 'revoke', 'cascade_revoke')),
    key_id          uuid        NOT NULL,
    device_id       text,
    actor           text        NOT NULL,
    reason          text        NOT NULL DEFAULT '',
    display_prefix  text        NOT NULL,
    created_at      timestamptz NOT NULL,
    CONSTRAINT api_key_audit_events_event_id_key UNIQUE (event_id)
);

CREATE INDEX idx_api_key_audit_events_device ON api_key_audit_events (device_id, seq DESC);
CREATE INDEX idx_api_key_audit_events_key ON api_key_audit_events (key_id, seq DESC);

CREATE FUNCTION api_key_audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'api_key_audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER api_key_audit_events_no_change
    BEFORE UPDATE OR DELETE ON api_key_audit_events
    FOR EACH ROW EXECUTE FUNCTION api_key_audit_events_append_only();

CREATE TRIGGER api_key_audit_events_no_truncate
    BEFORE TRUNCATE ON api_key_audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION api_key_audit_events_append_only();
