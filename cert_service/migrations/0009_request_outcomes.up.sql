-- AIP-155 retries (shared/idempotency.py) never act on state the first attempt
-- did not see. certificate_requests records the serial a renewal or a
-- revocation left current, so that a retry can tell whether the device has
-- moved on since (renewed, revoked, deleted: REQUEST_SUPERSEDED). A deletion
-- also moves the deleted row's provision request id here (method 'provision'),
-- so that a retry of that provision does not create the device again.
ALTER TABLE certificate_requests ADD COLUMN serial_number text;
