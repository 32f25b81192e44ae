//! SurrealDB field types and values in the neutral model.
//!
//! | SurrealDB field kind        | logical type | value                                   |
//! |-----------------------------|--------------|-----------------------------------------|
//! | `bool`                      | bool         |                                         |
//! | `int`                       | int          |                                         |
//! | `float`                     | float        |                                         |
//! | `decimal`, `number`         | decimal      | exact decimal text                      |
//! | `string`                    | text         |                                         |
//! | `datetime`                  | timestamp    | UTC                                     |
//! | `uuid`                      | uuid         | hyphenated lowercase text               |
//! | `duration`                  | interval     | ISO 8601 (`P1DT2H3M4.5S`)               |
//! | `bytes`                     | bytes        |                                         |
//! | `record<t>` (one table)     | any          | the key of the linked record (a link)   |
//! | `object`, `array`, `set`, `geometry`, `record`, `any`, unions | json | its JSON form (record ids as `table:key`) |
//! | no definition (schemaless)  | any          | each value its own class; others JSON   |
//!
//! `option<T>` makes the column nullable; NONE and NULL both become NULL
//! (a field left out of the record).

use surrealdb::types::{Number, RecordId, RecordIdKey, ToSql, Value as SValue};

use crate::model::{Column, LogicalType, Value};

/// The column a field of kind `kind` (as `INFO FOR TABLE … STRUCTURE`
/// writes it) becomes, and the table its values link to (`record<t>`).
pub fn column(name: &str, kind: Option<&str>) -> (Column, Option<String>) {
    let kind = kind.unwrap_or("any").trim();
    let (inner, nullable) = match kind
        .strip_prefix("option<")
        .and_then(|k| k.strip_suffix('>'))
    {
        Some(inner) => (inner.trim(), true),
        None => match kind
            .strip_prefix("none |")
            .or_else(|| kind.strip_suffix("| none"))
        {
            Some(inner) => (inner.trim(), true),
            None => (kind, kind == "any"),
        },
    };
    let mut link = None;
    let logical = match inner {
        "bool" => LogicalType::Bool,
        "int" => LogicalType::Int,
        "float" => LogicalType::Float,
        // `number | string` is how switchyard writes a PostgreSQL numeric
        // (its text where it has more digits than a decimal holds).
        "decimal" | "number" | "number | string" | "string | number" => LogicalType::Decimal,
        "string" => LogicalType::Text,
        "datetime" => LogicalType::Timestamp,
        "uuid" => LogicalType::Uuid,
        "duration" => LogicalType::Interval,
        "bytes" => LogicalType::Bytes,
        k => match k.strip_prefix("record<").and_then(|k| k.strip_suffix('>')) {
            Some(t) if !t.contains('|') => {
                link = Some(t.trim().to_string());
                LogicalType::Any
            }
            _ => LogicalType::Json,
        },
    };
    (
        Column {
            name: name.to_string(),
            source_type: kind.to_string(),
            logical,
            nullable,
        },
        link,
    )
}

