//! `switchyard status`: where replication stands, read from the target and
//! the source directly whether or not the daemon runs (and the daemon's own
//! view when its HTTP endpoint answers). Reads only; positions in the form
//! users of the source know (`0/2456C6A0`, a change-log number).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Exit;
use crate::config::{Config, SourceKind};
use crate::error::Result;
use crate::observe::StatusView;
use crate::position::{Position, PositionKind};
use crate::reject::Rejects;
use crate::source::Access;

pub async fn run(config: &Path, json: bool) -> Result<Exit> {
    let config = super::load(config)?;
    if !config.tenants.is_empty() {
        super::per_tenant(
            &config,
            json,
            |name, c| {
                format!(
                    "tenant {name} → {}/{}",
                    c.target.namespace.clone().unwrap_or_default(),
                    c.target.database.clone().unwrap_or_default()
                )
            },
            Status::render,
            |c| async move { status(&c).await },
        )
        .await?;
        return Ok(Exit::Ok);
    }
    let status = status(&config).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_else(|_| "{}".into())
        );
    } else {
        print!("{}", status.render());
    }
    Ok(Exit::Ok)
}

/// What `switchyard status` prints: read from the target and the source
/// directly, whether or not the daemon runs; and the daemon's own view when
/// its HTTP endpoint answers.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `not_started`, `copying`, `caught_up` or `behind`.
    pub state: String,
    pub source: String,
    pub target: String,
    pub checkpoint: Option<String>,
    pub checkpoint_updated_at: Option<String>,
    pub source_position: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub slot_retained_bytes: Option<u64>,
    pub slot_warning: Option<String>,
    pub tables: BTreeMap<String, TableStatusLine>,
    /// The running daemon's `/status`, when `http.address` is set and answers.
    pub daemon: Option<StatusView>,
    /// Why parts of the picture are missing.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableStatusLine {
    pub state: String,
    pub rows: u64,
    pub snapshot_position: String,
}

