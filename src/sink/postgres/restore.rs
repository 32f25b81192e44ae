//! Restoring a PostgreSQL source's schema (see [`crate::schema::dump`])
//! into the target with `pg_restore`: each part in one transaction, the
//! extensions it needs created first, recorded in
//! `switchyard.schema_restore` so that a later run does not restore it
//! again; materialized views refreshed once their tables are loaded.

use tokio_postgres::Client;
use tracing::info;

use crate::error::{Error, Result};
use crate::pg::conn::{pg_err, relation_exists, PgEndpoint};
use crate::pg::{quote_ident, tools};
use crate::schema::dump::{SchemaDump, Section, TocEntry};

/// Whether `section` was restored into this target already.
pub async fn restored(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    section: Section,
) -> Result<bool> {
    if !relation_exists(
        c,
        ep,
        "switchyard.schema_restore",
        "reading the target's state schema",
    )
    .await?
    {
        return Ok(false);
    }
    Ok(c.query_opt(
        "SELECT 1 FROM switchyard.schema_restore WHERE section = $1",
        &[&section.arg()],
    )
    .await
    .map_err(pg_err(ep, "reading switchyard.schema_restore"))?
    .is_some())
}

/// Whether every index, constraint and trigger among `entries` (a section's
/// objects) exists in the target, and there is at least one: the section
/// was restored by an earlier run (pg_restore restores it in one
/// transaction, so either all of them exist or none).
async fn committed_earlier(c: &Client, ep: &PgEndpoint, entries: &[&TocEntry]) -> Result<bool> {
    let mut checked = 0;
    for e in entries {
        // Objects of a table are tagged `table name`.
        let sql = match e.desc.as_str() {
            "INDEX" => {
                "SELECT 1 FROM pg_class i JOIN pg_namespace n ON n.oid = i.relnamespace \
                 WHERE n.nspname = $1 AND i.relname = $2 AND i.relkind IN ('i', 'I')"
            }
            "CONSTRAINT" | "FK CONSTRAINT" => {
                "SELECT 1 FROM pg_constraint k JOIN pg_class r ON r.oid = k.conrelid \
                 JOIN pg_namespace n ON n.oid = r.relnamespace \
                 WHERE n.nspname = $1 AND r.relname || ' ' || k.conname = $2"
            }
            "TRIGGER" => {
                "SELECT 1 FROM pg_trigger t JOIN pg_class r ON r.oid = t.tgrelid \
                 JOIN pg_namespace n ON n.oid = r.relnamespace \
                 WHERE n.nspname = $1 AND r.relname || ' ' || t.tgname = $2"
            }
            _ => continue,
        };
        let found = c
            .query_opt(sql, &[&e.schema, &e.tag])
            .await
            .map_err(pg_err(ep, "reading the target's indexes and constraints"))?
            .is_some();
        if !found {
            return Ok(false);
        }
        checked += 1;
    }
    Ok(checked > 0)
}

/// The `maintenance_work_mem` to build keys and indexes with after a load
/// (`target.maintenance_work_mem_mb`): `mb` MiB where the session's own
/// setting is lower, as a setting's text; None keeps the session's (a
/// server's larger setting, or `mb` 0). A key's sort that does not fit
/// spills to temporary files: 64 MB, PostgreSQL's default, holds about a
/// million keys.
pub async fn key_build_memory(
    c: &impl tokio_postgres::GenericClient,
    ep: &PgEndpoint,
    mb: u64,
) -> Result<Option<String>> {
    if mb == 0 {
        return Ok(None);
    }
    // pg_settings gives it in kB.
    let kb: i64 = c
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'maintenance_work_mem'",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading maintenance_work_mem"))?
        .get(0);
    let want = mb.saturating_mul(1024).min(i32::MAX as u64) as i64;
    let text = if want as u64 == mb * 1024 {
        format!("{mb}MB")
    } else {
        format!("{want}kB")
    };
    Ok((want > kb).then_some(text))
}

