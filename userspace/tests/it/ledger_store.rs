//! The ledger against real databases, SQLite and PostgreSQL, with a scripted counter source:
//! every byte it must hold is known exactly.
//!
//! The ledger against real databases (a SQLite file, and a PostgreSQL server started by the
//! test): restarts without a clean stop, a database outage, a new kernel epoch, resets and the
//! history rollups. The counter source here is a scripted stand-in for the kernel map, so every
//! byte the ledger must hold is known exactly; `ledger_netns.rs` runs the same ledger against
//! the real kernel programs.

use crate::support;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::Row as _;
use tunmeter::{
    bpf::loader::LoadError,
    db::Database,
    ledger::{
        Ledger, LedgerConfig, LedgerError,
        source::Source,
        state::{Reading, Totals},
        store::{self, Granularity},
    },
    tasks::Tasks,
};

/// Counters the test moves by hand, in an epoch the test can change.
#[derive(Default)]
struct Scripted {
    epoch: Mutex<String>,
    counters: Mutex<HashMap<IpAddr, Totals>>,
    /// Bytes ever added, over all epochs: what the ledger must hold.
    ever: Mutex<HashMap<IpAddr, u64>>,
}

impl Scripted {
    fn ever(&self, ip: IpAddr) -> u64 {
        self.ever.lock().unwrap().get(&ip).copied().unwrap_or(0)
    }

    fn add(&self, ip: IpAddr, up: u64, down: u64) {
        *self.ever.lock().unwrap().entry(ip).or_default() += up + down;
        let mut m = self.counters.lock().unwrap();
        let t = m.entry(ip).or_default();
        t.up_bytes += up;
        t.up_packets += 1;
        t.down_bytes += down;
        t.down_packets += 1;
    }

    /// A reboot: a new map whose counters start from zero.
    fn new_epoch(&self, name: &str) {
        *self.epoch.lock().unwrap() = name.into();
        self.counters.lock().unwrap().clear();
    }
}

struct Shared(Arc<Scripted>);

impl Source for Shared {
    fn epoch(&self) -> Result<String, LoadError> {
        Ok(self.0.epoch.lock().unwrap().clone())
    }
    fn read_all(&self, f: &mut dyn FnMut(Reading)) -> Result<(), LoadError> {
        let now = tunmeter::time::unix_ms();
        for (ip, t) in self.0.counters.lock().unwrap().iter() {
            f(Reading { ip: *ip, totals: *t, last_seen_ms: Some(now), slot: None });
        }
        Ok(())
    }
    fn read_one(&self, ip: IpAddr) -> Result<Option<Reading>, LoadError> {
        Ok(self.0.counters.lock().unwrap().get(&ip).map(|t| Reading { ip, totals: *t, last_seen_ms: None, slot: None }))
    }
}

fn cfg(node: &str) -> LedgerConfig {
    support::hand_polled_ledger(node)
}

/// A ledger with its tasks running (they do nothing on their own here: the intervals are an
/// hour; the writer serves resets).
async fn open(url: &str, node: &str, src: &Arc<Scripted>) -> (Arc<Ledger>, Tasks) {
    let db = Database::open(url).await.expect("open database");
    let l = Ledger::open(cfg(node), db, Arc::new(Shared(src.clone()))).await.expect("ledger");
    let mut tasks = Tasks::new();
    l.spawn(&mut tasks);
    (l, tasks)
}

/// The client rows as stored: ip -> (total, base).
async fn stored(db: &Database, node: &str) -> HashMap<IpAddr, (Totals, Totals)> {
    store::load_clients(db, node).await.unwrap().into_iter().map(|(ip, c)| (ip, (c.total, c.base))).collect()
}

async fn history_sum(db: &Database, node: &str, ip: IpAddr, g: Granularity) -> (Totals, f64) {
    let rows = store::history(db, node, ip, g, 0, u64::MAX / 2).await.unwrap();
    let mut t = Totals::default();
    let mut peak: f64 = 0.0;
    for r in rows {
        t.add(&r.bucket.totals);
        peak = peak.max(f64::from(r.bucket.peak_up_rate));
    }
    (t, peak)
}

/// How a test takes its database away and brings it back.
trait Outage {
    fn down(&mut self);
    fn up(&mut self);
}

