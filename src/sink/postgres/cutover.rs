//! What a cutover needs of a PostgreSQL target: the markers the stream
//! meets, the cutover records (what a fence changed, each step), row
//! counts, the sequences set to the source's values, whether keys and
//! indexes are built, and the state of a reverse replica whose tables are
//! already identical.

use std::sync::Arc;

use tokio_postgres::GenericClient;

use crate::error::{Error, Result};
use crate::model::{Marker, SequenceValue, TableSchema};
use crate::pg::conn::{pg_err, relation_exists, PgEndpoint};
use crate::pg::{quote_ident, quote_table};
use crate::position::Position;
use crate::sink::MarkerState;

/// Records `marker` with the checkpoint it reached.
pub async fn mark(
    c: &impl GenericClient,
    ep: &PgEndpoint,
    marker: &Marker,
    at: Position,
    applied: u64,
) -> Result<()> {
    let state = MarkerState {
        id: marker.id.clone(),
        applied,
        position: at,
    };
    let json = serde_json::to_string(&state)
        .map_err(|e| Error::definite("cannot encode a marker").with_source(e))?;
    c.execute(
        "UPDATE switchyard.checkpoint SET marker = $1::text::jsonb WHERE id = 1",
        &[&json],
    )
    .await
    .map_err(pg_err(ep, "recording a cutover marker"))?;
    Ok(())
}

/// The newest cutover record, if the state schema has any.
pub async fn record(c: &impl GenericClient, ep: &PgEndpoint) -> Result<Option<serde_json::Value>> {
    if !relation_exists(
        c,
        ep,
        "switchyard.cutover",
        "reading the target's state schema",
    )
    .await?
    {
        return Ok(None);
    }
    let row = c
        .query_opt(
            "SELECT record::text FROM switchyard.cutover ORDER BY updated_at DESC, id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading the cutover record"))?;
    row.map(|r| {
        serde_json::from_str(r.get::<_, &str>(0)).map_err(|e| {
            Error::definite("switchyard.cutover holds a record that is not JSON").with_source(e)
        })
    })
    .transpose()
}

/// Stores a cutover record (the migration that creates its table ran in
/// `prepare`).
pub async fn save_record(
    c: &impl GenericClient,
    ep: &PgEndpoint,
    id: &str,
    record: &serde_json::Value,
) -> Result<()> {
    c.execute(
        "INSERT INTO switchyard.cutover (id, record) VALUES ($1, $2::text::jsonb)
         ON CONFLICT (id) DO UPDATE SET record = excluded.record, updated_at = now()",
        &[&id, &record.to_string()],
    )
    .await
    .map_err(pg_err(ep, "recording the cutover"))?;
    Ok(())
}

/// The rows of a target table.
pub async fn count(c: &impl GenericClient, ep: &PgEndpoint, table: &TableSchema) -> Result<u64> {
    let n: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {}", quote_table(&table.target_name)),
            &[],
        )
        .await
        .map_err(pg_err(
            ep,
            &format!("counting the rows of {}", table.target_name),
        ))?
        .get(0);
    Ok(n as u64)
}

/// The sequence that fills `column` of a target table, if one does: the
/// one it owns (serial, identity), else the one its default draws from.
async fn column_sequence(
    c: &impl GenericClient,
    ep: &PgEndpoint,
    table: &str,
    column: &str,
) -> Result<Option<String>> {
    let row = c
        .query_one(
            "SELECT coalesce(pg_get_serial_sequence($1, $2),
                    (SELECT d.refobjid::regclass::text
                       FROM pg_attrdef ad
                       JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
                       JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                                       AND d.refclassid = 'pg_class'::regclass
                       JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
                      WHERE ad.adrelid = to_regclass($1) AND a.attname = $2
                      LIMIT 1))",
            &[&quote_table(table), &column],
        )
        .await
        .map_err(pg_err(
            ep,
            &format!("finding the sequence of {table}.{column}"),
        ))?;
    Ok(row.get(0))
}

