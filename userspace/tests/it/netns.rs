//! Integration tests in network namespaces: the real daemon binary, real programs in the real
//! kernel, real traffic through a tun device (relayed like OpenVPN does) and an Ethernet veth.
//! The oracle is independent: nftables netdev counters on the same devices and `ip -s link`.

use crate::support;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use support::{PinDir, daemon::Daemon, require_root};
use tunmeter::{
    counters::{ClientsSnapshot, Count, OutcomeRow, read_clients, read_stats},
    loader::PinnedMaps,
};
use tunmeter_lab::{
    LinkStats, link_stats,
    oracle::{Counter, Direction, OracleCounts},
    traffic,
};

type Env = support::env::LabEnv;

/// Another tool's TC program on `dev`, after ours (appended to the TCX chain, or at a later
/// netlink priority): an independent instance of a counting program with its own maps. If
/// tunmeter ended processing, it would see nothing.
struct ForeignObserver {
    pins: PinDir,
}

impl ForeignObserver {
    fn attach(ns: &str, dev: &'static str, netlink: bool) -> ForeignObserver {
        use aya::programs::{
            LinkOrder, TcAttach,
            links::FdLink,
            tc::{NlOptions, TcHandle},
        };
        let pins = PinDir::new("foreign");
        let dir = pins.path().to_owned();
        tunmeter_lab::in_netns(ns, move || {
            std::fs::create_dir_all(dir.join("links"))?;
            let mut inst = tunmeter::loader::Instance::load(tunmeter::config::Layer::L2, &dir, 1024)?;
            let ifindex = nix::net::if_::if_nametoindex(dev)?;
            if netlink {
                let _ = aya::programs::tc::qdisc_add_clsact(ifindex); // may exist already
            }
            for (t, name, hook) in tunmeter::attach::HOOKS {
                let prog = inst.program_mut(name);
                let attach = if netlink {
                    let options = NlOptions { priority: 300, handle: TcHandle::new(0, 7), classid: None };
                    TcAttach::Netlink { parent: t.into(), options }
                } else {
                    TcAttach::Tcx { attach_type: t, order: LinkOrder::last() }
                };
                let id = prog.attach(ifindex, attach)?;
                let link = prog.take_link(id)?;
                if netlink {
                    std::mem::forget(link); // the filter stays until the namespace goes
                } else {
                    FdLink::try_from(link)?.pin(dir.join("links").join(hook))?;
                }
            }
            Ok(())
        })
        .expect("attach the foreign observer");
        ForeignObserver { pins }
    }

    fn packets(&self, dir: &str) -> u64 {
        outcome_sum(&read_stats(&PinnedMaps::new(self.pins.path())).unwrap(), dir).packets
    }
}

fn assert_foreign_program_saw_everything(fo: &ForeignObserver, before: &Reading, after: &Reading, before_fo: [u64; 2]) {
    for (i, (dir, odir)) in [("upload", Direction::Ingress), ("download", Direction::Egress)].into_iter().enumerate() {
        let seen = fo.packets(dir) - before_fo[i];
        let all = sub(after.oracle.total("eth0", odir), before.oracle.total("eth0", odir)).packets;
        assert_eq!(seen, all, "the other tool's program ({dir}) missed packets: tunmeter must return TCX_NEXT");
    }
}

/// Everything both sides counted at one moment.
struct Reading {
    tm: ClientsSnapshot,
    stats: Vec<OutcomeRow>,
    oracle: OracleCounts,
    tun: LinkStats,
    eth: LinkStats,
}

