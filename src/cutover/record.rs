//! What a cutover is asked to do, what it reports, and the record it keeps
//! in the target (so that an interrupted one can be undone or completed).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::error::{Error, Result};
use crate::sink::Sink;
use crate::source::{Fence, FenceMode};

/// How the cutover proves the target equal at the fenced position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    None,
    /// Row counts per table on both sides.
    Counts,
    /// Checksums of every row (`switchyard verify`).
    Full,
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "counts" => Ok(Self::Counts),
            "full" => Ok(Self::Full),
            other => Err(format!("unknown verify {other:?}: none, counts or full")),
        }
    }
}

/// Which way the application moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Source → target (`cutover`).
    Forward,
    /// Back to the old source over the reverse replica (`rollback`).
    Rollback,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The most lag (a marker's round trip) at which the fence goes up.
    pub max_lag: Duration,
    pub fence: FenceMode,
    /// The application roles to fence (PostgreSQL); all login roles but
    /// switchyard's and superusers when `None`.
    pub roles: Option<Vec<String>>,
    /// The most the write freeze may last (also the most cutover waits to
    /// catch up before it fences).
    pub timeout: Duration,
    pub verify: VerifyMode,
    /// Leave a reverse replica (PostgreSQL → PostgreSQL, PostgreSQL → a
    /// SurrealDB server).
    pub reverse: bool,
    /// Preflight only.
    pub check: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(1),
            fence: FenceMode::ReadOnly,
            roles: None,
            timeout: Duration::from_secs(60),
            verify: VerifyMode::Counts,
            reverse: false,
            check: false,
        }
    }
}

/// One step, as the report shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub ok: bool,
    pub ms: u64,
    pub detail: Vec<String>,
}

/// Where a cutover is, as recorded in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// The fence is (or may be) up.
    Fencing,
    /// The application may move; the fence stays.
    Switched,
    /// Given up; the fence lifted.
    Undone,
    /// A rollback moved the application back.
    RolledBack,
}

/// The record a cutover keeps in the target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub direction: Direction,
    pub status: Status,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub fence: Option<Fence>,
    pub steps: Vec<Step>,
    pub freeze_ms: Option<u64>,
    /// The position the target was drained to.
    pub position: Option<String>,
    /// Each replicated table's (source name, target name).
    pub tables: Vec<(String, String)>,
    /// Each replicated table's key columns by source name (a reverse
    /// replica out of SurrealDB reads them from the record's fields).
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, Vec<String>>,
    /// The reverse replica on the target: its slot (PostgreSQL), or
    /// `changefeed` (SurrealDB).
    pub reverse_slot: Option<String>,
    /// The stop marker was met and forward replication released.
    #[serde(default)]
    pub ended: bool,
    pub error: Option<String>,
}

/// What a cutover did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub id: String,
    pub direction: Direction,
    /// Preflight passed.
    pub go: bool,
    /// Why not.
    pub reasons: Vec<String>,
    pub switched: bool,
    /// Fence to switch.
    pub freeze_ms: Option<u64>,
    /// A marker's round trip just before the fence.
    pub lag_ms: Option<u64>,
    pub steps: Vec<Step>,
    /// How to start the reverse replica.
    pub reverse: Option<String>,
    /// The step that failed and why.
    pub error: Option<String>,
}

impl Outcome {
    pub(crate) fn step(&mut self, step: &str, started: Instant, ok: bool, detail: Vec<String>) {
        let ms = started.elapsed().as_millis() as u64;
        info!(step, ms, ok, "{}", detail.join("; "));
        self.steps.push(Step {
            step: step.into(),
            ok,
            ms,
            detail,
        });
    }
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn record_json(r: &Record) -> Result<serde_json::Value> {
    serde_json::to_value(r)
        .map_err(|e| Error::definite("cannot encode the cutover record").with_source(e))
}

pub(crate) async fn save(sink: &dyn Sink, r: &Record) -> Result<()> {
    sink.save_cutover_record(&r.id, &record_json(r)?).await
}

/// The newest cutover record of a target.
pub async fn last_record(sink: &dyn Sink) -> Result<Option<Record>> {
    match sink.cutover_record().await? {
        Some(v) => Ok(Some(serde_json::from_value(v).map_err(|e| {
            Error::definite("the target's cutover record is unreadable").with_source(e)
        })?)),
        None => Ok(None),
    }
}
