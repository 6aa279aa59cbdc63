//! Through the daemon's API in a namespace lab: an http connection's forward rule in the
//! pinned maps carries a real TCP request; roles, and the 400/403/404/409 answers.

use std::{net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use tunmeter_lab::in_netns;

use super::support::{self, env::LabEnv, ns_sh, proxies};

const PORT: u16 = 9107;
/// The device's web server (on 10.8.0.2), and the public ports on the server.
const DEVICE_WEB: u16 = 8000;
const PUB: u16 = 18080;
const PUB_TAKEN: u16 = 18081;

struct Env(LabEnv);

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0.state);
        let _ = std::fs::remove_file(&self.0.log);
    }
}

/// One request from inside the server namespace: (status, body as JSON or Null).
fn call(ns: &str, method: &str, path: &str, token: &str, body: Option<String>) -> (u16, Value) {
    let shown = format!("{method} {path}");
    let (method, path, token) = (method.to_string(), path.to_string(), token.to_string());
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let mut req = reqwest::Client::new()
                .request(reqwest::Method::from_bytes(method.as_bytes())?, format!("http://127.0.0.1:{PORT}{path}"))
                .bearer_auth(token)
                .timeout(Duration::from_secs(20));
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let text = resp.text().await?;
            let v = if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
            };
            Ok((status, v))
        })
    })
    .unwrap_or_else(|e| panic!("{shown}: {e:#}"))
}

fn token(env: &LabEnv, role: &str) -> String {
    let (_, state) = env.path_args();
    let out = std::process::Command::new(support::daemon::BIN)
        .args(["token", "create", "--role", role, "--name", role, "--state-dir", &state, "--node-id", &env.node])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().lines().last().unwrap().to_string()
}

fn steer(env: &LabEnv, args: &[&str]) -> std::process::Output {
    let pin = env.pins.path().display().to_string();
    let all = [&["steer"], args, &["--pin-dir", pin.as_str()]].concat();
    support::daemon::output(&env.lab.server_ns(), &all)
}