/// Read tunmeter, the oracle and link stats while nothing moves: tunmeter is read before and
/// after the others and the reading is retried until both agree (bounded).
fn quiet_reading(env: &Env) -> Reading {
    let ns = env.lab.server_ns();
    for _ in 0..50 {
        let a = read_clients(&env.maps(), None).unwrap();
        let stats = read_stats(&env.maps()).unwrap();
        let oracle = env.oracle.read().unwrap();
        let tun = link_stats(&ns, "tun0").unwrap();
        let eth = link_stats(&ns, "eth0").unwrap();
        let b = read_clients(&env.maps(), None).unwrap();
        let stats_b = read_stats(&env.maps()).unwrap();
        let same_stats = stats.iter().zip(&stats_b).all(|(x, y)| x.packets == y.packets);
        if a.clients == b.clients && a.other == b.other && same_stats {
            return Reading { tm: a, stats, oracle, tun, eth };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("traffic never went quiet");
}

fn tm_of(r: &Reading, ip: IpAddr) -> (Count, Count) {
    r.tm.clients.iter().find(|c| c.ip == ip).map(|c| (c.upload, c.download)).unwrap_or_default()
}

fn sub(a: Counter, b: Counter) -> Count {
    d(Count { bytes: a.bytes, packets: a.packets }, Count { bytes: b.bytes, packets: b.packets })
}

fn d(a: Count, b: Count) -> Count {
    Count { bytes: a.bytes - b.bytes, packets: a.packets - b.packets }
}

/// Per client and direction, tunmeter's counts between two readings equal the oracle's.
fn assert_clients_match(env: &Env, before: &Reading, after: &Reading) {
    let mut seen = 0;
    for (dev, ip) in env.clients() {
        let (tu, td) = tm_of(after, ip);
        let (bu, bd) = tm_of(before, ip);
        let ou =
            sub(after.oracle.client(&dev, ip, Direction::Ingress), before.oracle.client(&dev, ip, Direction::Ingress));
        let od =
            sub(after.oracle.client(&dev, ip, Direction::Egress), before.oracle.client(&dev, ip, Direction::Egress));
        assert_eq!(d(tu, bu), ou, "upload of {ip} on {dev}");
        assert_eq!(d(td, bd), od, "download of {ip} on {dev}");
        assert!(ou.packets > 0 && od.packets > 0, "{ip}: the test sent no traffic");
        seen += 1;
    }
    assert_eq!(seen, env.clients().len());
}

fn outcome_sum(stats: &[OutcomeRow], dir: &str) -> Count {
    stats
        .iter()
        .filter(|r| r.direction == dir)
        .fold(Count::default(), |a, r| Count { bytes: a.bytes + r.bytes, packets: a.packets + r.packets })
}

/// Every packet on the two devices got exactly one outcome: tunmeter's totals equal the
/// oracle's per-chain totals (clients + other + non-IP).
fn assert_totals_match(before: &Reading, after: &Reading) {
    for (dir, odir) in [("upload", Direction::Ingress), ("download", Direction::Egress)] {
        let tm = d(outcome_sum(&after.stats, dir), outcome_sum(&before.stats, dir));
        let mut o = Count::default();
        for dev in ["tun0", "eth0"] {
            let x = sub(after.oracle.total(dev, odir), before.oracle.total(dev, odir));
            o = Count { bytes: o.bytes + x.bytes, packets: o.packets + x.packets };
        }
        assert_eq!(tm, o, "{dir} totals vs nftables");
    }
}

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

/// TCX programs attached to `dev` in namespace `ns`.
fn tcx_programs(ns: &str, dev: &'static str) -> usize {
    tunmeter_lab::in_netns(ns, move || {
        let name = std::ffi::CString::new(dev).unwrap();
        let mut n = 0;
        for t in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
            n += aya::programs::SchedClassifier::query_tcx(name.as_c_str(), t).map(|(_, p)| p.len()).unwrap_or(0);
        }
        Ok(n)
    })
    .unwrap()
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

/// Bad inputs: each gives its own clear error, exits non-zero, and leaves nothing behind.
#[test]
fn bad_inputs_fail_clearly_and_leave_nothing_behind() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmnb", 1, 1);
    let ns = env.lab.server_ns();
    let (pin, state) = env.path_args();
    let cfg_path = format!("/tmp/tmtest-badcfg-{}.toml", std::process::id());
    std::fs::write(
        &cfg_path,
        "max_client = 100\n[[interface]]\nname = \"tun0\"\nlayer = \"l3\"\nsubnets = [\"10.8.0.0/24\"]\n",
    )
    .unwrap();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            vec!["run".into(), "--pin-dir".into(), pin.clone(), "--state-dir".into(), state.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // (what, arguments, environment, expected error text)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "missing interface",
            base(&["--tun", "tun9", "--subnet", "10.8.0.0/24"]),
            vec![],
            "interface tun9 does not exist",
        ),
        ("wrong layer", base(&["--tun", "eth0", "--subnet", "10.8.0.0/24"]), vec![], "link type"),
        ("bad subnet", base(&["--tun", "tun0", "--subnet", "10.8.0.300/24"]), vec![], "bad subnet"),
        ("host bits", base(&["--tun", "tun0", "--subnet", "10.8.0.1/24"]), vec![], "did you mean 10.8.0.0/24"),
        ("bad config key", base(&["--config", &cfg_path]), vec![], "unknown field `max_client`"),
        ("missing config", base(&["--config", "/nonexistent/tunmeter.toml"]), vec![], "cannot read config file"),
        (
            "kernel too old",
            base(&["--tun", "tun0", "--subnet", "10.8.0.0/24"]),
            vec![("TUNMETER_KERNEL_VERSION_OVERRIDE", "4.19.0")],
            "too old",
        ),
        (
            "not a bpffs",
            vec![
                "run".into(),
                "--pin-dir".into(),
                "/tmp/tmtest-notbpf".into(),
                "--state-dir".into(),
                state.clone(),
                "--tun".into(),
                "tun0".into(),
                "--subnet".into(),
                "10.8.0.0/24".into(),
            ],
            vec![],
            "not on a BPF filesystem",
        ),
    ];
    let check_clean = |what: &str| {
        assert!(!env.pins.path().exists(), "{what}: pin directory left behind");
        // The kernel releases a killed process's files, and so its links, from a work queue:
        // give it a moment.
        let t0 = Instant::now();
        while tcx_programs(&ns, "tun0") + tcx_programs(&ns, "eth0") > 0 && t0.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(tcx_programs(&ns, "tun0") + tcx_programs(&ns, "eth0"), 0, "{what}: programs left attached");
        for dev in ["tun0", "eth0"] {
            let q = tunmeter_lab::netns_exec(&ns, &["tc", "qdisc", "show", "dev", dev]).unwrap();
            assert!(!q.contains("clsact"), "{what}: qdisc left on {dev}: {q}");
        }
    };
    for (what, args, envs, expect) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = support::daemon::command(&ns, &args);
        cmd.envs(envs.iter().copied());
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: exit status {}", out.status);
        assert!(err.contains(expect), "{what}: expected {expect:?} in:\n{err}");
        check_clean(what);
    }

    // No BPF permission: the same valid command as an unprivileged user.
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(support::daemon::BIN)
        .args([
            "run",
            "--tun",
            "tun0",
            "--subnet",
            "10.8.0.0/24",
            "--pin-dir",
            &pin,
            "--state-dir",
            "/tmp/tmtest-nobody-state",
        ])
        .env("NO_COLOR", "1");
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("must run as root") || err.contains("run as root"), "no-permission error:\n{err}");
    let _ = std::fs::remove_dir_all("/tmp/tmtest-nobody-state");
    check_clean("no permission");

    // A second daemon on the same state directory is refused, and leaves the first intact.
    let args = env.daemon_args(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = Daemon::start(&ns, &args, &env.log);
    let out = support::daemon::command(&ns, &[&["run"], &args[..]].concat()).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another tunmeter daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tcx_programs(&ns, "tun0"), 2, "the running daemon's attachments are untouched");
    // detach refuses while it runs, then removes everything once it is stopped.
    let detach = ["detach", "--pin-dir", &pin, "--state-dir", &state];
    assert!(!support::daemon::output(&ns, &detach).status.success());
    drop(first);
    let out = support::daemon::output(&ns, &detach);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_clean("after detach");
    let _ = std::fs::remove_file(&cfg_path);
}

