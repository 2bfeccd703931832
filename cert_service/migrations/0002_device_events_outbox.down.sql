DROP INDEX IF EXISTS idx_device_certificates_auto_renewal;
DROP TABLE IF EXISTS device_events_outbox;
