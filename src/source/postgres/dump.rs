//! The source's schema for a PostgreSQL target, taken with `pg_dump`: the
//! schemas that hold replicated tables, less what is not replicated —
//! other tables, views that read them, sequences no replicated column uses
//! and `tables.include` does not name — so that everything kept restores.
//!
//! ```text
//!  kept       replicated tables (and the partitions of a partitioned one),
//!             their defaults, generated columns, constraints, indexes,
//!             triggers, rules, policies and comments; the types, domains,
//!             enums and functions of their schemas; sequences they own or
//!             draw from; views and materialized views that read only kept
//!             relations and that tables.include names
//!  excluded   every other table, view, materialized view, sequence and
//!             foreign table of those schemas (pg_dump -T), each named with why
//! ```

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Client;

use super::catalog::{display_name, PgTable};
use crate::config::TableFilter;
use crate::error::{Error, Result};
use crate::pg::conn::{pg_err, PgEndpoint};
use crate::pg::{quote_ident, tools};
use crate::schema::dump::{parse_toc, SchemaDump};

/// The source server's major version.
pub async fn server_major(c: &Client, ep: &PgEndpoint) -> Result<u32> {
    let v: String = c
        .query_one("SHOW server_version_num", &[])
        .await
        .map_err(pg_err(ep, "reading the server version"))?
        .get(0);
    Ok(v.parse::<u32>().unwrap_or(0) / 10000)
}

/// A relation of a schema that holds replicated tables.
struct Relation {
    oid: u32,
    schema: String,
    name: String,
    /// `r`, `p`, `v`, `m`, `S`, `f`
    kind: String,
}

/// Dumps the schema of `tables` (switchyard's names with their catalog
/// entries).
pub async fn dump(
    c: &Client,
    ep: &PgEndpoint,
    tables: &[(String, PgTable)],
    filter: &TableFilter,
    owners: bool,
) -> Result<SchemaDump> {
    let major = server_major(c, ep).await?;
    // Found while the catalog is read (each candidate is asked its version).
    let find =
        |program: &'static str| tokio::task::spawn_blocking(move || tools::find(program, major));
    let (pg_dump, pg_restore) = (find("pg_dump"), find("pg_restore"));
    let schemas: BTreeSet<String> = tables.iter().map(|(_, t)| t.schema.clone()).collect();
    let relations = relations(c, ep, &schemas).await?;
    let tables_kept = with_partitions(c, ep, tables).await?;
    let mut keep = tables_kept.clone();
    let used = used_sequences(c, ep, &tables_kept).await?;
    for r in relations.iter().filter(|r| r.kind == "S") {
        if used.contains(&r.oid) || filter.matches(&display_name(&r.schema, &r.name)) {
            keep.insert(r.oid);
        }
    }
    let reads = view_reads(c, ep, &relations).await?;
    keep_views(&relations, &reads, filter, &mut keep);
    let (mut left_out, exclude) = left_out(&relations, &keep, filter);
    let (fk_left_out, skip) = dangling_foreign_keys(c, ep, &tables_kept, &keep).await?;
    left_out.extend(fk_left_out);
    let extensions = extensions(c, ep, &tables_kept).await?;
    let archive = std::env::temp_dir().join(format!(
        "switchyard-schema-{}-{}.dump",
        std::process::id(),
        DUMPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let found = |r: std::result::Result<Result<std::path::PathBuf>, tokio::task::JoinError>| {
        r.map_err(|e| Error::definite(format!("looking for pg_dump and pg_restore failed: {e}")))?
    };
    let (pg_dump, pg_restore) = (found(pg_dump.await)?, found(pg_restore.await)?);
    let mut cmd = tools::command(&pg_dump, ep);
    cmd.arg("--schema-only")
        .arg("--format=custom")
        .arg("--no-publications")
        .arg("--no-subscriptions")
        .arg("--no-tablespaces")
        .arg("--no-security-labels")
        .arg(format!("--file={}", archive.display()));
    if !owners {
        cmd.arg("--no-owner").arg("--no-acl");
    }
    for s in &schemas {
        cmd.arg(format!("--schema={}", quote_ident(s)));
    }
    for x in &exclude {
        cmd.arg(format!("--exclude-table={x}"));
    }
    tools::run(cmd, ep, "pg_dump --schema-only").await?;
    let mut list = tools::command(&pg_restore, ep);
    list.arg("--list").arg(&archive);
    let toc = match tools::run(list, ep, "pg_restore --list").await {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&archive);
            return Err(e);
        }
    };
    let mut entries = parse_toc(&toc);
    entries.retain(|e| {
        let skipped = skip
            .iter()
            .any(|(d, s, t)| *d == e.desc && *s == e.schema && *t == e.tag);
        // switchyard's own triggers (a partition's TRUNCATE) stay behind.
        let own = e.desc == "TRIGGER"
            && e.tag
                .rsplit(' ')
                .next()
                .is_some_and(|n| n.starts_with("switchyard_"));
        !skipped && !own
    });
    Ok(SchemaDump {
        archive,
        tool_major: major,
        entries,
        extensions,
        left_out,
        tables: tables.iter().map(|(n, _)| n.clone()).collect(),
        owners,
    })
}

