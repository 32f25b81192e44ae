//! SurrealDB sink through the SDK's `engine::any`: `mem://`, `surrealkv://PATH`,
//! `ws://` / `wss://` with root credentials.
//!
//! One SurrealDB table per source table; the record id comes from the key (a
//! scalar for one column, an array for a composite key). A batch of changes is
//! one `BEGIN … COMMIT` query that also moves `_switchyard_checkpoint:main`.

use std::sync::Arc;

use async_trait::async_trait;
use surrealdb::types::{
    Array, Bytes, Datetime, Number, Object, RecordId, RecordIdKey, Value as SValue, Variables,
};
use tracing::info;

use super::{Cursor, Page, Record, Sink, SinkState, TableState, TableStatus};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Change, Column, Ddl, Marker, Op, Row, TableSchema, Value};
use crate::position::{Durable, Position};
use crate::redact::redact_url;
use crate::reject::{row_json, Rejected, Rejects};
pub use crate::schema::surreal::ident;
use crate::schema::surreal::{alter_ql, define_table, field_name, COPIES_FIELD};
use crate::surreal::error as surreal_error;

const CHECKPOINT_TABLE: &str = "_switchyard_checkpoint";
const TABLE_STATE: &str = "_switchyard_table";
/// One record per cutover (its steps, what its fence changed), as JSON text.
const CUTOVER_TABLE: &str = "_switchyard_cutover";
/// Where a record displaced by a row moving onto its key waits for its own
/// row to move away (two rows swapping keys in one source transaction).
const STASH_TABLE: &str = "_switchyard_stash";
/// What the apply transaction throws for a batch whose checkpoint the
/// target holds already.
const ALREADY_APPLIED: &str = "switchyard: this batch is applied already";

pub struct SurrealSink {
    db: crate::surreal::Store,
    /// The last apply failed in a way that leaves unknown whether it
    /// committed (a lost connection): the next one checks the checkpoint
    /// first, so a replayed batch is not applied twice.
    uncertain: std::sync::atomic::AtomicBool,
    schemafull: bool,
    endpoint: String,
    namespace: String,
    database: String,
    /// The namespace and database exist (selected by the connection).
    defined: std::sync::atomic::AtomicBool,
    /// The shape each table has in the target (by source table name), which
    /// a schema change starts from; recorded with the copy state.
    shapes: tokio::sync::Mutex<std::collections::HashMap<String, Arc<TableSchema>>>,
    /// A table dropped in the source is removed here too (else kept).
    drop_tables: bool,
    /// Where rows whose values do not fit go (`pipeline.reject_dir`).
    rejects: Arc<Rejects>,
    /// An embedded SurrealKV target's `target.memory_mb`.
    memory_mb: Option<u64>,
}

/// SurrealKV's error for a transaction larger than its write buffer.
const ARENA_FULL: &str = "arena is full";

/// The field SurrealDB refused a value of, from its error: a field's ASSERT
/// (`Found 'x' for field `status`, with record …, but field must conform
/// to: …`) or type (`Couldn't coerce value for field `n` of …`).
fn refused_field(message: &str) -> Option<String> {
    if !(message.contains("must conform to") || message.contains("Couldn't coerce value")) {
        return None;
    }
    let rest = message.split_once("for field `")?.1;
    Some(rest.split_once('`')?.0.to_string())
}

/// Converts a model value; `Null` becomes NONE (the field is left out).
pub fn to_surreal(v: &Value) -> std::result::Result<SValue, String> {
    Ok(match v {
        Value::Null => SValue::None,
        Value::Bool(b) => SValue::Bool(*b),
        Value::Int(i) => SValue::Number(Number::Int(*i)),
        Value::Float(x) => SValue::Number(Number::Float(*x)),
        // PostgreSQL's numeric NaN and ±Infinity have no decimal form in
        // SurrealDB; its float has them.
        Value::Decimal(d) if d == "NaN" => SValue::Number(Number::Float(f64::NAN)),
        Value::Decimal(d) if d == "Infinity" => SValue::Number(Number::Float(f64::INFINITY)),
        Value::Decimal(d) if d == "-Infinity" => SValue::Number(Number::Float(f64::NEG_INFINITY)),
        Value::Decimal(d) => {
            let parsed = if d.contains(['e', 'E']) {
                exact_scientific(d)
            } else {
                // Exact: `parse` would round digits past 28 silently.
                rust_decimal::Decimal::from_str_exact(d)
            };
            match parsed {
                Ok(x) => SValue::Number(Number::Decimal(x)),
                // More than SurrealDB's decimal holds exactly (28
                // significant digits): the exact text, not a rounded number.
                Err(_) => SValue::String(d.clone()),
            }
        }
        Value::Text(s) => SValue::String(s.clone()),
        Value::Bytes(b) => SValue::Bytes(Bytes::from(b.clone())),
        Value::Json(s) => match serde_json::from_str::<&serde_json::value::RawValue>(s) {
            Ok(raw) => json_value(raw)?,
            Err(e) => return Err(format!("invalid JSON: {e}")),
        },
        Value::Timestamp(t) => SValue::Datetime(Datetime::from(*t)),
        Value::Native(n) => n.value.clone(),
        Value::Unchanged => return Err("an unchanged value has no content (a sink bug)".into()),
    })
}

/// A value of column `col` as the SurrealDB type the column maps to (see
/// [`crate::schema::surreal::base_type`]): uuids, dates and intervals arrive
/// as PostgreSQL's text.
pub fn column_value(col: &Column, v: &Value) -> std::result::Result<SValue, String> {
    use crate::model::LogicalType as L;
    match (col.logical, v) {
        (L::Uuid, Value::Text(s)) => s
            .parse::<surrealdb::types::Uuid>()
            .map(SValue::Uuid)
            .map_err(|_| format!("{v} is not a uuid")),
        (L::Date, Value::Text(s)) => date(s).map(|d| SValue::Datetime(Datetime::from(d))),
        (L::Interval, Value::Text(s)) => Ok(match fixed_interval(s) {
            Some(d) => SValue::Duration(surrealdb::types::Duration::from(d)),
            None => SValue::String(s.clone()),
        }),
        // A PostgreSQL timestamp past year 262142 (see the source's decode).
        (L::Timestamp, Value::Text(t)) => Err(format!(
            "the timestamp {t:?} is past year 262142, which a SurrealDB datetime cannot hold; change the value in the source or exclude the table"
        )),
        (_, Value::Timestamp(t))
            if *t == chrono::DateTime::<chrono::Utc>::MAX_UTC
                || *t == chrono::DateTime::<chrono::Utc>::MIN_UTC =>
        {
            let which = if *t == chrono::DateTime::<chrono::Utc>::MAX_UTC {
                "infinity"
            } else {
                "-infinity"
            };
            Err(format!(
                "the timestamp {which} has no SurrealDB datetime; change the value in the source (a far date, or NULL) or exclude the column"
            ))
        }
        _ => to_surreal(v),
    }
}

/// A PostgreSQL date (`2024-02-29`, `0044-03-15 BC`) as midnight UTC.
fn date(s: &str) -> std::result::Result<chrono::DateTime<chrono::Utc>, String> {
    if s == "infinity" || s == "-infinity" {
        return Err(format!(
            "the date {s} has no SurrealDB datetime; change the value in the source (a far date, or NULL) or exclude the column"
        ));
    }
    let (ymd, bc) = match s.strip_suffix(" BC") {
        Some(d) => (d, true),
        None => (s, false),
    };
    let mut parts = ymd.splitn(3, '-').map(|p| p.parse::<i32>().ok());
    let (Some(Some(year)), Some(Some(month)), Some(Some(day))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("the date {s:?} cannot be read"));
    };
    // 1 BC is year 0.
    let year = if bc { 1 - year } else { year };
    chrono::NaiveDate::from_ymd_opt(year, month as u32, day as u32)
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        .ok_or_else(|| {
            format!("the date {s:?} cannot be a SurrealDB datetime (years past 262142 have none); change the value in the source or exclude the column")
        })
}

