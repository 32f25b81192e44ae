//! The reverse replica a cutover out of PostgreSQL leaves behind: the new
//! primary (the old target, PostgreSQL or a SurrealDB server) streams into
//! the old primary, whose tables are identical at the cutover, so nothing
//! is copied. Its slot (PostgreSQL) or changefeeds (SurrealDB) are made on
//! the target before the application can write there; the old source's
//! `switchyard` schema records every table as copied at that position.
//! `rollback` is a cutover over it, ending with the old primary writable
//! again (PostgreSQL → PostgreSQL).

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::info;

use super::record::{last_record, save, Direction, Record, Status};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::TableSchema;
use crate::source::Access;

/// The reverse replica's configuration for a cutover of `config` that
/// replicated `tables` (source name, target name) with these key columns.
pub fn config(
    config: &Config,
    tables: &[(String, String)],
    keys: &BTreeMap<String, Vec<String>>,
) -> Result<Arc<Config>> {
    Ok(Arc::new(config.reversed(tables, keys)?))
}

/// Each table's key columns by source name (tables with a key).
pub fn key_columns(tables: &[Arc<TableSchema>]) -> BTreeMap<String, Vec<String>> {
    tables
        .iter()
        .filter(|t| !t.whole_row)
        .map(|t| {
            (
                t.name.clone(),
                t.key.iter().map(|&i| t.columns[i].name.clone()).collect(),
            )
        })
        .collect()
}

/// Creates the reverse replica: its slot and publication on the target
/// (now), the old source's state as of the slot's start. The slot's name
/// and what was done.
pub async fn prepare(
    config: &Arc<Config>,
    tables: &[Arc<TableSchema>],
) -> Result<(String, Vec<String>)> {
    let pairs: Vec<(String, String)> = tables
        .iter()
        .map(|t| (t.name.clone(), t.target_name.clone()))
        .collect();
    let rc = self::config(config, &pairs, &key_columns(tables))?;
    let p = crate::connect::pipeline(&rc).await?;
    let rtables = p.tables().await?;
    if rtables.len() != tables.len() {
        return Err(Error::definite(format!(
            "the reverse replica finds {} of the {} tables in the target",
            rtables.len(),
            tables.len()
        )));
    }
    let (source, sink) = (p.source(), p.sink());
    sink.prepare(&rtables).await?;
    let installed = source.install(&rtables).await?;
    let at = source.current_position().await?;
    sink.adopt(&rtables, at, &installed.origin).await?;
    source.release_snapshot().await;
    let shown = at.show(source.position_kind());
    let (name, made) = if rc.source_is_surreal() {
        info!(position = %shown, "reverse replica prepared: changefeeds on the target");
        (
            CHANGEFEED.to_string(),
            format!(
                "changefeeds on the target's {} table(s) (retention {}), from {shown}",
                rtables.len(),
                rc.source.changefeed_retention
            ),
        )
    } else {
        info!(slot = %rc.source.slot, position = %shown, "reverse replica prepared");
        (
            rc.source.slot.clone(),
            format!(
                "slot {:?} and publication {:?} on the target, from {shown}",
                rc.source.slot, rc.source.publication,
            ),
        )
    };
    Ok((
        name,
        vec![
            made,
            format!(
                "the old source records {} table(s) as identical there; start the reverse replica with `switchyard run --reverse`",
                rtables.len()
            ),
        ],
    ))
}

/// What `Record::reverse_slot` holds for a reverse replica out of SurrealDB.
const CHANGEFEED: &str = "changefeed";

/// Drops a reverse slot (or the changefeeds) made by a cutover that was
/// then undone.
pub async fn discard(config: &Arc<Config>, slot: &str) -> Result<Vec<String>> {
    let mut c = (**config).clone();
    // Any table: only the slot or the changefeeds are touched.
    let rc = c.reversed(&[], &BTreeMap::new())?;
    if rc.source_is_surreal() {
        let rejects = Arc::new(crate::reject::Rejects::default());
        let source = crate::connect::source(&rc, rejects, Access::ReadWrite).await?;
        source.uninstall().await?;
        return Ok(vec![
            "the changefeeds switchyard defined on the target are removed".into(),
        ]);
    }
    c = Config {
        source: crate::config::SourceConfig {
            slot: slot.to_string(),
            ..rc.source
        },
        ..rc
    };
    let rejects = Arc::new(crate::reject::Rejects::default());
    let source = crate::connect::source(&c, rejects, Access::ReadWrite).await?;
    source.end_replication().await
}

/// The reverse replica's configuration, from the forward cutover recorded
/// in `config`'s target (`run --reverse`).
pub async fn reversed(config: &Arc<Config>) -> Result<Arc<Config>> {
    let r = forward_record(config).await?;
    if r.reverse_slot.is_none() {
        return Err(Error::config(format!(
            "cutover {} switched without --reverse: there is no reverse replica",
            r.id
        )));
    }
    self::config(config, &r.tables, &r.keys)
}

async fn forward_record(config: &Arc<Config>) -> Result<Record> {
    let rejects = Arc::new(crate::reject::Rejects::default());
    let sink = crate::connect::existing_sink(config, rejects)
        .await?
        .ok_or_else(|| Error::config("the target does not exist: nothing was cut over"))?;
    match last_record(&*sink).await? {
        Some(r) if r.direction == Direction::Forward && r.status == Status::Switched => Ok(r),
        Some(r) => Err(Error::config(format!(
            "the target's last cutover {} is {:?}, not switched: there is no reverse replica",
            r.id, r.status
        ))),
        None => Err(Error::config(
            "the target was never cut over: there is no reverse replica",
        )),
    }
}

/// What a rollback needs of the forward cutover.
pub struct Forward {
    config: Arc<Config>,
    record: Option<Record>,
    problem: Option<String>,
}

impl Forward {
    /// Why the rollback cannot run.
    pub fn problems(&self) -> Vec<String> {
        self.problem.iter().cloned().collect()
    }

    /// The old primary takes the application's writes again: the forward
    /// cutover's fence lifted, its record marked rolled back.
    pub async fn restore(&self, rollback: &str) -> Result<Vec<String>> {
        let Some(mut r) = self.record.clone() else {
            return Ok(Vec::new());
        };
        let rejects = Arc::new(crate::reject::Rejects::default());
        let source =
            crate::connect::source(&self.config, rejects.clone(), Access::ReadWrite).await?;
        let mut done = Vec::new();
        if let Some(f) = &r.fence {
            source.lift_fence(f).await?;
            done.push(
                "the old primary's fence is lifted: it takes the application's writes".into(),
            );
        }
        let sink = crate::connect::sink(&self.config, rejects).await?;
        r.status = Status::RolledBack;
        r.error = Some(format!("rolled back by {rollback}"));
        save(&*sink, &r).await?;
        Ok(done)
    }
}

/// The reverse direction for `rollback`, and the forward cutover.
pub async fn for_rollback(config: &Arc<Config>) -> Result<(Arc<Config>, Forward)> {
    match forward_record(config).await {
        Ok(r) if r.reverse_slot.is_some() => Ok((
            self::config(config, &r.tables, &r.keys)?,
            Forward {
                config: config.clone(),
                record: Some(r),
                problem: None,
            },
        )),
        Ok(r) => Err(Error::config(format!(
            "cutover {} switched without --reverse: there is no reverse replica to roll back over",
            r.id
        ))),
        Err(e) => Err(e),
    }
}
