//! Integration tests of the real OpenVPN lab (root only; skipped otherwise). Each test uses its
//! own prefix (`hb`, `hk`, `hl`) so they can run in parallel with each other and other labs.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tunmeter_lab::list_prefix;
use tunmeter_lab::openvpn::{self, OvpnLab, OvpnLabConfig, Transport, UpDown};
use tunmeter_lab::oracle::{Counter, Oracle, OracleCounts};

use crate::root;

/// Pids of processes whose command line contains `marker`.
fn procs_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " ").contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

fn assert_gone(prefix: &str) {
    assert_eq!(list_prefix(prefix).unwrap(), Vec::<String>::new(), "namespaces left");
    let dir = openvpn::lab_dir(prefix);
    assert!(!dir.exists(), "{} left", dir.display());
    assert_eq!(procs_with(&dir.to_string_lossy()), Vec::<u32>::new(), "processes left");
}

/// Poll `f` until it returns true (bounded).
fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn counts(lab: &OvpnLab, o: &Oracle, i: usize) -> UpDown {
    lab.client_counts(&o.read().unwrap(), i)
}

fn all_counts(lab: &OvpnLab, c: &OracleCounts) -> Vec<UpDown> {
    (0..lab.clients().len()).map(|i| lab.client_counts(c, i)).collect()
}

fn delta(a: UpDown, b: UpDown) -> UpDown {
    UpDown { upload: b.upload - a.upload, download: b.download - a.download }
}

