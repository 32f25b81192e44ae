//! What the SQLite catalog says about the tables to replicate: columns and
//! their declared types, keys (declared or configured), unique indexes,
//! defaults a PostgreSQL target can keep. Reads only.

use std::collections::BTreeMap;

use sqlx::sqlite::SqlitePool;
use sqlx::Row as _;

use super::capture::{quote, PREFIX};
use super::convert::logical_type;
use super::ddl;
use crate::config::TableFilter;
use crate::error::Result;
use crate::model::{
    Check, Column, ColumnDefault, Conversion, LogicalType, TableSchema, TextSearch,
};
use crate::schema::cast::TypeRules;
use crate::source::{Discovery, Problem};

/// What discovery needs to know of the config.
pub struct Selection<'a> {
    pub filter: &'a TableFilter,
    pub renames: &'a BTreeMap<String, String>,
    pub keys: &'a BTreeMap<String, Vec<String>>,
    pub types: &'a TypeRules,
    /// Build FTS tables as `tsvector` columns (`tables.text_search`).
    pub text_search: bool,
}

/// A table of `sqlite_master` with its kind (`pragma_table_list`).
struct Listed {
    name: String,
    /// `table`, `virtual` or `shadow`.
    kind: String,
    sql: String,
}

/// The selected tables, their keys and columns, and what stands in the way.
pub async fn discover(pool: &SqlitePool, sel: &Selection<'_>) -> Result<Discovery> {
    let listed: Vec<Listed> = sqlx::query_as::<_, (String, String, Option<String>)>(
        "SELECT l.name, l.type, m.sql FROM pragma_table_list AS l
           JOIN sqlite_master AS m ON m.name = l.name AND m.type = 'table'
          WHERE l.schema = 'main' AND l.name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY l.name",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(name, kind, sql)| Listed {
        name,
        kind,
        sql: sql.unwrap_or_default(),
    })
    .collect();
    let mut d = Discovery::default();
    let mut found = std::collections::BTreeSet::new();
    let mut seen_columns = Vec::new();
    let virtuals: Vec<&Listed> = listed.iter().filter(|l| l.kind == "virtual").collect();
    // Each FTS table with external content, read once: its content table
    // and its index.
    let fts: Vec<(String, FtsOver)> = virtuals
        .iter()
        .filter_map(|v| text_search_of(v, &listed))
        .collect();
    for l in &listed {
        let name = &l.name;
        if name.starts_with(PREFIX) || !sel.filter.matches(name) {
            continue;
        }
        match l.kind.as_str() {
            "virtual" => {
                let module = ddl::virtual_module(&l.sql)
                    .map(|(m, _)| m)
                    .unwrap_or_default();
                d.left_out.push(format!(
                    "{name}: a virtual table ({}); its rows are not copied{}",
                    if module.is_empty() { "unknown module".to_string() } else { format!("USING {module}") },
                    match fts.iter().find(|(_, f)| f.name == *name) {
                        Some(_) if sel.text_search => "; built in a PostgreSQL target as a tsvector column of its content table",
                        Some(_) => "; with tables.text_search = true a PostgreSQL target gets a tsvector column with a GIN index on its content table",
                        None => "",
                    }
                ));
                continue;
            }
            "shadow" => {
                let of = virtuals
                    .iter()
                    .filter(|v| name.starts_with(&format!("{}_", v.name)))
                    .max_by_key(|v| v.name.len())
                    .map(|v| format!(" of {}", v.name))
                    .unwrap_or_default();
                d.left_out.push(format!(
                    "{name}: shadow table{of}; the virtual table's own storage"
                ));
                continue;
            }
            _ => {}
        }
        found.insert(name.clone());
        let cols = sqlx::query(
            "SELECT name, type, \"notnull\", pk, hidden, dflt_value FROM pragma_table_xinfo(?) ORDER BY cid",
        )
        .bind(name)
        .fetch_all(pool)
        .await?;
        let mut columns = Vec::new();
        let mut defaults = Vec::new();
        let mut pk: Vec<(i64, usize)> = Vec::new();
        for c in &cols {
            if c.get::<i64, _>(4) == 1 {
                continue; // hidden column of a virtual table
            }
            let cname: String = c.get(0);
            let declared: String = c.get::<Option<String>, _>(1).unwrap_or_default();
            let (logical, note) = logical_type(&declared);
            if let Some(note) = note {
                d.problems.push(Problem {
                    table: name.clone(),
                    column: Some(cname.clone()),
                    message: note,
                    blocking: false,
                });
            }
            let pkpos: i64 = c.get(3);
            if pkpos > 0 {
                pk.push((pkpos, columns.len()));
            }
            seen_columns.push(format!("{name}.{cname}"));
            defaults.push(c.get::<Option<String>, _>(5));
            columns.push(Column {
                name: cname,
                source_type: declared,
                logical,
                nullable: c.get::<i64, _>(2) == 0,
            });
        }
        pk.sort();
        let has_pk = !pk.is_empty();
        let mut key: Vec<usize> = pk.into_iter().map(|(_, i)| i).collect();
        if key.is_empty() {
            match sel.keys.get(name) {
                Some(names) => {
                    for k in names {
                        match columns.iter().position(|c| &c.name == k) {
                            Some(i) => key.push(i),
                            None => d.problems.push(Problem {
                                table: name.clone(),
                                column: Some(k.clone()),
                                message: format!("tables.keys names column {k:?}, which the table does not have"),
                                blocking: true,
                            }),
                        }
                    }
                }
                None => d.problems.push(Problem {
                    table: name.clone(),
                    column: None,
                    message: format!(
                        "no primary key, and rowids can change on VACUUM; declare a PRIMARY KEY, name the key columns in the config ([tables.keys] {:?} = [\"col\"]), or exclude the table",
                        name
                    ),
                    blocking: true,
                }),
            }
        }
        if key.is_empty() {
            continue;
        }
        if !has_pk && !unique_over(pool, name, &columns, &key).await? {
            let names: Vec<&str> = key.iter().map(|&i| columns[i].name.as_str()).collect();
            d.problems.push(Problem {
                table: name.clone(),
                column: None,
                message: format!(
                    "tables.keys names {names:?}, but no UNIQUE index makes them unique: rows sharing a key would collapse into one target record; \
                     create one (CREATE UNIQUE INDEX ... ON {} ({})) or name other columns",
                    quote(name),
                    names.iter().map(|n| quote(n)).collect::<Vec<_>>().join(", ")
                ),
                blocking: true,
            });
            continue;
        }
        for &k in &key {
            columns[k].nullable = false;
        }
        let uniques = other_unique_indexes(pool, name, &columns, &key).await?;
        if !uniques.is_empty() {
            d.problems.push(Problem {
                table: name.clone(),
                column: None,
                message: format!(
                    "has UNIQUE constraints besides the key ({}): a row that INSERT OR REPLACE removes for one of them fires no DELETE trigger unless the application sets PRAGMA recursive_triggers = ON",
                    uniques.join(", ")
                ),
                blocking: false,
            });
        }
        let target_name = sel
            .renames
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.clone());
        let mut t = TableSchema::keyed(name.clone(), target_name, columns, key);
        let source_checks = ddl::checks(&l.sql);
        let absorbed = convert_columns(&mut t, &defaults, &source_checks, sel.types);
        carry_checks(&mut t, &source_checks, &absorbed, &mut d.problems);
        t.column_defaults = column_defaults(&t, &l.sql, &defaults, &mut d.problems);
        if sel.text_search {
            t.text_search = fts
                .iter()
                .filter(|(content, _)| content == name)
                .map(|(_, ts)| ts.resolve(&t))
                .filter_map(|r| match r {
                    Ok(ts) => Some(ts),
                    Err(why) => {
                        d.problems.push(Problem {
                            table: name.clone(),
                            column: None,
                            message: why,
                            blocking: false,
                        });
                        None
                    }
                })
                .collect();
        }
        d.tables.push(t);
    }
    for t in sel.keys.keys().chain(sel.renames.keys()) {
        if !found.contains(t) {
            d.problems.push(Problem {
                table: t.clone(),
                column: None,
                message: "named in [tables] but not found among the selected source tables".into(),
                blocking: true,
            });
        }
    }
    for rule in sel.types.unused_columns(&seen_columns) {
        d.problems.push(Problem {
            table: "(tables.types)".into(),
            column: None,
            message: format!(
                "the rule {rule:?} names no column of the selected tables; it changes nothing"
            ),
            blocking: false,
        });
    }
    Ok(d)
}