/// A PostgreSQL interval in ISO 8601 (`P3DT4H5M6.5S`) as a duration, where
/// it has one: no years or months (their length varies) and no negative
/// part (a SurrealDB duration is not negative). A day is 24 hours.
pub fn fixed_interval(s: &str) -> Option<std::time::Duration> {
    let rest = s.strip_prefix('P').filter(|r| !r.is_empty())?;
    let (days_part, time_part) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut nanos: u128 = 0;
    let mut add = |part: &str, units: &[(char, u128)]| -> Option<()> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
                continue;
            }
            let (_, scale) = units.iter().find(|(u, _)| *u == c)?;
            let (whole, frac) = number.split_once('.').unwrap_or((&number, ""));
            if whole.is_empty() && frac.is_empty() || frac.len() > 9 {
                return None;
            }
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().ok()?
            };
            let frac_nanos: u128 = if frac.is_empty() {
                0
            } else {
                format!("{frac:0<9}").parse().ok()?
            };
            if frac_nanos != 0 && *scale != 1_000_000_000 {
                return None;
            }
            nanos = nanos.checked_add(whole.checked_mul(*scale)?.checked_add(frac_nanos)?)?;
            number.clear();
        }
        number.is_empty().then_some(())
    };
    // A minus sign, years or months: no fixed, non-negative length.
    add(days_part, &[('D', 86_400_000_000_000)])?;
    if let Some(t) = time_part {
        if t.is_empty() {
            return None;
        }
        add(
            t,
            &[
                ('H', 3_600_000_000_000),
                ('M', 60_000_000_000),
                ('S', 1_000_000_000),
            ],
        )?;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    Some(std::time::Duration::new(
        secs,
        (nanos % 1_000_000_000) as u32,
    ))
}

/// A JSON document as a SurrealDB value with its numbers kept exact (jsonb
/// holds them as numeric): an integer that fits 64 bits stays an integer, a
/// number that a float reproduces stays a float, any other becomes a decimal,
/// or past 28 significant digits its exact text.
fn json_value(raw: &serde_json::value::RawValue) -> std::result::Result<SValue, String> {
    use serde_json::value::RawValue;
    let text = raw.get();
    let bad = |e: serde_json::Error| format!("invalid JSON: {e}");
    Ok(match text.as_bytes().first() {
        Some(b'{') => {
            let fields: std::collections::BTreeMap<String, &RawValue> =
                serde_json::from_str(text).map_err(bad)?;
            let mut obj = Object::new();
            for (k, v) in fields {
                obj.insert(k, json_value(v)?);
            }
            SValue::Object(obj)
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(bad)?;
            SValue::Array(Array::from(
                items
                    .into_iter()
                    .map(json_value)
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            ))
        }
        Some(b'"') => SValue::String(serde_json::from_str(text).map_err(bad)?),
        Some(b't') => SValue::Bool(true),
        Some(b'f') => SValue::Bool(false),
        Some(b'n') => SValue::Null,
        _ => json_number(text),
    })
}

/// `1.5e3` as an exact decimal; an error (so: kept as text) when the mantissa
/// has more significant digits than the decimal holds, which
/// `from_scientific` would round.
fn exact_scientific(text: &str) -> std::result::Result<rust_decimal::Decimal, rust_decimal::Error> {
    let mantissa = text.split(['e', 'E']).next().unwrap_or("");
    let digits = mantissa
        .chars()
        .filter(|c| c.is_ascii_digit())
        .skip_while(|c| *c == '0')
        .count();
    if digits > 28 {
        return Err(rust_decimal::Error::ExceedsMaximumPossibleValue);
    }
    rust_decimal::Decimal::from_scientific(text)
}

fn json_number(text: &str) -> SValue {
    if let Ok(i) = text.parse::<i64>() {
        return SValue::Number(Number::Int(i));
    }
    let exact = if text.contains(['e', 'E']) {
        exact_scientific(text)
    } else {
        rust_decimal::Decimal::from_str_exact(text)
    };
    let float = text.parse::<f64>().ok().filter(|f| f.is_finite());
    match (exact, float) {
        // The float's shortest text is the same number: a float loses nothing.
        (Ok(d), Some(f))
            if rust_decimal::Decimal::from_str_exact(&format!("{f:?}")).is_ok_and(|g| g == d) =>
        {
            SValue::Number(Number::Float(f))
        }
        (Ok(d), _) => SValue::Number(Number::Decimal(d)),
        (Err(_), _) => SValue::String(text.to_string()),
    }
}

/// The key's values as SurrealDB values of their columns' types.
fn key_values(table: &TableSchema, key: &[Value]) -> Result<Vec<SValue>> {
    key.iter()
        .enumerate()
        .map(|(k, v)| {
            let col = table.key.get(k).map(|&i| &table.columns[i]);
            match col {
                Some(col) => column_value(col, v),
                None => to_surreal(v),
            }
            .map_err(|m| {
                Error::definite(format!(
                    "table {:?}, key {}: {m}",
                    table.name,
                    table.describe_key(key)
                ))
            })
        })
        .collect()
}

fn record_key(table: &TableSchema, key: &[Value]) -> Result<RecordIdKey> {
    let mut values = key_values(table, key)?;
    Ok(match values.len() {
        1 => single_key(values.pop().unwrap_or_default()),
        _ => RecordIdKey::Array(Array::from(values)),
    })
}

/// The record id key of a one-column key: a number, string, uuid, array
/// or object as itself (a SurrealDB source's array and object ids come back
/// as they were), any other value in an array.
fn single_key(v: SValue) -> RecordIdKey {
    match v {
        SValue::Number(Number::Int(i)) => RecordIdKey::Number(i),
        SValue::String(s) => RecordIdKey::String(s),
        SValue::Uuid(u) => RecordIdKey::Uuid(u),
        SValue::Array(a) => RecordIdKey::Array(a),
        SValue::Object(o) => RecordIdKey::Object(o),
        v => RecordIdKey::Array(Array::from(vec![v])),
    }
}

/// Column `i`'s value in its field: a record link where the column is one
/// (`target.links`), else [`column_value`].
fn field_value(table: &TableSchema, i: usize, v: &Value) -> std::result::Result<SValue, String> {
    let col = &table.columns[i];
    let key = column_value(col, v)?;
    Ok(match table.links.iter().find(|l| l.column == i) {
        Some(l) => SValue::RecordId(RecordId::new(l.table.clone(), single_key(key))),
        None => key,
    })
}

/// The stash record of `key` of `table` (see [`STASH_TABLE`]).
fn stash_id(table: &TableSchema, key: &[Value]) -> Result<RecordId> {
    let mut parts = vec![SValue::String(table.target_name.clone())];
    parts.extend(key_values(table, key)?);
    Ok(RecordId::new(
        STASH_TABLE,
        RecordIdKey::Array(Array::from(parts)),
    ))
}

/// A row moving from key `$o{i}` to key `$r{i}`. A record at the new key
/// belongs to another row that moves away later in the same source
/// transaction (a deferrable unique key, two rows swapping keys): it waits
/// in the stash. The old key's record is the stashed one where this row was
/// displaced so, else the record at the old key. Leaves the old content in
/// `$p{i}`.
fn move_record(
    sql: &mut String,
    vars: &mut Variables,
    i: usize,
    t: &TableSchema,
    old: &[Value],
    new: &[Value],
) -> Result<()> {
    vars.insert(format!("o{i}"), record_id(t, old)?);
    vars.insert(format!("sn{i}"), stash_id(t, new)?);
    vars.insert(format!("so{i}"), stash_id(t, old)?);
    sql.push_str(&format!(
        "LET $x{i} = (SELECT * OMIT id FROM ONLY $r{i}); \
         IF $x{i} != NONE {{ UPSERT $sn{i} CONTENT $x{i} RETURN NONE; DELETE $r{i} RETURN NONE; }}; \
         LET $s{i} = (SELECT * OMIT id FROM ONLY $so{i}); \
         LET $p{i} = $s{i} ?? (SELECT * OMIT id FROM ONLY $o{i}); \
         IF $s{i} != NONE {{ DELETE $so{i} RETURN NONE; }} ELSE {{ DELETE $o{i} RETURN NONE; }};\n"
    ));
    Ok(())
}

