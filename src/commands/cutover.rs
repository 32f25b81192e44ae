//! `switchyard cutover` and `switchyard rollback`: the steps of
//! [`crate::cutover`], each with its duration, then "safe to switch" (exit
//! 0), or the step that failed with the fence lifted (exit 1). `--check`
//! answers go (0) or no-go (1) with the reasons.

use std::path::Path;
use std::time::Duration;

use super::Exit;
use crate::cutover::{Direction, Options, Outcome};
use crate::error::{Error, Result};

/// Parses a duration: `500ms`, `1s`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (500ms, 1s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(config: &Path, direction: Direction, opts: Options, json: bool) -> Result<Exit> {
    let config = super::load(config)?;
    let cancel = super::cancel_on_signal();
    let out = crate::cutover::run(config, direction, &opts, cancel).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out)
                .map_err(|e| Error::definite("cannot encode the report").with_source(e))?
        );
    } else {
        print!("{}", render(&out, opts.check));
    }
    Ok(if opts.check {
        if out.go {
            Exit::Ok
        } else {
            Exit::Problem
        }
    } else if out.switched {
        Exit::Ok
    } else {
        Exit::Problem
    })
}

/// The report as text.
pub fn render(out: &Outcome, check: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let what = match out.direction {
        Direction::Forward => "cutover",
        Direction::Rollback => "rollback",
    };
    for step in &out.steps {
        let _ = writeln!(
            s,
            "{:<26} {:>7} ms  {}",
            step.step,
            step.ms,
            if step.ok { "ok" } else { "FAILED" }
        );
        for d in &step.detail {
            let _ = writeln!(s, "    {d}");
        }
    }
    if check {
        if out.go {
            let _ = writeln!(s, "go: safe to start the {what}");
        } else {
            let _ = writeln!(s, "no-go:");
            for r in &out.reasons {
                let _ = writeln!(s, "  - {r}");
            }
        }
        return s;
    }
    if out.switched {
        let _ = writeln!(
            s,
            "safe to switch ({}): write freeze {} ms{}",
            out.id,
            out.freeze_ms.unwrap_or(0),
            out.lag_ms
                .map(|l| format!(", lag at the fence {l} ms"))
                .unwrap_or_default()
        );
        for r in &out.reasons {
            let _ = writeln!(s, "  ({r})");
        }
        if let Some(r) = &out.reverse {
            let _ = writeln!(s, "reverse replica: {r}");
        }
    } else if !out.go {
        let _ = writeln!(s, "no-go: nothing was fenced");
        for r in &out.reasons {
            let _ = writeln!(s, "  - {r}");
        }
    } else {
        let fenced = out.steps.iter().any(|st| st.step == "fence");
        let _ = writeln!(
            s,
            "{what} failed: {}; {}",
            out.error.as_deref().unwrap_or("?"),
            if fenced {
                "the fence is lifted and the source takes writes"
            } else {
                "nothing was fenced"
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
