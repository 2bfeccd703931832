DROP TABLE IF EXISTS api_key_audit_events;
DROP FUNCTION IF EXISTS api_key_audit_events_append_only();
