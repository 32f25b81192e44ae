//! Rows whose values do not fit the target: stop, or set them aside.
//!
//! By default a value that cannot be carried (a SQLite TEXT in an INTEGER
//! column, a decimal past the target's precision, a NUL character in text)
//! stops the run with the table, key, column and value. With
//! `pipeline.reject_dir` set, such a row is written to `<dir>/<table>.jsonl`
//! instead — one JSON object per line, synced to disk before the batch that
//! skips it commits — and counted; the target then holds every source row
//! but the rejected ones (an update whose new values are rejected removes the
//! row's old version from the target).
//!
//! A batch replayed after a crash may write its rejects a second time; the
//! lines carry the change's position, so repeats are recognisable.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use crate::model::Value;

/// One rejected row, as written to its table's reject file.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rejected {
    /// The source table.
    pub table: String,
    /// The row's key as `col=value, …`.
    pub key: String,
    /// The column whose value does not fit, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// The value, as shown in error messages (long texts cut).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Why it does not fit.
    pub reason: String,
    /// Where: `snapshot` or `stream` (`verify` counts without writing).
    pub phase: &'static str,
    /// The change's position in the source: a streamed change's, or the
    /// snapshot position of a row the source's conversion refused while
    /// copying; empty for a copied row the target refused.
    pub position: String,
    /// The whole row as the source holds it, column by column.
    pub row: serde_json::Map<String, serde_json::Value>,
}

/// The reject files of one run, and how many rows went to each.
#[derive(Debug, Default)]
pub struct Rejects {
    dir: Option<PathBuf>,
    /// Count rejected rows without writing them (`verify`, which reads the
    /// source again and must not add to the files).
    count_only: bool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    files: HashMap<String, std::fs::File>,
    counts: BTreeMap<String, u64>,
}

impl Rejects {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            count_only: false,
            inner: Mutex::default(),
        }
    }

    /// Rows that do not fit are skipped and counted, and no file is written:
    /// for reading the source again (`verify`) where the run sets rows aside.
    pub fn count_only() -> Self {
        Self {
            dir: None,
            count_only: true,
            inner: Mutex::default(),
        }
    }

    /// Whether rows that do not fit are set aside (else they stop the run).
    pub fn enabled(&self) -> bool {
        self.dir.is_some() || self.count_only
    }

    /// The reject file of a source table.
    pub fn path(&self, table: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(file_name(table)))
    }

    /// Appends a rejected row to its table's file and syncs it, then counts it.
    pub fn record(&self, r: &Rejected) -> Result<()> {
        if self.count_only {
            let mut inner = self.inner.lock().expect("reject state poisoned");
            *inner.counts.entry(r.table.clone()).or_default() += 1;
            return Ok(());
        }
        let Some(path) = self.path(&r.table) else {
            return Err(Error::definite("no reject directory is configured"));
        };
        let io = |e: std::io::Error| {
            Error::definite(format!(
                "cannot write the reject file {} (pipeline.reject_dir)",
                path.display()
            ))
            .with_source(e)
        };
        let mut line = serde_json::to_vec(r)
            .map_err(|e| Error::definite("cannot encode a rejected row").with_source(e))?;
        line.push(b'\n');
        let mut inner = self.inner.lock().expect("reject state poisoned");
        if !inner.files.contains_key(&r.table) {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            // The file's name survives a crash too.
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
            }
            inner.files.insert(r.table.clone(), f);
        }
        let f = inner.files.get_mut(&r.table).expect("opened above");
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)?;
        *inner.counts.entry(r.table.clone()).or_default() += 1;
        metrics::counter!(crate::metric::ROWS_REJECTED, "table" => r.table.clone()).increment(1);
        tracing::warn!(
            table = %r.table,
            key = %r.key,
            column = r.column.as_deref().unwrap_or(""),
            file = %path.display(),
            "row rejected: {}",
            r.reason
        );
        Ok(())
    }

    /// Rows of `table` rejected in this run.
    pub fn count(&self, table: &str) -> u64 {
        let inner = self.inner.lock().expect("reject state poisoned");
        inner.counts.get(table).copied().unwrap_or(0)
    }

    /// Rows rejected in this run, by table.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.inner
            .lock()
            .expect("reject state poisoned")
            .counts
            .clone()
    }
}

/// A file name for a table name: characters other than letters, digits, `_`,
/// `-` and `.` become `_` (a schema-qualified `app.users` stays as it is).
fn file_name(table: &str) -> String {
    let safe: String = table
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let safe = safe.trim_start_matches('.');
    format!("{}.jsonl", if safe.is_empty() { "_" } else { safe })
}

/// A model value as JSON for a reject file: numbers as numbers, decimals and
/// timestamps as text, bytes as `\x…` hex.
pub fn value_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null | Value::Unchanged => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::Float(x) => serde_json::Number::from_f64(*x)
            .map(J::Number)
            .unwrap_or_else(|| J::String(format!("{x:?}"))),
        Value::Decimal(d) => J::String(d.clone()),
        Value::Text(s) => J::String(s.clone()),
        Value::Bytes(b) => J::String(crate::model::hex_text(b)),
        Value::Json(j) => serde_json::from_str(j).unwrap_or_else(|_| J::String(j.clone())),
        #[cfg(feature = "surrealdb")]
        Value::Native(n) => {
            serde_json::from_str(&n.json).unwrap_or_else(|_| J::String(n.json.clone()))
        }
        Value::Timestamp(t) => J::String(t.to_rfc3339()),
    }
}

/// A row's values by column name, for a reject file.
pub fn row_json(
    columns: &[crate::model::Column],
    row: &[Value],
) -> serde_json::Map<String, serde_json::Value> {
    columns
        .iter()
        .zip(row)
        .map(|(c, v)| (c.name.clone(), value_json(v)))
        .collect()
}

/// Creates the reject directory at start, so that a path that cannot be
/// written fails before anything is copied.
pub fn prepare(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::config(format!(
            "pipeline.reject_dir: cannot create {}",
            dir.display()
        ))
        .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("orders"), "orders.jsonl");
        assert_eq!(file_name("app.users"), "app.users.jsonl");
        assert_eq!(file_name("../etc/passwd"), "_etc_passwd.jsonl");
        assert_eq!(file_name("a b/c"), "a_b_c.jsonl");
    }

    #[test]
    fn records_are_appended_synced_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let rejects = Rejects::new(Some(dir.path().join("rejects")));
        assert!(rejects.enabled());
        let r = Rejected {
            table: "t".into(),
            key: "id=1".into(),
            column: Some("n".into()),
            value: Some("\"abc\"".into()),
            reason: "not an integer".into(),
            phase: "snapshot",
            position: "7".into(),
            row: row_json(&[], &[]),
        };
        rejects.record(&r).unwrap();
        rejects.record(&r).unwrap();
        assert_eq!(rejects.count("t"), 2);
        assert_eq!(rejects.count("u"), 0);
        let text = std::fs::read_to_string(rejects.path("t").unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["column"], "n");
        assert_eq!(lines[0]["key"], "id=1");
        assert!(!Rejects::default().enabled());
        assert!(Rejects::default().record(&r).is_err());
        let counting = Rejects::count_only();
        counting.record(&r).unwrap();
        assert!(counting.enabled() && counting.path("t").is_none());
        assert_eq!(counting.count("t"), 1);
    }
}
