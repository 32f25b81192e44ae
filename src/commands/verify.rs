//! `switchyard verify`: compare source and target and print the verdict;
//! exit 0 identical, 1 different, 2 could not run. Reads only.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::Exit;
use crate::error::Result;
use crate::reject::Rejects;
use crate::source::Access;
use crate::verify::{DifferenceKind, Options, Verdict};

pub async fn run(
    config: &Path,
    tables: Vec<String>,
    json: bool,
    wait: Option<u64>,
) -> Result<Exit> {
    let config = super::load(config)?;
    if !config.tenants.is_empty() {
        let verdicts = super::per_tenant(
            &config,
            json,
            |name, _| format!("tenant {name}:"),
            render,
            |c| {
                let tables = tables.clone();
                async move { verdict(&c, tables, wait).await }
            },
        )
        .await?;
        return Ok(if verdicts.iter().all(|v| v.identical) {
            Exit::Ok
        } else {
            Exit::Problem
        });
    }
    let verdict = verdict(&config, tables, wait).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&verdict).unwrap_or_else(|_| "{}".into())
        );
    } else {
        print!("{}", render(&verdict));
    }
    Ok(if verdict.identical {
        Exit::Ok
    } else {
        Exit::Problem
    })
}

/// The verdict for one source and target.
async fn verdict(
    config: &crate::config::Config,
    tables: Vec<String>,
    wait: Option<u64>,
) -> Result<Verdict> {
    // Rows the run sets aside are not expected in the target; reading the
    // source again adds nothing to the reject files.
    let rejects = Arc::new(if config.pipeline.reject_dir.is_some() {
        Rejects::count_only()
    } else {
        Rejects::default()
    });
    let source = crate::connect::source(config, rejects.clone(), Access::ReadOnly).await?;
    let Some(sink) = crate::connect::existing_sink(config, rejects).await? else {
        return Err(crate::Error::config(format!(
            "the target {} does not exist: switchyard never replicated into it (run `switchyard snapshot` or `switchyard run` first)",
            crate::redact::redact_url(&config.target.url)
        )));
    };
    let options = Options {
        tables,
        wait: wait.map(Duration::from_secs),
        batch_rows: config.pipeline.snapshot_batch_rows,
    };
    crate::verify::verify(Arc::from(source), Arc::from(sink), &options).await
}

/// The text `switchyard verify` prints.
pub fn render(verdict: &Verdict) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<32} {:>10} {:>10} {:>8} {:>10}  verdict",
        "table", "source", "target", "chunks", "differing"
    );
    for t in &verdict.tables {
        let _ = writeln!(
            s,
            "{:<32} {:>10} {:>10} {:>8} {:>10}  {}",
            t.table,
            t.source_rows,
            t.target_rows,
            t.chunks,
            t.differing_chunks,
            if t.identical {
                "identical".to_string()
            } else if t.differences_found == 0 {
                "not replicated".to_string()
            } else {
                format!("{} differences", t.differences_found)
            }
        );
        if let Some(n) = &t.note {
            let _ = writeln!(s, "  note: {n}");
        }
        for d in &t.differences {
            let what = match d.kind {
                DifferenceKind::Missing => "missing in the target",
                DifferenceKind::Extra => "extra in the target",
                DifferenceKind::Different => "different",
            };
            let _ = writeln!(s, "  {what}: {}", d.key);
            if let Some(v) = &d.source {
                let _ = writeln!(s, "    source: {}", cut(v));
            }
            if let Some(v) = &d.target {
                let _ = writeln!(s, "    target: {}", cut(v));
            }
        }
        if t.differences_found > t.differences.len() {
            let _ = writeln!(
                s,
                "  … and {} more",
                t.differences_found - t.differences.len()
            );
        }
    }
    let _ = writeln!(
        s,
        "{}",
        if verdict.identical {
            "identical"
        } else {
            "DIFFERENT"
        }
    );
    s
}

fn cut(s: &str) -> String {
    if s.chars().count() > 300 {
        format!(
            "{}… ({} bytes)",
            s.chars().take(300).collect::<String>(),
            s.len()
        )
    } else {
        s.to_string()
    }
}
