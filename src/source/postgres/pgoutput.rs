//! Decoder for the messages of PostgreSQL's `pgoutput` logical decoding plugin
//! (protocol versions 1 and 2, including streamed in-progress transactions),
//! plus the CopyBoth wrapper messages of the streaming replication protocol:
//! XLogData ('w'), primary keepalive ('k') and standby status update ('r').
//!
//! Layouts follow the PostgreSQL 15 docs, "Logical Replication Message
//! Formats" and "Streaming Replication Protocol". Integers are big-endian and
//! strings are NUL-terminated.
//!
//! Decoding never panics on server data: every read goes through a
//! bounds-checked cursor, and truncated, malformed or unknown input comes back
//! as a [`DecodeError`]. Trailing bytes after a complete message are ignored.
//!
//! Each message type's `decode` expects the buffer to start at the message's
//! tag byte and, on success, advances it past the bytes it consumed. The
//! matching `encode` writes the tag too, so `encode` then `decode` round-trips.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// microseconds from the unix epoch (1970-01-01) to the postgres epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// marks the new tuple in insert and update messages.
pub const NEW_TUPLE_TAG: u8 = b'N';

/// tag of the standby status update message sent by the client.
pub const STANDBY_STATUS_UPDATE_TAG: u8 = b'r';

// ---------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------

/// why a message could not be decoded. offsets count bytes from the start of
/// the message (its tag byte is offset 0).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated {message} message: wanted {wanted} bytes at offset {offset}")]
    Truncated {
        message: &'static str,
        offset: usize,
        wanted: usize,
    },
    #[error("unknown message tag {tag:#04x} at offset {offset}")]
    UnknownTag { tag: u8, offset: usize },
    #[error("invalid utf-8 in {message} message at offset {offset}")]
    InvalidUtf8 {
        message: &'static str,
        offset: usize,
    },
    #[error("invalid {message} message at offset {offset}: {reason}")]
    Invalid {
        message: &'static str,
        offset: usize,
        reason: String,
    },
}

/// a WAL position (XLogRecPtr), shown as postgres does (`0/16B3748`).
pub use crate::pg::Lsn;

/// a postgres timestamptz on the wire: microseconds since 2000-01-01 utc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// microseconds since the unix epoch. saturates instead of overflowing,
    /// so postgres' +/-infinity (i64::MAX / i64::MIN) stay at the extremes.
    pub fn to_unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_OFFSET_MICROS)
    }

    /// the inverse of [`PgTimestamp::to_unix_micros`], also saturating.
    pub fn from_unix_micros(unix_micros: i64) -> Self {
        PgTimestamp(unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS))
    }
}

/// decoding context: whether the message sits inside a stream start / stream
/// stop block. there, relation, type, insert, update, delete, truncate and
/// message carry a leading xid (protocol version 2 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DecodeCtx {
    pub in_stream: bool,
}

impl DecodeCtx {
    /// outside any stream block.
    pub const TOP_LEVEL: DecodeCtx = DecodeCtx { in_stream: false };
    /// between stream start and stream stop.
    pub const IN_STREAM: DecodeCtx = DecodeCtx { in_stream: true };
}

// ---------------------------------------------------------------------------
// cursor
// ---------------------------------------------------------------------------

/// bounds-checked reader over one message. `pos` never exceeds `data.len()`.
struct Reader<'a> {
    src: &'a Bytes,
    data: &'a [u8],
    pos: usize,
    msg: &'static str,
}

impl<'a> Reader<'a> {
    fn new(src: &'a Bytes, msg: &'static str) -> Self {
        let data: &'a [u8] = &src[..];
        Reader {
            src,
            data,
            pos: 0,
            msg,
        }
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn truncated(&self, wanted: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.msg,
            offset: self.pos,
            wanted,
        }
    }

    fn invalid(&self, offset: usize, reason: impl Into<String>) -> DecodeError {
        DecodeError::Invalid {
            message: self.msg,
            offset,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let start = self.pos;
        let data = self.data;
        match start.checked_add(n) {
            Some(end) => match data.get(start..end) {
                Some(s) => {
                    self.pos = end;
                    Ok(s)
                }
                None => Err(self.truncated(n)),
            },
            None => Err(self.truncated(n)),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let s = self.take(N)?;
        <[u8; N]>::try_from(s).map_err(|_| self.truncated(N))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array::<1>()?))
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array::<2>()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array::<4>()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array::<4>()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array::<8>()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array::<8>()?))
    }

    fn lsn(&mut self) -> Result<Lsn, DecodeError> {
        Ok(Lsn::from(self.u64()?))
    }

    fn timestamp(&mut self) -> Result<PgTimestamp, DecodeError> {
        Ok(PgTimestamp(self.i64()?))
    }

    /// an Int16 count that must not be negative.
    fn count_i16(&mut self, what: &str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.i16()?;
        usize::try_from(v).map_err(|_| self.invalid(at, format!("negative {what}: {v}")))
    }

    /// an Int32 count or length that must not be negative.
    fn count_i32(&mut self, what: &str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let v = self.i32()?;
        usize::try_from(v).map_err(|_| self.invalid(at, format!("negative {what}: {v}")))
    }

    /// a NUL-terminated utf-8 string.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let start = self.pos;
        let rest: &'a [u8] = self.data.get(start..).unwrap_or(&[]);
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Truncated {
                message: self.msg,
                offset: start,
                wanted: rest.len().saturating_add(1),
            });
        };
        let raw = rest.get(..nul).unwrap_or(&[]);
        let s = std::str::from_utf8(raw).map_err(|e| DecodeError::InvalidUtf8 {
            message: self.msg,
            offset: start.saturating_add(e.valid_up_to()),
        })?;
        // nul < rest.len(), so this stays within data.
        self.pos = start + nul + 1;
        Ok(s.to_owned())
    }

    /// `n` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.src.slice(start..self.pos))
    }

    /// everything left, as a zero-copy slice of the input.
    fn rest(&mut self) -> Bytes {
        let start = self.pos.min(self.src.len());
        self.pos = self.src.len();
        self.src.slice(start..)
    }

    /// a one-byte tag or marker that must equal `expected`.
    fn tag(&mut self, expected: u8) -> Result<(), DecodeError> {
        let at = self.pos;
        let got = self.u8()?;
        if got == expected {
            Ok(())
        } else {
            Err(self.invalid(
                at,
                format!(
                    "expected {:?} ({expected:#04x}), found {got:#04x}",
                    char::from(expected)
                ),
            ))
        }
    }

    /// the leading xid of messages inside a stream block.
    fn xid_if(&mut self, ctx: DecodeCtx) -> Result<Option<u32>, DecodeError> {
        if ctx.in_stream {
            Ok(Some(self.u32()?))
        } else {
            Ok(None)
        }
    }
}