/// Restores one part of `dump`; what was done. The keys and indexes of the
/// post-data part are built with `key_memory` as maintenance_work_mem (see
/// [`key_build_memory`]; None: the server's).
pub async fn restore(
    c: &Client,
    ep: &PgEndpoint,
    dump: &SchemaDump,
    section: Section,
    key_memory: Option<&str>,
) -> Result<Vec<String>> {
    if restored(c, ep, section).await? {
        return Ok(vec![format!(
            "{} restored by an earlier run",
            section.arg()
        )]);
    }
    let mut done = Vec::new();
    if section == Section::PreData {
        for (ext, schema) in &dump.extensions {
            let available = c
                .query_opt(
                    "SELECT 1 FROM pg_available_extensions WHERE name = $1",
                    &[ext],
                )
                .await
                .map_err(pg_err(ep, "reading the target's extensions"))?
                .is_some();
            if !available {
                return Err(Error::config(format!(
                    "the replicated tables need extension {ext:?}, which the target server does not have: \
                     install it there (its package for this PostgreSQL version), then run again"
                )));
            }
            c.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {s}; CREATE EXTENSION IF NOT EXISTS {e} WITH SCHEMA {s}",
                s = quote_ident(schema),
                e = quote_ident(ext)
            ))
            .await
            .map_err(pg_err(ep, &format!("creating extension {ext}")))?;
            done.push(format!("extension {ext} created"));
        }
    }
    // Schemas are made here (they may exist: `public`, or from a run that
    // stopped), pg_restore makes the rest.
    if section == Section::PreData {
        for e in dump.entries.iter().filter(|e| e.desc == "SCHEMA") {
            c.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {}",
                quote_ident(&e.tag)
            ))
            .await
            .map_err(pg_err(ep, &format!("creating schema {}", e.tag)))?;
        }
    }
    let entries: Vec<_> = dump
        .entries
        .iter()
        .filter(|e| e.section() == section && e.desc != "SCHEMA")
        .collect();
    let earlier = section == Section::PostData
        && !entries.is_empty()
        && committed_earlier(c, ep, &entries).await?;
    if earlier {
        // pg_restore restores a section in one transaction: a run stopped
        // after its commit and before the record below.
        done.push(format!(
            "{}: {} object(s) restored by an earlier run that stopped before recording it",
            section.arg(),
            entries.len()
        ));
    }
    if !entries.is_empty() && !earlier {
        let list = dump
            .archive
            .with_extension(format!("{}.list", section.arg()));
        let text: String = entries.iter().map(|e| format!("{};\n", e.id)).collect();
        std::fs::write(&list, text).map_err(|e| {
            Error::definite(format!("cannot write {}", list.display())).with_source(e)
        })?;
        let pg_restore = tools::find("pg_restore", dump.tool_major)?;
        let mut cmd = tools::command(&pg_restore, ep);
        cmd.arg(format!("--section={}", section.arg()))
            .arg("--single-transaction")
            .arg("--exit-on-error")
            .arg(format!("--use-list={}", list.display()))
            .arg(format!("--dbname={}", ep.dbname));
        if !dump.owners {
            cmd.arg("--no-owner").arg("--no-acl");
        }
        if section == Section::PostData {
            if let Some(mem) = key_memory {
                cmd.env("PGOPTIONS", format!("-c maintenance_work_mem={mem}"));
            }
        }
        cmd.arg(&dump.archive);
        let r = tools::run(cmd, ep, &format!("pg_restore --section={}", section.arg())).await;
        let _ = std::fs::remove_file(&list);
        r.map_err(|e| {
            e.context(format!(
                "restoring the source's schema ({}) into the target",
                section.arg()
            ))
        })?;
        done.push(format!(
            "{}: {} object(s) restored with pg_restore",
            section.arg(),
            entries.len()
        ));
    }
    if section == Section::PostData {
        // Their data is not in a schema dump: filled now that the tables are.
        for e in dump
            .entries
            .iter()
            .filter(|e| e.desc == "MATERIALIZED VIEW")
        {
            c.batch_execute(&format!(
                "REFRESH MATERIALIZED VIEW {}.{}",
                quote_ident(&e.schema),
                quote_ident(&e.tag)
            ))
            .await
            .map_err(pg_err(ep, &format!("refreshing {}.{}", e.schema, e.tag)))?;
            done.push(format!(
                "materialized view {}.{} refreshed",
                e.schema, e.tag
            ));
        }
    }
    c.execute(
        "INSERT INTO switchyard.schema_restore (section, entries) VALUES ($1, $2) ON CONFLICT (section) DO NOTHING",
        &[&section.arg(), &(entries.len() as i32)],
    )
    .await
    .map_err(pg_err(ep, "recording the restored schema"))?;
    info!(
        section = section.arg(),
        objects = entries.len(),
        "source schema restored into the target"
    );
    Ok(done)
}
