//! `tunmeter detach` with another state directory is refused while a daemon holds the pin
//! directory (nothing removed, counting goes on); `--force` detaches.

use super::*;
use tunmeter_lab::traffic;

#[test]
fn detach_with_another_state_dir_is_refused_while_the_daemon_holds_the_pins() {
    if !support::require_root() {
        return;
    }
    let env = Env::new("tmdd", 1, 1);
    let mut daemon = env.start_daemon(&[]);
    let ns = env.lab.server_ns();
    let pins = env.path_args().0;
    let other = format!("/tmp/tmtest-other-state-{}", std::process::id());
    let links = env.pins.path().join("links");
    let pinned = || std::fs::read_dir(&links).map(|d| d.count()).unwrap_or(0);
    let before_pins = pinned();
    assert!(before_pins >= 4, "the daemon pinned its links ({before_pins})");

    let out = support::daemon::output(&ns, &["detach", "--state-dir", &other, "--pin-dir", &pins]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "detach must be refused: {err}");
    assert!(err.contains(&format!("a tunmeter daemon is using the pin directory {pins}")), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(pinned(), before_pins, "nothing removed");
    let before = counted_packets(&env);
    traffic::mixed_round(&env.lab, 1).expect("traffic");
    assert!(counted_packets(&env) > before, "counting goes on after the refused detach");

    let out = support::daemon::output(&ns, &["detach", "--force", "--state-dir", &other, "--pin-dir", &pins]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "detach --force: {err}");
    assert!(err.contains("detached ") && err.contains(&format!("removed {pins}")), "{err}");
    let n: u32 = err.split("detached ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(n >= 4, "tun0 and eth0, both hooks: {err}");
    daemon.kill9();
    let _ = std::fs::remove_dir_all(&other);
}