pub fn record_id(table: &TableSchema, key: &[Value]) -> Result<RecordId> {
    if table.whole_row {
        let digest = table
            .row_digest(&key.to_vec())
            .map_err(|m| Error::definite(format!("table {:?}: {m}", table.name)))?;
        return Ok(RecordId::new(
            table.target_name.clone(),
            RecordIdKey::String(digest),
        ));
    }
    if key.iter().any(Value::is_null) {
        return Err(Error::definite(format!(
            "table {:?}, key {}: a key column is NULL; give the key columns NOT NULL values in the source",
            table.name,
            table.describe_key(key)
        )));
    }
    Ok(RecordId::new(
        table.target_name.clone(),
        record_key(table, key)?,
    ))
}

/// The record content of a row: one field per non-NULL column.
pub fn content(table: &TableSchema, row: &Row) -> Result<Object> {
    fields(table, row, false)
}

/// A row as the record it becomes: its content with its record id.
pub fn record(table: &TableSchema, row: &Row) -> Result<Object> {
    let mut obj = content(table, row)?;
    obj.insert("id", record_id(table, &table.key_of(row))?);
    Ok(obj)
}

/// The fields an update changes, for `MERGE`: every column but the unchanged
/// ones, NULL as NONE (which removes the field).
pub fn changed_fields(table: &TableSchema, row: &Row) -> Result<Object> {
    fields(table, row, true)
}

/// The first value of a row that its SurrealDB field cannot hold: the
/// column, and why.
pub fn misfit(table: &TableSchema, row: &Row) -> Option<(usize, String)> {
    row.iter().enumerate().find_map(|(i, v)| {
        if v.is_null() || v.is_unchanged() || field_name(table, i).is_none() {
            return None;
        }
        field_value(table, i, v).err().map(|m| (i, m))
    })
}

fn fields(table: &TableSchema, row: &Row, merge: bool) -> Result<Object> {
    let mut obj = Object::new();
    for (i, v) in row.iter().enumerate() {
        if v.is_unchanged() {
            continue;
        }
        if v.is_null() {
            if merge {
                if let Some(field) = field_name(table, i) {
                    obj.insert(field, SValue::None);
                }
            }
            continue;
        }
        let Some(field) = field_name(table, i) else {
            continue;
        };
        let refused = |m: String| {
            Error::definite(format!(
                "table {:?}, key {}, column {:?}: {m} (or set pipeline.reject_dir to set such rows aside)",
                table.name,
                table.describe_key(&table.key_of(row)),
                table.columns[i].name
            ))
        };
        let sv = field_value(table, i, v).map_err(refused)?;
        obj.insert(field, sv);
    }
    Ok(obj)
}

impl SurrealSink {
    /// Sets rows whose values do not fit aside in `rejects` where it is
    /// enabled (`pipeline.reject_dir`), instead of stopping.
    pub fn with_rejects(mut self, rejects: Arc<Rejects>) -> Self {
        self.rejects = rejects;
        self
    }

    /// Whether `row` is set aside (written to its reject file) because a
    /// value does not fit its field; never where rejects are off.
    fn set_aside(
        &self,
        table: &TableSchema,
        row: &Row,
        phase: &'static str,
        position: Option<Position>,
    ) -> Result<bool> {
        if !self.rejects.enabled() {
            return Ok(false);
        }
        let Some((i, reason)) = misfit(table, row) else {
            return Ok(false);
        };
        let key = if table.whole_row {
            "(no key: the whole row)".to_string()
        } else {
            table.describe_key(&table.key_of(row))
        };
        self.rejects.record(&Rejected {
            table: table.name.clone(),
            key,
            column: Some(table.columns[i].name.clone()),
            value: Some(row[i].to_string()),
            reason,
            phase,
            position: position.map(|p| p.to_string()).unwrap_or_default(),
            row: row_json(&table.columns, row),
        })?;
        Ok(true)
    }

    fn encode(&self, table: &TableSchema, row: &Row) -> Result<Record> {
        use surrealdb::types::ToSql;
        let obj = record(table, row)?;
        let id = obj
            .get("id")
            .map(|id| id.to_sql())
            .ok_or_else(|| Error::definite("a record without an id (a sink bug)"))?;
        Ok((id, SValue::Object(obj).to_sql()))
    }
}

/// The statements of one change of a table identified by its whole row: a
/// record per distinct row, its `_switchyard_copies` counting the identical
/// rows. Removing a row the target does not hold stops the batch: the copy is
/// out of step, and applying the rest would hide it.
fn counted_change(sql: &mut String, vars: &mut Variables, i: usize, ch: &Change) -> Result<()> {
    let t = &ch.table;
    let remove = |sql: &mut String, vars: &mut Variables, row: &Row| -> Result<()> {
        vars.insert(format!("o{i}"), record_id(t, row)?);
        vars.insert(
            format!("m{i}"),
            format!(
                "table {:?} has no key and the source removed a row the target does not hold ({}); the target's copy is out of step: copy the table again (run once with it in tables.exclude, then without)",
                t.name,
                t.describe_key(row)
            ),
        );
        sql.push_str(&format!(
            "LET $d{i} = (SELECT VALUE {COPIES_FIELD} FROM ONLY $o{i}) ?? 0; \
             IF $d{i} <= 0 {{ THROW $m{i}; }}; \
             IF $d{i} == 1 {{ DELETE $o{i} RETURN NONE; }} ELSE {{ UPDATE $o{i} SET {COPIES_FIELD} = $d{i} - 1 RETURN NONE; }};\n"
        ));
        Ok(())
    };
    let add = |sql: &mut String, vars: &mut Variables, row: &Row| -> Result<()> {
        vars.insert(format!("r{i}"), record_id(t, row)?);
        let mut c = content(t, row)?;
        c.insert(COPIES_FIELD, 1i64);
        vars.insert(format!("c{i}"), c);
        sql.push_str(&format!(
            "LET $n{i} = (SELECT VALUE {COPIES_FIELD} FROM ONLY $r{i}) ?? 0; \
             UPSERT $r{i} CONTENT $c{i} RETURN NONE; UPDATE $r{i} SET {COPIES_FIELD} = $n{i} + 1 RETURN NONE;\n"
        ));
        Ok(())
    };
    match &ch.op {
        Op::Insert { row } => add(sql, vars, row),
        // The same row before and after: nothing changes.
        Op::Update { old_key: None, .. } => Ok(()),
        Op::Update {
            old_key: Some(old),
            row,
        } => {
            remove(sql, vars, old)?;
            add(sql, vars, row)
        }
        Op::Delete { key } => remove(sql, vars, key),
        Op::Truncate => {
            sql.push_str(&format!("DELETE {} RETURN NONE;\n", ident(&t.target_name)));
            Ok(())
        }
        Op::Ddl(_) => Ok(()),
    }
}

/// A table's shape as recorded with its copy state.
fn shape_text(table: &TableSchema) -> Result<String> {
    serde_json::to_string(table)
        .map_err(|e| Error::definite("cannot encode a table's shape").with_source(e))
}

