//! Identity with real OpenVPN (Debian's openvpn, a UDP and a TCP instance with management
//! interfaces, certificates made by the lab) and the real daemon in the namespace lab:
//! usernames from the hook and management, sessions with exact bytes against the nftables
//! oracle, signed webhooks to a real receiver, fail-closed admission, a daemon restart, a lost
//! management interface, and an openvpn connection that redirects its user to a proxy.

use crate::support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use support::{PinDir, daemon::Daemon, proxies::TransparentProxy, require_root};
use tunmeter_lab::{
    openvpn::{OvpnLab, OvpnLabConfig, Transport},
    oracle::{Direction, OracleCounts},
};

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
        let state = PathBuf::from(format!("/tmp/tmtest-state-{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        std::fs::create_dir_all(&state).unwrap();
        let mut cfg = OvpnLabConfig::demo(prefix, clients);
        cfg.hook = Some(format!("{} hook openvpn --state-dir {}", support::daemon::BIN, state.display()));
        let lab = OvpnLab::up(cfg).expect("OpenVPN lab up");
        let hooks = Receiver::start(&lab.server_ns());
        let config = state.join("tunmeter.toml");
        std::fs::write(&config, daemon_config(hooks.port, management)).unwrap();
        let log = PathBuf::from(format!("/tmp/tmtest-{prefix}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
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
                        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                        mac.update(h("x-tunmeter-timestamp").as_bytes());
                        mac.update(b".");
                        mac.update(&body);
                        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
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

#[test]
fn openvpn_clients_get_named_sessions_with_exact_bytes_and_signed_webhooks() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmov", 4);
    let oracle = env.lab.install_oracle().unwrap();
    let d = env.start_daemon();
    env.lab.connect_all(CONNECT).expect("every client connects (the hook admits it)");

    // Every address of every client has a session named by the hook, before any traffic.
    let n_addrs: usize = (0..4).map(|i| addrs_of(&env.lab, i).len()).sum();
    env.wait("a session per address", Duration::from_secs(10), |e| e.active_sessions().len() == n_addrs);
    for i in 0..4 {
        let spec = env.lab.clients()[i].clone();
        for (_, ip) in addrs_of(&env.lab, i) {
            let s = env.session_of(ip).unwrap_or_else(|| panic!("no session for {ip}"));
            assert_eq!(s["username"], spec.username, "{s}");
            assert_eq!(s["common_name"], spec.name, "{s}");
            assert_eq!(s["protocol"], format!("openvpn-{}", spec.transport), "{s}");
            assert_eq!(s["instance"], spec.transport.as_str(), "{s}");
            assert_eq!(s["source"], "hook", "{s}");
            assert!(uuid::Uuid::parse_str(s["id"].as_str().unwrap()).is_ok(), "{s}");
        }
    }

    // Distinct traffic per client, over IPv4 and IPv6, TCP and UDP.
    for i in 0..4 {
        let k = i as u64 + 1;
        env.lab.tcp_transfer(i, false, 300_000 * k, 700_000 * k).unwrap();
        env.lab.tcp_transfer(i, true, 50_000 * k, 20_000 * k).unwrap();
        env.lab.udp_transfer(i, false, 20, 900, 300 + 50 * i).unwrap();
    }
    let counts = quiet(&oracle);
    env.settle();
    for i in 0..4 {
        for (dev, ip) in addrs_of(&env.lab, i) {
            let c = env.get(&format!("/api/v1/clients/{ip}"));
            let up = counts.client(dev, ip, Direction::Ingress);
            let down = counts.client(dev, ip, Direction::Egress);
            assert_eq!(c["upload"]["bytes"].as_u64(), Some(up.bytes), "{ip} upload: {c}");
            assert_eq!(c["upload"]["packets"].as_u64(), Some(up.packets), "{ip} upload packets: {c}");
            assert_eq!(c["download"]["bytes"].as_u64(), Some(down.bytes), "{ip} download: {c}");
            assert_eq!(c["download"]["packets"].as_u64(), Some(down.packets), "{ip} download packets: {c}");
            assert!(up.bytes > 0 && down.bytes > 0, "{ip}: no traffic counted by the oracle");
            // The API names the client and shows its live session bytes.
            let id = &c["identity"];
            assert_eq!(id["username"], env.lab.clients()[i].username, "{c}");
            assert_eq!(id["protocol"], format!("openvpn-{}", env.lab.clients()[i].transport), "{c}");
            assert_eq!(id["session"]["upload_bytes"].as_u64(), Some(up.bytes), "{c}");
            assert_eq!(id["session"]["download_bytes"].as_u64(), Some(down.bytes), "{c}");
        }
    }
    // OpenVPN's own view (its status file; the daemon holds the management connection, which
    // takes one client at a time) lists the same usernames.
    for t in Transport::ALL {
        let text = std::fs::read_to_string(env.lab.status_file(t)).unwrap();
        let listed = tunmeter_lab::openvpn::parse_status_clients(&text);
        let mut names: Vec<&str> = listed.iter().map(|c| c.username.as_str()).collect();
        names.sort();
        let mut want: Vec<&str> =
            env.lab.clients().iter().filter(|c| c.transport == t).map(|c| c.username.as_str()).collect();
        want.sort();
        assert_eq!(names, want, "{t}");
    }

    // bob disconnects: the hook closes his sessions with the bytes they carried.
    let bob = 1;
    let bob_ips = addrs_of(&env.lab, bob);
    let bob_ids: Vec<String> =
        bob_ips.iter().map(|(_, ip)| env.session_of(*ip).unwrap()["id"].as_str().unwrap().to_string()).collect();
    env.lab.disconnect(bob).unwrap();
    env.wait("bob's sessions closed", Duration::from_secs(15), |e| {
        bob_ips.iter().all(|(_, ip)| e.session_of(*ip).is_none())
    });
    for ((dev, ip), id) in bob_ips.iter().zip(&bob_ids) {
        let s = env.get(&format!("/api/v1/sessions/{id}"));
        assert_eq!(s["active"], false, "{s}");
        assert_eq!(s["close_reason"], "disconnected", "{s}");
        assert_eq!(s["up_bytes"].as_u64(), Some(counts.client(dev, *ip, Direction::Ingress).bytes), "{s}");
        assert_eq!(s["down_bytes"].as_u64(), Some(counts.client(dev, *ip, Direction::Egress).bytes), "{s}");
    }
    // The others are untouched.
    assert_eq!(env.active_sessions().len(), n_addrs - bob_ips.len());

    // Malformed ids are 400, unknown ones 404, a second open of an active client 409.
    assert_eq!(env.call("GET", "/api/v1/sessions/not-a-uuid", None).0, 400);
    assert_eq!(env.call("GET", &format!("/api/v1/sessions/{}", uuid::Uuid::new_v4()), None).0, 404);
    let alice_v4 = addrs_of(&env.lab, 0)[0].1;
    let (st, v) = env.call("POST", "/api/v1/sessions", Some(json!({"client_ip": alice_v4.to_string()})));
    assert_eq!(st, 409, "{v}");

    // A reset sends its event too.
    let (st, v) = env.call("POST", &format!("/api/v1/clients/{alice_v4}/reset"), None);
    assert_eq!(st, 200, "{v}");
    env.wait("the reset's webhook", Duration::from_secs(20), |e| {
        e.hooks.events().iter().any(|h| h["type"] == "reset" && h["subject"] == alice_v4.to_string())
    });
    let reset = env.hooks.events().into_iter().find(|h| h["type"] == "reset").unwrap();
    assert_eq!(reset["data"]["id"], v["id"], "{reset}");

    // Webhooks: an opened event per session and a closed event for each of bob's, all signed
    // (the receiver rejects bad signatures), in order per address.
    env.wait("webhooks delivered", Duration::from_secs(20), |e| {
        let ev = e.hooks.events();
        ev.iter().filter(|v| v["type"] == "session.opened").count() >= n_addrs
            && ev.iter().filter(|v| v["type"] == "session.closed").count() >= bob_ips.len()
    });
    let events = env.hooks.events();
    let mut per_subject: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &events {
        per_subject
            .entry(e["subject"].as_str().unwrap().to_string())
            .or_default()
            .push(e["type"].as_str().unwrap().into());
    }
    for (_, ip) in &bob_ips {
        let seq = &per_subject[&ip.to_string()];
        let first_closed = seq.iter().position(|t| t == "session.closed").unwrap();
        assert!(seq[..first_closed].contains(&"session.opened".to_string()), "{ip}: {seq:?}");
    }
    let closed = events.iter().find(|e| e["type"] == "session.closed").unwrap();
    assert_eq!(closed["data"]["close_reason"], "disconnected", "{closed}");
    assert_eq!(closed["node_id"], env.node, "{closed}");

    drop(d);
    oracle.remove().unwrap();
    let prefix = env.lab.prefix().to_string();
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}

#[test]
fn admission_fails_closed_and_sessions_follow_restarts_and_lost_management() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmof", 3);
    // No daemon: the hook cannot tell anyone, so OpenVPN must refuse the client.
    env.lab.connect(0).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    assert!(env.lab.connected_addrs(0).map(|a| a.is_none()).unwrap_or(true), "admitted without a daemon");
    let server_log = std::fs::read_to_string(env.lab.server_log(Transport::Udp)).unwrap();
    assert!(server_log.contains("client-connect"), "no client-connect failure in the server log:\n{server_log}");
    let _ = env.lab.disconnect(0);

    let mut d = env.start_daemon();
    env.lab.connect_all(CONNECT).expect("with the daemon every client is admitted");
    env.wait("sessions for all", Duration::from_secs(10), |e| {
        (0..3).all(|i| addrs_of(&e.lab, i).iter().all(|(_, ip)| e.session_of(*ip).is_some()))
    });
    let id_of =
        |e: &Env, i: usize| e.session_of(addrs_of(&e.lab, i)[0].1).map(|s| s["id"].as_str().unwrap().to_string());
    let (alice, bob) = (id_of(&env, 0).unwrap(), id_of(&env, 1).unwrap());
    let carol = id_of(&env, 2).unwrap();

    // The daemon stops; carol leaves while it is down; it comes back.
    assert!(d.stop().is_some_and(|s| s.success()));
    env.lab.disconnect(2).unwrap();
    let _d = env.start_daemon();
    env.wait("carol's session closed after the restart", Duration::from_secs(15), |e| id_of(e, 2).is_none());
    let s = env.get(&format!("/api/v1/sessions/{carol}"));
    assert_eq!(s["close_reason"], "disconnected", "{s}");
    // alice and bob are still there: the same sessions go on.
    assert_eq!(id_of(&env, 0).as_deref(), Some(alice.as_str()));
    assert_eq!(id_of(&env, 1).as_deref(), Some(bob.as_str()));

    // The UDP instance (alice's) dies without running its disconnect hooks (SIGKILL): its
    // management interface goes away, so its sessions close; bob's (TCP) stays.
    let pid: i32 = std::fs::read_to_string(env.lab.dir().join("server-udp.pid")).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = env.lab.stop_instance(Transport::Udp);
    env.wait("alice's session closed", Duration::from_secs(15), |e| id_of(e, 0).is_none());
    let s = env.get(&format!("/api/v1/sessions/{alice}"));
    assert_eq!(s["close_reason"], "management_lost", "{s}");
    assert_eq!(id_of(&env, 1).as_deref(), Some(bob.as_str()));

    // It comes back and alice reconnects: a new session.
    env.lab.start_instance(Transport::Udp).unwrap();
    let _ = env.lab.disconnect(0);
    env.lab.connect(0).unwrap();
    env.lab.wait_connected(0, CONNECT).unwrap();
    env.wait("alice's new session", Duration::from_secs(15), |e| id_of(e, 0).is_some_and(|id| id != alice));

    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}

#[test]
fn an_openvpn_connection_sends_its_user_to_the_proxy_while_connected() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmoc", 2);
    let _d = env.start_daemon();
    let proxy = TransparentProxy::start(&env.lab.server_ns(), 12345).unwrap();
    // bob's address is a device; alice's openvpn connection goes there through the proxy.
    let bob_ip = env.lab.expected_addrs(1).v4;
    let (st, dev) =
        env.call("POST", "/api/v1/devices", Some(json!({"name": "phone-bob", "vpn_ip": bob_ip.to_string()})));
    assert_eq!(st, 201, "{dev}");
    let (st, conn) = env.call(
        "POST",
        "/api/v1/connections",
        Some(json!({"device_id": dev["id"], "protocol": "openvpn", "username": "alice", "proxy_port": 12345})),
    );
    assert_eq!(st, 201, "{conn}");

    env.lab.connect_all(CONNECT).unwrap();
    let alice = env.lab.expected_addrs(0).v4;
    let steer = |e: &Env| {
        let out = support::daemon::output(
            &e.lab.server_ns(),
            &["steer", "list", "--json", "--pin-dir", &e.pins.path().display().to_string()],
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // The rule is in place when the hook answers, before alice's first packet.
    let rules = steer(&env);
    let r = rules["redirect"].as_array().unwrap();
    assert!(r.iter().any(|r| r["source"] == format!("{alice}/32") && r["proxy_port"] == 12345), "{rules}");
    assert!(!r.iter().any(|r| r["source"] == format!("{bob_ip}/32")), "{rules}");

    // alice's traffic to the world reaches the proxy with its original destination.
    let alice_ns = env.lab.client_ns(0);
    tunmeter_lab::netns_exec(&alice_ns, &["ip", "route", "add", "198.51.100.0/24", "dev", "tun0"]).unwrap();
    let dst: SocketAddr = "198.51.100.7:80".parse().unwrap();
    let reply = support::proxies::tcp_request(&alice_ns, dst, b"hello".to_vec(), Duration::from_secs(10)).unwrap();
    assert_eq!(String::from_utf8_lossy(&reply).trim(), format!("ORIG {dst}"));
    assert!(proxy.intercepted().iter().any(|i| i.orig == dst && i.peer.ip() == IpAddr::V4(alice)));

    // The API shows the device alice's traffic goes to.
    let c = env.get(&format!("/api/v1/clients/{alice}"));
    assert_eq!(c["identity"]["device"]["name"], "phone-bob", "{c}");
    assert_eq!(c["identity"]["device"]["relation"], "via", "{c}");
    let c = env.get(&format!("/api/v1/clients/{bob_ip}"));
    assert_eq!(c["identity"]["device"]["relation"], "self", "{c}");

    // alice leaves: the rule goes.
    env.lab.disconnect(0).unwrap();
    env.wait("alice's redirect removed", Duration::from_secs(15), |e| {
        !steer(e)["redirect"].as_array().unwrap().iter().any(|r| r["source"] == format!("{alice}/32"))
    });
    drop(proxy);
    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}

#[test]
fn without_management_the_hook_alone_opens_and_closes_sessions() {
    if !require_root() {
        return;
    }
    let mut env = Env::with_config("tmoh", 2, false);
    let _d = env.start_daemon();
    env.lab.connect_all(CONNECT).expect("the hook admits every client");
    let alice = IpAddr::V4(env.lab.expected_addrs(0).v4);
    let bob = IpAddr::V4(env.lab.expected_addrs(1).v4);
    let s = env.session_of(alice).expect("alice's session");
    // No management instance names the transport: the device does.
    assert_eq!(
        (s["protocol"].as_str(), s["instance"].as_str(), s["source"].as_str()),
        (Some("openvpn"), Some("tun0"), Some("hook")),
        "{s}"
    );
    assert_eq!(env.session_of(bob).unwrap()["instance"], "tun1");
    // Nothing but the hook closes them: still there after several ticks and the hook grace.
    std::thread::sleep(Duration::from_secs(3));
    assert!(env.session_of(alice).is_some());
    env.lab.disconnect(1).unwrap();
    env.wait("bob's session closed by the hook", Duration::from_secs(15), |e| e.session_of(bob).is_none());
    assert!(env.session_of(alice).is_some());
    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}

#[test]
fn a_client_is_refused_while_the_database_is_locked_and_nothing_stays_open() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmol", 2);
    let _d = env.start_daemon();
    env.lab.connect(0).unwrap();
    env.lab.wait_connected(0, CONNECT).unwrap();
    let alice = IpAddr::V4(env.lab.expected_addrs(0).v4);
    let bob = IpAddr::V4(env.lab.expected_addrs(1).v4);
    let alice_id = env.session_of(alice).unwrap()["id"].clone();

    let lock = support::sqlite_lock::SqliteLock::take(&env.state.join("tunmeter.db"));
    env.lab.connect(1).unwrap();
    // The daemon cannot write bob's session: the hook fails, OpenVPN refuses him.
    let t0 = Instant::now();
    loop {
        match env.lab.connected_addrs(1) {
            Ok(Some(a)) => panic!("bob was admitted ({a:?}) while the database was locked"),
            Err(_) => break, // his client gave up (AUTH_FAILED)
            Ok(None) => {}
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "bob's client neither connected nor gave up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(env.lab.server_log(Transport::Tcp)).unwrap();
    assert!(log.contains("client-connect"), "no client-connect failure in the server log:\n{log}");
    drop(lock);

    // Whatever was started for bob is undone; alice's session went on untouched.
    env.wait("no active session for bob", Duration::from_secs(20), |e| e.session_of(bob).is_none());
    std::thread::sleep(Duration::from_secs(2));
    assert!(env.session_of(bob).is_none());
    let (_, all) = env.call("GET", &format!("/api/v1/sessions?client={bob}"), None);
    for s in all["sessions"].as_array().unwrap() {
        assert_eq!(s["close_reason"], "rejected", "{s}");
    }
    assert_eq!(env.session_of(alice).unwrap()["id"], alice_id);
    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}