#[test]
fn openvpn_lab_end_to_end() {
    if !root() {
        return;
    }
    let prefix = "hb";
    let mut cfg = OvpnLabConfig::demo(prefix, 6);
    for c in &mut cfg.clients {
        c.username = format!("{}-user", c.name);
    }
    let t0 = Instant::now();
    let mut lab = OvpnLab::up(cfg).unwrap();
    let t_up = t0.elapsed();
    let oracle = lab.install_oracle().unwrap();
    let t1 = Instant::now();
    let addrs = lab.connect_all(Duration::from_secs(30)).unwrap();
    eprintln!("up: {t_up:?}, connect 6 clients: {:?}", t1.elapsed());
    assert_eq!(lab.clients().iter().filter(|c| c.transport == Transport::Udp).count(), 3);
    assert_eq!(lab.clients().iter().filter(|c| c.transport == Transport::Tcp).count(), 3);
    for (i, a) in addrs.iter().enumerate() {
        assert_eq!(*a, lab.expected_addrs(i), "client {i}");
        assert!(a.v6.is_some(), "client {i} has no IPv6");
    }

    // Every client reaches its server over the tunnel, IPv4 and IPv6.
    for i in 0..6 {
        lab.ping(i, false, 2).unwrap();
        lab.ping(i, true, 2).unwrap();
    }

    // Both management ports list their clients with username and VPN addresses.
    for t in Transport::ALL {
        let text = lab.status(t).unwrap();
        assert!(text.trim_end().ends_with("END"), "{text}");
        let listed = openvpn::parse_status_clients(&text);
        for (i, c) in lab.clients().iter().enumerate() {
            let row = listed.iter().find(|r| r.common_name == c.name);
            if c.transport != t {
                assert!(row.is_none(), "{} listed by the {t} instance", c.name);
                continue;
            }
            let row = row.unwrap_or_else(|| panic!("{} missing from {t} status:\n{text}", c.name));
            assert_eq!(row.username, format!("{}-user", c.name));
            assert_eq!(row.virtual_v4, lab.expected_addrs(i).v4.to_string());
            assert!(row.real_address.starts_with(&format!("{}:", lab.client_real_ip(i))), "{row:?}");
        }
    }
    // The status file has the same clients.
    eventually(Duration::from_secs(5), "status file lists 3 UDP clients", || {
        let text = std::fs::read_to_string(lab.status_file(Transport::Udp)).unwrap_or_default();
        openvpn::parse_status_clients(&text).len() == 3
    });

    // Exact UDP datagrams: IP length = payload + 8 (UDP) + 20 (IPv4) / 40 (IPv6); only the
    // sending client's counters move.
    for i in 0..6 {
        let v6 = i % 2 == 1;
        let hdr = if v6 { 48 } else { 28 };
        let before = all_counts(&lab, &oracle.read().unwrap());
        lab.udp_transfer(i, v6, 10, 300 + i, 900 + i).unwrap();
        let after = all_counts(&lab, &oracle.read().unwrap());
        for k in 0..6 {
            let d = delta(before[k], after[k]);
            if k == i {
                assert_eq!(d.upload, Counter { packets: 10, bytes: 10 * (300 + i + hdr) as u64 }, "client {i} up");
                assert_eq!(d.download, Counter { packets: 10, bytes: 10 * (900 + i + hdr) as u64 }, "client {i} down");
            } else {
                assert_eq!(d, UpDown::default(), "client {k} moved during client {i}'s transfer");
            }
        }
    }

    // TCP of known payload in both directions (different sizes, so a swap is caught).
    for i in 0..6 {
        for v6 in [false, true] {
            let before = counts(&lab, &oracle, i);
            let (up, down) = (30_000 + 1000 * i as u64, 120_000 + 5000 * i as u64);
            lab.tcp_transfer(i, v6, up, down).unwrap();
            let d = delta(before, counts(&lab, &oracle, i));
            assert!(d.upload.bytes >= up && d.upload.bytes < up + down / 4, "client {i} v6={v6}: {d:?}");
            assert!(d.download.bytes >= down && d.download.bytes < down + down / 4, "client {i} v6={v6}: {d:?}");
        }
    }

    // Customer namespace reaches a client through the server (forwarding + pushed routes).
    let ns = lab.cust_ns();
    let c0: IpAddr = lab.expected_addrs(0).v4.into();
    tunmeter_lab::traffic::ping(&ns, c0, 2).unwrap();
    tunmeter_lab::transfer::tcp_transfer(&ns, c0, 1000, 2000).unwrap();

    // Disconnect one client per instance: the servers drop them from their status.
    for i in [0, 1] {
        let t0 = Instant::now();
        lab.disconnect(i).unwrap();
        let (t, name) = (lab.clients()[i].transport, lab.clients()[i].name.clone());
        eventually(Duration::from_secs(15), &format!("{name} gone from {t} status"), || {
            !lab.status_clients(t).unwrap().iter().any(|r| r.common_name == name)
        });
        eprintln!("disconnect of {name} ({t}) seen after {:?}", t0.elapsed());
    }
    assert!(lab.disconnect(0).is_err(), "double disconnect must fail");

    // Stop and restart the TCP instance: management and tun1 go away, clients come back.
    lab.stop_instance(Transport::Tcp).unwrap();
    assert!(lab.status(Transport::Tcp).is_err(), "management still answers");
    let srv = lab.server_ns();
    assert!(tunmeter_lab::netns_exec(&srv, &["ip", "link", "show", "tun1"]).is_err(), "tun1 still there");
    assert!(lab.stop_instance(Transport::Tcp).is_err());
    lab.start_instance(Transport::Tcp).unwrap();
    let t0 = Instant::now();
    for i in [3, 5] {
        assert_eq!(lab.wait_connected(i, Duration::from_secs(30)).unwrap(), lab.expected_addrs(i));
        lab.ping(i, false, 2).unwrap();
    }
    eprintln!("TCP clients back after {:?}", t0.elapsed());
    let listed = lab.status_clients(Transport::Tcp).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    // The oracle keeps counting on the re-created tun1.
    let before = counts(&lab, &oracle, 3);
    lab.tcp_transfer(3, false, 5000, 7000).unwrap();
    assert!(delta(before, counts(&lab, &oracle, 3)).download.bytes >= 7000);

    // Reconnect a disconnected client.
    lab.connect(0).unwrap();
    lab.wait_connected(0, Duration::from_secs(20)).unwrap();
    lab.udp_transfer(0, false, 2, 100, 100).unwrap();

    let logs = [lab.server_log(Transport::Udp), lab.server_log(Transport::Tcp), lab.client_log(0)];
    for l in &logs {
        assert!(l.exists(), "{}", l.display());
    }
    let t0 = Instant::now();
    drop(oracle);
    lab.down().unwrap();
    eprintln!("down: {:?}", t0.elapsed());
    assert_gone(prefix);
    assert!(logs.iter().all(|l| !Path::new(l).exists()));
}

