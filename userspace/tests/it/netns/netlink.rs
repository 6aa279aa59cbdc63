//! The clsact fallback (`--attach-mode netlink`): counts across restarts, the switch to TCX,
//! detach, and another tool's filter left alone.

use super::*;

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
