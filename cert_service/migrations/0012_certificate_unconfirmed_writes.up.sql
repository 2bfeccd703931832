-- Writes whose callers have not been told of them yet (shared/outcomes.py).
--
-- A provision inserts a row here in the statement that inserts its
-- certificate, naming the certificate's serial number (`subject`), what the
-- write was (`kind`: 'provision') and what undoing it needs (`args`: the device
-- id). Once the statement has committed, the rows of its batch are deleted
-- before the callers are answered. A row that is still here after the grace
-- period belongs to a provision whose caller never heard of it (its process
-- died, or its answer said OUTCOME_UNKNOWN): any replica deletes that
-- certificate, unless it changed since, and the row. A retry with the same
-- request_id that takes the certificate over deletes the row in its own
-- statement.
--
-- `created_at` is the database's own clock: the grace is measured on the clock
-- that also judges the callers' deadlines (shared/db.py, WRITE_GUARD).
CREATE TABLE certificate_unconfirmed_writes (
    subject     text        PRIMARY KEY,
    kind        text        NOT NULL,
    args        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX certificate_unconfirmed_writes_created_at
    ON certificate_unconfirmed_writes (created_at);