/// checks the tag, runs `body` over the rest, then advances `buf` past what
/// was read. `buf` is left untouched on error.
fn decode_with<T>(
    buf: &mut Bytes,
    msg: &'static str,
    tag: u8,
    body: impl FnOnce(&mut Reader<'_>) -> Result<T, DecodeError>,
) -> Result<T, DecodeError> {
    let (value, consumed) = {
        let mut r = Reader::new(&*buf, msg);
        r.tag(tag)?;
        let value = body(&mut r)?;
        (value, r.pos)
    };
    let consumed = consumed.min(buf.len());
    buf.advance(consumed);
    Ok(value)
}

// ---------------------------------------------------------------------------
// encoding helpers (used by the pub encode methods; never panic either)
// ---------------------------------------------------------------------------

fn put_xid(out: &mut BytesMut, xid: Option<u32>) {
    if let Some(xid) = xid {
        out.put_u32(xid);
    }
}

/// writes `s` NUL-terminated; an interior NUL cuts the string short since the
/// wire format cannot carry it.
fn put_cstr(out: &mut BytesMut, s: &str) {
    let raw = s.as_bytes();
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    out.put_slice(raw.get(..end).unwrap_or(raw));
    out.put_u8(0);
}

/// writes an Int32 length and the bytes, clamped to i32::MAX bytes.
fn put_len_prefixed(out: &mut BytesMut, data: &[u8]) {
    let n = data.len().min(i32::MAX as usize);
    out.put_i32(n as i32);
    out.put_slice(data.get(..n).unwrap_or(data));
}

// ---------------------------------------------------------------------------
// tuple data
// ---------------------------------------------------------------------------

/// one column value in a TupleData part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// 'n': sql null.
    Null,
    /// 'u': unchanged toasted value; the value itself is not sent.
    Unchanged,
    /// 't': value in text format.
    Text(Bytes),
    /// 'b': value in binary format (only with the `binary` option).
    Binary(Bytes),
}

impl TupleValue {
    pub const NULL_TAG: u8 = b'n';
    pub const UNCHANGED_TAG: u8 = b'u';
    pub const TEXT_TAG: u8 = b't';
    pub const BINARY_TAG: u8 = b'b';
}

/// a TupleData message part: one value per column, in relation column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<TupleValue>);

impl TupleData {
    fn decode_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = r.count_i16("column count")?;
        // every value takes at least one byte, so this bounds the allocation.
        let mut values = Vec::with_capacity(n.min(r.remaining()));
        for _ in 0..n {
            let at = r.pos;
            let kind = r.u8()?;
            let value = match kind {
                TupleValue::NULL_TAG => TupleValue::Null,
                TupleValue::UNCHANGED_TAG => TupleValue::Unchanged,
                TupleValue::TEXT_TAG => {
                    let len = r.count_i32("value length")?;
                    TupleValue::Text(r.bytes(len)?)
                }
                TupleValue::BINARY_TAG => {
                    let len = r.count_i32("value length")?;
                    TupleValue::Binary(r.bytes(len)?)
                }
                other => {
                    return Err(r.invalid(at, format!("unknown tuple value kind {other:#04x}")))
                }
            };
            values.push(value);
        }
        Ok(TupleData(values))
    }

    /// writes the TupleData part (without any 'N'/'K'/'O' marker). at most
    /// i16::MAX values are written.
    pub fn encode(&self, out: &mut BytesMut) {
        let n = self.0.len().min(i16::MAX as usize);
        out.put_i16(n as i16);
        for value in self.0.iter().take(n) {
            match value {
                TupleValue::Null => out.put_u8(TupleValue::NULL_TAG),
                TupleValue::Unchanged => out.put_u8(TupleValue::UNCHANGED_TAG),
                TupleValue::Text(b) => {
                    out.put_u8(TupleValue::TEXT_TAG);
                    put_len_prefixed(out, b);
                }
                TupleValue::Binary(b) => {
                    out.put_u8(TupleValue::BINARY_TAG);
                    put_len_prefixed(out, b);
                }
            }
        }
    }
}

/// the old row image in update and delete messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity key columns (others are null).
    Key(TupleData),
    /// 'O': the whole old row (replica identity full).
    Full(TupleData),
}

impl OldTuple {
    pub const KEY_TAG: u8 = b'K';
    pub const FULL_TAG: u8 = b'O';

    pub fn tuple(&self) -> &TupleData {
        match self {
            OldTuple::Key(t) | OldTuple::Full(t) => t,
        }
    }

    /// reads a TupleData after a marker byte already read at `at`.
    fn decode_after_marker(r: &mut Reader<'_>, marker: u8, at: usize) -> Result<Self, DecodeError> {
        match marker {
            Self::KEY_TAG => Ok(OldTuple::Key(TupleData::decode_from(r)?)),
            Self::FULL_TAG => Ok(OldTuple::Full(TupleData::decode_from(r)?)),
            other => Err(r.invalid(at, format!("unknown old tuple marker {other:#04x}"))),
        }
    }

    /// writes the marker and the TupleData.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            OldTuple::Key(t) => {
                out.put_u8(Self::KEY_TAG);
                t.encode(out);
            }
            OldTuple::Full(t) => {
                out.put_u8(Self::FULL_TAG);
                t.encode(out);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// transaction messages
// ---------------------------------------------------------------------------

/// 'B': start of a (non-streamed) transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginBody {
    /// lsn of the commit record of the transaction.
    pub final_lsn: Lsn,
    /// commit timestamp.
    pub timestamp: PgTimestamp,
    pub xid: u32,
}

impl BeginBody {
    pub const TAG: u8 = b'B';

    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "begin", Self::TAG, |r| {
            let final_lsn = r.lsn()?;
            let timestamp = r.timestamp()?;
            let xid = r.u32()?;
            Ok(BeginBody {
                final_lsn,
                timestamp,
                xid,
            })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        out.put_u64(u64::from(self.final_lsn));
        out.put_i64(self.timestamp.0);
        out.put_u32(self.xid);
    }
}

/// 'C': end of a (non-streamed) transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitBody {
    /// currently unused, 0.
    pub flags: u8,
    /// lsn of the commit record.
    pub commit_lsn: Lsn,
    /// end lsn of the transaction; confirm this as flushed once applied.
    pub end_lsn: Lsn,
    /// commit timestamp.
    pub timestamp: PgTimestamp,
}

impl CommitBody {
    pub const TAG: u8 = b'C';

    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "commit", Self::TAG, |r| {
            let flags = r.u8()?;
            let commit_lsn = r.lsn()?;
            let end_lsn = r.lsn()?;
            let timestamp = r.timestamp()?;
            Ok(CommitBody {
                flags,
                commit_lsn,
                end_lsn,
                timestamp,
            })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        out.put_u8(self.flags);
        out.put_u64(u64::from(self.commit_lsn));
        out.put_u64(u64::from(self.end_lsn));
        out.put_i64(self.timestamp.0);
    }
}