/// An FTS table's full-text index, before its columns are found in the
/// content table.
struct FtsOver {
    name: String,
    columns: Vec<String>,
    config: String,
}

impl FtsOver {
    fn resolve(&self, t: &TableSchema) -> std::result::Result<TextSearch, String> {
        let mut columns = Vec::new();
        for c in &self.columns {
            match t.columns.iter().position(|x| x.name.eq_ignore_ascii_case(c)) {
                Some(i) => columns.push(i),
                None => {
                    return Err(format!(
                        "FTS table {:?} indexes column {c:?}, which {:?} does not have; its tsvector column is not built",
                        self.name, t.name
                    ))
                }
            }
        }
        Ok(TextSearch {
            name: self.name.clone(),
            columns,
            config: self.config.clone(),
        })
    }
}

/// An FTS4/FTS5 table with external content (`content='missions'`): the
/// content table and the index over it.
fn text_search_of(l: &Listed, listed: &[Listed]) -> Option<(String, FtsOver)> {
    let (module, args) = ddl::virtual_module(&l.sql)?;
    if !matches!(module.as_str(), "fts4" | "fts5") {
        return None;
    }
    let mut content = None;
    let mut columns = Vec::new();
    let mut config = "simple".to_string();
    for a in &args {
        match a.split_once('=') {
            Some((k, v)) => {
                let v = v.trim().to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "content" if !v.is_empty() => content = Some(v),
                    "tokenize" if v.to_ascii_lowercase().contains("porter") => {
                        config = "english".into()
                    }
                    _ => {}
                }
            }
            // fts5 column options (`title UNINDEXED`) follow the name.
            None if !a.to_ascii_uppercase().contains("UNINDEXED") => {
                columns.push(a.split_whitespace().next().unwrap_or(a).to_string())
            }
            None => {}
        }
    }
    let content = content?;
    listed
        .iter()
        .any(|x| x.name == content && x.kind == "table")
        .then(|| {
            (
                content,
                FtsOver {
                    name: l.name.clone(),
                    columns,
                    config,
                },
            )
        })
}

