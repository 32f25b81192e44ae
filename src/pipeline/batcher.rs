//! The batcher: what the source's stream hands over, cut into target
//! transactions. Pure: changes in, chunks out, each with the checkpoint it
//! may carry; the stream loop applies them.
//!
//! - A chunk holds at most `max` changes and ends at a source transaction
//!   boundary, unless one transaction alone is larger (invariant 4: it is
//!   applied in parts, each part's checkpoint inside the transaction).
//! - Changes of a table copied at `Ct` that are at or below `Ct` are in its
//!   copy already: they are dropped (invariant 3).
//! - Positions with nothing to apply (an idle source's keepalives, other
//!   tables' transactions) move the checkpoint at most once per `idle_every`,
//!   so that an idle source costs the target a transaction a second at most.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::model::{Change, Marker};
use crate::position::Position;
use crate::source::Batch;

/// Changes for one target transaction and the checkpoint it carries; or a
/// table to copy now (a `Ddl::Copy` marker: the stream cuts before it).
#[derive(Debug)]
pub struct Chunk {
    pub changes: Vec<Change>,
    /// A table to copy at a snapshot of its own before anything after it.
    pub copy: Option<Change>,
    pub upto: Position,
    /// When the source committed what `upto` covers, where the chunk ends
    /// at what was received.
    pub committed_at: Option<DateTime<Utc>>,
    /// Changes were received and remain after this chunk.
    pub more: bool,
    /// A marker the target records with this chunk's checkpoint (the
    /// chunk holds no changes then): everything before it is applied.
    pub marker: Option<Marker>,
}

pub struct Batcher {
    max: usize,
    idle_every: Duration,
    pending: VecDeque<Change>,
    /// The position read up to.
    upto: Position,
    committed_at: Option<DateTime<Utc>>,
    /// The position the target holds.
    applied: Position,
    /// When the checkpoint last moved.
    moved_at: Option<Instant>,
    /// Tables copied at a snapshot position after the checkpoint.
    skip: HashMap<String, Position>,
    /// Markers received, in position order.
    markers: VecDeque<(Position, Marker)>,
}

impl Batcher {
    pub fn new(
        applied: Position,
        max: usize,
        idle_every: Duration,
        skip: HashMap<String, Position>,
    ) -> Self {
        Self {
            max: max.max(1),
            idle_every,
            pending: VecDeque::new(),
            upto: applied,
            committed_at: None,
            applied,
            moved_at: None,
            skip,
            markers: VecDeque::new(),
        }
    }

    /// Adds what the stream sent.
    pub fn push(&mut self, batch: Batch) {
        self.pending.extend(batch.changes);
        self.markers.extend(batch.markers);
        self.upto = self.upto.max(batch.upto);
        if batch.committed_at.is_some() {
            self.committed_at = batch.committed_at;
        }
    }

    /// A table copied at `at` while streaming: its changes at or below `at`
    /// are in the copy.
    pub fn copied(&mut self, table: &str, at: Position) {
        self.skip.insert(table.to_string(), at);
    }

    /// Changes (and markers) waiting.
    pub fn waiting(&self) -> usize {
        self.pending.len() + self.markers.len()
    }

