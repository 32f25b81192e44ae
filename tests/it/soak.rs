//! The chaos soak: a writer that keeps a ledger of what it committed, the
//! daemon killed with SIGKILL in the snapshot and while streaming,
//! connections cut, reset and stalled by a TCP fault proxy between the daemon
//! and each database, and the databases themselves stopped with `pg_ctl stop
//! -m immediate` and started again, on a schedule drawn from a seed. Checked
//! throughout (every 100 ms): the source never lets go of a change the target
//! has not durably applied (the slot's `confirmed_flush_lsn`, or the SQLite
//! change log's lowest row, against the target's checkpoint). Checked at the
//! end: `verify` finds source and target identical, and the source and (where
//! it can be read from here) the target hold exactly what the ledger says the
//! committed transactions wrote: nothing missing, nothing doubled.
//!
//! Three pairs: PostgreSQL → PostgreSQL, PostgreSQL → embedded SurrealDB
//! (surrealkv), SQLite → PostgreSQL; every PostgreSQL is a cluster of the
//! soak's own with production durability (fsync, full-page writes,
//! synchronous commit on). The suite runs each for `SWITCHYARD_SOAK_SECONDS`
//! (40) seconds of faults; `scripts/soak [MINUTES]` runs the long form and
//! prints each pair's table. `SWITCHYARD_SOAK_SEED` repeats a schedule.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::pg_surreal::{Cluster, OwnCluster};
use crate::support::*;

// ---------------------------------------------------------------- settings

fn soak_seconds() -> u64 {
    std::env::var("SWITCHYARD_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn soak_seed(pair: u64) -> u64 {
    std::env::var("SWITCHYARD_SOAK_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).ok()
        })
        .unwrap_or(0x5EED_0000_0000_0001)
        .wrapping_add(pair.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        | 1
}

/// Rows in the one large transaction of each run: 200,000; into SurrealDB
/// 20,000 unless `SWITCHYARD_SOAK_BIG_ROWS` says otherwise (a debug build
/// applies a few hundred changes a second there).
fn big_rows(pair: Pair) -> i64 {
    std::env::var("SWITCHYARD_SOAK_BIG_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if pair == Pair::PgSurreal {
            20_000
        } else {
            200_000
        })
}

impl Pair {
    /// The writer's pause between transactions: a rate the target keeps up
    /// with in a debug build (SurrealDB: about 30 transactions a second).
    fn pause(self) -> Duration {
        Duration::from_millis(if self == Pair::PgSurreal { 30 } else { 3 })
    }
}

const ACCOUNTS: i64 = 60_000;
const DOCS: i64 = 200;
const EVENTS: i64 = 6_000;
/// Characters of a document body: TOAST-sized, and not compressible below
/// the TOAST threshold (random hex).
const BODY_CHARS: usize = 12_000;

/// How long recovery after one fault may take before the soak fails.
const RECOVERY_LIMIT: Duration = Duration::from_secs(300);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

// ---------------------------------------------------------------- the proxy

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cut {
    None,
    /// Both connections closed (FIN).
    Close,
    /// Both connections reset (RST: SO_LINGER 0).
    Reset,
}

/// A TCP proxy to one database that can cut, reset or stall every
/// connection through it.
struct Proxy {
    port: u16,
    cut: Arc<watch::Sender<(u64, Cut)>>,
    stall: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(watch::channel((0u64, Cut::None)).0);
        let stall = Arc::new(watch::channel(false).0);
        let (c, s) = (cut.clone(), stall.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(pipe(client, upstream, c.subscribe(), s.subscribe()));
            }
        });
        Proxy {
            port,
            cut,
            stall,
            task,
        }
    }

    fn cut(&self, how: Cut) {
        self.cut.send_modify(|(n, c)| {
            *n += 1;
            *c = how;
        });
    }

    fn stall(&self, on: bool) {
        self.stall.send_replace(on);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut cut: watch::Receiver<(u64, Cut)>,
    stall: watch::Receiver<bool>,
) {
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let how = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        let both = async {
            tokio::join!(
                forward(&mut cr, &mut uw, stall.clone()),
                forward(&mut ur, &mut cw, stall.clone())
            )
        };
        let ordered = async {
            loop {
                if cut.changed().await.is_err() {
                    return Cut::Close;
                }
                let c = cut.borrow_and_update().1;
                if c != Cut::None {
                    return c;
                }
            }
        };
        tokio::select! {
            _ = both => Cut::None,
            c = ordered => c,
        }
    };
    if how == Cut::Reset {
        #[allow(deprecated)] // SO_LINGER 0 is the point: an RST on drop.
        {
            let _ = client.set_linger(Some(Duration::ZERO));
            let _ = up.set_linger(Some(Duration::ZERO));
        }
    }
}