/// Chooses each column's type where a rule says more than its declared
/// type: a cast of `[tables.types]`, then what the column's CHECK or default
/// shows (`x IN (0, 1)`: boolean; `json_valid(x)`: JSON; a default of
/// `datetime('now')`: a timestamp). Returns the CHECKs the new types make
/// redundant.
fn convert_columns(
    t: &mut TableSchema,
    defaults: &[Option<String>],
    checks: &[ddl::SourceCheck],
    rules: &TypeRules,
) -> Vec<usize> {
    use ddl::Shape;
    let mut absorbed = Vec::new();
    for (i, default) in defaults.iter().enumerate() {
        let c = &t.columns[i];
        let shaped = |want: fn(&Shape) -> Option<&String>| {
            checks.iter().position(|k| {
                let shape = k.shape();
                want(&shape).is_some_and(|n| n.eq_ignore_ascii_case(&c.name))
            })
        };
        let boolean = shaped(|s| match s {
            Shape::Boolean(n) => Some(n),
            _ => None,
        });
        let json = shaped(|s| match s {
            Shape::Json(n) => Some(n),
            _ => None,
        });
        let stamped = default
            .as_deref()
            .map(strip_parens)
            .is_some_and(|d| is_now(&squash(&d)));
        let chosen = if let Some(applied) = rules.for_column(&t.name, &c.name, &c.source_type) {
            Some((
                applied.target.logical,
                Some(applied.target.postgres),
                applied.reason,
            ))
        } else if let (Some(k), LogicalType::Int | LogicalType::Any) = (boolean, c.logical) {
            Some((
                LogicalType::Bool,
                None,
                format!("{}: a boolean kept as an integer", checks[k].shown()),
            ))
        } else if let (Some(k), LogicalType::Text | LogicalType::Any) = (json, c.logical) {
            Some((
                LogicalType::Json,
                None,
                format!("{}: JSON kept as text", checks[k].shown()),
            ))
        } else if let (true, LogicalType::Text | LogicalType::Any) = (stamped, c.logical) {
            Some((
                LogicalType::Timestamp,
                None,
                format!(
                    "its default is {}: SQLite's UTC timestamp text",
                    default.as_deref().map(strip_parens).unwrap_or_default()
                ),
            ))
        } else {
            None
        };
        if let Some((logical, postgres_type, reason)) = chosen {
            t.columns[i].logical = logical;
            t.conversions.push(Conversion {
                column: i,
                postgres_type,
                reason,
            });
        }
        // A CHECK that the column's new type says already.
        let logical = t.columns[i].logical;
        if let (Some(k), LogicalType::Bool) = (boolean, logical) {
            absorbed.push(k);
        }
        if let (Some(k), LogicalType::Json) = (json, logical) {
            absorbed.push(k);
        }
    }
    absorbed
}