/// A field's definition (`INFO FOR TABLE … STRUCTURE`) as a SurrealDB
/// target repeats it: its path, the clauses carried (`TYPE`, `FLEXIBLE`,
/// `DEFAULT [ALWAYS]`, `ASSERT`, `PERMISSIONS`, `COMMENT`; links to renamed
/// tables renamed), and the clauses left out: `VALUE` (the replica stores
/// what the source computed), `READONLY` (the replica writes records whole)
/// and `REFERENCE` (a delete would act twice).
pub fn definition(
    f: &serde_json::Value,
    renames: &std::collections::BTreeMap<String, String>,
) -> Option<(String, String, Vec<&'static str>)> {
    let path = f.get("name")?.as_str()?.to_string();
    let text = |k: &str| f.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty());
    let mut kind = text("kind").unwrap_or("any").to_string();
    for (from, to) in renames {
        kind = kind.replace(
            &format!("record<{from}>"),
            &format!("record<{}>", crate::schema::surreal::ident(to)),
        );
    }
    let mut out = format!("TYPE {kind}");
    if f.get("flexible").and_then(|v| v.as_bool()) == Some(true) {
        out.push_str(" FLEXIBLE");
    }
    if let Some(d) = text("default") {
        let always = f.get("default_always").and_then(|v| v.as_bool()) == Some(true);
        out.push_str(if always {
            " DEFAULT ALWAYS "
        } else {
            " DEFAULT "
        });
        out.push_str(d);
    }
    if let Some(a) = text("assert") {
        out.push_str(&format!(" ASSERT {a}"));
    }
    if let Some(c) = text("comment") {
        out.push_str(&format!(" COMMENT {}", serde_json::Value::from(c)));
    }
    if let Some(p) = f.get("permissions").and_then(|p| p.as_object()) {
        let each: Vec<String> = ["select", "create", "update"]
            .iter()
            .filter_map(|op| {
                let rule = match p.get(*op)? {
                    serde_json::Value::Bool(true) => "FULL".to_string(),
                    serde_json::Value::Bool(false) => "NONE".to_string(),
                    serde_json::Value::String(w) => format!("WHERE {w}"),
                    _ => return None,
                };
                Some(format!("FOR {op} {rule}"))
            })
            .collect();
        if each.len() == 3 && each.iter().all(|e| e.ends_with(" FULL")) {
            out.push_str(" PERMISSIONS FULL");
        } else if !each.is_empty() {
            out.push_str(&format!(" PERMISSIONS {}", each.join(", ")));
        }
    }
    let mut left = Vec::new();
    if text("value").is_some() {
        left.push("VALUE");
    }
    if f.get("readonly").and_then(|v| v.as_bool()) == Some(true) {
        left.push("READONLY");
    }
    if f.get("reference").is_some_and(|r| !r.is_null()) {
        left.push("REFERENCE");
    }
    Some((path, out, left))
}

/// `DEFINE INDEX name ON table rest` (as `INFO FOR TABLE` writes it) as
/// its name and `rest`.
pub fn index_clauses(statement: &str) -> Option<(String, String)> {
    let rest = statement.strip_prefix("DEFINE INDEX ")?;
    let (name, rest) = token(rest)?;
    let rest = rest.strip_prefix(" ON ")?;
    let rest = rest.strip_prefix("TABLE ").unwrap_or(rest);
    let (_table, rest) = token(rest)?;
    Some((
        name.trim_matches('`').replace("\\`", "`"),
        rest.trim().to_string(),
    ))
}

/// The analyzer names `ANALYZER x` in index clauses.
pub fn analyzer_of(clauses: &str) -> Option<&str> {
    let at = clauses.find(" ANALYZER ")? + " ANALYZER ".len();
    token(&clauses[at..]).map(|(name, _)| name.trim_matches('`'))
}

/// The first identifier of `s` (backtick-quoted or up to a space) and the
/// rest.
fn token(s: &str) -> Option<(&str, &str)> {
    if let Some(quoted) = s.strip_prefix('`') {
        let mut escaped = false;
        for (i, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '`' if !escaped => return Some((&s[..i + 2], &quoted[i + 1..])),
                _ => escaped = false,
            }
        }
        None
    } else {
        let end = s.find(' ').unwrap_or(s.len());
        Some((&s[..end], &s[end..]))
    }
}

/// The column of a field that no definition types (a schemaless table's).
pub fn undefined(name: &str) -> Column {
    Column {
        name: name.to_string(),
        source_type: String::new(),
        logical: LogicalType::Any,
        nullable: true,
    }
}

/// What kind of value this is, for messages.
pub fn kind_of(v: &SValue) -> &'static str {
    match v {
        SValue::None => "NONE",
        SValue::Null => "NULL",
        SValue::Bool(_) => "bool",
        SValue::Number(Number::Int(_)) => "int",
        SValue::Number(Number::Float(_)) => "float",
        SValue::Number(Number::Decimal(_)) => "decimal",
        SValue::String(_) => "string",
        SValue::Bytes(_) => "bytes",
        SValue::Duration(_) => "duration",
        SValue::Datetime(_) => "datetime",
        SValue::Uuid(_) => "uuid",
        SValue::Geometry(_) => "geometry",
        SValue::Table(_) => "table",
        SValue::RecordId(_) => "record",
        SValue::File(_) => "file",
        SValue::Range(_) => "range",
        SValue::Regex(_) => "regex",
        SValue::Array(_) => "array",
        SValue::Object(_) => "object",
        SValue::Set(_) => "set",
    }
}