/// 'O': the transaction originated on another node (replication origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginBody {
    /// lsn of the commit on the origin server.
    pub commit_lsn: Lsn,
    pub name: String,
}

impl OriginBody {
    pub const TAG: u8 = b'O';

    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "origin", Self::TAG, |r| {
            let commit_lsn = r.lsn()?;
            let name = r.cstr()?;
            Ok(OriginBody { commit_lsn, name })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        out.put_u64(u64::from(self.commit_lsn));
        put_cstr(out, &self.name);
    }
}

// ---------------------------------------------------------------------------
// schema messages
// ---------------------------------------------------------------------------

/// pg_class.relreplident of a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// 'd': primary key, if any.
    Default,
    /// 'n': nothing.
    Nothing,
    /// 'f': all columns.
    Full,
    /// 'i': a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'd' => Some(ReplicaIdentity::Default),
            b'n' => Some(ReplicaIdentity::Nothing),
            b'f' => Some(ReplicaIdentity::Full),
            b'i' => Some(ReplicaIdentity::Index),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// one column of a relation message (generated columns are not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// flag bit 1: the column is part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    /// atttypmod, -1 when none.
    pub type_modifier: i32,
}

/// 'R': describes a relation; sent before the first change to it in a session
/// and again whenever its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    pub oid: u32,
    /// empty for pg_catalog.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

impl RelationBody {
    pub const TAG: u8 = b'R';

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "relation", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let at = r.pos;
            let ident = r.u8()?;
            let Some(replica_identity) = ReplicaIdentity::from_byte(ident) else {
                return Err(r.invalid(at, format!("unknown replica identity {ident:#04x}")));
            };
            let n = r.count_i16("column count")?;
            // a column takes at least 10 bytes.
            let mut columns = Vec::with_capacity(n.min(r.remaining() / 10));
            for _ in 0..n {
                let flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let type_modifier = r.i32()?;
                columns.push(RelationColumn {
                    key: flags & 1 != 0,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            Ok(RelationBody {
                xid,
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        })
    }

    /// at most i16::MAX columns are written.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        out.put_u32(self.oid);
        put_cstr(out, &self.namespace);
        put_cstr(out, &self.name);
        out.put_u8(self.replica_identity.as_byte());
        let n = self.columns.len().min(i16::MAX as usize);
        out.put_i16(n as i16);
        for col in self.columns.iter().take(n) {
            out.put_u8(u8::from(col.key));
            put_cstr(out, &col.name);
            out.put_u32(col.type_oid);
            out.put_i32(col.type_modifier);
        }
    }
}

/// 'Y': describes a non-builtin data type used by a following relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    pub oid: u32,
    /// empty for pg_catalog.
    pub namespace: String,
    pub name: String,
}

impl TypeBody {
    pub const TAG: u8 = b'Y';

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "type", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            Ok(TypeBody {
                xid,
                oid,
                namespace,
                name,
            })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        out.put_u32(self.oid);
        put_cstr(out, &self.namespace);
        put_cstr(out, &self.name);
    }
}

// ---------------------------------------------------------------------------
// change messages
// ---------------------------------------------------------------------------

/// 'I': a new row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    /// relation oid, as in a previous relation message.
    pub oid: u32,
    pub new: TupleData,
}

impl InsertBody {
    pub const TAG: u8 = b'I';

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "insert", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let oid = r.u32()?;
            r.tag(NEW_TUPLE_TAG)?;
            let new = TupleData::decode_from(r)?;
            Ok(InsertBody { xid, oid, new })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        out.put_u32(self.oid);
        out.put_u8(NEW_TUPLE_TAG);
        self.new.encode(out);
    }
}

/// 'U': a changed row. `old` is a key image when the key changed (replica
/// identity default/index), the full old row with replica identity full, and
/// absent otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    pub oid: u32,
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

impl UpdateBody {
    pub const TAG: u8 = b'U';

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "update", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let oid = r.u32()?;
            let at = r.pos;
            let marker = r.u8()?;
            let old = if marker == NEW_TUPLE_TAG {
                None
            } else {
                let old = OldTuple::decode_after_marker(r, marker, at)?;
                r.tag(NEW_TUPLE_TAG)?;
                Some(old)
            };
            let new = TupleData::decode_from(r)?;
            Ok(UpdateBody { xid, oid, old, new })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        out.put_u32(self.oid);
        if let Some(old) = &self.old {
            old.encode(out);
        }
        out.put_u8(NEW_TUPLE_TAG);
        self.new.encode(out);
    }
}

/// 'D': a removed row, identified by its key or its full old image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    pub oid: u32,
    pub old: OldTuple,
}

impl DeleteBody {
    pub const TAG: u8 = b'D';

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "delete", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let oid = r.u32()?;
            let at = r.pos;
            let marker = r.u8()?;
            let old = OldTuple::decode_after_marker(r, marker, at)?;
            Ok(DeleteBody { xid, oid, old })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        out.put_u32(self.oid);
        self.old.encode(out);
    }
}

/// 'T': one TRUNCATE statement over one or more relations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncateBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    /// option bits, see [`TruncateBody::CASCADE`] and
    /// [`TruncateBody::RESTART_IDENTITY`].
    pub options: u8,
    pub oids: Vec<u32>,
}

impl TruncateBody {
    pub const TAG: u8 = b'T';
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub fn cascade(&self) -> bool {
        self.options & Self::CASCADE != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & Self::RESTART_IDENTITY != 0
    }

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "truncate", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let n = r.count_i32("relation count")?;
            let options = r.u8()?;
            let mut oids = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                oids.push(r.u32()?);
            }
            Ok(TruncateBody { xid, options, oids })
        })
    }

    /// at most i32::MAX oids are written.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        let n = self.oids.len().min(i32::MAX as usize);
        out.put_i32(n as i32);
        out.put_u8(self.options);
        for oid in self.oids.iter().take(n) {
            out.put_u32(*oid);
        }
    }
}

/// 'M': a pg_logical_emit_message() payload (only with the `messages` option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBody {
    /// only inside a stream block.
    pub xid: Option<u32>,
    /// bit 1: transactional.
    pub flags: u8,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

impl MessageBody {
    pub const TAG: u8 = b'M';
    pub const TRANSACTIONAL: u8 = 1;

    pub fn transactional(&self) -> bool {
        self.flags & Self::TRANSACTIONAL != 0
    }

