//! Identity with a real userspace WireGuard (Debian's wireguard-go, no kernel module) and the
//! real daemon: peers become sessions named by their public key when they handshake, a device
//! behind a peer goes online, offline after a silence (device.offline) and back
//! (device.recovered), with the events in the durable outbox.

use crate::support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{PinDir, control::call, daemon::Daemon, require_root};
use tunmeter_lab::wireguard::WgLab;

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn wireguard_peers_become_sessions_and_devices_go_offline_and_recover() {
    if !require_root() {
        return;
    }
    let lab = WgLab::up("tmwgi", 2).expect("WireGuard lab up");
    let iface = lab.server_iface();
    let (state, log) = support::env::daemon_paths("tmwgi");
    let config = state.join("tunmeter.toml");
    std::fs::write(
        &config,
        format!(
            "[[interface]]\nname = \"{iface}\"\nlayer = \"l3\"\nsubnets = [\"10.7.0.0/24\", \"fd00:7::/64\"]\n\
             [identity]\nreconcile_interval_ms = 300\ndevice_offline_after_secs = 3\n\
             [[wireguard]]\ninterface = \"{iface}\"\n"
        ),
    )
    .unwrap();
    let pins = PinDir::new("tmwgi");
    let (pin, st, cfg) = (pins.path().display().to_string(), state.display().to_string(), config.display().to_string());
    let args = ["--config", &cfg, "--pin-dir", &pin, "--state-dir", &st, "--node-id", "tmwgi", "--api-listen", ""];
    let args = [&args[..], &["--poll-interval-ms", "200", "--flush-interval-ms", "500"]].concat();
    let mut d = Daemon::start(&lab.server_ns(), &args, &log);
    d.wait_log("ledger and API running", 1, Duration::from_secs(30));

    // Peer 2's address is a device.
    let dev_ip = lab.peer_addr(1);
    let (s, dev) =
        call(&state, "POST", "/api/v1/devices", Some(json!({"name": "router-2", "vpn_ip": dev_ip.to_string()})));
    assert_eq!(s, 201, "{dev}");
    let dev_id = dev["id"].as_str().unwrap().to_string();

    // No handshake yet: no sessions.
    std::thread::sleep(Duration::from_secs(1));
    let (_, v) = call(&state, "GET", "/api/v1/sessions?active=true", None);
    assert_eq!(v["sessions"].as_array().unwrap().len(), 0, "{v}");

    // Peer 1 handshakes: its addresses get sessions of protocol wireguard, named by its key.
    lab.handshake(0).unwrap();
    let p1 = lab.peer_addr(0);
    wait("peer 1's session", Duration::from_secs(10), || {
        let (_, v) = call(&state, "GET", &format!("/api/v1/sessions?active=true&client={p1}"), None);
        v["sessions"].as_array().is_some_and(|s| s.len() == 1)
    });
    let (_, v) = call(&state, "GET", &format!("/api/v1/sessions?active=true&client={p1}"), None);
    let s = &v["sessions"][0];
    assert_eq!(s["protocol"], "wireguard", "{s}");
    assert_eq!(s["instance"], iface, "{s}");
    assert_eq!(s["source"], "wireguard", "{s}");
    assert!(s["real_address"].as_str().unwrap().starts_with(&lab.server_real_ip(0).to_string()[..4]), "{s}");
    wait("peer 1 named in the client view", Duration::from_secs(10), || {
        let (_, c) = call(&state, "GET", &format!("/api/v1/clients/{p1}"), None);
        c["identity"]["wg_public_key"] == lab.peer_public_key(0) && c["identity"]["protocol"] == "wireguard"
    });

    // The device's peer handshakes and sends: online; then silence: offline; then back.
    lab.handshake(1).unwrap();
    let status = || {
        let (_, v) = call(&state, "GET", &format!("/api/v1/devices/{dev_id}"), None);
        v["status"].as_str().unwrap_or("").to_string()
    };
    wait("device online", Duration::from_secs(10), || status() == "online");
    wait("device offline after 3 s of silence", Duration::from_secs(20), || status() == "offline");
    tunmeter_lab::traffic::ping(&lab.peer_ns(1), lab.server_addr().into(), 2).unwrap();
    wait("device recovered", Duration::from_secs(10), || status() == "online");

    let (_, ev) = call(&state, "GET", &format!("/api/v1/webhooks/events?subject={dev_id}"), None);
    let kinds: Vec<&str> = ev["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    // Newest first. The first contact (unknown -> online) is stored without an event; every
    // change after it sends one.
    assert_eq!(kinds, ["device.recovered", "device.offline"], "{ev}");
    assert_eq!(ev["events"][1]["data"]["device"]["name"], "router-2", "{ev}");
    assert_eq!(ev["events"][1]["data"]["device"]["status"], "offline", "{ev}");
    assert!(ev["events"][0]["data"]["latest_handshake_unix_ms"].as_u64().is_some(), "{ev}");

    assert!(d.stop().is_some_and(|s| s.success()));
    drop(pins);
    let _ = std::fs::remove_dir_all(&state);
    lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix("tmwgi").unwrap().is_empty());
}
