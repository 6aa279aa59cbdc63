//! Identity with real OpenVPN and the real daemon in the namespace lab: names, sessions with
//! exact bytes, webhooks, fail-closed admission, restarts and redirects.
//!
//! Identity with real OpenVPN (Debian's openvpn, a UDP and a TCP instance with management
//! interfaces, certificates made by the lab) and the real daemon in the namespace lab:
//! usernames from the hook and management, sessions with exact bytes against the nftables
//! oracle, signed webhooks to a real receiver, fail-closed admission, a daemon restart, a lost
//! management interface, and an openvpn connection that redirects its user to a proxy.
//!
//! This file: the lab with its daemon and webhook receiver; `sessions`, `hook` and `proxy`
//! hold the tests.

mod hook;
mod proxy;
mod sessions;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::{PinDir, daemon::Daemon, proxies::TransparentProxy, require_root};
use tunmeter_lab::{
    openvpn::{OvpnLab, OvpnLabConfig, Transport},
    oracle::{Direction, OracleCounts},
};

use crate::support;

const SECRET: &str = "test-webhook-secret-0123456789";
const CONNECT: Duration = Duration::from_secs(30);

/// The lab, the daemon's paths and a webhook receiver.
struct Env {
    lab: OvpnLab,
    pins: PinDir,
    state: PathBuf,
    log: PathBuf,
    config: PathBuf,
    node: String,
    hooks: Receiver,
}

impl Env {
    fn new(prefix: &str, clients: usize) -> Env {
        Env::with_config(prefix, clients, true)
    }

    /// `management`: the daemon follows both management interfaces; else only the hook.
    fn with_config(prefix: &str, clients: usize, management: bool) -> Env {
        let (state, log) = support::env::daemon_paths(prefix);
        let mut cfg = OvpnLabConfig::demo(prefix, clients);
        cfg.hook = Some(format!("{} hook openvpn --state-dir {}", support::daemon::BIN, state.display()));
        let lab = OvpnLab::up(cfg).expect("OpenVPN lab up");
        let hooks = Receiver::start(&lab.server_ns());
        let config = state.join("tunmeter.toml");
        std::fs::write(&config, daemon_config(hooks.port, management)).unwrap();
        Env { lab, pins: PinDir::new(prefix), state, log, config, node: prefix.into(), hooks }
    }

    fn start_daemon(&self) -> Daemon {
        let (pin, state, config) = (
            self.pins.path().display().to_string(),
            self.state.display().to_string(),
            self.config.display().to_string(),
        );
        let args = [
            "--config",
            &config,
            "--pin-dir",
            &pin,
            "--state-dir",
            &state,
            "--node-id",
            &self.node,
            "--api-listen",
            "",
            "--poll-interval-ms",
            "200",
            "--flush-interval-ms",
            "500",
        ];
        const READY: &str = "ledger and API running";
        let before = std::fs::read_to_string(&self.log).unwrap_or_default().matches(READY).count();
        let mut d = Daemon::start(&self.lab.server_ns(), &args, &self.log);
        d.wait_log(READY, before + 1, Duration::from_secs(30));
        d
    }

    /// A request on the control socket (admin), with an optional JSON body.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        support::control::call(&self.state, method, path, body)
    }

    fn get(&self, path: &str) -> Value {
        let (s, v) = self.call("GET", path, None);
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    /// Wait until `f` holds (checked every 200 ms), at most `timeout`.
    fn wait(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Env) -> bool) {
        let t0 = Instant::now();
        while !f(self) {
            assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn active_sessions(&self) -> Vec<Value> {
        self.get("/api/v1/sessions?active=true")["sessions"].as_array().unwrap().clone()
    }

    fn session_of(&self, ip: IpAddr) -> Option<Value> {
        self.active_sessions().into_iter().find(|s| s["client_ip"] == ip.to_string())
    }

    /// Wait until the ledger has polled and flushed twice more.
    fn settle(&self) {
        let cycles = |e: &Env| e.get("/api/v1/stats")["ledger"]["flush_cycles"].as_u64().unwrap_or(0);
        let start = cycles(self);
        self.wait("two more flushes", Duration::from_secs(20), |e| cycles(e) >= start + 2);
    }
}

fn daemon_config(hook_port: u16, management: bool) -> String {
    let lab = tunmeter_lab::openvpn::daemon_config(management);
    format!(
        r#"{lab}
[identity]
reconcile_interval_ms = 500
management_grace_secs = 2

[[webhook]]
name = "receiver"
url = "http://127.0.0.1:{hook_port}/hook"
secret = "{SECRET}"
min_backoff_ms = 100
max_backoff_secs = 1
# The receiver is on 127.0.0.1: loopback is refused unless allowed.
allow_private = true
"#
    )
}

/// A real HTTP server in the server namespace that records every webhook delivery after
/// checking its signature independently.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Value>>>,
    _rt: tokio::runtime::Runtime,
}

impl Receiver {
    fn start(ns: &str) -> Receiver {
        let l = tunmeter_lab::in_netns(ns, || Ok(std::net::TcpListener::bind("127.0.0.1:0")?)).unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let got: Arc<Mutex<Vec<Value>>> = Arc::default();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let g = got.clone();
        rt.spawn(async move {
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let g = g.clone();
                    async move {
                        let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                        let want = support::webhook_signature(SECRET.as_bytes(), &h("x-tunmeter-timestamp"), &body);
                        if h("x-tunmeter-signature") != want {
                            return axum::http::StatusCode::UNAUTHORIZED;
                        }
                        g.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                        axum::http::StatusCode::OK
                    }
                }),
            );
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            axum::serve(l, app).await.unwrap();
        });
        Receiver { port, got, _rt: rt }
    }

    fn events(&self) -> Vec<Value> {
        self.got.lock().unwrap().clone()
    }
}

/// An oracle reading taken while nothing moves (two equal readings in a row).
fn quiet(o: &tunmeter_lab::oracle::Oracle) -> OracleCounts {
    let mut prev = o.read().unwrap();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(300));
        let now = o.read().unwrap();
        if now == prev {
            return now;
        }
        prev = now;
    }
    panic!("traffic never went quiet");
}

/// Every address of client `i`: (server device, address).
fn addrs_of(lab: &OvpnLab, i: usize) -> Vec<(&'static str, IpAddr)> {
    let a = lab.expected_addrs(i);
    let dev = lab.clients()[i].transport.server_dev();
    std::iter::once((dev, IpAddr::V4(a.v4))).chain(a.v6.map(|v| (dev, IpAddr::V6(v)))).collect()
}
