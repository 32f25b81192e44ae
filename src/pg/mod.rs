//! What the PostgreSQL source and the PostgreSQL sink share: where a server
//! is and how to reach it ([`conn`]), quoting, the session settings that fix
//! the text form of values, the classification of server errors, and the
//! WAL position type.

pub mod conn;
pub mod tools;

use crate::error::ErrorKind;

/// A WAL position (XLogRecPtr), shown as PostgreSQL does (`0/16B3748`).
pub type Lsn = postgres_types::PgLsn;

/// The session settings every connection of ours uses, so that text values
/// have one format whatever the server's defaults are.
pub const SESSION_SETTINGS: [(&str, &str); 6] = [
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    // Switchyard's own sessions write through a cutover's read-only fence
    // (a reverse replica applies into the fenced old source).
    ("default_transaction_read_only", "off"),
];

/// The session settings as `SET` statements.
pub fn session_settings_sql() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("SET {k} = {}", quote_literal(v)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How a table's rows go from a PostgreSQL source into a PostgreSQL target
/// as COPY data, without being decoded on the way (every column of the same
/// type on both sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    /// COPY text: the target parses every value.
    Text,
    /// Binary COPY: each value in its type's binary form, which the target
    /// takes without parsing text. Only for built-in types (an array's or a
    /// record's binary form names type OIDs, which differ between databases
    /// for types made by users and extensions) between servers of the same
    /// major version and encoding (the binary form of text is in the
    /// server's encoding); see [`BinaryForm`].
    Binary,
}

impl CopyFormat {
    /// The COPY option that selects the format.
    pub fn option(self) -> &'static str {
        match self {
            CopyFormat::Text => "",
            CopyFormat::Binary => " (FORMAT binary)",
        }
    }
}

/// What a table's binary COPY data depends on besides its column types:
/// equal on both sides, with built-in column types on both, the target takes
/// the source's binary COPY as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryForm {
    /// The server's major version (`server_version_num / 10000`).
    pub major: i32,
    pub encoding: String,
}

/// A table's [`BinaryForm`] on this server: `None` where one of `columns`
/// is not a built-in type with binary send and receive functions (or is not
/// in the table). `relation` is the quoted, qualified table name.
pub async fn binary_form(
    c: &impl tokio_postgres::GenericClient,
    relation: &str,
    columns: &[String],
) -> std::result::Result<Option<BinaryForm>, tokio_postgres::Error> {
    // FirstNormalObjectId: OIDs below it are the ones initdb made.
    let row = c
        .query_one(
            "SELECT count(*) = cardinality($2::text[])
                    AND coalesce(bool_and(t.oid < 16384 AND t.typsend <> 0 AND t.typreceive <> 0), false),
                    current_setting('server_version_num')::int / 10000,
                    current_setting('server_encoding')
               FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = to_regclass($1) AND a.attname = ANY($2::text[])
                AND a.attnum > 0 AND NOT a.attisdropped",
            &[&relation, &columns],
        )
        .await?;
    Ok(row.get::<_, bool>(0).then(|| BinaryForm {
        major: row.get(1),
        encoding: row.get(2),
    }))
}

/// Quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An identifier as PostgreSQL's `pg_get_*def` functions write it, back to
/// its name: `"Last Name"` (quotes doubled inside), or a plain lowercase
/// one; `None` for anything else (an expression).
pub fn unquote_ident(s: &str) -> Option<String> {
    match s.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
        Some(q) => Some(q.replace("\"\"", "\"")),
        None if s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') =>
        {
            Some(s.to_string())
        }
        None => None,
    }
}

/// Quotes a table name: `schema.table` as two identifiers, `table` as one
/// (found on the search path: `public`).
pub fn quote_table(s: &str) -> String {
    match s.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(s),
    }
}

/// Quotes a string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `schema.table`, each part quoted.
pub fn quote_qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// SQLSTATE classes that are worth retrying: connection exceptions (08),
/// insufficient resources (53), operator intervention (57P), serialization
/// failures and deadlocks (40001, 40P01).
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || code == "40001"
        || code == "40P01"
}

/// The kind of a server error by its SQLSTATE: transient, a refused
/// connection (authentication, 28; a database that does not exist, 3D000),
/// or definite.
pub fn sqlstate_kind(code: &str) -> ErrorKind {
    if is_transient_sqlstate(code) {
        ErrorKind::Transient
    } else if code.starts_with("28") || code == "3D000" {
        ErrorKind::Connect
    } else {
        ErrorKind::Definite
    }
}