    /// As many changes wait as one chunk holds.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.max
    }

    /// The next chunk to apply at `now`: changes, or a move of the
    /// checkpoint alone once it is due (at once with `flush`).
    pub fn next(&mut self, now: Instant, flush: bool) -> Option<Chunk> {
        // A marker goes as soon as every change before it is applied.
        if let Some((at, _)) = self.markers.front() {
            if self.pending.front().is_none_or(|c| c.position > *at) {
                let (at, marker) = self.markers.pop_front().expect("just seen");
                self.moved_at = Some(now);
                return Some(Chunk {
                    changes: Vec::new(),
                    copy: None,
                    upto: at.max(self.applied),
                    committed_at: None,
                    more: !self.pending.is_empty(),
                    marker: Some(marker),
                });
            }
        }
        if self.pending.is_empty() {
            if self.upto <= self.applied {
                return None;
            }
            if !flush && self.moved_at.is_some_and(|t| t + self.idle_every > now) {
                return None;
            }
            self.moved_at = Some(now);
            return Some(Chunk {
                changes: Vec::new(),
                copy: None,
                upto: self.upto,
                committed_at: self.committed_at,
                more: false,
                marker: None,
            });
        }
        if is_copy(&self.pending[0]) {
            let marker = self.pending.pop_front().expect("not empty");
            let skipped = self
                .skip
                .get(&marker.table.name)
                .is_some_and(|ct| marker.position <= *ct);
            return Some(Chunk {
                changes: Vec::new(),
                upto: self.applied,
                committed_at: None,
                more: !self.pending.is_empty(),
                copy: (!skipped).then_some(marker),
                marker: None,
            });
        }
        let n = self.cut_point();
        let chunk: Vec<Change> = self.pending.drain(..n).collect();
        let (upto, committed_at) = if self.pending.is_empty() && self.markers.is_empty() && n > 0 {
            (self.upto, self.committed_at)
        } else {
            (
                chunk.last().map(|c| c.position).unwrap_or(self.applied),
                None,
            )
        };
        let changes = chunk
            .into_iter()
            .filter(|c| {
                self.skip
                    .get(&c.table.name)
                    .is_none_or(|ct| c.position > *ct)
            })
            .collect();
        self.moved_at = Some(now);
        Some(Chunk {
            changes,
            copy: None,
            upto,
            committed_at,
            more: !self.pending.is_empty() || !self.markers.is_empty(),
            marker: None,
        })
    }

    /// When a move of the checkpoint alone becomes due, if one waits.
    pub fn due(&self) -> Option<Instant> {
        if !self.markers.is_empty() {
            return Some(Instant::now());
        }
        if !self.pending.is_empty() || self.upto <= self.applied {
            return None;
        }
        Some(match self.moved_at {
            Some(t) => t + self.idle_every,
            None => Instant::now(),
        })
    }

    /// The target committed a chunk up to `at`.
    pub fn applied(&mut self, at: Position) {
        self.applied = self.applied.max(at);
    }

    /// How many of the pending changes go into the next chunk: all of them
    /// if they fit, else up to the last transaction boundary within `max`;
    /// a transaction larger than `max` alone is split. Never past a table
    /// to copy.
    fn cut_point(&self) -> usize {
        let p = &self.pending;
        let marker = self.markers.front().map(|(at, _)| *at);
        let copy = p
            .iter()
            .position(|c| is_copy(c) || marker.is_some_and(|at| c.position > at))
            .unwrap_or(p.len());
        if copy <= self.max {
            return copy;
        }
        (1..=self.max)
            .rev()
            .find(|&i| p[i - 1].position.commit != p[i].position.commit)
            .unwrap_or(self.max)
    }
}