    pub fn decode(buf: &mut Bytes, ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "message", Self::TAG, |r| {
            let xid = r.xid_if(ctx)?;
            let flags = r.u8()?;
            let lsn = r.lsn()?;
            let prefix = r.cstr()?;
            let len = r.count_i32("content length")?;
            let content = r.bytes(len)?;
            Ok(MessageBody {
                xid,
                flags,
                lsn,
                prefix,
                content,
            })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        put_xid(out, self.xid);
        out.put_u8(self.flags);
        out.put_u64(u64::from(self.lsn));
        put_cstr(out, &self.prefix);
        put_len_prefixed(out, &self.content);
    }
}

// ---------------------------------------------------------------------------
// streaming messages (protocol version 2)
// ---------------------------------------------------------------------------

/// 'S': start of a block of changes of an in-progress transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStartBody {
    pub xid: u32,
    /// true for the first block of this xid.
    pub first_segment: bool,
}

impl StreamStartBody {
    pub const TAG: u8 = b'S';

    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "stream start", Self::TAG, |r| {
            let xid = r.u32()?;
            let first_segment = r.u8()? != 0;
            Ok(StreamStartBody { xid, first_segment })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        out.put_u32(self.xid);
        out.put_u8(u8::from(self.first_segment));
    }
}

/// 'E': end of a stream block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamStopBody;

impl StreamStopBody {
    pub const TAG: u8 = b'E';

    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "stream stop", Self::TAG, |_r| Ok(StreamStopBody))
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
    }
}

/// 'c': a streamed transaction committed; apply its buffered changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommitBody {
    pub xid: u32,
    /// currently unused, 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub timestamp: PgTimestamp,
}

impl StreamCommitBody {
    pub const TAG: u8 = b'c';

    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "stream commit", Self::TAG, |r| {
            let xid = r.u32()?;
            let flags = r.u8()?;
            let commit_lsn = r.lsn()?;
            let end_lsn = r.lsn()?;
            let timestamp = r.timestamp()?;
            Ok(StreamCommitBody {
                xid,
                flags,
                commit_lsn,
                end_lsn,
                timestamp,
            })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        out.put_u32(self.xid);
        out.put_u8(self.flags);
        out.put_u64(u64::from(self.commit_lsn));
        out.put_u64(u64::from(self.end_lsn));
        out.put_i64(self.timestamp.0);
    }
}

/// 'A': a streamed (sub)transaction aborted; drop its buffered changes.
/// `subxid == xid` means the whole top-level transaction aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbortBody {
    pub xid: u32,
    pub subxid: u32,
}

impl StreamAbortBody {
    pub const TAG: u8 = b'A';

    /// protocol version 4 (parallel streaming) appends an abort lsn and
    /// timestamp; those trailing bytes are ignored here.
    pub fn decode(buf: &mut Bytes, _ctx: DecodeCtx) -> Result<Self, DecodeError> {
        decode_with(buf, "stream abort", Self::TAG, |r| {
            let xid = r.u32()?;
            let subxid = r.u32()?;
            Ok(StreamAbortBody { xid, subxid })
        })
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u8(Self::TAG);
        out.put_u32(self.xid);
        out.put_u32(self.subxid);
    }
}

// ---------------------------------------------------------------------------
// dispatch
// ---------------------------------------------------------------------------

/// any pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(BeginBody),
    Commit(CommitBody),
    Origin(OriginBody),
    Relation(RelationBody),
    Type(TypeBody),
    Insert(InsertBody),
    Update(UpdateBody),
    Delete(DeleteBody),
    Truncate(TruncateBody),
    Message(MessageBody),
    StreamStart(StreamStartBody),
    StreamStop(StreamStopBody),
    StreamCommit(StreamCommitBody),
    StreamAbort(StreamAbortBody),
}

impl LogicalMessage {
    /// decodes one message (typically the `data` of an XLogData), dispatching
    /// on its first byte. trailing bytes are ignored.
    pub fn decode(buf: Bytes, ctx: DecodeCtx) -> Result<LogicalMessage, DecodeError> {
        let mut buf = buf;
        let Some(&tag) = buf.first() else {
            return Err(DecodeError::Truncated {
                message: "logical replication",
                offset: 0,
                wanted: 1,
            });
        };
        let b = &mut buf;
        match tag {
            BeginBody::TAG => BeginBody::decode(b, ctx).map(LogicalMessage::Begin),
            CommitBody::TAG => CommitBody::decode(b, ctx).map(LogicalMessage::Commit),
            OriginBody::TAG => OriginBody::decode(b, ctx).map(LogicalMessage::Origin),
            RelationBody::TAG => RelationBody::decode(b, ctx).map(LogicalMessage::Relation),
            TypeBody::TAG => TypeBody::decode(b, ctx).map(LogicalMessage::Type),
            InsertBody::TAG => InsertBody::decode(b, ctx).map(LogicalMessage::Insert),
            UpdateBody::TAG => UpdateBody::decode(b, ctx).map(LogicalMessage::Update),
            DeleteBody::TAG => DeleteBody::decode(b, ctx).map(LogicalMessage::Delete),
            TruncateBody::TAG => TruncateBody::decode(b, ctx).map(LogicalMessage::Truncate),
            MessageBody::TAG => MessageBody::decode(b, ctx).map(LogicalMessage::Message),
            StreamStartBody::TAG => {
                StreamStartBody::decode(b, ctx).map(LogicalMessage::StreamStart)
            }
            StreamStopBody::TAG => StreamStopBody::decode(b, ctx).map(LogicalMessage::StreamStop),
            StreamCommitBody::TAG => {
                StreamCommitBody::decode(b, ctx).map(LogicalMessage::StreamCommit)
            }
            StreamAbortBody::TAG => {
                StreamAbortBody::decode(b, ctx).map(LogicalMessage::StreamAbort)
            }
            other => Err(DecodeError::UnknownTag {
                tag: other,
                offset: 0,
            }),
        }
    }

