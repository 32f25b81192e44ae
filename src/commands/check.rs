//! `switchyard check`: validate, connect to every endpoint the run will
//! need, and show the plan without writing anything anywhere.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::Exit;
use crate::config::{Config, TargetKind};
use crate::error::Result;
use crate::redact::redact_url;
use crate::reject::Rejects;
use crate::schema;
use crate::source::{Access, Problem};

pub async fn run(config: &Path, json: bool) -> Result<Exit> {
    let config = super::load(config)?;
    if !config.tenants.is_empty() {
        let plans = super::per_tenant(
            &config,
            json,
            |name, _| format!("tenant {name}:"),
            |plan: &Plan| plan.render(),
            |c| async move { check(&c).await },
        )
        .await?;
        return Ok(if plans.iter().any(|p| p.blocking() > 0) {
            Exit::Problem
        } else {
            Exit::Ok
        });
    }
    let plan = check(&config).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).unwrap_or_else(|_| "{}".into())
        );
    } else {
        print!("{}", plan.render());
    }
    Ok(if plan.blocking() > 0 {
        Exit::Problem
    } else {
        Exit::Ok
    })
}

#[derive(Debug, Serialize)]
pub struct PlanColumn {
    pub name: String,
    pub source_type: String,
    pub target: String,
    /// Why the target type is not the declared type's, and the default or
    /// identity the target keeps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct PlanTable {
    pub table: String,
    pub target: String,
    pub key: Vec<String>,
    pub record_id: String,
    pub columns: Vec<PlanColumn>,
    /// The source's CHECKs as the target will hold them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Plan {
    pub source: String,
    pub target: String,
    pub tables: Vec<PlanTable>,
    pub problems: Vec<Problem>,
    /// What a table's identity is called in the target.
    #[serde(skip)]
    pub identity: &'static str,
    /// What is built after the bulk load, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after_load: Vec<String>,
    /// PostgreSQL → PostgreSQL: the source's schema as pg_dump takes it,
    /// what is created before the load, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub before_load: Vec<String>,
    /// What the schema leaves out, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

impl Plan {
    pub fn blocking(&self) -> usize {
        self.problems.iter().filter(|p| p.blocking).count()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "source  {}", self.source);
        let _ = writeln!(out, "target  {}", self.target);
        for t in &self.tables {
            let _ = writeln!(
                out,
                "\ntable {:?} → {:?}  key ({})  {} {}",
                t.table,
                t.target,
                t.key.join(", "),
                self.identity,
                t.record_id
            );
            let w = t
                .columns
                .iter()
                .map(|c| c.name.chars().count())
                .max()
                .unwrap_or(0);
            let wt = t
                .columns
                .iter()
                .map(|c| c.source_type.chars().count())
                .max()
                .unwrap_or(0)
                .max(4);
            for c in &t.columns {
                let st = if c.source_type.is_empty() {
                    "(none)"
                } else {
                    &c.source_type
                };
                let _ = writeln!(
                    out,
                    "  {:<w$}  {:<wt$}  → {}{}",
                    c.name,
                    st,
                    c.target,
                    c.note
                        .as_ref()
                        .map(|n| format!("  ({n})"))
                        .unwrap_or_default(),
                    w = w,
                    wt = wt + 2
                );
            }
            for k in &t.checks {
                let _ = writeln!(out, "  {k}");
            }
        }
        if !self.before_load.is_empty() {
            let _ = writeln!(
                out,
                "\nthe source's schema (pg_dump), before the load, in this order:"
            );
            for s in &self.before_load {
                let _ = writeln!(out, "  {s}");
            }
        }
        if !self.left_out.is_empty() {
            let _ = writeln!(out, "\nleft out of the schema:");
            for s in &self.left_out {
                let _ = writeln!(out, "  {s}");
            }
        }
        if !self.after_load.is_empty() {
            let _ = writeln!(out, "\nafter the load, in this order:");
            for s in &self.after_load {
                let _ = writeln!(out, "  {s}");
            }
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nproblems:");
            for p in &self.problems {
                let mark = if p.blocking { "error" } else { "note " };
                let _ = writeln!(out, "  {mark}  {p}");
            }
        }
        let _ = writeln!(
            out,
            "\n{} table(s) ready, {} blocking problem(s), {} note(s)",
            self.tables.len(),
            self.blocking(),
            self.problems.len() - self.blocking()
        );
        out
    }
}

