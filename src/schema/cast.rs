//! The user's type rules (`[tables.types]`), as pgloader's CAST rules: a
//! column (`"missions.meta" = "jsonb"`, patterns allowed: `"*.created_at"`)
//! or a declared type (`"type:MONEY" = "numeric(12,2)"`) given the target
//! type it becomes.

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};

use crate::model::LogicalType;

/// The target types a rule may name, as the README lists them.
pub const TARGETS: &str = "boolean, bigint, double precision, numeric, numeric(p,s), text, bytea, json, jsonb, timestamptz, timestamp";

/// What a rule turns a column into.
#[derive(Debug, Clone, PartialEq)]
pub struct CastTarget {
    pub logical: LogicalType,
    /// The PostgreSQL type, exactly.
    pub postgres: String,
}

/// Reads a rule's target type.
pub fn parse_target(s: &str) -> std::result::Result<CastTarget, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    let to = |logical, postgres: &str| {
        Ok(CastTarget {
            logical,
            postgres: postgres.to_string(),
        })
    };
    match t.as_str() {
        "boolean" | "bool" => to(LogicalType::Bool, "boolean"),
        "bigint" | "int8" => to(LogicalType::Int, "bigint"),
        "double precision" | "float8" => to(LogicalType::Float, "double precision"),
        "text" => to(LogicalType::Text, "text"),
        "bytea" => to(LogicalType::Bytes, "bytea"),
        "json" => to(LogicalType::Json, "json"),
        "jsonb" => to(LogicalType::Json, "jsonb"),
        "timestamptz" | "timestamp with time zone" => {
            to(LogicalType::Timestamp, "timestamp with time zone")
        }
        "timestamp" | "timestamp without time zone" => {
            to(LogicalType::Timestamp, "timestamp without time zone")
        }
        "numeric" | "decimal" => to(LogicalType::Decimal, "numeric"),
        _ => {
            let digits = t
                .strip_prefix("numeric")
                .or_else(|| t.strip_prefix("decimal"))
                .map(str::trim)
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'));
            let parts: Option<Vec<u32>> = digits.map(|d| {
                d.split(',')
                    .map(|x| x.trim().parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()
                    .unwrap_or_default()
            });
            match parts.as_deref() {
                Some([p]) if (1..=1000).contains(p) => {
                    to(LogicalType::Decimal, &format!("numeric({p})"))
                }
                Some([p, s]) if (1..=1000).contains(p) && s <= p => {
                    to(LogicalType::Decimal, &format!("numeric({p},{s})"))
                }
                _ => Err(format!(
                    "{s:?} is not a type a rule can name; use one of {TARGETS}"
                )),
            }
        }
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    /// As the config writes it, for the reason shown.
    key: String,
    matcher: GlobMatcher,
    /// A key without glob characters, which wins over patterns.
    exact: bool,
    target: CastTarget,
}

/// The compiled `[tables.types]`.
#[derive(Debug, Clone, Default)]
pub struct TypeRules {
    columns: Vec<Rule>,
    declared: Vec<Rule>,
}

/// A rule that applies to a column.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub target: CastTarget,
    /// `[tables.types] "missions.meta"`.
    pub reason: String,
}

impl TypeRules {
    pub fn compile(map: &BTreeMap<String, String>) -> std::result::Result<Self, String> {
        let mut out = TypeRules::default();
        for (key, to) in map {
            let target = parse_target(to).map_err(|e| format!("tables.types {key:?}: {e}"))?;
            let (pattern, declared) = match key.strip_prefix("type:") {
                Some(d) => (d.trim().to_ascii_uppercase(), true),
                None => {
                    if !key.contains('.') {
                        return Err(format!(
                            "tables.types {key:?}: name a column as \"table.column\" (patterns allowed: \"*.created_at\") or a declared type as \"type:{}\"",
                            key.to_ascii_uppercase()
                        ));
                    }
                    (key.clone(), false)
                }
            };
            let matcher = Glob::new(&pattern)
                .map_err(|e| format!("tables.types {key:?}: invalid pattern: {e}"))?
                .compile_matcher();
            let rule = Rule {
                key: key.clone(),
                matcher,
                exact: !pattern.contains(['*', '?', '[', '{']),
                target,
            };
            if declared {
                out.declared.push(rule);
            } else {
                out.columns.push(rule);
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty() && self.declared.is_empty()
    }

    /// The rule for column `column` of `table`, declared as `declared`: a
    /// rule naming the column exactly, else the first column pattern that
    /// matches, else the first declared-type rule.
    pub fn for_column(&self, table: &str, column: &str, declared: &str) -> Option<Applied> {
        let name = format!("{table}.{column}");
        let declared = declared.trim().to_ascii_uppercase();
        let by_column = |exact: bool| {
            self.columns
                .iter()
                .find(|r| r.exact == exact && r.matcher.is_match(&name))
        };
        by_column(true)
            .or_else(|| by_column(false))
            .or_else(|| self.declared.iter().find(|r| r.matcher.is_match(&declared)))
            .map(|r| Applied {
                target: r.target.clone(),
                reason: format!("[tables.types] {:?}", r.key),
            })
    }

    /// The column rules that named no column of `seen` (`table.column`
    /// names), for a warning: a misspelt rule changes nothing.
    pub fn unused_columns<'a>(&'a self, seen: &[String]) -> Vec<&'a str> {
        self.columns
            .iter()
            .filter(|r| !seen.iter().any(|s| r.matcher.is_match(s)))
            .map(|r| r.key.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, &str)]) -> TypeRules {
        TypeRules::compile(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn targets_read_as_postgres_writes_them() {
        assert_eq!(parse_target("JSONB").unwrap().logical, LogicalType::Json);
        assert_eq!(
            parse_target("numeric(12, 2)").unwrap().postgres,
            "numeric(12,2)"
        );
        assert_eq!(
            parse_target("timestamptz").unwrap().postgres,
            "timestamp with time zone"
        );
        let e = parse_target("integer").unwrap_err();
        assert!(e.contains("bigint") && e.contains("\"integer\""), "{e}");
        assert!(parse_target("numeric(2,5)").is_err());
    }

    #[test]
    fn an_exact_column_wins_over_a_pattern_and_a_pattern_over_a_declared_type() {
        let r = rules(&[
            ("*.meta", "json"),
            ("missions.meta", "jsonb"),
            ("type:TEXT", "bytea"),
            ("type:DECIMAL*", "numeric(12,2)"),
        ]);
        let got = r.for_column("missions", "meta", "TEXT").unwrap();
        assert_eq!(got.target.postgres, "jsonb");
        assert_eq!(got.reason, "[tables.types] \"missions.meta\"");
        assert_eq!(
            r.for_column("crew", "meta", "TEXT")
                .unwrap()
                .target
                .postgres,
            "json"
        );
        assert_eq!(
            r.for_column("crew", "name", "text")
                .unwrap()
                .target
                .postgres,
            "bytea"
        );
        assert_eq!(
            r.for_column("crew", "pay", "decimal(8,2)")
                .unwrap()
                .target
                .postgres,
            "numeric(12,2)"
        );
        assert!(r.for_column("crew", "n", "INTEGER").is_none());
        assert_eq!(
            r.unused_columns(&["crew.name".into()]),
            vec!["*.meta", "missions.meta"]
        );
    }

    #[test]
    fn a_key_that_names_neither_a_column_nor_a_type_is_refused() {
        let e =
            TypeRules::compile(&[("meta".to_string(), "jsonb".to_string())].into()).unwrap_err();
        assert!(
            e.contains("\"table.column\"") && e.contains("type:META"),
            "{e}"
        );
    }
}