    /// writes the message, tag included.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            LogicalMessage::Begin(m) => m.encode(out),
            LogicalMessage::Commit(m) => m.encode(out),
            LogicalMessage::Origin(m) => m.encode(out),
            LogicalMessage::Relation(m) => m.encode(out),
            LogicalMessage::Type(m) => m.encode(out),
            LogicalMessage::Insert(m) => m.encode(out),
            LogicalMessage::Update(m) => m.encode(out),
            LogicalMessage::Delete(m) => m.encode(out),
            LogicalMessage::Truncate(m) => m.encode(out),
            LogicalMessage::Message(m) => m.encode(out),
            LogicalMessage::StreamStart(m) => m.encode(out),
            LogicalMessage::StreamStop(m) => m.encode(out),
            LogicalMessage::StreamCommit(m) => m.encode(out),
            LogicalMessage::StreamAbort(m) => m.encode(out),
        }
    }

    /// the tag byte of this message.
    pub fn tag(&self) -> u8 {
        match self {
            LogicalMessage::Begin(_) => BeginBody::TAG,
            LogicalMessage::Commit(_) => CommitBody::TAG,
            LogicalMessage::Origin(_) => OriginBody::TAG,
            LogicalMessage::Relation(_) => RelationBody::TAG,
            LogicalMessage::Type(_) => TypeBody::TAG,
            LogicalMessage::Insert(_) => InsertBody::TAG,
            LogicalMessage::Update(_) => UpdateBody::TAG,
            LogicalMessage::Delete(_) => DeleteBody::TAG,
            LogicalMessage::Truncate(_) => TruncateBody::TAG,
            LogicalMessage::Message(_) => MessageBody::TAG,
            LogicalMessage::StreamStart(_) => StreamStartBody::TAG,
            LogicalMessage::StreamStop(_) => StreamStopBody::TAG,
            LogicalMessage::StreamCommit(_) => StreamCommitBody::TAG,
            LogicalMessage::StreamAbort(_) => StreamAbortBody::TAG,
        }
    }

    /// the transaction id the message carries, if any (begin and the stream
    /// control messages always do; changes only inside a stream block).
    pub fn xid(&self) -> Option<u32> {
        match self {
            LogicalMessage::Begin(m) => Some(m.xid),
            LogicalMessage::Commit(_) | LogicalMessage::Origin(_) => None,
            LogicalMessage::Relation(m) => m.xid,
            LogicalMessage::Type(m) => m.xid,
            LogicalMessage::Insert(m) => m.xid,
            LogicalMessage::Update(m) => m.xid,
            LogicalMessage::Delete(m) => m.xid,
            LogicalMessage::Truncate(m) => m.xid,
            LogicalMessage::Message(m) => m.xid,
            LogicalMessage::StreamStart(m) => Some(m.xid),
            LogicalMessage::StreamStop(_) => None,
            LogicalMessage::StreamCommit(m) => Some(m.xid),
            LogicalMessage::StreamAbort(m) => Some(m.xid),
        }
    }
}

// ---------------------------------------------------------------------------
// replication protocol framing (payloads of CopyData messages)
// ---------------------------------------------------------------------------

/// a server-to-client CopyData payload during START_REPLICATION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// 'w': wal data; for logical replication `data` is one pgoutput message.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        /// microseconds since 2000-01-01.
        server_time: i64,
        data: Bytes,
    },
    /// 'k': keepalive; answer promptly with a standby status update when
    /// `reply_requested` is set.
    PrimaryKeepalive {
        wal_end: Lsn,
        /// microseconds since 2000-01-01.
        server_time: i64,
        reply_requested: bool,
    },
}

impl ReplicationMessage {
    pub const XLOG_DATA_TAG: u8 = b'w';
    pub const PRIMARY_KEEPALIVE_TAG: u8 = b'k';

    /// decodes the payload of one CopyData message. the XLogData `data` is a
    /// zero-copy slice of `buf`.
    pub fn decode(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
        let Some(&tag) = buf.first() else {
            return Err(DecodeError::Truncated {
                message: "replication",
                offset: 0,
                wanted: 1,
            });
        };
        match tag {
            Self::XLOG_DATA_TAG => {
                let mut r = Reader::new(&buf, "xlogdata");
                r.tag(tag)?;
                let wal_start = r.lsn()?;
                let wal_end = r.lsn()?;
                let server_time = r.i64()?;
                let data = r.rest();
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    server_time,
                    data,
                })
            }
            Self::PRIMARY_KEEPALIVE_TAG => {
                let mut r = Reader::new(&buf, "primary keepalive");
                r.tag(tag)?;
                let wal_end = r.lsn()?;
                let server_time = r.i64()?;
                let reply_requested = r.u8()? != 0;
                Ok(ReplicationMessage::PrimaryKeepalive {
                    wal_end,
                    server_time,
                    reply_requested,
                })
            }
            other => Err(DecodeError::UnknownTag {
                tag: other,
                offset: 0,
            }),
        }
    }

    /// writes the payload, tag included (the server's side; for tests).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            } => {
                out.put_u8(Self::XLOG_DATA_TAG);
                out.put_u64(u64::from(*wal_start));
                out.put_u64(u64::from(*wal_end));
                out.put_i64(*server_time);
                out.put_slice(data);
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                server_time,
                reply_requested,
            } => {
                out.put_u8(Self::PRIMARY_KEEPALIVE_TAG);
                out.put_u64(u64::from(*wal_end));
                out.put_i64(*server_time);
                out.put_u8(u8::from(*reply_requested));
            }
        }
    }
}

/// the 34-byte 'r' standby status update payload, to be sent in a CopyData
/// message. `write`, `flush` and `apply` are the last wal byte + 1 received,
/// flushed and applied; `reply` asks the server to answer immediately.
pub fn standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time_micros_since_2000: i64,
    reply: bool,
) -> Bytes {
    let mut out = BytesMut::with_capacity(34);
    out.put_u8(STANDBY_STATUS_UPDATE_TAG);
    out.put_u64(u64::from(write));
    out.put_u64(u64::from(flush));
    out.put_u64(u64::from(apply));
    out.put_i64(client_time_micros_since_2000);
    out.put_u8(u8::from(reply));
    out.freeze()
}

