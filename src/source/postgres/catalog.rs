//! What the catalog says about the replicated tables: discovery (columns,
//! keys, types, indexes, foreign keys, enums, defaults, the server's and the
//! role's fitness for logical replication), and the type of a column added
//! while streaming. Reads only.

use std::collections::{BTreeMap, HashMap};

use tokio_postgres::Client;

use crate::config::TableFilter;
use crate::error::Result;
use crate::model::{
    Check, CheckToken, Column, ColumnDefault, Link, LogicalType, Secondary, TableSchema,
};
use crate::pg::conn::{pg_error, PgEndpoint};
use crate::pg::{quote_ident, quote_qualified};
use crate::source::{Discovery, Problem};

/// A table as the catalog describes it.
#[derive(Debug, Clone)]
pub struct PgTable {
    /// The table's OID: pgoutput names relations by it.
    pub oid: u32,
    /// A plain table (not a partitioned root): read with `ONLY`, without
    /// the rows of inheritance children (their changes are not its own).
    pub only: bool,
    pub schema: String,
    pub name: String,
    /// Column type OIDs (domains resolved to their base type; an array's
    /// element type).
    pub types: Vec<u32>,
}

impl PgTable {
    pub fn qualified(&self) -> String {
        quote_qualified(&self.schema, &self.name)
    }
}

/// The name switchyard uses for a table: `table` in `public`, else `schema.table`.
pub fn display_name(schema: &str, table: &str) -> String {
    if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}.{table}")
    }
}

/// Which tables are replicated and how, from the config (owned, for the
/// stream, which meets tables created while it runs).
#[derive(Clone)]
pub struct Selector {
    pub filter: TableFilter,
    pub renames: BTreeMap<String, String>,
    pub publication: String,
    pub create_publication: bool,
    pub unmapped_as_text: bool,
    pub target_is_postgres: bool,
    /// A table renamed in the source is renamed in the target
    /// (`schema_changes.rename_table = "follow"`).
    pub follow_renames: bool,
    /// Foreign keys become record links (`target.links`, SurrealDB).
    pub links: bool,
}

impl Selector {
    pub fn selection(&self, published: bool) -> Selection<'_> {
        Selection {
            filter: &self.filter,
            renames: &self.renames,
            publication: &self.publication,
            published,
            create_publication: self.create_publication,
            unmapped_as_text: self.unmapped_as_text,
            target_is_postgres: self.target_is_postgres,
            links: self.links && !self.target_is_postgres,
        }
    }

    /// The target name of a table renamed in the source to `name`: its own
    /// (`tables.rename`, else the default), or the one it had where renames
    /// are not followed.
    pub fn target_name(&self, name: &str, before: &TableSchema) -> String {
        if !self.follow_renames {
            return before.target_name.clone();
        }
        self.renames
            .get(name)
            .cloned()
            .unwrap_or_else(|| default_target_name(name, self.target_is_postgres))
    }
}

/// A table's name in the target unless renamed: the same, schema and all,
/// in PostgreSQL; `schema_table` elsewhere (SurrealDB has no schemas).
pub fn default_target_name(name: &str, target_is_postgres: bool) -> String {
    if target_is_postgres {
        name.to_string()
    } else {
        name.replace('.', "_")
    }
}

/// What discovery needs to know of the config.
pub struct Selection<'a> {
    pub filter: &'a TableFilter,
    pub renames: &'a BTreeMap<String, String>,
    pub publication: &'a str,
    /// The publication exists: its tables are the candidates.
    pub published: bool,
    /// Switchyard may create the publication when it is missing.
    pub create_publication: bool,
    /// Columns without a mapping for the target travel as text.
    pub unmapped_as_text: bool,
    /// A PostgreSQL target reads every type's text form as that type.
    pub target_is_postgres: bool,
    /// Foreign keys become record links (`target.links`, SurrealDB).
    pub links: bool,
}