async fn forward<R, W>(r: &mut R, w: &mut W, mut stall: watch::Receiver<bool>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while *stall.borrow_and_update() {
            if stall.changed().await.is_err() {
                return;
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

// ---------------------------------------------------------------- the ledger

/// What the writer's committed transactions left in each table.
#[derive(Default)]
struct Ledger {
    accounts: BTreeMap<i64, (String, i64, i64)>,
    docs: BTreeMap<i64, (i64, String)>,
    /// The table without a key: identical rows counted.
    events: BTreeMap<(String, i64, String), u64>,
    bulk: BTreeMap<i64, (i64, String)>,
    next_id: i64,
}

/// One change a transaction made, applied to the ledger once it committed.
enum Op {
    AccountPut(i64, (String, i64, i64)),
    AccountDel(i64),
    DocPut(i64, (i64, String)),
    DocDel(i64),
    EventAdd((String, i64, String)),
    EventDel((String, i64, String)),
    EventsTruncate,
    BulkRange { from: i64, to: i64, batch: i64 },
}

impl Ledger {
    fn apply(&mut self, op: Op) {
        match op {
            Op::AccountPut(k, v) => {
                self.accounts.insert(k, v);
            }
            Op::AccountDel(k) => {
                self.accounts.remove(&k);
            }
            Op::DocPut(k, v) => {
                self.docs.insert(k, v);
            }
            Op::DocDel(k) => {
                self.docs.remove(&k);
            }
            Op::EventAdd(e) => *self.events.entry(e).or_default() += 1,
            Op::EventDel(e) => {
                let n = self.events.get_mut(&e).expect("ledger: event");
                *n -= 1;
                if *n == 0 {
                    self.events.remove(&e);
                }
            }
            Op::EventsTruncate => self.events.clear(),
            Op::BulkRange { from, to, batch } => {
                for id in from..=to {
                    self.bulk.insert(id, (batch, format!("b{id}")));
                }
            }
        }
    }

    /// Each table's rows as `a|b|c` lines, sorted: what [`READS`] reads.
    fn lines(&self, with_events: bool) -> BTreeMap<&'static str, Vec<String>> {
        let mut out = BTreeMap::new();
        out.insert(
            "accounts",
            self.accounts
                .iter()
                .map(|(k, (o, b, u))| format!("{k}|{o}|{b}|{u}"))
                .collect(),
        );
        out.insert(
            "docs",
            self.docs
                .iter()
                .map(|(k, (r, b))| format!("{k}|{r}|{b}"))
                .collect(),
        );
        out.insert(
            "bulk",
            self.bulk
                .iter()
                .map(|(k, (b, v))| format!("{k}|{b}|{v}"))
                .collect(),
        );
        if with_events {
            let mut ev = Vec::new();
            for ((k, n, note), c) in &self.events {
                for _ in 0..*c {
                    ev.push(format!("{k}|{n}|{note}"));
                }
            }
            out.insert("events", ev);
        }
        for v in out.values_mut() {
            v.sort();
        }
        out
    }

    fn rows(&self) -> usize {
        self.accounts.len()
            + self.docs.len()
            + self.bulk.len()
            + self.events.values().sum::<u64>() as usize
    }

    /// A key present in `map`, near a random point of `0..next_id`.
    fn pick<V>(map: &BTreeMap<i64, V>, rng: &mut Rng, next_id: i64) -> Option<i64> {
        let at = rng.below(next_id as u64) as i64;
        map.range(at..)
            .next()
            .or_else(|| map.iter().next())
            .map(|(k, _)| *k)
    }
}

/// The same SELECT on PostgreSQL and SQLite: each row as one `a|b|c` line.
const READS: &[(&str, &str)] = &[
    (
        "accounts",
        "SELECT id || '|' || owner || '|' || balance || '|' || updated FROM accounts",
    ),
    ("docs", "SELECT id || '|' || rev || '|' || body FROM docs"),
    ("bulk", "SELECT id || '|' || batch || '|' || v FROM bulk"),
    (
        "events",
        "SELECT kind || '|' || n || '|' || note FROM events",
    ),
];

fn body(id: i64, rev: i64) -> String {
    let mut r = Rng((id as u64) << 20 ^ rev as u64 ^ 0xB0D7_0000_0000_0001 | 1);
    let mut s = String::with_capacity(BODY_CHARS);
    while s.len() < BODY_CHARS {
        let _ = write!(s, "{:016x}", r.next());
    }
    s.truncate(BODY_CHARS);
    s
}

/// Compares what a database holds with the ledger; the differences, worded.
fn compare(
    what: &str,
    got: &BTreeMap<&'static str, Vec<String>>,
    want: &BTreeMap<&'static str, Vec<String>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (table, want_rows) in want {
        let got_rows = got.get(table).cloned().unwrap_or_default();
        if &got_rows == want_rows {
            continue;
        }
        let (mut missing, mut extra) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < want_rows.len() || j < got_rows.len() {
            match (want_rows.get(i), got_rows.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    missing.push(a.clone());
                    i += 1;
                }
                (Some(_), Some(b)) | (None, Some(b)) => {
                    extra.push(b.clone());
                    j += 1;
                }
                (Some(a), None) => {
                    missing.push(a.clone());
                    i += 1;
                }
                (None, None) => unreachable!(),
            }
        }
        let short = |v: &[String]| {
            v.iter()
                .take(3)
                .map(|l| l.chars().take(60).collect::<String>())
                .collect::<Vec<_>>()
                .join("; ")
        };
        out.push(format!(
            "{what}, table {table}: {} rows where the ledger has {}; {} missing (e.g. {}), {} not in the ledger or doubled (e.g. {})",
            got_rows.len(),
            want_rows.len(),
            missing.len(),
            short(&missing),
            extra.len(),
            short(&extra)
        ));
    }
    out
}

// ---------------------------------------------------------------- databases

#[derive(Clone)]
struct Pg {
    port: u16,
    password: String,
}

impl Pg {
    fn of(c: &Cluster) -> Pg {
        Pg {
            port: c.port,
            password: c.password.clone(),
        }
    }

    async fn try_connect(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(&self.password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(conn);
        Ok(client)
    }

    /// Connects, waiting out a server that is restarting.
    async fn connect(&self, db: &str) -> tokio_postgres::Client {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            match self.try_connect(db).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot connect to 127.0.0.1:{} for 180 s: {e}", self.port)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn read(&self, db: &str) -> BTreeMap<&'static str, Vec<String>> {
        let c = self.connect(db).await;
        let mut out = BTreeMap::new();
        for (table, sql) in READS {
            if let Ok(rows) = c.query(*sql, &[]).await {
                let mut v: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                v.sort();
                out.insert(*table, v);
            }
        }
        out
    }
}

/// The application's database: where the writer writes.
#[derive(Clone)]
enum Source {
    Pg(Pg),
    Sqlite(sqlx::SqlitePool),
}

enum Outcome {
    Committed,
    NotCommitted,
}

/// One connection of the writer.
enum Conn {
    Pg(tokio_postgres::Client),
    Sqlite(sqlx::SqlitePool),
}

impl Source {
    fn is_pg(&self) -> bool {
        matches!(self, Source::Pg(_))
    }

    async fn conn(&self) -> Conn {
        match self {
            Source::Pg(pg) => Conn::Pg(pg.connect("soak").await),
            Source::Sqlite(pool) => Conn::Sqlite(pool.clone()),
        }
    }

    async fn read(&self) -> BTreeMap<&'static str, Vec<String>> {
        match self {
            Source::Pg(pg) => pg.read("soak").await,
            Source::Sqlite(pool) => {
                let mut out = BTreeMap::new();
                for (table, sql) in READS {
                    if let Ok(mut v) = sqlx::query_scalar::<_, String>(sql).fetch_all(pool).await {
                        v.sort();
                        out.insert(*table, v);
                    }
                }
                out
            }
        }
    }

    /// The source's newest position: a WAL LSN, or the change log's newest row.
    async fn head(&self) -> u64 {
        match self {
            Source::Pg(pg) => {
                let c = pg.connect("soak").await;
                let s: String = c
                    .query_one("SELECT (pg_current_wal_lsn() - '0/0')::text", &[])
                    .await
                    .unwrap()
                    .get(0);
                s.parse().unwrap()
            }
            Source::Sqlite(pool) => source_high_water(pool).await as u64,
        }
    }
}