#[test]
fn hook_runs_on_connect_and_disconnect_with_management_password() {
    if !root() {
        return;
    }
    let prefix = "hk";
    let work = std::env::temp_dir().join(format!("tunmeter-lab-hk-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let script = work.join("hook.sh");
    let out = work.join("hook.out");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1|$script_type|$common_name|$username|$ifconfig_pool_remote_ip|$trusted_ip\" >> {}\nexit 0\n",
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut cfg = OvpnLabConfig::demo(prefix, 2);
    cfg.hook = Some(format!("{} extra-arg", script.display()));
    cfg.mgmt_password = Some("s3cret".into());
    let mut lab = OvpnLab::up(cfg).unwrap();
    let pw = lab.mgmt_password_file().unwrap();
    assert_eq!(std::fs::read_to_string(&pw).unwrap().trim(), "s3cret");
    lab.connect_all(Duration::from_secs(30)).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("extra-arg|client-connect|alice|alice|10.8.0.2|172.30.1.2"), "{text}");
    assert!(text.contains("extra-arg|client-connect|bob|bob|10.8.100.3|172.30.2.2"), "{text}");
    // Management with the password works.
    assert_eq!(lab.status_clients(Transport::Udp).unwrap().len(), 1);
    assert_eq!(lab.status_clients(Transport::Tcp).unwrap().len(), 1);
    lab.disconnect(1).unwrap();
    eventually(Duration::from_secs(10), "client-disconnect hook of bob", || {
        std::fs::read_to_string(&out).unwrap().contains("|client-disconnect|bob|bob|10.8.100.3|")
    });
    lab.down().unwrap();
    assert_gone(prefix);
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn up_removes_leftovers_of_a_killed_lab() {
    if !root() {
        return;
    }
    let prefix = "hl";
    let mut lab = OvpnLab::up(OvpnLabConfig::demo(prefix, 1)).unwrap();
    lab.connect_all(Duration::from_secs(30)).unwrap();
    let dir = openvpn::lab_dir(prefix);
    let marker = dir.to_string_lossy().into_owned();
    assert_eq!(procs_with(&marker).len(), 3, "two servers and one client");
    // As if the process had been killed: nothing cleaned up.
    std::mem::forget(lab);
    let old = procs_with(&marker);
    let mut lab = OvpnLab::up(OvpnLabConfig::demo(prefix, 1)).unwrap();
    let now = procs_with(&marker);
    assert!(old.iter().all(|p| !now.contains(p)), "old processes survive: {old:?} / {now:?}");
    lab.connect_all(Duration::from_secs(30)).unwrap();
    lab.ping(0, false, 1).unwrap();
    drop(lab);
    assert_gone(prefix);
    // cleanup() of nothing is fine.
    openvpn::cleanup(prefix).unwrap();
}

#[test]
fn bad_configs_are_rejected_before_anything_is_built() {
    let mut cfg = OvpnLabConfig::demo("hz", 2);
    cfg.clients[1].username = "with space".into();
    assert!(OvpnLab::up(cfg).is_err());
    assert!(OvpnLab::up(OvpnLabConfig::demo("Bad", 1)).is_err());
    if root() {
        assert_eq!(list_prefix("hz").unwrap(), Vec::<String>::new());
    }
}