/// The CHECKs that mean the same in the target, named as it will know
/// them; the others are listed as notes.
fn carry_checks(
    t: &mut TableSchema,
    checks: &[ddl::SourceCheck],
    absorbed: &[usize],
    problems: &mut Vec<Problem>,
) {
    let base = t
        .target_name
        .rsplit('.')
        .next()
        .unwrap_or(&t.target_name)
        .to_string();
    for (k, check) in checks.iter().enumerate() {
        if absorbed.contains(&k) {
            continue;
        }
        match check.carry(&t.columns) {
            Ok(expr) => {
                let name = check.name.clone().unwrap_or_else(|| match &check.column {
                    Some(c) => format!("{base}_{c}_check"),
                    None => format!("{base}_check{}", k + 1),
                });
                t.checks.push(Check {
                    name,
                    expr,
                    source: check.shown(),
                });
            }
            Err(why) => problems.push(Problem {
                table: t.name.clone(),
                column: check.column.clone(),
                message: format!("{} is not carried to the target: {why}", check.shown()),
                blocking: false,
            }),
        }
    }
}

/// `((expr))` → `expr`, as SQLite keeps a parenthesised default.
fn strip_parens(d: &str) -> String {
    let mut t = d.trim().to_string();
    while t.starts_with('(') && t.ends_with(')') {
        t = t[1..t.len() - 1].trim().to_string();
    }
    t
}

/// Lower case without spaces, for matching function forms.
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
        .replace('"', "'")
}

/// SQLite's ways of writing "the current UTC date and time".
fn is_now(squashed: &str) -> bool {
    matches!(
        squashed,
        "datetime('now')"
            | "current_timestamp"
            | "datetime('now','utc')"
            | "strftime('%y-%m-%d%h:%m:%s','now')"
    )
}

/// A SQLite default as the PostgreSQL expression of the same meaning for a
/// column of `logical` type: `Ok(None)` for no default, `Err` for one
/// PostgreSQL has no form of.
pub fn default_expr(
    raw: &str,
    logical: LogicalType,
) -> std::result::Result<Option<String>, String> {
    use LogicalType as L;
    let t = strip_parens(raw);
    let s = squash(&t);
    let utc_text = |format: &str| format!("to_char(now() AT TIME ZONE 'UTC', '{format}')");
    let epoch = "extract(epoch from now())::bigint";
    let random_hex = |n: u32, upper: bool| {
        let hex = "replace(gen_random_uuid()::text, '-', '')";
        let hex = if n == 16 {
            hex.to_string()
        } else {
            format!("substr({hex}, 1, {})", 2 * n)
        };
        if upper {
            format!("upper({hex})")
        } else {
            hex
        }
    };
    let blob_bytes = |s: &str, prefix: &str, suffix: &str| {
        s.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| (1..=16).contains(n))
    };
    let out = match (logical, s.as_str()) {
        (_, "null") => None,
        (L::Timestamp, s) if is_now(s) => Some("now()".to_string()),
        (L::Text | L::Any, s) if is_now(s) => Some(utc_text("YYYY-MM-DD HH24:MI:SS")),
        (L::Timestamp, "strftime('%y-%m-%dt%h:%m:%fz','now')") => Some("now()".into()),
        (L::Text | L::Any, "strftime('%y-%m-%dt%h:%m:%fz','now')") => {
            Some(utc_text("YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\""))
        }
        (L::Text | L::Any, "current_date" | "date('now')") => Some(utc_text("YYYY-MM-DD")),
        (L::Date, "current_date" | "date('now')") => Some("CURRENT_DATE".into()),
        (L::Timestamp, "current_date" | "date('now')") => {
            Some("date_trunc('day', now(), 'UTC')".into())
        }
        (L::Text | L::Any, "current_time" | "time('now')") => Some(utc_text("HH24:MI:SS")),
        (
            L::Int | L::Any,
            "unixepoch()"
            | "unixepoch('now')"
            | "strftime('%s','now')"
            | "cast(strftime('%s','now')asinteger)",
        ) => Some(epoch.into()),
        (L::Text, "strftime('%s','now')") => Some(format!("{epoch}::text")),
        (L::Text | L::Any, s) if blob_bytes(s, "lower(hex(randomblob(", ")))").is_some() => {
            Some(random_hex(
                blob_bytes(s, "lower(hex(randomblob(", ")))").unwrap_or(16),
                false,
            ))
        }
        (L::Text | L::Any, s)
            if blob_bytes(s, "hex(randomblob(", "))")
                .or(blob_bytes(s, "upper(hex(randomblob(", ")))"))
                .is_some() =>
        {
            Some(random_hex(
                blob_bytes(s, "hex(randomblob(", "))")
                    .or(blob_bytes(s, "upper(hex(randomblob(", ")))"))
                    .unwrap_or(16),
                true,
            ))
        }
        (L::Bool, "1" | "true") => Some("true".into()),
        (L::Bool, "0" | "false") => Some("false".into()),
        (L::Bool, _) => return Err("not 0, 1, TRUE or FALSE".into()),
        (L::Int | L::Float | L::Decimal | L::Text | L::Any, _)
            if t.parse::<f64>().is_ok()
                && t.starts_with(|c: char| c.is_ascii_digit() || matches!(c, '-' | '+' | '.'))
                && !t.contains(['x', 'X']) =>
        {
            Some(t.clone())
        }
        _ if t.len() >= 2
            && t.starts_with('\'')
            && t.ends_with('\'')
            && !t[1..t.len() - 1].replace("''", "").contains('\'') =>
        {
            Some(t.clone())
        }
        _ => return Err("PostgreSQL has no expression of the same meaning".into()),
    };
    Ok(out)
}

