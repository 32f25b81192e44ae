//! Source columns → SurrealDB fields.

use crate::model::{Column, LogicalType, TableSchema};

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
        Some(f) if schemafull => format!("{f}: {}", field_type(&table.columns[col])),
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
