//! Positions in a source's change stream, and the proof that the target has
//! committed one.
//!
//! A [`Position`] is ordered by `(commit, ordinal)`: `commit` is the commit
//! position of a transaction (a PostgreSQL commit LSN, a SQLite change-log
//! sequence number), `ordinal` a change's place inside it, so that a
//! transaction applied in chunks can be resumed in the middle. A
//! [`Durable`] can only be made by a sink after its target transaction
//! committed: the one value a source accepts as acknowledgement.

use std::fmt;

/// A position in the source's change stream.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Position {
    pub commit: u64,
    pub ordinal: u64,
}

impl Position {
    pub const ZERO: Position = Position {
        commit: 0,
        ordinal: 0,
    };
    /// The ordinal that stands for "the whole commit": after every change of it.
    /// (Within `i64`, because targets store positions as signed integers.)
    pub const WHOLE: u64 = i64::MAX as u64;

    pub fn new(commit: u64, ordinal: u64) -> Self {
        Self { commit, ordinal }
    }

    /// The position in the form users of the source know: a PostgreSQL LSN
    /// (`0/16B3748`, with the change's number inside a transaction applied
    /// in part), a change-log sequence number, a versionstamp.
    pub fn show(&self, kind: PositionKind) -> String {
        let inside = match self.ordinal {
            0 | Position::WHOLE => String::new(),
            n => format!(" (change {n} of the transaction)"),
        };
        match kind {
            PositionKind::Lsn => format!(
                "{:X}/{:X}{inside}",
                self.commit >> 32,
                self.commit & 0xFFFF_FFFF
            ),
            PositionKind::Sequence => format!("{}{inside}", self.commit),
            PositionKind::Versionstamp => format!("versionstamp {}{inside}", self.commit),
        }
    }
}

impl fmt::Display for Position {
    /// The raw form logs and state records use: `commit`, `commit.ordinal`,
    /// or `commit.end` after a whole transaction.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ordinal == 0 {
            write!(f, "{}", self.commit)
        } else if self.ordinal == Self::WHOLE {
            write!(f, "{}.end", self.commit)
        } else {
            write!(f, "{}.{}", self.commit, self.ordinal)
        }
    }
}

/// What a source's positions are, for showing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionKind {
    /// PostgreSQL: a WAL position.
    Lsn,
    /// SQLite: a change-log sequence number.
    Sequence,
    /// SurrealDB: a changefeed versionstamp.
    Versionstamp,
}

/// A position the target has committed. Only a sink creates one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable(Position);

impl Durable {
    /// For sink implementations: call only after the commit succeeded.
    pub(crate) fn committed(position: Position) -> Self {
        Durable(position)
    }

    pub fn position(&self) -> Position {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_show_in_the_sources_own_form() {
        let p = Position::new(0x2456_C6A0, Position::WHOLE);
        assert_eq!(p.show(PositionKind::Lsn), "0/2456C6A0");
        assert_eq!(p.to_string(), "609666720.end");
        let inside = Position::new((1 << 32) | 0x10, 3);
        assert_eq!(
            inside.show(PositionKind::Lsn),
            "1/10 (change 3 of the transaction)"
        );
        assert_eq!(Position::new(7, 0).show(PositionKind::Sequence), "7");
    }
}