/// Runs one transaction of SQL texts; an unknown commit outcome is settled
/// with `txid_status` once the server answers again.
async fn transaction(conn: &mut Conn, source: &Source, sql: &[String], stats: &Stats) -> Outcome {
    match conn {
        Conn::Sqlite(pool) => {
            let run = async {
                let mut tx = pool.begin().await?;
                for s in sql {
                    sqlx::query(s).execute(&mut *tx).await?;
                }
                tx.commit().await
            };
            // A failed COMMIT leaves SQLite's transaction open, and dropping
            // it rolls back: an error is never a commit.
            match run.await {
                Ok(()) => Outcome::Committed,
                Err(_) => Outcome::NotCommitted,
            }
        }
        Conn::Pg(client) => {
            let before = async {
                client.batch_execute("BEGIN").await?;
                let xid: i64 = client.query_one("SELECT txid_current()", &[]).await?.get(0);
                for s in sql {
                    client.batch_execute(s).await?;
                }
                Ok::<i64, tokio_postgres::Error>(xid)
            };
            let xid = match before.await {
                Ok(x) => x,
                Err(_) => {
                    *conn = source.conn().await;
                    return Outcome::NotCommitted;
                }
            };
            match client.batch_execute("COMMIT").await {
                Ok(()) => Outcome::Committed,
                Err(_) => {
                    // The COMMIT's fate is unknown: ask the server.
                    stats.ambiguous.fetch_add(1, Ordering::Relaxed);
                    *conn = source.conn().await;
                    let Conn::Pg(c) = conn else { unreachable!() };
                    // A server that crashed before the transaction's WAL
                    // reached disk restarts behind its xid ("transaction ID
                    // … is in the future"): it never committed. The final
                    // check (the source holds exactly the ledger's rows)
                    // still catches a wrong answer.
                    let status: Option<String> =
                        match c.query_one("SELECT txid_status($1)", &[&xid]).await {
                            Ok(row) => row.get(0),
                            Err(e)
                                if e.as_db_error()
                                    .is_some_and(|d| d.message().contains("is in the future")) =>
                            {
                                None
                            }
                            Err(e) => panic!("txid_status({xid}): {e}"),
                        };
                    if status.as_deref() == Some("committed") {
                        stats.ambiguous_committed.fetch_add(1, Ordering::Relaxed);
                        Outcome::Committed
                    } else {
                        Outcome::NotCommitted
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct Stats {
    commits: AtomicU64,
    not_committed: AtomicU64,
    ambiguous: AtomicU64,
    ambiguous_committed: AtomicU64,
    rows_written: AtomicU64,
    big_done: AtomicU64,
    /// Tries of the large transaction, and those a fault undid.
    big_started: AtomicU64,
    big_lost: AtomicU64,
}

/// The application: random transactions until `stop`, the large one when
/// `big` is set; returns the ledger.
async fn writer(
    pair: Pair,
    source: Source,
    mut ledger: Ledger,
    seed: u64,
    stop: Arc<AtomicBool>,
    big: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> Ledger {
    let mut rng = Rng(seed);
    let mut conn = source.conn().await;
    let pg = source.is_pg();
    let mut batch = 0;
    loop {
        let last = stop.load(Ordering::Relaxed);
        let mut sql = Vec::new();
        let mut ops = Vec::new();
        let mut rows = 0u64;
        if big.swap(false, Ordering::Relaxed) {
            batch += 1;
            let from = ledger.next_id;
            let to = from + big_rows(pair) - 1;
            ledger.next_id = to + 1;
            sql.push(if pg {
                format!("INSERT INTO bulk (id, batch, v) SELECT g, {batch}, 'b' || g FROM generate_series({from}, {to}) g")
            } else {
                format!("WITH RECURSIVE s(g) AS (SELECT {from} UNION ALL SELECT g + 1 FROM s WHERE g < {to}) INSERT INTO bulk (id, batch, v) SELECT g, {batch}, 'b' || g FROM s")
            });
            ops.push(Op::BulkRange { from, to, batch });
            rows += (to - from + 1) as u64;
        } else {
            let mut touched = std::collections::HashSet::new();
            let mut event_taken = false;
            for _ in 0..rng.between(1, 4) {
                let roll = rng.below(100);
                let next = ledger.next_id;
                if roll < 15 || ledger.accounts.is_empty() {
                    let id = ledger.next_id;
                    ledger.next_id += 1;
                    let v = (
                        format!("o{}", rng.below(1000)),
                        rng.below(1_000_000) as i64,
                        0,
                    );
                    sql.push(format!("INSERT INTO accounts (id, owner, balance, updated) VALUES ({id}, '{}', {}, 0)", v.0, v.1));
                    ops.push(Op::AccountPut(id, v));
                } else if roll < 45 {
                    let Some(id) = Ledger::pick(&ledger.accounts, &mut rng, next) else {
                        continue;
                    };
                    if !touched.insert(id) {
                        continue;
                    }
                    let (o, b, u) = ledger.accounts[&id].clone();
                    let v = (o, b + rng.below(100) as i64 - 50, u + 1);
                    sql.push(format!(
                        "UPDATE accounts SET balance = {}, updated = {} WHERE id = {id}",
                        v.1, v.2
                    ));
                    ops.push(Op::AccountPut(id, v));
                } else if roll < 53 {
                    let Some(id) = Ledger::pick(&ledger.accounts, &mut rng, next) else {
                        continue;
                    };
                    if !touched.insert(id) {
                        continue;
                    }
                    sql.push(format!("DELETE FROM accounts WHERE id = {id}"));
                    ops.push(Op::AccountDel(id));
                } else if roll < 60 {
                    // A primary-key change.
                    let Some(id) = Ledger::pick(&ledger.accounts, &mut rng, next) else {
                        continue;
                    };
                    if !touched.insert(id) {
                        continue;
                    }
                    let new = ledger.next_id;
                    ledger.next_id += 1;
                    touched.insert(new);
                    sql.push(format!("UPDATE accounts SET id = {new} WHERE id = {id}"));
                    let v = ledger.accounts[&id].clone();
                    ops.push(Op::AccountDel(id));
                    ops.push(Op::AccountPut(new, v));
                } else if roll < 68 {
                    // The TOASTed body unchanged: pgoutput leaves it out.
                    let Some(id) = Ledger::pick(&ledger.docs, &mut rng, next) else {
                        continue;
                    };
                    if !touched.insert(id) {
                        continue;
                    }
                    let (r, b) = ledger.docs[&id].clone();
                    sql.push(format!("UPDATE docs SET rev = {} WHERE id = {id}", r + 1));
                    ops.push(Op::DocPut(id, (r + 1, b)));
                } else if roll < 72 {
                    let Some(id) = Ledger::pick(&ledger.docs, &mut rng, next) else {
                        continue;
                    };
                    if !touched.insert(id) {
                        continue;
                    }
                    let r = ledger.docs[&id].0 + 1;
                    let b = body(id, r);
                    sql.push(format!(
                        "UPDATE docs SET rev = {r}, body = '{b}' WHERE id = {id}"
                    ));
                    ops.push(Op::DocPut(id, (r, b)));
                } else if roll < 74 {
                    let id = ledger.next_id;
                    ledger.next_id += 1;
                    let b = body(id, 0);
                    sql.push(format!(
                        "INSERT INTO docs (id, rev, body) VALUES ({id}, 0, '{b}')"
                    ));
                    ops.push(Op::DocPut(id, (0, b)));
                } else if roll < 75 {
                    let Some(id) = Ledger::pick(&ledger.docs, &mut rng, next) else {
                        continue;
                    };
                    if !touched.insert(id) {
                        continue;
                    }
                    sql.push(format!("DELETE FROM docs WHERE id = {id}"));
                    ops.push(Op::DocDel(id));
                } else if !pg {
                    continue;
                } else if roll < 90 {
                    let e = (
                        format!("k{}", rng.below(5)),
                        rng.below(40) as i64,
                        format!("n{}", rng.below(3)),
                    );
                    sql.push(format!(
                        "INSERT INTO events (kind, n, note) VALUES ('{}', {}, '{}')",
                        e.0, e.1, e.2
                    ));
                    ops.push(Op::EventAdd(e));
                } else if roll < 99 {
                    // One of identical rows, deleted or changed by its ctid.
                    if event_taken || ledger.events.is_empty() {
                        continue;
                    }
                    event_taken = true;
                    let i = rng.below(ledger.events.len() as u64) as usize;
                    let e = ledger.events.keys().nth(i).unwrap().clone();
                    let one = format!("(SELECT ctid FROM events WHERE kind = '{}' AND n = {} AND note = '{}' LIMIT 1)", e.0, e.1, e.2);
                    if rng.below(2) == 0 {
                        sql.push(format!("DELETE FROM events WHERE ctid = {one}"));
                    } else {
                        let new = (e.0.clone(), e.1 + 1000, e.2.clone());
                        sql.push(format!(
                            "UPDATE events SET n = {} WHERE ctid = {one}",
                            new.1
                        ));
                        ops.push(Op::EventAdd(new));
                    }
                    ops.push(Op::EventDel(e));
                } else if rng.below(8) == 0 {
                    if event_taken {
                        continue;
                    }
                    event_taken = true;
                    sql.push("TRUNCATE events".into());
                    ops.push(Op::EventsTruncate);
                }
            }
            rows = ops.len() as u64;
        }
        if sql.is_empty() {
            continue;
        }
        let is_big = matches!(ops.first(), Some(Op::BulkRange { .. }));
        if is_big {
            stats.big_started.fetch_add(1, Ordering::Relaxed);
        }
        match transaction(&mut conn, &source, &sql, &stats).await {
            Outcome::Committed => {
                if is_big {
                    stats.big_done.fetch_add(1, Ordering::Relaxed);
                }
                for op in ops {
                    ledger.apply(op);
                }
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.rows_written.fetch_add(rows, Ordering::Relaxed);
            }
            Outcome::NotCommitted => {
                stats.not_committed.fetch_add(1, Ordering::Relaxed);
                if is_big {
                    stats.big_lost.fetch_add(1, Ordering::Relaxed);
                    // Asked for again: the run waits for one to commit (a
                    // source crash during its insert once left the run
                    // waiting for good).
                    big.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Source::Pg(_) = source {
                    if let Conn::Pg(c) = &conn {
                        if c.is_closed() {
                            conn = source.conn().await;
                        }
                    }
                }
            }
        }
        if last {
            return ledger;
        }
        tokio::time::sleep(pair.pause()).await;
    }
}

const PG_SCHEMA: &str = r#"
CREATE TABLE accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance bigint NOT NULL, updated bigint NOT NULL);
CREATE TABLE docs (id bigint PRIMARY KEY, rev bigint NOT NULL, body text NOT NULL);
CREATE TABLE bulk (id bigint PRIMARY KEY, batch bigint NOT NULL, v text NOT NULL);
CREATE TABLE events (kind text NOT NULL, n bigint NOT NULL, note text NOT NULL);
ALTER TABLE events REPLICA IDENTITY FULL;
"#;

const SQLITE_SCHEMA: &str = r#"
CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT NOT NULL, balance INTEGER NOT NULL, updated INTEGER NOT NULL);
CREATE TABLE docs (id INTEGER PRIMARY KEY, rev INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE bulk (id INTEGER PRIMARY KEY, batch INTEGER NOT NULL, v TEXT NOT NULL);
"#;

/// The initial rows (the snapshot's work), in the source and the ledger.
async fn seed_rows(source: &Source) -> Ledger {
    let mut l = Ledger::default();
    let mut sql = Vec::new();
    if source.is_pg() {
        sql.push(format!("INSERT INTO accounts SELECT i, 'o' || (i % 1000), i * 7 % 100000, 0 FROM generate_series(1, {ACCOUNTS}) i"));
        sql.push(format!("INSERT INTO events SELECT 'k' || (i % 5), i % 40, 'n' || (i % 3) FROM generate_series(1, {EVENTS}) i"));
        for i in 1..=EVENTS {
            *l.events
                .entry((format!("k{}", i % 5), i % 40, format!("n{}", i % 3)))
                .or_default() += 1;
        }
    } else {
        sql.push(format!("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {ACCOUNTS}) INSERT INTO accounts SELECT i, 'o' || (i % 1000), i * 7 % 100000, 0 FROM s"));
    }
    for i in 1..=ACCOUNTS {
        l.accounts
            .insert(i, (format!("o{}", i % 1000), i * 7 % 100000, 0));
    }
    for i in ACCOUNTS + 1..=ACCOUNTS + DOCS {
        let b = body(i, 0);
        sql.push(format!("INSERT INTO docs VALUES ({i}, 0, '{b}')"));
        l.docs.insert(i, (0, b));
    }
    l.next_id = ACCOUNTS + DOCS + 1;
    let stats = Stats::default();
    let mut conn = source.conn().await;
    assert!(matches!(
        transaction(&mut conn, source, &sql, &stats).await,
        Outcome::Committed
    ));
    l
}

// ---------------------------------------------------------------- the daemon

/// The daemon, started again (as a service manager would) whenever it dies.
struct Daemons {
    config: String,
    dir: PathBuf,
    current: Option<Daemon>,
    incarnations: usize,
    /// Exits the daemon chose itself: the last line of its log.
    exits: Vec<String>,
}

impl Daemons {
    fn start(&mut self) {
        self.incarnations += 1;
        self.current = Some(Daemon::start(
            &["run", "--config", &self.config],
            self.dir.join(format!("run-{}.log", self.incarnations)),
        ));
    }

    fn sigkill(&mut self) {
        if let Some(d) = self.current.take() {
            d.kill();
        }
    }

    fn log(&self) -> String {
        self.current
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default()
    }

    /// Starts the daemon again if it exited by itself.
    fn reap(&mut self) {
        let exited = match self.current.as_mut() {
            Some(d) => d.child.try_wait().ok().flatten().is_some(),
            None => false,
        };
        if exited {
            let last = self
                .log()
                .lines()
                .rev()
                .find(|l| l.contains("ERROR"))
                .unwrap_or("(no error logged)")
                .chars()
                .take(300)
                .collect();
            self.exits.push(last);
            self.current = None;
            self.start();
        }
    }
}

// ---------------------------------------------------------------- the run

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Side {
    Source,
    Target,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Fault {
    KillStreaming,
    Cut(Side),
    Reset(Side),
    Stall(Side),
    Crash(Side),
}

impl Fault {
    fn name(&self) -> String {
        let side = |s: &Side| match s {
            Side::Source => "source",
            Side::Target => "target",
        };
        match self {
            Fault::KillStreaming => "SIGKILL while streaming".into(),
            Fault::Cut(s) => format!("connections closed ({})", side(s)),
            Fault::Reset(s) => format!("connections reset ({})", side(s)),
            Fault::Stall(s) => format!("connections stalled ({})", side(s)),
            Fault::Crash(s) => format!("{} stopped -m immediate", side(s)),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pair {
    PgPg,
    PgSurreal,
    SqlitePg,
}

impl Pair {
    fn name(self) -> &'static str {
        match self {
            Pair::PgPg => "PostgreSQL → PostgreSQL",
            Pair::PgSurreal => "PostgreSQL → SurrealDB (surrealkv)",
            Pair::SqlitePg => "SQLite → PostgreSQL",
        }
    }
}

/// What the sampler found: checks made, and any broken promise.
#[derive(Default)]
struct Watch {
    samples: AtomicU64,
    durable_samples: AtomicU64,
    violations: Mutex<Vec<String>>,
    /// The daemon's own count of changes applied, per incarnation.
    applied: Mutex<BTreeMap<u32, u64>>,
    copied: Mutex<BTreeMap<String, u64>>,
}

struct Soak {
    pair: Pair,
    source: Source,
    /// PostgreSQL source: the slot name.
    slot: String,
    target_pg: Option<Pg>,
    /// surrealkv target: its URL and directory.
    target_kv: Option<(String, PathBuf)>,
    http: String,
    daemons: Arc<Mutex<Daemons>>,
    watch: Arc<Watch>,
    source_proxy: Option<Proxy>,
    target_proxy: Option<Proxy>,
    source_cluster: Option<OwnCluster>,
    target_cluster: Option<OwnCluster>,
}

/// Where the run is: each step with its time, what the writer has done and
/// the daemon's log. A soak that overruns its deadline fails with this
/// instead of hanging until the test runner kills it (a killed test's
/// captured output is lost).
struct Progress {
    started: Instant,
    steps: Mutex<Vec<String>>,
    daemons: OnceLock<Arc<Mutex<Daemons>>>,
    stats: OnceLock<Arc<Stats>>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            steps: Mutex::default(),
            daemons: OnceLock::new(),
            stats: OnceLock::new(),
        }
    }

    fn step(&self, what: impl Into<String>) {
        let at = self.started.elapsed();
        self.steps
            .lock()
            .unwrap()
            .push(format!("{:>7.1} s  {}", at.as_secs_f64(), what.into()));
    }

    fn report(&self) -> String {
        let mut t = self.steps.lock().unwrap().join("\n");
        if let Some(s) = self.stats.get() {
            let _ = write!(
                t,
                "\nthe writer: {} committed, {} not committed, {} with an unknown outcome, the large transaction done {} time(s)",
                s.commits.load(Ordering::Relaxed),
                s.not_committed.load(Ordering::Relaxed),
                s.ambiguous.load(Ordering::Relaxed),
                s.big_done.load(Ordering::Relaxed)
            );
        }
        if let Some(d) = self.daemons.get() {
            // try_lock: whatever hangs may hold it.
            match d.try_lock() {
                Ok(d) => {
                    let log = d.log();
                    let tail: Vec<&str> = log
                        .lines()
                        .rev()
                        .filter(|l| !l.contains("\"DEBUG\""))
                        .take(40)
                        .collect();
                    let _ = write!(
                        t,
                        "\nthe daemon: {} starts, logs in {}; the current one's last lines above DEBUG (newest first):\n{}",
                        d.incarnations,
                        d.dir.display(),
                        tail.join("\n")
                    );
                }
                Err(_) => t.push_str("\nthe daemon: its supervisor's lock is held"),
            }
        }
        t
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The commit part of a logged or shown position (`123`, `123.4`, `123.end`).
fn commit_of(p: &str) -> Option<u64> {
    p.split('.').next()?.parse().ok()
}

impl Soak {
    /// The target's checkpoint as this process can read it durably (a
    /// PostgreSQL target), else as the daemon shows it.
    async fn target_checkpoint(
        &self,
        pg: &mut Option<tokio_postgres::Client>,
    ) -> Option<(u64, bool)> {
        if let Some(t) = &self.target_pg {
            if pg.as_ref().is_none_or(|c| c.is_closed()) {
                *pg = t.try_connect("soak").await.ok();
            }
            let c = pg.as_ref()?;
            let row = c
                .query_opt("SELECT commit FROM switchyard.checkpoint WHERE id = 1", &[])
                .await
                .ok()?;
            return row.map(|r| (r.get::<_, i64>(0) as u64, true));
        }
        let s = switchyard::observe::fetch_status(&self.http, None, None)
            .await
            .ok()?;
        s.checkpoint
            .as_deref()
            .and_then(commit_of)
            .map(|c| (c, false))
    }

    /// How far the source has let go: the slot's confirmed flush, or the
    /// SQLite change log's lowest row less one (`None`: nothing to compare).
    async fn source_released(&self, pg: &mut Option<tokio_postgres::Client>) -> Option<u64> {
        match &self.source {
            Source::Pg(s) => {
                if pg.as_ref().is_none_or(|c| c.is_closed()) {
                    *pg = s.try_connect("soak").await.ok();
                }
                let row = pg
                    .as_ref()?
                    .query_opt(
                        "SELECT (confirmed_flush_lsn - '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.slot],
                    )
                    .await
                    .ok()??;
                // A checkpoint `L` covers transactions whose commit starts
                // at or before L: the flush confirmed for it is L + 1.
                row.get::<_, Option<String>>(0)?
                    .parse::<u64>()
                    .ok()
                    .map(|f| f.saturating_sub(1))
            }
            Source::Sqlite(pool) => {
                let (min, max): (Option<i64>, Option<i64>) =
                    sqlx::query_as("SELECT min(seq), max(seq) FROM _switchyard_changes")
                        .fetch_one(pool)
                        .await
                        .ok()?;
                // Rows below `min` are gone; with rows left, every change
                // from min on is kept.
                let _ = max;
                min.map(|m| (m - 1).max(0) as u64)
            }
        }
    }

    /// Every 100 ms: the source has not let go of anything the target's
    /// checkpoint does not hold; the daemon's counts for the table.
    async fn sample(self: Arc<Self>, stop: Arc<AtomicBool>) {
        let (mut s, mut t) = (None, None);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            every.tick().await;
            // Source first: what it released can only grow meanwhile.
            if let Some(released) = self.source_released(&mut s).await {
                if let Some((cp, durable)) = self.target_checkpoint(&mut t).await {
                    self.watch.samples.fetch_add(1, Ordering::Relaxed);
                    if durable {
                        self.watch.durable_samples.fetch_add(1, Ordering::Relaxed);
                    }
                    if released > cp {
                        self.watch.violations.lock().unwrap().push(format!(
                            "the source released changes up to {released}, past the target's checkpoint {cp}"
                        ));
                    }
                }
            }
            if let Ok(st) = switchyard::observe::fetch_status(&self.http, None, None).await {
                let n = self.daemons.lock().unwrap().incarnations as u32;
                self.watch
                    .applied
                    .lock()
                    .unwrap()
                    .insert(n, st.changes_applied);
                let mut copied = self.watch.copied.lock().unwrap();
                for (table, v) in &st.tables {
                    let e = copied.entry(table.clone()).or_default();
                    *e = (*e).max(v.rows);
                }
            }
        }
    }

    /// With the daemon dead, an embedded target's durable checkpoint against
    /// the slot (the sampler can only see the daemon's view of it).
    async fn check_dead_target(&self) {
        let Some((url, dir)) = &self.target_kv else {
            return;
        };
        wait_unlocked(dir).await;
        let db = open_target(url).await;
        let cp = target_checkpoint(&db).await;
        drop(db);
        wait_unlocked(dir).await;
        if let Some(released) = self.source_released(&mut None).await {
            self.watch.durable_samples.fetch_add(1, Ordering::Relaxed);
            let cp = cp.unwrap_or(0) as u64;
            if released > cp {
                self.watch.violations.lock().unwrap().push(format!(
                    "after a SIGKILL: the slot released changes up to {released}, past the surrealkv target's checkpoint {cp}"
                ));
            }
        }
    }

    /// Waits until the daemon's checkpoint reaches `head`; how long it took.
    async fn caught_up(&self, head: u64, after: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            if let Ok(s) = switchyard::observe::fetch_status(&self.http, None, None).await {
                if s.checkpoint
                    .as_deref()
                    .and_then(commit_of)
                    .is_some_and(|c| c >= head)
                {
                    return t0.elapsed();
                }
            }
            if t0.elapsed() > RECOVERY_LIMIT {
                let d = self.daemons.lock().unwrap();
                if std::env::var_os("SWITCHYARD_SOAK_KEEP").is_some() {
                    // Everything left as it is, clusters running, to look at.
                    eprintln!("{}: not caught up after {after}; kept: {} (source port {:?}, target port {:?})", self.pair.name(), d.dir.display(),
                        match &self.source { Source::Pg(p) => Some(p.port), _ => None }, self.target_pg.as_ref().map(|p| p.port));
                    std::process::exit(1);
                }
                panic!(
                    "{}: not caught up with the source ({head}) {} s after {after}; the daemon's logs are in {}; {} exits, the first: {:?}\n{}",
                    self.pair.name(),
                    RECOVERY_LIMIT.as_secs(),
                    d.dir.display(),
                    d.exits.len(),
                    d.exits.first(),
                    d.log().lines().rev().take(30).collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `pg_ctl stop -m immediate` of one side, `down_ms` down, started again.
    async fn crash(self: &Arc<Self>, side: Side, down_ms: u64) {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.cluster(side).crash(down_ms))
            .await
            .unwrap();
    }

    /// After a fault: counted, and how long the daemon took to reach the
    /// source's position, kept if it is the longest for that fault.
    async fn recovered(
        &self,
        fault: &str,
        progress: &Progress,
        counts: &mut BTreeMap<String, u64>,
        recoveries: &mut BTreeMap<String, (u64, Duration)>,
    ) {
        *counts.entry(fault.into()).or_default() += 1;
        let head = self.source.head().await;
        progress.step(format!("waiting for the daemon to reach {head}"));
        let took = self.caught_up(head, fault).await;
        let e = recoveries.entry(fault.into()).or_default();
        e.0 += 1;
        e.1 = e.1.max(took);
    }

    fn proxy(&self, side: Side) -> &Proxy {
        match side {
            Side::Source => self.source_proxy.as_ref(),
            Side::Target => self.target_proxy.as_ref(),
        }
        .expect("a proxy on that side")
    }

    fn cluster(&self, side: Side) -> &OwnCluster {
        match side {
            Side::Source => self.source_cluster.as_ref(),
            Side::Target => self.target_cluster.as_ref(),
        }
        .expect("a cluster on that side")
    }
}

/// Runs one pair with a deadline: the faults' seconds and 15 minutes for
/// setting up, recoveries and the checks (a run takes 2–4 minutes beyond its
/// faults on a loaded 2-core machine).
async fn soak(pair: Pair, seed: u64) {
    let limit = Duration::from_secs(soak_seconds() + 900);
    let progress = Arc::new(Progress::new());
    progress.step(format!("{}: seed {seed:#x}", pair.name()));
    if tokio::time::timeout(limit, run_soak(pair, seed, progress.clone()))
        .await
        .is_err()
    {
        panic!(
            "{}: still running after {} s, where it was:\n{}",
            pair.name(),
            limit.as_secs(),
            progress.report()
        );
    }
}

/// Sets up one pair, runs its schedule, checks, and prints the table.
async fn run_soak(pair: Pair, seed: u64, progress: Arc<Progress>) {
    let secs = soak_seconds();
    // Kept when the soak fails: the daemon's logs, one per start.
    let mut scratch = Scratch::new();
    scratch.dir.disable_cleanup(true);
    let mut rng = Rng(seed);
    let started = Instant::now();

    // The databases, each PostgreSQL behind a fault proxy.
    let (source_cluster, source, source_proxy) = if pair == Pair::SqlitePg {
        let pool = scratch.source(SQLITE_SCHEMA).await;
        (None, Source::Sqlite(pool), None)
    } else {
        let (own, c) = OwnCluster::start_with(true);
        let pg = Pg::of(&c);
        let admin = pg.connect("postgres").await;
        admin.batch_execute("CREATE DATABASE soak").await.unwrap();
        pg.connect("soak")
            .await
            .batch_execute(PG_SCHEMA)
            .await
            .unwrap();
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], c.port))).await;
        (Some(own), Source::Pg(pg), Some(proxy))
    };
    let (target_cluster, target_pg, target_proxy, target_kv) = if pair == Pair::PgSurreal {
        let dir = scratch.path("replica");
        let url = format!("surrealkv://{}", dir.display());
        (None, None, None, Some((url, dir)))
    } else {
        let (own, c) = OwnCluster::start_with(true);
        let pg = Pg::of(&c);
        pg.connect("postgres")
            .await
            .batch_execute("CREATE DATABASE soak")
            .await
            .unwrap();
        let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], c.port))).await;
        (Some(own), Some(pg), Some(proxy), None)
    };
    progress.step("servers up; seeding the source");
    let ledger = seed_rows(&source).await;

    let http = format!("127.0.0.1:{}", free_port());
    let source_section = match (&source, &source_proxy) {
        (Source::Pg(pg), Some(p)) => format!(
            "url = \"postgres://postgres@127.0.0.1:{}/soak?sslmode=disable\"\npassword = \"{}\"\nslot = \"soak\"\npublication = \"soak\"",
            p.port, pg.password
        ),
        _ => format!(
            "url = \"sqlite://{}\"\npoll_interval_ms = 20",
            scratch.source_path().display()
        ),
    };
    let target_section = match (&target_pg, &target_proxy, &target_kv) {
        (Some(pg), Some(p), _) => format!(
            "url = \"postgres://postgres@127.0.0.1:{}/soak?sslmode=disable\"\npassword = \"{}\"",
            p.port, pg.password
        ),
        (_, _, Some((url, _))) => {
            format!("url = \"{url}\"\nnamespace = \"test\"\ndatabase = \"test\"")
        }
        _ => unreachable!(),
    };
    let config = scratch.path("soak.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\n{source_section}\n\n[target]\n{target_section}\n\n[pipeline]\nbatch_delay_ms = 10\nsnapshot_batch_rows = 1000\nretry_attempts = 100000\nretry_max_delay_ms = 1000\n\n[http]\naddress = \"{http}\"\n"
        ),
    )
    .unwrap();
    let soak = Arc::new(Soak {
        pair,
        source: source.clone(),
        slot: "soak".into(),
        target_pg,
        target_kv,
        http,
        daemons: Arc::new(Mutex::new(Daemons {
            config: config.to_str().unwrap().into(),
            dir: scratch.path(""),
            current: None,
            incarnations: 0,
            exits: Vec::new(),
        })),
        watch: Arc::new(Watch::default()),
        source_proxy,
        target_proxy,
        source_cluster,
        target_cluster,
    });
    let _ = progress.daemons.set(soak.daemons.clone());

    // The schedule: SIGKILLs, proxy faults and server crashes scaled from
    // 20, 20 and 2 of each server per 10 minutes.
    let per = |in_ten: u64, min: u64| (in_ten * secs).div_ceil(600).max(min);
    let kills = per(20, 4);
    let kills_in_snapshot = (kills / 4).max(2);
    let mut faults = Vec::new();
    for _ in kills_in_snapshot..kills {
        faults.push(Fault::KillStreaming);
    }
    let sides: Vec<Side> = [
        soak.source_proxy.as_ref().map(|_| Side::Source),
        soak.target_proxy.as_ref().map(|_| Side::Target),
    ]
    .into_iter()
    .flatten()
    .collect();
    for i in 0..per(20, 3) {
        let side = sides[(i as usize) % sides.len()];
        faults.push(match i % 3 {
            0 => Fault::Cut(side),
            1 => Fault::Reset(side),
            _ => Fault::Stall(side),
        });
    }
    for side in &sides {
        for _ in 0..per(2, 1) {
            faults.push(Fault::Crash(*side));
        }
    }
    for i in (1..faults.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        faults.swap(i, j);
    }

    // The writer runs from before the first start to the end.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let big = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let _ = progress.stats.set(stats.clone());
    let writer = tokio::spawn(writer(
        pair,
        source.clone(),
        ledger,
        rng.next() | 1,
        stop_writer.clone(),
        big.clone(),
        stats.clone(),
    ));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(soak.clone().sample(stop_sampler.clone()));
    let supervise = {
        let (d, stop) = (soak.daemons.clone(), stop_sampler.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                d.lock().unwrap().reap();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // SIGKILLs in the snapshot.
    let mut killed_in_snapshot = 0;
    let mut recoveries: BTreeMap<String, (u64, Duration)> = BTreeMap::new();
    soak.daemons.lock().unwrap().start();
    progress.step("the daemon started; killing it in the copy");
    for _ in 0..kills_in_snapshot {
        let t0 = Instant::now();
        loop {
            let log = soak.daemons.lock().unwrap().log();
            if log.contains("\"copying\"")
                || log.contains("copying from scratch")
                || log.contains("resuming after")
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the copy did not start:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Early in the copy: a fast machine copies the initial rows of the
        // SQLite soak in well under a second, and the PostgreSQL one's in
        // less than 400 ms since its keys are built with more memory (a
        // kill drawn at 30–400 ms once came after the copy).
        tokio::time::sleep(Duration::from_millis(rng.between(10, 150))).await;
        let copied_first = {
            let mut d = soak.daemons.lock().unwrap();
            let done = d.log().contains("streaming changes");
            if !done {
                d.sigkill();
            }
            done
        };
        if copied_first {
            break;
        }
        killed_in_snapshot += 1;
        progress.step(format!("SIGKILL {killed_in_snapshot} in the copy"));
        soak.check_dead_target().await;
        soak.daemons.lock().unwrap().start();
    }
    let head = source.head().await;
    progress.step(format!(
        "waiting for the snapshot and the stream up to {head}"
    ));
    let snapshot_done = soak.caught_up(head, "the snapshot").await;

    // Faults while streaming, spread over the run; the large transaction
    // a third of the way in.
    let faults_started = Instant::now();
    let gap = Duration::from_secs(secs) / (faults.len() as u32 + 1);
    let mut big_asked = false;
    // With a PostgreSQL source: that server also stops once in the middle
    // of the large transaction (the stream drops what it had of it; the
    // writer tries it again).
    let mut crash_in_big = soak.source_cluster.is_some();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for (i, fault) in faults.iter().enumerate() {
        let due = gap * (i as u32 + 1);
        let jitter = Duration::from_millis(rng.below(gap.as_millis() as u64 / 2 + 1));
        let due = (due + jitter).saturating_sub(gap / 4);
        while faults_started.elapsed() < due {
            if !big_asked && faults_started.elapsed() > Duration::from_secs(secs) / 3 {
                big.store(true, Ordering::Relaxed);
                big_asked = true;
            }
            if big_asked && crash_in_big {
                crash_in_big = false;
                let t0 = Instant::now();
                while stats.big_started.load(Ordering::Relaxed) == 0
                    && t0.elapsed() < Duration::from_secs(60)
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Into the insert of 200,000 rows (about a second); the
                // 20,000 into SurrealDB have often committed by then.
                tokio::time::sleep(Duration::from_millis(rng.between(20, 150))).await;
                let name = "source stopped in the large transaction";
                progress.step(name);
                soak.crash(Side::Source, rng.between(500, 3_000)).await;
                soak.recovered(name, &progress, &mut counts, &mut recoveries)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        progress.step(format!(
            "fault {}/{}: {}",
            i + 1,
            faults.len(),
            fault.name()
        ));
        match *fault {
            Fault::KillStreaming => {
                soak.daemons.lock().unwrap().sigkill();
                soak.check_dead_target().await;
                soak.daemons.lock().unwrap().start();
            }
            Fault::Cut(side) => soak.proxy(side).cut(Cut::Close),
            Fault::Reset(side) => soak.proxy(side).cut(Cut::Reset),
            Fault::Stall(side) => {
                let p = soak.proxy(side);
                p.stall(true);
                tokio::time::sleep(Duration::from_millis(rng.between(2_000, 12_000))).await;
                p.stall(false);
            }
            Fault::Crash(side) => soak.crash(side, rng.between(500, 3_000)).await,
        }
        soak.recovered(&fault.name(), &progress, &mut counts, &mut recoveries)
            .await;
    }
    if !big_asked {
        big.store(true, Ordering::Relaxed);
    }
    progress.step("the faults are done; waiting for the large transaction");
    while stats.big_done.load(Ordering::Relaxed) == 0 {
        if writer.is_finished() {
            // It panicked: its message is the failure.
            writer.await.unwrap();
            panic!("the writer stopped before its large transaction");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The end: the writer stops after one more transaction; the target
    // catches up with it; the daemon stops cleanly.
    let head = source.head().await;
    stop_writer.store(true, Ordering::Relaxed);
    progress.step(format!("stopping the writer (source at {head})"));
    let ledger = writer.await.unwrap();
    progress.step("waiting for the final catch-up");
    let final_catch_up = soak.caught_up(head, "the writer stopped").await;
    // The source's last changes are applied: wait for the newest one.
    let head = source.head().await;
    if !source.is_pg() {
        soak.caught_up(head, "the writer stopped").await;
    }
    stop_sampler.store(true, Ordering::Relaxed);
    progress.step("stopping the sampler");
    sampler.await.unwrap();
    supervise.await.unwrap();
    progress.step("stopping the daemon (SIGINT)");
    let daemon = soak.daemons.lock().unwrap().current.take().unwrap();
    let status = daemon.interrupt().await;
    progress.step("verify");

    // Verify, the ledger, and the target read directly where it can be.
    let (code, out, err) = run_cli_async(&["verify", "--config", config.to_str().unwrap()]).await;
    progress.step("reading source and target back");
    let with_events = source.is_pg();
    let want = ledger.lines(with_events);
    let mut problems = soak.watch.violations.lock().unwrap().clone();
    if code != 0 {
        problems.push(format!("verify exited {code}: {out}{err}"));
    }
    if !status.success() {
        problems.push(format!("the daemon's clean stop exited {status}"));
    }
    problems.extend(compare("source", &source.read().await, &want));
    if let Some(t) = &soak.target_pg {
        problems.extend(compare("target", &t.read("soak").await, &want));
    }

    // The table.
    let d = soak.daemons.lock().unwrap();
    let applied: u64 = soak.watch.applied.lock().unwrap().values().sum();
    let copied: u64 = soak.watch.copied.lock().unwrap().values().sum();
    let longest = recoveries
        .iter()
        .map(|(k, (_, t))| (*t, k.clone()))
        .max()
        .unwrap_or_default();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nsoak {}: seed {seed:#x}, {secs} s of faults, {:.0} s in all",
        pair.name(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        t,
        "  {:<42} {:>6}  {:>16}",
        "fault", "count", "longest recovery"
    );
    let _ = writeln!(
        t,
        "  {:<42} {:>6}  {:>15.1}s",
        "SIGKILL in the snapshot (then caught up)",
        killed_in_snapshot,
        snapshot_done.as_secs_f64()
    );
    for (name, (n, took)) in &recoveries {
        let _ = writeln!(t, "  {:<42} {:>6}  {:>15.1}s", name, n, took.as_secs_f64());
    }
    let _ = writeln!(
        t,
        "  daemon starts {}, exits it chose itself (started again) {}",
        d.incarnations,
        d.exits.len()
    );
    for e in d.exits.iter().take(5) {
        let _ = writeln!(t, "    exit: {e}");
    }
    let _ = writeln!(
        t,
        "  writer: {} transactions committed ({} of them {} rows in one, {} tries of it undone by a fault), {} not committed, {} with an unknown commit outcome ({} of them committed)",
        stats.commits.load(Ordering::Relaxed),
        stats.big_done.load(Ordering::Relaxed),
        big_rows(pair),
        stats.big_lost.load(Ordering::Relaxed),
        stats.not_committed.load(Ordering::Relaxed),
        stats.ambiguous.load(Ordering::Relaxed),
        stats.ambiguous_committed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        t,
        "  moved: {copied} rows copied, at least {applied} changes applied ({} rows written by the writer); {} rows at the end",
        stats.rows_written.load(Ordering::Relaxed),
        ledger.rows()
    );
    let _ = writeln!(
        t,
        "  source released ≤ target checkpoint: {} samples every 100 ms ({} of a durable checkpoint), {} violations",
        soak.watch.samples.load(Ordering::Relaxed),
        soak.watch.durable_samples.load(Ordering::Relaxed),
        soak.watch.violations.lock().unwrap().len()
    );
    let _ = writeln!(
        t,
        "  longest recovery {:.1} s (after {}); final catch-up {:.1} s; faults: {}",
        longest.0.as_secs_f64(),
        if longest.1.is_empty() {
            "-"
        } else {
            &longest.1
        },
        final_catch_up.as_secs_f64(),
        counts.values().sum::<u64>() + killed_in_snapshot
    );
    let _ = writeln!(
        t,
        "  result: {}",
        if problems.is_empty() {
            "PASS: verify identical; source and target hold exactly the ledger's rows".to_string()
        } else {
            format!("FAIL\n    {}", problems.join("\n    "))
        }
    );
    println!("{t}");
    if let Ok(path) = std::env::var("SWITCHYARD_SOAK_REPORT") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(t.as_bytes());
        }
    }
    assert!(
        problems.is_empty(),
        "{t}\nthe daemon's logs: {}",
        scratch.dir.path().display()
    );
    assert!(
        killed_in_snapshot >= 1,
        "no SIGKILL landed in the snapshot:{t}"
    );
    let _ = std::fs::remove_dir_all(scratch.dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_postgres_under_faults_loses_nothing() {
    soak(Pair::PgPg, soak_seed(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_to_surrealkv_under_faults_loses_nothing() {
    soak(Pair::PgSurreal, soak_seed(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_to_postgres_under_faults_loses_nothing() {
    soak(Pair::SqlitePg, soak_seed(3)).await;
}
