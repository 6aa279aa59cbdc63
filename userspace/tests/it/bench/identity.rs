//! Section 6 of the benchmarks, identity: what OpenVPN waits for at each connect, `status 3`
//! parsing at scale, and webhook delivery from the durable outbox.
//!
//! - What OpenVPN waits for at every connect and disconnect: the wall time of the real
//!   `tunmeter hook openvpn` process against the real daemon (session durable before it
//!   answers), against the same binary's `--version` (process start alone) in the same run.
//! - `status 3` parsing with 1,000 and 10,000 clients (the reconcile pass of a big instance).
//! - Webhook delivery from the durable outbox to a local receiver: 2,000 events of one subject
//!   (strictly one after another) against 2,000 events over 100 subjects (up to 8 in flight).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tunmeter::{
    db::Database,
    identity::openvpn::status::parse_status,
    webhook::{Endpoint, Event, EventKind, Webhooks},
};
use tunmeter_lab::openvpn::{OvpnLab, OvpnLabConfig};

use crate::support::{PinDir, daemon::Daemon};

const HOOK_CALLS: usize = 100;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// Wall time of one process run in `ns`, in ms; panics unless it exits 0.
fn timed(ns: &str, args: &[&str], env: &[(&str, String)]) -> f64 {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}")).arg(crate::support::daemon::BIN).args(args).env_clear();
    c.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        c.env(k, v);
    }
    let t0 = Instant::now();
    let out = c.stdin(Stdio::null()).output().unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    ms
}

