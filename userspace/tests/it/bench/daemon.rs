//! Section 3: the daemon's poll + ledger cost with 0, 10,000 and 100,000 clients all active at
//! every poll, on SQLite and (100,000) on PostgreSQL (CPU, RSS, poll and flush times, the
//! PostgreSQL server's CPU), and `GET /api/v1/clients` latency; the writer's cost is not counted.

use super::daemon_lab::{DaemonLab, NODE_ID, Traffic, clk_tck, cpu_ticks, thread_ticks, try_cpu_ticks, vm_mib};
use super::*;

// The real `tunmeter run` (the release binary under `cargo xtask bench`) in a network namespace
// of its own with a persistent tun device, its own pins and state, and the default SQLite
// ledger, poll interval and flush interval. This process writes N client entries
// into the pinned CLIENT_COUNTERS map and bumps every one of them once a second (the worst
// case: every client active at every poll); its own cost is not the daemon's.

/// Targets.
const CPU_TARGET_PCT: f64 = 10.0;
const RSS_TARGET_MIB: f64 = 64.0;
/// The targets at 1,000,000 clients (a run with `TM_BENCH_CLIENTS=1000000`).
const CPU_TARGET_1M_PCT: f64 = 60.0;
const RSS_TARGET_1M_MIB: f64 = 384.0;

/// (CPU %, RSS MiB) targets at `n` clients.
fn targets(n: u32) -> (f64, f64) {
    if n > 100_000 { (CPU_TARGET_1M_PCT, RSS_TARGET_1M_MIB) } else { (CPU_TARGET_PCT, RSS_TARGET_MIB) }
}
const API_P99_TARGET_MS: f64 = 20.0;

/// From the moment every client exists until the measured window starts, at least: the first
/// polls and the first flush (every row new) happen here (see `warmup`).
const WARMUP: Duration = Duration::from_secs(10);

/// The measured window: several flushes at the default flush interval, and a whole minute, so
/// that one minute boundary (where every client's minute of usage ends and waits for the next
/// flush beside the new one) is always inside it.
const WINDOW: Duration = Duration::from_secs(61);

/// The daemon's default poll and flush intervals, as `tunmeter run` without a config file has
/// them.
fn default_intervals() -> (Duration, Duration) {
    let cfg = tunmeter::config::Config::load_settings(
        std::path::Path::new("/nonexistent/tunmeter-bench.toml"),
        false,
        &tunmeter::config::Overrides { node_id: Some(NODE_ID.into()), ..Default::default() },
    )
    .expect("default settings");
    (Duration::from_millis(cfg.ledger.poll_interval_ms), Duration::from_millis(cfg.ledger.flush_interval_ms))
}

/// Warm-up: WARMUP, and at least one flush interval and 5 s, so the first flush (every row new)
/// is over before the window starts.
fn warmup() -> Duration {
    WARMUP.max(default_intervals().1 + Duration::from_secs(5))
}

const API_REQUESTS: usize = 300;

/// What one daemon run measured.
struct DaemonCost {
    clients: u32,
    /// "SQLite" or "PostgreSQL".
    engine: &'static str,
    /// The PostgreSQL server's own CPU (all its processes) over the window, share of one core.
    db_cpu_pct: Option<f64>,
    cpu_pct: f64,
    /// CPU share of one core per thread name, largest first.
    threads: Vec<(String, f64)>,
    rss_mib: f64,
    hwm_mib: f64,
    /// VmRSS at the end by kind: anonymous (the daemon's heap and stacks), file (the binary, and
    /// the counter slots' first chunk), shared memory.
    rss_split: (f64, f64, f64),
    polls: u64,
    /// last_poll_ms samples of /api/v1/stats, one a second.
    poll_ms: Vec<f64>,
    /// last_flush_ms of each flush that ended in the window.
    flush_ms: Vec<f64>,
    /// If no flush ended in the window: how long the first one took, waited for afterwards.
    late_flush_ms: Option<f64>,
    max_pending: u64,
    /// The slowest round of N map updates by this process (must stay under 1 s).
    bump_ms: f64,
    /// `GET /api/v1/clients` while every client is active, then after the activity stopped.
    api: Option<(ApiLatency, ApiLatency)>,
    /// The whole list walked in pages while every client is active (100,000 clients).
    pages: Option<PageWalk>,
}

/// Pages of PAGE clients, walked with `after` until the last.
struct PageWalk {
    pages: usize,
    clients: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    total_ms: f64,
}

const PAGE: usize = 1000;

