//! The daemon's HTTP API over real TCP inside a lab namespace: authentication and roles, error
//! bodies for bad input, OpenAPI, Prometheus metrics, and the live stream with a stalled
//! subscriber next to a healthy one.

use crate::support;

use std::{
    io::Write as _,
    net::TcpStream,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use serde_json::Value;
use support::{PinDir, daemon::Daemon, require_root};
use tunmeter::bpf::loader::PinnedMaps;
use tunmeter_common::ClientCounters;
use tunmeter_lab::{Lab, LabConfig, in_netns, traffic};

const PORT: u16 = 9107;

/// One HTTP request from inside `ns`; returns status, content type and body.
pub(crate) fn http(ns: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let shown = path.to_string();
    let (method, path, token) = (method.to_string(), path.to_string(), token.map(str::to_string));
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let client = reqwest::Client::new();
            let mut req = client
                .request(reqwest::Method::from_bytes(method.as_bytes())?, format!("http://127.0.0.1:{PORT}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.timeout(Duration::from_secs(20)).send().await?;
            let status = resp.status().as_u16();
            let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            Ok((status, ct, resp.text().await?))
        })
    })
    .unwrap_or_else(|e| panic!("{shown}: {e:#}"))
}

pub(crate) fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

pub(crate) fn token(state: &str, node: &str, role: &str) -> String {
    let out = std::process::Command::new(support::daemon::BIN)
        .args(["token", "create", "--role", role, "--name", role, "--state-dir", state, "--node-id", node])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().lines().last().unwrap().to_string()
}

/// Put `n` extra client entries straight into the kernel map, so stream frames are large.
fn fill_map(pins: &PinDir, n: u32) {
    let maps = PinnedMaps::new(pins.path());
    for i in 0..n {
        let ip = std::net::Ipv4Addr::new(10, 200, (i >> 8) as u8, i as u8).into();
        let v = ClientCounters { up_bytes: 1000 + u64::from(i), up_packets: 1, ..Default::default() };
        support::add_to_client(&maps, ip, &v);
    }
}

