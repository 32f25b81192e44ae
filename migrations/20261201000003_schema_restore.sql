-- The parts of a PostgreSQL source's schema (pg_dump) restored into this
-- target, so that a later run does not restore them again.
CREATE TABLE IF NOT EXISTS switchyard.schema_restore (
    section     text PRIMARY KEY,
    entries     integer NOT NULL,
    restored_at timestamptz NOT NULL DEFAULT now()
);
