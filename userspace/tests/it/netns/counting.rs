//! Counts equal nftables and `ip -s link` for every client, `kill -9` and restart under
//! traffic lose and double nothing, a re-created tun device is counted again within 2 s.

use super::*;

#[test]
fn counts_equal_nftables_and_link_stats_for_every_client() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmna", 3, 3);
    // One kernel packet per wire packet, so `ip -s link` (which counts segments) can be compared
    // too; nftables and tunmeter agree with or without GSO (the restart test runs with it).
    env.lab.set_gso(false).unwrap();
    let ns = env.lab.server_ns();
    let _daemon = env.start_daemon(&[]);
    let fo = ForeignObserver::attach(&ns, "eth0", false);
    let before = quiet_reading(&env);
    let ff = [fo.packets("upload"), fo.packets("download")];
    traffic::mixed_round(&env.lab, 3).expect("traffic");
    traffic::mixed_round(&env.lab, 1).expect("traffic");
    let after = quiet_reading(&env);

    assert_clients_match(&env, &before, &after);
    assert_totals_match(&before, &after);
    // tunmeter only observes: the next program on the device still runs.
    assert_foreign_program_saw_everything(&fo, &before, &after, ff);

    // `ip -s link`: every packet received on both devices was seen on ingress (upload), every
    // packet sent on egress (download). Ethernet counters include the 14-byte header.
    let (bt, at, be, ae) = (&before.tun, &after.tun, &before.eth, &after.eth);
    assert_eq!(at.tx_dropped, bt.tx_dropped, "tun0 dropped packets: byte totals would not be comparable");
    let up = d(outcome_sum(&after.stats, "upload"), outcome_sum(&before.stats, "upload"));
    let rx_packets = (at.rx_packets - bt.rx_packets) + (ae.rx_packets - be.rx_packets);
    let rx_bytes = (at.rx_bytes - bt.rx_bytes) + (ae.rx_bytes - be.rx_bytes) - 14 * (ae.rx_packets - be.rx_packets);
    assert_eq!(up, Count { bytes: rx_bytes, packets: rx_packets }, "upload vs ip -s link rx");
    let down = d(outcome_sum(&after.stats, "download"), outcome_sum(&before.stats, "download"));
    let tx_packets = (at.tx_packets - bt.tx_packets) + (ae.tx_packets - be.tx_packets);
    let tx_bytes = (at.tx_bytes - bt.tx_bytes) + (ae.tx_bytes - be.tx_bytes) - 14 * (ae.tx_packets - be.tx_packets);
    assert_eq!(down, Count { bytes: tx_bytes, packets: tx_packets }, "download vs ip -s link tx");

    // The CLI shows the same numbers, as JSON, without the daemon's help.
    let out = support::daemon::output(&env.lab.server_ns(), &["clients", "--json", "--pin-dir", &env.path_args().0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = v["clients"].as_array().unwrap().iter().find(|c| c["ip"] == "10.8.0.2").expect("10.8.0.2 in JSON");
    assert!(c["upload"]["bytes"].as_u64().unwrap() >= tm_of(&after, "10.8.0.2".parse().unwrap()).0.bytes);
    assert!(c["last_seen_unix_ms"].as_u64().is_some(), "last seen from the kernel clock");
}

#[test]
fn kill_9_and_restart_under_traffic_lose_and_double_nothing() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmnr", 2, 2);
    let mut daemon = env.start_daemon(&[]);
    let before = quiet_reading(&env);

    let bg =
        traffic::background_with(env.lab.targets(), traffic::RoundSpec::scaled(2), Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    daemon.kill9();
    // Counting goes on with no daemon: the links are pinned.
    let mid = read_clients(&env.maps(), None).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let later = read_clients(&env.maps(), None).unwrap();
    let total = |s: &ClientsSnapshot| s.clients.iter().map(|c| c.upload.packets + c.download.packets).sum::<u64>();
    assert!(total(&later) > total(&mid), "counting stopped while the daemon was down");

    let mut daemon = env.start_daemon(&[]);
    assert!(
        daemon.log_text().contains("adopted pinned link"),
        "restart must adopt the pinned links:\n{}",
        daemon.log_text()
    );
    std::thread::sleep(Duration::from_millis(800));
    // And once more, with a clean stop this time.
    assert!(daemon.stop().is_some_and(|s| s.success()), "SIGTERM exits 0");
    let _daemon = env.start_daemon(&[]);
    std::thread::sleep(Duration::from_millis(500));
    let st = bg.stop();
    assert_eq!(st.errors, 0, "traffic errors: {:?}", st.last_error);
    assert!(st.rounds >= 3, "only {} rounds of traffic", st.rounds);

    let after = quiet_reading(&env);
    assert_clients_match(&env, &before, &after);
    assert_totals_match(&before, &after);
}

#[test]
fn a_recreated_tun_device_is_counted_again_within_2_seconds() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmnc", 2, 1);
    let mut daemon = env.start_daemon(&[]);
    let ns = env.lab.server_ns();
    assert_eq!(tcx_programs(&ns, "tun0"), 2);

    // Timed from before the device is deleted: an upper bound on the re-attach latency.
    let t0 = Instant::now();
    let new_ifindex = env.lab.recreate_server_tun().unwrap();
    let waited = daemon.wait_log(
        &format!("interface attached iface=\"tun0\" ifindex={new_ifindex} "),
        1,
        Duration::from_secs(5),
    );
    let latency = t0.elapsed();
    assert!(latency < Duration::from_secs(2), "re-attached after {latency:?} (log seen after {waited:?})");
    assert_eq!(tcx_programs(&ns, "tun0"), 2, "exactly one program per hook on the new device");
    assert!(daemon.log_text().contains("interface went away"), "{}", daemon.log_text());

    env.oracle.rebind_tun().unwrap();
    let before = quiet_reading(&env);
    traffic::mixed_round(&env.lab, 2).expect("traffic after re-creation");
    let after = quiet_reading(&env);
    assert_clients_match(&env, &before, &after);
    assert_totals_match(&before, &after);
    eprintln!("re-attach after tun re-creation: {latency:?} (from deletion of the old device)");

    // Dropping tun0 from the configuration detaches it at the next start.
    daemon.stop();
    let (pin, state) = env.path_args();
    let args = ["--egress", "eth0", "--subnet", "10.9.0.0/24", "--pin-dir", &pin, "--state-dir", &state];
    let d = Daemon::start(&ns, &args, &env.log);
    assert!(d.log_text().contains("no longer configured"), "{}", d.log_text());
    assert_eq!((tcx_programs(&ns, "tun0"), tcx_programs(&ns, "eth0")), (0, 2));
}
