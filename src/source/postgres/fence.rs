//! What a cutover does in a PostgreSQL source: markers in the WAL, the
//! fence that stops the application's writes (and its exact undo), the
//! sequences read after it, exact counts, and the end of forward
//! replication (the slot).
//!
//! ```text
//!  read-only  ALTER ROLE r IN DATABASE d SET default_transaction_read_only = on   (each role)
//!             ALTER DATABASE d SET default_transaction_read_only = on
//!             their sessions ended (pools reconnect read-only)
//!  revoke     REVOKE INSERT, UPDATE, DELETE, TRUNCATE on the replicated tables
//!             (each grant recorded, the owner's implicit ones included), sessions ended
//!  lifted     the settings as they were (RESET where there was none), the grants
//!             given back, sessions ended again (so none keeps a read-only default)
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::catalog::{display_name, PgTable};
use crate::error::{Error, Result};
use crate::model::{Marker, SequenceValue};
use crate::pg::conn::{pg_err, PgEndpoint};
use crate::pg::{quote_ident, quote_literal};
use crate::source::{Fence, FenceMode};

/// A read-only fence: the settings before it, to put back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadOnlyPlan {
    pub database: String,
    /// `default_transaction_read_only` set for the database before (none: unset).
    pub database_before: Option<String>,
    /// The same per role in this database.
    pub roles_before: BTreeMap<String, Option<String>>,
}

/// One privilege a revoke fence takes away and gives back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The qualified table.
    pub table: String,
    /// A role name, or `PUBLIC`.
    pub grantee: String,
    pub privilege: String,
    pub grantable: bool,
}

/// The marker, in the WAL after everything committed so far.
pub async fn mark(c: &Client, ep: &PgEndpoint, marker: &Marker) -> Result<()> {
    let json = serde_json::to_string(marker)
        .map_err(|e| Error::definite("cannot encode a marker").with_source(e))?;
    c.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&super::stream::MARKER_PREFIX, &json],
    )
    .await
    .map_err(pg_err(ep, "writing a cutover marker into the WAL"))?;
    Ok(())
}

/// Whether a process reads the slot now.
pub async fn slot_active(c: &Client, ep: &PgEndpoint, slot: &str) -> Result<bool> {
    let row = c
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(pg_err(ep, "reading the replication slot"))?;
    Ok(row.is_some_and(|r| r.get(0)))
}