/// The selected tables and what stands in their way, with their catalog
/// entries by switchyard's name.
pub async fn discover(
    c: &Client,
    ep: &PgEndpoint,
    sel: &Selection<'_>,
) -> Result<(Discovery, HashMap<String, PgTable>)> {
    let pg = |what: &'static str| move |e| pg_error(ep, what, e);
    let mut d = Discovery::default();
    d.problems.extend(server_problems(c, ep).await?);
    let candidates = if sel.published {
        c.query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text FROM pg_publication_tables pt
               JOIN pg_namespace n ON n.nspname = pt.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
              WHERE pt.pubname = $1 ORDER BY 2, 3",
            &[&sel.publication],
        )
        .await
        .map_err(pg("reading the publication's tables"))?
    } else {
        if !sel.create_publication {
            d.problems.push(Problem {
                table: String::new(),
                column: None,
                message: format!(
                    "publication {:?} does not exist and source.create_publication is false; create it (CREATE PUBLICATION {} FOR TABLE …) or let switchyard create it",
                    sel.publication,
                    quote_ident(sel.publication)
                ),
                blocking: true,
            });
            return Ok((d, HashMap::new()));
        }
        c.query(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_switchyard')
                AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
              ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(pg("listing tables"))?
    };
    let mut catalog = HashMap::new();
    for r in candidates {
        let (schema, table): (String, String) = (r.get(1), r.get(2));
        let name = display_name(&schema, &table);
        if !sel.filter.matches(&name) {
            continue;
        }
        let entry = PgTable {
            oid: r.get(0),
            only: r.get::<_, String>(4) == "r",
            schema,
            name: table,
            types: Vec::new(),
        };
        let replident: String = r.get(3);
        if let Some((t, pg)) = describe(c, ep, sel, entry, &replident, &mut d.problems).await? {
            catalog.insert(t.name.clone(), pg);
            d.tables.push(t);
        }
    }
    Ok((d, catalog))
}

/// One table by OID as the catalog describes it now (a table created or
/// changed while streaming), or `None` with the problems that keep it out.
pub async fn describe_oid(
    c: &Client,
    ep: &PgEndpoint,
    sel: &Selection<'_>,
    oid: u32,
) -> Result<(Option<(TableSchema, PgTable)>, Vec<Problem>)> {
    let row = c
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading a table", e))?;
    let mut problems = Vec::new();
    let Some(r) = row else {
        return Ok((None, problems));
    };
    let entry = PgTable {
        oid,
        only: r.get::<_, String>(4) == "r",
        schema: r.get(1),
        name: r.get(2),
        types: Vec::new(),
    };
    let replident: String = r.get(3);
    let described = describe(c, ep, sel, entry, &replident, &mut problems).await?;
    Ok((described, problems))
}

/// The partitions of a partitioned table, with their bounds.
pub async fn partition_bounds(
    c: &Client,
    ep: &PgEndpoint,
    oid: u32,
) -> Result<Vec<crate::model::Partition>> {
    Ok(c.query(
        "SELECT n.nspname::text, p.relname::text, pg_get_expr(p.relpartbound, p.oid)
               FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE i.inhparent = $1 AND p.relispartition ORDER BY 1, 2",
        &[&oid],
    )
    .await
    .map_err(|e| pg_error(ep, "reading a table's partitions", e))?
    .iter()
    .map(|r| crate::model::Partition {
        name: display_name(r.get(0), r.get(1)),
        bound: r.get(2),
    })
    .collect())
}

/// The partitions (at every level) of the partitioned tables `roots`, each
/// with its root.
pub async fn partitions_of(
    c: &Client,
    ep: &PgEndpoint,
    roots: &[u32],
) -> Result<HashMap<u32, u32>> {
    let mut out = HashMap::new();
    for &root in roots {
        for r in c
            .query(
                "SELECT relid::oid FROM pg_partition_tree($1::oid::regclass) WHERE relid <> $1::oid::regclass",
                &[&root],
            )
            .await
            .map_err(|e| pg_error(ep, "reading a table's partitions", e))?
        {
            out.insert(r.get::<_, u32>(0), root);
        }
    }
    Ok(out)
}

/// The partitions (at every level) of `root` as a shape names its direct
/// ones (`events_2024`, `sales.events_2024`): the partitions as of the
/// shape's time, not the catalog's now. Names no longer in the catalog are
/// left out.
pub async fn partitions_named(
    c: &Client,
    ep: &PgEndpoint,
    root: u32,
    names: &[String],
) -> Result<HashMap<u32, u32>> {
    let mut out = HashMap::new();
    for name in names {
        for r in c
            .query(
                "SELECT relid::oid FROM pg_partition_tree(to_regclass($1))",
                &[&crate::pg::quote_table(name)],
            )
            .await
            .map_err(|e| pg_error(ep, "reading a table's partitions", e))?
        {
            out.insert(r.get::<_, u32>(0), root);
        }
    }
    Ok(out)
}

