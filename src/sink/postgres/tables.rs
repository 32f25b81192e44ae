//! The target tables: created from the source's columns (`create`), or
//! checked against what exists (`existing`, `migrations:DIR`), every
//! mismatch reported at once before anything is loaded.

use tracing::info;

use crate::error::{Error, Result};
use crate::model::{LogicalType, TableSchema};
use crate::pg::conn::{pg_err, pg_error, relation_exists, PgEndpoint};
use crate::pg::{quote_ident, quote_table};
use crate::schema::narrow::{narrowing, Narrow};
use crate::schema::postgres::{
    check_ddl, column_definition, enum_ddl, holds, table_column_type, text_search_ddl,
};

/// How the target tables come to exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaMode {
    /// Generated from the source (default).
    Create,
    /// They exist; their columns are checked.
    Existing,
    /// The team's own migration files make them, applied as their layout's
    /// tool does (see [`super::migrations`]); then the columns are checked
    /// as for `Existing`.
    Migrations(std::path::PathBuf, super::migrations::Layout),
}

/// A target table as switchyard writes it: each column's type, in the
/// source's column order, and the columns narrower than the source's type
/// (by source column index), whose values are checked as they go in.
#[derive(Debug, Default)]
pub struct Prepared {
    pub types: Vec<String>,
    pub narrow: Vec<(usize, Narrow)>,
}

/// Creates (or checks) the target table of `t`.
pub async fn prepare(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    mode: &SchemaMode,
    source_is_postgres: bool,
    t: &TableSchema,
) -> Result<Prepared> {
    let name = quote_table(&t.target_name);
    let want: Vec<String> = (0..t.columns.len())
        .map(|i| table_column_type(t, i, source_is_postgres))
        .collect();
    if *mode == SchemaMode::Create {
        // The source's enum types, created once.
        for sql in enum_ddl(t) {
            c.batch_execute(&sql)
                .await
                .map_err(pg_err(ep, "creating an enum type"))?;
        }
    }
    let columns = target_columns(c, ep, &t.target_name).await?;
    let base: std::collections::HashMap<String, String> = columns
        .iter()
        .map(|c| (c.name.clone(), c.base.clone()))
        .collect();
    let labels: std::collections::HashMap<String, Option<Vec<String>>> = columns
        .iter()
        .map(|c| (c.name.clone(), c.labels.clone()))
        .collect();
    let have: std::collections::HashMap<String, String> =
        columns.into_iter().map(|c| (c.name, c.ty)).collect();
    let checked = *mode != SchemaMode::Create;
    let mut types = Vec::new();
    let mut narrow = Vec::new();
    if have.is_empty() {
        if checked {
            return Err(Error::definite(format!(
                "table {} does not exist in the target (target.schema = {:?}); create it, or use target.schema = \"create\"",
                t.target_name,
                if *mode == SchemaMode::Existing { "existing".to_string() } else { "migrations:…".to_string() }
            )));
        }
        let defs: Vec<String> = (0..t.columns.len())
            .map(|i| column_definition(t, i, source_is_postgres))
            .collect();
        // The primary key is built once the rows are in (finish_table),
        // as pg_dump restores: a bulk load without an index to keep
        // up is faster, and one sort builds the index.
        if let Some((schema, _)) = t.target_name.split_once('.') {
            c.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(schema)
            ))
            .await
            .map_err(pg_err(ep, &format!("creating schema {schema}")))?;
        }
        c.batch_execute(&format!("CREATE TABLE {name} ({})", defs.join(", ")))
            .await
            .map_err(pg_err(ep, &format!("creating table {}", t.target_name)))?;
        // The source's CHECKs that mean the same here, and the tsvector
        // columns of its full-text indexes.
        for (check, sql) in check_ddl(t) {
            c.batch_execute(&sql).await.map_err(|e| {
                pg_error(
                    ep,
                    &format!("adding CHECK {check} to table {}", t.target_name),
                    e,
                )
                .context(format!("statement {sql}"))
            })?;
        }
        for sql in text_search_ddl(t) {
            c.batch_execute(&sql).await.map_err(|e| {
                pg_error(
                    ep,
                    &format!("building the full-text index of table {}", t.target_name),
                    e,
                )
                .context(format!("statement {sql}"))
            })?;
        }
        info!(table = %t.target_name, "target table created");
        types = want;
    } else {
        let mut problems = Vec::new();
        for (col, ty) in t.columns.iter().zip(&want) {
            // Narrower, of the same family: every value is checked.
            let narrower = have
                .get(&col.name)
                .filter(|_| checked)
                .and_then(|h| narrowing(ty, h, &base[&col.name], labels[&col.name].as_deref()));
            match have.get(&col.name) {
                // The source's own type (a domain, a composite or enum type
                // restored from its schema): its text form reads back as is.
                Some(h) if source_is_postgres && *h == col.source_type => types.push(h.clone()),
                Some(h) if narrower.is_some() => {
                    narrow.extend(narrower.map(|n| (types.len(), n)));
                    types.push(h.clone());
                }
                // JSON arrays (a SurrealDB array, a SQLite JSON column) are
                // written as array literals; a value that is not an array is
                // refused by PostgreSQL, row by row.
                Some(h)
                    if col.logical == LogicalType::Json && crate::schema::postgres::is_array(h) =>
                {
                    types.push(h.clone())
                }
                Some(h) if !holds(ty, h) && !holds(ty, &base[&col.name]) => {
                    problems.push(format!(
                        "column {:?} is {h} in the target, which does not hold {} values ({ty})",
                        col.name, col.source_type
                    ));
                    types.push(h.clone());
                }
                Some(h) => types.push(h.clone()),
                None if *mode == SchemaMode::Create => {
                    // A column the source gained: added here too.
                    c.batch_execute(&format!(
                        "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {} {ty}",
                        quote_ident(&col.name)
                    ))
                    .await
                    .map_err(|e| {
                        pg_error(
                            ep,
                            &format!("adding column {:?} to {}", col.name, t.target_name),
                            e,
                        )
                    })?;
                    types.push(ty.clone());
                }
                None => problems.push(format!("column {:?} ({}) is missing", col.name, ty)),
            }
        }
        if checked {
            // A target column the source does not fill, NOT NULL and
            // without a default, fails every insert.
            let strict = c
                .query(
                    "SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                        AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''",
                    &[&name],
                )
                .await
                .map_err(pg_err(ep, "reading the target table"))?;
            for r in strict {
                let col: String = r.get(0);
                if !t.columns.iter().any(|c| c.name == col) {
                    problems.push(format!("column {col:?} is NOT NULL without a default and the source has no such column"));
                }
            }
        }
        if !problems.is_empty() {
            return Err(Error::definite(format!(
                "target table {} does not fit the source: {}; change the target's columns (or let switchyard create the table)",
                t.target_name,
                problems.join("; ")
            )));
        }
    }
    Ok(Prepared { types, narrow })
}

