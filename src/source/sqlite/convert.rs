//! SQLite values: declared types to logical types (affinity rules plus the
//! names applications rely on), stored cells to model values, and the rows
//! whose values do not fit (stop, or set aside in the reject files).

use sqlx::sqlite::SqliteRow;
use sqlx::{Decode, Row as _, TypeInfo, ValueRef};

use crate::error::{Error, Result};
use crate::model::{Column, LogicalType, TableSchema, Value};
use crate::position::Position;
use crate::reject::{Rejected, Rejects};

/// Maps a declared SQLite type to a logical type, following SQLite's affinity
/// rules plus the declared names users rely on (BOOLEAN, JSON, DATETIME, DECIMAL).
pub fn logical_type(declared: &str) -> (LogicalType, Option<String>) {
    let t = declared.trim().to_ascii_uppercase();
    let base = t.split('(').next().unwrap_or("").trim().to_string();
    let word = |w: &str| base.split_whitespace().any(|x| x == w);
    if base.is_empty() {
        return (LogicalType::Any, None);
    }
    if word("BOOLEAN") || word("BOOL") {
        return (LogicalType::Bool, None);
    }
    if word("DATETIME") || word("TIMESTAMP") || word("TIMESTAMPTZ") {
        return (LogicalType::Timestamp, None);
    }
    if word("DATE") {
        return (LogicalType::Date, None);
    }
    if word("UUID") || word("GUID") {
        return (LogicalType::Uuid, None);
    }
    if word("JSON") || word("JSONB") {
        return (LogicalType::Json, None);
    }
    if word("DECIMAL") || word("NUMERIC") {
        return (LogicalType::Decimal, None);
    }
    if base.contains("INT") {
        return (LogicalType::Int, None);
    }
    if base.contains("CHAR") || base.contains("CLOB") || base.contains("TEXT") {
        return (LogicalType::Text, None);
    }
    if base.contains("BLOB") {
        return (LogicalType::Bytes, None);
    }
    if base.contains("REAL") || base.contains("FLOA") || base.contains("DOUB") {
        return (LogicalType::Float, None);
    }
    (
        LogicalType::Any,
        Some(format!(
            "declared type {declared:?} has no mapping (NUMERIC affinity); each value keeps its own storage class"
        )),
    )
}

/// A cell as SQLite stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Raw {
    pub fn class(&self) -> &'static str {
        match self {
            Raw::Null => "NULL",
            Raw::Integer(_) => "INTEGER",
            Raw::Real(_) => "REAL",
            Raw::Text(_) => "TEXT",
            Raw::Blob(_) => "BLOB",
        }
    }

    pub fn shown(&self) -> String {
        match self {
            Raw::Null => "NULL".into(),
            Raw::Integer(i) => i.to_string(),
            Raw::Real(x) => format!("{x:?}"),
            Raw::Text(s) => Value::Text(s.clone()).to_string(),
            Raw::Blob(b) => format!("<{} bytes>", b.len()),
        }
    }
}

