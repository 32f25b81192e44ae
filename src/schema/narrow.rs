//! Target columns narrower than the source's type (the team's own schema,
//! M4): `integer` for SQLite's `INTEGER`, `varchar(160)` for text,
//! `numeric(12,4)` for `numeric`, `real` for `double precision`, an enum
//! for text, `timestamp` for `timestamptz`. Such a column is accepted, and
//! every value is checked as it goes in: one that does not fit is refused
//! (naming table, key, column and value) instead of being cut, rounded or
//! failing somewhere later. Pure: the sink and `check` call it.
//!
//! ```text
//!  source (switchyard's type)        target column            each value
//!  bigint, integer, numeric          integer, smallint         whole, in range
//!  numeric                           bigint                    whole, in range
//!  text, varchar(m), char(m)         varchar(n), char(n)       at most n characters
//!  numeric, integers, floats         numeric(p,s)              ≤ p-s digits before the
//!                                                              point, none past s
//!  double precision                  real                      within real's range
//!  text, varchar                     an enum                   one of its labels
//!  timestamptz                       timestamp                 kept as its UTC time
//! ```

use crate::model::Value;

/// What each value of a narrower target column is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Narrow {
    /// `smallint`, `integer` (or `bigint` from `numeric`): whole numbers in range.
    Int {
        ty: &'static str,
        min: i64,
        max: i64,
    },
    /// `character varying(n)`, `character(n)`: at most `max` characters.
    Chars { ty: String, max: usize },
    /// `numeric(p,s)`: at most `p - s` digits before the point, and no
    /// digit past the `s`-th decimal (PostgreSQL would round it).
    Numeric { p: u32, s: u32 },
    /// `real`: finite, within real's range (its precision is real's).
    Real,
    /// An enum: one of its labels.
    Labels { ty: String, labels: Vec<String> },
    /// `timestamp` for `timestamptz`: the UTC date and time is stored.
    Utc,
}

impl Narrow {
    /// How `check` shows the column.
    pub fn describe(&self) -> String {
        match self {
            Narrow::Int { ty, .. } => format!("narrower: checked per value (whole numbers that {ty} holds)"),
            Narrow::Chars { ty, max } => format!("narrower: checked per value (at most {max} characters, {ty})"),
            Narrow::Numeric { p, s } => format!(
                "narrower: checked per value (numeric({p},{s}): at most {} digits before the point, {s} after)",
                p - s
            ),
            Narrow::Real => "narrower: checked per value (real's range; real keeps about 6 significant digits)".into(),
            Narrow::Labels { ty, labels } => {
                format!("narrower: checked per value (one of {ty}'s labels: {})", labels.join(", "))
            }
            Narrow::Utc => "narrower: stored as its UTC date and time (timestamp without time zone)".into(),
        }
    }
}

/// `character varying(160)` → `("character varying", [160])`.
fn split_type(t: &str) -> (String, Vec<i64>) {
    let t = t.trim();
    match (t.find('('), t.find(')')) {
        (Some(a), Some(b)) if a < b => {
            let args = t[a + 1..b]
                .split(',')
                .filter_map(|x| x.trim().parse().ok())
                .collect();
            let name = format!("{}{}", &t[..a], &t[b + 1..]);
            (name.split_whitespace().collect::<Vec<_>>().join(" "), args)
        }
        _ => (
            t.split_whitespace().collect::<Vec<_>>().join(" "),
            Vec::new(),
        ),
    }
}

/// The most digits a whole number of an integer type has.
fn int_digits(t: &str) -> Option<u32> {
    match t {
        "smallint" => Some(5),
        "integer" => Some(10),
        "bigint" => Some(19),
        _ => None,
    }
}

fn int_rank(t: &str) -> Option<u8> {
    match t {
        "smallint" => Some(0),
        "integer" => Some(1),
        "bigint" => Some(2),
        "numeric" => Some(3),
        _ => None,
    }
}

const TEXTS: [&str; 4] = ["text", "character varying", "character", "name"];

