//! `switchyard snapshot`: copy the tables not copied yet, print a per-table
//! report (and write it as JSON with `--report`), and exit.

use std::path::Path;

use tracing::info;

use super::Exit;
use crate::error::{Error, ErrorKind, Result};
use crate::pipeline::{Mode, Report};

pub async fn run(config: &Path, report: Option<&Path>) -> Result<Exit> {
    let config = super::load(config)?;
    let cancel = super::cancel_on_signal();
    if !config.tenants.is_empty() {
        let rejects = crate::reject::Rejects::new(config.pipeline.reject_dir.clone());
        for (name, pipeline) in crate::connect::tenant_pipelines(&config).await? {
            match pipeline.run(Mode::SnapshotOnly, cancel.clone()).await {
                Ok(r) => {
                    println!("tenant {name}:");
                    print!("{}", render(&r, &rejects));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {
                    info!("{e}");
                    return Ok(Exit::Ok);
                }
                Err(e) => return Err(e.context(format!("tenant {name}"))),
            }
        }
        return Ok(Exit::Ok);
    }
    let pipeline = crate::connect::pipeline(&config).await?;
    let r = match pipeline.run(Mode::SnapshotOnly, cancel).await {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::Interrupted => {
            info!("{e}");
            return Ok(Exit::Ok);
        }
        Err(e) => return Err(e),
    };
    let rejects = crate::reject::Rejects::new(config.pipeline.reject_dir.clone());
    print!("{}", render(&r, &rejects));
    if let Some(path) = report {
        let json = serde_json::to_string_pretty(&r)
            .map_err(|e| Error::definite("cannot encode the report").with_source(e))?;
        std::fs::write(path, json).map_err(|e| {
            Error::config(format!("writing the report to {}", path.display())).with_source(e)
        })?;
    }
    Ok(Exit::Ok)
}

/// The per-table report: rows, seconds, rows/s, and a note.
pub fn render(r: &Report, rejects: &crate::reject::Rejects) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:>12} {:>10} {:>12}  note",
        "table", "rows", "seconds", "rows/s"
    );
    for t in &r.tables {
        let note = if t.already_copied {
            "copied earlier".to_string()
        } else if t.rejected > 0 {
            format!(
                "{} rejected: {}",
                t.rejected,
                rejects
                    .path(&t.table)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<24} {:>12} {:>10.2} {:>12.0}  {note}",
            t.table, t.rows, t.seconds, t.rows_per_second
        );
        for c in &t.conversions {
            let _ = writeln!(out, "    cast {c}");
        }
    }
    if !r.left_out.is_empty() {
        let _ = writeln!(out, "\nleft out:");
        for l in &r.left_out {
            let _ = writeln!(out, "  {l}");
        }
    }
    out
}
