//! `switchyard verify`: are source and target identical?
//!
//! Per table, every source row is turned into the record the target should
//! hold (through the sink's own mapping) and every target record is read
//! back; both sides are encoded canonically (the target's literal syntax).
//! Records are spread over chunks by a hash of their key, and each chunk's
//! row count and order-independent checksum (the wrapping sum of 128-bit row
//! digests) is compared. A chunk that differs is narrowed to its keys:
//! missing, extra or different, with both values.
//!
//! Verify runs while replication runs: the source is read in a consistent
//! snapshot at position P, and the target is read only once its checkpoint
//! has reached P. Chunks that still differ are compared again (a fresh
//! snapshot, the target caught up to it) up to three times, and a key is
//! reported only if it differed every time: lag alone, or a row the source
//! changed while it was read, is never reported.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::info;

use crate::error::{Error, Result};
use crate::model::{Position, TableSchema};
use crate::sink::Sink;
use crate::source::Source;

/// How a target record differs from the source.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// In the source, not in the target.
    Missing,
    /// In the target, not in the source.
    Extra,
    /// In both, with other values.
    Different,
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub kind: DifferenceKind,
    /// The record's key as the target writes it.
    pub key: String,
    pub source: Option<String>,
    pub target: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableVerdict {
    pub table: String,
    pub target: String,
    pub source_rows: u64,
    pub target_rows: u64,
    pub chunks: usize,
    pub differing_chunks: usize,
    pub identical: bool,
    /// Every difference found (at most [`MAX_LISTED`] are listed).
    pub differences_found: usize,
    pub differences: Vec<Difference>,
    pub seconds: f64,
    /// Why the verdict may be incomplete (the target never caught up).
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub identical: bool,
    pub tables: Vec<TableVerdict>,
}

/// Differences listed per table; the rest are counted.
pub const MAX_LISTED: usize = 100;

/// Options of a verify run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only these source tables (all replicated ones when empty).
    pub tables: Vec<String>,
    /// How long to wait for the target to reach the source's position.
    pub wait: Duration,
    /// Rows per read from either side.
    pub batch_rows: usize,
}

/// One record: its key and its canonical encoding.
pub type Record = (String, String);

