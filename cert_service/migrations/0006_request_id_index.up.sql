-- The lifecycle worker forgets provisions' AIP-155 request ids after 24 hours
-- (CertificateStore.forget_requests). Without this index that UPDATE read the
-- whole table once a minute on every replica: at 10 million devices, 2.8 GB.
-- Only rows still carrying a request id are indexed, so it stays small.
CREATE INDEX idx_device_certificates_request_created
    ON device_certificates (created_at) WHERE request_id IS NOT NULL;