/// A replicated table's shape after a DDL, from the definition the event
/// trigger wrote at that point of the stream; `prev` is its shape before
/// (secondary indexes, which no DDL of the table changes here, are kept).
pub fn definition_shape(
    def: &super::ddl::Definition,
    prev: &TableSchema,
    sel: &Selection<'_>,
) -> std::result::Result<TableSchema, String> {
    let name = display_name(&def.schema, &def.name);
    let mut columns = Vec::new();
    let mut read_as = Vec::new();
    let mut ids = Vec::new();
    let mut defaults = Vec::new();
    let mut enum_types: Vec<(String, Vec<String>)> = Vec::new();
    for c in def.columns.iter().filter(|c| c.generated.is_empty()) {
        let (logical, native, base) = column_type(c.base, c.elem);
        let mut logical = for_target(logical, sel);
        if let Some(p) = unmapped(sel, &name, &c.name, &c.declared, native, &c.typtype) {
            if p.blocking {
                return Err(format!("column {:?}: {}", c.name, p.message));
            }
        }
        if let (Some(t), Some(labels)) = (&c.enumtype, &c.labels) {
            if !enum_types.iter().any(|(n, _)| n == t) {
                enum_types.push((t.clone(), labels.clone()));
            }
        }
        if sel.target_is_postgres
            && logical == LogicalType::Json
            && c.declared.ends_with("[]")
            && (crate::schema::postgres::is_built_in(&c.declared) || c.enumtype.is_some())
        {
            logical = LogicalType::Text;
        }
        let serial = c
            .default
            .as_deref()
            .is_some_and(|e| e.starts_with("nextval("));
        let default = c.default.clone().filter(|e| !serial && portable_default(e));
        let identity = !c.identity.is_empty() || serial;
        if identity || default.is_some() || c.hasmissing {
            defaults.push(ColumnDefault {
                column: columns.len(),
                identity,
                default,
                existing: c.missing.clone().filter(|_| c.hasmissing),
            });
        }
        read_as.push(base);
        ids.push(c.attnum);
        columns.push(Column {
            name: c.name.clone(),
            source_type: c.declared.clone(),
            logical,
            nullable: !c.notnull,
        });
    }
    let key: Vec<usize> = def
        .key
        .iter()
        .filter_map(|k| ids.iter().position(|i| i == k))
        .collect();
    let whole_row = key.is_empty();
    if whole_row && def.replident != "f" {
        return Err(
            "it has no primary key or replica identity index any more, so its UPDATEs and DELETEs cannot be matched to a row".into(),
        );
    }
    let target_name = if prev.name == name {
        prev.target_name.clone()
    } else {
        sel.renames
            .get(&name)
            .cloned()
            .unwrap_or_else(|| default_target_name(&name, sel.target_is_postgres))
    };
    let mut t = if whole_row {
        TableSchema::whole_row(name, target_name, columns)
    } else {
        let mut t = TableSchema::keyed(name, target_name, columns, key);
        for &k in &t.key.clone() {
            t.columns[k].nullable = false;
        }
        t
    };
    t.source_id = def.oid.to_string();
    t.column_ids = ids;
    t.read_as = read_as;
    t.column_defaults = defaults;
    t.enum_types = enum_types;
    t.secondary = prev.secondary.clone();
    // Partitions change by ATTACH and DETACH, which copy the table again
    // (read from the catalog then), or by a partition created under it.
    t.partitions = prev.partitions.clone();
    // Record links, for the columns still there.
    t.links = prev
        .links
        .iter()
        .filter_map(|l| {
            let name = &prev.columns.get(l.column)?.name;
            let column = t.columns.iter().position(|c| &c.name == name)?;
            Some(Link {
                column,
                table: l.table.clone(),
            })
        })
        .collect();
    // The CHECKs that list a column's values, for the columns still there.
    t.checks = prev
        .checks
        .iter()
        .filter_map(|ch| {
            let (i, _) = ch.allowed_values()?;
            let j = t
                .columns
                .iter()
                .position(|c| c.name == prev.columns[i].name)?;
            let mut ch = ch.clone();
            ch.expr[0] = CheckToken::Column(j);
            Some(ch)
        })
        .collect();
    Ok(t)
}

/// The columns a single-column foreign key gives to the referenced table's
/// primary key: stored as record links of that table (its target name).
async fn links(
    c: &Client,
    ep: &PgEndpoint,
    sel: &Selection<'_>,
    oid: u32,
    columns: &[Column],
) -> Result<Vec<Link>> {
    let rows = c
        .query(
            "SELECT a.attname::text, rn.nspname::text, rc.relname::text
               FROM pg_constraint f
               JOIN pg_attribute a ON a.attrelid = f.conrelid AND a.attnum = f.conkey[1]
               JOIN pg_class rc ON rc.oid = f.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
               JOIN pg_constraint p ON p.conrelid = f.confrelid AND p.contype = 'p'
              WHERE f.conrelid = $1 AND f.contype = 'f'
                AND cardinality(f.conkey) = 1 AND p.conkey = f.confkey
              ORDER BY f.conname",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the table's foreign keys", e))?;
    let mut out: Vec<Link> = Vec::new();
    for r in rows {
        let column: String = r.get(0);
        let name = display_name(&r.get::<_, String>(1), &r.get::<_, String>(2));
        let Some(i) = columns.iter().position(|c| c.name == column) else {
            continue;
        };
        if out.iter().any(|l| l.column == i) {
            continue;
        }
        let table = sel
            .renames
            .get(&name)
            .cloned()
            .unwrap_or_else(|| default_target_name(&name, false));
        out.push(Link { column: i, table });
    }
    Ok(out)
}

