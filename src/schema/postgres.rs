//! Source columns → PostgreSQL column types, and model values → the text
//! PostgreSQL reads (COPY text format and `$n::text::type` parameters).

use chrono::{DateTime, Datelike, Utc};

use crate::model::{Column, LogicalType, TableSchema, Value};
use crate::pg::{quote_ident, quote_table};

/// PostgreSQL's built-in types that a PostgreSQL source's declared type may
/// name; such a column keeps its type exactly in a PostgreSQL target.
const BUILT_IN: &[&str] = &[
    "boolean",
    "smallint",
    "integer",
    "bigint",
    "real",
    "double precision",
    "numeric",
    "text",
    "character varying",
    "character",
    "\"char\"",
    "name",
    "bytea",
    "uuid",
    "json",
    "jsonb",
    "date",
    "time without time zone",
    "time with time zone",
    "timestamp without time zone",
    "timestamp with time zone",
    "interval",
    "inet",
    "cidr",
    "macaddr",
    "macaddr8",
    "bit",
    "bit varying",
    "money",
    "int4range",
    "int8range",
    "numrange",
    "tsrange",
    "tstzrange",
    "daterange",
    "tsvector",
    "tsquery",
    "xml",
    "oid",
    "point",
];

/// Whether a PostgreSQL declared type (`format_type` output) is built in: its
/// base name, without `(…)` modifiers, array brackets or time precision.
pub fn is_built_in(declared: &str) -> bool {
    BUILT_IN.contains(&base_name(declared).as_str())
}

/// A type's name without array brackets and without its `(…)` modifiers:
/// `numeric(12,2)`, `character varying(20)[]`, `timestamp(3) with time zone`
/// → `numeric`, `character varying`, `timestamp with time zone`.
fn base_name(declared: &str) -> String {
    let mut base = declared.trim_end_matches("[]").to_string();
    while let (Some(a), Some(b)) = (base.find('('), base.find(')')) {
        if b < a {
            break;
        }
        base.replace_range(a..=b, "");
    }
    base.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The target column type. A PostgreSQL source's built-in types are kept
/// exactly (arrays, precision and length included); other columns (a SQLite
/// source, enums and domains of a PostgreSQL source) get the type of their
/// logical type, following DESIGN's SQLite → PostgreSQL rules.
pub fn column_type(col: &Column, source_is_postgres: bool) -> String {
    if source_is_postgres && is_built_in(&col.source_type) {
        return col.source_type.clone();
    }
    match col.logical {
        LogicalType::Bool => "boolean".into(),
        LogicalType::Int => "bigint".into(),
        LogicalType::Float => "double precision".into(),
        LogicalType::Decimal => decimal_type(&col.source_type),
        LogicalType::Text => "text".into(),
        LogicalType::Bytes => "bytea".into(),
        LogicalType::Json => "jsonb".into(),
        LogicalType::Timestamp => "timestamp with time zone".into(),
        LogicalType::Uuid => "uuid".into(),
        LogicalType::Date => "date".into(),
        LogicalType::Interval => "interval".into(),
        // No declared type: each value keeps its own storage class; text
        // holds every one of them.
        LogicalType::Any => "text".into(),
    }
}

/// Whether a declared type is one of `enum_types` or an array of one
/// (`format_type` writes every array as `mood[]`).
pub fn is_enum(enum_types: &[(String, Vec<String>)], declared: &str) -> bool {
    let element = declared.trim_end_matches("[]");
    enum_types.iter().any(|(name, _)| name == element)
}

/// The target type of column `i` of `table`: an enum of a PostgreSQL source,
/// or an array of one, keeps its type (created in the target), else
/// [`column_type`].
pub fn table_column_type(
    table: &crate::model::TableSchema,
    i: usize,
    source_is_postgres: bool,
) -> String {
    let col = &table.columns[i];
    if source_is_postgres && is_enum(&table.enum_types, &col.source_type) {
        return col.source_type.clone();
    }
    if !source_is_postgres {
        if let Some(ty) = table
            .conversions
            .iter()
            .find(|c| c.column == i)
            .and_then(|c| c.postgres_type.clone())
        {
            return ty;
        }
    }
    column_type(col, source_is_postgres)
}

/// A CHECK's expression in PostgreSQL's SQL.
pub fn check_expr(table: &TableSchema, check: &crate::model::Check) -> String {
    use crate::model::CheckToken as T;
    let mut out = String::new();
    let mut prev: Option<&T> = None;
    for t in &check.expr {
        let word = |w: &str| matches!(t, T::Word(x) if x == w);
        let after_open = matches!(prev, Some(T::Word(x)) if x == "(");
        let call = word("(")
            && matches!(prev, Some(T::Word(x)) if x.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        if prev.is_some() && !(word(")") || word(",") || after_open || call) {
            out.push(' ');
        }
        match t {
            T::Column(c) => out.push_str(&quote_ident(&table.columns[*c].name)),
            T::Text(s) => out.push_str(&crate::pg::quote_literal(s)),
            T::Number(n) | T::Word(n) => out.push_str(n),
        }
        prev = Some(t);
    }
    out
}

/// `ALTER TABLE … ADD CONSTRAINT … CHECK (…)` for each CHECK the table
/// carries, with the constraint's name.
pub fn check_ddl(table: &TableSchema) -> Vec<(String, String)> {
    table
        .checks
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})",
                    quote_table(&table.target_name),
                    quote_ident(&c.name),
                    check_expr(table, c)
                ),
            )
        })
        .collect()
}

