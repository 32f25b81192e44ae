-- Cutover: the last marker the stream met (written by `switchyard cutover`
-- into the source's change stream, recorded once everything before it is
-- applied), and one record per cutover (its steps, what its fence changed,
-- so that an interrupted cutover can be undone).
ALTER TABLE switchyard.checkpoint ADD COLUMN marker jsonb;

CREATE TABLE IF NOT EXISTS switchyard.cutover (
    id         text PRIMARY KEY,
    record     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
