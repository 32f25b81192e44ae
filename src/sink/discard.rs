//! A sink that keeps nothing: for benchmarks (the source side's ceiling) and
//! for measuring a source without a target. It counts what it was given.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{Sink, SinkState, TableState, TableStatus};
use crate::error::Result;
use crate::model::{Change, Row, TableSchema};
use crate::position::{Durable, Position};

#[derive(Default)]
pub struct DiscardSink {
    state: Mutex<SinkState>,
    pub rows_loaded: AtomicU64,
    pub changes_applied: AtomicU64,
}

#[async_trait]
impl Sink for DiscardSink {
    async fn prepare(&self, _tables: &[Arc<TableSchema>]) -> Result<()> {
        Ok(())
    }

    async fn state(&self) -> Result<Option<SinkState>> {
        Ok(Some(self.state.lock().await.clone()))
    }

    async fn start(&self, position: Position, origin: &str) -> Result<()> {
        let mut s = self.state.lock().await;
        s.checkpoint = Some(position);
        s.origin = Some(origin.to_string());
        Ok(())
    }

    async fn forget_table(&self, name: &str) -> Result<()> {
        self.state.lock().await.tables.remove(name);
        Ok(())
    }

    async fn begin_table(&self, table: &TableSchema) -> Result<()> {
        let state = TableState {
            status: TableStatus::Copying,
            position: Position::ZERO,
            rows: 0,
            source_id: String::new(),
            shape: None,
        };
        self.state
            .lock()
            .await
            .tables
            .insert(table.name.clone(), state);
        Ok(())
    }

    async fn load(&self, _table: &TableSchema, rows: &[Row]) -> Result<u64> {
        self.rows_loaded
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(rows.len() as u64)
    }

    async fn finish_table(&self, table: &TableSchema, position: Position, rows: u64) -> Result<()> {
        let state = TableState {
            status: TableStatus::Done,
            position,
            rows,
            source_id: table.source_id.clone(),
            shape: Some(table.clone()),
        };
        self.state
            .lock()
            .await
            .tables
            .insert(table.name.clone(), state);
        Ok(())
    }

    async fn apply(&self, changes: &[Change], checkpoint: Position) -> Result<Durable> {
        self.changes_applied
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        let mut s = self.state.lock().await;
        s.checkpoint = Some(s.checkpoint.map_or(checkpoint, |c| c.max(checkpoint)));
        Ok(Durable::committed(checkpoint))
    }
}
