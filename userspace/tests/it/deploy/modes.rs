//! File modes: state directory 0700, database (-wal, -shm too) and lock 0600, pin directory
//! 0700 and ours, control socket 0600; another local user can neither read the database nor
//! hold a lock. Modes an older version left (0755, 0644) are tightened at start.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

use super::*;

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).mode() & 0o7777
}

#[test]
fn state_and_pin_files_are_private_and_other_users_cannot_read_or_lock_them() {
    if !support::require_root() {
        return;
    }
    let env = Env::new("tmdm", 1, 1);
    let ns = env.lab.server_ns();
    // A pin directory that another user made (bpffs is often 1777) is refused, not used.
    std::fs::create_dir_all(env.pins.path()).unwrap();
    std::os::unix::fs::chown(env.pins.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let args = env.daemon_args(&[]);
    let args: Vec<&str> = [&["run"][..], &args.iter().map(String::as_str).collect::<Vec<_>>()].concat();
    let out = support::daemon::output(&ns, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a foreign pin directory must be refused:\n{err}");
    assert!(err.contains(&format!("belongs to uid {NOBODY}")) && err.contains("chown"), "{err}");
    std::fs::remove_dir(env.pins.path()).unwrap();

    // What an older version left: a 0755 state directory and a 0644 lock file.
    std::fs::set_permissions(&env.state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let lock = env.state.join("tunmeter.lock");
    std::fs::write(&lock, b"").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o644)).unwrap();

    let _daemon = env.start_daemon(&[]);
    let db = env.state.join("tunmeter.db");
    assert_eq!(mode(&env.state), 0o700, "state dir");
    assert_eq!(mode(&lock), 0o600, "tunmeter.lock");
    for f in ["tunmeter.db", "tunmeter.db-wal", "tunmeter.db-shm"] {
        assert_eq!(mode(&env.state.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(env.pins.path()), 0o700, "pin dir");
    let sock = env.state.join("control.sock");
    let m = std::fs::metadata(&sock).unwrap();
    assert!(m.mode() & 0o007 == 0 && (m.mode() & 0o070 == 0 || m.gid() != 0), "control.sock {:o}", m.mode() & 0o777);

    // Another local user: no read, no lock (Permission denied, not "busy": the daemon holds
    // the locks, so root's own flock would fail with "busy").
    let path = |p: &Path| p.display().to_string();
    for f in [db.clone(), env.state.join("tunmeter.db-wal"), lock.clone()] {
        let (ok, err) = as_nobody(&["cat", &path(&f)]);
        assert!(!ok && err.contains("Permission denied"), "uid {NOBODY} read {}: {err}", f.display());
    }
    for target in [lock.clone(), env.pins.path().to_owned()] {
        let (ok, err) = as_nobody(&["flock", "--nonblock", "--shared", &path(&target), "true"]);
        assert!(!ok && err.contains("Permission denied"), "uid {NOBODY} flock {}: {err}", target.display());
    }
    // Control: root reaches both and sees them held by the daemon.
    for target in [lock, env.pins.path().to_owned()] {
        let st = Command::new("flock").args(["--nonblock", "--shared", &path(&target), "true"]).status().unwrap();
        assert_eq!(st.code(), Some(1), "{} must be held by the daemon", target.display());
    }
}

#[test]
fn token_create_before_the_first_start_makes_a_private_state_dir_and_database() {
    let state = PathBuf::from(format!("/tmp/tmtest-token-modes-{}/state", std::process::id()));
    let _cleanup = Cleanup(state.parent().unwrap().to_owned());
    let out = Command::new(BIN)
        .args(["token", "create", "--role", "read", "--name", "modes", "--node-id", "tmdt", "--state-dir"])
        .arg(&state)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mode(&state), 0o700, "state dir");
    for f in ["tunmeter.db", "tunmeter.db-wal", "tunmeter.db-shm"] {
        let p = state.join(f);
        if f == "tunmeter.db" || p.exists() {
            assert_eq!(mode(&p), 0o600, "{f}");
        }
    }
}
