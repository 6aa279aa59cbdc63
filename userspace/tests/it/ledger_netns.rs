//! The ledger and API of the real daemon, against real traffic in the namespace lab, checked
//! against the independent nftables oracle: 1,000 resets under traffic, kill -9, a PostgreSQL
//! outage, a new kernel epoch; and the API's auth, errors, metrics and live stream.

use crate::support;

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{daemon::Daemon, require_root};
use tunmeter::{db::Database, ledger::store};
use tunmeter_lab::{
    oracle::{Direction, OracleCounts},
    traffic,
};

type Env = support::env::LabEnv;

/// Fast polls and flushes, so tests wait little.
const FAST: [&str; 4] = ["--poll-interval-ms", "200", "--flush-interval-ms", "500"];

/// The daemon's API through its control socket, and waiting for the ledger.
trait Ledgered {
    fn control(&self, method: &str, path: &str) -> (u16, Value);
    fn settle(&self);
    fn start(&self, extra: &[&str]) -> Daemon;
}

impl Ledgered for Env {
    fn start(&self, extra: &[&str]) -> Daemon {
        self.start_daemon(&[&FAST[..], extra].concat())
    }

    /// A request on the daemon's local control socket (acts as admin).
    fn control(&self, method: &str, path: &str) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let m = hyper::Method::from_bytes(method.as_bytes()).unwrap();
        let (status, body) = rt
            .block_on(tunmeter::control::request(&self.state, m, path, 30))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }

    /// Wait until the daemon has polled and flushed at least twice more.
    fn settle(&self) {
        let flushes = |env: &Env| env.control("GET", "/api/v1/stats").1["ledger"]["flush_cycles"].as_u64().unwrap_or(0);
        let start = flushes(self);
        let t0 = Instant::now();
        while flushes(self) < start + 2 {
            assert!(t0.elapsed() < Duration::from_secs(20), "the ledger stopped flushing");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An oracle reading taken while nothing moves (two equal readings in a row).
fn quiet_oracle(env: &Env) -> OracleCounts {
    let mut prev = env.oracle.read().unwrap();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(300));
        let now = env.oracle.read().unwrap();
        if now == prev {
            return now;
        }
        prev = now;
    }
    panic!("traffic never went quiet");
}

/// [up bytes, up packets, down bytes, down packets] of a client in the oracle.
fn oracle_of(o: &OracleCounts, dev: &str, ip: IpAddr) -> [u64; 4] {
    let u = o.client(dev, ip, Direction::Ingress);
    let d = o.client(dev, ip, Direction::Egress);
    [u.bytes, u.packets, d.bytes, d.packets]
}

fn four(v: &Value) -> [u64; 4] {
    let g = |a: &str, b: &str| v[a][b].as_u64().unwrap_or_else(|| panic!("{a}.{b} in {v}"));
    [g("upload", "bytes"), g("upload", "packets"), g("download", "bytes"), g("download", "packets")]
}

fn minus(a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]]
}

fn plus(a: [u64; 4], b: [u64; 4]) -> [u64; 4] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3]]
}

/// Wait until the ledger knows every lab client.
fn wait_clients_known(env: &Env) {
    let t0 = Instant::now();
    loop {
        let (_, v) = env.control("GET", "/api/v1/clients");
        let known: Vec<String> =
            v["clients"].as_array().unwrap().iter().map(|c| c["ip"].as_str().unwrap().to_string()).collect();
        if env.clients().iter().all(|(_, ip)| known.contains(&ip.to_string())) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "clients never appeared in the ledger: {known:?}");
        traffic::mixed_round(&env.lab, 1).expect("traffic");
    }
}

#[test]
fn a_thousand_resets_under_traffic_sum_to_the_nftables_counters() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmlr", 2, 1);
    let _d = env.start(&[]);
    wait_clients_known(&env);

    // While nothing moves: reset every client once; from here on, the closed periods plus the
    // current one must equal what nftables counts.
    let base = quiet_oracle(&env);
    std::thread::sleep(Duration::from_millis(500));
    for (_, ip) in env.clients() {
        let (s, v) = env.control("POST", &format!("/api/v1/clients/{ip}/reset"));
        assert_eq!(s, 200, "{v}");
    }

    let bg =
        traffic::background_with(env.lab.targets(), traffic::RoundSpec::scaled(1), Duration::from_millis(10)).unwrap();
    let targets: Vec<(String, IpAddr)> = env.clients().into_iter().take(4).collect();
    let mut closed: HashMap<IpAddr, [u64; 4]> = HashMap::new();
    let t0 = Instant::now();
    for i in 0..1000 {
        let (_, ip) = targets[i % targets.len()];
        let (s, v) = env.control("POST", &format!("/api/v1/clients/{ip}/reset"));
        assert_eq!(s, 200, "reset {i} of {ip}: {v}");
        let c = closed.entry(ip).or_default();
        *c = plus(*c, four(&v["closed"]));
        assert!(t0.elapsed() < Duration::from_secs(240), "1000 resets took too long ({i} done)");
    }
    let took = t0.elapsed();
    let st = bg.stop();
    assert_eq!(st.errors, 0, "traffic errors: {:?}", st.last_error);
    assert!(st.rounds >= 5, "only {} rounds of traffic during the resets", st.rounds);
    let after = quiet_oracle(&env);
    env.settle();

    for (dev, ip) in env.clients() {
        let (s, v) = env.control("GET", &format!("/api/v1/clients/{ip}"));
        assert_eq!(s, 200, "{v}");
        let period = four(&v);
        let sum = plus(closed.get(&ip).copied().unwrap_or_default(), period);
        let oracle = minus(oracle_of(&after, &dev, ip), oracle_of(&base, &dev, ip));
        assert_eq!(sum, oracle, "{ip}: closed periods + current period vs nftables (up B/p, down B/p)");
        assert!(oracle[1] > 0 && oracle[3] > 0, "{ip}: no traffic");
    }
    // Each reset is recorded with the usage it closed.
    for (_, ip) in &targets {
        let (_, v) = env.control("GET", &format!("/api/v1/clients/{ip}/resets"));
        let rs = v["resets"].as_array().unwrap();
        assert_eq!(rs.len(), 251, "{ip}: 250 resets under traffic + 1 before");
        let recorded = rs.iter().take(250).fold([0; 4], |a, r| plus(a, four(&r["closed"])));
        assert_eq!(recorded, closed[ip], "{ip}: recorded resets");
    }
    eprintln!("1000 resets under traffic in {took:?}, {} traffic rounds", st.rounds);
}