/// The table's CHECK constraints that list the values of one column
/// (`status IN ('draft', 'active')`, which PostgreSQL keeps as
/// `status = ANY (ARRAY[…])`).
async fn listed_values(
    c: &Client,
    ep: &PgEndpoint,
    oid: u32,
    columns: &[Column],
) -> Result<Vec<Check>> {
    let rows = c
        .query(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
              WHERE conrelid = $1 AND contype = 'c' AND convalidated ORDER BY conname",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the table's CHECK constraints", e))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let def: String = r.get(1);
            Some(Check {
                name: r.get(0),
                expr: in_list(&def, columns)?,
                source: def,
            })
        })
        .collect())
}

/// `CHECK ((col = ANY (ARRAY['a'::text, 'b'::text])))` (and its forms with
/// casts) as the tokens of `col IN ('a', 'b')`; `None` for any other CHECK.
pub fn in_list(def: &str, columns: &[Column]) -> Option<Vec<CheckToken>> {
    fn unwrap(s: &str) -> &str {
        let mut s = s.trim();
        while s.starts_with('(') && s.ends_with(')') && balanced(&s[1..s.len() - 1]) {
            s = s[1..s.len() - 1].trim();
        }
        s
    }
    fn balanced(s: &str) -> bool {
        let mut depth = 0i32;
        let mut quoted = false;
        for c in s.chars() {
            match c {
                '\'' | '"' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => {
                    depth -= 1;
                    if depth < 0 {
                        return false;
                    }
                }
                _ => {}
            }
        }
        depth == 0
    }
    /// `x::type` → `x`, where the cast is outside quotes and parentheses.
    fn uncast(s: &str) -> &str {
        let mut depth = 0i32;
        let mut quoted = false;
        for (i, c) in s.char_indices() {
            match c {
                '\'' | '"' => quoted = !quoted,
                '(' | '[' if !quoted => depth += 1,
                ')' | ']' if !quoted => depth -= 1,
                ':' if !quoted && depth == 0 && s[i..].starts_with("::") => return s[..i].trim(),
                _ => {}
            }
        }
        s.trim()
    }
    let body = unwrap(def.strip_prefix("CHECK ")?);
    let (lhs, rhs) = body.split_once(" = ANY ")?;
    let col = unwrap(uncast(unwrap(lhs)));
    let name = crate::pg::unquote_ident(col)?;
    let column = columns.iter().position(|c| c.name == name)?;
    let list = unwrap(uncast(unwrap(rhs)));
    let items = list.strip_prefix("ARRAY[")?.strip_suffix(']')?;
    let mut out = vec![
        CheckToken::Column(column),
        CheckToken::Word("IN".into()),
        CheckToken::Word("(".into()),
    ];
    let mut rest = items.trim();
    loop {
        if let Some(q) = rest.strip_prefix('\'') {
            // A quoted literal, '' for a quote, then its cast.
            let mut text = String::new();
            let mut chars = q.char_indices().peekable();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                if c == '\'' {
                    if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                        chars.next();
                        text.push('\'');
                        continue;
                    }
                    end = Some(i + 1);
                    break;
                }
                text.push(c);
            }
            rest = &q[end?..];
            let mut numeric = false;
            if let Some(cast) = rest.strip_prefix("::") {
                let stop = cast.find(',').unwrap_or(cast.len());
                numeric = [
                    "integer",
                    "bigint",
                    "smallint",
                    "numeric",
                    "real",
                    "double precision",
                ]
                .iter()
                .any(|t| cast[..stop].trim().starts_with(t));
                rest = &cast[stop..];
            }
            if numeric && text.parse::<f64>().is_ok() {
                out.push(CheckToken::Number(text));
            } else {
                out.push(CheckToken::Text(text));
            }
        } else {
            let stop = rest.find(',').unwrap_or(rest.len());
            let number = unwrap(uncast(unwrap(&rest[..stop])));
            number.parse::<f64>().ok()?;
            out.push(CheckToken::Number(number.to_string()));
            rest = &rest[stop..];
        }
        rest = rest.trim_start();
        match rest.strip_prefix(',') {
            Some(r) => {
                out.push(CheckToken::Word(",".into()));
                rest = r.trim_start();
            }
            None if rest.is_empty() => break,
            None => return None,
        }
    }
    out.push(CheckToken::Word(")".into()));
    Some(out)
}