/// Builds the plan. Reads the source's catalog; writes nothing anywhere.
pub async fn check(config: &Config) -> Result<Plan> {
    let source =
        crate::connect::source(config, Arc::new(Rejects::default()), Access::ReadOnly).await?;
    let mut discovery = source.discover().await?;
    discovery.refuse_shared_targets();
    discovery.refuse_nothing_selected();
    let mut problems = discovery.problems;
    problems.extend(target_problems(config).await?);
    /// Each table with its key, its target identity and each column's target.
    fn plan_tables(
        tables: &[crate::model::TableSchema],
        identity: impl Fn(&crate::model::TableSchema) -> String,
        target: impl Fn(&crate::model::TableSchema, usize) -> String,
    ) -> Vec<PlanTable> {
        tables
            .iter()
            .map(|t| PlanTable {
                table: t.name.clone(),
                target: t.target_name.clone(),
                key: t.key_names().iter().map(|s| s.to_string()).collect(),
                record_id: identity(t),
                columns: t
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| PlanColumn {
                        name: c.name.clone(),
                        source_type: c.source_type.clone(),
                        target: target(t, i),
                        note: t
                            .conversions
                            .iter()
                            .find(|k| k.column == i)
                            .map(|k| k.reason.clone()),
                    })
                    .collect(),
                checks: Vec::new(),
            })
            .collect()
    }
    let source_left_out = std::mem::take(&mut discovery.left_out);
    if let TargetKind::Postgres { url } = config.target_kind()? {
        let pg_source = matches!(
            config.source_kind()?,
            crate::config::SourceKind::Postgres { .. }
        );
        let tables = plan_tables(
            &discovery.tables,
            |t| {
                if t.whole_row {
                    "no key, rows matched by their whole value".into()
                } else {
                    format!("PRIMARY KEY ({})", t.key_names().join(", "))
                }
            },
            |t, i| schema::postgres::table_column_type(t, i, pg_source),
        );
        let mut tables = tables;
        let mode = config.target.schema.as_deref().unwrap_or("create");
        if mode != "create" {
            target_fit(
                config,
                &*source,
                &url,
                &discovery.tables,
                pg_source,
                &mut tables,
                &mut problems,
            )
            .await;
        }
        if pg_source && mode == "create" && !discovery.tables.is_empty() {
            let shared: Vec<std::sync::Arc<crate::model::TableSchema>> = discovery
                .tables
                .iter()
                .cloned()
                .map(std::sync::Arc::new)
                .collect();
            let (before_load, after_load, left_out) =
                match source.schema_dump(&shared, config.target.keep_owners).await {
                    Ok(Some(d)) => dump_plan(config, &d, &mut problems),
                    Ok(None) => (Vec::new(), Vec::new(), Vec::new()),
                    Err(e) => {
                        problems.push(Problem {
                            table: "(schema)".into(),
                            column: None,
                            message: format!(
                                "the source's schema cannot be taken with pg_dump: {}",
                                e.report()
                            ),
                            blocking: true,
                        });
                        (Vec::new(), Vec::new(), Vec::new())
                    }
                };
            return Ok(Plan {
                source: redact_url(&config.source.url),
                target: format!(
                    "{}  schema create (the source's, with pg_dump)",
                    redact_url(&url)
                ),
                tables,
                problems,
                identity: "target:",
                after_load,
                before_load,
                left_out,
            });
        }
        // Types that do not stay the same: enums and domains of a PostgreSQL source.
        if pg_source {
            for t in &discovery.tables {
                for (i, c) in t.columns.iter().enumerate() {
                    let to = schema::postgres::table_column_type(t, i, true);
                    if to != c.source_type {
                        problems.push(Problem {
                            table: t.name.clone(),
                            column: Some(c.name.clone()),
                            message: format!("type {} becomes {to} in the target (its values are kept as they read)", c.source_type),
                            blocking: false,
                        });
                    }
                }
            }
        }
        if !pg_source && mode == "create" {
            for (t, plan) in discovery.tables.iter().zip(tables.iter_mut()) {
                postgres_notes(t, plan);
            }
        }
        conversion_notes(config, &*source, &discovery.tables, &mut problems).await;
        return Ok(Plan {
            source: redact_url(&config.source.url),
            target: format!("{}  schema {mode}", redact_url(&url)),
            before_load: Vec::new(),
            left_out: source_left_out,
            tables,
            problems,
            identity: "target:",
            after_load: if mode == "create" {
                let shared: Vec<std::sync::Arc<crate::model::TableSchema>> = discovery
                    .tables
                    .iter()
                    .cloned()
                    .map(std::sync::Arc::new)
                    .collect();
                // Each table's primary key as its copy ends; then indexes and
                // foreign keys once every table is in.
                shared
                    .iter()
                    .filter(|t| !t.whole_row)
                    .map(|t| schema::postgres::primary_key_ddl(t))
                    .chain(
                        schema::postgres::secondary_ddl(&shared)
                            .into_iter()
                            .map(|d| match d {
                                Ok((_, sql)) => sql,
                                Err(why) => format!("(skipped) {why}"),
                            }),
                    )
                    .collect()
            } else {
                Vec::new()
            },
        });
    }
    let TargetKind::Surreal { endpoint, .. } = config.target_kind()? else {
        unreachable!("handled above")
    };
    let schemafull = config.target.schemafull;
    let target = format!(
        "{}  namespace {:?}, database {:?}, {}",
        redact_url(&endpoint),
        config.target.namespace.as_deref().unwrap_or(""),
        config.target.database.as_deref().unwrap_or(""),
        if schemafull {
            "SCHEMAFULL"
        } else {
            "SCHEMALESS"
        }
    );
    let tables = plan_tables(&discovery.tables, schema::surreal::describe_id, |t, i| {
        schema::surreal::describe(t, i, schemafull)
    });
    let mut after_load = Vec::new();
    for t in &discovery.tables {
        for k in &t.checks {
            if k.allowed_values().is_none() || !schemafull {
                problems.push(note(
                    &t.name,
                    None,
                    format!(
                        "{} has no SurrealDB form{}; it is not carried",
                        k.source,
                        if schemafull {
                            ""
                        } else {
                            " in a SCHEMALESS table"
                        }
                    ),
                    false,
                ));
            }
        }
        for ts in &t.text_search {
            problems.push(note(
                &t.name,
                None,
                format!(
                    "full-text index {:?} is built only in a PostgreSQL target",
                    ts.name
                ),
                false,
            ));
        }
        let (ql, notes) = schema::surreal::index_ql(t);
        after_load.extend(ql);
        for n in notes {
            problems.push(note(&t.name, None, n, false));
        }
    }
    conversion_notes(config, &*source, &discovery.tables, &mut problems).await;
    Ok(Plan {
        source: redact_url(&config.source.url),
        target,
        tables,
        problems,
        identity: "record id",
        after_load,
        before_load: Vec::new(),
        left_out: source_left_out,
    })
}