pub fn hook_latency() {
    let lab = OvpnLab::up(OvpnLabConfig::demo("tmbid", 0)).expect("OpenVPN lab up");
    let ns = lab.server_ns();
    let state = PathBuf::from(format!("/tmp/tmbench-state-tmbid-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).unwrap();
    let config = state.join("tunmeter.toml");
    std::fs::write(&config, tunmeter_lab::openvpn::daemon_config(true)).unwrap();
    let pins = PinDir::new("tmbid");
    let log = state.join("daemon.log");
    let (pin, st, cfg) = (pins.path().display().to_string(), state.display().to_string(), config.display().to_string());
    let mut d = Daemon::start(
        &ns,
        &["--config", &cfg, "--pin-dir", &pin, "--state-dir", &st, "--node-id", "tmbid", "--api-listen", ""],
        &log,
    );
    d.wait_log("ledger and API running", 1, Duration::from_secs(30));

    let env = |kind: &str, i: usize| {
        vec![
            ("script_type", kind.to_string()),
            ("dev", "tun0".to_string()),
            ("common_name", format!("bench{i}")),
            ("username", format!("bench{i}")),
            ("ifconfig_pool_remote_ip", format!("10.8.0.{}", 10 + i)),
            ("trusted_ip", format!("192.0.2.{}", 1 + i)),
            ("trusted_port", "40000".to_string()),
            ("time_unix", "1800000000".to_string()),
        ]
    };
    let hook = ["hook", "openvpn", "--state-dir", &st];
    let (mut connect, mut disconnect, mut version) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..HOOK_CALLS {
        version.push(timed(&ns, &["--version"], &[]));
        connect.push(timed(&ns, &hook, &env("client-connect", i)));
    }
    for i in 0..HOOK_CALLS {
        disconnect.push(timed(&ns, &hook, &env("client-disconnect", i)));
    }
    let (connect, disconnect, version) = (sorted(connect), sorted(disconnect), sorted(version));
    println!("\n## Identity: what OpenVPN waits for ({HOOK_CALLS} calls each, real daemon, SQLite)\n");
    println!("| process | p50 | p99 | max | p50 / `--version` p50 |");
    println!("|---|---:|---:|---:|---:|");
    for (what, v) in [
        ("`tunmeter --version` (process start only)", &version),
        ("`tunmeter hook openvpn` client-connect (session durable)", &connect),
        ("`tunmeter hook openvpn` client-disconnect (session closed)", &disconnect),
    ] {
        println!(
            "| {what} | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} |",
            percentile(v, 50.0),
            percentile(v, 99.0),
            v.last().unwrap(),
            percentile(v, 50.0) / percentile(&version, 50.0)
        );
    }
    assert!(d.stop().is_some_and(|s| s.success()));
    drop(pins);
    let _ = std::fs::remove_dir_all(&state);
    lab.down().unwrap();
}

fn status_text(n: usize) -> String {
    let mut t = String::from(
        "TITLE\tOpenVPN 2.6.14\nTIME\t2026-11-23 10:00:00\t1795400000\n\
         HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\t\
         Bytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher\n",
    );
    for i in 0..n {
        t.push_str(&format!(
            "CLIENT_LIST\tuser{i}\t198.51.{}.{}:{}\t10.{}.{}.{}\tfd00:8::{:x}\t{}\t{}\t2026-11-23 09:00:00\t1795396400\t\
             user{i}\t{i}\t{i}\tAES-256-GCM\n",
            i / 250,
            i % 250,
            30000 + i % 30000,
            8 + i / 65536,
            i / 256 % 256,
            i % 256,
            i + 2,
            i * 1000,
            i * 3000
        ));
    }
    t.push_str("GLOBAL_STATS\tMax bcast/mcast queue length\t0\nEND\n");
    t
}

pub fn status_parsing() {
    println!("\n## Identity: `status 3` parsing (median of 7)\n");
    println!("| clients | parse | per client | vs 1,000 clients per client |");
    println!("|---:|---:|---:|---:|");
    let mut base = None;
    for n in [1_000usize, 10_000] {
        let text = status_text(n);
        let mut ms: Vec<f64> = (0..7)
            .map(|_| {
                let t0 = Instant::now();
                let (clients, skipped) = parse_status(&text);
                let e = t0.elapsed().as_secs_f64() * 1e3;
                assert_eq!((clients.len(), skipped.len()), (n, 0));
                e
            })
            .collect();
        ms = sorted(ms);
        let per = ms[3] * 1e3 / n as f64;
        let b = *base.get_or_insert(per);
        println!("| {n} | {:.2} ms | {:.2} µs | {:.2} |", ms[3], per, per / b);
    }
}

const EVENTS: usize = 2_000;

pub fn webhook_throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let got = Arc::new(AtomicU64::new(0));
        let g = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| {
                let g = g.clone();
                async move {
                    assert!(!body.is_empty());
                    g.fetch_add(1, Ordering::SeqCst);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        // The floor: the same POSTs straight from one HTTP client, one after another.
        let client = reqwest::Client::builder().build().unwrap();
        let t0 = Instant::now();
        for i in 0..EVENTS {
            let r = client
                .post(format!("http://127.0.0.1:{port}/hook"))
                .header("content-type", "application/json")
                .body(serde_json::json!({"i": i}).to_string())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        let raw = EVENTS as f64 / t0.elapsed().as_secs_f64();
        println!("\n## Identity: webhook delivery from the outbox ({EVENTS} events, SQLite, local receiver)\n");
        println!("Plain sequential POSTs to the same receiver, without the outbox: {raw:.0} events/s.\n");
        println!(
            "| subjects | enqueue (own transaction each) | delivered after | events/s | vs 1 subject | attempts |"
        );
        println!("|---:|---:|---:|---:|---:|---:|");
        let mut base = None;
        for subjects in [1usize, 100] {
            let dir = std::env::temp_dir().join(format!("tmbench-hooks-{}-{subjects}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let db = Database::open(&format!("sqlite://{}/b.db?mode=rwc", dir.display())).await.unwrap();
            tunmeter::ledger::store::ensure_node(&db, "bench", 0).await.unwrap();
            let ep = Endpoint {
                name: "local".into(),
                url: format!("http://127.0.0.1:{port}/hook"),
                secret: b"0123456789abcdef0123".to_vec(),
                events: EventKind::ALL.to_vec(),
                timeout: Duration::from_secs(5),
                min_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                allow_private: true,
            };
            let hooks = Webhooks::new(db, "bench".into(), vec![ep]).await.unwrap();
            got.store(0, Ordering::SeqCst);
            let t0 = Instant::now();
            for i in 0..EVENTS {
                let ev = Event {
                    kind: EventKind::SessionOpened,
                    subject: format!("10.8.{}.{}", i % subjects / 256, i % subjects % 256),
                    data: serde_json::json!({"i": i}),
                };
                hooks.enqueue(&ev).await.unwrap();
            }
            let enqueued = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let mut worker = tunmeter::tasks::Tasks::new();
            hooks.spawn(&mut worker);
            while got.load(Ordering::SeqCst) < EVENTS as u64 {
                if t1.elapsed() > Duration::from_secs(120) {
                    let r =
                        sqlx::query("SELECT COUNT(*) AS n, MAX(error) AS e, MAX(status) AS s FROM webhook_attempts")
                            .fetch_one(&hooks.db().pool)
                            .await
                            .unwrap();
                    use sqlx::Row as _;
                    panic!(
                        "webhooks stalled at {}: attempts {} last error {:?} status {:?}",
                        got.load(Ordering::SeqCst),
                        r.get::<i64, _>("n"),
                        r.get::<Option<String>, _>("e"),
                        r.get::<Option<i64>, _>("s")
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let took = t1.elapsed().as_secs_f64();
            use sqlx::Row as _;
            let attempts: i64 = sqlx::query("SELECT COUNT(*) AS n FROM webhook_attempts")
                .fetch_one(&hooks.db().pool)
                .await
                .unwrap()
                .get("n");
            assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
            let rate = EVENTS as f64 / took;
            let b = *base.get_or_insert(rate);
            println!(
                "| {subjects} | {:.0} ms ({:.2} ms each) | {:.2} s | {:.0} | {:.2} | {attempts} |",
                enqueued * 1e3,
                enqueued * 1e3 / EVENTS as f64,
                took,
                rate,
                rate / b
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    });
}
