DROP TABLE IF EXISTS certificate_unconfirmed_writes;