/// A record id's key as the value of the key column.
pub fn key_value(key: &RecordIdKey) -> Value {
    match key {
        RecordIdKey::Number(i) => Value::Int(*i),
        RecordIdKey::String(s) => Value::Text(s.clone()),
        RecordIdKey::Uuid(u) => Value::Text(u.to_string()),
        RecordIdKey::Array(a) => json(SValue::Array(a.clone())),
        RecordIdKey::Object(o) => json(SValue::Object(o.clone())),
        RecordIdKey::Range(_) => Value::Text(key.to_sql()),
    }
}

/// The logical type a key column takes for keys of this kind.
pub fn key_type(key: &RecordIdKey) -> LogicalType {
    match key {
        RecordIdKey::Number(_) => LogicalType::Int,
        RecordIdKey::String(_) => LogicalType::Text,
        RecordIdKey::Uuid(_) => LogicalType::Uuid,
        RecordIdKey::Array(_) | RecordIdKey::Object(_) => LogicalType::Json,
        RecordIdKey::Range(_) => LogicalType::Any,
    }
}

/// A duration as ISO 8601 (`P1DT2H3M4.5S`), as PostgreSQL takes an
/// interval and writes one with `IntervalStyle = iso_8601`.
pub fn iso_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    let nanos = d.subsec_nanos();
    let mut out = String::from("P");
    if days > 0 {
        out.push_str(&format!("{days}D"));
    }
    if h > 0 || m > 0 || s > 0 || nanos > 0 || days == 0 {
        out.push('T');
        if h > 0 {
            out.push_str(&format!("{h}H"));
        }
        if m > 0 {
            out.push_str(&format!("{m}M"));
        }
        if s > 0 || nanos > 0 || (h == 0 && m == 0) {
            if nanos > 0 {
                let frac = format!("{nanos:09}");
                out.push_str(&format!("{s}.{}S", frac.trim_end_matches('0')));
            } else {
                out.push_str(&format!("{s}S"));
            }
        }
    }
    out
}

/// An object, array or other value as JSON; kept as it is beside its JSON
/// where JSON would change it (see [`Value::Native`]).
fn json(v: SValue) -> Value {
    if json_keeps(&v) {
        return Value::Json(v.into_json_value().to_string());
    }
    Value::Native(Box::new(crate::model::Native {
        json: v.clone().into_json_value().to_string(),
        value: v,
    }))
}

/// Whether JSON holds the value as it is: no datetime, decimal, record
/// id, duration, uuid, bytes, geometry or other SurrealDB kind in it.
fn json_keeps(v: &SValue) -> bool {
    match v {
        SValue::None
        | SValue::Null
        | SValue::Bool(_)
        | SValue::String(_)
        | SValue::Number(Number::Int(_) | Number::Float(_)) => true,
        SValue::Array(a) => a.iter().all(json_keeps),
        SValue::Object(o) => o.values().all(json_keeps),
        _ => false,
    }
}

fn decimal_text(n: &Number) -> String {
    match n {
        Number::Int(i) => i.to_string(),
        Number::Float(x) if x.is_nan() => "NaN".into(),
        Number::Float(x) if x.is_infinite() && *x > 0.0 => "Infinity".into(),
        Number::Float(x) if x.is_infinite() => "-Infinity".into(),
        Number::Float(x) => format!("{x:?}"),
        Number::Decimal(d) => d.to_string(),
    }
}

/// A value that does not fit its column: why, and the value as SurrealQL
/// writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub message: String,
    pub value: String,
}