fn page_walk(lab: &DaemonLab) -> PageWalk {
    lab.api(|api| {
        let (mut ms, mut clients, mut after) = (Vec::new(), 0, None::<String>);
        let t_all = std::time::Instant::now();
        loop {
            let path = match &after {
                Some(a) => format!("/api/v1/clients?limit={PAGE}&after={a}"),
                None => format!("/api/v1/clients?limit={PAGE}"),
            };
            let t0 = std::time::Instant::now();
            let v = api.get_json(&path);
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            clients += v["clients"].as_array().unwrap().len();
            match v["next_after"].as_str() {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        let total_ms = t_all.elapsed().as_secs_f64() * 1000.0;
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        PageWalk {
            pages: ms.len(),
            clients,
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: *ms.last().unwrap(),
            total_ms,
        }
    })
}

struct ApiLatency {
    clients: usize,
    bytes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Percentile (nearest rank) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// API_REQUESTS sequential `GET /api/v1/clients`, each timed until its last body byte.
fn api_latency(lab: &DaemonLab) -> ApiLatency {
    lab.api(|api| {
        // Outside the timing: the response is complete and well-formed.
        let list = api.get_json("/api/v1/clients");
        let clients = list["clients"].as_array().unwrap().len();
        let mut ms = Vec::with_capacity(API_REQUESTS);
        let mut bytes = 0;
        for _ in 0..API_REQUESTS {
            let t0 = std::time::Instant::now();
            let (status, len) = api.get_len("/api/v1/clients");
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200);
            bytes = len;
        }
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        ApiLatency {
            clients,
            bytes,
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: *ms.last().unwrap(),
        }
    })
}

/// How long to wait after the window for a first flush that had not ended in it.
const LATE_FLUSH_WAIT: Duration = Duration::from_secs(120);

/// utime + stime of every PostgreSQL server process, by pid.
fn postgres_ticks() -> std::collections::BTreeMap<u32, u64> {
    let mut m = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres") {
            // A process that exits meanwhile (an autovacuum worker) is left out.
            if let Some(t) = try_cpu_ticks(pid) {
                m.insert(pid, t);
            }
        }
    }
    m
}

