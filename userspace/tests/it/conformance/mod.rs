//! The API against its OpenAPI document and its security promises, on a real daemon in a lab:
//! schemathesis (all checks; coverage, fuzzing, stateful; admin and read tokens) finds nothing;
//! /healthz reports each check and turns 503 without pins; tokens never come from a URL; tickets
//! work once; a revoked token's stream closes; the hook socket serves the hook alone.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

use crate::{
    api::{http, json, token},
    support::{self, PinDir, daemon::Daemon, require_root},
};
use tunmeter_lab::{Lab, LabConfig, in_netns, traffic};

const PORT: u16 = 9107;
/// Examples per operation and phase: about 3,000 requests per token, 20-40 s.
const MAX_EXAMPLES: &str = "100";
/// A fixed seed, so that a failure replays (`TUNMETER_SCHEMATHESIS_SEED` picks another).
const DEFAULT_SEED: &str = "20261204";

fn schemathesis() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/schemathesis/bin/schemathesis")
}

/// Run schemathesis against the daemon in `ns` with `token`; panics with its report on any
/// failure.
fn fuzz(ns: &str, token: &str, role: &str) {
    let seed = std::env::var("TUNMETER_SCHEMATHESIS_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/it/conformance/schemathesis.toml");
    let t0 = Instant::now();
    let out = Command::new("timeout")
        .arg("300")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(schemathesis())
        .arg("--config-file")
        .arg(&config)
        .args(["run", &format!("http://127.0.0.1:{PORT}/api/v1/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--phases", "coverage,fuzzing,stateful", "--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed, "--no-color"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        // Its cache of crashes goes in the working directory: not the checkout.
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run schemathesis (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    let summary = report.find("SUMMARY").map_or(&report[..], |i| &report[i..]);
    eprintln!("schemathesis ({role} token, seed {seed}, {:?}):\n{summary}", t0.elapsed());
    assert!(
        out.status.success(),
        "schemathesis found failures with the {role} token (replay: TUNMETER_SCHEMATHESIS_SEED={seed}):\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for phase in ["Coverage", "Fuzzing", "Stateful"] {
        assert!(summary.contains(&format!("✅ {phase}")), "phase {phase} did not pass:\n{summary}");
    }
}

/// A new token named `name`: (id, secret).
fn named_token(state: &str, node: &str, role: &str, name: &str) -> (String, String) {
    let out = Command::new(support::daemon::BIN)
        .args(["token", "create", "--role", role, "--name", name, "--state-dir", state, "--node-id", node])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let secret = String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap().to_string();
    let list = Command::new(support::daemon::BIN)
        .args(["token", "list", "--state-dir", state, "--node-id", node])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    let id = text
        .lines()
        .find(|l| l.split_whitespace().last() == Some(name))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token {name} in:\n{text}"))
        .to_string();
    (id, secret)
}

fn ticket(ns: &str, tok: &str) -> String {
    let (s, _, b) = http(ns, "POST", "/api/v1/stream/ticket", Some(tok));
    assert_eq!(s, 201, "{b}");
    json(&b)["ticket"].as_str().unwrap().to_string()
}

#[test]
fn the_api_conforms_to_its_openapi_and_keeps_its_security_promises() {
    if !require_root() {
        return;
    }
    assert!(schemathesis().is_file(), "{} missing: run `cargo xtask setup`", schemathesis().display());
    let lab = Lab::up(LabConfig { prefix: "tmcf".into(), tun_clients: 1, eth_clients: 1 }).expect("lab");
    let ns = lab.server_ns();
    let pins = PinDir::new("tmcf");
    let (state, log) = support::env::daemon_paths("tmcf");
    let state = state.display().to_string();
    let pin = pins.path().display().to_string();
    let args = ["--tun", "tun0", "--egress", "eth0", "--subnet", "10.8.0.0/24", "--subnet", "10.9.0.0/24"];
    let hook_sock = format!("/tmp/tmtest-hook-{}.sock", std::process::id());
    let cfg = format!("{state}/tunmeter.toml");
    std::fs::write(
        &cfg,
        format!("[api]\nhook_socket = \"{hook_sock}\"\nhook_group = \"root\"\nmax_stream_subscribers = 2\n"),
    )
    .unwrap();
    let mut all = vec!["--config", &cfg];
    all.extend(args);
    all.extend(["--pin-dir", &pin, "--state-dir", &state, "--node-id", "tmcf", "--poll-interval-ms", "250"]);
    let mut d = Daemon::start(&ns, &all, &log);
    d.wait_log("API listening", 1, Duration::from_secs(30));
    let admin = token(&state, "tmcf", "admin");
    let read = token(&state, "tmcf", "read");
    traffic::mixed_round(&lab, 1).expect("traffic");
    std::thread::sleep(Duration::from_millis(800));

    // Health: a JSON body with each check; liveness apart.
    let (s, ct, b) = http(&ns, "GET", "/healthz", None);
    let h = json(&b);
    assert_eq!((s, ct.as_str()), (200, "application/json"), "{b}");
    assert_eq!((h["status"].as_str(), h["database"].as_str()), (Some("ok"), Some("ok")), "{h}");
    assert_eq!((h["pins"].as_str(), h["poll"].as_str()), (Some("ok"), Some("ok")), "{h}");
    assert!(h["last_poll_ok_unix_ms"].as_u64().is_some() && h["problems"].as_array().unwrap().is_empty(), "{h}");
    let attached: Vec<_> = h["attached"].as_array().unwrap().iter().filter_map(|i| i["name"].as_str()).collect();
    assert!(attached.contains(&"tun0") && attached.contains(&"eth0"), "{h}");
    let (s, _, b) = http(&ns, "GET", "/livez", None);
    assert_eq!((s, json(&b)["status"].as_str()), (200, Some("alive")));

    // The hook socket: 0660 to its group, and it serves the hook call alone.
    {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(&hook_sock).expect("the hook socket");
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 0), "hook socket mode and group");
        let control = std::fs::metadata(format!("{state}/control.sock")).unwrap();
        assert_eq!(control.mode() & 0o777, 0o600, "control socket mode");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ask = |method: hyper::Method, path: &'static str| {
            let sock = PathBuf::from(&hook_sock);
            rt.block_on(tunmeter::control::client::request_json_at(
                &sock,
                method,
                path,
                b"{}".to_vec(),
                Duration::from_secs(5),
            ))
            .unwrap()
        };
        let (s, b) = ask(hyper::Method::POST, "/api/v1/hooks/openvpn");
        assert_eq!(s, 400, "the hook route is served (and checks its body): {b}");
        let (s, _) = ask(hyper::Method::GET, "/api/v1/clients");
        assert_eq!(s, 404, "nothing else is");
        let (s, _) = ask(hyper::Method::POST, "/api/v1/clients/10.8.0.2/reset");
        assert_eq!(s, 404, "no reset through the hook socket");

        // The list and a page carry identities (a view's identity lookup reads the ledger:
        // the list must not hold the ledger's lock meanwhile, or the request hangs).
        let control = PathBuf::from(format!("{state}/control.sock"));
        let body = br#"{"client_ip": "10.8.0.2", "username": "carol"}"#.to_vec();
        let (s, b) = rt
            .block_on(tunmeter::control::client::request_json_at(
                &control,
                hyper::Method::POST,
                "/api/v1/sessions",
                body,
                Duration::from_secs(5),
            ))
            .unwrap();
        assert_eq!(s, 201, "{b}");
        // The identity service reloads soon after the change, and the whole list is cached for
        // up to a poll: asked again for up to 10 s (each request bounded at 5 s).
        for path in ["/api/v1/clients", "/api/v1/clients?limit=1"] {
            let t0 = Instant::now();
            loop {
                let (s, b) = rt
                    .block_on(tunmeter::control::client::request_json_at(
                        &control,
                        hyper::Method::GET,
                        path,
                        Vec::new(),
                        Duration::from_secs(5),
                    ))
                    .unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(s, 200, "{path}: {b}");
                let v = json(&b);
                let c = v["clients"].as_array().unwrap().iter().find(|c| c["ip"] == "10.8.0.2").cloned();
                let c = c.expect("10.8.0.2 listed");
                if c["identity"]["username"] == "carol" {
                    break;
                }
                assert!(t0.elapsed() < Duration::from_secs(10), "{path}: no identity: {c}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }

    // Tokens only in the Authorization header; tickets work once, only on the stream.
    let (s, _, b) = http(&ns, "GET", &format!("/api/v1/clients?access_token={read}"), None);
    assert_eq!(s, 401, "a token in the URL: {b}");
    let (s, _, _) = http(&ns, "GET", &format!("/api/v1/stream?access_token={read}"), None);
    assert_eq!(s, 401, "a token in the stream's URL");
    let t = ticket(&ns, &read);
    let (s, _, b) = http(&ns, "GET", &format!("/api/v1/stream?ticket={t}"), None);
    assert_eq!(s, 400, "a ticket without a WebSocket upgrade: {b}");
    let (s, _, _) = http(&ns, "GET", &format!("/api/v1/stream?ticket={t}"), None);
    assert_eq!(s, 401, "a used ticket");
    let (s, _, _) = http(&ns, "GET", &format!("/api/v1/clients?ticket={}", ticket(&ns, &read)), None);
    assert_eq!(s, 401, "a ticket off the stream");

    // At most max_stream_subscribers (2 here) streams: the third upgrade gets 503.
    let tickets: Vec<String> = (0..3).map(|_| ticket(&ns, &read)).collect();
    let statuses = in_netns(&ns, move || {
        use std::io::{BufRead as _, Write as _};
        let mut open = Vec::new();
        let mut statuses = Vec::new();
        for t in &tickets {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", PORT))?;
            write!(
                s,
                "GET /api/v1/stream?ticket={t} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )?;
            let mut line = String::new();
            std::io::BufReader::new(s.try_clone()?).read_line(&mut line)?;
            statuses.push(line.split_whitespace().nth(1).unwrap_or("?").to_string());
            open.push(s);
        }
        Ok(statuses)
    })
    .unwrap();
    assert_eq!(statuses, ["101", "101", "503"], "stream subscriber cap");
    std::thread::sleep(Duration::from_millis(300));

    // An open stream closes (1008) when its token is revoked: within the token cache's refresh
    // (10 s) plus the stream's re-check period (5 s).
    let (doomed_id, doomed) = named_token(&state, "tmcf", "read", "doomed");
    // An unknown token reloads the token list at most once a second (tokens::TokenCache).
    std::thread::sleep(Duration::from_millis(1100));
    let t = ticket(&ns, &doomed);
    let watcher = std::thread::spawn({
        let ns = ns.clone();
        move || {
            in_netns(&ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async {
                    let url = format!("ws://127.0.0.1:{PORT}/api/v1/stream?ticket={t}");
                    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
                    let t0 = Instant::now();
                    while t0.elapsed() < Duration::from_secs(40) {
                        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                            Ok(Some(Ok(Message::Close(f)))) => return Ok(Some((f.map(|f| f.code), t0.elapsed()))),
                            Ok(None) | Ok(Some(Err(_))) => return Ok(None),
                            _ => {}
                        }
                    }
                    Ok(None)
                })
            })
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let revoked_at = Instant::now();
    let out = Command::new(support::daemon::BIN)
        .args(["token", "revoke", &doomed_id, "--state-dir", &state, "--node-id", "tmcf"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let closed = watcher.join().unwrap().expect("watcher");
    let (code, _) = closed.expect("the stream of a revoked token stayed open (or ended without a close frame)");
    assert_eq!(code, Some(CloseCode::Policy));
    let after = revoked_at.elapsed();
    assert!(after < Duration::from_secs(25), "closed {after:?} after the revocation");
    eprintln!("stream of a revoked token closed {after:?} after the revocation");

    // The document and the server agree, under fuzzing, for both roles.
    fuzz(&ns, &admin, "admin");
    fuzz(&ns, &read, "read");

    // Pins removed behind the daemon's back: not serving.
    std::fs::remove_file(pins.path().join(tunmeter_common::MAP_CLIENTS)).expect("remove the client map's pin");
    let (s, _, b) = http(&ns, "GET", "/healthz", None);
    let h = json(&b);
    assert_eq!((s, h["status"].as_str(), h["pins"].as_str()), (503, Some("unavailable"), Some("missing")), "{h}");
    assert!(!h["problems"].as_array().unwrap().is_empty(), "{h}");
    d.stop();
    assert!(!PathBuf::from(&hook_sock).exists(), "the hook socket is removed at stop");
    let _ = std::fs::remove_dir_all(&state);
}
