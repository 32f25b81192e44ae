//! What a batch of changes becomes in PostgreSQL: statements with text
//! parameters, planned before the transaction that runs them. Pure: the
//! planner knows each table's target column types and nothing else.
//!
//! - A run of plain upserts (inserts, and updates that keep the key and carry
//!   every column) becomes one `INSERT … SELECT FROM unnest(…) ON CONFLICT`
//!   per table; of several changes to one key the last wins. With the
//!   replica role no trigger or foreign key fires on the apply session, so
//!   upserts of different tables commute and a run spans tables (each
//!   table's changes keep their order).
//! - The tables of one source `TRUNCATE` are truncated together.
//! - Anything else is one change's own statements, in source order.

use std::collections::HashMap;

use crate::model::{Change, Op, Row, TableSchema, Value};
use crate::pg::{quote_ident, quote_table};
use crate::schema::postgres::{cast_type, to_text};

/// `COPY t (c1, …) FROM STDIN`: a table's rows as COPY text, every column.
pub fn copy_sql(table: &TableSchema) -> String {
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    format!(
        "COPY {} ({}) FROM STDIN",
        quote_table(&table.target_name),
        cols.join(", ")
    )
}

/// `ON CONFLICT (key) DO UPDATE SET` every other column to the new row's
/// value, or `DO NOTHING` for a table of key columns only; `cols` are the
/// table's quoted column names.
fn on_conflict(table: &TableSchema, cols: &[String]) -> String {
    let keys: Vec<&str> = table.key.iter().map(|&i| cols[i].as_str()).collect();
    let rest: Vec<String> = (0..cols.len())
        .filter(|i| !table.key.contains(i))
        .map(|i| format!("{0} = EXCLUDED.{0}", cols[i]))
        .collect();
    if rest.is_empty() {
        format!("ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        format!(
            "ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            rest.join(", ")
        )
    }
}