#[test]
fn api_auth_errors_metrics_and_a_stream_with_a_stalled_subscriber() {
    if !require_root() {
        return;
    }
    let lab = Lab::up(LabConfig { prefix: "tmla".into(), tun_clients: 1, eth_clients: 1 }).expect("lab");
    let ns = lab.server_ns();
    let pins = PinDir::new("tmla");
    let (state, log) = support::env::daemon_paths("tmla");
    let cfg = state.join("tunmeter.toml");
    let state = state.display().to_string();
    std::fs::write(&cfg, "[api]\nstream_stall_timeout_secs = 2\nmetrics_max_clients = 1000\n").unwrap();
    let pin = pins.path().display().to_string();
    let mut d = Daemon::start(
        &ns,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--tun",
            "tun0",
            "--egress",
            "eth0",
            "--subnet",
            "10.8.0.0/24",
            "--subnet",
            "10.9.0.0/24",
            "--pin-dir",
            &pin,
            "--state-dir",
            &state,
            "--node-id",
            "tmla",
            "--stream-interval-ms",
            "250",
            "--poll-interval-ms",
            "250",
        ],
        &log,
    );
    d.wait_log("API listening", 1, Duration::from_secs(30));
    let admin = token(&state, "tmla", "admin");
    let read = token(&state, "tmla", "read");
    traffic::mixed_round(&lab, 1).expect("traffic");
    std::thread::sleep(Duration::from_millis(600));

    // Health needs no token; everything else does.
    let (s, _, b) = http(&ns, "GET", "/healthz", None);
    assert_eq!((s, json(&b)["database"].as_str()), (200, Some("ok")));
    for path in ["/api/v1/clients", "/metrics", "/api/v1/stats", "/api/v1/openapi.json"] {
        let (s, _, b) = http(&ns, "GET", path, None);
        assert_eq!(s, 401, "{path} without a token: {b}");
        assert_eq!(json(&b)["error"]["code"], "unauthorized");
        let (s, _, _) = http(&ns, "GET", path, Some("tm_not-a-token"));
        assert_eq!(s, 401, "{path} with a bad token");
    }
    let (s, _, b) = http(&ns, "GET", "/api/v1/me", Some(&read));
    assert_eq!((s, json(&b)["role"].as_str()), (200, Some("read")));

    // The list has the lab's clients with totals and rates.
    let (s, ct, b) = http(&ns, "GET", "/api/v1/clients", Some(&read));
    assert_eq!(s, 200);
    assert!(ct.starts_with("application/json"), "{ct}");
    let v = json(&b);
    let c = v["clients"].as_array().unwrap().iter().find(|c| c["ip"] == "10.8.0.2").expect("10.8.0.2 listed");
    assert!(c["upload"]["bytes"].as_u64().unwrap() > 0 && c["online"] == true, "{c}");

    // Roles: a read token cannot reset; an admin token can.
    let (s, _, b) = http(&ns, "POST", "/api/v1/clients/10.8.0.2/reset", Some(&read));
    assert_eq!((s, json(&b)["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _, b) = http(&ns, "POST", "/api/v1/clients/10.8.0.2/reset", Some(&admin));
    assert_eq!(s, 200, "{b}");
    assert!(json(&b)["closed"]["upload"]["bytes"].as_u64().unwrap() > 0);

    // Bad input: 400 with the error body, unknown: 404; never a 500.
    for (method, path, want) in [
        ("GET", "/api/v1/clients/10.8.0.x", 400),
        ("GET", "/api/v1/clients/::ffff:10.8.0.2", 400),
        ("POST", "/api/v1/clients/banana/reset", 400),
        ("GET", "/api/v1/clients/10.8.0.99", 404),
        ("POST", "/api/v1/clients/10.8.0.99/reset", 404),
        ("GET", "/api/v1/clients/10.8.0.2/usage?granularity=week", 400),
        ("GET", "/api/v1/clients/10.8.0.2/usage?from=10&to=5", 400),
        ("GET", "/api/v1/clients/10.8.0.2/usage?from=abc", 400),
        ("GET", "/api/v1/clients/10.8.0.2/usage?from=0&to=99999999999999", 400),
        ("GET", "/api/v1/clients/10.8.0.2/usage?bogus=1", 400),
        ("GET", "/api/v1/nothing-here", 404),
        ("DELETE", "/api/v1/clients", 405),
        ("GET", "/api/v1/clients/10.8.0.2/reset", 405),
    ] {
        let (s, _, b) = http(&ns, method, path, Some(&admin));
        assert_eq!(s, want, "{method} {path}: {b}");
        assert!(json(&b)["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{path}: {b}");
    }
    let (s, _, b) = http(&ns, "GET", "/api/v1/clients/10.8.0.2/usage?granularity=minute", Some(&read));
    assert_eq!(s, 200, "{b}");
    assert!(!json(&b)["points"].as_array().unwrap().is_empty(), "history has the traffic: {b}");

    // OpenAPI describes the routes.
    let (s, _, b) = http(&ns, "GET", "/api/v1/openapi.json", Some(&read));
    assert_eq!(s, 200);
    let doc = json(&b);
    for p in ["/api/v1/clients", "/api/v1/clients/{ip}/reset", "/api/v1/clients/{ip}/usage", "/healthz"] {
        assert!(doc["paths"][p].is_object(), "{p} missing from OpenAPI");
    }

    // Many clients: per-client metrics are capped, the rest counted.
    fill_map(&pins, 5000);
    std::thread::sleep(Duration::from_millis(800));
    let (s, _, m) = http(&ns, "GET", "/metrics", Some(&read));
    assert_eq!(s, 200);
    let series = m.lines().filter(|l| l.starts_with("tunmeter_client_bytes_total{")).count();
    assert_eq!(series, 2000, "1000 clients x 2 directions");
    let unlabelled: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("tunmeter_clients_unlabelled "))
        .and_then(|v| v.trim().parse().ok())
        .expect("tunmeter_clients_unlabelled");
    assert!(unlabelled >= 4000, "{unlabelled}");
    for name in [
        "tunmeter_packets_total{",
        "tunmeter_poll_duration_seconds_bucket",
        "tunmeter_flush_duration_seconds_count",
        "tunmeter_ledger_pending_rows",
        "tunmeter_database_up 1",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }

    // Pages: walking `limit`/`after` yields the whole list once, in address order.
    let (_, _, b) = http(&ns, "GET", "/api/v1/clients", Some(&read));
    let whole: Vec<String> =
        json(&b)["clients"].as_array().unwrap().iter().map(|c| c["ip"].as_str().unwrap().to_string()).collect();
    let (mut walked, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let path = match &after {
            Some(a) => format!("/api/v1/clients?limit=1000&after={a}"),
            None => "/api/v1/clients?limit=1000".to_string(),
        };
        let (s, _, b) = http(&ns, "GET", &path, Some(&read));
        assert_eq!(s, 200, "{path}: {b}");
        let v = json(&b);
        let page = v["clients"].as_array().unwrap();
        assert!(page.len() <= 1000);
        walked.extend(page.iter().map(|c| c["ip"].as_str().unwrap().to_string()));
        pages += 1;
        match v["next_after"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
        assert!(pages < 100, "pages never end");
    }
    assert!(whole.len() >= 5000 && pages >= 5, "{} clients in {pages} pages", whole.len());
    let mut sorted_whole: Vec<std::net::IpAddr> = whole.iter().map(|s| s.parse().unwrap()).collect();
    sorted_whole.sort();
    let walked: Vec<std::net::IpAddr> = walked.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(walked, sorted_whole, "the pages are the whole list, in order, once (clients may change between)");
    for bad in ["/api/v1/clients?limit=0", "/api/v1/clients?limit=10001", "/api/v1/clients?after=banana"] {
        assert_eq!(http(&ns, "GET", bad, Some(&read)).0, 400, "{bad}");
    }

    // The stream opens with a single-use ticket (a token in the URL is refused everywhere).
    let ticket = || {
        let (s, _, b) = http(&ns, "POST", "/api/v1/stream/ticket", Some(&read));
        assert_eq!(s, 201, "{b}");
        json(&b)["ticket"].as_str().unwrap().to_string()
    };
    // The stream: one subscriber stops reading (its buffers fill with ~0.5 MB frames), another
    // keeps receiving every frame on time, and the stalled one is disconnected.
    let stalled_token = ticket();
    let stalled: TcpStream = in_netns(&ns, move || {
        let mut s = TcpStream::connect(("127.0.0.1", PORT))?;
        write!(
            s,
            "GET /api/v1/stream?ticket={stalled_token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        Ok(s)
    })
    .unwrap();
    let good_token = ticket();
    let good = std::thread::spawn({
        let ns = ns.clone();
        move || {
            in_netns(&ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let url = format!("ws://127.0.0.1:{PORT}/api/v1/stream?ticket={good_token}");
                    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
                    let (mut frames, mut max_gap, mut last, mut rows) = (0u32, Duration::ZERO, Instant::now(), 0);
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(12) {
                        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next()).await?;
                        let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) = msg else { continue };
                        let v: Value = serde_json::from_str(t.as_str())?;
                        rows = v["rows"].as_array().map_or(0, |r| r.len());
                        frames += 1;
                        max_gap = max_gap.max(last.elapsed());
                        last = Instant::now();
                    }
                    Ok((frames, max_gap, rows))
                })
            })
        }
    });
    // Both subscribe; then the stalled one is dropped.
    let subscribers =
        || json(&http(&ns, "GET", "/api/v1/stats", Some(&read)).2)["stream_subscribers"].as_i64().unwrap();
    let t0 = Instant::now();
    let mut saw_two = false;
    let mut dropped_after = None;
    while t0.elapsed() < Duration::from_secs(11) {
        let n = subscribers();
        saw_two |= n == 2;
        if saw_two && n == 1 {
            dropped_after = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (frames, max_gap, rows) = good.join().unwrap().expect("healthy subscriber");
    drop(stalled);
    assert!(saw_two, "both subscribers were never connected at once");
    let dropped_after = dropped_after.expect("the stalled subscriber was never disconnected");
    assert!(rows >= 5000, "frames carry every client ({rows})");
    assert!(frames >= 25, "the healthy subscriber got only {frames} frames in 12 s at 250 ms");
    assert!(max_gap < Duration::from_secs(2), "the healthy subscriber waited {max_gap:?} for a frame");
    assert!(d.log_text().contains("stream subscriber stalled"), "{}", d.log_text());
    eprintln!("stalled subscriber dropped after {dropped_after:?}; healthy one: {frames} frames, max gap {max_gap:?}");
    let _ = std::fs::remove_dir_all(&state);
}
