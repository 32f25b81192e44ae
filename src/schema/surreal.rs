//! Source columns → SurrealDB fields, and the SurrealQL that defines and
//! changes them.

use crate::model::{Column, LogicalType, TableSchema};

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
fn asserted(t: &TableSchema, name: &str) -> Option<Vec<serde_json::Value>> {
    t.checks.iter().find_map(|c| {
        c.allowed_values()
            .filter(|(i, _)| t.columns[*i].name == name)
            .map(|(_, v)| v)
    })
}

/// `TYPE …` of column `i`'s field, with `ASSERT $value IN [...]` where a
/// CHECK lists the values the column allows.
pub fn field_clause(t: &TableSchema, i: usize) -> String {
    let c = &t.columns[i];
    let mut out = format!("TYPE {}", field_type(c));
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
        LogicalType::Any => "any",
    }
}

/// The `TYPE` of the field: `option<T>` for a nullable column.
pub fn field_type(column: &Column) -> String {
    let t = base_type(column.logical);
    if column.nullable && t != "any" {
        format!("option<{t}>")
    } else {
        t.to_string()
    }
}

/// How `check` shows the column in the target.
pub fn describe(table: &TableSchema, col: usize, schemafull: bool) -> String {
    match field_name(table, col) {
        None => "record id".into(),
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