/// The clsact fallback of kernels before 6.6, forced with `--attach-mode netlink`: counts equal
/// the oracle across restarts under traffic (the filter's program is swapped in place), a
/// switch to TCX replaces filters by links without counting twice, and detach removes them.
#[test]
fn netlink_attachment_counts_restarts_and_detaches() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmnl", 1, 1);
    let ns = env.lab.server_ns();
    let mut args = env.daemon_args(&[]);
    args.extend(["--attach-mode".into(), "netlink".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let filters = |dev: &str| -> usize {
        ["ingress", "egress"]
            .iter()
            .map(|hook| {
                tunmeter_lab::netns_exec(&ns, &["tc", "filter", "show", "dev", dev, hook, "prio", "256"])
                    .unwrap()
                    .lines()
                    .filter(|l| l.contains("tunmeter_"))
                    .count()
            })
            .sum()
    };

    // Another tool's filter already on the device: attach must work around it, not fail.
    let fo = ForeignObserver::attach(&ns, "eth0", true);
    let mut daemon = Daemon::start(&ns, &args, &env.log);
    assert_eq!(tcx_programs(&ns, "tun0") + tcx_programs(&ns, "eth0"), 0, "no TCX links in netlink mode");
    assert_eq!((filters("tun0"), filters("eth0")), (2, 2));
    let before = quiet_reading(&env);
    let ff = [fo.packets("upload"), fo.packets("download")];
    // Traffic runs across a clean stop, a restart, a kill -9 and a restart: the filter's
    // program is swapped in place, so nothing is lost and nothing doubled.
    let bg =
        traffic::background_with(env.lab.targets(), traffic::RoundSpec::scaled(1), Duration::from_millis(20)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    daemon.stop();
    assert_eq!((filters("tun0"), filters("eth0")), (2, 2), "filters outlive the daemon");
    let mut daemon = Daemon::start(&ns, &args, &env.log);
    assert!(daemon.log_text().contains("adopted the netlink filter"), "{}", daemon.log_text());
    assert_eq!((filters("tun0"), filters("eth0")), (2, 2), "restart replaced the filters, not doubled them");
    std::thread::sleep(Duration::from_millis(400));
    daemon.kill9();
    let _daemon = Daemon::start(&ns, &args, &env.log);
    std::thread::sleep(Duration::from_millis(400));
    let st = bg.stop();
    assert_eq!(st.errors, 0, "traffic errors: {:?}", st.last_error);
    let after = quiet_reading(&env);
    assert_clients_match(&env, &before, &after);
    assert_totals_match(&before, &after);
    assert_foreign_program_saw_everything(&fo, &before, &after, ff);

    // Switching to TCX replaces the filters by links (never both: that would count twice).
    drop(_daemon);
    let mut tcx_args = env.daemon_args(&[]);
    tcx_args.extend(["--attach-mode".into(), "tcx".into()]);
    let tcx_args: Vec<&str> = tcx_args.iter().map(String::as_str).collect();
    let _daemon = Daemon::start(&ns, &tcx_args, &env.log);
    assert_eq!((filters("tun0"), filters("eth0")), (0, 0), "netlink filters removed on the switch to TCX");
    assert_eq!((tcx_programs(&ns, "tun0"), tcx_programs(&ns, "eth0")), (2, 2), "one TCX link per hook");
    let before = quiet_reading(&env);
    traffic::mixed_round(&env.lab, 1).expect("traffic");
    let after = quiet_reading(&env);
    assert_clients_match(&env, &before, &after);
    assert_totals_match(&before, &after);

    drop(_daemon);
    let (pin, state) = env.path_args();
    let out = support::daemon::output(&ns, &["detach", "--pin-dir", &pin, "--state-dir", &state]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!((filters("tun0"), filters("eth0")), (0, 0), "detach removed our filters");
    assert_eq!(tcx_programs(&ns, "tun0"), 0, "detach removed our links");
    let q = tunmeter_lab::netns_exec(&ns, &["tc", "filter", "show", "dev", "eth0", "ingress", "prio", "300"]).unwrap();
    assert!(q.contains("tunmeter_in"), "detach left the other tool's filter alone: {q}");
    assert!(!env.pins.path().exists());
}