/// Every table, view, materialized view, sequence and foreign table of
/// `schemas` (not an extension's).
async fn relations(
    c: &Client,
    ep: &PgEndpoint,
    schemas: &BTreeSet<String>,
) -> Result<Vec<Relation>> {
    let schema_list: Vec<String> = schemas.iter().cloned().collect();
    Ok(c.query(
        "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                             AND d.objid = c.oid AND d.deptype = 'e')
          ORDER BY 2, 3",
        &[&schema_list],
    )
    .await
    .map_err(pg_err(ep, "listing the source's relations"))?
    .iter()
    .map(|r| Relation {
        oid: r.get(0),
        schema: r.get(1),
        name: r.get(2),
        kind: r.get(3),
    })
    .collect())
}

/// The replicated tables and their partitions.
async fn with_partitions(
    c: &Client,
    ep: &PgEndpoint,
    tables: &[(String, PgTable)],
) -> Result<BTreeSet<u32>> {
    let mut keep = BTreeSet::new();
    for (_, t) in tables {
        keep.insert(t.oid);
        if !t.only {
            for r in c
                .query(
                    "SELECT relid::oid FROM pg_partition_tree($1::oid::regclass)",
                    &[&t.oid],
                )
                .await
                .map_err(pg_err(ep, "reading a table's partitions"))?
            {
                keep.insert(r.get(0));
            }
        }
    }
    Ok(keep)
}

/// Sequences owned by, or drawn by defaults of, `tables`.
async fn used_sequences(
    c: &Client,
    ep: &PgEndpoint,
    tables: &BTreeSet<u32>,
) -> Result<BTreeSet<u32>> {
    Ok(c.query(
        "SELECT DISTINCT d.objid::oid FROM pg_depend d
          WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
            AND d.deptype IN ('a', 'i') AND d.refobjid = ANY($1)
         UNION
         SELECT DISTINCT d.refobjid::oid FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
          WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
            AND ad.adrelid = ANY($1)",
        &[&tables.iter().copied().collect::<Vec<u32>>()],
    )
    .await
    .map_err(pg_err(ep, "reading the tables' sequences"))?
    .iter()
    .map(|r| r.get(0))
    .collect())
}

/// What each view and materialized view reads.
async fn view_reads(
    c: &Client,
    ep: &PgEndpoint,
    relations: &[Relation],
) -> Result<BTreeMap<u32, BTreeSet<u32>>> {
    let views: Vec<u32> = relations
        .iter()
        .filter(|r| r.kind == "v" || r.kind == "m")
        .map(|r| r.oid)
        .collect();
    let mut m: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
    for r in c
        .query(
            "SELECT rw.ev_class::oid, d.refobjid::oid FROM pg_rewrite rw
               JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid
                AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> rw.ev_class
               JOIN pg_class c2 ON c2.oid = d.refobjid
               JOIN pg_namespace n2 ON n2.oid = c2.relnamespace
              WHERE rw.ev_class = ANY($1) AND n2.nspname NOT IN ('pg_catalog', 'information_schema')",
            &[&views],
        )
        .await
        .map_err(pg_err(ep, "reading what views read"))?
    {
        m.entry(r.get(0)).or_default().insert(r.get(1));
    }
    Ok(m)
}

