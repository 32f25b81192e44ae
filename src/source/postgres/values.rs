//! PostgreSQL text-format values (COPY and pgoutput share the output
//! functions) decoded into the neutral model, with our session settings:
//! `DateStyle = ISO`, `TimeZone = UTC`, `bytea_output = hex`,
//! `extra_float_digits = 3`.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::error::{Error, Result};
use crate::model::{Column, LogicalType, Row, TableSchema, Value};

/// Splits `COPY … TO STDOUT` text output into rows of fields, across chunk
/// boundaries. `\N` is NULL; backslash escapes are undone.
pub struct CopyTextParser {
    columns: usize,
    partial: Vec<u8>,
    line: usize,
}

impl CopyTextParser {
    pub fn new(columns: usize) -> Self {
        Self {
            columns,
            partial: Vec::new(),
            line: 0,
        }
    }

    /// Every complete row in `chunk` (plus what an earlier chunk left over).
    pub fn feed(&mut self, chunk: &[u8]) -> std::result::Result<Vec<Vec<Option<String>>>, String> {
        let mut rows = Vec::new();
        let mut start = 0;
        for (i, &b) in chunk.iter().enumerate() {
            if b == b'\n' {
                let line: Vec<u8> = if self.partial.is_empty() {
                    chunk[start..i].to_vec()
                } else {
                    let mut l = std::mem::take(&mut self.partial);
                    l.extend_from_slice(&chunk[start..i]);
                    l
                };
                self.line += 1;
                rows.push(self.parse_line(&line)?);
                start = i + 1;
            }
        }
        self.partial.extend_from_slice(&chunk[start..]);
        Ok(rows)
    }

    /// Checks that the output ended with a whole row.
    pub fn finish(&self) -> std::result::Result<(), String> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "COPY output ended in the middle of row {}",
                self.line + 1
            ))
        }
    }

    fn parse_line(&self, line: &[u8]) -> std::result::Result<Vec<Option<String>>, String> {
        let mut fields = Vec::with_capacity(self.columns);
        for raw in line.split(|&b| b == b'\t') {
            if raw == b"\\N" {
                fields.push(None);
                continue;
            }
            let mut out = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                let b = raw[i];
                if b != b'\\' || i + 1 == raw.len() {
                    out.push(b);
                    i += 1;
                    continue;
                }
                let e = raw[i + 1];
                i += 2;
                match e {
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'n' => out.push(b'\n'),
                    b'r' => out.push(b'\r'),
                    b't' => out.push(b'\t'),
                    b'v' => out.push(11),
                    b'0'..=b'7' => {
                        let mut v = (e - b'0') as u32;
                        let mut n = 1;
                        while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                            v = v * 8 + (raw[i] - b'0') as u32;
                            i += 1;
                            n += 1;
                        }
                        out.push(v as u8);
                    }
                    b'x' => {
                        let mut v = 0u32;
                        let mut n = 0;
                        while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                            v = v * 16 + (raw[i] as char).to_digit(16).unwrap_or(0);
                            i += 1;
                            n += 1;
                        }
                        out.push(v as u8);
                    }
                    other => out.push(other),
                }
            }
            fields.push(Some(String::from_utf8(out).map_err(|_| {
                format!("row {}: a value is not valid UTF-8", self.line)
            })?));
        }
        if fields.len() != self.columns {
            return Err(format!(
                "row {}: {} fields, expected {}",
                self.line,
                fields.len(),
                self.columns
            ));
        }
        Ok(fields)
    }
}

/// Parses PostgreSQL's ISO timestamp output (`2024-05-01 12:30:00.5+00`, or
/// without a zone for `timestamp`, read as UTC). A BC date becomes the
/// astronomical year (1 BC is year 0). `infinity` and `-infinity` become the
/// largest and smallest date-time there is (year +262142 and -262143): no
/// finite PostgreSQL timestamp reaches them (PostgreSQL stops at 294276 AD
/// and 4713 BC, and years past 262142 are refused here).
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    match s {
        "infinity" => return Some(DateTime::<Utc>::MAX_UTC),
        "-infinity" => return Some(DateTime::<Utc>::MIN_UTC),
        // Years past 9999 need a sign for chrono.
        _ if s.find('-').is_some_and(|i| i > 4) && !s.starts_with('+') => {
            return parse_timestamp(&format!("+{s}"))
        }
        _ => {}
    }
    if let Some(bc) = s.strip_suffix(" BC") {
        // Parsed in a stand-in year of the same leap-ness (29 February
        // exists in 1 BC, year 0), then moved to the astronomical year.
        use chrono::Datelike;
        let (year, rest) = bc.split_once('-')?;
        let year = 1 - year.parse::<i32>().ok()?;
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let t = parse_timestamp(&format!("{}-{rest}", if leap { 2000 } else { 2001 }))?;
        return t.with_year(year);
    }
    // A zone written as +HH or +HH:MM (or +HH:MM:SS): normalise to +HH:MM.
    let (body, zone) = match s.rfind(['+', '-']) {
        Some(i) if i > 10 => (&s[..i], Some(&s[i..])),
        _ => (s, None),
    };
    match zone {
        Some(z) => {
            let mut z = z.to_string();
            if z.len() == 3 {
                z.push_str(":00");
            }
            if z.len() == 9 && z.is_char_boundary(6) {
                z.truncate(6);
            }
            DateTime::parse_from_str(&format!("{body}{z}"), "%Y-%m-%d %H:%M:%S%.f%:z")
                .ok()
                .map(|t| t.with_timezone(&Utc))
        }
        None => NaiveDateTime::parse_from_str(body, "%Y-%m-%d %H:%M:%S%.f")
            .ok()
            .map(|t| t.and_utc()),
    }
}