/// Tables `tables.include` selects that the (user's) publication leaves out.
pub async fn unpublished(c: &Client, ep: &PgEndpoint, sel: &Selection<'_>) -> Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_switchyard')
                AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
                AND NOT EXISTS (SELECT 1 FROM pg_publication_tables pt
                                 WHERE pt.pubname = $1 AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
              ORDER BY 1, 2",
            &[&sel.publication],
        )
        .await
        .map_err(|e| pg_error(ep, "listing tables", e))?;
    Ok(rows
        .iter()
        .map(|r| display_name(&r.get::<_, String>(0), &r.get::<_, String>(1)))
        .filter(|n| sel.filter.matches(n))
        .collect())
}

/// What logical replication needs of the server and the role.
async fn server_problems(c: &Client, ep: &PgEndpoint) -> Result<Vec<Problem>> {
    let row = c
        .query_one(
            "SELECT current_setting('wal_level'), current_user::text,
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await
        .map_err(|e| pg_error(ep, "reading wal_level and the role", e))?;
    let (wal_level, user, can_replicate): (String, String, Option<bool>) =
        (row.get(0), row.get(1), row.get(2));
    let problem = |message: String| Problem {
        table: "(source)".into(),
        column: None,
        message,
        blocking: true,
    };
    let mut out = Vec::new();
    if wal_level != "logical" {
        out.push(problem(format!(
            "the server runs with wal_level = {wal_level}; logical replication needs wal_level = logical (ALTER SYSTEM SET wal_level = logical, then restart the server)"
        )));
    }
    if can_replicate != Some(true) {
        out.push(problem(format!(
            "role {user:?} may not start replication; ALTER ROLE {} REPLICATION (or use a role that has it)",
            quote_ident(&user)
        )));
    }
    Ok(out)
}

/// One candidate table as the pipeline sees it, with its catalog entry; or
/// `None` with the blocking problem that keeps it out.
async fn describe(
    c: &Client,
    ep: &PgEndpoint,
    sel: &Selection<'_>,
    mut pg: PgTable,
    replident: &str,
    problems: &mut Vec<Problem>,
) -> Result<Option<(TableSchema, PgTable)>> {
    let name = display_name(&pg.schema, &pg.name);
    let (mut columns, types, attnums) = columns(c, ep, sel, pg.oid, &name, problems).await?;
    pg.types = types.clone();
    let key = key_columns(c, ep, pg.oid, &columns).await?;
    let target_name = sel
        .renames
        .get(&name)
        .cloned()
        .unwrap_or_else(|| default_target_name(&name, sel.target_is_postgres));
    let source_id = pg.oid.to_string();
    let partitions = if pg.only {
        Vec::new()
    } else {
        partition_bounds(c, ep, pg.oid).await?
    };
    let identify = |t: TableSchema| TableSchema {
        source_id: source_id.clone(),
        column_ids: attnums.clone(),
        read_as: types.clone(),
        partitions: partitions.clone(),
        ..t
    };
    if key.is_empty() && replident == "f" {
        // REPLICA IDENTITY FULL: the old row image identifies the row.
        problems.push(Problem {
            table: name.clone(),
            column: None,
            message: "no key: rows are identified by their whole value (REPLICA IDENTITY FULL)"
                .into(),
            blocking: false,
        });
        let t = identify(TableSchema::whole_row(name, target_name, columns));
        return Ok(Some((t, pg)));
    }
    if key.is_empty() {
        problems.push(Problem {
            table: name.clone(),
            column: None,
            message: format!(
                "no primary key or replica identity index, so its UPDATEs and DELETEs cannot be matched to a row; add a primary key, or ALTER TABLE {q} REPLICA IDENTITY USING INDEX <unique index>, or ALTER TABLE {q} REPLICA IDENTITY FULL (rows identified by their whole value), or exclude the table",
                q = pg.qualified()
            ),
            blocking: true,
        });
        return Ok(None);
    }
    for &k in &key {
        columns[k].nullable = false;
    }
    let secondary = secondary(c, ep, pg.oid).await?;
    let enum_types = enum_types(c, ep, pg.oid).await?;
    let column_defaults = column_defaults(c, ep, pg.oid, &columns).await?;
    // A target that is not PostgreSQL (which pg_dump gives every CHECK)
    // asserts the values a CHECK lists.
    let checks = if sel.target_is_postgres {
        Vec::new()
    } else {
        listed_values(c, ep, pg.oid, &columns).await?
    };
    if sel.target_is_postgres {
        // An array whose type the target keeps travels as its own text,
        // lower bounds and all (`[0:1]={a,b}`), not as JSON.
        for col in columns.iter_mut() {
            if col.logical == LogicalType::Json
                && col.source_type.ends_with("[]")
                && (crate::schema::postgres::is_built_in(&col.source_type)
                    || crate::schema::postgres::is_enum(&enum_types, &col.source_type))
            {
                col.logical = LogicalType::Text;
            }
        }
    }
    let links = if sel.links {
        links(c, ep, sel, pg.oid, &columns).await?
    } else {
        Vec::new()
    };
    let t = identify(TableSchema {
        secondary,
        enum_types,
        column_defaults,
        checks,
        links,
        ..TableSchema::keyed(name, target_name, columns, key)
    });
    Ok(Some((t, pg)))
}

/// A table's replicated columns (generated ones are computed, not
/// replicated), their type OIDs and attribute numbers; a type the target
/// has no mapping for is a problem.
async fn columns(
    c: &Client,
    ep: &PgEndpoint,
    sel: &Selection<'_>,
    oid: u32,
    table: &str,
    problems: &mut Vec<Problem>,
) -> Result<(Vec<Column>, Vec<u32>, Vec<i32>)> {
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END,
                    a.attnotnull, t.typtype::text,
                    CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END,
                    a.attnum::int4
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading columns", e))?;
    let mut columns = Vec::new();
    let mut types = Vec::new();
    let mut attnums = Vec::new();
    for col in &rows {
        let cname: String = col.get(0);
        let declared: String = col.get(1);
        let typtype: String = col.get(4);
        let (logical, native, base) = column_type(col.get(2), col.get(5));
        let logical = for_target(logical, sel);
        if let Some(p) = unmapped(sel, table, &cname, &declared, native, &typtype) {
            problems.push(p);
        }
        types.push(base);
        attnums.push(col.get(6));
        columns.push(Column {
            name: cname,
            source_type: declared,
            logical,
            nullable: !col.get::<_, bool>(3),
        });
    }
    Ok((columns, types, attnums))
}

/// The problem of a column whose type has no mapping for the target.
fn unmapped(
    sel: &Selection<'_>,
    table: &str,
    column: &str,
    declared: &str,
    native: bool,
    typtype: &str,
) -> Option<Problem> {
    if native || typtype == "e" || sel.target_is_postgres {
        return None;
    }
    Some(Problem {
        table: table.to_string(),
        column: Some(column.to_string()),
        message: if sel.unmapped_as_text {
            format!("type {declared} is carried as its PostgreSQL text form")
        } else {
            format!(
                "type {declared} has no mapping for the target; set source.unmapped_as_text = true to carry it as its PostgreSQL text form, or exclude the table"
            )
        },
        blocking: !sel.unmapped_as_text,
    })
}

/// A column's logical type, whether it maps natively, and the type OID its
/// values are read as: an array travels as a JSON array of its elements
/// (read as the element type).
fn column_type(base: u32, element: u32) -> (LogicalType, bool, u32) {
    if element != 0 {
        (LogicalType::Json, true, element)
    } else {
        let (l, n) = logical_for(base);
        (l, n, base)
    }
}

/// The key: the replica identity index if there is one (its columns are
/// what the old key image holds), else the primary key.
async fn key_columns(
    c: &Client,
    ep: &PgEndpoint,
    oid: u32,
    columns: &[Column],
) -> Result<Vec<usize>> {
    let rows = c
        .query(
            "SELECT a.attname::text
               FROM (SELECT indrelid, indkey FROM pg_index
                      WHERE indrelid = $1 AND (indisprimary OR indisreplident)
                      ORDER BY indisreplident DESC, indisprimary DESC LIMIT 1) i
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              ORDER BY array_position(i.indkey::int2[], a.attnum)",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the key", e))?;
    let mut key = Vec::new();
    for k in rows {
        let kname: String = k.get(0);
        if let Some(i) = columns.iter().position(|c| c.name == kname) {
            if !key.contains(&i) {
                key.push(i);
            }
        }
    }
    Ok(key)
}

