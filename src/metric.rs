//! The names of the metrics the daemon exports, one prefix (`switchyard_`),
//! units in the name (Prometheus conventions). The deploy/ files use them,
//! and a test checks that every name they use is one of these.

pub const PHASE: &str = "switchyard_phase";
pub const LAG_BYTES: &str = "switchyard_lag_bytes";
pub const LAG_SECONDS: &str = "switchyard_lag_seconds";
pub const SLOT_RETAINED_BYTES: &str = "switchyard_slot_retained_bytes";
pub const CHANGES_APPLIED: &str = "switchyard_changes_applied_total";
pub const TRANSACTIONS_APPLIED: &str = "switchyard_transactions_applied_total";
pub const BATCH_CHANGES: &str = "switchyard_batch_changes";
pub const APPLY_DURATION: &str = "switchyard_apply_duration_seconds";
pub const SNAPSHOT_ROWS: &str = "switchyard_snapshot_rows_total";
pub const SNAPSHOT_PROGRESS: &str = "switchyard_snapshot_progress_ratio";
pub const RETRIES: &str = "switchyard_retries_total";
pub const ERRORS: &str = "switchyard_errors_total";
pub const CONNECTION_UP: &str = "switchyard_connection_up";
pub const CHECKPOINT: &str = "switchyard_checkpoint_position";
/// Rows set aside in `pipeline.reject_dir`, by table.
pub const ROWS_REJECTED: &str = "switchyard_rows_rejected_total";

pub const ALL: [&str; 15] = [
    PHASE,
    LAG_BYTES,
    LAG_SECONDS,
    SLOT_RETAINED_BYTES,
    CHANGES_APPLIED,
    TRANSACTIONS_APPLIED,
    BATCH_CHANGES,
    APPLY_DURATION,
    SNAPSHOT_ROWS,
    SNAPSHOT_PROGRESS,
    RETRIES,
    ERRORS,
    CONNECTION_UP,
    CHECKPOINT,
    ROWS_REJECTED,
];

/// The `kind` label of an error in [`ERRORS`].
pub fn error_kind(e: &crate::error::Error) -> &'static str {
    use crate::error::ErrorKind;
    match e.kind() {
        ErrorKind::Config => "config",
        ErrorKind::Connect => "connect",
        ErrorKind::Transient => "transient",
        ErrorKind::Definite => "definite",
        ErrorKind::Interrupted => "interrupted",
    }
}