/// A timestamp text whose year (AD) has six digits: past what
/// [`parse_timestamp`] holds, within what PostgreSQL does.
pub fn beyond_model_years(s: &str) -> bool {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    digits >= 6 && s.as_bytes().get(digits) == Some(&b'-') && !s.ends_with(" BC")
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let h = s.strip_prefix("\\x")?.as_bytes();
    if h.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    h.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Parses PostgreSQL's array output (`{1,2,NULL}`, `{{1,2},{3,4}}`,
/// `[0:1]={a,b}`, `{"a b","c\\"d"}`) into a JSON array; elements become JSON
/// by their type `elem`: booleans and integers as such, floats as numbers
/// (NaN and ±Infinity as strings), json/jsonb as documents, everything else
/// (numeric included, to stay exact) as strings.
pub fn parse_array(s: &str, elem: u32) -> std::result::Result<serde_json::Value, String> {
    let body = match s.find('=') {
        Some(i) if s.starts_with('[') => &s[i + 1..],
        _ => s,
    };
    let chars: Vec<char> = body.chars().collect();
    let mut pos = 0;
    let v = parse_level(&chars, &mut pos, elem)?;
    if pos != chars.len() {
        return Err(format!(
            "unexpected text after the array at character {pos}"
        ));
    }
    Ok(v)
}

fn parse_level(
    c: &[char],
    pos: &mut usize,
    elem: u32,
) -> std::result::Result<serde_json::Value, String> {
    if c.get(*pos) != Some(&'{') {
        return Err(format!("expected '{{' at character {pos}"));
    }
    *pos += 1;
    let mut items = Vec::new();
    if c.get(*pos) == Some(&'}') {
        *pos += 1;
        return Ok(serde_json::Value::Array(items));
    }
    loop {
        match c.get(*pos) {
            Some('{') => items.push(parse_level(c, pos, elem)?),
            Some('"') => {
                *pos += 1;
                let mut text = String::new();
                loop {
                    match c.get(*pos) {
                        Some('\\') => {
                            text.push(*c.get(*pos + 1).ok_or("unterminated escape")?);
                            *pos += 2;
                        }
                        Some('"') => {
                            *pos += 1;
                            break;
                        }
                        Some(ch) => {
                            text.push(*ch);
                            *pos += 1;
                        }
                        None => return Err("unterminated quoted element".into()),
                    }
                }
                items.push(element(&text, elem)?);
            }
            Some(_) => {
                let start = *pos;
                while let Some(ch) = c.get(*pos) {
                    if *ch == ',' || *ch == '}' {
                        break;
                    }
                    *pos += 1;
                }
                let token: String = c[start..*pos].iter().collect();
                let token = token.trim();
                if token.eq_ignore_ascii_case("NULL") {
                    items.push(serde_json::Value::Null);
                } else {
                    items.push(element(token, elem)?);
                }
            }
            None => return Err("unterminated array".into()),
        }
        match c.get(*pos) {
            Some(',') => *pos += 1,
            Some('}') => {
                *pos += 1;
                return Ok(serde_json::Value::Array(items));
            }
            _ => return Err(format!("expected ',' or '}}' at character {pos}")),
        }
    }
}

fn element(text: &str, elem: u32) -> std::result::Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match elem {
        16 => match text {
            "t" => J::Bool(true),
            "f" => J::Bool(false),
            _ => return Err(format!("bad boolean element {text:?}")),
        },
        20 | 21 | 23 | 26 => J::from(
            text.parse::<i64>()
                .map_err(|_| format!("bad integer element {text:?}"))?,
        ),
        700 | 701 => match text.parse::<f64>() {
            Ok(x) if x.is_finite() => J::from(x),
            Ok(_) => J::String(text.to_string()),
            Err(_) => return Err(format!("bad float element {text:?}")),
        },
        // The document's exact text (a JSON null element is not SQL NULL,
        // and json keeps its spacing and key order).
        114 | 3802 => {
            serde_json::from_str::<serde::de::IgnoredAny>(text)
                .map_err(|e| format!("bad JSON element: {e}"))?;
            J::String(text.to_string())
        }
        _ => J::String(text.to_string()),
    })
}

