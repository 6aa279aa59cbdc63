//! Bad inputs: each gives its own clear error, exits non-zero and leaves nothing behind; a
//! second daemon is refused; detach refuses while the daemon runs.

use super::*;

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
    let cases: Vec<Case<'_>> = vec![
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
