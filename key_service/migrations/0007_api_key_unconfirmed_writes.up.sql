-- Writes whose callers have not been told of them yet (shared/outcomes.py).
--
-- A GenerateApiKey or RotateApiKey inserts a row here in the transaction that
-- creates the key, naming the new key (`subject`), what the write was (`kind`:
-- 'create' or 'rotation') and what undoing it needs (`args`: ids, the request
-- id, the rotated key's former validity; never a secret). Once the COMMIT has
-- returned, the row is deleted before the caller is answered. A row that is
-- still here after the grace period belongs to a write whose caller never heard
-- of it (its process died, or its answer said OUTCOME_UNKNOWN): any replica
-- undoes that write and deletes the row. A retry with the same request_id that
-- takes the key over deletes the row in its own transaction.
--
-- `created_at` is the database's own clock: the grace is measured on the clock
-- that also judges the callers' deadlines (shared/db.py, WRITE_GUARD).
CREATE TABLE api_key_unconfirmed_writes (
    subject     text        PRIMARY KEY,
    kind        text        NOT NULL,
    args        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX api_key_unconfirmed_writes_created_at
    ON api_key_unconfirmed_writes (created_at);
