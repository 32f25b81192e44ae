-- The daemon's own state in a PostgreSQL target, in a schema of its own:
-- the checkpoint (one row, written in the same transaction as the data it
-- covers) and the per-table copy state.
CREATE SCHEMA IF NOT EXISTS switchyard;

CREATE TABLE IF NOT EXISTS switchyard.checkpoint (
    id         integer PRIMARY KEY CHECK (id = 1),
    commit     bigint NOT NULL,
    ordinal    bigint NOT NULL,
    origin     text,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS switchyard.table_state (
    name       text PRIMARY KEY,
    status     text NOT NULL CHECK (status IN ('copying', 'done')),
    commit     bigint NOT NULL DEFAULT 0,
    ordinal    bigint NOT NULL DEFAULT 0,
    rows       bigint NOT NULL DEFAULT 0,
    source_id  text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