/// Whether a default expression means the same in another database: a
/// literal (with its cast), a number, a boolean, or a clock or uuid function.
fn portable_default(e: &str) -> bool {
    let e = e.trim();
    const FUNCTIONS: &[&str] = &[
        "now()",
        "CURRENT_TIMESTAMP",
        "CURRENT_DATE",
        "CURRENT_TIME",
        "LOCALTIMESTAMP",
        "LOCALTIME",
        "gen_random_uuid()",
        "true",
        "false",
        "NULL",
    ];
    if FUNCTIONS.contains(&e) {
        return true;
    }
    if e.parse::<f64>().is_ok()
        || (e.starts_with('(') && e.ends_with(')') && e[1..e.len() - 1].parse::<f64>().is_ok())
    {
        return true;
    }
    // 'text'::type, without anything after the cast's type name.
    if let Some(rest) = e.strip_prefix('\'') {
        if let Some(end) = rest.rfind("'::") {
            let ty = &rest[end + 3..];
            return !rest[..end].contains("'::")
                && ty
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || " _()[],\"".contains(c));
        }
        return rest.ends_with('\'');
    }
    false
}

/// Logical type for a PostgreSQL type OID, and whether it maps natively.
pub fn logical_for(oid: u32) -> (LogicalType, bool) {
    use LogicalType as L;
    match oid {
        16 => (L::Bool, true),
        20 | 21 | 23 | 26 => (L::Int, true),
        700 | 701 => (L::Float, true),
        1700 => (L::Decimal, true),
        25 | 1043 | 1042 | 19 | 18 => (L::Text, true),
        17 => (L::Bytes, true),
        114 | 3802 => (L::Json, true),
        1114 | 1184 => (L::Timestamp, true),
        2950 => (L::Uuid, true),
        1082 => (L::Date, true),
        1186 => (L::Interval, true),
        // Every other built-in type (time, inet, money, ranges, tsvector,
        // xml, geometric types, …) travels as its PostgreSQL text form, a
        // documented choice; a user-defined type (an OID past PostgreSQL's
        // own) has no mapping.
        oid if oid < FIRST_NORMAL_OID => (L::Text, true),
        _ => (L::Text, false),
    }
}