/// A field's value as column `col`'s; `link` is the table a `record<t>`
/// field links to. Why not, where it does not fit.
pub fn convert(col: &Column, link: Option<&str>, v: SValue) -> Result<Value, Refused> {
    use LogicalType as L;
    let refuse = |v: &SValue| {
        let value = v.to_sql();
        Refused {
            message: format!(
                "the field is declared {}, and holds {} {}",
                if col.source_type.is_empty() {
                    "any"
                } else {
                    &col.source_type
                },
                kind_of(v),
                cut(&value)
            ),
            value,
        }
    };
    Ok(match (col.logical, v) {
        (_, SValue::None | SValue::Null) => Value::Null,
        (l, SValue::RecordId(r)) if link.is_some() => {
            if Some(r.table.as_str()) != link {
                let value = r.to_sql();
                return Err(Refused {
                    message: format!(
                        "the field links to table {:?}, and holds a link to {value}",
                        link.unwrap_or_default(),
                    ),
                    value,
                });
            }
            if l != L::Any && key_type(&r.key) != l {
                let value = r.to_sql();
                return Err(Refused {
                    message: format!(
                        "the field links to {} keys of table {:?}, and holds {value}",
                        l,
                        link.unwrap_or_default(),
                    ),
                    value,
                });
            }
            key_value(&r.key)
        }
        (L::Bool, SValue::Bool(b)) => Value::Bool(b),
        (L::Int, SValue::Number(Number::Int(i))) => Value::Int(i),
        (L::Float, SValue::Number(Number::Float(x))) => Value::Float(x),
        (L::Float, SValue::Number(Number::Int(i))) => Value::Float(i as f64),
        (L::Decimal, SValue::Number(n)) => Value::Decimal(decimal_text(&n)),
        (L::Decimal, SValue::String(s))
            if !s.is_empty()
                && s.trim_start_matches('-')
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.') =>
        {
            Value::Decimal(s)
        }
        (L::Text, SValue::String(s)) => Value::Text(s),
        (L::Timestamp, SValue::Datetime(d)) => Value::Timestamp(d.into_inner()),
        (L::Uuid, SValue::Uuid(u)) => Value::Text(u.to_string()),
        (L::Interval, SValue::Duration(d)) => Value::Text(iso_duration(d.into_inner())),
        (L::Bytes, SValue::Bytes(b)) => Value::Bytes(b.into_inner().to_vec()),
        (L::Json, v) => json(v),
        (L::Any, v) => match v {
            SValue::Bool(b) => Value::Bool(b),
            SValue::Number(Number::Int(i)) => Value::Int(i),
            SValue::Number(Number::Float(x)) => Value::Float(x),
            SValue::Number(n @ Number::Decimal(_)) => Value::Decimal(decimal_text(&n)),
            SValue::String(s) => Value::Text(s),
            SValue::Bytes(b) => Value::Bytes(b.into_inner().to_vec()),
            SValue::Datetime(d) => Value::Timestamp(d.into_inner()),
            SValue::Uuid(u) => Value::Text(u.to_string()),
            SValue::Duration(d) => Value::Text(iso_duration(d.into_inner())),
            SValue::RecordId(r) => Value::Text(r.to_sql()),
            v => json(v),
        },
        (_, v) => return Err(refuse(&v)),
    })
}

/// A record's id, or why it has none.
pub fn record_id(v: &SValue) -> Option<&RecordId> {
    match v {
        SValue::RecordId(r) => Some(r),
        _ => None,
    }
}

