//! Schema changes in the change stream. Event triggers in the source write
//! each DDL on a table, with the table's definition right after it, into
//! the WAL as a logical message (`pg_logical_emit_message`, transactional),
//! so the stream meets a schema change exactly where it happened:
//!
//! ```text
//!  ddl_command_end (CREATE/ALTER TABLE …)  → {"event": "ddl", "tables": [definition, …]}
//!  table_rewrite                            → {"event": "rewrite", "oid": …, "reason": …, "computed": …}
//!  sql_drop (DROP TABLE …)                  → {"event": "drop", "tables": [{oid, schema, name}]}
//!  TRUNCATE of one partition                → {"event": "truncate", "oid": …}
//! ```
//!
//! A definition holds what the catalog says at that point: columns with
//! their attribute numbers (a rename keeps them), types, nullability,
//! defaults and the value rows that existed before an added column hold;
//! the partitions of a partitioned table. Installing event triggers needs a
//! superuser; without one, columns are followed from pgoutput's Relation
//! messages alone (see `stream.rs`).

use serde::Deserialize;

/// The prefix of the DDL messages in the WAL.
pub const PREFIX: &str = "switchyard_ddl";

/// The schema that holds switchyard's functions in the source.
pub const SCHEMA: &str = "_switchyard";

/// One DDL message.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// Tables created or altered, as they are after the command.
    Ddl { tables: Vec<Definition> },
    /// A table rewritten (`reason`: PostgreSQL's `AT_REWRITE_*` bits; 2 is
    /// a column added with a volatile default, 4 a column's type changed).
    /// `computed`: the statement has a `USING` clause, so a changed
    /// column's values may be computed rather than cast.
    Rewrite {
        oid: u32,
        reason: i32,
        #[serde(default)]
        computed: bool,
    },
    /// Tables dropped.
    Drop { tables: Vec<Dropped> },
    /// A partition truncated (invisible to pgoutput when published through
    /// the partition root).
    Truncate { oid: u32 },
}

