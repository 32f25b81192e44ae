//! The one retry policy: exponential backoff with jitter (on `backon`), from
//! 100 ms up to `pipeline.retry_max_delay_ms`, at most
//! `pipeline.retry_attempts` times, for transient errors only. Operations
//! run through [`Retry::run`]; loops that reconnect by themselves (a
//! replication stream, a change-log poller) take their waits from
//! [`Retry::backoff`].

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use tracing::warn;

use crate::error::{Error, Result};
use crate::metric;

#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts after the first, before giving up.
    pub attempts: usize,
    /// The longest wait between two attempts.
    pub max_delay: Duration,
}

impl Retry {
    pub fn new(attempts: usize, max_delay: Duration) -> Self {
        Self {
            attempts,
            max_delay,
        }
    }

    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts)
            .with_jitter()
    }

    /// The waits before each further attempt; it ends when the attempts are
    /// spent. A loop that made progress since starts a new one.
    pub fn backoff(&self) -> impl Iterator<Item = Duration> + Send {
        self.builder().build()
    }

    /// Runs `op` again on transient errors, each retry counted and logged
    /// with `what` (`switchyard_retries_total{operation}`).
    ///
    /// (`self` by value and `what` static: a future that borrows neither
    /// stays `Send` inside streams of futures, where the compiler cannot
    /// prove it for borrowed ones.)
    pub async fn run<T, F, Fut>(self, what: &'static str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        op.retry(self.builder())
            .when(|e: &Error| e.is_transient())
            .notify(|e: &Error, wait: Duration| {
                counted(what, e);
                warn!(error = %e.report(), retry_in_ms = wait.as_millis() as u64, "{what} failed, retrying")
            })
            .await
    }
}

/// Counts a retry of `operation` and its error in the metrics.
pub fn counted(operation: &str, e: &Error) {
    metrics::counter!(metric::RETRIES, "operation" => operation.to_string()).increment(1);
    metrics::counter!(metric::ERRORS, "kind" => metric::error_kind(e)).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn transient_errors_are_retried_and_definite_ones_are_not() {
        let r = Retry::new(3, Duration::from_millis(1));
        let calls = AtomicUsize::new(0);
        let out: Result<u32> = r
            .run("test", || async {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => Err(Error::transient("flaky")),
                    _ => Ok(7),
                }
            })
            .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        calls.store(0, Ordering::SeqCst);
        let out: Result<u32> = r
            .run("test", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(Error::definite("broken"))
            })
            .await;
        assert!(out.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(r.backoff().count(), 3);
    }
}