/// The `tsvector` column and GIN index of each full-text index the table
/// carries (a SQLite FTS table over it).
pub fn text_search_ddl(table: &TableSchema) -> Vec<String> {
    let name = quote_table(&table.target_name);
    let mut out = Vec::new();
    for ts in &table.text_search {
        let parts: Vec<String> = ts
            .columns
            .iter()
            .map(|&c| {
                format!(
                    "coalesce({}::text, '')",
                    quote_ident(&table.columns[c].name)
                )
            })
            .collect();
        let column = quote_ident(&ts.name);
        out.push(format!(
            "ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {column} tsvector GENERATED ALWAYS AS (to_tsvector({}::regconfig, {})) STORED",
            crate::pg::quote_literal(&ts.config),
            parts.join(" || ' ' || ")
        ));
        out.push(format!(
            "CREATE INDEX IF NOT EXISTS {} ON {name} USING gin ({column})",
            quote_ident(&format!("{}_gin", ts.name))
        ));
    }
    out
}

/// `DECIMAL(12, 2)` → `numeric(12,2)`; no precision → `numeric`.
fn decimal_type(declared: &str) -> String {
    let digits: Vec<&str> = declared
        .split(['(', ')', ','])
        .skip(1)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    match digits.as_slice() {
        [p] if p.parse::<u32>().is_ok() => format!("numeric({p})"),
        [p, s] if p.parse::<u32>().is_ok() && s.parse::<u32>().is_ok() => {
            format!("numeric({p},{s})")
        }
        _ => "numeric".into(),
    }
}

/// The type a text value is cast to before it is assigned to a column of
/// `column_type`: without length or precision, so that a value that does not
/// fit raises the column's own error instead of being cut by an explicit
/// cast (`character` and `bit` keep any length through `bpchar`/`varbit`).
pub fn cast_type(column_type: &str) -> String {
    let array = column_type.ends_with("[]");
    let base = base_name(column_type);
    let base = match base.as_str() {
        "character" => "bpchar".to_string(),
        "bit" => "bit varying".to_string(),
        _ => base,
    };
    if array {
        format!("{base}[]")
    } else {
        base
    }
}

/// Whether a column of `have` holds every value of a source column mapped
/// to `want`: the same type (length and precision aside), or a widening.
pub fn holds(want: &str, have: &str) -> bool {
    let (w, h) = (cast_type(want), cast_type(have));
    if w == h {
        return true;
    }
    const WIDER: &[(&str, &[&str])] = &[
        ("smallint", &["integer", "bigint", "numeric"]),
        ("integer", &["bigint", "numeric"]),
        ("bigint", &["numeric"]),
        ("real", &["double precision"]),
        ("character varying", &["text"]),
        ("bpchar", &["text", "character varying"]),
        ("name", &["text", "character varying"]),
        ("timestamp without time zone", &["timestamp with time zone"]),
        ("json", &["jsonb"]),
    ];
    WIDER
        .iter()
        .any(|(from, to)| *from == w && to.contains(&h.as_str()))
}