/// Gathers [`Status`] for `config`. The daemon's endpoint is asked first:
/// an embedded target is locked by a running daemon and cannot be opened
/// beside it.
pub async fn status(config: &Config) -> Result<Status> {
    use crate::redact::redact_url;
    let kind = match config.source_kind()? {
        SourceKind::Postgres { .. } => PositionKind::Lsn,
        SourceKind::Sqlite { .. } => PositionKind::Sequence,
        SourceKind::Surreal { .. } => PositionKind::Versionstamp,
    };
    let show = |p: Position| p.show(kind);
    let mut out = Status {
        state: "not_started".into(),
        source: redact_url(&config.source.url),
        target: redact_url(&config.target.url),
        checkpoint: None,
        checkpoint_updated_at: None,
        source_position: None,
        lag_bytes: None,
        lag_seconds: None,
        slot_retained_bytes: None,
        slot_warning: None,
        tables: BTreeMap::new(),
        daemon: None,
        notes: Vec::new(),
    };
    if let Some(address) = &config.http.address {
        match crate::observe::fetch_status(
            address,
            config.http.token.as_ref(),
            config.tenant.as_deref(),
        )
        .await
        {
            Ok(view) => out.daemon = Some(view),
            Err(e) => out.notes.push(format!(
                "the daemon's endpoint {address} did not answer: {e}"
            )),
        }
    }
    let rejects = Arc::new(Rejects::default());
    let sink = match crate::connect::existing_sink(config, rejects.clone()).await {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            out.notes
                .push("the target does not exist yet: switchyard never replicated into it".into());
            return Ok(out);
        }
        Err(e) => {
            out.notes.push(format!(
                "cannot open the target ({}); a running daemon holds an embedded target",
                e.report()
            ));
            None
        }
    };
    let state = match &sink {
        Some(s) => match s.state().await {
            Ok(Some(st)) => Some(st),
            Ok(None) => {
                out.notes.push(
                    "switchyard never replicated into this target (it holds no switchyard state)"
                        .into(),
                );
                return Ok(out);
            }
            Err(e) => return Err(e.context("reading the target's checkpoint")),
        },
        None => None,
    };
    drop(sink);
    let Some(state) = state else {
        if let Some(d) = &out.daemon {
            out.state = d.phase.as_str().into();
        }
        return Ok(out);
    };
    for (name, t) in &state.tables {
        out.tables.insert(
            name.clone(),
            TableStatusLine {
                state: match t.status {
                    crate::sink::TableStatus::Done => "copied".into(),
                    crate::sink::TableStatus::Copying => "copying".into(),
                },
                rows: t.rows,
                snapshot_position: show(t.position),
            },
        );
    }
    out.checkpoint = state.checkpoint.map(show);
    out.checkpoint_updated_at = state.checkpoint_updated_at.clone();
    let Some(checkpoint) = state.checkpoint else {
        return Ok(out);
    };
    let source = crate::connect::source(config, rejects, Access::ReadOnly).await?;
    if !source.capture_installed().await? {
        out.notes.push(
            "change capture is not installed in the source (never run, or uninstalled): `switchyard run` installs it"
                .into(),
        );
        return Ok(out);
    }
    if let Ok(d) = source.discover().await {
        for p in d
            .problems
            .iter()
            .filter(|p| p.message.contains("is not in publication"))
        {
            out.notes.push(p.to_string());
        }
    }
    let lag = source.lag(checkpoint).await?;
    let behind = lag.bytes > 0;
    let updated = state
        .checkpoint_updated_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok());
    out.lag_seconds = Some(match (behind, updated) {
        (false, _) => 0.0,
        (true, Some(t)) => {
            (Utc::now() - t.with_timezone(&Utc))
                .num_milliseconds()
                .max(0) as f64
                / 1000.0
        }
        (true, None) => f64::NAN,
    })
    .filter(|s| !s.is_nan());
    out.source_position = Some(lag.head);
    out.lag_bytes = Some(lag.bytes);
    out.slot_retained_bytes = lag.slot_retained_bytes;
    out.slot_warning = lag.slot_warning.clone();
    out.state = if state
        .tables
        .values()
        .any(|t| t.status == crate::sink::TableStatus::Copying)
    {
        "copying".into()
    } else if behind {
        "behind".into()
    } else {
        "caught_up".into()
    };
    Ok(out)
}

impl Status {
    /// The text `switchyard status` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(s, "state              {}", self.state);
        let _ = writeln!(s, "source             {}", self.source);
        let _ = writeln!(s, "target             {}", self.target);
        let _ = writeln!(
            s,
            "checkpoint         {} (moved {})",
            opt(&self.checkpoint),
            opt(&self.checkpoint_updated_at)
        );
        let _ = writeln!(s, "source position    {}", opt(&self.source_position));
        let _ = writeln!(
            s,
            "lag                {} bytes/rows, {} s",
            self.lag_bytes.map_or("-".into(), |b| b.to_string()),
            self.lag_seconds.map_or("-".into(), |x| format!("{x:.1}"))
        );
        if let Some(r) = self.slot_retained_bytes {
            let _ = writeln!(
                s,
                "slot retains       {:.1} MiB of WAL",
                r as f64 / (1 << 20) as f64
            );
        }
        if let Some(w) = &self.slot_warning {
            let _ = writeln!(s, "warning            {w}");
        }
        if let Some(d) = &self.daemon {
            let _ = writeln!(
                s,
                "daemon             {} ({} changes applied since start{})",
                d.phase.as_str(),
                d.changes_applied,
                d.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
        if !self.tables.is_empty() {
            let _ = writeln!(
                s,
                "\n{:<32} {:>8} {:>12}  copied at",
                "table", "state", "rows"
            );
            for (name, t) in &self.tables {
                let _ = writeln!(
                    s,
                    "{name:<32} {:>8} {:>12}  {}",
                    t.state, t.rows, t.snapshot_position
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
