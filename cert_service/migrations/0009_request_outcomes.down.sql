ALTER TABLE certificate_requests DROP COLUMN IF EXISTS serial_number;