/// For a PostgreSQL target switchyard creates from a SQLite source: each
/// column's identity or default beside its type, and the table's CHECKs
/// and full-text columns as they will be built.
fn postgres_notes(t: &crate::model::TableSchema, plan: &mut PlanTable) {
    for (i, c) in plan.columns.iter_mut().enumerate() {
        let fills = t
            .column_defaults
            .iter()
            .find(|d| d.column == i)
            .and_then(|d| {
                if d.identity {
                    Some("identity: SQLite's rowid alias".to_string())
                } else {
                    d.default.as_ref().map(|e| format!("DEFAULT {e}"))
                }
            });
        c.note = match (c.note.take(), fills) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
    }
    plan.checks = t
        .checks
        .iter()
        .map(|k| {
            format!(
                "CONSTRAINT {} CHECK ({})",
                crate::pg::quote_ident(&k.name),
                schema::postgres::check_expr(t, k)
            )
        })
        .chain(t.text_search.iter().map(|ts| {
            format!(
                "{} tsvector over ({}), GIN index: the FTS table {:?}",
                crate::pg::quote_ident(&ts.name),
                ts.columns
                    .iter()
                    .map(|&c| t.columns[c].name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                ts.name
            )
        }))
        .collect();
}

/// A problem of `table` (and `column`), blocking or a note.
fn note(table: &str, column: Option<String>, message: String, blocking: bool) -> Problem {
    Problem {
        table: table.to_string(),
        column,
        message,
        blocking,
    }
}

/// The note for a column some of whose current values, read from the
/// source, do not `verb` (convert, fit): how many of how many rows, the
/// first reason, up to ten keys, and what `run` will do with them; blocking
/// without `pipeline.reject_dir`.
#[allow(clippy::too_many_arguments)]
fn misfits_note(
    config: &Config,
    table: &str,
    column: String,
    prefix: &str,
    verb: &str,
    fix: &str,
    (failed, rows): (u64, u64),
    example: &str,
    keys: &[String],
) -> Problem {
    let rejects = config.pipeline.reject_dir.is_some();
    note(
        table,
        Some(column),
        format!(
            "{prefix}{failed} of {rows} current values do not {verb}, for example: {example}; keys: {}{}; {}",
            keys.join(", "),
            if failed > keys.len() as u64 { ", …" } else { "" },
            if rejects {
                "run sets these rows aside in pipeline.reject_dir".to_string()
            } else {
                format!("run would stop at the first: fix the values in the source, {fix}, or set pipeline.reject_dir")
            }
        ),
        !rejects,
    )
}

/// Whether each converted column's current values convert, read from the
/// source: a note per cast, naming up to ten keys of values that do not.
async fn conversion_notes(
    config: &Config,
    source: &dyn crate::source::Source,
    tables: &[crate::model::TableSchema],
    problems: &mut Vec<Problem>,
) {
    for t in tables.iter().filter(|t| !t.conversions.is_empty()) {
        let found = match source.check_conversions(t).await {
            Ok(f) => f,
            Err(e) => {
                problems.push(note(
                    &t.name,
                    None,
                    format!("cannot read the source to check its casts: {}", e.report()),
                    false,
                ));
                continue;
            }
        };
        for f in found {
            let c = &t.columns[f.column];
            let reason = t
                .conversions
                .iter()
                .find(|k| k.column == f.column)
                .map(|k| k.reason.as_str())
                .unwrap_or("");
            let cast = format!(
                "{} → {} ({reason})",
                if c.source_type.is_empty() {
                    "(no type)"
                } else {
                    &c.source_type
                },
                c.logical
            );
            if f.failed == 0 {
                problems.push(note(
                    &t.name,
                    Some(c.name.clone()),
                    format!(
                        "{cast}: every current value converts ({} rows read)",
                        f.rows
                    ),
                    false,
                ));
            } else {
                problems.push(misfits_note(
                    config,
                    &t.name,
                    c.name.clone(),
                    &format!("{cast}: "),
                    "convert",
                    "change the rule",
                    (f.failed, f.rows),
                    f.example.as_deref().unwrap_or(""),
                    &f.keys,
                ));
            }
        }
    }
}

/// The schema a pg_dump restores, by part, and what it leaves out; notes
/// on owners, extensions and triggers go to `problems`.
fn dump_plan(
    config: &Config,
    d: &crate::schema::dump::SchemaDump,
    problems: &mut Vec<Problem>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    use crate::schema::dump::Section;
    let note = |message: String, blocking: bool| Problem {
        table: "(schema)".into(),
        column: None,
        message,
        blocking,
    };
    let mut before: Vec<String> = d
        .extensions
        .iter()
        .map(|(e, s)| {
            format!("EXTENSION {e} (in schema {s}; it must be available on the target server)")
        })
        .collect();
    before.extend(
        d.entries
            .iter()
            .filter(|e| e.section() == Section::PreData)
            .map(|e| e.shown()),
    );
    let after: Vec<String> = d
        .entries
        .iter()
        .filter(|e| e.section() == Section::PostData)
        .map(|e| e.shown())
        .chain(
            d.entries
                .iter()
                .filter(|e| e.desc == "MATERIALIZED VIEW")
                .map(|e| format!("REFRESH MATERIALIZED VIEW {}.{}", e.schema, e.tag)),
        )
        .collect();
    problems.push(note(
        if d.owners {
            "owners and grants are restored with the schema (target.keep_owners = true): their roles must exist in the target".into()
        } else {
            "owners and grants are left out (target.keep_owners = false): the target's objects belong to switchyard's role".into()
        },
        false,
    ));
    let firing = d.firing();
    if !firing.is_empty() {
        if config.target.replica_role {
            problems.push(note(
                format!(
                    "triggers and rules are restored but do not fire for replicated rows (session_replication_role = replica): {}",
                    firing.join(", ")
                ),
                false,
            ));
        } else {
            problems.push(note(
                format!(
                    "target.replica_role = false: these triggers and rules would fire for every replicated row: {}{}",
                    firing.join(", "),
                    if config.target.fire_triggers {
                        " (accepted: target.fire_triggers = true)"
                    } else {
                        "; set target.replica_role = true, or accept it with target.fire_triggers = true"
                    }
                ),
                !config.target.fire_triggers,
            ));
        }
    }
    (before, after, d.left_out.clone())
}

/// Whether the target can be reached and what it holds, without writing:
/// a target that cannot be reached is a blocking problem; one switchyard
/// never replicated into, or an embedded store not created yet, a note.
async fn target_problems(config: &Config) -> Result<Vec<Problem>> {
    let problem = |message: String, blocking: bool| Problem {
        table: "(target)".into(),
        column: None,
        message,
        blocking,
    };
    if let Some(path) = crate::connect::embedded_path(config)? {
        // Opening an embedded store would write to it: only say whether it exists.
        return Ok(if path.exists() {
            Vec::new()
        } else {
            vec![problem(
                format!("{} does not exist yet: `run` creates it", path.display()),
                false,
            )]
        });
    }
    if matches!(
        config.target_kind()?,
        TargetKind::Surreal { remote: false, .. }
    ) {
        return Ok(Vec::new());
    }
    let sink = match crate::connect::sink(config, Arc::new(Rejects::default())).await {
        Ok(s) => s,
        Err(e) => return Ok(vec![problem(e.report(), true)]),
    };
    let durability = match sink.durability_notes().await {
        Ok(notes) => notes,
        Err(e) => vec![(
            format!(
                "cannot read the target's durability settings: {}",
                e.report()
            ),
            false,
        )],
    };
    let mut found = match sink.state().await {
        Ok(None) => vec![problem(
            "switchyard never replicated into this target: `run` creates its state and copies every table".into(),
            false,
        )],
        Ok(Some(s)) => match s.checkpoint {
            Some(p) => vec![problem(
                format!("the target holds a checkpoint ({p}): `run` resumes after it and copies only tables not copied yet"),
                false,
            )],
            None => Vec::new(),
        },
        Err(e) => vec![problem(e.report(), true)],
    };
    found.extend(durability.into_iter().map(|(m, b)| problem(m, b)));
    Ok(found)
}

/// The team's own target tables (`existing`, `migrations:DIR`,
/// `refinery:DIR`, `sqlx:DIR`), checked as `run` will: in a transaction
/// that is rolled back, the migration files not applied yet are applied,
/// each table read and checked column by column; then the source is read
/// for every column narrower than its type, and the values that do not fit
/// are named (up to ten keys per column). Each table's columns show the
/// target's types.
async fn target_fit(
    config: &Config,
    source: &dyn crate::source::Source,
    url: &str,
    discovered: &[crate::model::TableSchema],
    pg_source: bool,
    tables: &mut [PlanTable],
    problems: &mut Vec<Problem>,
) {
    use crate::schema::narrow::{fits, Narrow};
    use crate::sink::postgres::migrations;
    use crate::sink::postgres::tables::{prepare, SchemaMode};
    let mode_text = config.target.schema.clone().unwrap_or_default();
    let mode = if mode_text == "existing" {
        SchemaMode::Existing
    } else {
        let Some((named, dir)) = migrations::parse(&mode_text) else {
            return;
        };
        match migrations::layout_of(named, &dir) {
            Ok(layout) => SchemaMode::Migrations(dir, layout),
            Err(e) => {
                problems.push(note("(target)", None, e.report(), true));
                return;
            }
        }
    };
    let Ok(ep) =
        crate::pg::conn::PgEndpoint::parse(url, config.target.password.clone(), "target.url")
    else {
        return;
    };
    // An unreachable target is reported by target_problems.
    let Ok(mut client) = ep.connect().await else {
        return;
    };
    let Ok(tx) = client.transaction().await else {
        return;
    };
    if let SchemaMode::Migrations(dir, layout) = &mode {
        if !try_migrations(&tx, &ep, dir, *layout, problems).await {
            return;
        }
    }
    let mut narrowed: Vec<(crate::model::TableSchema, Vec<(usize, Narrow)>)> = Vec::new();
    for (t, plan) in discovered.iter().zip(tables.iter_mut()) {
        match prepare(&tx, &ep, &mode, pg_source, t).await {
            Ok(p) => {
                for (i, c) in plan.columns.iter_mut().enumerate() {
                    c.target = p.types[i].clone();
                    if let Some((_, n)) = p.narrow.iter().find(|(j, _)| *j == i) {
                        c.target = format!("{}  ({})", c.target, n.describe());
                    }
                }
                if !p.narrow.is_empty() {
                    narrowed.push((t.clone(), p.narrow));
                }
            }
            Err(e) => problems.push(note(&t.name, None, e.report(), true)),
        }
    }
    drop(tx);
    // Every current value of a narrower column, read from the source.
    for (t, narrow) in narrowed {
        let (tx_rows, mut rx) = tokio::sync::mpsc::channel(4);
        let table = Arc::new(t.clone());
        let read = source.snapshot(table, 1000, tx_rows);
        let mut bad: Vec<(usize, Vec<String>, u64, String)> = Vec::new();
        let mut rows = 0u64;
        let collect = async {
            while let Some(batch) = rx.recv().await {
                for row in &batch {
                    rows += 1;
                    // Every narrower column of the row, not only the first.
                    for (i, n) in &narrow {
                        if let Some(why) = row.get(*i).and_then(|v| fits(v, n).err()) {
                            let key = t.describe_key(&t.key_of(row));
                            match bad.iter_mut().find(|b| b.0 == *i) {
                                Some(b) => {
                                    b.2 += 1;
                                    if b.1.len() < 10 {
                                        b.1.push(key);
                                    }
                                }
                                None => bad.push((*i, vec![key], 1, why)),
                            }
                        }
                    }
                }
            }
        };
        let (read, ()) = tokio::join!(read, collect);
        source.release_snapshot().await;
        if let Err(e) = read {
            problems.push(note(
                &t.name,
                None,
                format!(
                    "cannot read the source to check the narrower columns: {}",
                    e.report()
                ),
                false,
            ));
            continue;
        }
        for (i, n) in &narrow {
            let column = t.columns[*i].name.clone();
            match bad.iter().find(|b| b.0 == *i) {
                None => problems.push(note(
                    &t.name,
                    Some(column),
                    format!(
                        "{}; every current value fits ({rows} rows read)",
                        n.describe()
                    ),
                    false,
                )),
                Some((_, keys, count, why)) => problems.push(misfits_note(
                    config,
                    &t.name,
                    column,
                    "",
                    "fit",
                    "widen the target column",
                    (*count, rows),
                    why,
                    keys,
                )),
            }
        }
    }
}

/// The migration files not applied yet, tried in `tx` (which the caller
/// rolls back); false when the tables cannot be checked after them.
async fn try_migrations(
    tx: &tokio_postgres::Transaction<'_>,
    ep: &crate::pg::conn::PgEndpoint,
    dir: &Path,
    layout: crate::sink::postgres::migrations::Layout,
    problems: &mut Vec<Problem>,
) -> bool {
    use crate::sink::postgres::migrations;
    let note = |message: String, blocking: bool| Problem {
        table: "(target)".into(),
        column: None,
        message,
        blocking,
    };
    match migrations::pending_sql(tx, ep, dir, layout).await {
        Ok(files) => {
            let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
            problems.push(note(
                format!(
                    "migrations in {}: {} layout, applied by {} and recorded in {}; not applied yet: {}",
                    dir.display(),
                    match layout {
                        migrations::Layout::Refinery => "refinery (V{n}__name.sql)",
                        migrations::Layout::Sqlx => "sqlx ({version}_name.sql)",
                        migrations::Layout::Own => "plain (*.sql in name order)",
                    },
                    layout.name(),
                    layout.history(),
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ),
                false,
            ));
            for (name, sql) in &files {
                if migrations::manages_transaction(sql) {
                    problems.push(note(
                        format!(
                            "migration {name} manages its own transaction (BEGIN/COMMIT, or -- no-transaction), so check does not try it: \
                             the tables it and later files make are checked when run applies them"
                        ),
                        false,
                    ));
                    return false;
                }
                if let Err(e) = tx.batch_execute(sql).await {
                    problems.push(note(
                        format!(
                            "migration {name} fails on the target: {}",
                            crate::pg::conn::pg_error(
                                ep,
                                "applying it in a rolled-back transaction",
                                e
                            )
                            .report()
                        ),
                        true,
                    ));
                    return false;
                }
            }
        }
        Err(e) => {
            problems.push(note(e.report(), true));
            return false;
        }
    }
    true
}