/// Whether a target column type is an array.
pub fn is_array(target_type: &str) -> bool {
    target_type.ends_with("[]")
}

/// A value as PostgreSQL's text input for a column of `target_type`; `None`
/// for NULL. `Value::Unchanged` has no text (the caller leaves the column).
pub fn to_text(v: &Value, target_type: &str) -> Option<String> {
    Some(match v {
        Value::Null | Value::Unchanged => return None,
        Value::Bool(b) => if *b { "t" } else { "f" }.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(x) if x.is_nan() => "NaN".into(),
        Value::Float(x) if x.is_infinite() => {
            if *x > 0.0 { "Infinity" } else { "-Infinity" }.into()
        }
        // A whole number written as a decimal, for an integer column of
        // the team's schema (narrower than the source's numeric).
        Value::Float(x) if x.is_finite() && is_integer_type(target_type) => {
            let text = format!("{x:?}");
            crate::schema::narrow::whole_text(&text).unwrap_or(text)
        }
        Value::Decimal(d) if is_integer_type(target_type) => {
            crate::schema::narrow::whole_text(d).unwrap_or_else(|| d.clone())
        }
        Value::Float(x) => format!("{x:?}"),
        Value::Decimal(d) => d.clone(),
        Value::Text(s) => s.clone(),
        Value::Bytes(b) => crate::model::hex_text(b),
        Value::Json(j) if is_array(target_type) => {
            match serde_json::from_str::<&serde_json::value::RawValue>(j) {
                Ok(v) => array_literal(v),
                Err(_) => j.clone(),
            }
        }
        Value::Json(j) => j.clone(),
        #[cfg(feature = "surrealdb")]
        Value::Native(n) => return to_text(&Value::Json(n.json.clone()), target_type),
        Value::Timestamp(t) => timestamp_text(t),
    })
}

/// `smallint`, `integer`, `bigint` (or a domain's base named so).
fn is_integer_type(target_type: &str) -> bool {
    matches!(
        cast_type(target_type).as_str(),
        "smallint" | "integer" | "bigint"
    )
}

/// A timestamp as PostgreSQL input: UTC, BC years as such, and the largest /
/// smallest date-time as `infinity` / `-infinity` (see the source's mapping).
pub fn timestamp_text(t: &DateTime<Utc>) -> String {
    if *t == DateTime::<Utc>::MAX_UTC {
        return "infinity".into();
    }
    if *t == DateTime::<Utc>::MIN_UTC {
        return "-infinity".into();
    }
    let y = t.year();
    let rest = t.format("-%m-%d %H:%M:%S%.f+00");
    if y <= 0 {
        format!("{:04}{rest} BC", 1 - y)
    } else {
        // Not chrono's `%Y`: it writes years past 9999 with a `+`.
        format!("{y:04}{rest}")
    }
}

/// A JSON array (as the source carries PostgreSQL arrays) as an array
/// literal; numbers keep their exact text.
pub fn array_literal(v: &serde_json::value::RawValue) -> String {
    fn quote(s: &str) -> String {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
    let text = v.get();
    match text.as_bytes().first() {
        Some(b'[') => match serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text) {
            Ok(items) => format!(
                "{{{}}}",
                items
                    .into_iter()
                    .map(array_literal)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Err(_) => quote(text),
        },
        Some(b'n') => "NULL".into(),
        Some(b'"') => {
            quote(&serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_string()))
        }
        Some(b'{') => quote(text),
        _ => text.to_string(),
    }
}

/// Appends a value to a COPY text-format line.
pub fn copy_field(out: &mut String, text: Option<&str>) {
    match text {
        None => out.push_str("\\N"),
        Some(s) => {
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
        }
    }
}

/// The enum types of `table` as `CREATE TYPE` statements that do nothing
/// where the type exists.
pub fn enum_ddl(table: &TableSchema) -> Vec<String> {
    table
        .enum_types
        .iter()
        .map(|(name, labels)| {
            let labels: Vec<String> = labels.iter().map(|l| crate::pg::quote_literal(l)).collect();
            format!(
                "DO $$ BEGIN CREATE TYPE {name} AS ENUM ({}); EXCEPTION WHEN duplicate_object THEN NULL; END $$",
                labels.join(", ")
            )
        })
        .collect()
}