fn is_copy(c: &Change) -> bool {
    matches!(c.op, crate::model::Op::Ddl(crate::model::Ddl::Copy { .. }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Column, LogicalType, Op, TableSchema, Value};

    fn table(name: &str) -> Arc<TableSchema> {
        Arc::new(TableSchema::keyed(
            name.into(),
            name.into(),
            vec![Column {
                name: "id".into(),
                source_type: "int".into(),
                logical: LogicalType::Int,
                nullable: false,
            }],
            vec![0],
        ))
    }

    /// Changes of table `t` at the given commits, numbered within each.
    fn batch(commits: &[u64], upto: Position) -> Batch {
        let t = table("t");
        let mut ordinal = 0;
        let changes = commits
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                ordinal = if i > 0 && commits[i - 1] == c {
                    ordinal + 1
                } else {
                    1
                };
                Change {
                    table: t.clone(),
                    op: Op::Insert {
                        row: vec![Value::Int(i as i64)],
                    },
                    position: Position::new(c, ordinal),
                }
            })
            .collect();
        Batch {
            changes,
            upto,
            committed_at: None,
            markers: Vec::new(),
        }
    }

    fn sizes(b: &mut Batcher) -> Vec<(usize, Position)> {
        let now = Instant::now();
        std::iter::from_fn(|| b.next(now, false))
            .map(|c| (c.changes.len(), c.upto))
            .collect()
    }

    fn whole(c: u64) -> Position {
        Position::new(c, Position::WHOLE)
    }

    #[test]
    fn chunks_end_at_transaction_boundaries() {
        let idle = Duration::from_secs(1);
        let mut b = Batcher::new(Position::ZERO, 3, idle, HashMap::new());
        b.push(batch(&[1, 1, 2], whole(2)));
        assert_eq!(sizes(&mut b), vec![(3, whole(2))]);
        // A small transaction is never split across two target transactions.
        let mut b = Batcher::new(Position::ZERO, 3, idle, HashMap::new());
        b.push(batch(&[1, 2, 2, 2], whole(2)));
        assert_eq!(sizes(&mut b), vec![(1, Position::new(1, 1)), (3, whole(2))]);
        // A transaction larger than a chunk is split, each part's checkpoint
        // inside it.
        let mut b = Batcher::new(Position::ZERO, 2, idle, HashMap::new());
        b.push(batch(&[5, 5, 5, 5, 5], whole(5)));
        assert_eq!(
            sizes(&mut b),
            vec![
                (2, Position::new(5, 2)),
                (2, Position::new(5, 4)),
                (1, whole(5))
            ]
        );
        // Sources without transactions (SQLite): every change is a boundary.
        let mut b = Batcher::new(Position::ZERO, 3, idle, HashMap::new());
        b.push(batch(&[1, 2, 3, 4], Position::new(4, 0)));
        assert_eq!(
            sizes(&mut b),
            vec![(3, Position::new(3, 1)), (1, Position::new(4, 0))]
        );
    }

    #[test]
    fn a_marker_goes_alone_after_every_change_before_it_and_at_once() {
        let idle = Duration::from_secs(1);
        let mut b = Batcher::new(whole(1), 10, idle, HashMap::new());
        let t0 = Instant::now();
        // An idle checkpoint just moved: a marker does not wait for the interval.
        b.push(batch(&[], whole(2)));
        let idle = b.next(t0, false).unwrap().upto;
        b.applied(idle);
        let mut with_marker = batch(&[3, 3, 5], whole(5));
        let m = Marker {
            id: "m1".into(),
            stop: false,
        };
        with_marker.markers.push((Position::new(4, 1), m.clone()));
        b.push(with_marker);
        assert!(b.due().is_some_and(|d| d <= Instant::now()));
        let first = b.next(t0, false).unwrap();
        assert_eq!(
            (first.changes.len(), first.upto, first.marker.is_none()),
            (2, Position::new(3, 2), true)
        );
        b.applied(first.upto);
        let marker = b.next(t0, false).unwrap();
        assert_eq!(
            (marker.changes.len(), marker.upto),
            (0, Position::new(4, 1))
        );
        assert_eq!(marker.marker, Some(m));
        assert!(marker.more);
        b.applied(marker.upto);
        let last = b.next(t0, false).unwrap();
        assert_eq!(
            (last.changes.len(), last.upto, last.marker),
            (1, whole(5), None)
        );
    }

    #[test]
    fn changes_inside_a_tables_copy_are_dropped() {
        let mut skip = HashMap::new();
        skip.insert("t".to_string(), whole(2));
        let mut b = Batcher::new(Position::ZERO, 10, Duration::from_secs(1), skip);
        b.push(batch(&[1, 2, 3], whole(3)));
        let c = b.next(Instant::now(), false).unwrap();
        assert_eq!(c.changes.len(), 1);
        assert_eq!(c.changes[0].position, Position::new(3, 1));
        assert_eq!(c.upto, whole(3));
    }

    #[test]
    fn an_idle_checkpoint_moves_at_most_once_per_interval() {
        let idle = Duration::from_secs(1);
        let mut b = Batcher::new(whole(1), 10, idle, HashMap::new());
        let t0 = Instant::now();
        // Nothing received: nothing to do.
        assert!(b.next(t0, false).is_none() && b.due().is_none());
        b.push(batch(&[], whole(2)));
        let c = b.next(t0, false).unwrap();
        assert!(c.changes.is_empty() && c.upto == whole(2));
        b.applied(c.upto);
        // Keepalives keep coming: the next move waits for the interval.
        b.push(batch(&[], whole(3)));
        assert!(b.next(t0 + Duration::from_millis(10), false).is_none());
        assert_eq!(b.due(), Some(t0 + idle));
        assert_eq!(b.next(t0 + idle, false).unwrap().upto, whole(3));
        // On the way out everything received is recorded at once.
        b.push(batch(&[], whole(4)));
        assert!(b.next(t0 + idle, false).is_none());
        assert_eq!(b.next(t0 + idle, true).unwrap().upto, whole(4));
        // Changes never wait for the interval.
        b.push(batch(&[5], whole(5)));
        let c = b.next(t0 + idle, false).unwrap();
        assert_eq!((c.changes.len(), c.upto, c.more), (1, whole(5), false));
    }
}