impl SurrealSink {
    /// Appends to the batch the statements that bring the target table
    /// from the shape it has (under the source name `from`) to `table`'s,
    /// and the shape recorded with its copy state.
    fn follow(
        &self,
        sql: &mut String,
        vars: &mut Variables,
        shapes: &mut std::collections::HashMap<String, Arc<TableSchema>>,
        i: usize,
        from: &str,
        table: &Arc<TableSchema>,
    ) -> Result<()> {
        let Some(old) = shapes.get(from).cloned() else {
            shapes.insert(table.name.clone(), table.clone());
            return Ok(());
        };
        if old.same_shape(table) && from == table.name {
            return Ok(());
        }
        for statement in alter_ql(&old, table, self.schemafull) {
            sql.push_str(&statement);
            sql.push('\n');
        }
        vars.insert(
            format!("ss{i}"),
            RecordId::new(TABLE_STATE, from.to_string()),
        );
        vars.insert(format!("sh{i}"), shape_text(table)?);
        sql.push_str(&format!("UPDATE $ss{i} SET shape = $sh{i} RETURN NONE;\n"));
        shapes.remove(from);
        shapes.insert(table.name.clone(), table.clone());
        Ok(())
    }

    /// A change of a table's definition in the batch (after [`Self::follow`]).
    fn apply_ddl(
        &self,
        sql: &mut String,
        vars: &mut Variables,
        shapes: &mut std::collections::HashMap<String, Arc<TableSchema>>,
        i: usize,
        t: &TableSchema,
        ddl: &Ddl,
    ) -> Result<()> {
        match ddl {
            Ddl::Alter => Ok(()),
            Ddl::Drop => {
                if self.drop_tables {
                    sql.push_str(&format!(
                        "REMOVE TABLE IF EXISTS {};\n",
                        ident(&t.target_name)
                    ));
                    info!(table = %t.target_name, "table dropped in the source: removed from the target");
                } else {
                    info!(table = %t.target_name, "table dropped in the source: its copy in the target stays and is no longer followed");
                }
                vars.insert(format!("ds{i}"), RecordId::new(TABLE_STATE, t.name.clone()));
                sql.push_str(&format!("DELETE $ds{i} RETURN NONE;\n"));
                shapes.remove(&t.name);
                Ok(())
            }
            // Renamed in the source, kept under its name in the target
            // (`rename_table = "keep"`): its state moves to the new name. (A
            // rename that moves the target table reaches SurrealDB, which has
            // no rename, as a copy under the new name and a drop of the old.)
            Ddl::Rename { from } if from != &t.name => {
                vars.insert(format!("rf{i}"), RecordId::new(TABLE_STATE, from.clone()));
                vars.insert(format!("rt{i}"), RecordId::new(TABLE_STATE, t.name.clone()));
                vars.insert(format!("rn{i}"), t.name.clone());
                sql.push_str(&format!(
                    "LET $rs{i} = (SELECT * OMIT id FROM ONLY $rf{i}); DELETE $rf{i} RETURN NONE; \
                     IF $rs{i} != NONE {{ CREATE $rt{i} CONTENT $rs{i} RETURN NONE; UPDATE $rt{i} SET name = $rn{i} RETURN NONE; }};\n"
                ));
                Ok(())
            }
            Ddl::Rename { .. } => Ok(()),
            Ddl::Copy { .. } => Err(Error::definite(format!(
                "a {} of table {:?} reached the target's apply (a bug: the pipeline copies tables)",
                Op::Ddl(ddl.clone()).kind_name(),
                t.name
            ))),
        }
    }
}

/// Reads a non-negative integer field of a state record; anything else means
/// the record was edited by hand or written by something else.
fn json_u64(v: &serde_json::Value, record: &str, key: &str) -> Result<u64> {
    match v.get(key).and_then(|x| x.as_i64()) {
        Some(n) if n >= 0 => Ok(n as u64),
        _ => Err(Error::definite(format!(
            "state record {record} has field {key:?} = {}, expected a non-negative integer; \
             the record was changed outside switchyard: restore it or replicate into an empty database",
            v.get(key).map(|x| x.to_string()).unwrap_or_else(|| "nothing".into())
        ))),
    }
}

impl SurrealSink {
    /// Connects and signs in; writes nothing (the namespace and database
    /// are defined by the first `prepare`).
    pub async fn connect(endpoint: &str, remote: bool, config: &Config) -> Result<Self> {
        let shown = redact_url(endpoint);
        let db = signed_in(endpoint, remote, config).await?;
        let namespace = config.target.namespace.clone().unwrap_or_default();
        let database = config.target.database.clone().unwrap_or_default();
        // `USE` creates a missing namespace or database: select them only
        // where they exist (`prepare` defines them; `state` says "never
        // replicated into" meanwhile).
        let exists = crate::surreal::database_exists(&db, &namespace, &database)
            .await
            .map_err(|e| surreal_error(format!("reading the namespaces of {shown}"), e))?;
        if exists {
            db.use_ns_db(&namespace, &database).await.map_err(|e| {
                surreal_error(
                    format!("using namespace {namespace:?}, database {database:?} on {shown}"),
                    e,
                )
            })?;
        }
        info!(endpoint = %shown, namespace = %namespace, database = %database, "connected to SurrealDB");
        Ok(Self {
            db,
            uncertain: Default::default(),
            schemafull: config.target.schemafull,
            endpoint: shown,
            namespace,
            database,
            defined: std::sync::atomic::AtomicBool::new(exists),
            shapes: Default::default(),
            drop_tables: config.schema_changes.drop_table == crate::config::OnDrop::Drop,
            rejects: Default::default(),
            memory_mb: endpoint
                .starts_with("surrealkv://")
                .then_some(config.target.memory_mb),
        })
    }