/// The column definition of column `i` of a table switchyard creates: its
/// type, identity or portable default, and NOT NULL.
pub fn column_definition(table: &TableSchema, i: usize, source_is_postgres: bool) -> String {
    let col = &table.columns[i];
    let ty = table_column_type(table, i, source_is_postgres);
    let not_null = if col.nullable || table.whole_row {
        ""
    } else {
        " NOT NULL"
    };
    let fills = match table.column_defaults.iter().find(|d| d.column == i) {
        // Replicated rows carry their values (OVERRIDING SYSTEM VALUE);
        // after the load the identity continues past the highest.
        Some(d) if d.identity && matches!(ty.as_str(), "smallint" | "integer" | "bigint") => {
            " GENERATED BY DEFAULT AS IDENTITY".to_string()
        }
        Some(crate::model::ColumnDefault {
            default: Some(e), ..
        }) => format!(" DEFAULT {e}"),
        _ => String::new(),
    };
    format!("{} {ty}{fills}{not_null}", quote_ident(&col.name))
}

/// The statements that bring a table switchyard created from shape `old`
/// to shape `new` in place: renames, drops (or, keeping a dropped column,
/// its NOT NULL lifted so rows without it still go in), type changes,
/// additions (rows that existed get the value the source gave them), and
/// nullability and defaults.
pub fn alter_ddl(
    old: &TableSchema,
    new: &TableSchema,
    source_is_postgres: bool,
    drop_columns: bool,
) -> Vec<String> {
    use crate::schema::diff::{diff, AlterStep};
    let t = quote_table(&new.target_name);
    let mut out = enum_ddl(new);
    if old.target_name != new.target_name {
        // RENAME TO takes a bare name; another schema is SET SCHEMA.
        let split = |n: &str| match n.split_once('.') {
            Some((s, t)) => (Some(s.to_string()), t.to_string()),
            None => (None, n.to_string()),
        };
        let ((from_schema, from), (to_schema, to)) =
            (split(&old.target_name), split(&new.target_name));
        let mut at = quote_table(&old.target_name);
        if from != to {
            out.push(format!("ALTER TABLE {at} RENAME TO {}", quote_ident(&to)));
            at = match &from_schema {
                Some(s) => format!("{}.{}", quote_ident(s), quote_ident(&to)),
                None => quote_ident(&to),
            };
        }
        if from_schema != to_schema {
            out.push(format!(
                "ALTER TABLE {at} SET SCHEMA {}",
                quote_ident(to_schema.as_deref().unwrap_or("public"))
            ));
        }
    }
    // CHECKs that changed: the old ones go before the columns change, the
    // new ones are added once they have.
    let checks_changed = old.checks != new.checks;
    if checks_changed {
        for c in &old.checks {
            out.push(format!(
                "ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {}",
                quote_ident(&c.name)
            ));
        }
    }
    for step in diff(old, new) {
        match step {
            AlterStep::Rename { from, column } => out.push(format!(
                "ALTER TABLE {t} RENAME COLUMN {} TO {}",
                quote_ident(&from),
                quote_ident(&new.columns[column].name)
            )),
            AlterStep::Drop { name } if drop_columns => out.push(format!(
                "ALTER TABLE {t} DROP COLUMN {}",
                quote_ident(&name)
            )),
            AlterStep::Drop { name } => out.push(format!(
                "ALTER TABLE {t} ALTER COLUMN {} DROP NOT NULL",
                quote_ident(&name)
            )),
            AlterStep::Type { column, .. } => out.push(format!(
                "ALTER TABLE {t} ALTER COLUMN {} TYPE {}",
                quote_ident(&new.columns[column].name),
                table_column_type(new, column, source_is_postgres)
            )),
            AlterStep::Add { column } => {
                let col = &new.columns[column];
                let ty = table_column_type(new, column, source_is_postgres);
                let d = new.column_defaults.iter().find(|d| d.column == column);
                let existing = d.and_then(|d| d.existing.as_deref());
                let mut add = format!("ALTER TABLE {t} ADD COLUMN {} {ty}", quote_ident(&col.name));
                if let Some(v) = existing {
                    add.push_str(&format!(
                        " DEFAULT {}::{}",
                        crate::pg::quote_literal(v),
                        cast_type(&ty)
                    ));
                }
                out.push(add);
                match d.and_then(|d| d.default.as_deref()) {
                    Some(e) if Some(e) != existing => out.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {} SET DEFAULT {e}",
                        quote_ident(&col.name)
                    )),
                    Some(_) => {}
                    None if existing.is_some() => out.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {} DROP DEFAULT",
                        quote_ident(&col.name)
                    )),
                    None => {}
                }
                if !col.nullable && !new.whole_row {
                    out.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {} SET NOT NULL",
                        quote_ident(&col.name)
                    ));
                }
            }
            AlterStep::Nullable { column } => {
                let col = &new.columns[column];
                out.push(format!(
                    "ALTER TABLE {t} ALTER COLUMN {} {} NOT NULL",
                    quote_ident(&col.name),
                    if col.nullable { "DROP" } else { "SET" }
                ))
            }
            AlterStep::Default { column } => {
                let col = quote_ident(&new.columns[column].name);
                out.push(
                    match new
                        .column_defaults
                        .iter()
                        .find(|d| d.column == column)
                        .and_then(|d| d.default.as_deref())
                    {
                        Some(e) => format!("ALTER TABLE {t} ALTER COLUMN {col} SET DEFAULT {e}"),
                        None => format!("ALTER TABLE {t} ALTER COLUMN {col} DROP DEFAULT"),
                    },
                )
            }
        }
    }
    if checks_changed {
        out.extend(check_ddl(new).into_iter().map(|(_, sql)| sql));
    }
    out
}