/// The roles a fence applies to: those named (each must exist), else every
/// login role but switchyard's own and superusers.
pub async fn roles(c: &Client, ep: &PgEndpoint, named: Option<&[String]>) -> Result<Vec<String>> {
    match named {
        Some(list) => {
            let found: Vec<String> = c
                .query(
                    "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) ORDER BY 1",
                    &[&list],
                )
                .await
                .map_err(pg_err(ep, "reading roles"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let missing: Vec<&String> = list.iter().filter(|r| !found.contains(r)).collect();
            if !missing.is_empty() {
                return Err(Error::config(format!(
                    "--roles: no role {missing:?} in the source; name the application's roles (see pg_roles)"
                )));
            }
            Ok(found)
        }
        None => Ok(c
            .query(
                "SELECT rolname::text FROM pg_roles
                  WHERE rolcanlogin AND NOT rolsuper AND rolname <> current_user AND rolname NOT LIKE 'pg\\_%'
                  ORDER BY 1",
                &[],
            )
            .await
            .map_err(pg_err(ep, "reading roles"))?
            .iter()
            .map(|r| r.get(0))
            .collect()),
    }
}

/// What keeps switchyard's role from fencing `roles` with `mode`.
pub async fn problems(
    c: &Client,
    ep: &PgEndpoint,
    mode: FenceMode,
    roles: &[String],
    tables: &[PgTable],
    reverse: bool,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let me = c
        .query_one(
            "SELECT current_user::text, rolsuper, rolcreaterole,
                    pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'),
                    pg_has_role(current_user, (SELECT datdba FROM pg_database WHERE datname = current_database()), 'MEMBER')
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading switchyard's role"))?;
    let (user, sup, createrole, signal, db_owner): (String, bool, bool, bool, bool) =
        (me.get(0), me.get(1), me.get(2), me.get(3), me.get(4));
    let q = quote_ident(&user);
    if mode != FenceMode::None && !sup && !signal {
        out.push(format!(
            "the fence ends the application's sessions, which {q} may not: GRANT pg_signal_backend TO {q}"
        ));
    }
    if mode == FenceMode::ReadOnly {
        if !sup && !createrole {
            out.push(format!(
                "a read-only fence sets default_transaction_read_only for each role, which needs CREATEROLE: ALTER ROLE {q} CREATEROLE"
            ));
        }
        if !sup && !db_owner {
            out.push(
                "a read-only fence sets default_transaction_read_only for the database, which only its owner may: \
                 run cutover as the database owner, or use --fence revoke"
                    .into(),
            );
        }
    }
    if mode == FenceMode::Revoke && !sup {
        for t in tables {
            let owner: bool = c
                .query_one(
                    "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class WHERE oid = $1",
                    &[&t.oid],
                )
                .await
                .map_err(pg_err(ep, "reading table owners"))?
                .get(0);
            if !owner {
                out.push(format!(
                    "a revoke fence takes privileges on {} away, which only its owner may: run cutover as the owner, or use --fence read-only",
                    t.qualified()
                ));
            }
        }
    }
    if mode != FenceMode::None && roles.is_empty() {
        out.push(
            "no application role to fence: name them with --roles, or use --fence none".into(),
        );
    }
    if reverse {
        // The reverse replica applies into these tables as switchyard's role.
        for t in tables {
            let ok: bool = c
                .query_one(
                    "SELECT has_table_privilege($1::oid, 'INSERT') AND has_table_privilege($1::oid, 'UPDATE')
                        AND has_table_privilege($1::oid, 'DELETE') AND has_table_privilege($1::oid, 'TRUNCATE')",
                    &[&t.oid],
                )
                .await
                .map_err(pg_err(ep, "reading table privileges"))?
                .get(0);
            if !ok {
                out.push(format!(
                    "the reverse replica writes into {} as {q}, which lacks privileges there: GRANT INSERT, UPDATE, DELETE, TRUNCATE ON {} TO {q}",
                    t.qualified(),
                    t.qualified()
                ));
            }
        }
    }
    Ok(out)
}

/// The setting of `default_transaction_read_only` for (role, this database);
/// role 0: the database's own.
async fn setting(c: &Client, ep: &PgEndpoint, role: Option<&str>) -> Result<Option<String>> {
    let row = c
        .query_opt(
            "SELECT split_part(cfg, '=', 2) FROM pg_db_role_setting s, unnest(s.setconfig) cfg
              WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND s.setrole = coalesce((SELECT oid FROM pg_roles WHERE rolname = $1), 0)
                AND cfg LIKE 'default\\_transaction\\_read\\_only=%'",
            &[&role],
        )
        .await
        .map_err(pg_err(ep, "reading role settings"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Plans a fence: reads what it will change.
pub async fn plan(
    c: &Client,
    ep: &PgEndpoint,
    mode: FenceMode,
    roles: Vec<String>,
    tables: &[PgTable],
) -> Result<Fence> {
    let mut summary = Vec::new();
    let plan = match mode {
        FenceMode::None => {
            summary.push("no fence: the operator has stopped the application's writers; cutover checks that nothing is written".into());
            serde_json::Value::Null
        }
        FenceMode::ReadOnly => {
            let database: String = c
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(pg_err(ep, "reading the database name"))?
                .get(0);
            let mut p = ReadOnlyPlan {
                database_before: setting(c, ep, None).await?,
                database: database.clone(),
                roles_before: BTreeMap::new(),
            };
            for r in &roles {
                p.roles_before
                    .insert(r.clone(), setting(c, ep, Some(r)).await?);
                summary.push(format!(
                    "ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on",
                    quote_ident(r),
                    quote_ident(&database)
                ));
            }
            summary.push(format!(
                "ALTER DATABASE {} SET default_transaction_read_only = on",
                quote_ident(&database)
            ));
            serde_json::to_value(p)
                .map_err(|e| Error::definite("cannot encode a fence").with_source(e))?
        }
        FenceMode::Revoke => {
            let mut grants = Vec::new();
            for t in tables {
                for r in c
                    .query(
                        "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END,
                                a.privilege_type, a.is_grantable
                           FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                          WHERE c.oid = $1 AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
                            AND (a.grantee = 0 OR EXISTS (
                                  SELECT 1 FROM pg_roles m WHERE m.rolname = ANY($2) AND pg_has_role(m.oid, a.grantee, 'USAGE')))
                          ORDER BY 1, 2",
                        &[&t.oid, &roles],
                    )
                    .await
                    .map_err(pg_err(ep, "reading table privileges"))?
                {
                    let g = Grant {
                        table: t.qualified(),
                        grantee: r.get(0),
                        privilege: r.get(1),
                        grantable: r.get(2),
                    };
                    summary.push(format!(
                        "REVOKE {} ON {} FROM {}",
                        g.privilege,
                        g.table,
                        grantee_sql(&g.grantee)
                    ));
                    grants.push(g);
                }
            }
            serde_json::to_value(grants)
                .map_err(|e| Error::definite("cannot encode a fence").with_source(e))?
        }
    };
    if mode != FenceMode::None {
        summary.push(format!(
            "the sessions of {} in this database are ended",
            roles.join(", ")
        ));
    }
    Ok(Fence {
        mode,
        roles,
        plan,
        summary,
    })
}

fn grantee_sql(g: &str) -> String {
    if g == "PUBLIC" {
        g.to_string()
    } else {
        quote_ident(g)
    }
}

/// Ends the fenced roles' sessions in this database; how many.
async fn end_sessions(c: &Client, ep: &PgEndpoint, roles: &[String]) -> Result<i64> {
    let n: i64 = c
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND usename = ANY($1) AND pid <> pg_backend_pid()",
            &[&roles],
        )
        .await
        .map_err(pg_err(ep, "ending the application's sessions"))?
        .get(0);
    Ok(n)
}

/// Applies a planned fence.
pub async fn apply(c: &Client, ep: &PgEndpoint, fence: &Fence) -> Result<Vec<String>> {
    let mut done = Vec::new();
    match fence.mode {
        FenceMode::None => return Ok(done),
        FenceMode::ReadOnly => {
            let p: ReadOnlyPlan = plan_of(fence)?;
            let mut sql = String::new();
            for r in p.roles_before.keys() {
                sql.push_str(&format!(
                    "ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on;\n",
                    quote_ident(r),
                    quote_ident(&p.database)
                ));
            }
            sql.push_str(&format!(
                "ALTER DATABASE {} SET default_transaction_read_only = on;",
                quote_ident(&p.database)
            ));
            c.batch_execute(&sql)
                .await
                .map_err(pg_err(ep, "setting the read-only fence"))?;
        }
        FenceMode::Revoke => {
            let grants: Vec<Grant> = plan_of(fence)?;
            let sql: String = grants
                .iter()
                .map(|g| {
                    format!(
                        "REVOKE {} ON {} FROM {};\n",
                        g.privilege,
                        g.table,
                        grantee_sql(&g.grantee)
                    )
                })
                .collect();
            c.batch_execute(&sql)
                .await
                .map_err(pg_err(ep, "revoking the application's write privileges"))?;
        }
    }
    let n = end_sessions(c, ep, &fence.roles).await?;
    done.push(format!("{n} session(s) of the fenced roles ended"));
    Ok(done)
}

/// A fence's recorded plan, as its mode wrote it.
fn plan_of<T: serde::de::DeserializeOwned>(fence: &Fence) -> Result<T> {
    serde_json::from_value(fence.plan.clone())
        .map_err(|e| Error::definite("unreadable fence plan").with_source(e))
}

/// Undoes a fence.
pub async fn lift(c: &Client, ep: &PgEndpoint, fence: &Fence) -> Result<()> {
    let set = |what: String, before: &Option<String>| match before {
        Some(v) => format!(
            "{what} SET default_transaction_read_only = {};\n",
            quote_literal(v)
        ),
        None => format!("{what} RESET default_transaction_read_only;\n"),
    };
    match fence.mode {
        FenceMode::None => return Ok(()),
        FenceMode::ReadOnly => {
            let p: ReadOnlyPlan = plan_of(fence)?;
            let mut sql = set(
                format!("ALTER DATABASE {}", quote_ident(&p.database)),
                &p.database_before,
            );
            for (r, before) in &p.roles_before {
                sql.push_str(&set(
                    format!(
                        "ALTER ROLE {} IN DATABASE {}",
                        quote_ident(r),
                        quote_ident(&p.database)
                    ),
                    before,
                ));
            }
            c.batch_execute(&sql)
                .await
                .map_err(pg_err(ep, "lifting the read-only fence"))?;
        }
        FenceMode::Revoke => {
            let grants: Vec<Grant> = plan_of(fence)?;
            let sql: String = grants
                .iter()
                .map(|g| {
                    format!(
                        "GRANT {} ON {} TO {}{};\n",
                        g.privilege,
                        g.table,
                        grantee_sql(&g.grantee),
                        if g.grantable {
                            " WITH GRANT OPTION"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            c.batch_execute(&sql)
                .await
                .map_err(pg_err(ep, "giving the application's privileges back"))?;
        }
    }
    // Sessions opened during the fence keep its read-only default.
    end_sessions(c, ep, &fence.roles).await?;
    Ok(())
}

/// The sequences of the replicated tables (owned by their columns, or
/// used by their defaults) and those `matches` selects by name.
pub async fn sequences(
    c: &Client,
    ep: &PgEndpoint,
    tables: &BTreeMap<u32, String>,
    matches: impl Fn(&str) -> bool,
) -> Result<Vec<SequenceValue>> {
    let rows = c
        .query(
            "SELECT s.schemaname::text, s.sequencename::text, s.last_value, s.data_type::text, s.start_value,
                    s.increment_by, s.min_value, s.max_value, s.cycle,
                    has_sequence_privilege(c.oid, 'SELECT'),
                    (SELECT d.refobjid::oid FROM pg_depend d
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1),
                    (SELECT a.attname::text FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                        AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') LIMIT 1),
                    ARRAY(SELECT ad.adrelid::oid FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
                           WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid
                           ORDER BY ad.oid),
                    ARRAY(SELECT a.attname::text FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
                           JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
                           WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = c.oid
                           ORDER BY ad.oid)
               FROM pg_sequences s
               JOIN pg_namespace n ON n.nspname = s.schemaname
               JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.sequencename
              WHERE s.schemaname NOT IN ('pg_catalog', 'information_schema', '_switchyard')
              ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(pg_err(ep, "reading the source's sequences"))?;
    let mut out = Vec::new();
    for r in rows {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        let owner: Option<u32> = r.get(10);
        let used_by: Vec<(String, String)> = r
            .get::<_, Vec<u32>>(12)
            .into_iter()
            .zip(r.get::<_, Vec<String>>(13))
            .filter_map(|(oid, col)| tables.get(&oid).map(|t| (t.clone(), col)))
            .collect();
        let owned_by = match (owner, r.get::<_, Option<String>>(11)) {
            (Some(oid), Some(col)) => match tables.get(&oid) {
                Some(t) => Some((t.clone(), col)),
                None => continue, // a column of a table that is not replicated
            },
            _ => None,
        };
        if owned_by.is_none() && used_by.is_empty() && !matches(&display_name(&schema, &name)) {
            continue;
        }
        if !r.get::<_, bool>(9) {
            return Err(Error::config(format!(
                "switchyard's role may not read sequence {}.{}: GRANT SELECT ON SEQUENCE {}.{} to it",
                schema,
                name,
                quote_ident(&schema),
                quote_ident(&name)
            )));
        }
        out.push(SequenceValue {
            owned_by,
            used_by,
            last_value: r.get(2),
            data_type: r.get(3),
            start: r.get(4),
            increment: r.get(5),
            min: r.get(6),
            max: r.get(7),
            cycle: r.get(8),
            schema,
            name,
        });
    }
    Ok(out)
}

/// The exact rows of a table (with its partitions).
pub async fn count(c: &Client, ep: &PgEndpoint, t: &PgTable) -> Result<u64> {
    let n: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM {}{}",
                if t.only { "ONLY " } else { "" },
                t.qualified()
            ),
            &[],
        )
        .await
        .map_err(pg_err(
            ep,
            &format!("counting the rows of {}", t.qualified()),
        ))?
        .get(0);
    Ok(n as u64)
}

/// Drops the slot once its reader has gone (ending it after a while).
pub async fn drop_slot(c: &Client, ep: &PgEndpoint, slot: &str) -> Result<Vec<String>> {
    let mut done = Vec::new();
    for i in 0..100 {
        let row = c
            .query_opt(
                "SELECT active, active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(pg_err(ep, "reading the replication slot"))?;
        let Some(row) = row else {
            return Ok(done);
        };
        let (active, pid): (bool, Option<i32>) = (row.get(0), row.get(1));
        if !active {
            break;
        }
        if i == 50 {
            // Still read after five seconds: a daemon that did not stop.
            c.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(pg_err(ep, "ending the slot's reader"))?;
            done.push(format!(
                "the slot's reader (process {}) ended",
                pid.unwrap_or(0)
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(pg_err(ep, "dropping the forward replication slot"))?;
    done.push(format!(
        "replication slot {slot:?} dropped: the old primary keeps no WAL for switchyard"
    ));
    Ok(done)
}