async fn scenario(url: &str, outage: &mut dyn Outage) {
    let a: IpAddr = "10.8.0.2".parse().unwrap();
    let b: IpAddr = "fd00:8::2".parse().unwrap();
    let src = Arc::new(Scripted::default());
    src.new_epoch("boot1/7");
    let add = |ip: IpAddr, up: u64, down: u64| src.add(ip, up, down);

    // 1. Polls and flushes.
    let (l, mut tasks) = open(url, "node-a", &src).await;
    add(a, 1000, 5000);
    add(b, 10, 20);
    l.poll_once().await.unwrap();
    add(a, 1000, 0);
    l.poll_once().await.unwrap();
    l.flush().await.unwrap();
    let s = stored(&l.db, "node-a").await;
    assert_eq!(s[&a].0.up_bytes + s[&a].0.down_bytes, src.ever(a));

    // 2. A crash (no shutdown, no flush) after more polls: the restart recounts from the stored
    //    cursor, losing and doubling nothing.
    add(a, 333, 444);
    l.poll_once().await.unwrap();
    tasks.abort();
    drop(l);
    let (l, mut tasks) = open(url, "node-a", &src).await;
    add(b, 7, 7);
    l.poll_once().await.unwrap();
    l.flush().await.unwrap();
    let s = stored(&l.db, "node-a").await;
    for ip in [a, b] {
        assert_eq!(s[&ip].0.up_bytes + s[&ip].0.down_bytes, src.ever(ip), "{ip} after a crash");
    }

    // 3. The database goes away: polling goes on, writes and resets fail cleanly, and
    //    everything pending is written when it returns.
    outage.down();
    add(a, 100_000, 1);
    l.poll_once().await.unwrap();
    assert!(l.flush().await.is_err(), "flush must fail while the database is down");
    assert!(!l.health().database_up);
    match l.reset(a).await {
        Err(LedgerError::Unavailable(_)) => {}
        other => panic!("reset with the database down: {other:?}"),
    }
    // Nothing was reset in memory either.
    assert_eq!(l.client(a).unwrap().period().up_bytes + l.client(a).unwrap().period().down_bytes, src.ever(a));
    add(a, 5, 5);
    l.poll_once().await.unwrap();
    assert!(l.pending_rows() > 0);
    outage.up();
    let mut ok = false;
    for _ in 0..50 {
        if l.flush().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the ledger never caught up after the database returned");
    assert!(l.health().database_up);
    assert_eq!(l.pending_rows(), 0);
    let s = stored(&l.db, "node-a").await;
    assert_eq!(s[&a].0.up_bytes + s[&a].0.down_bytes, src.ever(a), "after the outage");

    // 4. Resets: each closes exactly the period before it.
    let mut closed = Totals::default();
    for i in 0..20u64 {
        add(a, 100 + i, 7 * i);
        if i % 3 == 0 {
            l.poll_once().await.unwrap();
        }
        let r = l.reset(a).await.unwrap();
        closed.add(&r.closed);
    }
    add(a, 9, 9);
    l.poll_once().await.unwrap();
    l.flush().await.unwrap();
    let (n, db_closed) = store::closed_sum(&l.db, "node-a", a).await.unwrap();
    assert_eq!(n, 20);
    assert_eq!(db_closed, closed);
    let period = l.client(a).unwrap().period();
    let s = stored(&l.db, "node-a").await;
    // Closed periods + the current one = everything (the first period began at the start).
    let all = closed.up_bytes + closed.down_bytes + period.up_bytes + period.down_bytes;
    assert_eq!(all, src.ever(a), "sum over reset periods");
    assert_eq!(s[&a].0.minus(&s[&a].1), period, "stored period");

    // 5. A new epoch (reboot): the new map's small counters are new usage.
    src.new_epoch("boot2/3");
    add(a, 50, 60);
    l.poll_once().await.unwrap();
    l.flush().await.unwrap();
    let s = stored(&l.db, "node-a").await;
    assert_eq!(s[&a].0.up_bytes + s[&a].0.down_bytes, src.ever(a), "across a new epoch");
    let epoch: String = sqlx::query("SELECT kernel_epoch FROM nodes WHERE node_id = 'node-a'")
        .fetch_one(&l.db.pool)
        .await
        .unwrap()
        .try_get("kernel_epoch")
        .unwrap();
    assert_eq!(epoch, "boot2/3");

    // 5b. A crash right after a new epoch's own transaction (the epoch and zeroed cursors),
    //     before any client row of it: the restart counts the new map from its start. With the
    //     old epoch's cursors left in place, their large values would swallow the new counts.
    src.new_epoch("boot3/1");
    add(a, 70, 80);
    let mut w = store::BatchWriter::begin(&l.db, "node-a").await.unwrap();
    w.epoch("boot3/1", tunmeter::time::unix_ms()).await.unwrap();
    w.commit().await.unwrap();
    tasks.abort();
    drop(l);
    let (l, tasks) = open(url, "node-a", &src).await;
    l.poll_once().await.unwrap();
    l.flush().await.unwrap();
    let s = stored(&l.db, "node-a").await;
    for ip in [a, b] {
        assert_eq!(s[&ip].0.up_bytes + s[&ip].0.down_bytes, src.ever(ip), "{ip} after a crash in a new epoch");
    }

    // 6. History: every granularity sums to the total; peaks are the maximum poll rate.
    for g in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
        let (t, _) = history_sum(&l.db, "node-a", a, g).await;
        assert_eq!(t.up_bytes + t.down_bytes, src.ever(a), "{g:?} history sum");
    }
    let (_, pm) = history_sum(&l.db, "node-a", a, Granularity::Minute).await;
    let (_, ph) = history_sum(&l.db, "node-a", a, Granularity::Hour).await;
    assert_eq!(pm, ph, "hour peak = max of minute peaks");
    // Once the hours and days are over, they are rolled up into their own rows: the same sums
    // and peaks, read from those rows now.
    let later = tunmeter::time::unix_ms() + 3 * 86_400_000;
    store::roll_up(&l.db, "node-a", later).await.unwrap();
    store::roll_up(&l.db, "node-a", later).await.unwrap();
    let rolled: i64 = sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM usage_day WHERE node_id = 'node-a'")
        .fetch_one(&l.db.pool)
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert!(rolled >= 1, "day rows rolled up");
    for g in [Granularity::Hour, Granularity::Day] {
        let (t, p) = history_sum(&l.db, "node-a", a, g).await;
        assert_eq!(t.up_bytes + t.down_bytes, src.ever(a), "{g:?} history sum after the roll-up");
        assert_eq!(p, pm, "{g:?} peak after the roll-up");
    }
    // A late batch for a rolled-up hour (as after an outage) is rolled up again.
    add(a, 11, 0);
    l.poll_once().await.unwrap();
    l.flush().await.unwrap();
    store::roll_up(&l.db, "node-a", later).await.unwrap();
    let (t, _) = history_sum(&l.db, "node-a", a, Granularity::Day).await;
    assert_eq!(t.up_bytes + t.down_bytes, src.ever(a), "day history after a late batch");

    // 7. Another node in the same database is separate.
    let src2 = Arc::new(Scripted::default());
    src2.new_epoch("other");
    src2.add(a, 1, 1);
    let (l2, _t2) = open(url, "node-b", &src2).await;
    l2.poll_once().await.unwrap();
    l2.flush().await.unwrap();
    assert_eq!(stored(&l.db, "node-b").await[&a].0.up_bytes, 1);
    assert_eq!(
        stored(&l.db, "node-a").await[&a].0.up_bytes + stored(&l.db, "node-a").await[&a].0.down_bytes,
        src.ever(a)
    );

    // 8. Shutdown (the tasks' token cancelled) takes a last reading and flushes.
    add(b, 1234, 0);
    tokio::time::timeout(Duration::from_secs(10), tasks.shutdown(Duration::from_secs(5)))
        .await
        .expect("tasks end after shutdown");
    let s = stored(&l.db, "node-a").await;
    assert_eq!(s[&b].0.up_bytes + s[&b].0.down_bytes, src.ever(b), "shutdown flushed");
    assert!(matches!(l.reset(b).await, Err(LedgerError::ShuttingDown)), "no resets after shutdown");
}