/// The primary key of a table switchyard creates, built after its load.
pub fn primary_key_ddl(table: &TableSchema) -> String {
    let keys: Vec<String> = table
        .key
        .iter()
        .map(|&i| quote_ident(&table.columns[i].name))
        .collect();
    format!(
        "ALTER TABLE {} ADD PRIMARY KEY ({})",
        quote_table(&table.target_name),
        keys.join(", ")
    )
}

/// The statements that build the source's secondary indexes and foreign keys
/// on the target tables, in order (indexes first), each with the name it
/// creates; a foreign key to a table that is not replicated is skipped.
pub fn secondary_ddl(
    tables: &[std::sync::Arc<TableSchema>],
) -> Vec<std::result::Result<(String, String), String>> {
    use crate::model::Secondary;
    let target_of = |source: &str| {
        tables
            .iter()
            .find(|t| t.name == source)
            .map(|t| t.target_name.clone())
    };
    let mut indexes = Vec::new();
    let mut fks = Vec::new();
    for t in tables {
        for s in &t.secondary {
            match s {
                Secondary::Index { name, unique, using, .. } => indexes.push(Ok((
                    name.clone(),
                    format!(
                        "CREATE {}INDEX IF NOT EXISTS {} ON {} {using}",
                        if *unique { "UNIQUE " } else { "" },
                        quote_ident(name),
                        quote_table(&t.target_name)
                    ),
                ))),
                Secondary::ForeignKey { name, columns, references, ref_columns, actions } => match target_of(references) {
                    Some(target) => {
                        let q = |v: &[String]| v.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ");
                        fks.push(Ok((
                            name.clone(),
                            format!(
                                "ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) {actions}",
                                quote_table(&t.target_name),
                                quote_ident(name),
                                q(columns),
                                quote_table(&target),
                                q(ref_columns)
                            ),
                        )))
                    }
                    None => fks.push(Err(format!(
                        "table {:?}: foreign key {name:?} references {references:?}, which is not replicated; it is not built in the target",
                        t.name
                    ))),
                },
            }
        }
    }
    indexes.extend(fks);
    indexes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(logical: LogicalType, declared: &str) -> Column {
        Column {
            name: "c".into(),
            source_type: declared.into(),
            logical,
            nullable: true,
        }
    }

    #[test]
    fn types_are_kept_or_mapped() {
        assert_eq!(
            column_type(&col(LogicalType::Decimal, "numeric(12,2)"), true),
            "numeric(12,2)"
        );
        assert_eq!(
            column_type(&col(LogicalType::Json, "integer[]"), true),
            "integer[]"
        );
        assert_eq!(
            column_type(
                &col(LogicalType::Timestamp, "timestamp(3) with time zone"),
                true
            ),
            "timestamp(3) with time zone"
        );
        assert_eq!(column_type(&col(LogicalType::Text, "mood"), true), "text");
        assert_eq!(
            column_type(&col(LogicalType::Text, "character varying(20)"), true),
            "character varying(20)"
        );
        assert_eq!(
            column_type(&col(LogicalType::Decimal, "DECIMAL(12, 2)"), false),
            "numeric(12,2)"
        );
        assert_eq!(
            column_type(&col(LogicalType::Bool, "BOOLEAN"), false),
            "boolean"
        );
        assert_eq!(column_type(&col(LogicalType::Json, "JSON"), false), "jsonb");
        assert_eq!(
            column_type(&col(LogicalType::Timestamp, "DATETIME"), false),
            "timestamp with time zone"
        );
        assert_eq!(
            column_type(&col(LogicalType::Float, "REAL"), false),
            "double precision"
        );
        assert_eq!(
            column_type(&col(LogicalType::Bytes, "BLOB"), false),
            "bytea"
        );
    }

    #[test]
    fn casts_leave_the_length_to_the_column() {
        assert_eq!(cast_type("character varying(20)"), "character varying");
        assert_eq!(cast_type("character(3)"), "bpchar");
        assert_eq!(cast_type("bit(4)[]"), "bit varying[]");
        assert_eq!(
            cast_type("timestamp(3) with time zone"),
            "timestamp with time zone"
        );
        assert_eq!(cast_type("numeric(12,2)"), "numeric");
        assert!(
            holds("integer", "bigint")
                && holds("numeric(12,2)", "numeric(14,2)")
                && holds("text", "text")
        );
        assert!(
            !holds("numeric", "integer")
                && !holds("bytea", "uuid")
                && !holds("timestamp with time zone", "date")
        );
    }

    #[test]
    fn values_as_postgres_text() {
        assert_eq!(
            to_text(&Value::Bytes(vec![0, 255]), "bytea").as_deref(),
            Some("\\x00ff")
        );
        assert_eq!(
            to_text(&Value::Float(f64::NEG_INFINITY), "real").as_deref(),
            Some("-Infinity")
        );
        assert_eq!(
            to_text(
                &Value::Json(r#"[["a", "b,\"c"], [null, "x\\y"]]"#.into()),
                "text[]"
            )
            .as_deref(),
            Some(r#"{{"a","b,\"c"},{NULL,"x\\y"}}"#)
        );
        assert_eq!(
            to_text(&Value::Json("[1, 2]".into()), "jsonb").as_deref(),
            Some("[1, 2]")
        );
        assert_eq!(
            to_text(
                &Value::Json("[1.5777777777770001, 1e400]".into()),
                "double precision[]"
            )
            .as_deref(),
            Some("{1.5777777777770001,1e400}")
        );
        assert_eq!(
            to_text(
                &Value::Json(r#"["null", "[1,2]", "{\"k\": 1}"]"#.into()),
                "jsonb[]"
            )
            .as_deref(),
            Some(r#"{"null","[1,2]","{\"k\": 1}"}"#)
        );
        let far =
            crate::source::postgres::values::parse_timestamp("12345-06-07 08:09:10+00").unwrap();
        assert_eq!(timestamp_text(&far), "12345-06-07 08:09:10+00");
        assert_eq!(timestamp_text(&DateTime::<Utc>::MAX_UTC), "infinity");
        let bc =
            crate::source::postgres::values::parse_timestamp("0044-03-15 12:00:00+00 BC").unwrap();
        assert_eq!(timestamp_text(&bc), "0044-03-15 12:00:00+00 BC");
        let mut line = String::new();
        copy_field(&mut line, Some("a\tb\\c\nd"));
        line.push('\t');
        copy_field(&mut line, None);
        assert_eq!(line, "a\\tb\\\\c\\nd\t\\N");
    }
}