fn digest(record: &Record) -> (u64, u128) {
    let mut h = Sha256::new();
    h.update(record.0.as_bytes());
    let key = h.clone().finalize();
    h.update([0u8]);
    h.update(record.1.as_bytes());
    let row = h.finalize();
    let bucket = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
    let sum = u128::from_be_bytes(row[..16].try_into().expect("16 bytes"));
    (bucket, sum)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Chunk {
    rows: u64,
    sum: u128,
}

fn add(chunks: &mut [Chunk], record: &Record) {
    let (bucket, sum) = digest(record);
    let c = &mut chunks[(bucket % chunks.len() as u64) as usize];
    c.rows += 1;
    c.sum = c.sum.wrapping_add(sum);
}

fn chunk_of(record: &Record, n: usize) -> usize {
    (digest(record).0 % n as u64) as usize
}

/// Reads the source rows of `table` in a consistent snapshot, as the records
/// the target should hold; calls `each` for every one. Returns the position
/// the snapshot was read at.
async fn read_source(
    source: &Arc<dyn Source>,
    sink: &Arc<dyn Sink>,
    table: &Arc<TableSchema>,
    batch_rows: usize,
    mut each: impl FnMut(Record),
) -> Result<Position> {
    let (tx, mut rx) = mpsc::channel(4);
    let s = source.clone();
    let t = table.clone();
    let reader = tokio::spawn(async move { s.snapshot(t, batch_rows, tx).await });
    while let Some(rows) = rx.recv().await {
        for r in sink.expected_records(table, &rows).await? {
            each(r);
        }
    }
    let at = match reader.await {
        Ok(r) => r,
        Err(e) => Err(Error::definite(format!(
            "reading {:?} for verify failed: {e}",
            table.name
        ))),
    };
    source.release_snapshot().await;
    at
}

/// Reads the target's records in key order, a page at a time after the
/// last key read: records written meanwhile neither shift nor repeat others.
async fn read_target(
    sink: &Arc<dyn Sink>,
    table: &TableSchema,
    batch_rows: usize,
    mut each: impl FnMut(Record),
) -> Result<()> {
    let mut after: Option<Cursor> = None;
    loop {
        let page = sink.records(table, after.as_ref(), batch_rows).await?;
        let n = page.stored;
        for r in page.records {
            each(r);
        }
        if n < batch_rows || page.next.is_none() {
            return Ok(());
        }
        after = page.next;
    }
}

/// Waits until the target's checkpoint has reached `position`; false if it
/// did not within `wait`.
async fn wait_for_target(sink: &Arc<dyn Sink>, position: Position, wait: Duration) -> Result<bool> {
    let deadline = Instant::now() + wait;
    loop {
        if sink
            .state()
            .await?
            .checkpoint
            .is_some_and(|c| c >= position)
        {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Compares every selected table.
pub async fn verify(
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    options: &Options,
) -> Result<Verdict> {
    let discovered = source.discover().await?;
    let mut tables: Vec<Arc<TableSchema>> = discovered.tables.into_iter().map(Arc::new).collect();
    if !options.tables.is_empty() {
        for want in &options.tables {
            if !tables.iter().any(|t| &t.name == want) {
                return Err(Error::config(format!(
                    "--tables: {want:?} is not a replicated table of the source"
                )));
            }
        }
        tables.retain(|t| options.tables.contains(&t.name));
    }
    let mut verdicts = Vec::new();
    for table in &tables {
        verdicts.push(verify_table(&source, &sink, table, options).await?);
    }
    Ok(Verdict {
        identical: verdicts.iter().all(|v| v.identical),
        tables: verdicts,
    })
}

async fn verify_table(
    source: &Arc<dyn Source>,
    sink: &Arc<dyn Sink>,
    table: &Arc<TableSchema>,
    options: &Options,
) -> Result<TableVerdict> {
    let started = Instant::now();
    let estimate = source.count_rows(table).await.ok().flatten().unwrap_or(0);
    let n = ((estimate / 2_000) as usize).clamp(16, 4_096);
    let mut src = vec![Chunk::default(); n];
    let at = read_source(source, sink, table, options.batch_rows, |r| {
        add(&mut src, &r)
    })
    .await?;
    let mut note = None;
    if !wait_for_target(sink, at, options.wait).await? {
        note = Some(format!(
            "the target had not applied the source's position {at} after {} s (is replication running?): differences may be lag",
            options.wait.as_secs()
        ));
    }
    let mut tgt = vec![Chunk::default(); n];
    read_target(sink, table, options.batch_rows, |r| add(&mut tgt, &r)).await?;
    let source_rows = src.iter().map(|c| c.rows).sum();
    let target_rows = tgt.iter().map(|c| c.rows).sum();
    let mut differing: Vec<usize> = (0..n).filter(|&i| src[i] != tgt[i]).collect();
    let differing_chunks = differing.len();
    let mut differences = Vec::new();
    // Keys that differed in every round so far: a row the source changes
    // while verify reads may differ once (the target already applied a later
    // change), a real difference differs every time.
    let mut persistent: Option<std::collections::HashSet<String>> = None;
    // Narrow the differing chunks to keys, again in a fresh snapshot with the
    // target caught up to it; what still differs after three rounds is real.
    for round in 1..=3 {
        if differing.is_empty() {
            differences.clear();
            break;
        }
        let wanted: std::collections::HashSet<usize> = differing.iter().copied().collect();
        let mut s_rows: HashMap<String, Vec<String>> = HashMap::new();
        let at = read_source(source, sink, table, options.batch_rows, |r| {
            if wanted.contains(&chunk_of(&r, n)) {
                s_rows.entry(r.0).or_default().push(r.1);
            }
        })
        .await?;
        let caught_up = wait_for_target(sink, at, options.wait).await?;
        if !caught_up && note.is_none() {
            note = Some(format!(
                "the target had not applied the source's position {at} after {} s",
                options.wait.as_secs()
            ));
        }
        let mut t_rows: HashMap<String, Vec<String>> = HashMap::new();
        read_target(sink, table, options.batch_rows, |r| {
            if wanted.contains(&chunk_of(&r, n)) {
                t_rows.entry(r.0).or_default().push(r.1);
            }
        })
        .await?;
        differences = diff(s_rows, t_rows);
        let keys: std::collections::HashSet<String> =
            differences.iter().map(|d| d.key.clone()).collect();
        let keep = match persistent.take() {
            Some(before) => before.intersection(&keys).cloned().collect(),
            None => keys,
        };
        differences.retain(|d| keep.contains(&d.key));
        persistent = Some(keep);
        let still: std::collections::HashSet<usize> = differences
            .iter()
            .map(|d| chunk_of(&(d.key.clone(), String::new()), n))
            .collect();
        differing.retain(|c| still.contains(c));
        info!(table = %table.name, round, differences = differences.len(), "verify: narrowed the differing chunks");
        if differences.is_empty() || !caught_up {
            break;
        }
    }
    let found = differences.len();
    differences.truncate(MAX_LISTED);
    Ok(TableVerdict {
        table: table.name.clone(),
        target: table.target_name.clone(),
        source_rows,
        target_rows,
        chunks: n,
        differing_chunks,
        identical: found == 0,
        differences_found: found,
        differences,
        seconds: started.elapsed().as_secs_f64(),
        note,
    })
}

/// The differences between two sets of records (several values under one
/// key: identical rows of a table without a key).
fn diff(
    mut source: HashMap<String, Vec<String>>,
    mut target: HashMap<String, Vec<String>>,
) -> Vec<Difference> {
    let mut keys: Vec<String> = source.keys().chain(target.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        let mut s = source.remove(&key).unwrap_or_default();
        let mut t = target.remove(&key).unwrap_or_default();
        s.sort();
        t.sort();
        if s == t {
            continue;
        }
        let kind = match (s.is_empty(), t.is_empty()) {
            (false, true) => DifferenceKind::Missing,
            (true, false) => DifferenceKind::Extra,
            _ => DifferenceKind::Different,
        };
        let show = |v: &[String]| match v.len() {
            0 => None,
            1 => Some(v[0].clone()),
            n => Some(format!("{} ({n} copies)", v[0])),
        };
        out.push(Difference {
            kind,
            key,
            source: show(&s),
            target: show(&t),
        });
    }
    out
}

impl Verdict {
    /// The text `switchyard verify` prints.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<32} {:>10} {:>10} {:>8} {:>10}  verdict",
            "table", "source", "target", "chunks", "differing"
        );
        for t in &self.tables {
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
            if self.identical {
                "identical"
            } else {
                "DIFFERENT"
            }
        );
        s
    }
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

/// A page of target records (see [`Sink::records`]).
pub struct Page {
    pub records: Vec<Record>,
    /// Stored records read (a record counting several identical rows is one).
    pub stored: usize,
    /// Where the next page starts (the sink's own key of the last record).
    pub next: Option<Cursor>,
}

/// A sink's position in a table's key order, opaque to verify.
pub struct Cursor(pub Box<dyn std::any::Any + Send + Sync>);

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeMap;

    fn group(records: impl IntoIterator<Item = Record>) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in records {
            m.entry(k).or_default().push(v);
        }
        m
    }

    fn rec(k: &str, v: &str) -> Record {
        (k.to_string(), v.to_string())
    }

    #[test]
    fn chunk_sums_ignore_order_and_see_every_change() {
        let a = [
            rec("t:1", "{a: 1}"),
            rec("t:2", "{a: 2}"),
            rec("t:3", "{a: 3}"),
        ];
        let mut x = vec![Chunk::default(); 4];
        let mut y = vec![Chunk::default(); 4];
        for r in &a {
            add(&mut x, r);
        }
        for r in a.iter().rev() {
            add(&mut y, r);
        }
        assert_eq!(x, y);
        let mut z = vec![Chunk::default(); 4];
        for r in [
            rec("t:1", "{a: 1}"),
            rec("t:2", "{a: 20}"),
            rec("t:3", "{a: 3}"),
        ] {
            add(&mut z, &r);
        }
        assert_ne!(x, z);
    }

    #[test]
    fn differences_are_named_by_kind() {
        let s = group([
            rec("t:1", "a"),
            rec("t:2", "b"),
            rec("t:4", "d"),
            rec("t:5", "e"),
            rec("t:5", "e"),
        ]);
        let t = group([
            rec("t:1", "a"),
            rec("t:2", "B"),
            rec("t:3", "c"),
            rec("t:5", "e"),
        ]);
        let d = diff(s.into_iter().collect(), t.into_iter().collect());
        let kinds: Vec<(&str, DifferenceKind)> =
            d.iter().map(|d| (d.key.as_str(), d.kind.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                ("t:2", DifferenceKind::Different),
                ("t:3", DifferenceKind::Extra),
                ("t:4", DifferenceKind::Missing),
                ("t:5", DifferenceKind::Different)
            ]
        );
        assert_eq!(d[3].source.as_deref(), Some("e (2 copies)"));
    }
}