fn cut(s: &str) -> String {
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_statements_split_into_name_and_clauses() {
        assert_eq!(
            index_clauses("DEFINE INDEX `my ix` ON c FIELDS n UNIQUE"),
            Some(("my ix".into(), "FIELDS n UNIQUE".into()))
        );
        let (name, rest) =
            index_clauses("DEFINE INDEX words ON `odd table` FIELDS email FULLTEXT ANALYZER simple BM25(1.2,0.75)")
                .unwrap();
        assert_eq!(name, "words");
        assert_eq!(rest, "FIELDS email FULLTEXT ANALYZER simple BM25(1.2,0.75)");
        assert_eq!(analyzer_of(&rest), Some("simple"));
        assert_eq!(
            index_clauses("DEFINE INDEX cnt ON c COUNT"),
            Some(("cnt".into(), "COUNT".into()))
        );
        assert_eq!(index_clauses("DEFINE FIELD x ON c"), None);
    }

    #[test]
    fn field_definitions_carry_what_a_replica_keeps() {
        let f = serde_json::json!({
            "name": "owner", "kind": "none | record<user>", "default": "NONE",
            "default_always": true, "assert": "$value != person:0", "comment": "who 'owns' it",
            "permissions": { "select": true, "create": "owner = $auth.id", "update": false },
            "readonly": true, "value": "$before.owner", "reference": { "on_delete": "CASCADE" }
        });
        let renames =
            std::collections::BTreeMap::from([("user".to_string(), "person".to_string())]);
        let (path, clauses, left) = definition(&f, &renames).unwrap();
        assert_eq!(path, "owner");
        assert_eq!(
            clauses,
            "TYPE none | record<`person`> DEFAULT ALWAYS NONE ASSERT $value != person:0 COMMENT \"who 'owns' it\" \
             PERMISSIONS FOR select FULL, FOR create WHERE owner = $auth.id, FOR update NONE"
        );
        assert_eq!(left, ["VALUE", "READONLY", "REFERENCE"]);
        let flexible = serde_json::json!({ "name": "prefs", "kind": "object", "flexible": true });
        assert_eq!(
            definition(&flexible, &Default::default()).unwrap().1,
            "TYPE object FLEXIBLE"
        );
        let open = serde_json::json!({ "name": "n", "kind": "int",
            "permissions": { "select": true, "create": true, "update": true } });
        assert_eq!(
            definition(&open, &Default::default()).unwrap().1,
            "TYPE int PERMISSIONS FULL"
        );
    }

    #[test]
    fn field_kinds_map_to_logical_types() {
        let (c, link) = column("total", Some("decimal"));
        assert_eq!(
            (c.logical, c.nullable, link),
            (LogicalType::Decimal, false, None)
        );
        let (c, link) = column("note", Some("option<string>"));
        assert_eq!(
            (c.logical, c.nullable, link),
            (LogicalType::Text, true, None)
        );
        let (c, link) = column("customer", Some("record<customer>"));
        assert_eq!(
            (c.logical, c.nullable, link.as_deref()),
            (LogicalType::Any, false, Some("customer"))
        );
        let (c, link) = column("owner", Some("option<record<user | team>>"));
        assert_eq!(
            (c.logical, c.nullable, link),
            (LogicalType::Json, true, None)
        );
        assert_eq!(
            column("tags", Some("array<string>")).0.logical,
            LogicalType::Json
        );
        assert_eq!(
            column("loc", Some("geometry<point>")).0.logical,
            LogicalType::Json
        );
        assert_eq!(
            column("span", Some("duration")).0.logical,
            LogicalType::Interval
        );
        assert!(column("x", None).0.nullable);
    }

    #[test]
    fn durations_are_iso_8601_as_postgresql_writes_them() {
        use std::time::Duration as D;
        assert_eq!(iso_duration(D::from_secs(0)), "PT0S");
        assert_eq!(iso_duration(D::from_secs(90)), "PT1M30S");
        assert_eq!(iso_duration(D::from_secs(86_400)), "P1D");
        assert_eq!(iso_duration(D::new(93_784, 500_000_000)), "P1DT2H3M4.5S");
        assert_eq!(iso_duration(D::from_millis(1)), "PT0.001S");
        // What the SurrealDB sink reads back is the same length.
        for d in [
            D::from_secs(90),
            D::new(93_784, 500_000_000),
            D::from_micros(7),
        ] {
            assert_eq!(
                crate::sink::surreal::fixed_interval(&iso_duration(d)),
                Some(d)
            );
        }
    }

    #[test]
    fn values_convert_or_say_why_not() {
        let (int, _) = column("n", Some("int"));
        assert_eq!(
            convert(&int, None, SValue::Number(Number::Int(7))),
            Ok(Value::Int(7))
        );
        let e = convert(&int, None, SValue::String("seven".into()))
            .unwrap_err()
            .message;
        assert!(e.contains("declared int") && e.contains("string"), "{e}");
        let (dec, _) = column("d", Some("number"));
        assert_eq!(
            convert(&dec, None, SValue::Number(Number::Float(1.5))),
            Ok(Value::Decimal("1.5".into()))
        );
        let (link, to) = column("c", Some("record<customer>"));
        let r = SValue::RecordId(RecordId::new("customer", RecordIdKey::Number(3)));
        assert_eq!(convert(&link, to.as_deref(), r), Ok(Value::Int(3)));
        let other = SValue::RecordId(RecordId::new("order", RecordIdKey::Number(3)));
        assert!(convert(&link, to.as_deref(), other).is_err());
        let any = undefined("x");
        assert_eq!(convert(&any, None, SValue::None), Ok(Value::Null));
        assert_eq!(
            convert(
                &any,
                None,
                SValue::RecordId(RecordId::new("t", RecordIdKey::String("a".into())))
            ),
            Ok(Value::Text("t:a".into()))
        );
    }
}