fn daemon_run(n: u32, measure_api: bool, pg: Option<&support::postgres::Postgres>) -> DaemonCost {
    let url = pg.map(|pg| {
        let db = format!("tmbench{n}");
        pg.create_database(&db);
        pg.socket_db_url(&db)
    });
    let lab = DaemonLab::start(&n.to_string(), n, url.as_deref());
    let pid = lab.pid();
    let traffic = (n > 0).then(|| Traffic::start(lab.pins.path(), n));
    std::thread::sleep(warmup());

    let db0 = pg.map(|_| postgres_ticks());
    let (ticks, threads0, threads1, window, start_ms, samples) = lab.api(move |api| {
        let (c0, th0, t0) = (cpu_ticks(pid), thread_ticks(pid), std::time::Instant::now());
        let start_ms = tunmeter::time::unix_ms();
        let mut samples = Vec::new();
        let mut next = t0;
        while t0.elapsed() < WINDOW {
            next += Duration::from_secs(1);
            while std::time::Instant::now() < next {
                std::thread::sleep(Duration::from_millis(10));
            }
            samples.push(api.get_json("/api/v1/stats")["ledger"].clone());
        }
        (cpu_ticks(pid) - c0, th0, thread_ticks(pid), t0.elapsed(), start_ms, samples)
    });
    let share = |ticks: u64| 100.0 * ticks as f64 / clk_tck() / window.as_secs_f64();
    let cpu_pct = share(ticks);
    let db_cpu_pct = db0.map(|db0| {
        let db1 = postgres_ticks();
        share(db1.iter().map(|(pid, t)| t.saturating_sub(db0.get(pid).copied().unwrap_or(0))).sum())
    });
    let mut threads: Vec<(String, f64)> = threads1
        .iter()
        .map(|(name, t)| (name.clone(), share(t - threads0.get(name).copied().unwrap_or(0).min(*t))))
        .filter(|(_, pct)| *pct >= 0.05)
        .collect();
    threads.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    let (rss_mib, hwm_mib) = (vm_mib(pid, "VmRSS:"), vm_mib(pid, "VmHWM:"));
    let rss_split = (vm_mib(pid, "RssAnon:"), vm_mib(pid, "RssFile:"), vm_mib(pid, "RssShmem:"));

    let mut flushes = std::collections::BTreeMap::new();
    for s in &samples {
        if let (Some(at), Some(ms)) = (s["last_flush_unix_ms"].as_u64(), s["last_flush_ms"].as_f64())
            && at >= start_ms
        {
            flushes.insert(at, ms);
        }
    }
    // With every client active the first flush (every row new) can outlast the window.
    let late_flush_ms = (n > 0 && flushes.is_empty()).then(|| {
        lab.api(move |api| {
            let t0 = std::time::Instant::now();
            while t0.elapsed() < LATE_FLUSH_WAIT {
                let l = api.get_json("/api/v1/stats")["ledger"].clone();
                if l["last_flush_unix_ms"].as_u64() >= Some(start_ms) {
                    return l["last_flush_ms"].as_f64();
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            None
        })
    });

    let api = measure_api.then(|| api_latency(&lab));
    let pages = (n >= 100_000).then(|| page_walk(&lab));
    let bump_ms = traffic.map_or(0.0, |t| t.stop().as_secs_f64() * 1000.0);
    let api = api.map(|busy| {
        // Quiet: no client moves, so polls change nothing and flushes have nothing to write
        // once the last activity is written.
        std::thread::sleep(Duration::from_secs(7));
        (busy, api_latency(&lab))
    });

    // Functional checks: the ledger saw every client and never failed.
    let last = samples.last().expect("samples");
    assert_eq!(last["clients"].as_u64(), Some(n as u64), "the ledger holds every client: {last}");
    assert_eq!(last["database"], "ok", "{last}");
    assert_eq!(last["poll_errors"].as_u64(), Some(0), "{last}");
    assert_eq!(last["flush_errors"].as_u64(), Some(0), "{last}");
    if let Some((busy, quiet)) = &api {
        assert_eq!((busy.clients, quiet.clients), (n as usize, n as usize), "GET /api/v1/clients lists every client");
    }
    if let Some(p) = &pages {
        assert_eq!(p.clients, n as usize, "the pages hold every client");
    }
    let polls = last["polls"].as_u64().unwrap() - samples[0]["polls"].as_u64().unwrap();
    let poll_ms = samples.iter().filter_map(|s| s["last_poll_ms"].as_f64()).collect();
    let max_pending = samples.iter().filter_map(|s| s["pending_rows"].as_u64()).max().unwrap_or(0);
    DaemonCost {
        clients: n,
        engine: if pg.is_some() { "PostgreSQL" } else { "SQLite" },
        db_cpu_pct,
        cpu_pct,
        threads,
        rss_mib,
        hwm_mib,
        rss_split,
        polls,
        poll_ms,
        flush_ms: flushes.into_values().collect(),
        late_flush_ms: late_flush_ms.flatten(),
        max_pending,
        bump_ms,
        api,
        pages,
    }
}

pub(super) fn daemon_cost() {
    // TM_BENCH_CLIENTS=100000,100000pg,1000000 (a comma list; "pg": on PostgreSQL) runs only
    // those (a partial run).
    let counts: Vec<(u32, bool)> = std::env::var("TM_BENCH_CLIENTS")
        .ok()
        .map(|v| {
            v.split(',')
                .map(|n| {
                    let (n, pg) = n.trim().strip_suffix("pg").map_or((n.trim(), false), |n| (n, true));
                    (n.parse().expect("TM_BENCH_CLIENTS: client counts"), pg)
                })
                .collect()
        })
        .unwrap_or_else(|| vec![(0, false), (10_000, false), (100_000, false), (100_000, true)]);
    let pg = counts.iter().any(|(_, pg)| *pg).then(support::postgres::Postgres::start_new);
    let runs: Vec<DaemonCost> = counts
        .into_iter()
        .map(|(n, on_pg)| daemon_run(n, n == 10_000 && !on_pg, pg.as_ref().filter(|_| on_pg)))
        .collect();
    drop(pg);
    let (poll, flush) = default_intervals();
    println!(
        "## The daemon: poll + ledger cost (real `tunmeter run`, SQLite or PostgreSQL ledger, defaults: poll every \
         {} ms, flush every {} ms)",
        poll.as_millis(),
        flush.as_millis()
    );
    println!("Every client's counters change every second (worst case: every client active at every poll).");
    println!(
        "{} s warm-up, then {} s measured: CPU = utime + stime of the daemon over wall time (100% = one core);",
        warmup().as_secs(),
        WINDOW.as_secs()
    );
    println!("RSS = VmRSS at the end, peak = VmHWM. Poll and flush times are the ledger's own (`GET /api/v1/stats`,");
    println!(
        "sampled every second): poll = read the whole map + fold it in; flush = write everything pending (a \
         transaction per 5,000 clients)."
    );
    println!(
        "Targets, at 10,000 and 100,000 clients: CPU < {CPU_TARGET_PCT:.0}% of one core, RSS < {RSS_TARGET_MIB:.0} MiB \
         (judged on the peak); at 1,000,000: < {CPU_TARGET_1M_PCT:.0}% and < {RSS_TARGET_1M_MIB:.0} MiB."
    );
    println!();
    println!(
        "| clients | ledger | CPU (one core) | RSS | peak RSS | CPU target | RSS target | polls | poll ms (median / max) \
         | flushes | flush ms (mean / max) | pending rows (max) | PostgreSQL server CPU |"
    );
    println!("|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let mut poll = r.poll_ms.clone();
        poll.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let poll_txt = if poll.is_empty() {
            "-".into()
        } else {
            format!("{:.1} / {:.1}", median(poll.clone()), poll[poll.len() - 1])
        };
        let flush_txt = if r.flush_ms.is_empty() {
            match r.late_flush_ms {
                Some(ms) => format!("none ended; the one running took {ms:.0}"),
                None if r.clients > 0 => {
                    format!("none ended, nor in {} s more", LATE_FLUSH_WAIT.as_secs())
                }
                None => "-".into(),
            }
        } else {
            let mean = r.flush_ms.iter().sum::<f64>() / r.flush_ms.len() as f64;
            format!("{mean:.0} / {:.0}", r.flush_ms.iter().cloned().fold(0.0, f64::max))
        };
        println!(
            "| {} | {} | {:.1}% | {:.1} MiB | {:.1} MiB | < {:.0}%: {} | < {:.0} MiB: {} \
             | {} | {poll_txt} | {} | {flush_txt} | {} | {} |",
            r.clients,
            r.engine,
            r.cpu_pct,
            r.rss_mib,
            r.hwm_mib,
            targets(r.clients).0,
            verdict(r.cpu_pct < targets(r.clients).0),
            targets(r.clients).1,
            verdict(r.hwm_mib < targets(r.clients).1),
            r.polls,
            r.flush_ms.len(),
            r.max_pending,
            r.db_cpu_pct.map_or("-".to_string(), |p| format!("{p:.1}%")),
        );
    }
    println!();
    println!("CPU by daemon thread in the same window (share of one core; names as the kernel shows them:");
    println!("tokio-rt-worker runs the async tasks and the blocking map reads, sqlx-sqlite-wor runs SQLite):");
    println!();
    for r in &runs {
        let threads: Vec<String> = r.threads.iter().map(|(name, pct)| format!("{name} {pct:.1}%")).collect();
        let threads = if threads.is_empty() { "-".into() } else { threads.join(", ") };
        println!("- {} clients, {}: {threads}", r.clients, r.engine);
    }
    println!();
    println!(
        "RSS at the end by kind (anonymous: the daemon's heap and stacks; file: its binary and libraries, and the first"
    );
    println!(
        "chunk of the counter slots: a poll maps 4,096 slots at a time and unmaps them once read; the map itself is kernel"
    );
    println!("memory, 64 bytes a slot of max_clients, allocated whether mapped or not):");
    println!();
    for r in &runs {
        let (anon, file, shmem) = r.rss_split;
        println!(
            "- {} clients, {}: anonymous {anon:.1} MiB, file {file:.1} MiB, shared {shmem:.1} MiB",
            r.clients, r.engine
        );
    }
    println!();
    let bumps: Vec<String> =
        runs.iter().filter(|r| r.clients > 0).map(|r| format!("{:.0} ms for {}", r.bump_ms, r.clients)).collect();
    println!("The bench process's slowest round of map updates: {} (a round must fit in 1 s).", bumps.join(", "));
    println!();
    for r in &runs {
        let Some((busy, quiet)) = &r.api else { continue };
        println!(
            "## API: `GET /api/v1/clients` with {} clients ({API_REQUESTS} sequential requests, read token, keep-alive,",
            r.clients
        );
        println!("from the daemon's namespace; timed to the last body byte)");
        println!("| clients | while | response size | p50 | p99 | max | p99 target |");
        println!("|---:|---|---:|---:|---:|---:|---|");
        for (a, when) in [(busy, "every client active (run above)"), (quiet, "no client activity")] {
            println!(
                "| {} | {when} | {:.2} MB | {:.1} ms | {:.1} ms | {:.1} ms | < {API_P99_TARGET_MS:.0} ms: {} |",
                a.clients,
                a.bytes as f64 / 1e6,
                a.p50_ms,
                a.p99_ms,
                a.max_ms,
                verdict(a.p99_ms < API_P99_TARGET_MS)
            );
        }
        println!();
    }
    for r in &runs {
        let Some(p) = &r.pages else { continue };
        println!(
            "## API: the client list in pages of {PAGE} (`?limit={PAGE}&after=`), {} clients, every one active, \
             walked once from the first page to the last (read token, keep-alive, timed to the last body byte)",
            r.clients
        );
        println!("| clients | pages | page p50 | page p99 | page max | whole walk |");
        println!("|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} ms |",
            p.clients, p.pages, p.p50_ms, p.p99_ms, p.max_ms, p.total_ms
        );
        println!();
    }
}