/// The columns of `t` that target columns `have` hold narrower than
/// switchyard's type for them (by source column index).
pub fn narrow_columns(
    t: &TableSchema,
    have: &[TargetColumn],
    source_is_postgres: bool,
) -> Vec<(usize, Narrow)> {
    t.columns
        .iter()
        .enumerate()
        .filter_map(|(i, col)| {
            let h = have.iter().find(|h| h.name == col.name)?;
            let want = table_column_type(t, i, source_is_postgres);
            narrowing(&want, &h.ty, &h.base, h.labels.as_deref()).map(|n| (i, n))
        })
        .collect()
}

/// A column of a target table.
#[derive(Debug, Clone)]
pub struct TargetColumn {
    pub name: String,
    /// `format_type` of its type (`character varying(160)`, a domain's name).
    pub ty: String,
    /// For a domain, its base type; else `ty`.
    pub base: String,
    /// For an enum (or a domain over one), its labels in order.
    pub labels: Option<Vec<String>>,
}

/// The columns of a target table, in order (none when it does not exist).
pub async fn target_columns(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    target_name: &str,
) -> Result<Vec<TargetColumn>> {
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod)
                         ELSE format_type(a.atttypid, a.atttypmod) END,
                    (SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_enum e
                      WHERE e.enumtypid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END)
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&quote_table(target_name)],
        )
        .await
        .map_err(pg_err(ep, "reading the target table"))?;
    Ok(rows
        .iter()
        .map(|r| TargetColumn {
            name: r.get(0),
            ty: r.get(1),
            base: r.get(2),
            labels: r.get(3),
        })
        .collect())
}

/// A partitioned target table's partitions made to match the source's:
/// missing ones created (or attached, where a table of that name is
/// there), those the source no longer has detached (kept as tables, as the
/// source keeps them). A target table that is not partitioned is left
/// alone. What was done.
pub async fn sync_partitions(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    t: &TableSchema,
) -> Result<Vec<String>> {
    let name = quote_table(&t.target_name);
    let partitioned = c
        .query_one(
            "SELECT coalesce((SELECT relkind = 'p' FROM pg_class WHERE oid = to_regclass($1)), false)",
            &[&name],
        )
        .await
        .map_err(pg_err(ep, "reading the target table"))?
        .get::<_, bool>(0);
    if !partitioned {
        return Ok(Vec::new());
    }
    let have: Vec<String> = c
        .query(
            "SELECT CASE WHEN n.nspname = 'public' THEN p.relname::text ELSE n.nspname || '.' || p.relname END
               FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE i.inhparent = to_regclass($1)",
            &[&name],
        )
        .await
        .map_err(pg_err(ep, "reading the target's partitions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut done = Vec::new();
    for p in t.partitions.iter().filter(|p| !have.contains(&p.name)) {
        let exists =
            relation_exists(c, ep, &quote_table(&p.name), "reading the target catalog").await?;
        let sql = if exists {
            format!(
                "ALTER TABLE {name} ATTACH PARTITION {} {}",
                quote_table(&p.name),
                p.bound
            )
        } else {
            format!(
                "CREATE TABLE {} PARTITION OF {name} {}",
                quote_table(&p.name),
                p.bound
            )
        };
        c.batch_execute(&sql).await.map_err(pg_err(
            ep,
            &format!("adding partition {} to {}", p.name, t.target_name),
        ))?;
        info!(table = %t.target_name, partition = %p.name, "partition added as in the source");
        done.push(sql);
    }
    for h in have
        .iter()
        .filter(|h| !t.partitions.iter().any(|p| &p.name == *h))
    {
        let sql = format!("ALTER TABLE {name} DETACH PARTITION {}", quote_table(h));
        c.batch_execute(&sql).await.map_err(pg_err(
            ep,
            &format!("detaching partition {h} from {}", t.target_name),
        ))?;
        info!(table = %t.target_name, partition = %h, "partition detached as in the source");
        done.push(sql);
    }
    Ok(done)
}
