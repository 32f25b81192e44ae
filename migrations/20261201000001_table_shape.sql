-- The shape (columns, key, types) a table has in the target, so that a
-- schema change while streaming starts from what the target holds.
ALTER TABLE switchyard.table_state ADD COLUMN shape text;
