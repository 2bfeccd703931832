DROP TABLE IF EXISTS api_key_requests;