/// SQLite "down": another process holds the write lock (as a stuck backup or a full disk
/// would stop writes).
struct SqliteLock {
    path: std::path::PathBuf,
    holder: Option<support::sqlite::SqliteLock>,
}

impl Outage for SqliteLock {
    fn down(&mut self) {
        self.holder = Some(support::sqlite::SqliteLock::take(&self.path));
    }
    fn up(&mut self) {
        self.holder = None;
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn sqlite_ledger_loses_and_doubles_nothing() {
    let db = support::sqlite::SqliteFile::new("ledger");
    let mut outage = SqliteLock { path: db.path.clone(), holder: None };
    rt().block_on(scenario(&db.url, &mut outage));
    outage.up();
}

struct PgOutage<'a>(&'a mut support::postgres::Postgres);

impl Outage for PgOutage<'_> {
    fn down(&mut self) {
        self.0.stop();
    }
    fn up(&mut self) {
        self.0.start();
    }
}

#[test]
fn postgres_ledger_loses_and_doubles_nothing() {
    if !support::require_root() || !support::postgres::require_postgres() {
        return;
    }
    let mut pg = support::postgres::Postgres::start_new();
    let url = pg.url();
    rt().block_on(scenario(&url, &mut PgOutage(&mut pg)));
}

/// A stored client's row is written again whole if it is gone from the database (deleted behind
/// the daemon's back): a flush of a stored row first updates only its moving columns, and must
/// notice that the update found no row.
#[test]
fn a_stored_row_deleted_behind_the_ledgers_back_is_written_again() {
    let db = support::sqlite::SqliteFile::new("ledger-deleted");
    rt().block_on(async {
        let (a, b): (IpAddr, IpAddr) = ("10.8.0.2".parse().unwrap(), "10.8.0.3".parse().unwrap());
        let src = Arc::new(Scripted::default());
        src.new_epoch("boot1/7");
        let (l, mut tasks) = open(&db.url, "node-a", &src).await;
        src.add(a, 1000, 5000);
        src.add(b, 7, 9);
        l.poll_once().await.unwrap();
        l.flush().await.unwrap();
        l.reset(a).await.expect("a reset moves a's base");
        src.add(a, 300, 0);
        src.add(b, 1, 1);
        l.poll_once().await.unwrap();
        l.flush().await.unwrap();
        sqlx::query("DELETE FROM clients WHERE ip = $1").bind(a.to_string()).execute(&l.db.pool).await.unwrap();
        src.add(a, 40, 2);
        src.add(b, 1, 1);
        l.poll_once().await.unwrap();
        l.flush().await.unwrap();
        let s = stored(&l.db, "node-a").await;
        for ip in [a, b] {
            let mem = l.client(ip).unwrap();
            assert_eq!(s.get(&ip), Some(&(mem.total, mem.base)), "{ip}: the stored row is the ledger's");
        }
        assert_eq!(s[&a].0.up_bytes + s[&a].0.down_bytes, src.ever(a));
        assert_ne!(s[&a].1, Totals::default(), "a's base after its reset");
        tasks.abort();
    });
}