/// Views kept: `tables.include` names them and everything they read is
/// kept (views on views: until nothing changes).
fn keep_views(
    relations: &[Relation],
    reads: &BTreeMap<u32, BTreeSet<u32>>,
    filter: &TableFilter,
    keep: &mut BTreeSet<u32>,
) {
    let views: Vec<&Relation> = relations
        .iter()
        .filter(|r| r.kind == "v" || r.kind == "m")
        .collect();
    loop {
        let before = keep.len();
        for v in &views {
            if keep.contains(&v.oid) || !filter.matches(&display_name(&v.schema, &v.name)) {
                continue;
            }
            if reads
                .get(&v.oid)
                .is_none_or(|deps| deps.iter().all(|d| keep.contains(d)))
            {
                keep.insert(v.oid);
            }
        }
        if keep.len() == before {
            break;
        }
    }
}

/// The relations not kept: each with why (for `check`), and as pg_dump's
/// `--exclude-table` patterns.
fn left_out(
    relations: &[Relation],
    keep: &BTreeSet<u32>,
    filter: &TableFilter,
) -> (Vec<String>, Vec<String>) {
    let mut left_out = Vec::new();
    let mut exclude = Vec::new();
    for r in relations.iter().filter(|r| !keep.contains(&r.oid)) {
        let shown = display_name(&r.schema, &r.name);
        let why = match r.kind.as_str() {
            "r" | "p" | "f" => "a table that is not replicated",
            "S" => "a sequence no replicated column uses, and tables.include does not name it",
            _ if !filter.matches(&shown) => "a view tables.include does not name",
            _ => "a view that reads a relation that is not replicated",
        };
        left_out.push(format!("{shown}: {why}"));
        exclude.push(format!(
            "{}.{}",
            quote_ident(&r.schema),
            quote_ident(&r.name)
        ));
    }
    (left_out, exclude)
}

/// Foreign keys of kept tables to relations that are not kept: each with
/// why, and as archive entries to leave out.
async fn dangling_foreign_keys(
    c: &Client,
    ep: &PgEndpoint,
    tables: &BTreeSet<u32>,
    keep: &BTreeSet<u32>,
) -> Result<(Vec<String>, Vec<(String, String, String)>)> {
    let mut left_out = Vec::new();
    let mut skip = Vec::new();
    for r in c
        .query(
            "SELECT n.nspname::text, cl.relname::text, co.conname::text, co.confrelid::regclass::text
               FROM pg_constraint co JOIN pg_class cl ON cl.oid = co.conrelid
               JOIN pg_namespace n ON n.oid = cl.relnamespace
              WHERE co.contype = 'f' AND co.conrelid = ANY($1) AND NOT co.confrelid = ANY($2)",
            &[
                &tables.iter().copied().collect::<Vec<u32>>(),
                &keep.iter().copied().collect::<Vec<u32>>(),
            ],
        )
        .await
        .map_err(pg_err(ep, "reading foreign keys"))?
    {
        let (schema, table, name, to): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        left_out.push(format!(
            "foreign key {name} of {}: it references {to}, which is not replicated",
            display_name(&schema, &table)
        ));
        skip.push(("FK CONSTRAINT".to_string(), schema, format!("{table} {name}")));
    }
    Ok((left_out, skip))
}

/// Extensions the tables' column types belong to, with their schemas.
async fn extensions(
    c: &Client,
    ep: &PgEndpoint,
    tables: &BTreeSet<u32>,
) -> Result<Vec<(String, String)>> {
    Ok(c.query(
        "SELECT DISTINCT e.extname::text, n.nspname::text
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           JOIN pg_depend d ON d.classid = 'pg_type'::regclass
            AND d.objid = CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE coalesce(nullif(t.typbasetype, 0), t.oid) END
            AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
           JOIN pg_extension e ON e.oid = d.refobjid
           JOIN pg_namespace n ON n.oid = e.extnamespace
          WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY 1",
        &[&tables.iter().copied().collect::<Vec<u32>>()],
    )
    .await
    .map_err(pg_err(ep, "reading the extensions the tables need"))?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect())
}

/// Dumps made by this process, for unique archive names.
static DUMPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Why a dump cannot be taken, if it cannot (for `check`).
pub fn unavailable(major: u32) -> Option<Error> {
    tools::find("pg_dump", major)
        .and_then(|_| tools::find("pg_restore", major))
        .err()
}
