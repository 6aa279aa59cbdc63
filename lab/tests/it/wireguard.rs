//! Integration tests of the WireGuard lab: wireguard-go peers in namespaces handshake and carry
//! traffic, read with `wg` (root only, skipped otherwise).

use std::net::IpAddr;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tunmeter_lab::wireguard::{self, WgLab};
use tunmeter_lab::{list_prefix, netns_exec, traffic};

use crate::root;

fn wg_procs(prefix: &str) -> usize {
    let marker = format!("-f wg{prefix}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").contains(&marker))
                .unwrap_or(false)
        })
        .count()
}

#[test]
fn wireguard_lab_handshakes_and_cleans_up() {
    if !root() {
        return;
    }
    let prefix = "hw";
    let t0 = Instant::now();
    let lab = WgLab::up(prefix, 3).unwrap();
    eprintln!("wg up with 3 peers: {:?}", t0.elapsed());
    let srv = lab.server_ns();
    let iface = lab.server_iface();
    assert_eq!(iface, "wghws");
    assert!(netns_exec(&srv, &["ip", "link", "show", &iface]).is_ok());
    // No handshake before traffic.
    let before = lab.latest_handshakes().unwrap();
    assert_eq!(before.len(), 3);
    assert!(before.values().all(|&t| t == 0), "{before:?}");

    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    for i in 0..3 {
        let t = lab.handshake(i).unwrap();
        assert!(t + 5 >= now && t <= now + 60, "handshake time {t} vs now {now}");
    }
    // `wg show IFACE dump` in the server namespace: every peer has a non-zero latest handshake,
    // its allowed IP and an endpoint on its link.
    let dump = lab.dump().unwrap();
    for i in 0..3 {
        let line = dump
            .lines()
            .find(|l| l.starts_with(lab.peer_public_key(i)))
            .unwrap_or_else(|| panic!("peer {i} missing:\n{dump}"));
        let f: Vec<&str> = line.split('\t').collect();
        assert_ne!(f[4], "0", "{line}");
        assert!(f[3].contains(&format!("{}/32", lab.peer_addr(i))), "{line}");
        assert!(f[2].starts_with(&format!("172.31.{}.2:", i + 1)), "{line}");
    }
    // Traffic both ways over the tunnel, IPv4 and IPv6 (the ping from the server side).
    let p0: IpAddr = lab.peer_addr(1).into();
    traffic::ping(&srv, p0, 2).unwrap();
    traffic::ping(&lab.peer_ns(2), "fd00:7::1".parse().unwrap(), 2).unwrap();
    assert_ne!(lab.server_public_key(), lab.peer_public_key(0));

    lab.down().unwrap();
    assert_eq!(list_prefix(prefix).unwrap(), Vec::<String>::new());
    assert_eq!(wg_procs(prefix), 0);
    assert!(!Path::new(&format!("{}/wghws.sock", wireguard::SOCKET_DIR)).exists());
    assert!(!wireguard::lab_dir(prefix).exists());
}

#[test]
fn wireguard_leftovers_are_removed_by_the_next_up() {
    if !root() {
        return;
    }
    let prefix = "hv";
    let lab = WgLab::up(prefix, 1).unwrap();
    std::mem::forget(lab);
    assert_eq!(wg_procs(prefix), 2);
    let lab = WgLab::up(prefix, 1).unwrap();
    assert_eq!(wg_procs(prefix), 2, "old wireguard-go processes survive");
    lab.handshake(0).unwrap();
    drop(lab);
    assert_eq!(wg_procs(prefix), 0);
    assert_eq!(list_prefix(prefix).unwrap(), Vec::<String>::new());
    assert!(WgLab::up("BAD", 1).is_err());
}
