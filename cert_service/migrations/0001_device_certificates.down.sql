DROP TABLE IF EXISTS device_certificates;
