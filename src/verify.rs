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
//! snapshot at position P, and the target is read only once it holds
//! everything up to P: its checkpoint has reached P, or nothing of the table
//! lies between the checkpoint and P in the source's change stream (read
//! without consuming it: verify answers at once with no daemon running).
//! Chunks that still differ are compared again (a fresh snapshot, the target
//! caught up to it) up to three times, and a key is reported only if it
//! differed every time: lag alone, or a row the source changed while it was
//! read, is never reported.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::info;

use crate::error::{Error, Result};
use crate::model::TableSchema;
use crate::position::Position;
use crate::sink::{Cursor, Record, Sink};
use crate::source::{Pending, Source};

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
    /// How long to wait for the target to reach the source's position:
    /// given, also for changes nothing seems to apply; else
    /// [`DEFAULT_WAIT`] while a daemon applies them, and not at all when
    /// nothing does.
    pub wait: Option<Duration>,
    /// Rows per read from either side.
    pub batch_rows: usize,
}

/// How long verify waits for a running daemon to apply what is pending.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// How long verify watches for a daemon applying changes whose reader the
/// source cannot name (SQLite's change log) before it says nothing does.
const GRACE: Duration = Duration::from_secs(5);

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
    // A source read in pages holds changes past its snapshot position: the
    // target is compared once it holds those too.
    source.settled_position(at?).await
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

/// Waits until the target holds everything of `table` up to `position`:
/// its checkpoint has reached it, or the changes in between are none of the
/// table's. False if that did not happen within the wait; an error when
/// changes wait that nothing applies (no daemon runs) and no wait was given.
async fn wait_for_target(
    source: &Arc<dyn Source>,
    sink: &Arc<dyn Sink>,
    table: &Arc<TableSchema>,
    position: Position,
    wait: Option<Duration>,
) -> Result<bool> {
    let started = Instant::now();
    let deadline = started + wait.unwrap_or(DEFAULT_WAIT);
    let mut first_seen: Option<(Instant, Position)> = None;
    loop {
        let checkpoint = sink
            .state()
            .await?
            .and_then(|s| s.checkpoint)
            .ok_or_else(never_replicated)?;
        if checkpoint >= position {
            return Ok(true);
        }
        let unread = match source
            .pending(std::slice::from_ref(table), checkpoint, position)
            .await?
        {
            Pending::Waiting(0) => return Ok(true),
            Pending::Waiting(n) => Some((n, true)),
            Pending::Unknown(n) => Some((n, false)),
            Pending::BeingRead => None,
        };
        if let Some((n, certain)) = unread {
            // Nothing applies them: at once where the source knows that,
            // else once the checkpoint stood still for a moment.
            let (since, at) = *first_seen.get_or_insert((Instant::now(), checkpoint));
            if at != checkpoint {
                first_seen = Some((Instant::now(), checkpoint));
            } else if wait.is_none() && (certain || since.elapsed() >= GRACE) {
                return Err(Error::definite(format!(
                    "{n} change(s) of table {:?} wait in the source's change stream after the target's checkpoint {checkpoint}, \
                     and no switchyard applies them; start `switchyard run`, or pass --wait SECONDS",
                    table.name
                )));
            }
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn never_replicated() -> Error {
    Error::config(
        "the target holds no replication state: switchyard never replicated into it \
         (run `switchyard snapshot` or `switchyard run` first, or check target.url, namespace and database)",
    )
}

/// Compares every selected table.
pub async fn verify(
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    options: &Options,
) -> Result<Verdict> {
    sink.state().await?.ok_or_else(never_replicated)?;
    let discovered = source.discover().await?;
    let mut tables: Vec<Arc<TableSchema>> =
        discovered.tables.iter().cloned().map(Arc::new).collect();
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
    // Selected tables the source does not publish are not replicated at
    // all: a difference, not silence.
    if options.tables.is_empty() {
        for p in discovered
            .problems
            .iter()
            .filter(|p| p.message.contains("is not in publication"))
        {
            verdicts.push(TableVerdict {
                table: p.table.clone(),
                target: String::new(),
                source_rows: 0,
                target_rows: 0,
                chunks: 0,
                differing_chunks: 0,
                identical: false,
                differences_found: 0,
                differences: Vec::new(),
                seconds: 0.0,
                note: Some(p.message.clone()),
            });
        }
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
    if !wait_for_target(source, sink, table, at, options.wait).await? {
        note = Some(format!(
            "the target had not applied the source's position {at} after {} s (is replication running?): differences may be lag",
            options.wait.unwrap_or(DEFAULT_WAIT).as_secs()
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
        let caught_up = wait_for_target(source, sink, table, at, options.wait).await?;
        if !caught_up && note.is_none() {
            note = Some(format!(
                "the target had not applied the source's position {at} after {} s",
                options.wait.unwrap_or(DEFAULT_WAIT).as_secs()
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