/// A table as the catalog describes it right after a command.
#[derive(Debug, Clone, Deserialize)]
pub struct Definition {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `r` plain, `p` partitioned.
    pub kind: String,
    pub ispartition: bool,
    /// The partitioned table it belongs to, for a partition.
    #[serde(default)]
    pub parent: Option<u32>,
    #[serde(default)]
    pub partitions: Vec<u32>,
    /// `pg_class.relreplident`: `d` default (the key), `f` full, `i` index.
    pub replident: String,
    /// The attribute numbers of the key (replica identity index, else the
    /// primary key).
    #[serde(default)]
    pub key: Vec<i32>,
    pub columns: Vec<ColumnDefinition>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ColumnDefinition {
    pub attnum: i32,
    pub name: String,
    /// `format_type(atttypid, atttypmod)`.
    #[serde(rename = "type")]
    pub declared: String,
    /// The type read: a domain's base type.
    pub base: u32,
    /// An array's element type, else 0.
    pub elem: u32,
    /// `pg_type.typtype` (`e` for an enum, `d` for a domain…).
    pub typtype: String,
    /// The enum type (of the column or of its array's elements) and its
    /// labels in order.
    #[serde(default)]
    pub enumtype: Option<String>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    pub notnull: bool,
    pub default: Option<String>,
    /// `a` (identity always), `d` (by default) or empty.
    pub identity: String,
    /// `s` for a stored generated column, else empty.
    pub generated: String,
    /// Rows that existed when the column was added hold `missing`.
    pub hasmissing: bool,
    pub missing: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Dropped {
    pub oid: u32,
    pub schema: String,
    pub name: String,
}

/// The definition of relation `$1` as JSON (the payload of a `ddl` event;
/// also how the daemon reads a table's definition now).
pub const DEFINITION_SQL: &str = "
SELECT jsonb_build_object(
    'oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname, 'kind', c.relkind,
    'ispartition', c.relispartition,
    'parent', (SELECT i.inhparent::int8 FROM pg_inherits i WHERE i.inhrelid = c.oid LIMIT 1),
    'partitions', (SELECT coalesce(jsonb_agg(i.inhrelid::int8), '[]') FROM pg_inherits i WHERE i.inhparent = c.oid),
    'replident', c.relreplident,
    'key', (SELECT coalesce(jsonb_agg(k.attnum ORDER BY k.n), '[]')
              FROM (SELECT indkey FROM pg_index WHERE indrelid = c.oid AND (indisprimary OR indisreplident)
                     ORDER BY indisreplident DESC, indisprimary DESC LIMIT 1) i,
                   unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, n)),
    'columns', (SELECT coalesce(jsonb_agg(jsonb_build_object(
            'attnum', a.attnum, 'name', a.attname, 'type', format_type(a.atttypid, a.atttypmod),
            'base', (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::int8,
            'elem', (CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0 END)::int8,
            'typtype', t.typtype, 'notnull', a.attnotnull,
            'enumtype', (SELECT format_type(e.oid, NULL) FROM pg_type e
                          WHERE e.oid = CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE t.oid END AND e.typtype = 'e'),
            'labels', (SELECT jsonb_agg(l.enumlabel ORDER BY l.enumsortorder) FROM pg_enum l
                        WHERE l.enumtypid = CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE t.oid END),
            'default', pg_get_expr(d.adbin, d.adrelid),
            'identity', a.attidentity, 'generated', a.attgenerated,
            'hasmissing', a.atthasmissing,
            'missing', CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END
        ) ORDER BY a.attnum), '[]')
        FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1";

/// The functions and event triggers that write DDL messages, and the
/// TRUNCATE trigger function for partitions. Idempotent.
pub fn install_sql() -> String {
    let definition = DEFINITION_SQL.replace("$1", "r.objid");
    format!(
        "CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE OR REPLACE FUNCTION {SCHEMA}.ddl_end() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
    r record;
    defs jsonb := '[]';
    def jsonb;
BEGIN
    FOR r IN SELECT DISTINCT objid FROM pg_event_trigger_ddl_commands()
              WHERE classid = 'pg_class'::regclass AND object_type IN ('table', 'table column')
    LOOP
        {definition_into}
        IF def IS NOT NULL AND def->>'kind' IN ('r', 'p') THEN
            defs := defs || jsonb_build_array(def);
        END IF;
    END LOOP;
    IF jsonb_array_length(defs) > 0 THEN
        PERFORM pg_logical_emit_message(true, '{PREFIX}', jsonb_build_object('event', 'ddl', 'tables', defs)::text);
    END IF;
END $fn$;
CREATE OR REPLACE FUNCTION {SCHEMA}.dropped() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
DECLARE
    tables jsonb;
BEGIN
    SELECT jsonb_agg(jsonb_build_object('oid', objid::int8, 'schema', schema_name, 'name', object_name))
      INTO tables FROM pg_event_trigger_dropped_objects()
     WHERE classid = 'pg_class'::regclass AND object_type = 'table' AND objsubid = 0;
    IF tables IS NOT NULL THEN
        PERFORM pg_logical_emit_message(true, '{PREFIX}', jsonb_build_object('event', 'drop', 'tables', tables)::text);
    END IF;
END $fn$;
CREATE OR REPLACE FUNCTION {SCHEMA}.rewritten() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_logical_emit_message(true, '{PREFIX}', jsonb_build_object('event', 'rewrite',
        'oid', pg_event_trigger_table_rewrite_oid()::int8, 'reason', pg_event_trigger_table_rewrite_reason(),
        'computed', current_query() ~* '\\musing\\M')::text);
END $fn$;
CREATE OR REPLACE FUNCTION {SCHEMA}.truncated() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_logical_emit_message(true, '{PREFIX}', jsonb_build_object('event', 'truncate', 'oid', TG_RELID::int8)::text);
    RETURN NULL;
END $fn$;
DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'switchyard_ddl_end') THEN
        CREATE EVENT TRIGGER switchyard_ddl_end ON ddl_command_end EXECUTE FUNCTION {SCHEMA}.ddl_end();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'switchyard_dropped') THEN
        CREATE EVENT TRIGGER switchyard_dropped ON sql_drop EXECUTE FUNCTION {SCHEMA}.dropped();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'switchyard_rewritten') THEN
        CREATE EVENT TRIGGER switchyard_rewritten ON table_rewrite EXECUTE FUNCTION {SCHEMA}.rewritten();
    END IF;
END $do$;",
        definition_into = format!("SELECT ({definition}) INTO def;").replace("\n", " "),
    )
}

/// Removes what [`install_sql`] made (the TRUNCATE triggers go with their
/// function).
pub const UNINSTALL_SQL: &str = "DROP EVENT TRIGGER IF EXISTS switchyard_ddl_end;
DROP EVENT TRIGGER IF EXISTS switchyard_dropped;
DROP EVENT TRIGGER IF EXISTS switchyard_rewritten;
DROP SCHEMA IF EXISTS _switchyard CASCADE;";

/// The statement-level TRUNCATE trigger of one partition.
pub fn truncate_trigger_sql(qualified: &str) -> String {
    format!(
        "DO $do$ BEGIN
            CREATE TRIGGER switchyard_truncated AFTER TRUNCATE ON {qualified}
                FOR EACH STATEMENT EXECUTE FUNCTION {SCHEMA}.truncated();
         EXCEPTION WHEN duplicate_object THEN NULL;
         END $do$"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let e: Event = serde_json::from_str(
            r#"{"event": "ddl", "tables": [{"oid": 5, "schema": "public", "name": "acct", "kind": "r",
                "ispartition": false, "parent": null, "partitions": [], "replident": "d", "key": [1],
                "columns": [{"attnum": 1, "name": "id", "type": "integer", "base": 23, "elem": 0,
                  "typtype": "b", "notnull": true, "default": null, "identity": "", "generated": "",
                  "hasmissing": false, "missing": null}]}]}"#,
        )
        .unwrap();
        let Event::Ddl { tables } = e else {
            panic!("not a ddl event")
        };
        assert_eq!((tables[0].oid, tables[0].columns[0].attnum), (5, 1));
        let e: Event =
            serde_json::from_str(r#"{"event": "rewrite", "oid": 7, "reason": 2}"#).unwrap();
        assert!(matches!(
            e,
            Event::Rewrite {
                oid: 7,
                reason: 2,
                computed: false
            }
        ));
        assert!(install_sql().contains("CREATE EVENT TRIGGER switchyard_ddl_end"));
    }
}
