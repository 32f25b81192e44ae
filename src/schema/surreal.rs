//! Source columns → SurrealDB fields, and the SurrealQL that defines and
//! changes them.

use crate::model::{Column, LogicalType, Secondary, TableSchema};

/// Quotes a SurrealQL identifier with backticks.
pub fn ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for c in name.chars() {
        match c {
            '`' => out.push_str("\\`"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('`');
    out
}

/// The statements that define a table and its fields where missing.
pub fn define_table(t: &TableSchema, schemafull: bool) -> String {
    let tn = ident(&t.target_name);
    if !schemafull {
        return format!("DEFINE TABLE IF NOT EXISTS {tn} SCHEMALESS;\n");
    }
    if let Some(def) = &t.surreal {
        // A SurrealDB source's own definition, nested fields included.
        let mode = if def.schemafull {
            "SCHEMAFULL"
        } else {
            "SCHEMALESS"
        };
        let mut sql = format!("DEFINE TABLE IF NOT EXISTS {tn} {mode};\n");
        for (path, clauses) in &def.fields {
            // A typed array or object defines its elements' field itself
            // (`tags.*` of `array<string>`): the source's replaces it.
            let how = if path.contains(['.', '[']) {
                "OVERWRITE"
            } else {
                "IF NOT EXISTS"
            };
            sql.push_str(&format!(
                "DEFINE FIELD {how} {path} ON TABLE {tn} {clauses};\n"
            ));
        }
        return sql;
    }
    let mut sql = format!("DEFINE TABLE IF NOT EXISTS {tn} SCHEMAFULL;\n");
    for i in 0..t.columns.len() {
        if let Some(f) = field_name(t, i) {
            sql.push_str(&format!(
                "DEFINE FIELD IF NOT EXISTS {} ON TABLE {tn} {};\n",
                ident(&f),
                field_clause(t, i)
            ));
        }
    }
    if t.whole_row {
        sql.push_str(&format!(
            "DEFINE FIELD IF NOT EXISTS {COPIES_FIELD} ON TABLE {tn} TYPE int;\n"
        ));
    }
    sql
}

/// The statements that bring a table from shape `old` to `new`: fields
/// added, retyped and dropped (records are written whole here, so a dropped
/// column's values go), renamed (values moved to the new field).
pub fn alter_ql(old: &TableSchema, new: &TableSchema, schemafull: bool) -> Vec<String> {
    use crate::schema::diff::{diff, AlterStep};
    let tn = ident(&new.target_name);
    let field = |t: &TableSchema, i: usize| field_name(t, i).map(|f| ident(&f));
    let mut out = Vec::new();
    let define = |t: &TableSchema, i: usize| {
        field(t, i).filter(|_| schemafull).map(|f| {
            format!(
                "DEFINE FIELD OVERWRITE {f} ON TABLE {tn} {};",
                field_clause(t, i)
            )
        })
    };
    for step in diff(old, new) {
        match step {
            AlterStep::Rename { from, column } => {
                let Some(to) = field(new, column) else {
                    continue;
                };
                let from = ident(if from == "id" { "source_id" } else { &from });
                out.extend(define(new, column));
                out.push(format!("UPDATE {tn} SET {to} = {from} RETURN NONE;"));
                out.push(format!("UPDATE {tn} UNSET {from} RETURN NONE;"));
                if schemafull {
                    out.push(format!("REMOVE FIELD IF EXISTS {from} ON TABLE {tn};"));
                }
            }
            AlterStep::Drop { name } => {
                let f = ident(if name == "id" { "source_id" } else { &name });
                out.push(format!("UPDATE {tn} UNSET {f} RETURN NONE;"));
                if schemafull {
                    out.push(format!("REMOVE FIELD IF EXISTS {f} ON TABLE {tn};"));
                }
            }
            AlterStep::Type { column, .. }
            | AlterStep::Add { column }
            | AlterStep::Nullable { column } => out.extend(define(new, column)),
            AlterStep::Default { .. } => {}
        }
    }
    // A column whose list of allowed values changed.
    if old.checks != new.checks {
        for i in 0..new.columns.len() {
            if asserted(old, &new.columns[i].name) != asserted(new, &new.columns[i].name) {
                out.extend(define(new, i));
            }
        }
    }
    out.dedup();
    out
}

/// The values a CHECK of the table allows column `name`, where one lists
/// them (`status IN ('draft', 'active')`).
/// An enum column's labels likewise.
fn asserted(t: &TableSchema, name: &str) -> Option<Vec<serde_json::Value>> {
    let listed = t.checks.iter().find_map(|c| {
        c.allowed_values()
            .filter(|(i, _)| t.columns[*i].name == name)
            .map(|(_, v)| v)
    });
    listed.or_else(|| {
        let col = t.columns.iter().find(|c| c.name == name)?;
        t.enum_types
            .iter()
            .find(|(ty, _)| *ty == col.source_type)
            .map(|(_, labels)| labels.iter().map(|l| l.as_str().into()).collect())
    })
}

/// `TYPE …` of column `i`'s field, with `ASSERT $value IN [...]` where a
/// CHECK lists the values the column allows.
pub fn field_clause(t: &TableSchema, i: usize) -> String {
    let c = &t.columns[i];
    let ty = match t.links.iter().find(|l| l.column == i) {
        Some(l) if c.nullable => format!("option<record<{}>>", ident(&l.table)),
        Some(l) => format!("record<{}>", ident(&l.table)),
        None => field_type(c),
    };
    let mut out = format!("TYPE {ty}");
    if let Some(d) = default_ql(t, i) {
        out.push_str(&format!(" DEFAULT {d}"));
    }
    if let Some(values) = asserted(t, &c.name) {
        let list: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        if c.nullable {
            out.push_str(&format!(
                " ASSERT $value = NONE OR $value IN [{}]",
                list.join(", ")
            ));
        } else {
            out.push_str(&format!(" ASSERT $value IN [{}]", list.join(", ")));
        }
    }
    out
}

/// The SurrealQL form of column `i`'s source default, where it has one:
/// the clock, a new uuid, a constant. Only for a NOT NULL column: in a
/// nullable one a NULL the source holds would become the default in the
/// target (a missing field takes it).
pub fn default_ql(t: &TableSchema, i: usize) -> Option<String> {
    let c = &t.columns[i];
    if c.nullable {
        return None;
    }
    let d = t
        .column_defaults
        .iter()
        .find(|d| d.column == i && !d.identity)?;
    let e = d.default.as_deref()?.trim();
    let e = e
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .unwrap_or(e);
    match (c.logical, e) {
        (
            LogicalType::Timestamp,
            "now()"
            | "CURRENT_TIMESTAMP"
            | "LOCALTIMESTAMP"
            | "statement_timestamp()"
            | "transaction_timestamp()"
            | "clock_timestamp()",
        ) => Some("time::now()".into()),
        (LogicalType::Date, "CURRENT_DATE") => Some("time::floor(time::now(), 1d)".into()),
        (LogicalType::Uuid, "gen_random_uuid()") => Some("rand::uuid::v4()".into()),
        (LogicalType::Bool, "true" | "false") => Some(e.into()),
        (LogicalType::Int, _) => e.parse::<i64>().ok().map(|n| n.to_string()),
        (LogicalType::Float, _) => e
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .map(|x| format!("{x:?}f")),
        (LogicalType::Decimal, _) => {
            let text = quoted_literal(e).unwrap_or(e);
            rust_decimal::Decimal::from_str_exact(text)
                .ok()
                .map(|x| format!("{x}dec"))
        }
        (LogicalType::Text, _) => {
            quoted_literal(e).map(|v| serde_json::Value::String(v.replace("''", "'")).to_string())
        }
        _ => None,
    }
}

/// `'text'::type` (or `'text'`) → `text` (quotes still doubled).
fn quoted_literal(e: &str) -> Option<&str> {
    let rest = e.strip_prefix('\'')?;
    let end = rest.rfind('\'')?;
    let after = &rest[end + 1..];
    (after.is_empty() || after.starts_with("::")).then(|| &rest[..end])
}

/// The field a column is stored in, or `None` when the record id carries it
/// (a single key column named `id`). Another column named `id` is stored as
/// `source_id`, because `id` is the record id in SurrealDB.
pub fn field_name(table: &TableSchema, col: usize) -> Option<String> {
    let name = &table.columns[col].name;
    if name == "id" {
        if table.key == [col] && !table.whole_row {
            None
        } else {
            Some("source_id".into())
        }
    } else {
        Some(name.clone())
    }
}

pub fn base_type(logical: LogicalType) -> &'static str {
    match logical {
        LogicalType::Bool => "bool",
        LogicalType::Int => "int",
        LogicalType::Float => "float",
        // `number`, not `decimal`: PostgreSQL's numeric NaN and ±Infinity
        // arrive as floats; every other value is stored as a decimal, or as
        // its exact text when it has more than 28 significant digits.
        LogicalType::Decimal => "number | string",
        LogicalType::Text => "string",
        LogicalType::Bytes => "bytes",
        LogicalType::Json => "any",
        LogicalType::Timestamp => "datetime",
        LogicalType::Uuid => "uuid",
        // Midnight UTC of the day.
        LogicalType::Date => "datetime",
        // A duration where the interval has a fixed length and is not
        // negative, else its ISO 8601 text (`P1M`, `P-1D`).
        LogicalType::Interval => "duration | string",
        LogicalType::Any => "any",
    }
}

/// The `TYPE` of the field: `option<T>` for a nullable column; `array` for
/// a PostgreSQL array (whose elements may be NULL, and whose number of
/// dimensions the column does not fix).
pub fn field_type(column: &Column) -> String {
    let t = if column.logical == LogicalType::Json && column.source_type.ends_with("[]") {
        "array"
    } else {
        base_type(column.logical)
    };
    if column.nullable && t != "any" {
        format!("option<{t}>")
    } else {
        t.to_string()
    }
}

/// How `check` shows the column in the target.
pub fn describe(table: &TableSchema, col: usize, schemafull: bool) -> String {
    let carried = table.surreal.as_ref().and_then(|def| {
        let name = &table.columns[col].name;
        def.fields
            .iter()
            .find(|(path, _)| path.trim_matches('`') == name)
            .map(|(_, clauses)| clauses)
    });
    match field_name(table, col) {
        None => "record id".into(),
        Some(f) if schemafull && carried.is_some() => format!(
            "{f}: {} (as the source defines it)",
            carried.map_or("", |c| c.trim_start_matches("TYPE "))
        ),
        Some(f) if schemafull => format!(
            "{f}: {}",
            field_clause(table, col).trim_start_matches("TYPE ")
        ),
        Some(f) => format!("{f} (schemaless)"),
    }
}

/// The field that counts identical rows of a table without a key.
pub const COPIES_FIELD: &str = "_switchyard_copies";

/// The record id's shape for the table's key.
pub fn describe_id(table: &TableSchema) -> String {
    if table.whole_row {
        return format!(
            "{}:<digest of the whole row>, with {COPIES_FIELD}",
            table.target_name
        );
    }
    let names = table.key_names();
    if names.len() == 1 {
        format!("{}:<{}>", table.target_name, names[0])
    } else {
        format!("{}:[{}]", table.target_name, names.join(", "))
    }
}

/// The `DEFINE INDEX` statements of a table's secondary indexes that
/// SurrealDB can hold (plain columns, no predicate, no expression), built
/// after the bulk load; and a note for each one it cannot.
pub fn index_ql(t: &TableSchema) -> (Vec<String>, Vec<String>) {
    let tn = ident(&t.target_name);
    let mut out = Vec::new();
    let mut notes = Vec::new();
    if let Some(def) = &t.surreal {
        // A SurrealDB source's indexes as it defines them, after the
        // analyzers its full-text ones use.
        for a in &def.analyzers {
            match a.strip_prefix("DEFINE ANALYZER ") {
                Some(rest) => out.push(format!("DEFINE ANALYZER IF NOT EXISTS {rest};")),
                None => notes.push(format!(
                    "analyzer {a:?} is not understood; define it in the target"
                )),
            }
        }
        for (name, clauses) in &def.indexes {
            out.push(format!(
                "DEFINE INDEX IF NOT EXISTS {} ON TABLE {tn} {clauses};",
                ident(name)
            ));
        }
        return (out, notes);
    }
    for s in &t.secondary {
        let Secondary::Index {
            name,
            unique,
            using,
            deferred,
        } = s
        else {
            continue;
        };
        let Some(fields) = index_fields(t, using) else {
            notes.push(format!(
                "index {name:?} ({using}) has no SurrealDB form (only plain columns are); it is not built"
            ));
            continue;
        };
        let fields: Vec<String> = fields.iter().map(|f| ident(f)).collect();
        // A unique constraint PostgreSQL checks at commit: SurrealDB checks
        // each statement, so two rows swapping values would stop the stream.
        let unique = *unique && !*deferred;
        if *deferred {
            notes.push(format!(
                "index {name:?} is a deferred unique constraint: built without UNIQUE (SurrealDB checks uniqueness at each statement)"
            ));
        }
        out.push(format!(
            "DEFINE INDEX IF NOT EXISTS {} ON TABLE {tn} FIELDS {}{};",
            ident(name),
            fields.join(", "),
            if unique { " UNIQUE" } else { "" }
        ));
    }
    (out, notes)
}

/// The fields of `USING btree (a, "B c")`: plain columns (ascending or
/// descending) of a btree or hash index without `INCLUDE` or `WHERE`.
fn index_fields(t: &TableSchema, using: &str) -> Option<Vec<String>> {
    let rest = using
        .strip_prefix("USING btree (")
        .or_else(|| using.strip_prefix("USING hash ("))?;
    let list = rest.strip_suffix(')')?;
    let mut fields = Vec::new();
    for part in split_columns(list)? {
        let part = part
            .trim()
            .trim_end_matches(" DESC")
            .trim_end_matches(" ASC")
            .trim();
        let name = crate::pg::unquote_ident(part)?;
        let i = t.columns.iter().position(|c| c.name == name)?;
        // The record id is unique and indexed already.
        fields.push(field_name(t, i)?);
    }
    (!fields.is_empty()).then_some(fields)
}

/// Splits at commas outside double quotes; `None` where a parenthesis
/// (an expression) appears outside them.
fn split_columns(list: &str) -> Option<Vec<String>> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    for c in list.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(String::new());
                continue;
            }
            '(' | ')' if !quoted => return None,
            _ => {}
        }
        parts.last_mut()?.push(c);
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Column, Secondary};

    fn table(secondary: Vec<Secondary>) -> TableSchema {
        let col = |n: &str| Column {
            name: n.into(),
            source_type: "text".into(),
            logical: LogicalType::Text,
            nullable: true,
        };
        TableSchema {
            secondary,
            ..TableSchema::keyed(
                "people".into(),
                "people".into(),
                vec![col("id"), col("email"), col("Last Name"), col("org")],
                vec![0],
            )
        }
    }

    fn index(name: &str, unique: bool, using: &str, deferred: bool) -> Secondary {
        Secondary::Index {
            name: name.into(),
            unique,
            using: using.into(),
            deferred,
        }
    }

    #[test]
    fn plain_column_indexes_become_define_index_and_the_rest_are_named() {
        let t = table(vec![
            index("people_email_key", true, "USING btree (email)", false),
            index(
                "by_name",
                false,
                "USING btree (\"Last Name\" DESC, org)",
                false,
            ),
            index("by_org", false, "USING hash (org)", false),
            index("swap_key", true, "USING btree (org)", true),
            index("lower_email", false, "USING btree (lower(email))", false),
            index(
                "partial",
                false,
                "USING btree (org) WHERE (org IS NOT NULL)",
                false,
            ),
            index("gin_email", false, "USING gin (email)", false),
            index("with_id", true, "USING btree (id, email)", false),
        ]);
        let (ql, notes) = index_ql(&t);
        assert_eq!(
            ql,
            vec![
                "DEFINE INDEX IF NOT EXISTS `people_email_key` ON TABLE `people` FIELDS `email` UNIQUE;",
                "DEFINE INDEX IF NOT EXISTS `by_name` ON TABLE `people` FIELDS `Last Name`, `org`;",
                "DEFINE INDEX IF NOT EXISTS `by_org` ON TABLE `people` FIELDS `org`;",
                "DEFINE INDEX IF NOT EXISTS `swap_key` ON TABLE `people` FIELDS `org`;",
            ]
        );
        assert_eq!(notes.len(), 5, "{notes:?}");
        for name in ["swap_key", "lower_email", "partial", "gin_email", "with_id"] {
            assert!(notes.iter().any(|n| n.contains(name)), "{name}: {notes:?}");
        }
    }

    #[test]
    fn defaults_with_a_surrealql_form_are_carried_on_not_null_fields() {
        use crate::model::ColumnDefault;
        let col = |n: &str, logical, nullable| Column {
            name: n.into(),
            source_type: String::new(),
            logical,
            nullable,
        };
        let cols = vec![
            col("at", LogicalType::Timestamp, false),
            col("status", LogicalType::Text, false),
            col("n", LogicalType::Int, false),
            col("price", LogicalType::Decimal, false),
            col("u", LogicalType::Uuid, false),
            col("maybe", LogicalType::Text, true),
            col("odd", LogicalType::Text, false),
            col("serial", LogicalType::Int, false),
        ];
        let d = |column, e: &str| ColumnDefault {
            column,
            identity: false,
            default: Some(e.into()),
            existing: None,
        };
        let t = TableSchema {
            column_defaults: vec![
                d(0, "now()"),
                d(1, "'it''s'::character varying"),
                d(2, "(-1)"),
                d(3, "'9.50'::numeric"),
                d(4, "gen_random_uuid()"),
                d(5, "'x'::text"),
                d(6, "upper('x')"),
                ColumnDefault {
                    column: 7,
                    identity: true,
                    default: None,
                    existing: None,
                },
            ],
            ..TableSchema::keyed("t".into(), "t".into(), cols, vec![7])
        };
        let got: Vec<Option<String>> = (0..8).map(|i| default_ql(&t, i)).collect();
        assert_eq!(
            got,
            vec![
                Some("time::now()".into()),
                Some("\"it's\"".into()),
                Some("-1".into()),
                Some("9.50dec".into()),
                Some("rand::uuid::v4()".into()),
                None,
                None,
                None
            ]
        );
    }
}