/// PostgreSQL's `FirstNormalObjectId`: OIDs below it are the system's own.
const FIRST_NORMAL_OID: u32 = 16384;

/// A column's logical type for the target: a PostgreSQL target keeps the
/// source's own type and reads uuids, dates and intervals as the text they
/// arrive in.
fn for_target(logical: LogicalType, sel: &Selection<'_>) -> LogicalType {
    match logical {
        LogicalType::Uuid | LogicalType::Date | LogicalType::Interval if sel.target_is_postgres => {
            LogicalType::Text
        }
        l => l,
    }
}

/// Identity (and serial) columns, and defaults that mean the same in any
/// database: constants, `now()` and its kin, `gen_random_uuid()`.
async fn column_defaults(
    c: &Client,
    ep: &PgEndpoint,
    oid: u32,
    columns: &[Column],
) -> Result<Vec<ColumnDefault>> {
    let rows = c
        .query(
            "SELECT a.attname::text, a.attidentity::text, pg_get_expr(d.adbin, d.adrelid),
                    CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                AND (a.attidentity <> '' OR d.adbin IS NOT NULL OR a.atthasmissing)",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the table's defaults", e))?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        let Some(column) = columns.iter().position(|c| c.name == name) else {
            continue;
        };
        let identity_kind: String = r.get(1);
        let expr: Option<String> = r.get(2);
        let existing: Option<String> = r.get(3);
        let serial = expr.as_deref().is_some_and(|e| e.starts_with("nextval("));
        let default = expr.filter(|e| !serial && portable_default(e));
        if !identity_kind.is_empty() || serial || default.is_some() || existing.is_some() {
            out.push(ColumnDefault {
                column,
                identity: !identity_kind.is_empty() || serial,
                default,
                existing,
            });
        }
    }
    out.sort_by_key(|d| d.column);
    Ok(out)
}

/// The enum types of a table's columns and of its arrays' elements, with
/// their labels.
async fn enum_types(c: &Client, ep: &PgEndpoint, oid: u32) -> Result<Vec<(String, Vec<String>)>> {
    let rows = c
        .query(
            "SELECT DISTINCT format_type(t.oid, NULL),
                    (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = t.oid)
               FROM pg_attribute a JOIN pg_type at ON at.oid = a.atttypid
               JOIN pg_type t ON t.oid = CASE WHEN at.typcategory = 'A' AND at.typelem <> 0 THEN at.typelem ELSE at.oid END
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype = 'e'",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the table's enum types", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
            )
        })
        .collect())
}