pub fn read_raw(row: &SqliteRow, idx: usize) -> Result<Raw> {
    let v = row.try_get_raw(idx)?;
    if v.is_null() {
        return Ok(Raw::Null);
    }
    let class = v.type_info().name().to_string();
    let bad = |e: sqlx::error::BoxDynError| {
        Error::definite(format!("cannot decode a {class} value")).with_source(e)
    };
    Ok(match class.as_str() {
        "INTEGER" => Raw::Integer(<i64 as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
        "REAL" => Raw::Real(<f64 as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
        "TEXT" => Raw::Text(<String as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
        _ => Raw::Blob(<Vec<u8> as Decode<sqlx::Sqlite>>::decode(v).map_err(bad)?),
    })
}

/// Parses the text forms of a timestamp SQLite applications write.
pub fn parse_timestamp(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
    let s = s.trim();
    // SQLite's own datetime() text first: most values are that.
    if s.len() == 19 && s.as_bytes()[10] == b' ' {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S") {
            return Some(t.and_utc());
        }
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%:z",
        "%Y-%m-%d %H:%M%:z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    // SQLite's own datetime() output and its relatives carry no zone: UTC.
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap().and_utc())
}

/// Checks decimal text (`-12.50`, `1e5`) and returns it as the model keeps it.
pub fn parse_decimal(s: &str) -> Option<String> {
    let t = s.trim();
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let digits = mantissa.strip_prefix(['-', '+']).unwrap_or(mantissa);
    let mut parts = digits.splitn(2, '.');
    let int = parts.next().unwrap_or("");
    let frac = parts.next().unwrap_or("");
    let ok_digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !ok_digits(int) || !ok_digits(frac) {
        return None;
    }
    if let Some(e) = exp {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        if e.is_empty() || !ok_digits(e) {
            return None;
        }
    }
    Some(t.strip_prefix('+').unwrap_or(t).to_string())
}

/// Converts a stored cell to the column's logical type, or explains why not.
pub fn convert(raw: Raw, col: &Column) -> std::result::Result<Value, String> {
    use LogicalType as L;
    let mismatch = |raw: &Raw| {
        format!(
            "column declared {:?} holds the {} value {}, which cannot be carried as {}",
            col.source_type,
            raw.class(),
            raw.shown(),
            col.logical
        )
    };
    Ok(match (col.logical, raw) {
        (_, Raw::Null) => Value::Null,
        (L::Any, Raw::Integer(i)) | (L::Int, Raw::Integer(i)) => Value::Int(i),
        (L::Any, Raw::Real(x)) | (L::Float, Raw::Real(x)) => Value::Float(x),
        (L::Float, Raw::Integer(i)) => Value::Float(i as f64),
        (L::Int, Raw::Real(x)) if x.fract() == 0.0 && x.abs() < 9.0e15 => Value::Int(x as i64),
        (L::Any, Raw::Text(s)) | (L::Text, Raw::Text(s)) => Value::Text(s),
        (L::Text, Raw::Integer(i)) => Value::Text(i.to_string()),
        (L::Text, Raw::Real(x)) => Value::Text(format!("{x:?}")),
        (L::Any, Raw::Blob(b)) | (L::Bytes, Raw::Blob(b)) => Value::Bytes(b),
        (L::Bool, Raw::Integer(0)) => Value::Bool(false),
        (L::Bool, Raw::Integer(1)) => Value::Bool(true),
        (L::Bool, Raw::Real(x)) if x == 0.0 || x == 1.0 => Value::Bool(x == 1.0),
        // Text a cast names boolean: the words SQLite applications write.
        (L::Bool, Raw::Text(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "t" | "yes" | "y" | "on" => Value::Bool(true),
            "0" | "false" | "f" | "no" | "n" | "off" => Value::Bool(false),
            _ => {
                return Err(format!(
                    "{} (a boolean is 0 or 1, true or false)",
                    mismatch(&Raw::Text(s))
                ))
            }
        },
        (L::Int, Raw::Text(s)) if s.trim().parse::<i64>().is_ok() => {
            Value::Int(s.trim().parse::<i64>().unwrap_or_default())
        }
        (L::Float, Raw::Text(s)) if s.trim().parse::<f64>().is_ok_and(f64::is_finite) => {
            Value::Float(s.trim().parse::<f64>().unwrap_or_default())
        }
        (L::Decimal, Raw::Integer(i)) => Value::Decimal(i.to_string()),
        (L::Decimal, Raw::Real(x)) if x.is_finite() => Value::Decimal(format!("{x:?}")),
        (L::Decimal, Raw::Text(s)) => match parse_decimal(&s) {
            Some(d) => Value::Decimal(d),
            None => {
                return Err(format!(
                    "{} (not a decimal number)",
                    mismatch(&Raw::Text(s))
                ))
            }
        },
        // JSON has NUMERIC affinity: a number written as JSON text is stored as a number.
        (L::Json, Raw::Integer(i)) => Value::Json(i.to_string()),
        (L::Json, Raw::Real(x)) if x.is_finite() => Value::Json(format!("{x:?}")),
        (L::Json, Raw::Text(s)) => match serde_json::from_str::<serde::de::IgnoredAny>(&s) {
            Ok(_) => Value::Json(s),
            Err(e) => return Err(format!("{} (invalid JSON: {e})", mismatch(&Raw::Text(s)))),
        },
        // A date as SQLite's date functions write it.
        (L::Date, Raw::Text(s)) => {
            if chrono::NaiveDate::parse_from_str(&s, "%Y-%m-%d").is_ok() && s.len() == 10 {
                Value::Text(s)
            } else {
                return Err(format!(
                    "{} (expected a date such as 2024-05-01)",
                    mismatch(&Raw::Text(s))
                ));
            }
        }
        // A uuid as text (with or without hyphens), or its 16 bytes.
        (L::Uuid, Raw::Text(s)) => match uuid_text(&s) {
            Some(u) => Value::Text(u),
            None => {
                return Err(format!(
                    "{} (expected a uuid such as a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11)",
                    mismatch(&Raw::Text(s))
                ))
            }
        },
        (L::Uuid, Raw::Blob(b)) if b.len() == 16 => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Value::Text(uuid_text(&hex).unwrap_or(hex))
        }
        (L::Timestamp, Raw::Text(s)) => match parse_timestamp(&s) {
            Some(t) => Value::Timestamp(t),
            None => {
                return Err(format!(
                    "{} (expected a date-time such as 2024-05-01 12:30:00 or 2024-05-01T12:30:00Z)",
                    mismatch(&Raw::Text(s))
                ))
            }
        },
        (_, raw) => return Err(mismatch(&raw)),
    })
}

/// A uuid's text in its hyphenated lowercase form, from that form or 32
/// hex digits; `None` for anything else.
fn uuid_text(s: &str) -> Option<String> {
    let hex: String = match s.len() {
        36 => {
            let dashes = [8, 13, 18, 23];
            if !s
                .char_indices()
                .all(|(i, c)| (c == '-') == dashes.contains(&i))
            {
                return None;
            }
            s.chars().filter(|c| *c != '-').collect()
        }
        32 => s.to_string(),
        _ => return None,
    };
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let h = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

/// A row holding a value its column's type cannot carry.
pub struct Misfit {
    pub column: usize,
    pub message: String,
    pub value: String,
    /// The row's key as far as it converts (`(id = 3)`).
    pub key: String,
    /// The key's values, where the misfit is in another column of a whole
    /// row: the row's old version can be deleted from the target.
    pub key_values: Option<Vec<Value>>,
    /// The cells as stored, by column name.
    pub row: serde_json::Map<String, serde_json::Value>,
}

impl Misfit {
    pub fn error(&self, table: &TableSchema) -> Error {
        Error::definite(format!(
            "table {:?}, key {}, column {:?}: {}; fix the value in the source, set pipeline.reject_dir to set such rows aside, or exclude the table with tables.exclude",
            table.name, self.key, table.columns[self.column].name, self.message
        ))
    }
}

/// Writes a misfit row to its table's reject file, or, without
/// `pipeline.reject_dir`, returns the error that stops the run.
pub fn set_aside(
    rejects: &Rejects,
    table: &TableSchema,
    m: Misfit,
    phase: &'static str,
    at: Position,
) -> Result<()> {
    if !rejects.enabled() {
        return Err(m.error(table));
    }
    rejects.record(&Rejected {
        table: table.name.clone(),
        key: m.key,
        column: Some(table.columns[m.column].name.clone()),
        value: Some(m.value),
        reason: m.message,
        phase,
        position: at.to_string(),
        row: m.row,
    })
}

impl Raw {
    pub fn json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Raw::Null => J::Null,
            Raw::Integer(i) => J::from(*i),
            Raw::Real(x) => serde_json::Number::from_f64(*x)
                .map(J::Number)
                .unwrap_or_else(|| J::String(format!("{x:?}"))),
            Raw::Text(s) => J::String(s.clone()),
            Raw::Blob(b) => J::String(crate::model::hex_text(b)),
        }
    }
}

/// Converts a row of raw cells (of columns `cols`); a misfit names the
/// column, the value and the row's key.
pub fn convert_row(
    table: &TableSchema,
    raws: Vec<Raw>,
    cols: &[usize],
) -> std::result::Result<Vec<Value>, Misfit> {
    let mut out = Vec::with_capacity(raws.len());
    let mut failure = None;
    for (raw, &ci) in raws.iter().zip(cols) {
        match convert(raw.clone(), &table.columns[ci]) {
            Ok(v) => out.push(v),
            Err(msg) => {
                failure.get_or_insert((ci, msg, raw.shown()));
                out.push(match raw {
                    Raw::Integer(i) => Value::Int(*i),
                    Raw::Text(s) => Value::Text(s.clone()),
                    _ => Value::Null,
                });
            }
        }
    }
    let Some((column, message, value)) = failure else {
        return Ok(out);
    };
    let key = if cols.len() == table.columns.len() {
        table.describe_key(&table.key_of(&out))
    } else {
        table.describe_key(&out[..table.key.len().min(out.len())])
    };
    let row = raws
        .iter()
        .zip(cols)
        .map(|(r, &ci)| (table.columns[ci].name.clone(), r.json()))
        .collect();
    let key_values = (cols.len() == table.columns.len() && !table.key.contains(&column))
        .then(|| table.key_of(&out));
    Err(Misfit {
        column,
        message,
        value,
        key,
        key_values,
        row,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_map_by_affinity_and_name() {
        for (decl, want) in [
            ("INTEGER", LogicalType::Int),
            ("BIGINT", LogicalType::Int),
            ("BOOLEAN", LogicalType::Bool),
            ("VARCHAR(20)", LogicalType::Text),
            ("REAL", LogicalType::Float),
            ("DOUBLE PRECISION", LogicalType::Float),
            ("BLOB", LogicalType::Bytes),
            ("", LogicalType::Any),
            ("JSON", LogicalType::Json),
            ("DATETIME", LogicalType::Timestamp),
            ("DATE", LogicalType::Date),
            ("UUID", LogicalType::Uuid),
            ("DECIMAL(10,2)", LogicalType::Decimal),
        ] {
            assert_eq!(logical_type(decl).0, want, "{decl}");
        }
        assert!(logical_type("MONEY").1.is_some());
    }

    #[test]
    fn uuids_and_dates_are_checked_and_uuids_normalised() {
        let col = |logical| Column {
            name: "c".into(),
            source_type: String::new(),
            logical,
            nullable: true,
        };
        let text = |s: &str| Raw::Text(s.into());
        let want = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for form in [
            want,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            assert_eq!(
                convert(text(form), &col(LogicalType::Uuid)),
                Ok(Value::Text(want.into())),
                "{form}"
            );
        }
        let bytes: Vec<u8> = (0..16).collect();
        assert_eq!(
            convert(Raw::Blob(bytes), &col(LogicalType::Uuid)),
            Ok(Value::Text("00010203-0405-0607-0809-0a0b0c0d0e0f".into()))
        );
        for bad in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99x9c0b-4ef8-bb6d-6bb9bd380a11",
            "zzeebc999c0b4ef8bb6d6bb9bd380a11",
            "",
        ] {
            assert!(
                convert(text(bad), &col(LogicalType::Uuid)).is_err(),
                "{bad}"
            );
        }
        assert!(convert(Raw::Blob(vec![1, 2]), &col(LogicalType::Uuid)).is_err());
        assert_eq!(
            convert(text("2024-02-29"), &col(LogicalType::Date)),
            Ok(Value::Text("2024-02-29".into()))
        );
        for bad in ["2023-02-29", "2024-2-1", "2024-05-01 10:00:00", "soon"] {
            assert!(
                convert(text(bad), &col(LogicalType::Date)).is_err(),
                "{bad}"
            );
        }
        assert!(convert(Raw::Integer(20240501), &col(LogicalType::Date)).is_err());
    }

    #[test]
    fn timestamps_and_decimals_parse() {
        assert_eq!(
            parse_timestamp("2024-05-01 12:30:00").unwrap().to_rfc3339(),
            "2024-05-01T12:30:00+00:00"
        );
        assert_eq!(
            parse_timestamp("2024-05-01T12:30:00+02:00")
                .unwrap()
                .to_rfc3339(),
            "2024-05-01T10:30:00+00:00"
        );
        assert!(parse_timestamp("yesterday").is_none());
        assert_eq!(parse_decimal("-12.50").as_deref(), Some("-12.50"));
        assert_eq!(parse_decimal("1e5").as_deref(), Some("1e5"));
        assert!(
            parse_decimal("1.2.3").is_none()
                && parse_decimal("abc").is_none()
                && parse_decimal("").is_none()
        );
    }

    #[test]
    fn mismatched_storage_class_names_value() {
        let col = Column {
            name: "qty".into(),
            source_type: "INTEGER".into(),
            logical: LogicalType::Int,
            nullable: true,
        };
        let e = convert(Raw::Text("lots".into()), &col).unwrap_err();
        assert!(e.contains("INTEGER") && e.contains("lots"), "{e}");
        assert_eq!(
            convert(Raw::Integer(i64::MIN), &col).unwrap(),
            Value::Int(i64::MIN)
        );
    }
}