/// Whether a target column of type `have` (its base type `base` for a
/// domain; `labels` for an enum) is narrower than switchyard's type `want`
/// for the source column, and how its values are checked. `None`: the
/// column holds every value (or is of another family, which the caller
/// refuses).
pub fn narrowing(want: &str, have: &str, base: &str, labels: Option<&[String]>) -> Option<Narrow> {
    if want.ends_with("[]") || have.ends_with("[]") {
        return None;
    }
    let (w, wargs) = split_type(want);
    let (b, bargs) = split_type(base);
    if let Some(labels) = labels {
        return TEXTS.contains(&w.as_str()).then(|| Narrow::Labels {
            ty: have.to_string(),
            labels: labels.to_vec(),
        });
    }
    // Whole numbers of a smaller type.
    if let (Some(wr), Some(br)) = (int_rank(&w), int_rank(&b)) {
        if br < wr && b != "numeric" {
            let (ty, min, max): (&'static str, i64, i64) = match b.as_str() {
                "smallint" => ("smallint", i16::MIN as i64, i16::MAX as i64),
                "integer" => ("integer", i32::MIN as i64, i32::MAX as i64),
                _ => ("bigint", i64::MIN, i64::MAX),
            };
            return Some(Narrow::Int { ty, min, max });
        }
    }
    // numeric(p,s) for numbers it may not hold.
    if b == "numeric" {
        if let Some(&p) = bargs.first() {
            let s = bargs.get(1).copied().unwrap_or(0);
            // numeric(5,-2), numeric(3,5) (PostgreSQL 15): left to PostgreSQL.
            if s < 0 || s > p {
                return None;
            }
            let (p, s) = (p as u32, s as u32);
            let wargs: Vec<u32> = wargs.iter().map(|&x| x.max(0) as u32).collect();
            let narrower = match w.as_str() {
                "numeric" => match (wargs.first(), wargs.get(1).copied().unwrap_or(0)) {
                    (Some(&wp), ws) => wp.saturating_sub(ws) > p - s || ws > s,
                    (None, _) => true,
                },
                "real" | "double precision" => true,
                other => int_digits(other).is_some_and(|d| d > p - s),
            };
            return narrower.then_some(Narrow::Numeric { p, s });
        }
        return None;
    }
    // Strings of a limited length.
    if (b == "character varying" || b == "character") && TEXTS.contains(&w.as_str()) {
        let max = match bargs.first() {
            Some(&n) => n.max(0) as usize,
            // character without a length is character(1); varchar without one holds any.
            None if b == "character" => 1,
            None => return None,
        };
        let wider = match wargs.first() {
            Some(&m) => m.max(0) as usize > max,
            None => true,
        };
        return wider.then(|| Narrow::Chars {
            ty: base.to_string(),
            max,
        });
    }
    if w == "double precision" && b == "real" {
        return Some(Narrow::Real);
    }
    if w == "timestamp with time zone" && b == "timestamp without time zone" {
        return Some(Narrow::Utc);
    }
    None
}

/// A number's text as digits before and after the point (significant:
/// leading zeros before, trailing zeros after are not counted), or `None`
/// when it is not a plain or scientific decimal.
fn digits(text: &str) -> Option<(u32, u32)> {
    let t = text.trim().trim_start_matches(['+', '-']);
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], t[i + 1..].parse::<i64>().ok()?),
        None => (t, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty()
        || !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // All digits, and where the point sits among them.
    let all: String = format!("{int}{frac}");
    let point = int.len() as i64 + exp;
    let first = all.find(|c| c != '0');
    let Some(first) = first else {
        return Some((0, 0));
    };
    let last = all.rfind(|c| c != '0').expect("a non-zero digit") as i64;
    let before = (point - first as i64).max(0) as u32;
    let after = (last + 1 - point).max(0) as u32;
    Some((before, after))
}