/// Sets the target's sequences as the cutover needs them: each source
/// sequence's value on its counterpart (the sequence of the same column,
/// or of the same name, created where missing); with no source sequences
/// (a SQLite source), every sequence-filled column past its largest value.
pub async fn set_sequences(
    c: &impl GenericClient,
    ep: &PgEndpoint,
    tables: &[Arc<TableSchema>],
    sequences: &[SequenceValue],
) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if sequences.is_empty() {
        for t in tables {
            for col in &t.columns {
                let Some(seq) = column_sequence(c, ep, &t.target_name, &col.name).await? else {
                    continue;
                };
                let row = c
                    .query_one(
                        &format!(
                            "SELECT max({col})::bigint, setval($1::text::regclass, GREATEST(max({col})::bigint, 1), max({col}) IS NOT NULL) FROM {t}",
                            col = quote_ident(&col.name),
                            t = quote_table(&t.target_name)
                        ),
                        &[&seq],
                    )
                    .await
                    .map_err(pg_err(ep, &format!("moving {seq}")))?;
                let max: Option<i64> = row.get(0);
                done.push(match max {
                    Some(m) => format!(
                        "{seq} ({}.{}) continues after {m}, the largest key",
                        t.target_name, col.name
                    ),
                    None => format!(
                        "{seq} ({}.{}) starts at 1: the table is empty",
                        t.target_name, col.name
                    ),
                });
            }
        }
        return Ok(done);
    }
    for s in sequences {
        let target = match &s.owned_by {
            Some((table, column)) => {
                let Some(t) = tables.iter().find(|t| &t.name == table) else {
                    continue; // owned by a table that is not replicated
                };
                match column_sequence(c, ep, &t.target_name, column).await? {
                    Some(seq) => seq,
                    None => {
                        done.push(format!(
                            "{}.{} fills {table}.{column} in the source, but {}.{column} has no sequence in the target: not set",
                            s.schema, s.name, t.target_name
                        ));
                        continue;
                    }
                }
            }
            None => {
                let name = format!("{}.{}", quote_ident(&s.schema), quote_ident(&s.name));
                if !relation_exists(c, ep, &name, "reading the target's sequences").await? {
                    c.batch_execute(&format!(
                        "CREATE SCHEMA IF NOT EXISTS {}; CREATE SEQUENCE IF NOT EXISTS {name} AS {} INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} {}",
                        quote_ident(&s.schema),
                        match s.data_type.as_str() {
                            t @ ("smallint" | "integer" | "bigint") => t,
                            _ => "bigint",
                        },
                        s.increment,
                        s.min,
                        s.max,
                        s.start,
                        if s.cycle { "CYCLE" } else { "NO CYCLE" }
                    ))
                    .await
                    .map_err(pg_err(ep, &format!("creating sequence {name}")))?;
                    done.push(format!("{name} created (it was missing in the target)"));
                }
                name
            }
        };
        let (value, called) = match s.last_value {
            Some(v) => (v, true),
            None => (s.start, false),
        };
        // The sequence itself, and the one of a target column that draws
        // from it in the source but has a sequence of its own here (an
        // identity made for a default the target could not keep).
        let mut targets = vec![target];
        for (table, column) in &s.used_by {
            let Some(t) = tables.iter().find(|t| &t.name == table) else {
                continue;
            };
            if let Some(own) = column_sequence(c, ep, &t.target_name, column).await? {
                if !targets.contains(&own) {
                    targets.push(own);
                }
            }
        }
        for target in targets {
            c.execute(
                "SELECT setval($1::text::regclass, $2, $3)",
                &[&target, &value, &called],
            )
            .await
            .map_err(pg_err(ep, &format!("setting {target}")))?;
            done.push(if called {
                format!(
                    "{target} = {value}, as {}.{} in the source",
                    s.schema, s.name
                )
            } else {
                format!(
                    "{target} starts at {value}: {}.{} was never used",
                    s.schema, s.name
                )
            });
        }
    }
    Ok(done)
}

/// What keeps the target tables from taking traffic: missing tables,
/// primary keys not built yet, indexes left invalid by a failed build.
pub async fn problems(
    c: &impl GenericClient,
    ep: &PgEndpoint,
    tables: &[Arc<TableSchema>],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in tables {
        let name = quote_table(&t.target_name);
        let row = c
            .query_one(
                "SELECT to_regclass($1)::oid,
                        EXISTS (SELECT 1 FROM pg_index WHERE indrelid = to_regclass($1) AND indisprimary),
                        ARRAY(SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = to_regclass($1) AND NOT indisvalid)",
                &[&name],
            )
            .await
            .map_err(pg_err(ep, "reading the target's indexes"))?;
        let oid: Option<u32> = row.get(0);
        if oid.is_none() {
            out.push(format!("target table {} does not exist", t.target_name));
            continue;
        }
        if !t.whole_row && !row.get::<_, bool>(1) {
            out.push(format!(
                "target table {} has no primary key yet (it is built when the table's copy is done)",
                t.target_name
            ));
        }
        for index in row.get::<_, Vec<String>>(2) {
            out.push(format!(
                "index {index} of {} is invalid (a build failed): drop and create it again",
                t.target_name
            ));
        }
    }
    Ok(out)
}

/// Marks `tables` as copied at `at` and the checkpoint there, with capture
/// `origin` (a reverse replica, whose tables are identical at the cutover).
pub async fn adopt(
    c: &mut tokio_postgres::Client,
    ep: &PgEndpoint,
    tables: &[Arc<TableSchema>],
    at: Position,
    origin: &str,
) -> Result<()> {
    let tx = c.transaction().await.map_err(pg_err(ep, "beginning"))?;
    for t in tables {
        let shape = serde_json::to_string(&**t)
            .map_err(|e| Error::definite("cannot encode a table's shape").with_source(e))?;
        tx.execute(
            "INSERT INTO switchyard.table_state (name, status, commit, ordinal, rows, source_id, shape)
             VALUES ($1, 'done', $2, $3, 0, $4, $5)
             ON CONFLICT (name) DO UPDATE SET status = 'done', commit = $2, ordinal = $3, source_id = $4, shape = $5, updated_at = now()",
            &[&t.name, &(at.commit as i64), &(at.ordinal as i64), &t.source_id, &shape],
        )
        .await
        .map_err(pg_err(ep, "marking a table as copied"))?;
    }
    tx.execute(
        "INSERT INTO switchyard.checkpoint (id, commit, ordinal, origin) VALUES (1, $1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET commit = $1, ordinal = $2, origin = $3, marker = NULL, updated_at = now()",
        &[&(at.commit as i64), &(at.ordinal as i64), &origin],
    )
    .await
    .map_err(pg_err(ep, "recording the reverse replica's start"))?;
    tx.commit().await.map_err(pg_err(ep, "committing"))?;
    Ok(())
}
