//! Integration tests of the namespace lab. They need root (network namespaces, TUN, nftables) and
//! are skipped otherwise. Every test uses its own prefix so they can run in parallel.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tunmeter_lab::oracle::{Counter, Direction, Oracle, OracleCounts};
use tunmeter_lab::traffic::{self, RoundSpec};
use tunmeter_lab::{
    Client, ETH_DEV, Lab, LabConfig, RelayStats, TUN_DEV, cleanup_prefix, in_netns, link_stats, list_prefix, netns_exec,
};

use crate::root;

fn cfg(prefix: &str, tun: usize, eth: usize) -> LabConfig {
    LabConfig { prefix: prefix.into(), tun_clients: tun, eth_clients: eth }
}

/// `ip netns list` names starting with `prefix-`.
fn ip_netns_list(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

fn both(c: &Client) -> [IpAddr; 2] {
    [c.v4.into(), c.v6.into()]
}

/// Read the oracle until every chain satisfies `sum(per_client) + other == total` (a packet
/// arriving while nft walks the rules can break it for one reading). Bounded.
fn read_consistent(o: &Oracle) -> OracleCounts {
    let mut last = None;
    for _ in 0..10 {
        let c = o.read().unwrap();
        let ok = c.totals.iter().all(|((dev, dir), total)| c.client_sum(dev, *dir) + c.other_of(dev, *dir) == *total);
        if ok {
            return c;
        }
        last = Some(c);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("oracle never consistent: {last:#?}");
}

/// Relay stats and a consistent oracle reading with no packet relayed in between, so the two can
/// be compared exactly (late IPv6 noise such as MLD reports may pass at any time). Bounded.
fn quiet_snapshot(lab: &Lab, o: &Oracle) -> (RelayStats, OracleCounts) {
    for _ in 0..20 {
        let r0 = lab.relay_stats();
        let c = read_consistent(o);
        if lab.relay_stats() == r0 {
            return (r0, c);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("relay never quiet");
}

#[test]
fn bad_prefixes_are_rejected() {
    for p in ["", "UPPER", "toolongprefix", "a-b", "a/b"] {
        assert!(Lab::up(cfg(p, 1, 1)).is_err(), "{p:?} accepted");
        assert!(cleanup_prefix(p).is_err(), "{p:?} accepted by cleanup");
    }
}

#[test]
fn traffic_from_every_client_and_oracle_counts() {
    if !root() {
        return;
    }
    let lab = Lab::up(cfg("tmit1", 3, 3)).unwrap();
    let srv = lab.server_ns();
    assert_eq!(lab.tun_clients().len(), 3);
    assert_eq!(lab.eth_clients()[2].ns, "tmit1-e3");
    assert_eq!(lab.tun_clients()[0].v4.to_string(), "10.8.0.2");
    assert_eq!(lab.eth_clients()[1].v6.to_string(), "fd00:9::3");

    // Each primitive once, v4 and v6, from every client.
    for c in lab.tun_clients() {
        for dst in [IpAddr::from(lab.server_tun_v4()), lab.server_tun_v6().into()] {
            traffic::ping(&c.ns, dst, 3).unwrap();
            traffic::tcp_exchange(&c.ns, dst, 100_000).unwrap();
            traffic::udp_exchange(&c.ns, dst, 10, 1200).unwrap();
        }
    }
    for c in lab.eth_clients() {
        for dst in [IpAddr::from(lab.server_eth_v4()), lab.server_eth_v6().into()] {
            traffic::ping(&c.ns, dst, 3).unwrap();
            traffic::tcp_exchange(&c.ns, dst, 100_000).unwrap();
            traffic::udp_exchange(&c.ns, dst, 10, 1200).unwrap();
        }
    }

    let oracle = Oracle::install(&lab).unwrap();
    let (relay0, before) = quiet_snapshot(&lab, &oracle);
    traffic::mixed_round(&lab, 2).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (relay1, after) = quiet_snapshot(&lab, &oracle);

    for (dev, clients) in [(TUN_DEV, lab.tun_clients()), (ETH_DEV, lab.eth_clients())] {
        for c in &clients {
            for a in both(c) {
                for dir in [Direction::Ingress, Direction::Egress] {
                    let d = after.client(dev, a, dir) - before.client(dev, a, dir);
                    assert!(d.packets > 0 && d.bytes > 0, "{dev} {a} {dir:?}: {d:?}");
                }
            }
        }
        for dir in [Direction::Ingress, Direction::Egress] {
            let sum = after.client_sum(dev, dir);
            let total = after.total(dev, dir);
            let other = after.other_of(dev, dir);
            assert_eq!(sum, total - other, "{dev} {dir:?}");
            eprintln!("{dev} {dir:?}: clients {sum:?} other {other:?} total {total:?}");
        }
    }
    // Clients send different amounts, so their counters differ.
    let a = after.client(TUN_DEV, lab.tun_clients()[0].v4.into(), Direction::Ingress);
    let b = after.client(TUN_DEV, lab.tun_clients()[1].v4.into(), Direction::Ingress);
    assert_ne!(a.bytes, b.bytes);

    // Everything the relay wrote into the server tun passed tun0's ingress hook.
    let ing = after.total(TUN_DEV, Direction::Ingress) - before.total(TUN_DEV, Direction::Ingress);
    let rs = (relay1.to_server_packets - relay0.to_server_packets, relay1.to_server_bytes - relay0.to_server_bytes);
    eprintln!("tun0 ingress delta {ing:?}, relay to-server delta {rs:?}");
    assert_eq!((ing.packets, ing.bytes), rs);
    let eg = after.total(TUN_DEV, Direction::Egress) - before.total(TUN_DEV, Direction::Egress);
    let rc = (
        (relay1.to_client_packets + relay1.dropped_packets) - (relay0.to_client_packets + relay0.dropped_packets),
        (relay1.to_client_bytes + relay1.dropped_bytes) - (relay0.to_client_bytes + relay0.dropped_bytes),
    );
    eprintln!("tun0 egress delta {eg:?}, relay from-server delta {rc:?}");
    assert!(eg.packets > 0 && rc.0 >= eg.packets);

    let ls = link_stats(&srv, TUN_DEV).unwrap();
    assert!(ls.rx_packets > 0 && ls.tx_packets > 0, "{ls:?}");
    oracle.remove().unwrap();
    assert!(netns_exec(&srv, &["nft", "list", "table", "netdev", "tmoracle"]).is_err());
    lab.down().unwrap();
    assert!(ip_netns_list("tmit1").is_empty());
}

/// One ping each way, counted exactly: the oracle reports L3 bytes on every hook.
#[test]
fn oracle_counts_l3_bytes_of_one_ping() {
    if !root() {
        return;
    }
    let lab = Lab::up(cfg("tmit2", 1, 1)).unwrap();
    let t = &lab.tun_clients()[0];
    let e = &lab.eth_clients()[0];
    let pairs = [
        (TUN_DEV, t, IpAddr::from(lab.server_tun_v4()), IpAddr::from(t.v4), 84u64),
        (TUN_DEV, t, lab.server_tun_v6().into(), t.v6.into(), 104),
        (ETH_DEV, e, lab.server_eth_v4().into(), e.v4.into(), 84),
        (ETH_DEV, e, lab.server_eth_v6().into(), e.v6.into(), 104),
    ];
    // Warm up neighbour caches so no ARP/ND is counted below.
    for (_, c, dst, _, _) in &pairs {
        traffic::ping(&c.ns, *dst, 1).unwrap();
    }
    let oracle = Oracle::install(&lab).unwrap();
    let link0 = link_stats(&lab.server_ns(), ETH_DEV).unwrap();
    for (dev, c, dst, src, len) in pairs {
        let before = oracle.read().unwrap();
        // 56 bytes of ICMP data: 84 bytes of IPv4, 104 bytes of IPv6.
        traffic::ping(&c.ns, dst, 1).unwrap();
        let after = oracle.read().unwrap();
        for dir in [Direction::Ingress, Direction::Egress] {
            let d = after.client(dev, src, dir) - before.client(dev, src, dir);
            assert_eq!(d, Counter { packets: 1, bytes: len }, "{dev} {src} {dir:?}");
        }
    }
    // The kernel's own link counters of the veth count Ethernet frames (L3 + 14).
    let link1 = link_stats(&lab.server_ns(), ETH_DEV).unwrap();
    assert!(link1.tx_bytes - link0.tx_bytes >= 84 + 104 + 2 * 14);
    drop(oracle);
    drop(lab);
    assert!(ip_netns_list("tmit2").is_empty());
}

#[test]
fn recreate_server_tun_and_rebind_oracle() {
    if !root() {
        return;
    }
    let mut lab = Lab::up(cfg("tmit3", 2, 1)).unwrap();
    let srv = lab.server_ns();
    let oracle = Oracle::install(&lab).unwrap();
    traffic::mixed_round(&lab, 1).unwrap();
    let old = lab.server_tun_ifindex();
    let c1 = lab.tun_clients()[0].clone();

    // Background traffic keeps running across the re-creation.
    let targets = lab.targets();
    let spec = RoundSpec { tcp_base: 2048, udp_count: 2, udp_size: 64, pings: 1 };
    let bg = traffic::background_with(targets, spec, Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let new = lab.recreate_server_tun().unwrap();
    assert_ne!(new, 0);
    assert_eq!(new, lab.server_tun_ifindex());
    let seen = in_netns(&srv, || {
        let c = std::ffi::CString::new(TUN_DEV).unwrap();
        // SAFETY: valid C string.
        Ok(unsafe { libc::if_nametoindex(c.as_ptr()) })
    })
    .unwrap();
    assert_eq!(seen, new);
    eprintln!("tun0 ifindex {old} -> {new}");
    let addrs = netns_exec(&srv, &["ip", "addr", "show", "dev", TUN_DEV]).unwrap();
    assert!(addrs.contains("10.8.0.1/24") && addrs.contains("fd00:8::1/64"), "{addrs}");

    oracle.rebind_tun().unwrap();
    let fresh = oracle.read().unwrap();
    // Rebuilt chains start at zero (give or take a background packet that just passed).
    assert!(fresh.total(TUN_DEV, Direction::Ingress).packets < 1000);

    // Traffic flows again through the new device and is counted on it.
    traffic::ping(&c1.ns, lab.server_tun_v4().into(), 3).unwrap();
    traffic::mixed_round(&lab, 1).unwrap();
    let after = oracle.read().unwrap();
    for a in both(&c1) {
        for dir in [Direction::Ingress, Direction::Egress] {
            assert!(after.client(TUN_DEV, a, dir).packets > 0, "{a} {dir:?}");
        }
    }
    let r0 = bg.rounds();
    let deadline = Instant::now() + Duration::from_secs(20);
    while bg.rounds() < r0 + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = bg.stop();
    eprintln!("background: {stats:?}");
    assert!(stats.rounds >= r0 + 2, "background traffic did not resume: {stats:?}");
    drop(oracle);
    lab.down().unwrap();
    assert!(ip_netns_list("tmit3").is_empty());
}

#[test]
fn drop_cleans_up_even_after_panic() {
    if !root() {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let lab = Lab::up(cfg("tmit4", 1, 1)).unwrap();
        let _oracle = Oracle::install(&lab).unwrap();
        let _bg = traffic::background(&lab, Duration::from_millis(50)).unwrap();
        tx.send(lab.server_ns()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        panic!("deliberate test panic");
    });
    let srv = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(srv, "tmit4-srv");
    assert!(h.join().is_err());
    assert!(ip_netns_list("tmit4").is_empty());
    assert!(list_prefix("tmit4").unwrap().is_empty());
}

#[test]
fn up_removes_leftovers_and_down_removes_lab() {
    if !root() {
        return;
    }
    for ns in ["tmit5-srv", "tmit5-junk"] {
        let _ = Command::new("ip").args(["netns", "add", ns]).status();
    }
    let lab = Lab::up(cfg("tmit5", 1, 0)).unwrap();
    assert!(!ip_netns_list("tmit5").contains(&"tmit5-junk".to_string()));
    assert_eq!(ip_netns_list("tmit5").len(), 3, "{:?}", ip_netns_list("tmit5"));
    let t = &lab.tun_clients()[0];
    traffic::tcp_exchange(&t.ns, lab.server_tun_v6().into(), 1).unwrap();
    traffic::udp_exchange(&t.ns, lab.server_tun_v4().into(), 1, 1).unwrap();
    lab.down().unwrap();
    assert!(ip_netns_list("tmit5").is_empty());
    // Also removes namespaces a killed process left behind.
    let _ = Command::new("ip").args(["netns", "add", "tmit5-left"]).status();
    cleanup_prefix("tmit5").unwrap();
    assert!(ip_netns_list("tmit5").is_empty());
}

#[test]
fn binary_up_with_traffic_then_sigterm() {
    if !root() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tunmeter-lab");
    let mut child = Command::new(bin)
        .args(["up", "--prefix", "tmit6", "--tun-clients", "1", "--eth-clients", "1", "--traffic"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(|l| l.ok());
        let _ = tx.send(first);
        // Anything more on stdout is a bug.
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        assert!(rest.is_empty(), "extra stdout: {rest:?}");
    });
    let line = rx.recv_timeout(Duration::from_secs(60));
    let ok = matches!(&line, Ok(Some(l)) if l == "READY tmit6-srv");
    if ok {
        assert_eq!(ip_netns_list("tmit6").len(), 4);
        std::thread::sleep(Duration::from_secs(2));
        // The background traffic reaches the server tun.
        let c = tunmeter_lab::link_stats("tmit6-srv", TUN_DEV).unwrap();
        assert!(c.rx_packets > 0);
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(ok, "no READY line: {line:?}");
    let status = status.expect("tunmeter-lab did not exit after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(ip_netns_list("tmit6").is_empty());

    // `down` on a clean system is a no-op that succeeds.
    let st = Command::new(bin).args(["down", "--prefix", "tmit6"]).status().unwrap();
    assert!(st.success());
}

/// With GSO off, tun0's egress hook sees exactly the packets the relay then reads from the tun.
#[test]
fn gso_off_makes_egress_hook_match_relay() {
    if !root() {
        return;
    }
    let mut lab = Lab::up(cfg("tmit7", 2, 1)).unwrap();
    lab.set_gso(false).unwrap();
    let oracle = Oracle::install(&lab).unwrap();
    let (r0, before) = quiet_snapshot(&lab, &oracle);
    traffic::mixed_round(&lab, 3).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (r1, after) = quiet_snapshot(&lab, &oracle);
    let eg = after.total(TUN_DEV, Direction::Egress) - before.total(TUN_DEV, Direction::Egress);
    let relayed = Counter {
        packets: (r1.to_client_packets + r1.dropped_packets) - (r0.to_client_packets + r0.dropped_packets),
        bytes: (r1.to_client_bytes + r1.dropped_bytes) - (r0.to_client_bytes + r0.dropped_bytes),
    };
    eprintln!("GSO off: tun0 egress {eg:?}, relay read {relayed:?}");
    assert_eq!(eg, relayed);
    // eth0: no packet bigger than the MTU (1500 L3 bytes) passed either hook.
    for dir in [Direction::Ingress, Direction::Egress] {
        for c in lab.eth_clients() {
            for a in both(&c) {
                let d = after.client(ETH_DEV, a, dir) - before.client(ETH_DEV, a, dir);
                assert!(d.packets > 0 && d.bytes <= d.packets * 1500, "{a} {dir:?} {d:?}");
            }
        }
    }
    // Re-created server tun keeps GSO off.
    lab.recreate_server_tun().unwrap();
    let d = netns_exec(&lab.server_ns(), &["ip", "-d", "link", "show", TUN_DEV]).unwrap();
    assert!(d.contains("gso_max_segs 1 "), "{d}");
    drop(oracle);
    lab.down().unwrap();
    assert!(ip_netns_list("tmit7").is_empty());
}