/// A whole number written as a decimal (`5.00`, `-1.2e3`) as integer
/// text (`5`, `-1200`), which an integer column takes; `None` for anything
/// else.
pub fn whole_text(text: &str) -> Option<String> {
    let t = text.trim();
    let negative = t.starts_with('-');
    let (before, after) = digits(t)?;
    if after > 0 || before > 38 {
        return None;
    }
    let unsigned = t.trim_start_matches(['+', '-']);
    let (mantissa, exp) = match unsigned.find(['e', 'E']) {
        Some(i) => (&unsigned[..i], unsigned[i + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all = format!("{int}{frac}");
    let point = int.len() as i64 + exp;
    let whole: String = if point <= 0 {
        String::new()
    } else if point as usize >= all.len() {
        format!("{all}{}", "0".repeat(point as usize - all.len()))
    } else {
        all[..point as usize].to_string()
    };
    let whole = whole.trim_start_matches('0');
    if whole.is_empty() {
        return Some("0".into());
    }
    Some(if negative {
        format!("-{whole}")
    } else {
        whole.to_string()
    })
}

/// Whether `v` fits the narrower column; else why not, in words.
pub fn fits(v: &Value, narrow: &Narrow) -> Result<(), String> {
    let text = match v {
        Value::Null | Value::Unchanged => return Ok(()),
        Value::Int(i) => i.to_string(),
        Value::Float(x) => {
            if x.is_finite() {
                format!("{x:?}")
            } else if x.is_nan() {
                "NaN".into()
            } else if *x > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            }
        }
        Value::Decimal(d) => d.clone(),
        Value::Text(s) => s.clone(),
        Value::Bool(b) => (if *b { "1" } else { "0" }).into(),
        // Bytes, JSON and time stamps are not checked here (PostgreSQL
        // refuses what does not convert).
        _ => return Ok(()),
    };
    match narrow {
        Narrow::Int { ty, min, max } => {
            if let Ok(i) = text.trim().parse::<i64>() {
                return if (*min..=*max).contains(&i) {
                    Ok(())
                } else {
                    Err(format!("{i} is out of {ty}'s range ({min} to {max})"))
                };
            }
            match digits(&text) {
                Some((_, after)) if after > 0 => {
                    Err(format!("{text} is not a whole number; {ty} would round it"))
                }
                // 5.00, 1e3: a whole number, sent as one (see whole_text).
                Some((before, _)) if before <= 18 => {
                    match whole_text(&text).and_then(|w| w.parse::<i64>().ok()) {
                        Some(i) if (*min..=*max).contains(&i) => Ok(()),
                        _ => Err(format!("{text} is out of {ty}'s range ({min} to {max})")),
                    }
                }
                Some(_) => Err(format!("{text} is out of {ty}'s range ({min} to {max})")),
                // Not a number: PostgreSQL refuses it with its own words.
                None => Ok(()),
            }
        }
        Narrow::Chars { ty, max } => {
            // PostgreSQL drops trailing spaces past the length instead of refusing.
            let n = text.chars().count();
            if n <= *max || text.trim_end_matches(' ').chars().count() <= *max {
                Ok(())
            } else {
                Err(format!(
                    "the value is {n} characters long, more than {ty} holds"
                ))
            }
        }
        Narrow::Numeric { p, s } => {
            if text == "NaN" {
                return Ok(());
            }
            if text.ends_with("Infinity") {
                return Err(format!("{text} does not fit numeric({p},{s})"));
            }
            let Some((before, after)) = digits(&text) else {
                return Ok(());
            };
            if after > *s {
                Err(format!(
                    "{text} has {after} decimal places; numeric({p},{s}) keeps {s} and would round it"
                ))
            } else if before > p - s {
                Err(format!(
                    "{text} has {before} digits before the point; numeric({p},{s}) holds {}",
                    p - s
                ))
            } else {
                Ok(())
            }
        }
        Narrow::Real => {
            let Ok(x) = text.trim().parse::<f64>() else {
                return Ok(());
            };
            let r = x as f32;
            if x.is_finite() && r.is_infinite() {
                Err(format!("{text} is out of real's range"))
            } else if r == 0.0 && x != 0.0 {
                Err(format!("{text} is too close to zero for real"))
            } else {
                Ok(())
            }
        }
        Narrow::Labels { ty, labels } => {
            if labels.contains(&text) {
                Ok(())
            } else {
                Err(format!(
                    "{text:?} is not one of {ty}'s labels ({})",
                    labels.join(", ")
                ))
            }
        }
        Narrow::Utc => Ok(()),
    }
}

/// The first column of `row` (by index in `columns`) whose value does not
/// fit, with why.
pub fn misfit(columns: &[(usize, Narrow)], row: &[Value]) -> Option<(usize, String)> {
    columns.iter().find_map(|(i, n)| {
        row.get(*i)
            .and_then(|v| fits(v, n).err())
            .map(|why| (*i, why))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrower_columns_of_the_same_family_are_found() {
        let n = |want, have| narrowing(want, have, have, None);
        assert!(matches!(
            n("bigint", "integer"),
            Some(Narrow::Int { ty: "integer", .. })
        ));
        assert!(matches!(
            n("integer", "smallint"),
            Some(Narrow::Int { ty: "smallint", .. })
        ));
        assert_eq!(n("integer", "bigint"), None);
        assert_eq!(
            n("text", "character varying(160)"),
            Some(Narrow::Chars {
                ty: "character varying(160)".into(),
                max: 160
            })
        );
        assert_eq!(n("character varying(100)", "character varying(160)"), None);
        assert!(n("character varying(200)", "character varying(160)").is_some());
        assert_eq!(n("text", "character varying"), None);
        assert_eq!(
            n("numeric", "numeric(12,4)"),
            Some(Narrow::Numeric { p: 12, s: 4 })
        );
        assert!(n("numeric(14,6)", "numeric(12,4)").is_some());
        assert_eq!(n("numeric(10,2)", "numeric(12,4)"), None);
        assert_eq!(n("integer", "numeric(12,2)"), None);
        assert!(n("bigint", "numeric(12,2)").is_some());
        assert_eq!(n("double precision", "real"), Some(Narrow::Real));
        assert_eq!(
            n("timestamp with time zone", "timestamp without time zone"),
            Some(Narrow::Utc)
        );
        assert_eq!(n("text", "integer"), None);
        let labels = ["draft".to_string(), "done".to_string()];
        assert!(matches!(
            narrowing("text", "status", "status", Some(&labels)),
            Some(Narrow::Labels { .. })
        ));
        // A domain over varchar(10): its base type decides.
        assert!(narrowing("text", "short_name", "character varying(10)", None).is_some());
    }

    #[test]
    fn each_value_is_checked_against_the_narrower_column() {
        let int = narrowing("bigint", "integer", "integer", None).unwrap();
        assert!(fits(&Value::Int(2_147_483_647), &int).is_ok());
        let e = fits(&Value::Int(2_147_483_648), &int).unwrap_err();
        assert!(e.contains("2147483648") && e.contains("integer"), "{e}");
        assert!(fits(&Value::Decimal("5.00".into()), &int).is_ok());
        assert!(fits(&Value::Decimal("3e9".into()), &int)
            .unwrap_err()
            .contains("range"));
        assert_eq!(whole_text("5.00").as_deref(), Some("5"));
        assert_eq!(whole_text("-1.2e3").as_deref(), Some("-1200"));
        assert_eq!(whole_text("0.0").as_deref(), Some("0"));
        assert_eq!(whole_text("2.5"), None);
        // numeric(5,-2) and numeric(3,5) are left to PostgreSQL.
        assert_eq!(
            narrowing("numeric", "numeric(5,-2)", "numeric(5,-2)", None),
            None
        );
        assert_eq!(
            narrowing("numeric", "numeric(3,5)", "numeric(3,5)", None),
            None
        );
        assert!(fits(&Value::Decimal("2.5".into()), &int)
            .unwrap_err()
            .contains("whole"));
        assert!(fits(&Value::Null, &int).is_ok());

        let chars =
            narrowing("text", "character varying(5)", "character varying(5)", None).unwrap();
        assert!(fits(&Value::Text("héllo".into()), &chars).is_ok());
        assert!(fits(&Value::Text("hello   ".into()), &chars).is_ok());
        assert!(fits(&Value::Text("hello!".into()), &chars)
            .unwrap_err()
            .contains("6 characters"));

        let num = Narrow::Numeric { p: 6, s: 2 };
        for ok in ["1234.56", "-1234.5", "0.10", "1.2e2", "0", "NaN", "0012.30"] {
            assert!(fits(&Value::Decimal(ok.into()), &num).is_ok(), "{ok}");
        }
        for bad in ["1.234", "12345.6", "1e4", "0.001", "Infinity"] {
            assert!(fits(&Value::Decimal(bad.into()), &num).is_err(), "{bad}");
        }
        assert!(fits(&Value::Float(0.5), &num).is_ok());
        assert!(fits(&Value::Int(10_000), &num).is_err());

        assert!(fits(&Value::Float(1.5e38), &Narrow::Real).is_ok());
        assert!(fits(&Value::Float(1e39), &Narrow::Real).is_err());
        assert!(fits(&Value::Float(1e-50), &Narrow::Real).is_err());

        let labels = Narrow::Labels {
            ty: "status".into(),
            labels: vec!["draft".into(), "done".into()],
        };
        assert!(fits(&Value::Text("done".into()), &labels).is_ok());
        assert!(fits(&Value::Text("lost".into()), &labels)
            .unwrap_err()
            .contains("draft, done"));
        assert_eq!(
            misfit(
                &[(0, Narrow::Real), (1, int)],
                &[Value::Float(1.0), Value::Int(1 << 40)]
            )
            .map(|m| m.0),
            Some(1)
        );
    }
}