    /// Defines the namespace and the database where they are missing.
    async fn define_namespace(&self) -> Result<()> {
        let (ns, dbn) = (&self.namespace, &self.database);
        self.db
            .query(format!(
                "DEFINE NAMESPACE IF NOT EXISTS {ns}; USE NS {ns}; DEFINE DATABASE IF NOT EXISTS {dbn};",
                ns = ident(ns),
                dbn = ident(dbn)
            ))
            .await
            .and_then(|r| r.check())
            .map_err(|e| {
                surreal_error(
                    format!(
                        "defining namespace {ns:?} and database {dbn:?} on {}",
                        self.endpoint
                    ),
                    e,
                )
            })?;
        self.db.use_ns_db(ns, dbn).await.map_err(|e| {
            surreal_error(
                format!(
                    "using namespace {ns:?}, database {dbn:?} on {}",
                    self.endpoint
                ),
                e,
            )
        })?;
        self.defined
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Snapshot rows of a table identified by its whole row: identical rows
    /// add to one record's count, within the batch and across batches.
    async fn load_counted(&self, table: &TableSchema, rows: &[Row]) -> Result<()> {
        let mut counts: Vec<(RecordId, &Row, i64)> = Vec::new();
        let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for row in rows {
            let digest = table
                .row_digest(row)
                .map_err(|m| Error::definite(format!("table {:?}: {m}", table.name)))?;
            match seen.get(&digest) {
                Some(&at) => counts[at].2 += 1,
                None => {
                    seen.insert(digest, counts.len());
                    counts.push((record_id(table, row)?, row, 1));
                }
            }
        }
        let mut sql = String::from("BEGIN TRANSACTION;\n");
        let mut vars = Variables::new();
        for (i, (id, row, k)) in counts.into_iter().enumerate() {
            let mut c = content(table, row)?;
            c.insert(COPIES_FIELD, k);
            vars.insert(format!("r{i}"), id);
            vars.insert(format!("c{i}"), c);
            vars.insert(format!("k{i}"), k);
            sql.push_str(&format!(
                "LET $n{i} = (SELECT VALUE {COPIES_FIELD} FROM ONLY $r{i}) ?? 0; \
                 UPSERT $r{i} CONTENT $c{i} RETURN NONE; UPDATE $r{i} SET {COPIES_FIELD} = $n{i} + $k{i} RETURN NONE;\n"
            ));
        }
        sql.push_str("COMMIT TRANSACTION;\n");
        self.run(
            format!("loading {} rows into {:?}", rows.len(), table.target_name),
            sql,
            vars,
        )
        .await?;
        Ok(())
    }

    /// Snapshot rows in one transaction; the number of rows loaded. Where
    /// they do not fit an embedded store's write buffer, in halves (the rows
    /// are inserted only where missing, and the failed transaction wrote
    /// nothing). Where SurrealDB refuses a row (a field's ASSERT or type),
    /// in halves down to that row, which is set aside where
    /// `pipeline.reject_dir` is set, else named in the error.
    async fn insert_rows(&self, table: &TableSchema, rows: &[&Row]) -> Result<u64> {
        let mut loaded = 0u64;
        let mut pending = vec![rows];
        while let Some(part) = pending.pop() {
            let items = part
                .iter()
                .map(|row| record(table, row).map(SValue::Object))
                .collect::<Result<Vec<_>>>()?;
            let mut vars = Variables::new();
            vars.insert("rows", Array::from(items));
            let done = self
                .run(
                    format!("loading {} rows into {:?}", part.len(), table.target_name),
                    format!(
                        "INSERT IGNORE INTO {} $rows RETURN NONE;",
                        ident(&table.target_name)
                    ),
                    vars,
                )
                .await;
            let e = match done {
                Ok(_) => {
                    loaded += part.len() as u64;
                    continue;
                }
                Err(e) => e,
            };
            let message = e.to_string();
            let refused = refused_field(&message);
            if part.len() > 1 && (message.contains(ARENA_FULL) || refused.is_some()) {
                let (a, b) = part.split_at(part.len() / 2);
                pending.push(b);
                pending.push(a);
                continue;
            }
            let (Some(field), [row]) = (refused, part) else {
                return Err(e);
            };
            self.refused(table, row, &field, &message, None)?;
        }
        Ok(loaded)
    }

    /// A row SurrealDB refused (`field`'s ASSERT or type, its error
    /// `message`), copied (`position` None) or streamed: set aside where
    /// `pipeline.reject_dir` is set, else the error that names it.
    fn refused(
        &self,
        table: &TableSchema,
        row: &Row,
        field: &str,
        message: &str,
        position: Option<Position>,
    ) -> Result<()> {
        let key = table.describe_key(&table.key_of(row));
        // SurrealDB's own words, after "loading … (statement i): ".
        let why = message
            .find("(statement ")
            .and_then(|i| message[i..].split_once("): "))
            .map(|(_, m)| m)
            .unwrap_or(message)
            .to_string();
        let column = table
            .columns
            .iter()
            .enumerate()
            .find(|(i, _)| field_name(table, *i).as_deref() == Some(field))
            .map(|(i, c)| (i, c.name.clone()));
        if !self.rejects.enabled() {
            let named = column
                .as_ref()
                .map(|(_, c)| format!(", column {c:?}"))
                .unwrap_or_default();
            let at = position
                .map(|p| format!(", change at {p}"))
                .unwrap_or_default();
            return Err(Error::definite(format!(
                "table {:?}, key {key}{named}{at}: SurrealDB refused it: {why} \
                 (correct the row in the source, or set pipeline.reject_dir to set such rows aside){}",
                table.name,
                if position.is_some() {
                    "; the checkpoint stays before it"
                } else {
                    ""
                }
            )));
        }
        self.rejects.record(&Rejected {
            table: table.name.clone(),
            key,
            column: column.as_ref().map(|(_, c)| c.clone()),
            value: column.as_ref().map(|(i, _)| row[*i].to_string()),
            reason: format!("SurrealDB refused it: {why}"),
            phase: if position.is_some() {
                "stream"
            } else {
                "snapshot"
            },
            position: position.map(|p| p.to_string()).unwrap_or_default(),
            row: row_json(&table.columns, row),
        })
    }

    pub fn client(&self) -> &crate::surreal::Store {
        &self.db
    }

    async fn run(
        &self,
        context: impl std::fmt::Display,
        sql: String,
        vars: Variables,
    ) -> Result<surrealdb::IndexedResults> {
        let mut resp = self
            .db
            .query(sql)
            .bind(vars)
            .await
            .map_err(|e| surreal_error(&context, e))?;
        match crate::surreal::failure(&mut resp) {
            None => Ok(resp),
            Some((idx, e)) if e.message().contains(ARENA_FULL) => {
                let (buffer, _) = crate::surreal::engine_budget(self.memory_mb.unwrap_or(0));
                Err(Error::definite(format!(
                    "{context}: the transaction does not fit the embedded store's write buffer \
                     ({} MiB with target.memory_mb = {}; statement {idx}: {}). Raise target.memory_mb \
                     (a quarter of it is one write buffer) or lower pipeline.batch_rows and \
                     pipeline.snapshot_batch_rows",
                    buffer >> 20,
                    self.memory_mb.unwrap_or(0),
                    e.message()
                ))
                .with_source(e))
            }
            Some((idx, e)) => Err(surreal_error(
                format!("{context} (statement {idx}): {}", e.message()),
                e,
            )),
        }
    }
}

#[async_trait]
impl Sink for SurrealSink {
    async fn prepare(&self, tables: &[Arc<TableSchema>]) -> Result<()> {
        self.define_namespace().await?;
        let mut sql = format!(
            "DEFINE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} SCHEMALESS; DEFINE TABLE IF NOT EXISTS {TABLE_STATE} SCHEMALESS; DEFINE TABLE IF NOT EXISTS {CUTOVER_TABLE} SCHEMALESS; DEFINE TABLE IF NOT EXISTS {STASH_TABLE} SCHEMALESS;\n"
        );
        for t in tables {
            sql.push_str(&define_table(t, self.schemafull));
            self.shapes.lock().await.insert(t.name.clone(), t.clone());
        }
        self.run(
            format!("creating the target schema on {}", self.endpoint),
            sql,
            Variables::new(),
        )
        .await?;
        Ok(())
    }