/// Decodes one text value of a column whose (base) type OID is `oid` (for an
/// array: its elements' type).
pub fn decode(col: &Column, oid: u32, s: &str) -> std::result::Result<Value, String> {
    let bad = |what: &str| {
        format!(
            "{what} {} (type {}) cannot be read",
            Value::Text(s.to_string()),
            col.source_type
        )
    };
    Ok(match col.logical {
        LogicalType::Bool => match s {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            _ => return Err(bad("the boolean")),
        },
        LogicalType::Int => Value::Int(s.parse().map_err(|_| bad("the integer"))?),
        LogicalType::Float => Value::Float(match s {
            "NaN" => f64::NAN,
            "Infinity" => f64::INFINITY,
            "-Infinity" => f64::NEG_INFINITY,
            _ => s.parse().map_err(|_| bad("the number"))?,
        }),
        LogicalType::Decimal => Value::Decimal(s.to_string()),
        LogicalType::Bytes => Value::Bytes(hex_bytes(s).ok_or_else(|| bad("the bytea"))?),
        LogicalType::Json if col.source_type.ends_with("[]") => match parse_array(s, oid) {
            Ok(v) => Value::Json(v.to_string()),
            Err(e) => return Err(format!("the array {} (type {}) cannot be read: {e}", Value::Text(s.to_string()), col.source_type)),
        },
        LogicalType::Json => Value::Json(s.to_string()),
        LogicalType::Timestamp => match parse_timestamp(s) {
            Some(t) => Value::Timestamp(t),
            // PostgreSQL goes to year 294276, past the model's 262142: kept
            // as PostgreSQL wrote it, which a PostgreSQL target reads back
            // as it was and a target without such years refuses by name.
            None if beyond_model_years(s) => Value::Text(s.to_string()),
            None => {
                return Err(format!(
                    "the timestamp {s:?} (type {}) cannot be read (years past 262142 have no equivalent in the target); change the value or exclude the table",
                    col.source_type
                ))
            }
        },
        // Kept as PostgreSQL wrote them; a target converts them.
        LogicalType::Uuid | LogicalType::Date | LogicalType::Interval => Value::Text(s.to_string()),
        LogicalType::Text | LogicalType::Any => {
            let _ = oid;
            Value::Text(s.to_string())
        }
    })
}

