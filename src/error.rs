//! The library's one error type.
//!
//! Every error has a [`ErrorKind`] that says what the pipeline may do about it:
//! retry a transient error with backoff, stop on a definite one and tell the
//! operator what to do. Messages carry their context (table, column, key,
//! position) and never a secret.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;
type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What the caller may do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The configuration is invalid; nothing was started.
    Config,
    /// A server or file could not be reached or opened.
    Connect,
    /// A passing failure (a locked file, a dropped connection): retry with backoff.
    Transient,
    /// The change or schema cannot be applied as it is: stop, and fix the cause.
    Definite,
    /// The run was stopped by a signal before it finished.
    Interrupted,
}

#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<BoxError>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }

    pub fn definite(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Definite, message)
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    pub fn connect(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Connect, message)
    }

    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Adds context in front of the message, keeping kind and source.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The message followed by every cause, `: `-separated, for logs.
    pub fn report(&self) -> String {
        let mut out = self.message.clone();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        out
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        let kind = if sqlite_is_transient(&e) {
            ErrorKind::Transient
        } else {
            ErrorKind::Definite
        };
        Error::new(kind, "sqlite").with_source(e)
    }
}

/// SQLITE_BUSY (5) and SQLITE_LOCKED (6), and their extended codes, are retried;
/// so are pool time-outs and I/O hiccups.
fn sqlite_is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .map(|c| matches!(c & 0xff, 5 | 6))
            .unwrap_or(false),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}