/// `"a" = $1::text::integer AND …` over `cols`, parameters from `first`.
fn matches(
    table: &TableSchema,
    cols: &[usize],
    types: &[String],
    first: usize,
    whole: bool,
) -> String {
    cols.iter()
        .enumerate()
        .map(|(n, &i)| {
            let c = quote_ident(&table.columns[i].name);
            let t = cast_type(&types[i]);
            if whole {
                format!(
                    "{c}::text IS NOT DISTINCT FROM (${}::text::{t})::text",
                    first + n
                )
            } else {
                format!("{c} = ${}::text::{t}", first + n)
            }
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The full new row of a change that is a plain upsert (an insert, or an
/// update that keeps the key and carries every column) of a keyed table.
pub fn upsert_row(ch: &Change) -> Option<&Row> {
    if ch.table.whole_row {
        return None;
    }
    match &ch.op {
        Op::Insert { row } | Op::Update { old_key: None, row }
            if !row.iter().any(Value::is_unchanged) =>
        {
            Some(row)
        }
        _ => None,
    }
}

/// Query parameters as tokio-postgres takes them.
pub fn sql_params<T: tokio_postgres::types::ToSql + Sync>(
    values: &[T],
) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

/// `unnest($1::text[], …, $n::text[]) AS u(c0, …)`: rows given as one text
/// array per column, read back as `u.c0` … `u.c{n-1}`.
pub fn unnest_columns(n: usize) -> String {
    format!(
        "unnest({}) AS u({})",
        (1..=n)
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", "),
        (0..n)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// One `INSERT … SELECT FROM unnest(…) ON CONFLICT DO UPDATE` for a run of
/// upserts of one table; of several changes to one key, the last wins (as
/// applying them in order would leave it).
fn grouped_upsert(
    table: &TableSchema,
    types: &[String],
    run: &[&Change],
) -> (String, Vec<Vec<Option<String>>>) {
    let n = table.columns.len();
    let mut last: std::collections::HashMap<Vec<Option<String>>, usize> =
        std::collections::HashMap::new();
    let rows: Vec<Vec<Option<String>>> = run
        .iter()
        .filter_map(|c| upsert_row(c))
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(i, v)| to_text(v, &types[i]))
                .collect()
        })
        .collect();
    for (at, r) in rows.iter().enumerate() {
        let key: Vec<Option<String>> = table.key.iter().map(|&k| r[k].clone()).collect();
        last.insert(key, at);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(keep.len()); n];
    for at in keep {
        for (i, v) in rows[at].iter().enumerate() {
            columns[i].push(v.clone());
        }
    }
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let sql = format!(
        "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {} {}",
        quote_table(&table.target_name),
        cols.join(", "),
        (0..n)
            .map(|i| format!("u.c{i}::{}", cast_type(&types[i])))
            .collect::<Vec<_>>()
            .join(", "),
        unnest_columns(n),
        on_conflict(table, &cols)
    );
    (sql, columns)
}

/// A statement of a change: SQL, text parameters, and whether it must touch
/// a row (else the target is out of step with the source).
pub struct Statement {
    pub sql: String,
    pub params: Vec<Option<String>>,
    pub must_touch: bool,
}

/// One change as statements with text parameters.
pub fn statements(table: &TableSchema, types: &[String], op: &Op) -> Vec<Statement> {
    let name = quote_table(&table.target_name);
    let cols: Vec<String> = table.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let text = |row: &[Value], idx: &[usize]| -> Vec<Option<String>> {
        idx.iter().map(|&i| to_text(&row[i], &types[i])).collect()
    };
    let all: Vec<usize> = (0..table.columns.len()).collect();
    let value = |n: usize, i: usize| format!("${n}::text::{}", cast_type(&types[i]));
    let insert = |row: &Row| -> Statement {
        let values: Vec<String> = all.iter().map(|&i| value(i + 1, i)).collect();
        let mut sql = format!(
            "INSERT INTO {name} ({}) OVERRIDING SYSTEM VALUE VALUES ({})",
            cols.join(", "),
            values.join(", ")
        );
        if !table.whole_row {
            sql.push(' ');
            sql.push_str(&on_conflict(table, &cols));
        }
        Statement {
            sql,
            params: text(row, &all),
            must_touch: false,
        }
    };
    let delete = |key: &[Value]| -> Statement {
        let params: Vec<Option<String>> = table
            .key
            .iter()
            .zip(key)
            .map(|(&i, v)| to_text(v, &types[i]))
            .collect();
        if table.whole_row {
            Statement {
                sql: format!(
                    "DELETE FROM {name} WHERE ctid = (SELECT ctid FROM {name} WHERE {} LIMIT 1)",
                    matches(table, &table.key, types, 1, true)
                ),
                params,
                must_touch: true,
            }
        } else {
            Statement {
                sql: format!(
                    "DELETE FROM {name} WHERE {}",
                    matches(table, &table.key, types, 1, false)
                ),
                params,
                must_touch: false,
            }
        }
    };
    match op {
        Op::Insert { row } => vec![insert(row)],
        Op::Update { old_key, row } if row.iter().any(Value::is_unchanged) && !table.whole_row => {
            // Unchanged (TOAST) columns keep their value: UPDATE the others
            // (the key columns only when the key changed).
            let changed: Vec<usize> = all
                .iter()
                .copied()
                .filter(|&i| {
                    !row[i].is_unchanged() && (old_key.is_some() || !table.key.contains(&i))
                })
                .collect();
            let sets: Vec<String> = changed
                .iter()
                .enumerate()
                .map(|(n, &i)| format!("{} = {}", cols[i], value(n + 1, i)))
                .collect();
            let key_vals = old_key.clone().unwrap_or_else(|| table.key_of(row));
            let mut params = text(row, &changed);
            params.extend(
                table
                    .key
                    .iter()
                    .zip(&key_vals)
                    .map(|(&i, v)| to_text(v, &types[i])),
            );
            if sets.is_empty() {
                return Vec::new();
            }
            vec![Statement {
                sql: format!(
                    "UPDATE {name} SET {} WHERE {}",
                    sets.join(", "),
                    matches(table, &table.key, types, changed.len() + 1, false)
                ),
                params,
                must_touch: true,
            }]
        }
        Op::Update { old_key: None, .. } if table.whole_row => Vec::new(),
        Op::Update { old_key: None, row } => vec![insert(row)],
        Op::Update {
            old_key: Some(old),
            row,
        } if table.whole_row => vec![delete(old), insert(row)],
        Op::Update {
            old_key: Some(old),
            row,
        } => {
            // The key changed: the row is updated in place (its foreign keys
            // and identity stay), or inserted if the target lacks it.
            let n = all.len();
            let sets: Vec<String> = all
                .iter()
                .map(|&i| format!("{} = {}", cols[i], value(i + 1, i)))
                .collect();
            let values: Vec<String> = all.iter().map(|&i| value(i + 1, i)).collect();
            let mut params = text(row, &all);
            params.extend(
                table
                    .key
                    .iter()
                    .zip(old)
                    .map(|(&i, v)| to_text(v, &types[i])),
            );
            vec![Statement {
                sql: format!(
                    "WITH moved AS (UPDATE {name} SET {} WHERE {} RETURNING 1) \
                     INSERT INTO {name} ({}) OVERRIDING SYSTEM VALUE SELECT {} WHERE NOT EXISTS (SELECT 1 FROM moved) {}",
                    sets.join(", "),
                    matches(table, &table.key, types, n + 1, false),
                    cols.join(", "),
                    values.join(", "),
                    on_conflict(table, &cols)
                ),
                params,
                must_touch: false,
            }]
        }
        Op::Delete { key } => vec![delete(key)],
        Op::Truncate => vec![Statement {
            sql: format!("TRUNCATE {name}"),
            params: Vec::new(),
            must_touch: false,
        }],
        // The executor changes the table itself.
        Op::Ddl(_) => Vec::new(),
    }
}

/// One step of a batch's transaction.
pub enum Step<'a> {
    /// A run of upserts of one table as one statement.
    Grouped {
        table: &'a TableSchema,
        sql: String,
        params: Vec<Vec<Option<String>>>,
        /// The run's changes, for messages.
        run: Vec<&'a Change>,
    },
    /// One `TRUNCATE` of a source transaction's tables together.
    Truncate { table: &'a TableSchema, sql: String },
    /// One change, its statements in order.
    Change {
        change: &'a Change,
        statements: Vec<Statement>,
    },
}

/// The target column types of a table's shape: by target name and column
/// count (a batch may hold a table's changes from before and after a
/// column was added).
pub type Types = HashMap<(String, usize), Vec<String>>;

/// The key of a change's table shape in [`Types`].
pub fn shape(t: &TableSchema) -> (String, usize) {
    (t.target_name.clone(), t.columns.len())
}

/// The steps of a batch. `careful`: one change at a time (to name a change
/// the target refuses); `replica_role`: runs of upserts may span tables.
pub fn plan<'a>(
    changes: &'a [Change],
    types: &Types,
    careful: bool,
    replica_role: bool,
) -> Vec<Step<'a>> {
    let types_of = |t: &TableSchema| types.get(&shape(t)).map(Vec::as_slice).unwrap_or(&[]);
    let mut steps = Vec::new();
    let mut i = 0;
    while i < changes.len() {
        let ch = &changes[i];
        let t = &ch.table;
        if !careful && upsert_row(ch).is_some() {
            let mut j = i + 1;
            while j < changes.len()
                && j - i < 5_000
                && (replica_role || changes[j].table.name == t.name)
                && upsert_row(&changes[j]).is_some()
            {
                j += 1;
            }
            if j - i > 1 {
                let mut runs: Vec<Vec<&Change>> = Vec::new();
                for c in &changes[i..j] {
                    match runs.iter_mut().find(|r| {
                        r[0].table.name == c.table.name && r[0].table.same_shape(&c.table)
                    }) {
                        Some(r) => r.push(c),
                        None => runs.push(vec![c]),
                    }
                }
                for run in runs {
                    let rt: &TableSchema = &run[0].table;
                    let (sql, params) = grouped_upsert(rt, types_of(rt), &run);
                    steps.push(Step::Grouped {
                        table: rt,
                        sql,
                        params,
                        run,
                    });
                }
                i = j;
                continue;
            }
        }
        if matches!(ch.op, Op::Truncate) {
            let mut names = vec![quote_table(&t.target_name)];
            while i + 1 < changes.len()
                && matches!(changes[i + 1].op, Op::Truncate)
                && changes[i + 1].position.commit == ch.position.commit
            {
                i += 1;
                names.push(quote_table(&changes[i].table.target_name));
            }
            steps.push(Step::Truncate {
                table: t,
                sql: format!("TRUNCATE {}", names.join(", ")),
            });
            i += 1;
            continue;
        }
        steps.push(Step::Change {
            change: ch,
            statements: statements(t, types_of(t), &ch.op),
        });
        i += 1;
    }
    steps
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Column, LogicalType};
    use crate::position::Position;

    fn table(name: &str) -> Arc<TableSchema> {
        let col = |n: &str| Column {
            name: n.into(),
            source_type: "bigint".into(),
            logical: LogicalType::Int,
            nullable: false,
        };
        Arc::new(TableSchema::keyed(
            name.into(),
            name.into(),
            vec![col("id"), col("v")],
            vec![0],
        ))
    }

    fn change(t: &Arc<TableSchema>, commit: u64, op: Op) -> Change {
        Change {
            table: t.clone(),
            op,
            position: Position::new(commit, 1),
        }
    }

    fn insert(t: &Arc<TableSchema>, commit: u64, id: i64) -> Change {
        change(
            t,
            commit,
            Op::Insert {
                row: vec![Value::Int(id), Value::Int(id * 10)],
            },
        )
    }

    fn kinds(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::Grouped { table, run, .. } => {
                    format!("grouped {} x{}", table.name, run.len())
                }
                Step::Truncate { sql, .. } => sql.clone(),
                Step::Change { change, .. } => format!("{} {}", change.kind(), change.table.name),
            })
            .collect()
    }

    #[test]
    fn upserts_are_grouped_truncates_joined_and_the_rest_kept_in_order() {
        let (a, b) = (table("a"), table("b"));
        let mut types = Types::new();
        for t in [&a, &b] {
            types.insert(shape(t), vec!["bigint".into(), "bigint".into()]);
        }
        let changes = vec![
            insert(&a, 1, 1),
            insert(&b, 1, 2),
            insert(&a, 1, 3),
            change(
                &a,
                2,
                Op::Delete {
                    key: vec![Value::Int(1)],
                },
            ),
            change(&a, 3, Op::Truncate),
            change(&b, 3, Op::Truncate),
            insert(&b, 4, 5),
        ];
        assert_eq!(
            kinds(&plan(&changes, &types, false, true)),
            vec![
                "grouped a x2",
                "grouped b x1",
                "delete a",
                "TRUNCATE \"a\", \"b\"",
                "insert b"
            ]
        );
        // Without the replica role a run stays within one table.
        assert_eq!(
            kinds(&plan(&changes[..3], &types, false, false)),
            vec!["insert a", "insert b", "insert a"]
        );
        // Careful: change by change.
        assert_eq!(plan(&changes, &types, true, true).len(), 6);
        // Of two upserts of one key, the last wins.
        let row = |v: i64| Op::Insert {
            row: vec![Value::Int(7), Value::Int(v)],
        };
        let twice = vec![change(&a, 1, row(1)), change(&a, 2, row(2))];
        let steps = plan(&twice, &types, false, true);
        let Step::Grouped { params, .. } = &steps[0] else {
            panic!("not grouped")
        };
        assert_eq!(params[0], vec![Some("7".to_string())]);
        assert_eq!(params[1], vec![Some("2".to_string())]);
    }
}