/// Decodes a row of text fields; an error names table, key, column and value.
pub fn decode_row(table: &TableSchema, types: &[u32], fields: Vec<Option<String>>) -> Result<Row> {
    let mut row = Vec::with_capacity(fields.len());
    let mut failure = None;
    for (i, f) in fields.into_iter().enumerate() {
        match f {
            None => row.push(Value::Null),
            Some(s) => match decode(&table.columns[i], types[i], &s) {
                Ok(v) => row.push(v),
                Err(m) => {
                    failure.get_or_insert((i, m));
                    row.push(Value::Text(s));
                }
            },
        }
    }
    if let Some((i, m)) = failure {
        return Err(Error::definite(format!(
            "table {:?}, key {}, column {:?}: {m}",
            table.name,
            table.describe_key(&table.key_of(&row)),
            table.columns[i].name
        )));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn years_past_the_model_are_kept_as_postgresql_wrote_them() {
        let col = Column {
            name: "ts".into(),
            source_type: "timestamp without time zone".into(),
            logical: LogicalType::Timestamp,
            nullable: true,
        };
        for s in ["294276-12-31 23:59:59.999999", "262143-01-01 00:00:00+00"] {
            assert_eq!(decode(&col, 1114, s), Ok(Value::Text(s.into())), "{s}");
        }
        assert!(matches!(
            decode(&col, 1114, "262142-01-01 00:00:00"),
            Ok(Value::Timestamp(_))
        ));
        assert!(decode(&col, 1114, "12345-13-01 00:00:00").is_err());
        assert!(decode(&col, 1114, "yesterday").is_err());
    }

    #[test]
    fn copy_text_rows_split_across_chunks_and_unescape() {
        let mut p = CopyTextParser::new(3);
        let mut rows = p.feed(b"1\ta\\tb\\\\c\t\\N\n2\tx\\ny").unwrap();
        assert_eq!(rows.len(), 1);
        rows.extend(p.feed(b"\t\\101\\x42\n").unwrap());
        p.finish().unwrap();
        assert_eq!(
            rows[0],
            vec![Some("1".into()), Some("a\tb\\c".into()), None]
        );
        assert_eq!(
            rows[1],
            vec![Some("2".into()), Some("x\ny".into()), Some("AB".into())]
        );
        let mut p = CopyTextParser::new(2);
        assert!(p.feed(b"1\t2\t3\n").is_err());
        let mut p = CopyTextParser::new(1);
        p.feed(b"half").unwrap();
        assert!(p.finish().is_err());
    }

    #[test]
    fn arrays_become_json_arrays() {
        assert_eq!(
            parse_array("{1,2,NULL}", 23).unwrap().to_string(),
            "[1,2,null]"
        );
        assert_eq!(
            parse_array("{{1,2},{3,4}}", 20).unwrap().to_string(),
            "[[1,2],[3,4]]"
        );
        assert_eq!(
            parse_array(r#"{"a b","c\"d",NULL,"NULL",plain}"#, 25)
                .unwrap()
                .to_string(),
            r#"["a b","c\"d",null,"NULL","plain"]"#
        );
        assert_eq!(
            parse_array("[0:1]={t,f}", 16).unwrap().to_string(),
            "[true,false]"
        );
        assert_eq!(parse_array("{}", 25).unwrap().to_string(), "[]");
        assert_eq!(
            parse_array("{1.50,NaN}", 1700).unwrap().to_string(),
            r#"["1.50","NaN"]"#
        );
        assert_eq!(
            parse_array("{0.5,Infinity}", 701).unwrap().to_string(),
            r#"[0.5,"Infinity"]"#
        );
        assert_eq!(
            parse_array(r#"{"{\"k\": 1}","null"}"#, 3802)
                .unwrap()
                .to_string(),
            r#"["{\"k\": 1}","null"]"#
        );
        for bad in ["{1,2", "1,2}", "{1,2}x", "{\"open}", "{x}"] {
            assert!(parse_array(bad, 23).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_in_iso_output() {
        assert_eq!(
            parse_timestamp("2024-05-01 12:30:00+00")
                .unwrap()
                .to_rfc3339(),
            "2024-05-01T12:30:00+00:00"
        );
        assert_eq!(
            parse_timestamp("2024-05-01 12:30:00.25+05:30")
                .unwrap()
                .to_rfc3339(),
            "2024-05-01T07:00:00.250+00:00"
        );
        assert_eq!(
            parse_timestamp("2024-05-01 12:30:00").unwrap().to_rfc3339(),
            "2024-05-01T12:30:00+00:00"
        );
        assert_eq!(parse_timestamp("infinity"), Some(DateTime::<Utc>::MAX_UTC));
        assert_eq!(parse_timestamp("-infinity"), Some(DateTime::<Utc>::MIN_UTC));
        assert_eq!(
            parse_timestamp("0044-03-15 00:00:00+00 BC")
                .unwrap()
                .to_rfc3339(),
            "-0043-03-15T00:00:00+00:00"
        );
        assert_eq!(
            parse_timestamp("0001-01-01 00:00:00 BC")
                .unwrap()
                .to_rfc3339(),
            "0000-01-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_timestamp("0001-02-29 10:00:00+00 BC")
                .unwrap()
                .to_rfc3339(),
            "0000-02-29T10:00:00+00:00"
        );
        assert!(parse_timestamp("0002-02-29 10:00:00+00 BC").is_none());
        assert_eq!(
            parse_timestamp("12345-06-07 08:09:10+00")
                .unwrap()
                .to_rfc3339(),
            "+12345-06-07T08:09:10+00:00"
        );
        assert!(parse_timestamp("infinite").is_none());
    }

    #[test]
    fn values_decode_by_type() {
        let col = |logical, t: &str| Column {
            name: "c".into(),
            source_type: t.into(),
            logical,
            nullable: true,
        };
        assert_eq!(
            decode(&col(LogicalType::Bool, "boolean"), 16, "t").unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            decode(&col(LogicalType::Int, "bigint"), 20, "-9223372036854775808").unwrap(),
            Value::Int(i64::MIN)
        );
        assert!(
            matches!(decode(&col(LogicalType::Float, "double precision"), 701, "NaN").unwrap(), Value::Float(x) if x.is_nan())
        );
        assert_eq!(
            decode(&col(LogicalType::Float, "real"), 700, "-Infinity").unwrap(),
            Value::Float(f64::NEG_INFINITY)
        );
        assert_eq!(
            decode(&col(LogicalType::Bytes, "bytea"), 17, "\\x00ff").unwrap(),
            Value::Bytes(vec![0, 255])
        );
        assert_eq!(
            decode(&col(LogicalType::Decimal, "numeric"), 1700, "1.50").unwrap(),
            Value::Decimal("1.50".into())
        );
        let e = decode(&col(LogicalType::Int, "integer"), 23, "x1").unwrap_err();
        assert!(e.contains("integer"), "{e}");
    }
}
