//! Reading PostgreSQL's refusals: which SQLSTATEs mean a value does not
//! fit its column (as opposed to a constraint or a lost connection), and
//! which line and column of a COPY it was.

use crate::error::Error;
use crate::model::{Row, TableSchema, Value};
use crate::pg::conn::{pg_error, PgEndpoint};

/// A value the column's type cannot hold (SQLSTATE class 22, data
/// exception), as opposed to a constraint, a lost connection or a bug of
/// ours in the COPY format (22P04).
pub fn misfit_code(e: &tokio_postgres::Error) -> bool {
    e.code()
        .map(|c| c.code())
        .is_some_and(|c| c.starts_with("22") && c != "22P04")
}

/// The input line of a failed `COPY … FROM STDIN` (1-based), from the
/// error's context `COPY t, line 3, column n: "…"`.
pub fn copy_line(e: &tokio_postgres::Error, table: &TableSchema) -> Option<usize> {
    let at = e.as_db_error()?.where_()?;
    let rest = match at.strip_prefix(&format!("COPY {}, line ", table.target_name)) {
        Some(rest) => rest,
        None => &at[at.find(", line ")? + ", line ".len()..],
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The column named by a failed COPY's context, as an index into the table's
/// columns (the longest name that fits, for names holding `:`).
pub fn copy_column(e: &tokio_postgres::Error, table: &TableSchema) -> Option<usize> {
    let at = e.as_db_error()?.where_()?;
    let rest = &at[at.find(", column ")? + ", column ".len()..];
    table
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            rest.strip_prefix(c.name.as_str())
                .is_some_and(|r| r.is_empty() || r.starts_with(':'))
        })
        .max_by_key(|(_, c)| c.name.len())
        .map(|(i, _)| i)
}

/// PostgreSQL text holds no NUL character, and its error names no column:
/// the first column whose text has one.
pub fn nul_column(row: &Row) -> Option<usize> {
    row.iter().position(|v| match v {
        Value::Text(s) | Value::Json(s) => s.contains('\0'),
        #[cfg(feature = "surrealdb")]
        Value::Native(n) => n.json.contains('\0'),
        _ => false,
    })
}

/// A failed statement on a row: the server's words with the table and key.
pub fn row_error(
    ep: &PgEndpoint,
    table: &TableSchema,
    what: &str,
    e: tokio_postgres::Error,
) -> Error {
    pg_error(ep, what, e).context(format!("target table {}", table.target_name))
}