/// Ledger totals per client from the database itself.
fn db_totals(url: &str, node: &str) -> HashMap<IpAddr, [u64; 4]> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let db = Database::open(url).await.unwrap();
        let rows = store::load_clients(&db, node).await.unwrap();
        db.pool.close().await;
        rows.into_iter()
            .map(|(ip, c)| (ip, [c.total.up_bytes, c.total.up_packets, c.total.down_bytes, c.total.down_packets]))
            .collect()
    })
}

fn assert_ledger_matches(
    env: &Env,
    url: &str,
    before: (&OracleCounts, &HashMap<IpAddr, [u64; 4]>),
    after: &OracleCounts,
    what: &str,
) -> HashMap<IpAddr, [u64; 4]> {
    let now = db_totals(url, &env.node);
    for (dev, ip) in env.clients() {
        let ledger = minus(now.get(&ip).copied().unwrap_or_default(), before.1.get(&ip).copied().unwrap_or_default());
        let oracle = minus(oracle_of(after, &dev, ip), oracle_of(before.0, &dev, ip));
        assert_eq!(ledger, oracle, "{what}: {ip} ledger vs nftables (up B/p, down B/p)");
        assert!(oracle[1] > 0, "{what}: {ip} had no traffic");
    }
    now
}

#[test]
fn postgres_ledger_equals_nftables_across_kill_9_an_outage_and_a_new_epoch() {
    if !require_root() || !support::postgres::require_postgres() {
        return;
    }
    let mut pg = support::postgres::Postgres::start_new();
    // The daemon runs in the lab's namespace: it reaches the server through its unix socket.
    let url = pg.socket_url();
    let env = Env::new("tmlp", 2, 1);
    let extra = ["--database-url", url.as_str()];
    let mut d = env.start(&extra);
    wait_clients_known(&env);
    let o0 = quiet_oracle(&env);
    env.settle();
    let l0 = db_totals(&pg.url(), &env.node);

    // Under traffic: kill -9, restart, then the database goes away and comes back.
    let bg =
        traffic::background_with(env.lab.targets(), traffic::RoundSpec::scaled(1), Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    d.kill9();
    std::thread::sleep(Duration::from_millis(1000));
    let mut d = env.start(&extra);
    std::thread::sleep(Duration::from_millis(1000));
    pg.stop();
    let t0 = Instant::now();
    loop {
        let (_, h) = env.control("GET", "/healthz");
        if h["database"] == "down" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "daemon never noticed the database was down: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Resets are refused, not half-done, while it is down.
    let ip = env.clients()[0].1;
    let (s, v) = env.control("POST", &format!("/api/v1/clients/{ip}/reset"));
    assert_eq!(s, 503, "reset with the database down: {v}");
    std::thread::sleep(Duration::from_millis(2000));
    pg.start();
    let t0 = Instant::now();
    loop {
        let (_, h) = env.control("GET", "/healthz");
        if h["database"] == "ok" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "daemon never caught up with the database: {h}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = bg.stop();
    // (A late ping reply under load is not an error of ours: the oracle counts what happened.)
    assert!(st.rounds >= 3, "only {} rounds of traffic; last error {:?}", st.rounds, st.last_error);
    let o1 = quiet_oracle(&env);
    env.settle();
    let l1 = assert_ledger_matches(&env, &pg.url(), (&o0, &l0), &o1, "kill -9 and a database outage");
    assert!(d.log_text().contains("database is back"), "{}", d.log_text());

    // A new kernel epoch: the pins are removed (as a reboot would), the next start gets a new
    // map whose counts start from zero; they are new usage, not a reset or a wrap.
    assert!(d.stop().is_some_and(|s| s.success()));
    let out = support::daemon::output(
        &env.lab.server_ns(),
        &[
            "detach",
            "--pin-dir",
            &env.pins.path().display().to_string(),
            "--state-dir",
            &env.state.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = env.start(&extra);
    traffic::mixed_round(&env.lab, 2).expect("traffic");
    let o2 = quiet_oracle(&env);
    env.settle();
    assert_ledger_matches(&env, &pg.url(), (&o1, &l1), &o2, "new epoch");
    assert!(d.log_text().contains("kernel counter map is new"), "{}", d.log_text());
}