#[tokio::test]
async fn bad_database_urls_are_clear_errors() {
    for (url, want) in [
        ("mysql://x@y/z", "bad database_url"),
        ("sqlite:///nonexistent-dir/sub/x.db", "cannot open database"),
        ("postgres://u:secret@127.0.0.1:1/db", "cannot open database"),
    ] {
        let e = match Database::open(url).await {
            Ok(_) => panic!("{url} opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{url}: {e}");
        assert!(!e.contains("secret"), "password shown: {e}");
    }
}

/// Opening the database a second time in this process (a restart, `token create` beside a
/// daemon) must not drop the POSIX locks SQLite holds on -shm: another process (here sqlite3
/// shells, one after another) would then take it as its first user and truncate it under our
/// mapping while we read it (SIGBUS, the whole process dies).
#[test]
fn a_second_open_keeps_the_shared_memory_locks() {
    let db = support::sqlite::SqliteFile::new("shm-locks");
    rt().block_on(async {
        let first = Database::open(&db.url).await.unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS t (x INTEGER)").execute(&first.pool).await.unwrap();
        let _second = Database::open(&db.url).await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (pool, stop) = (first.pool.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    sqlx::query("INSERT INTO t VALUES (1)").execute(&pool).await.unwrap();
                    n += 1;
                }
                n
            })
        };
        let path = db.path.clone();
        tokio::task::spawn_blocking(move || {
            for _ in 0..100 {
                let out = std::process::Command::new("sqlite3")
                    .arg(&path)
                    .arg("PRAGMA busy_timeout=5000; SELECT count(*) FROM t;")
                    .output()
                    .expect("sqlite3 CLI (cargo xtask setup installs it)");
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
        })
        .await
        .unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = reader.await.unwrap();
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&first.pool).await.unwrap();
        assert_eq!(count as u64, n, "every insert of this process is there");
    });
}