// ---------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(msg: &LogicalMessage) -> Bytes {
        let mut out = BytesMut::new();
        msg.encode(&mut out);
        out.freeze()
    }

    fn tuple() -> TupleData {
        TupleData(vec![
            TupleValue::Text(Bytes::from_static(b"42")),
            TupleValue::Null,
            TupleValue::Unchanged,
            TupleValue::Binary(Bytes::from_static(&[0, 1, 2, 0xff])),
            TupleValue::Text(Bytes::from_static("h\u{e9}llo".as_bytes())),
            TupleValue::Text(Bytes::new()),
        ])
    }

    fn key_tuple() -> TupleData {
        TupleData(vec![
            TupleValue::Text(Bytes::from_static(b"7")),
            TupleValue::Null,
        ])
    }

    /// one or more samples of every message, each with the context to decode it in.
    fn samples() -> Vec<(LogicalMessage, DecodeCtx)> {
        let top = DecodeCtx::TOP_LEVEL;
        let mut v = vec![
            (
                LogicalMessage::Begin(BeginBody {
                    final_lsn: Lsn::from(0x1_016B_3748),
                    timestamp: PgTimestamp(761_234_567_890_123),
                    xid: 1234,
                }),
                top,
            ),
            (
                LogicalMessage::Commit(CommitBody {
                    flags: 0,
                    commit_lsn: Lsn::from(0x16B_3748),
                    end_lsn: Lsn::from(0x16B_3780),
                    timestamp: PgTimestamp(-5),
                }),
                top,
            ),
            (
                LogicalMessage::Origin(OriginBody {
                    commit_lsn: Lsn::from(99),
                    name: "pg_16389".to_owned(),
                }),
                top,
            ),
            (
                LogicalMessage::StreamStart(StreamStartBody {
                    xid: 777,
                    first_segment: true,
                }),
                top,
            ),
            (
                LogicalMessage::StreamStart(StreamStartBody {
                    xid: 777,
                    first_segment: false,
                }),
                top,
            ),
            (
                LogicalMessage::StreamStop(StreamStopBody),
                DecodeCtx::IN_STREAM,
            ),
            (
                LogicalMessage::StreamCommit(StreamCommitBody {
                    xid: 777,
                    flags: 0,
                    commit_lsn: Lsn::from(u64::MAX),
                    end_lsn: Lsn::from(1),
                    timestamp: PgTimestamp(i64::MAX),
                }),
                top,
            ),
            (
                LogicalMessage::StreamAbort(StreamAbortBody {
                    xid: 777,
                    subxid: 778,
                }),
                top,
            ),
        ];
        for ctx in [DecodeCtx::TOP_LEVEL, DecodeCtx::IN_STREAM] {
            let xid = if ctx.in_stream { Some(777) } else { None };
            let changes = vec![
                LogicalMessage::Relation(RelationBody {
                    xid,
                    oid: 16_384,
                    namespace: "public".to_owned(),
                    name: "users".to_owned(),
                    replica_identity: ReplicaIdentity::Default,
                    columns: vec![
                        RelationColumn {
                            key: true,
                            name: "id".to_owned(),
                            type_oid: 23,
                            type_modifier: -1,
                        },
                        RelationColumn {
                            key: false,
                            name: "n\u{e4}me".to_owned(),
                            type_oid: 1043,
                            type_modifier: 68,
                        },
                    ],
                }),
                LogicalMessage::Relation(RelationBody {
                    xid,
                    oid: 1,
                    namespace: String::new(),
                    name: "t".to_owned(),
                    replica_identity: ReplicaIdentity::Full,
                    columns: vec![],
                }),
                LogicalMessage::Type(TypeBody {
                    xid,
                    oid: 16_400,
                    namespace: "public".to_owned(),
                    name: "mood".to_owned(),
                }),
                LogicalMessage::Insert(InsertBody {
                    xid,
                    oid: 16_384,
                    new: tuple(),
                }),
                LogicalMessage::Insert(InsertBody {
                    xid,
                    oid: 16_384,
                    new: TupleData::default(),
                }),
                LogicalMessage::Update(UpdateBody {
                    xid,
                    oid: 16_384,
                    old: Some(OldTuple::Key(key_tuple())),
                    new: tuple(),
                }),
                LogicalMessage::Update(UpdateBody {
                    xid,
                    oid: 16_384,
                    old: Some(OldTuple::Full(tuple())),
                    new: tuple(),
                }),
                LogicalMessage::Update(UpdateBody {
                    xid,
                    oid: 16_384,
                    old: None,
                    new: tuple(),
                }),
                LogicalMessage::Delete(DeleteBody {
                    xid,
                    oid: 16_384,
                    old: OldTuple::Key(key_tuple()),
                }),
                LogicalMessage::Delete(DeleteBody {
                    xid,
                    oid: 16_384,
                    old: OldTuple::Full(tuple()),
                }),
                LogicalMessage::Truncate(TruncateBody {
                    xid,
                    options: TruncateBody::CASCADE | TruncateBody::RESTART_IDENTITY,
                    oids: vec![16_384, 16_390, 1],
                }),
                LogicalMessage::Truncate(TruncateBody {
                    xid,
                    options: 0,
                    oids: vec![],
                }),
                LogicalMessage::Message(MessageBody {
                    xid,
                    flags: MessageBody::TRANSACTIONAL,
                    lsn: Lsn::from(0xABCD),
                    prefix: "switchyard".to_owned(),
                    content: Bytes::from_static(b"\x00hello\xff"),
                }),
            ];
            v.extend(changes.into_iter().map(|m| (m, ctx)));
        }
        v
    }

    #[test]
    fn round_trip_every_message() {
        for (msg, ctx) in samples() {
            let bytes = enc(&msg);
            assert_eq!(bytes.first(), Some(&msg.tag()));
            let decoded = LogicalMessage::decode(bytes.clone(), ctx)
                .unwrap_or_else(|e| panic!("{msg:?}: {e}"));
            assert_eq!(decoded, msg);
            // trailing bytes are ignored.
            let mut longer = BytesMut::from(&bytes[..]);
            longer.put_slice(b"trailing");
            assert_eq!(LogicalMessage::decode(longer.freeze(), ctx), Ok(msg));
        }
    }

    #[test]
    fn per_type_decode_advances_buffer() {
        let begin = BeginBody {
            final_lsn: Lsn::from(10),
            timestamp: PgTimestamp(20),
            xid: 30,
        };
        let insert = InsertBody {
            xid: None,
            oid: 5,
            new: tuple(),
        };
        let commit = CommitBody {
            flags: 0,
            commit_lsn: Lsn::from(10),
            end_lsn: Lsn::from(11),
            timestamp: PgTimestamp(20),
        };
        let mut out = BytesMut::new();
        begin.encode(&mut out);
        insert.encode(&mut out);
        commit.encode(&mut out);
        let mut buf = out.freeze();
        let ctx = DecodeCtx::TOP_LEVEL;
        assert_eq!(BeginBody::decode(&mut buf, ctx), Ok(begin));
        assert_eq!(InsertBody::decode(&mut buf, ctx), Ok(insert));
        // wrong type for the next message: error, buffer untouched.
        let before = buf.clone();
        assert!(matches!(
            BeginBody::decode(&mut buf, ctx),
            Err(DecodeError::Invalid { offset: 0, .. })
        ));
        assert_eq!(buf, before);
        assert_eq!(CommitBody::decode(&mut buf, ctx), Ok(commit));
        assert!(buf.is_empty());
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (msg, ctx) in samples() {
            let full = enc(&msg);
            for len in 0..full.len() {
                let res = LogicalMessage::decode(full.slice(..len), ctx);
                assert!(
                    res.is_err(),
                    "{msg:?} cut to {len} bytes decoded as {res:?}"
                );
            }
        }
        let keepalive = ReplicationMessage::PrimaryKeepalive {
            wal_end: Lsn::from(1),
            server_time: 2,
            reply_requested: true,
        };
        let mut out = BytesMut::new();
        keepalive.encode(&mut out);
        let full = out.freeze();
        assert_eq!(full.len(), 18);
        for len in 0..full.len() {
            assert!(ReplicationMessage::decode(full.slice(..len)).is_err());
        }
        // xlogdata's payload runs to the end, so only its 25-byte header is required.
        for len in 0..25 {
            let mut buf = vec![0u8; len];
            if let Some(first) = buf.first_mut() {
                *first = b'w';
            }
            assert!(ReplicationMessage::decode(Bytes::from(buf)).is_err());
        }
        assert!(ReplicationMessage::decode(Bytes::from(vec![b'w'; 25])).is_ok());
    }

    #[test]
    fn truncation_error_names_message_and_offset() {
        let begin = LogicalMessage::Begin(BeginBody {
            final_lsn: Lsn::from(1),
            timestamp: PgTimestamp(2),
            xid: 3,
        });
        let err = LogicalMessage::decode(enc(&begin).slice(..5), DecodeCtx::TOP_LEVEL);
        assert_eq!(
            err,
            Err(DecodeError::Truncated {
                message: "begin",
                offset: 1,
                wanted: 8
            })
        );
        let text = err.map(|_| ()).unwrap_err().to_string();
        assert!(
            text.contains("begin") && text.contains("offset 1"),
            "{text}"
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let ctx = DecodeCtx::TOP_LEVEL;

        // unknown tag and empty input.
        assert_eq!(
            LogicalMessage::decode(Bytes::from_static(b"Zxyz"), ctx),
            Err(DecodeError::UnknownTag {
                tag: b'Z',
                offset: 0
            })
        );
        assert!(matches!(
            LogicalMessage::decode(Bytes::new(), ctx),
            Err(DecodeError::Truncated { offset: 0, .. })
        ));

        // insert whose text value has a negative length.
        let mut out = BytesMut::new();
        out.put_u8(b'I');
        out.put_u32(5);
        out.put_u8(b'N');
        out.put_i16(1);
        out.put_u8(b't');
        out.put_i32(-1);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid {
                message: "insert",
                offset: 9,
                ..
            })
        ));

        // negative column count.
        let mut out = BytesMut::new();
        out.put_u8(b'I');
        out.put_u32(5);
        out.put_u8(b'N');
        out.put_i16(-3);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid { offset: 6, .. })
        ));

        // unknown tuple value kind.
        let mut out = BytesMut::new();
        out.put_u8(b'I');
        out.put_u32(5);
        out.put_u8(b'N');
        out.put_i16(1);
        out.put_u8(b'x');
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid { offset: 8, .. })
        ));

        // insert without the 'N' marker.
        let mut out = BytesMut::new();
        out.put_u8(b'I');
        out.put_u32(5);
        out.put_u8(b'K');
        out.put_i16(0);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid { offset: 5, .. })
        ));

        // update with an unknown old tuple marker.
        let mut out = BytesMut::new();
        out.put_u8(b'U');
        out.put_u32(5);
        out.put_u8(b'X');
        out.put_i16(0);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid {
                message: "update",
                offset: 5,
                ..
            })
        ));

        // delete must carry 'K' or 'O'.
        let mut out = BytesMut::new();
        out.put_u8(b'D');
        out.put_u32(5);
        out.put_u8(b'N');
        out.put_i16(0);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid {
                message: "delete",
                offset: 5,
                ..
            })
        ));

        // unknown replica identity.
        let mut out = BytesMut::new();
        out.put_u8(b'R');
        out.put_u32(5);
        out.put_slice(b"public\0t\0");
        out.put_u8(b'q');
        out.put_i16(0);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid {
                message: "relation",
                offset: 14,
                ..
            })
        ));

        // invalid utf-8 in a name.
        let mut out = BytesMut::new();
        out.put_u8(b'Y');
        out.put_u32(5);
        out.put_slice(b"ok\0b\xffd\0");
        assert_eq!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::InvalidUtf8 {
                message: "type",
                offset: 9
            })
        );

        // negative truncate count and negative message length.
        let mut out = BytesMut::new();
        out.put_u8(b'T');
        out.put_i32(-1);
        out.put_u8(0);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid {
                message: "truncate",
                offset: 1,
                ..
            })
        ));
        let mut out = BytesMut::new();
        out.put_u8(b'M');
        out.put_u8(0);
        out.put_u64(1);
        out.put_slice(b"p\0");
        out.put_i32(i32::MIN);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Invalid {
                message: "message",
                offset: 12,
                ..
            })
        ));

        // a huge count with no data behind it fails fast instead of allocating.
        let mut out = BytesMut::new();
        out.put_u8(b'T');
        out.put_i32(i32::MAX);
        out.put_u8(0);
        out.put_u32(1);
        assert!(matches!(
            LogicalMessage::decode(out.freeze(), ctx),
            Err(DecodeError::Truncated {
                message: "truncate",
                ..
            })
        ));
    }

    #[test]
    fn streamed_changes_carry_xid() {
        let insert = InsertBody {
            xid: Some(900),
            oid: 5,
            new: key_tuple(),
        };
        let msg = LogicalMessage::Insert(insert);
        let bytes = enc(&msg);
        assert_eq!(&bytes[1..5], &900u32.to_be_bytes());
        assert_eq!(
            LogicalMessage::decode(bytes, DecodeCtx::IN_STREAM),
            Ok(msg.clone())
        );
        assert_eq!(msg.xid(), Some(900));
    }

    #[test]
    fn replication_messages() {
        let inner = LogicalMessage::StreamStop(StreamStopBody);
        let xlog = ReplicationMessage::XLogData {
            wal_start: Lsn::from(0x16B_3748),
            wal_end: Lsn::from(0x16B_3800),
            server_time: 700_000_000,
            data: enc(&inner),
        };
        let mut out = BytesMut::new();
        xlog.encode(&mut out);
        let decoded = ReplicationMessage::decode(out.freeze()).unwrap();
        assert_eq!(decoded, xlog);
        let ReplicationMessage::XLogData { data, .. } = decoded else {
            panic!("not xlogdata");
        };
        assert_eq!(
            LogicalMessage::decode(data, DecodeCtx::IN_STREAM),
            Ok(inner)
        );

        let keepalive = ReplicationMessage::PrimaryKeepalive {
            wal_end: Lsn::from(5),
            server_time: -1,
            reply_requested: true,
        };
        let mut out = BytesMut::new();
        keepalive.encode(&mut out);
        assert_eq!(ReplicationMessage::decode(out.freeze()), Ok(keepalive));

        assert_eq!(
            ReplicationMessage::decode(Bytes::from_static(b"r")),
            Err(DecodeError::UnknownTag {
                tag: b'r',
                offset: 0
            })
        );
    }

    #[test]
    fn standby_status_update_layout() {
        let msg = standby_status_update(
            Lsn::from(1),
            Lsn::from(2),
            Lsn::from(0x0102_0304_0506_0708),
            -2,
            true,
        );
        assert_eq!(msg.len(), 34);
        assert_eq!(msg[0], b'r');
        assert_eq!(&msg[1..9], &1u64.to_be_bytes());
        assert_eq!(&msg[9..17], &2u64.to_be_bytes());
        assert_eq!(&msg[17..25], &[1u8, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&msg[25..33], &(-2i64).to_be_bytes());
        assert_eq!(msg[33], 1);
        let msg = standby_status_update(Lsn::from(0), Lsn::from(0), Lsn::from(0), 0, false);
        assert_eq!(msg[33], 0);
    }

    struct XorShift(u64);

    impl XorShift {
        fn next_u64(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next_u64() % n as u64) as usize
            }
        }
    }

    fn poke(buf: Bytes) {
        for ctx in [DecodeCtx::TOP_LEVEL, DecodeCtx::IN_STREAM] {
            if let Err(e) = LogicalMessage::decode(buf.clone(), ctx) {
                let _ = e.to_string();
            }
        }
        if let Err(e) = ReplicationMessage::decode(buf) {
            let _ = e.to_string();
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        const TAGS: &[u8] = b"BCORYIUDTMSEcAwk";
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for i in 0..10_000 {
            let len = rng.below(96);
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if i % 2 == 0 {
                let tag = TAGS[rng.below(TAGS.len())];
                if let Some(first) = buf.first_mut() {
                    *first = tag;
                }
            }
            // small counts reach deeper into the decoders.
            if i % 4 == 0 {
                for b in buf.iter_mut().skip(1) {
                    *b &= 0x07;
                }
            }
            poke(Bytes::from(buf));
        }
    }

    #[test]
    fn mutated_messages_never_panic() {
        let encoded: Vec<Bytes> = samples().iter().map(|(m, _)| enc(m)).collect();
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for _ in 0..10_000 {
            let mut buf = encoded[rng.below(encoded.len())].to_vec();
            let flips = 1 + rng.below(3);
            for _ in 0..flips {
                if buf.is_empty() {
                    break;
                }
                let i = rng.below(buf.len());
                buf[i] = rng.next_u64() as u8;
            }
            match rng.below(3) {
                0 => {
                    let n = rng.below(buf.len() + 1);
                    buf.truncate(n);
                }
                1 => {
                    let extra = rng.below(8);
                    for _ in 0..extra {
                        buf.push(rng.next_u64() as u8);
                    }
                }
                _ => {}
            }
            poke(Bytes::from(buf));
        }
    }

    #[test]
    fn lsn_display_and_parse() {
        assert_eq!(Lsn::from(0x16B_3748).to_string(), "0/16B3748");
        assert_eq!("0/16B3748".parse::<Lsn>().ok(), Some(Lsn::from(0x16B_3748)));
        assert_eq!(Lsn::from(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn::from(0x1_0000_0000).to_string(), "1/0");
        for bad in ["16B3748", "x/1", ""] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(PgTimestamp(0).to_unix_micros(), PG_EPOCH_OFFSET_MICROS);
        assert_eq!(
            PgTimestamp::from_unix_micros(PG_EPOCH_OFFSET_MICROS),
            PgTimestamp(0)
        );
        assert_eq!(PgTimestamp(i64::MAX).to_unix_micros(), i64::MAX);
        assert_eq!(
            PgTimestamp::from_unix_micros(i64::MIN),
            PgTimestamp(i64::MIN)
        );
    }

    /// `bytes` with bytes changed, cut, and bytes added: what the properties
    /// feed the decoder.
    fn damaged(
        mut bytes: Vec<u8>,
        flips: Vec<(usize, u8)>,
        cut: Option<usize>,
        extra: Vec<u8>,
    ) -> Vec<u8> {
        for (at, b) in flips {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[at % n] = b;
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        bytes.extend(extra);
        bytes
    }

    /// Messages a real PostgreSQL sent (tests/corpus/pgoutput.hex): every
    /// kind the stream carries, the suite's every-type rows among them,
    /// parsed once.
    fn corpus() -> &'static [(Vec<u8>, DecodeCtx)] {
        static CORPUS: std::sync::LazyLock<Vec<(Vec<u8>, DecodeCtx)>> =
            std::sync::LazyLock::new(parse_corpus);
        &CORPUS
    }

    fn parse_corpus() -> Vec<(Vec<u8>, DecodeCtx)> {
        include_str!("../../../tests/corpus/pgoutput.hex")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (ctx, hex) = l.split_once(' ').expect("`t|s hex` lines");
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                let ctx = if ctx == "s" {
                    DecodeCtx::IN_STREAM
                } else {
                    DecodeCtx::TOP_LEVEL
                };
                (bytes, ctx)
            })
            .collect()
    }

    #[test]
    fn every_message_a_real_server_sent_decodes() {
        let all = corpus();
        let kinds: std::collections::BTreeSet<u8> = all.iter().map(|(b, _)| b[0]).collect();
        // Begin, Commit, Delete, Stream Stop, Insert, Message, Relation,
        // Stream Start, Truncate, Update, Type, Stream Commit.
        assert_eq!(kinds.len(), 12, "{kinds:?}");
        for (bytes, ctx) in all {
            if let Err(e) = LogicalMessage::decode(Bytes::from(bytes.clone()), *ctx) {
                panic!("{:?} message: {e:?}", bytes[0] as char);
            }
        }
    }

    proptest::proptest! {
        /// Every message of the captured stream, cut, with bytes changed and
        /// bytes added, decodes to a message or a definite error.
        #[test]
        fn a_damaged_real_message_is_an_error_not_a_panic(
            pick in 0usize..1000,
            cut in proptest::option::of(0usize..4096),
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..8),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            let all = corpus();
            let (bytes, ctx) = &all[pick % all.len()];
            let bytes = damaged(bytes.clone(), flips, cut, extra);
            let _ = LogicalMessage::decode(Bytes::from(bytes.clone()), *ctx);
            let mut w = vec![b'w'];
            w.extend_from_slice(&bytes);
            let _ = ReplicationMessage::decode(Bytes::from(w));
        }

        /// Every sample message, cut, with bytes changed and bytes added,
        /// decodes to a message or a definite error: never a panic.
        #[test]
        fn a_damaged_message_is_an_error_not_a_panic(
            pick in 0usize..1000,
            cut in proptest::option::of(0usize..4096),
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..8),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
            stream in proptest::prelude::any::<bool>(),
        ) {
            let all = samples();
            let (msg, ctx) = &all[pick % all.len()];
            let bytes = damaged(enc(msg).to_vec(), flips, cut, extra);
            let ctx = if stream { DecodeCtx::IN_STREAM } else { *ctx };
            let _ = LogicalMessage::decode(Bytes::from(bytes.clone()), ctx);
            // The same bytes as the data of an XLogData, and as a keepalive.
            let mut w = vec![b'w'];
            w.extend_from_slice(&bytes);
            let _ = ReplicationMessage::decode(Bytes::from(w));
            let mut k = vec![b'k'];
            k.extend_from_slice(&bytes);
            let _ = ReplicationMessage::decode(Bytes::from(k));
        }

        /// Any bytes at all.
        #[test]
        fn any_bytes_are_a_message_or_an_error(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            stream in proptest::prelude::any::<bool>(),
        ) {
            let ctx = if stream { DecodeCtx::IN_STREAM } else { DecodeCtx::TOP_LEVEL };
            let _ = LogicalMessage::decode(Bytes::from(bytes.clone()), ctx);
            let _ = ReplicationMessage::decode(Bytes::from(bytes));
        }
    }
}
