//! The hook without management: it alone opens and closes sessions; with the database locked
//! a connecting client is refused and whatever was started for it is undone.

use super::*;

#[test]
fn without_management_the_hook_alone_opens_and_closes_sessions() {
    if !require_root() {
        return;
    }
    let mut env = Env::with_config("tmoh", 2, false);
    let _d = env.start_daemon();
    env.lab.connect_all(CONNECT).expect("the hook admits every client");
    let alice = IpAddr::V4(env.lab.expected_addrs(0).v4);
    let bob = IpAddr::V4(env.lab.expected_addrs(1).v4);
    let s = env.session_of(alice).expect("alice's session");
    // No management instance names the transport: the device does.
    assert_eq!(
        (s["protocol"].as_str(), s["instance"].as_str(), s["source"].as_str()),
        (Some("openvpn"), Some("tun0"), Some("hook")),
        "{s}"
    );
    assert_eq!(env.session_of(bob).unwrap()["instance"], "tun1");
    // Nothing but the hook closes them: still there after several ticks and the hook grace.
    std::thread::sleep(Duration::from_secs(3));
    assert!(env.session_of(alice).is_some());
    env.lab.disconnect(1).unwrap();
    env.wait("bob's session closed by the hook", Duration::from_secs(15), |e| e.session_of(bob).is_none());
    assert!(env.session_of(alice).is_some());
    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}

#[test]
fn a_client_is_refused_while_the_database_is_locked_and_nothing_stays_open() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmol", 2);
    let _d = env.start_daemon();
    env.lab.connect(0).unwrap();
    env.lab.wait_connected(0, CONNECT).unwrap();
    let alice = IpAddr::V4(env.lab.expected_addrs(0).v4);
    let bob = IpAddr::V4(env.lab.expected_addrs(1).v4);
    let alice_id = env.session_of(alice).unwrap()["id"].clone();

    let lock = support::sqlite::SqliteLock::take(&env.state.join("tunmeter.db"));
    env.lab.connect(1).unwrap();
    // The daemon cannot write bob's session: the hook fails, OpenVPN refuses him.
    let t0 = Instant::now();
    loop {
        match env.lab.connected_addrs(1) {
            Ok(Some(a)) => panic!("bob was admitted ({a:?}) while the database was locked"),
            Err(_) => break, // his client gave up (AUTH_FAILED)
            Ok(None) => {}
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "bob's client neither connected nor gave up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(env.lab.server_log(Transport::Tcp)).unwrap();
    assert!(log.contains("client-connect"), "no client-connect failure in the server log:\n{log}");
    drop(lock);

    // Whatever was started for bob is undone; alice's session went on untouched.
    env.wait("no active session for bob", Duration::from_secs(20), |e| e.session_of(bob).is_none());
    std::thread::sleep(Duration::from_secs(2));
    assert!(env.session_of(bob).is_none());
    let (_, all) = env.call("GET", &format!("/api/v1/sessions?client={bob}"), None);
    for s in all["sessions"].as_array().unwrap() {
        assert_eq!(s["close_reason"], "rejected", "{s}");
    }
    assert_eq!(env.session_of(alice).unwrap()["id"], alice_id);
    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}
