//! The daemon starts, counts and adopts its pinned links at restart as an unprivileged uid with
//! exactly the unit's capabilities (no CAP_SYS_ADMIN), after the unit's ExecStartPre handed it
//! the pins a root-run daemon left; those capabilities let it write the reserved-ports sysctl.

use super::*;
use tunmeter_lab::traffic;

#[test]
fn daemon_adopts_root_pins_as_an_unprivileged_uid_with_the_unit_capabilities() {
    if !support::require_root() {
        return;
    }
    assert!(!unit_caps().iter().any(|c| c == "sys_admin"), "the unit must not need CAP_SYS_ADMIN");
    let env = Env::new("tmdc", 1, 1);
    // An earlier root-run daemon left pins (and a root-owned state directory).
    let mut root = env.start_daemon(&[]);
    assert!(root.stop().is_some_and(|s| s.success()));
    // The script also takes over the host-wide steering lock; give it back to root afterwards.
    let _restore = RestoreSteerLock;
    hand_over_pins(env.pins.path(), NOBODY);
    let st = Command::new("chown").args(["-R", &format!("{NOBODY}:{NOBODY}")]).arg(&env.state).status().unwrap();
    assert!(st.success());

    for round in 0..2 {
        let mut d = support::daemon::Daemon::start_with(unprivileged_run(&env), &env.log);
        let log = d.log_text();
        assert_eq!(log.matches("adopted pinned link").count(), 4 * (round + 1), "round {round}: adoption:\n{log}");
        let before = counted_packets(&env);
        traffic::mixed_round(&env.lab, 1).expect("traffic");
        assert!(counted_packets(&env) > before, "counting as uid {NOBODY}");
        d.wait_log("ledger and API running", 2 + round, std::time::Duration::from_secs(30));
        assert!(d.stop().is_some_and(|s| s.success()), "clean stop as uid {NOBODY}:\n{}", d.log_text());
    }
    let log = std::fs::read_to_string(&env.log).unwrap_or_default();
    assert!(!log.contains(" ERROR "), "errors as uid {NOBODY}:\n{log}");
}

/// Gives /run/lock/tunmeter-steer.lock back to root (0600, as root-run daemons leave it).
struct RestoreSteerLock;

impl Drop for RestoreSteerLock {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt as _;
        let p = Path::new("/run/lock/tunmeter-steer.lock");
        let _ = std::os::unix::fs::chown(p, Some(0), Some(0));
        let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
    }
}

/// The daemon reserves forward rules' public ports in `net.ipv4.ip_local_reserved_ports`: as a
/// service user that works only through CAP_NET_ADMIN (a per-namespace net sysctl), which the
/// unit grants; without it the write is refused.
#[test]
fn the_unit_capabilities_let_an_unprivileged_uid_write_the_reserved_ports_sysctl() {
    if !support::require_root() {
        return;
    }
    let ns = format!("tmdq-{}", std::process::id());
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    struct DelNs(String);
    impl Drop for DelNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _del = DelNs(ns.clone());
    let write = |caps: &str, port: u16| {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["setpriv", &format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups"])
            .args([format!("--inh-caps=-all{caps}"), format!("--ambient-caps=-all{caps}")])
            .arg(format!("--bounding-set=-all{caps}"))
            .args(["sh", "-c", &format!("echo {port} > /proc/sys/net/ipv4/ip_local_reserved_ports")])
            .output()
            .unwrap()
    };
    let caps: String = unit_caps().iter().map(|c| format!(",+{c}")).collect();
    let out = write(&caps, 40123);
    assert!(out.status.success(), "with the unit's capabilities: {}", String::from_utf8_lossy(&out.stderr));
    let now =
        Command::new("ip").args(["netns", "exec", &ns, "cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]).output();
    assert_eq!(String::from_utf8_lossy(&now.unwrap().stdout).trim(), "40123");
    let out = write("", 40124);
    assert!(!out.status.success(), "without CAP_NET_ADMIN the write must be refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
}