/// `INTEGER PRIMARY KEY` (a rowid alias, with or without `AUTOINCREMENT`)
/// as an identity, and each default a PostgreSQL target can keep; the
/// defaults it cannot are listed as notes.
fn column_defaults(
    t: &TableSchema,
    sql: &str,
    defaults: &[Option<String>],
    problems: &mut Vec<Problem>,
) -> Vec<ColumnDefault> {
    let rowid_alias = t.key.len() == 1
        && t.columns[t.key[0]]
            .source_type
            .eq_ignore_ascii_case("INTEGER")
        && !ddl::without_rowid(sql);
    let mut out = Vec::new();
    for (column, raw) in defaults.iter().enumerate() {
        let identity =
            rowid_alias && t.key == [column] && t.columns[column].logical == LogicalType::Int;
        let default = match raw
            .as_deref()
            .map(|d| default_expr(d, t.columns[column].logical))
        {
            None => None,
            Some(Ok(e)) => e,
            Some(Err(why)) => {
                problems.push(Problem {
                    table: t.name.clone(),
                    column: Some(t.columns[column].name.clone()),
                    message: format!(
                        "default {} is dropped in a PostgreSQL target ({why}); rows the application inserts there must give the value",
                        strip_parens(raw.as_deref().unwrap_or_default())
                    ),
                    blocking: false,
                });
                None
            }
        };
        if identity || default.is_some() {
            out.push(ColumnDefault {
                column,
                identity,
                default,
                existing: None,
            });
        }
    }
    out
}

/// The unique indexes of `table` other than the primary key and other than
/// one over exactly the key's columns (a key named in `tables.keys`).
async fn other_unique_indexes(
    pool: &SqlitePool,
    table: &str,
    columns: &[Column],
    key: &[usize],
) -> Result<Vec<String>> {
    let key: std::collections::BTreeSet<&str> =
        key.iter().map(|&i| columns[i].name.as_str()).collect();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1 AND origin <> 'pk'",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for index in indexes {
        let cols: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM pragma_index_info(?)")
            .bind(&index)
            .fetch_all(pool)
            .await?;
        let cols: std::collections::BTreeSet<&str> =
            cols.iter().map(|c| c.as_deref().unwrap_or("")).collect();
        if cols != key {
            out.push(index);
        }
    }
    Ok(out)
}

/// Whether a UNIQUE index (or constraint) of `table` makes `key` unique.
async fn unique_over(
    pool: &SqlitePool,
    table: &str,
    columns: &[Column],
    key: &[usize],
) -> Result<bool> {
    let want: std::collections::BTreeSet<&str> =
        key.iter().map(|&i| columns[i].name.as_str()).collect();
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT name FROM pragma_index_list(?) WHERE \"unique\" = 1")
            .bind(table)
            .fetch_all(pool)
            .await?;
    for index in indexes {
        let cols: Vec<Option<String>> = sqlx::query_scalar("SELECT name FROM pragma_index_info(?)")
            .bind(&index)
            .fetch_all(pool)
            .await?;
        let got: std::collections::BTreeSet<&str> =
            cols.iter().map(|c| c.as_deref().unwrap_or("")).collect();
        // An index over some of the key columns makes the whole key unique.
        if !got.is_empty() && got.is_subset(&want) {
            return Ok(true);
        }
    }
    Ok(false)
}