    async fn state(&self) -> Result<Option<SinkState>> {
        if !self.defined.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        let read = self
            .run(
                "reading the checkpoint",
                format!(
                    "SELECT commit, ordinal, origin, <string>updated_at AS updated_at, marker FROM {CHECKPOINT_TABLE} WHERE id = {CHECKPOINT_TABLE}:main; SELECT name, status, commit, ordinal, rows, source_id, shape FROM {TABLE_STATE};"
                ),
                Variables::new(),
            )
            .await;
        let mut resp = match read {
            Ok(r) => r,
            // No namespace, database or state table: never replicated into.
            Err(e) if e.report().contains("does not exist") => return Ok(None),
            Err(e) => return Err(e),
        };
        let cp: Vec<serde_json::Value> = resp
            .take(0)
            .map_err(|e| surreal_error("reading the checkpoint", e))?;
        let tables: Vec<serde_json::Value> = resp
            .take(1)
            .map_err(|e| surreal_error("reading table states", e))?;
        let mut state = SinkState::default();
        if let Some(c) = cp.first() {
            let at = format!("{CHECKPOINT_TABLE}:main");
            state.checkpoint = Some(Position::new(
                json_u64(c, &at, "commit")?,
                json_u64(c, &at, "ordinal")?,
            ));
            state.origin = c.get("origin").and_then(|o| o.as_str()).map(str::to_string);
            state.checkpoint_updated_at = c
                .get("updated_at")
                .and_then(|o| o.as_str())
                .map(str::to_string);
            state.marker = c
                .get("marker")
                .and_then(|m| m.as_str())
                .and_then(|m| serde_json::from_str(m).ok());
        }
        for t in tables {
            let Some(name) = t.get("name").and_then(|n| n.as_str()) else {
                continue;
            };
            let status = match t.get("status").and_then(|s| s.as_str()) {
                Some("done") => TableStatus::Done,
                _ => TableStatus::Copying,
            };
            let at = format!("{TABLE_STATE} of {name:?}");
            state.tables.insert(
                name.to_string(),
                TableState {
                    status,
                    position: Position::new(
                        json_u64(&t, &at, "commit")?,
                        json_u64(&t, &at, "ordinal")?,
                    ),
                    rows: json_u64(&t, &at, "rows")?,
                    source_id: t
                        .get("source_id")
                        .and_then(|s| s.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    shape: t
                        .get("shape")
                        .and_then(|s| s.as_str())
                        .and_then(|s| serde_json::from_str(s).ok()),
                },
            );
        }
        Ok(Some(state))
    }

    async fn start(&self, position: Position, origin: &str) -> Result<()> {
        let mut vars = Variables::new();
        vars.insert("pc", position.commit as i64);
        vars.insert("po", position.ordinal as i64);
        vars.insert("origin", origin.to_string());
        self.run(
            "recording the start position",
            format!(
                "UPSERT {CHECKPOINT_TABLE}:main CONTENT {{ commit: $pc, ordinal: $po, origin: $origin, updated_at: time::now() }};"
            ),
            vars,
        )
        .await?;
        Ok(())
    }

    async fn mark(&self, marker: &Marker, at: Position, applied: u64) -> Result<()> {
        let state = crate::sink::MarkerState {
            id: marker.id.clone(),
            applied,
            position: at,
        };
        let mut vars = Variables::new();
        vars.insert(
            "m",
            serde_json::to_string(&state)
                .map_err(|e| Error::definite("cannot encode a marker").with_source(e))?,
        );
        self.run(
            "recording a cutover marker",
            format!("UPDATE {CHECKPOINT_TABLE}:main SET marker = $m RETURN NONE;"),
            vars,
        )
        .await?;
        Ok(())
    }

    async fn cutover_record(&self) -> Result<Option<serde_json::Value>> {
        if !self.defined.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        let read = self
            .run(
                "reading the cutover record",
                format!("SELECT record, updated_at FROM {CUTOVER_TABLE} ORDER BY updated_at DESC LIMIT 1;"),
                Variables::new(),
            )
            .await;
        let mut resp = match read {
            Ok(r) => r,
            Err(e) if e.report().contains("does not exist") => return Ok(None),
            Err(e) => return Err(e),
        };
        let rows: Vec<serde_json::Value> = resp
            .take(0)
            .map_err(|e| surreal_error("reading the cutover record", e))?;
        rows.first()
            .and_then(|r| r.get("record"))
            .and_then(|r| r.as_str())
            .map(|text| {
                serde_json::from_str(text).map_err(|e| {
                    Error::definite(format!("{CUTOVER_TABLE} holds a record that is not JSON"))
                        .with_source(e)
                })
            })
            .transpose()
    }

    async fn save_cutover_record(&self, id: &str, record: &serde_json::Value) -> Result<()> {
        let mut vars = Variables::new();
        vars.insert("id", RecordId::new(CUTOVER_TABLE, id.to_string()));
        vars.insert("r", record.to_string());
        self.run(
            "recording the cutover",
            format!(
                "DEFINE TABLE IF NOT EXISTS {CUTOVER_TABLE} SCHEMALESS; UPSERT $id SET record = $r, updated_at = time::now() RETURN NONE;"
            ),
            vars,
        )
        .await?;
        Ok(())
    }

    async fn count(&self, table: &TableSchema) -> Result<u64> {
        let mut vars = Variables::new();
        vars.insert("t", table.target_name.clone());
        let sql = if table.whole_row {
            format!("RETURN math::sum((SELECT VALUE {COPIES_FIELD} FROM type::table($t))) ?? 0;")
        } else {
            "RETURN (SELECT count() AS n FROM type::table($t) GROUP ALL)[0].n ?? 0;".to_string()
        };
        let mut resp = self
            .run(
                format!("counting the records of {}", table.target_name),
                sql,
                vars,
            )
            .await?;
        let n: Option<i64> = resp
            .take(0)
            .map_err(|e| surreal_error("counting records", e))?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn forget_table(&self, name: &str) -> Result<()> {
        let mut vars = Variables::new();
        vars.insert("sid", RecordId::new(TABLE_STATE, name.to_string()));
        self.run(
            format!("forgetting the copy state of table {name:?}"),
            "DELETE $sid;".into(),
            vars,
        )
        .await?;
        Ok(())
    }

    async fn begin_table(&self, table: &TableSchema) -> Result<()> {
        let mut vars = Variables::new();
        vars.insert("sid", RecordId::new(TABLE_STATE, table.name.clone()));
        vars.insert("name", table.name.clone());
        let old = self.shapes.lock().await.get(&table.name).cloned();
        // Copied again after a change it could not follow in place: defined
        // anew in the shape the copy has; a table new to the target defined.
        let anew = match old.filter(|o| !o.same_shape(table)) {
            Some(_) => format!(
                "REMOVE TABLE IF EXISTS {}; {}",
                ident(&table.target_name),
                define_table(table, self.schemafull)
            ),
            None => define_table(table, self.schemafull),
        };
        self.run(
            format!("emptying table {:?} before copying it", table.target_name),
            format!(
                "BEGIN TRANSACTION; {anew} DELETE {}; UPSERT $sid CONTENT {{ name: $name, status: 'copying', commit: 0, ordinal: 0, rows: 0, updated_at: time::now() }}; COMMIT TRANSACTION;",
                ident(&table.target_name)
            ),
            vars,
        )
        .await?;
        Ok(())
    }

    async fn load(&self, table: &TableSchema, rows: &[Row]) -> Result<u64> {
        if table.whole_row {
            let mut fitting = Vec::with_capacity(rows.len());
            for row in rows {
                if !self.set_aside(table, row, "snapshot", None)? {
                    fitting.push(row.clone());
                }
            }
            self.load_counted(table, &fitting).await?;
            return Ok(fitting.len() as u64);
        }
        let mut fitting = Vec::with_capacity(rows.len());
        for row in rows {
            if !self.set_aside(table, row, "snapshot", None)? {
                fitting.push(row);
            }
        }
        self.insert_rows(table, &fitting).await
    }

    async fn finish_table(&self, table: &TableSchema, position: Position, rows: u64) -> Result<()> {
        let mut vars = Variables::new();
        vars.insert("sid", RecordId::new(TABLE_STATE, table.name.clone()));
        vars.insert("name", table.name.clone());
        vars.insert("pc", position.commit as i64);
        vars.insert("po", position.ordinal as i64);
        vars.insert("rows", rows as i64);
        vars.insert("source_id", table.source_id.clone());
        vars.insert("shape", shape_text(table)?);
        self.run(
            format!("marking table {:?} as copied", table.name),
            "UPSERT $sid CONTENT { name: $name, status: 'done', commit: $pc, ordinal: $po, rows: $rows, source_id: $source_id, shape: $shape, updated_at: time::now() };".into(),
            vars,
        )
        .await?;
        self.shapes
            .lock()
            .await
            .insert(table.name.clone(), Arc::new(table.clone()));
        Ok(())
    }

    async fn after_snapshot(&self, tables: &[Arc<TableSchema>]) -> Result<()> {
        for t in tables {
            let (ql, _) = crate::schema::surreal::index_ql(t);
            for q in ql {
                self.run(
                    format!("building an index of {:?}: {q}", t.target_name),
                    q.clone(),
                    Variables::new(),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn expected_records(&self, table: &TableSchema, rows: &[Row]) -> Result<Vec<Record>> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            // Rows the run sets aside are not expected in the target.
            if !self.set_aside(table, r, "verify", None)? {
                out.push(self.encode(table, r)?);
            }
        }
        Ok(out)
    }

    async fn records(
        &self,
        table: &TableSchema,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page> {
        use surrealdb::types::ToSql;
        let mut vars = Variables::new();
        vars.insert("l", limit as i64);
        let filter = match after.and_then(|c| c.0.downcast_ref::<RecordId>()) {
            Some(last) => {
                vars.insert("last", last.clone());
                "WHERE id > $last "
            }
            None => "",
        };
        let mut resp = match self
            .run(
                format!("reading table {:?} for verify", table.target_name),
                format!(
                    "SELECT * FROM {} {filter}ORDER BY id LIMIT $l;",
                    ident(&table.target_name)
                ),
                vars,
            )
            .await
        {
            Ok(r) => r,
            Err(e) if e.report().contains("does not exist") => {
                return Ok(Page {
                    records: Vec::new(),
                    stored: 0,
                    next: None,
                })
            }
            Err(e) => return Err(e),
        };
        let rows: Vec<SValue> = resp
            .take(0)
            .map_err(|e| surreal_error(format!("reading table {:?}", table.target_name), e))?;
        let mut page = Page {
            records: Vec::with_capacity(rows.len()),
            stored: rows.len(),
            next: None,
        };
        for r in rows {
            let SValue::Object(mut obj) = r else { continue };
            if let Some(SValue::RecordId(id)) = obj.get("id") {
                page.next = Some(Cursor(Box::new(id.clone())));
            }
            let key = obj.get("id").map(|id| id.to_sql()).unwrap_or_default();
            let copies = if table.whole_row {
                match obj.remove(COPIES_FIELD) {
                    Some(SValue::Number(Number::Int(n))) if n > 0 => n as usize,
                    _ => 1,
                }
            } else {
                1
            };
            let value = SValue::Object(obj).to_sql();
            for _ in 0..copies {
                page.records.push((key.clone(), value.clone()));
            }
        }
        Ok(page)
    }

    async fn apply(&self, changes: &[Change], checkpoint: Position) -> Result<Durable> {
        use std::sync::atomic::Ordering;
        if self.uncertain.load(Ordering::SeqCst) {
            let now = self.state().await?.and_then(|s| s.checkpoint);
            self.uncertain.store(false, Ordering::SeqCst);
            if now == Some(checkpoint) && !changes.is_empty() {
                info!(checkpoint = %checkpoint, "the batch was committed before the connection was lost; not applying it again");
                return Ok(Durable::committed(checkpoint));
            }
        }
        // Changes SurrealDB refused in an earlier try of this batch, set
        // aside (with `reject_dir`): the batch is tried again without them.
        use surrealdb::types::ToSql;
        let mut refused = std::collections::HashSet::new();
        loop {
            let e = match self.apply_once(changes, checkpoint, &refused).await {
                Ok(d) => return Ok(d),
                Err(e) => e,
            };
            let message = e.to_string();
            let Some(field) = refused_field(&message) else {
                return Err(e);
            };
            // The change that wrote the record SurrealDB names: the last
            // write of it in the batch.
            let Some((i, ch, row)) = message
                .split_once("with record `")
                .and_then(|(_, r)| r.split_once('`'))
                .and_then(|(record, _)| {
                    changes
                        .iter()
                        .enumerate()
                        .rev()
                        .find_map(|(i, ch)| match &ch.op {
                            Op::Insert { row } | Op::Update { row, .. }
                                if !refused.contains(&i)
                                    && record_id(&ch.table, &ch.table.key_of(row)).is_ok_and(
                                        |id| SValue::RecordId(id).to_sql() == record,
                                    ) =>
                            {
                                Some((i, ch, row))
                            }
                            _ => None,
                        })
                })
            else {
                return Err(e);
            };
            self.refused(&ch.table, row, &field, &message, Some(ch.position))?;
            refused.insert(i);
        }
    }
}

impl SurrealSink {
    /// One try of a batch: its changes but the `refused` ones (whose rows'
    /// old versions are removed, as for a row set aside), and the
    /// checkpoint, in one transaction.
    async fn apply_once(
        &self,
        changes: &[Change],
        checkpoint: Position,
        refused: &std::collections::HashSet<usize>,
    ) -> Result<Durable> {
        let mut sql = String::with_capacity(64 * changes.len() + 512);
        let mut vars = Variables::new();
        sql.push_str("BEGIN TRANSACTION;\n");
        sql.push_str(&format!(
            "LET $cp = (SELECT commit, ordinal FROM ONLY {CHECKPOINT_TABLE}:main);\n\
             IF $cp != NONE AND ($cp.commit > $pc OR ($cp.commit == $pc AND $cp.ordinal > $po)) {{ THROW 'refusing to move the checkpoint backwards from ' + <string>$cp.commit + '.' + <string>$cp.ordinal + ' to ' + <string>$pc + '.' + <string>$po; }};\n"
        ));
        vars.insert("pc", checkpoint.commit as i64);
        vars.insert("po", checkpoint.ordinal as i64);
        if !changes.is_empty() {
            // Changes up to exactly this checkpoint are in already: a batch
            // replayed (after a lost connection, or by a second process)
            // is recognised in the transaction that would apply it again.
            sql.push_str(&format!(
                "IF $cp != NONE AND $cp.commit == $pc AND $cp.ordinal == $po {{ THROW '{ALREADY_APPLIED}'; }};\n"
            ));
        }
        let mut shapes = self.shapes.lock().await.clone();
        for (i, ch) in changes.iter().enumerate() {
            let t = &ch.table;
            let from = match &ch.op {
                Op::Ddl(Ddl::Rename { from }) => from.as_str(),
                _ => t.name.as_str(),
            };
            self.follow(&mut sql, &mut vars, &mut shapes, i, from, t)?;
            if let Op::Ddl(ddl) = &ch.op {
                self.apply_ddl(&mut sql, &mut vars, &mut shapes, i, t, ddl)?;
                continue;
            }
            if let Op::Insert { row } | Op::Update { row, .. } = &ch.op {
                if refused.contains(&i) || self.set_aside(t, row, "stream", Some(ch.position))? {
                    // The row's old version goes too: the target holds
                    // every source row but the ones set aside.
                    match &ch.op {
                        Op::Update {
                            old_key: Some(old), ..
                        } if t.whole_row => {
                            let gone = Change {
                                table: t.clone(),
                                op: Op::Delete { key: old.clone() },
                                position: ch.position,
                            };
                            counted_change(&mut sql, &mut vars, i, &gone)?;
                        }
                        Op::Update { old_key, row } if !t.whole_row => {
                            let old = old_key.clone().unwrap_or_else(|| t.key_of(row));
                            vars.insert(format!("r{i}"), record_id(t, &old)?);
                            sql.push_str(&format!("DELETE $r{i} RETURN NONE;\n"));
                        }
                        _ => {}
                    }
                    continue;
                }
            }
            if t.whole_row {
                counted_change(&mut sql, &mut vars, i, ch)?;
                continue;
            }
            match &ch.op {
                Op::Update { old_key, row } if row.iter().any(Value::is_unchanged) => {
                    // Unchanged columns keep their value in the target: MERGE
                    // the rest; on a key change, move the old record first.
                    vars.insert(format!("r{i}"), record_id(t, &t.key_of(row))?);
                    vars.insert(format!("c{i}"), changed_fields(t, row)?);
                    if let Some(old) = old_key {
                        move_record(&mut sql, &mut vars, i, t, old, &t.key_of(row))?;
                        sql.push_str(&format!(
                            "IF $p{i} != NONE {{ UPSERT $r{i} CONTENT $p{i} RETURN NONE; }};\n"
                        ));
                    }
                    // UPDATE, not UPSERT: SurrealDB 3.3's `UPSERT … MERGE …
                    // RETURN NONE` checks a SCHEMAFULL table's required
                    // fields as if the record were new, and refuses an
                    // existing one. A record that is not there cannot take
                    // a change that leaves columns as they are.
                    vars.insert(
                        format!("m{i}"),
                        format!(
                            "table {:?}, key {}: an update that leaves columns unchanged (PostgreSQL sends a TOASTed value it did not change as \"unchanged\") found no row in the target to keep them from, so the target has drifted from the source; copy the table again",
                            t.name,
                            t.describe_key(&t.key_of(row))
                        ),
                    );
                    sql.push_str(&format!(
                        "IF record::exists($r{i}) {{ UPDATE $r{i} MERGE $c{i} RETURN NONE; }} ELSE {{ THROW $m{i}; }};\n"
                    ));
                }
                Op::Insert { row } | Op::Update { old_key: None, row } => {
                    vars.insert(format!("r{i}"), record_id(t, &t.key_of(row))?);
                    vars.insert(format!("c{i}"), content(t, row)?);
                    sql.push_str(&format!("UPSERT $r{i} CONTENT $c{i} RETURN NONE;\n"));
                }
                Op::Update {
                    old_key: Some(old),
                    row,
                } => {
                    vars.insert(format!("r{i}"), record_id(t, &t.key_of(row))?);
                    vars.insert(format!("c{i}"), content(t, row)?);
                    move_record(&mut sql, &mut vars, i, t, old, &t.key_of(row))?;
                    sql.push_str(&format!("UPSERT $r{i} CONTENT $c{i} RETURN NONE;\n"));
                }
                Op::Delete { key } => {
                    vars.insert(format!("r{i}"), record_id(t, key)?);
                    sql.push_str(&format!("DELETE $r{i} RETURN NONE;\n"));
                }
                Op::Truncate => {
                    sql.push_str(&format!("DELETE {} RETURN NONE;\n", ident(&t.target_name)));
                }
                Op::Ddl(_) => {}
            }
        }
        sql.push_str(&format!(
            "UPSERT {CHECKPOINT_TABLE}:main SET commit = $pc, ordinal = $po, updated_at = time::now() RETURN NONE;\nCOMMIT TRANSACTION;\n"
        ));
        let context = match (changes.first(), changes.last()) {
            (Some(a), Some(b)) => format!(
                "applying {} changes at positions {}..={} (first: table {:?}, key {})",
                changes.len(),
                a.position,
                b.position,
                a.table.name,
                a.table.describe_key(&a.key())
            ),
            _ => format!("moving the checkpoint to {checkpoint}"),
        };
        if let Err(e) = self.run(context, sql, vars).await {
            if e.report().contains(ALREADY_APPLIED) {
                info!(checkpoint = %checkpoint, "the batch is in the target already; not applying it again");
                return Ok(Durable::committed(checkpoint));
            }
            if e.is_transient() {
                self.uncertain
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            return Err(e);
        }
        *self.shapes.lock().await = shapes;
        Ok(Durable::committed(checkpoint))
    }
}

/// Whether `namespace` and its `database` are defined, read without
/// selecting (and so creating) either.
/// A connection to `endpoint`, signed in as the configured root user where
/// `sign_in` (a remote server) and credentials are given.
async fn signed_in(
    endpoint: &str,
    sign_in: bool,
    config: &Config,
) -> Result<crate::surreal::Store> {
    let shown = redact_url(endpoint);
    let open = || async {
        crate::surreal::open(endpoint, config.target.memory_mb)
            .await
            .map_err(|m| Error::connect(format!("cannot connect to SurrealDB at {shown}: {m}")))
    };
    if !sign_in {
        if let Some(db) = crate::surreal::shared(endpoint, open).await? {
            return Ok(db);
        }
        return open().await;
    }
    let db = open().await?;
    crate::surreal::sign_in(
        &db,
        &shown,
        &config.target.username,
        &config.target.password,
    )
    .await?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> SValue {
        to_surreal(&Value::Json(s.into())).unwrap()
    }

    #[test]
    fn json_numbers_stay_exact() {
        assert_eq!(json("12"), SValue::Number(Number::Int(12)));
        assert_eq!(json("0.5"), SValue::Number(Number::Float(0.5)));
        assert_eq!(json("1e2"), SValue::Number(Number::Float(100.0)));
        let big = "12345678901234567890123";
        assert_eq!(
            json(big),
            SValue::Number(Number::Decimal(big.parse().unwrap()))
        );
        assert_eq!(
            json("0.1000000000000000000001"),
            SValue::Number(Number::Decimal("0.1000000000000000000001".parse().unwrap()))
        );
        assert_eq!(
            json("123456789012345678901234567890.5"),
            SValue::String("123456789012345678901234567890.5".into())
        );
        let SValue::Object(o) = json(
            r#"{"id": 12345678901234567890123, "a": [1, "x\"y", null, true], "b": {"c": -0.25}}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            o.get("id"),
            Some(&SValue::Number(Number::Decimal(big.parse().unwrap())))
        );
        assert_eq!(
            o.get("a"),
            Some(&SValue::Array(Array::from(vec![
                SValue::Number(Number::Int(1)),
                SValue::String("x\"y".into()),
                SValue::Null,
                SValue::Bool(true)
            ])))
        );
        assert!(to_surreal(&Value::Json("{\"a\": }".into())).is_err());
    }

    #[test]
    fn decimals_are_exact_or_text() {
        assert_eq!(
            to_surreal(&Value::Decimal("12.50".into())).unwrap(),
            SValue::Number(Number::Decimal("12.50".parse().unwrap()))
        );
        let long = "12345678901234567890.0123456789";
        assert_eq!(
            to_surreal(&Value::Decimal(long.into())).unwrap(),
            SValue::String(long.into())
        );
    }
}

#[cfg(test)]
mod type_tests {
    use super::*;

    #[test]
    fn an_interval_of_fixed_length_is_a_duration_and_no_other() {
        let d = |s| fixed_interval(s);
        assert_eq!(d("PT0S"), Some(std::time::Duration::ZERO));
        assert_eq!(
            d("P3DT4H5M6.5S"),
            Some(std::time::Duration::new(
                3 * 86400 + 4 * 3600 + 5 * 60 + 6,
                500_000_000
            ))
        );
        assert_eq!(d("PT0.000001S"), Some(std::time::Duration::from_micros(1)));
        assert_eq!(d("P10D"), Some(std::time::Duration::from_secs(864_000)));
        // Months and years have no fixed length; a negative part is no
        // duration; malformed text is none either.
        for s in [
            "P1Y",
            "P1M",
            "P1Y2M3DT4H",
            "P-1D",
            "PT-1S",
            "P1DT-2H",
            "",
            "P",
            "PT",
            "1 day",
            "P1.5D",
            "PT1.5H",
        ] {
            assert_eq!(d(s), None, "{s}");
        }
    }

    #[test]
    fn uuids_dates_and_infinities_convert_or_say_why_not() {
        let col = |logical| Column {
            name: "c".into(),
            source_type: String::new(),
            logical,
            nullable: true,
        };
        use crate::model::LogicalType as L;
        let text = |s: &str| Value::Text(s.into());
        assert!(matches!(
            column_value(&col(L::Uuid), &text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
            Ok(SValue::Uuid(_))
        ));
        assert!(column_value(&col(L::Uuid), &text("nope")).is_err());
        let SValue::Datetime(dt) = column_value(&col(L::Date), &text("2024-02-29")).unwrap() else {
            panic!()
        };
        assert_eq!(
            chrono::DateTime::<chrono::Utc>::from(dt).to_rfc3339(),
            "2024-02-29T00:00:00+00:00"
        );
        let SValue::Datetime(bc) = column_value(&col(L::Date), &text("0044-03-15 BC")).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            chrono::Datelike::year(&chrono::DateTime::<chrono::Utc>::from(bc)),
            -43
        );
        for (l, v) in [
            (L::Date, text("infinity")),
            (L::Date, text("-infinity")),
            (L::Date, text("5874897-12-31")),
            (
                L::Timestamp,
                Value::Timestamp(chrono::DateTime::<chrono::Utc>::MAX_UTC),
            ),
            (
                L::Timestamp,
                Value::Timestamp(chrono::DateTime::<chrono::Utc>::MIN_UTC),
            ),
            (L::Timestamp, text("294276-12-31 23:59:59")),
        ] {
            let e = column_value(&col(l), &v).unwrap_err();
            assert!(e.contains("change the value in the source"), "{v:?}: {e}");
        }
        assert!(matches!(
            column_value(&col(L::Interval), &text("P1M")),
            Ok(SValue::String(s)) if s == "P1M"
        ));
    }
}