/// The tcp forward rule on `port` in `tunmeter steer list --json`, if any.
fn forward_rule(env: &LabEnv, port: u16) -> Option<Value> {
    let out = steer(env, &["list", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["forward"].as_array()?.iter().find(|r| r["proto"] == "tcp" && r["public_port"] == port).cloned()
}

fn message(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error body: {v}"))
}

#[test]
fn registry_api_with_forward_rules_sessions_and_errors() {
    if !support::require_root() {
        return;
    }
    let env = Env(LabEnv::new("rg", 1, 1));
    let e = &env.0;
    let srv = e.lab.server_ns();
    let device = e.lab.tun_clients()[0].clone();
    let customer = e.lab.eth_clients()[0].clone();
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    ns_sh(&device.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
    let _daemon = e.start_daemon(&[]);
    let web = proxies::WebServer::start(&device.ns, DEVICE_WEB);
    let (admin, read) = (token(e, "admin"), token(e, "read"));
    let api = |m: &str, p: &str, t: &str, b: Option<Value>| call(&srv, m, p, t, b.map(|b| b.to_string()));

    // Devices.
    let (s, d) =
        api("POST", "/api/v1/devices", &admin, Some(json!({"name": "phone", "vpn_ip": device.v4.to_string()})));
    assert_eq!(s, 201, "{d}");
    let dev_id = d["id"].as_str().unwrap().to_string();
    assert_eq!((d["status"].as_str(), d["connections"].as_u64()), (Some("unknown"), Some(0)));
    assert!(d["online"].is_boolean() && d.get("last_seen_unix_ms").is_some(), "{d}");
    let (s, b) = api("POST", "/api/v1/devices", &admin, Some(json!({"name": "phone", "vpn_ip": "10.8.0.9"})));
    assert_eq!((s, b["error"]["code"].as_str()), (409, Some("conflict")), "{b}");
    let (s, b) = api("POST", "/api/v1/devices", &admin, Some(json!({"name": "p2", "vpn_ip": device.v4.to_string()})));
    assert_eq!(s, 409, "{b}");
    let (s, b) = api("POST", "/api/v1/devices", &read, Some(json!({"name": "p3", "vpn_ip": "10.8.0.10"})));
    assert_eq!((s, b["error"]["code"].as_str()), (403, Some("forbidden")), "{b}");
    let (s, doc) = api("GET", "/api/v1/openapi.json", &read, None);
    assert_eq!(s, 200);
    for p in ["/api/v1/sessions", "/api/v1/devices/{id}", "/api/v1/connections/{id}", "/api/v1/sessions/{id}/close"] {
        assert!(doc["paths"][p].is_object(), "{p} missing from OpenAPI");
    }
    let (s, b) = api("GET", "/api/v1/devices", &read, None);
    assert_eq!(s, 200);
    assert_eq!(b["devices"].as_array().unwrap().len(), 1, "{b}");

    // An http connection: a forward rule tcp/PUB -> device:DEVICE_WEB in the pinned maps,
    // its public port reserved, and a real TCP connection through it.
    let new = json!({"device_id": dev_id, "protocol": "http", "public_port": PUB, "device_port": DEVICE_WEB});
    let (s, c) = api("POST", "/api/v1/connections", &admin, Some(new.clone()));
    assert_eq!(s, 201, "{c}");
    let conn_id = c["id"].as_str().unwrap().to_string();
    let rule = forward_rule(e, PUB).expect("forward rule in the pinned maps");
    assert_eq!(rule["device"], format!("{}:{DEVICE_WEB}", device.v4));
    assert_eq!(rule["origin"], "runtime");
    assert_eq!(c["rule"], rule["id"], "{c}");
    assert_eq!((c["device_name"].as_str(), c["device_vpn_ip"].as_str()), (Some("phone"), Some("10.8.0.2")));
    let reserved = ns_sh(&srv, &["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]);
    assert!(tunmeter::steer::host::parse_port_list(&reserved).contains(&PUB), "reserved: {reserved}");
    let public = SocketAddr::from((e.lab.server_eth_v4(), PUB));
    let got =
        proxies::tcp_request(&customer.ns, public, b"GET /small HTTP/1.0\r\n\r\n".to_vec(), Duration::from_secs(10))
            .unwrap_or_else(|err| panic!("TCP through the forward rule: {err:#}"));
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.") && got.ends_with(proxies::SMALL_BODY), "{got}");
    assert!(web.requests().iter().any(|(peer, _)| peer.ip() == customer.v4), "the device saw the customer");
    let (s, b) = api("GET", &format!("/api/v1/connections/{conn_id}"), &read, None);
    assert_eq!((s, &b["rule"]), (200, &rule["id"]), "{b}");
    let (s, b) = api("GET", &format!("/api/v1/devices/{dev_id}"), &read, None);
    assert_eq!((s, b["connections"].as_u64()), (200, Some(1)), "{b}");

    // Conflicts: the same port again; a port a forward rule holds (nothing stored then); a
    // device with connections.
    let (s, b) = api("POST", "/api/v1/connections", &admin, Some(new));
    assert_eq!(s, 409, "{b}");
    let out = steer(
        e,
        &["add", "forward", "--proto", "tcp", "--public-port", &PUB_TAKEN.to_string(), "--device", "10.8.0.2:9"],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let taken = json!({"device_id": dev_id, "protocol": "socks5", "public_port": PUB_TAKEN, "device_port": 1080});
    let (s, b) = api("POST", "/api/v1/connections", &admin, Some(taken));
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains("taken by forward rule"), "{b}");
    let (_, b) = api("GET", "/api/v1/connections", &read, None);
    assert_eq!(b["connections"].as_array().unwrap().len(), 1, "the refused connection is not stored: {b}");
    assert_eq!(forward_rule(e, PUB_TAKEN).unwrap()["device"], "10.8.0.2:9", "the other rule is untouched");
    let (s, b) = api("DELETE", &format!("/api/v1/devices/{dev_id}"), &admin, None);
    assert_eq!(s, 409, "{b}");

    // An openvpn connection: no rule.
    let ov = json!({"device_id": dev_id, "protocol": "openvpn", "username": "alice", "proxy_port": 12345});
    let (s, b) = api("POST", "/api/v1/connections", &admin, Some(ov));
    assert_eq!((s, &b["rule"]), (201, &Value::Null), "{b}");
    let ov_id = b["id"].as_str().unwrap().to_string();

    // Bad input: 400 naming the problem; unknown ids: 404.
    let missing = uuid::Uuid::new_v4().to_string();
    for (m, p, body, want, needle) in [
        ("GET", "/api/v1/sessions/not-a-uuid".to_string(), None, 400, "not a UUID"),
        ("POST", "/api/v1/sessions/not-a-uuid/close".to_string(), None, 400, "not a UUID"),
        ("GET", "/api/v1/devices/42".to_string(), None, 400, "not a UUID"),
        ("DELETE", "/api/v1/connections/xyz".to_string(), None, 400, "not a UUID"),
        ("GET", "/api/v1/sessions?limit=0".to_string(), None, 400, "limit"),
        ("GET", "/api/v1/sessions?client=banana".to_string(), None, 400, "not an IP address"),
        ("GET", "/api/v1/sessions?bogus=1".to_string(), None, 400, "bogus"),
        ("POST", "/api/v1/devices".to_string(), Some("{\"name\": \"x\"".to_string()), 400, "bad request body"),
        (
            "POST",
            "/api/v1/devices".to_string(),
            Some(json!({"name": "x", "vpn_ip": "10.8.0.300"}).to_string()),
            400,
            "not an IP address",
        ),
        (
            "POST",
            "/api/v1/devices".to_string(),
            Some(json!({"name": "x", "vpn_ip": "10.8.0.30", "extra": 1}).to_string()),
            400,
            "unknown field",
        ),
        (
            "POST",
            "/api/v1/connections".to_string(),
            Some(json!({"device_id": dev_id, "protocol": "http", "public_port": 0, "device_port": 1}).to_string()),
            400,
            "public_port 0",
        ),
        (
            "POST",
            "/api/v1/connections".to_string(),
            Some(json!({"device_id": dev_id, "protocol": "http", "public_port": 70000, "device_port": 1}).to_string()),
            400,
            "bad request body",
        ),
        (
            "POST",
            "/api/v1/connections".to_string(),
            Some(json!({"device_id": dev_id, "protocol": "openvpn", "username": "a b", "proxy_port": 1}).to_string()),
            400,
            "username",
        ),
        (
            "POST",
            "/api/v1/connections".to_string(),
            Some(json!({"device_id": missing, "protocol": "openvpn", "username": "zed", "proxy_port": 1}).to_string()),
            404,
            "not found",
        ),
        (
            "POST",
            "/api/v1/sessions".to_string(),
            Some(json!({"client_ip": "banana"}).to_string()),
            400,
            "not an IP address",
        ),
        (
            "POST",
            "/api/v1/sessions".to_string(),
            Some(json!({"client_ip": "10.8.0.2", "protocol": "pptp"}).to_string()),
            400,
            "pptp",
        ),
        // Only addresses that can be clients are admitted (a ledger row is permanent).
        ("POST", "/api/v1/sessions".to_string(), Some(json!({"client_ip": "0.0.0.0"}).to_string()), 400, "unicast"),
        ("POST", "/api/v1/sessions".to_string(), Some(json!({"client_ip": "224.0.0.1"}).to_string()), 400, "unicast"),
        (
            "POST",
            "/api/v1/sessions".to_string(),
            Some(json!({"client_ip": "255.255.255.255"}).to_string()),
            400,
            "unicast",
        ),
        ("POST", "/api/v1/sessions".to_string(), Some(json!({"client_ip": "127.0.0.1"}).to_string()), 400, "unicast"),
        ("POST", "/api/v1/sessions".to_string(), Some(json!({"client_ip": "::1"}).to_string()), 400, "unicast"),
        (
            "POST",
            "/api/v1/sessions".to_string(),
            Some(json!({"client_ip": "203.0.113.5"}).to_string()),
            400,
            "no subnet configured for counting",
        ),
        (
            "POST",
            "/api/v1/sessions".to_string(),
            Some(json!({"client_ip": "fd00:7::2"}).to_string()),
            400,
            "no subnet configured for counting",
        ),
        ("GET", format!("/api/v1/sessions/{missing}"), None, 404, "not found"),
        ("GET", format!("/api/v1/devices/{missing}"), None, 404, "not found"),
        ("DELETE", format!("/api/v1/connections/{missing}"), None, 404, "not found"),
    ] {
        let (s, b) = call(&srv, m, &p, &admin, body);
        assert_eq!(s, want, "{m} {p}: {b}");
        assert!(message(&b).contains(needle), "{m} {p}: {b} lacks {needle:?}");
    }

    for refused in ["0.0.0.0", "203.0.113.5", "fd00:7::2"] {
        let (s, b) = api("GET", &format!("/api/v1/clients/{refused}"), &read, None);
        assert_eq!(s, 404, "a refused session admitted {refused}: {b}");
    }

    // Sessions: open, a second open is 409, close, a second close is 409; read tokens read.
    let open = json!({"client_ip": "10.8.0.2", "username": "alice", "protocol": "openvpn-udp"});
    let (s, b) = api("POST", "/api/v1/sessions", &read, Some(open.clone()));
    assert_eq!(s, 403, "{b}");
    let (s, sess) = api("POST", "/api/v1/sessions", &admin, Some(open.clone()));
    assert_eq!(s, 201, "{sess}");
    assert_eq!(
        (sess["active"].as_bool(), sess["source"].as_str(), sess["username"].as_str()),
        (Some(true), Some("api"), Some("alice"))
    );
    let sid = sess["id"].as_str().unwrap().to_string();
    let (s, b) = api("POST", "/api/v1/sessions", &admin, Some(open));
    assert_eq!(s, 409, "{b}");
    assert!(message(&b).contains(&sid), "the conflict names the active session: {b}");
    let (s, b) = api("GET", "/api/v1/sessions?client=10.8.0.2&active=true", &read, None);
    assert_eq!(s, 200);
    assert_eq!(b["sessions"].as_array().unwrap().len(), 1, "{b}");
    // Traffic of the client counts towards its active session, live.
    tunmeter_lab::traffic::tcp_exchange(&device.ns, e.lab.server_tun_v4().into(), 200_000).expect("upload");
    let t0 = std::time::Instant::now();
    loop {
        let (_, b) = api("GET", &format!("/api/v1/sessions/{sid}"), &read, None);
        if b["up_bytes"].as_u64().unwrap_or(0) >= 200_000 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the session never counted the upload: {b}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (s, b) = api("POST", &format!("/api/v1/sessions/{sid}/close"), &read, None);
    assert_eq!(s, 403, "{b}");
    let (s, closed) = api("POST", &format!("/api/v1/sessions/{sid}/close"), &admin, None);
    assert_eq!(s, 200, "{closed}");
    assert_eq!((closed["active"].as_bool(), closed["close_reason"].as_str()), (Some(false), Some("api")));
    assert!(closed["up_bytes"].as_u64().unwrap() >= 200_000, "{closed}");
    let (s, b) = api("POST", &format!("/api/v1/sessions/{sid}/close"), &admin, None);
    assert_eq!(s, 409, "{b}");
    // A client the ledger has not seen yet is admitted.
    let (s, b) = api("POST", "/api/v1/sessions", &admin, Some(json!({"client_ip": "10.8.0.77"})));
    assert_eq!((s, b["protocol"].as_str()), (201, Some("other")), "{b}");
    let (s, b) = api("GET", "/api/v1/clients/10.8.0.77", &read, None);
    assert_eq!(s, 200, "{b}");

    // Delete: the forward rule goes with the connection; then the device can go.
    let (s, b) = api("DELETE", &format!("/api/v1/connections/{conn_id}"), &read, None);
    assert_eq!(s, 403, "{b}");
    assert!(forward_rule(e, PUB).is_some());
    let (s, _) = api("DELETE", &format!("/api/v1/connections/{conn_id}"), &admin, None);
    assert_eq!(s, 204);
    assert!(forward_rule(e, PUB).is_none(), "the rule is gone with its connection");
    let r = proxies::tcp_request(&customer.ns, public, b"GET /small HTTP/1.0\r\n\r\n".to_vec(), Duration::from_secs(3));
    assert!(r.is_err() || r.as_ref().is_ok_and(|b| b.is_empty()), "the public port still answers: {r:?}");
    let (s, _) = api("DELETE", &format!("/api/v1/connections/{ov_id}"), &admin, None);
    assert_eq!(s, 204);
    let (s, _) = api("DELETE", &format!("/api/v1/devices/{dev_id}"), &admin, None);
    assert_eq!(s, 204);
    let (s, b) = api("GET", "/api/v1/devices", &read, None);
    assert_eq!((s, b["devices"].as_array().unwrap().len()), (200, 0));
    let out = steer(e, &["del", "forward", "--proto", "tcp", "--public-port", &PUB_TAKEN.to_string()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
