//! Verify on a PostgreSQL target: the target renders both sides itself.
//! Source rows are cast to the target's column types and shown as
//! `ROW(…)::text`, beside `SELECT t::text` of the stored rows read in key
//! order, so values compare after the type mapping.

use tokio_postgres::Client;

use super::plan::{sql_params, unnest_columns};
use crate::error::Result;
use crate::model::{Row, TableSchema};
use crate::pg::conn::{pg_error, PgEndpoint};
use crate::pg::{quote_ident, quote_table};
use crate::schema::postgres::{cast_type, to_text};
use crate::sink::{Cursor, Page, Record};

/// Rows as the target renders them once stored: the key and the row as
/// `ROW(…)::text`, cast to the columns' full types (storing pads or rounds).
pub async fn render(
    c: &tokio_postgres::Client,
    table: &TableSchema,
    types: &[String],
    rows: &[Row],
) -> std::result::Result<Vec<Record>, tokio_postgres::Error> {
    let n = table.columns.len();
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(rows.len()); n];
    for row in rows {
        for (i, v) in row.iter().enumerate() {
            columns[i].push(to_text(v, &types[i]));
        }
    }
    let cast = |i: usize| format!("u.c{i}::{}", types[i]);
    let key_idx: Vec<usize> = if table.whole_row {
        (0..n).collect()
    } else {
        table.key.clone()
    };
    let sql = format!(
        "SELECT ROW({})::text, ROW({})::text FROM {}",
        key_idx
            .iter()
            .map(|&i| cast(i))
            .collect::<Vec<_>>()
            .join(", "),
        (0..n).map(cast).collect::<Vec<_>>().join(", "),
        unnest_columns(n)
    );
    let refs = sql_params(&columns);
    Ok(c.query(sql.as_str(), &refs)
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Pages in key order (tables without a key: in `ctid` order).
pub async fn records(
    c: &Client,
    ep: &PgEndpoint,
    table: &TableSchema,
    types: &[String],
    after: Option<&Cursor>,
    limit: usize,
) -> Result<Page> {
    let name = quote_table(&table.target_name);
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("zz_row.{}", quote_ident(&c.name)))
        .collect();
    let key_idx: Vec<usize> = if table.whole_row {
        (0..cols.len()).collect()
    } else {
        table.key.clone()
    };
    let key_expr = format!(
        "ROW({})::text",
        key_idx
            .iter()
            .map(|&i| cols[i].clone())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let last: Option<&Vec<Option<String>>> =
        after.and_then(|c| c.0.downcast_ref::<Vec<Option<String>>>());
    let (order, filter, params): (String, String, Vec<Option<String>>) = if table.whole_row {
        let f = if last.is_some() {
            "WHERE zz_row.ctid > $1::text::tid".to_string()
        } else {
            String::new()
        };
        ("zz_row.ctid".into(), f, last.cloned().unwrap_or_default())
    } else {
        let keys: Vec<String> = table.key.iter().map(|&i| cols[i].clone()).collect();
        let f = match last {
            Some(_) => format!(
                "WHERE ({}) > ({})",
                keys.join(", "),
                table
                    .key
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| format!("${}::text::{}", n + 1, cast_type(&types[i])))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => String::new(),
        };
        (keys.join(", "), f, last.cloned().unwrap_or_default())
    };
    let cursor_cols = if table.whole_row {
        "zz_row.ctid::text".to_string()
    } else {
        table
            .key
            .iter()
            .map(|&i| format!("{}::text", cols[i]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let sql = format!(
        "SELECT {key_expr}, ROW({})::text, {cursor_cols} FROM {name} zz_row {filter} ORDER BY {order} LIMIT {limit}",
        cols.join(", ")
    );
    let refs = sql_params(&params);
    let rows = c
        .query(sql.as_str(), &refs)
        .await
        .map_err(|e| pg_error(ep, &format!("reading {} for verify", table.target_name), e))?;
    let mut page = Page {
        records: Vec::with_capacity(rows.len()),
        stored: rows.len(),
        next: None,
    };
    for r in &rows {
        page.records.push((r.get(0), r.get(1)));
    }
    if let Some(r) = rows.last() {
        let n = if table.whole_row { 1 } else { table.key.len() };
        let cursor: Vec<Option<String>> =
            (0..n).map(|i| r.get::<_, Option<String>>(2 + i)).collect();
        page.next = Some(Cursor(Box::new(cursor)));
    }
    Ok(page)
}