/// A table's secondary indexes (not the primary key, not exclusion
/// constraints) and foreign keys, from the catalog.
async fn secondary(c: &Client, ep: &PgEndpoint, oid: u32) -> Result<Vec<Secondary>> {
    let mut out = Vec::new();
    for r in c
        .query(
            "SELECT ic.relname::text, i.indisunique, substring(pg_get_indexdef(i.indexrelid) from ' USING .*$'), NOT i.indimmediate
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
              WHERE i.indrelid = $1 AND NOT i.indisprimary
                AND NOT EXISTS (SELECT 1 FROM pg_constraint x WHERE x.conindid = i.indexrelid AND x.contype = 'x')
              ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the table's indexes", e))?
    {
        let using: Option<String> = r.get(2);
        if let Some(using) = using {
            out.push(Secondary::Index {
                name: r.get(0),
                unique: r.get(1),
                using: using.trim().to_string(),
                deferred: r.get(3),
            });
        }
    }
    for r in c
        .query(
            "SELECT c.conname::text,
                    (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.conkey) WITH ORDINALITY k(attnum, n)
                       JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum),
                    rn.nspname::text, rc.relname::text,
                    (SELECT array_agg(a.attname::text ORDER BY k.n) FROM unnest(c.confkey) WITH ORDINALITY k(attnum, n)
                       JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.attnum),
                    c.confupdtype::text, c.confdeltype::text
               FROM pg_constraint c JOIN pg_class rc ON rc.oid = c.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace
              WHERE c.conrelid = $1 AND c.contype = 'f' ORDER BY 1",
            &[&oid],
        )
        .await
        .map_err(|e| pg_error(ep, "reading the table's foreign keys", e))?
    {
        let action = |code: String| match code.as_str() {
            "r" => "RESTRICT",
            "c" => "CASCADE",
            "n" => "SET NULL",
            "d" => "SET DEFAULT",
            _ => "NO ACTION",
        };
        let (ns, rel): (String, String) = (r.get(2), r.get(3));
        out.push(Secondary::ForeignKey {
            name: r.get(0),
            columns: r.get(1),
            references: display_name(&ns, &rel),
            ref_columns: r.get(4),
            actions: format!(
                "ON UPDATE {} ON DELETE {}",
                action(r.get(5)),
                action(r.get(6))
            ),
        });
    }
    Ok(out)
}

/// The row count the planner estimates for a table (progress only).
pub async fn estimated_rows(c: &Client, ep: &PgEndpoint, t: &PgTable) -> Result<Option<u64>> {
    let row = c
        .query_one(
            "SELECT reltuples::int8 FROM pg_class WHERE oid = $1",
            &[&t.oid],
        )
        .await
        .map_err(|e| pg_error(ep, "estimating the row count", e))?;
    let n: i64 = row.get(0);
    Ok((n >= 0).then_some(n as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(names: &[&str]) -> Vec<Column> {
        names
            .iter()
            .map(|n| Column {
                name: n.to_string(),
                source_type: "text".into(),
                logical: LogicalType::Text,
                nullable: true,
            })
            .collect()
    }

    fn allowed(def: &str, columns: &[Column]) -> Option<(usize, Vec<serde_json::Value>)> {
        let expr = in_list(def, columns)?;
        Check {
            name: "c".into(),
            expr,
            source: def.into(),
        }
        .allowed_values()
    }

    #[test]
    fn a_check_listing_values_is_read_in_each_form_postgresql_writes() {
        let c = cols(&["id", "status", "Kind", "n"]);
        assert_eq!(
            allowed(
                "CHECK ((status = ANY (ARRAY['draft'::text, 'it''s'::text, 'a, b'::text])))",
                &c
            ),
            Some((1, vec!["draft".into(), "it's".into(), "a, b".into()]))
        );
        assert_eq!(
            allowed(
                "CHECK (((\"Kind\")::text = ANY ((ARRAY['x'::character varying, 'y'::character varying])::text[])))",
                &c
            ),
            Some((2, vec!["x".into(), "y".into()]))
        );
        assert_eq!(
            allowed("CHECK ((n = ANY (ARRAY[1, 2, '-3'::integer])))", &c),
            Some((3, vec![1.into(), 2.into(), (-3).into()]))
        );
        // Anything else is not a list of values.
        for other in [
            "CHECK ((n > 0))",
            "CHECK ((status = 'x'::text))",
            "CHECK ((lower(status) = ANY (ARRAY['a'::text])))",
            "CHECK ((missing = ANY (ARRAY['a'::text])))",
            "CHECK ((status = ANY (ARRAY['a'::text, (status)::text])))",
        ] {
            assert_eq!(allowed(other, &c), None, "{other}");
        }
    }
}
