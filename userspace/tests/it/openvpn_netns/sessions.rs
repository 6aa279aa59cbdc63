//! Sessions of real OpenVPN clients: named by the hook before their first packet, exact
//! bytes against the oracle, closed at disconnect, signed webhooks in order; admission fails
//! closed, sessions follow daemon restarts and a lost management interface.

use super::*;

#[test]
fn openvpn_clients_get_named_sessions_with_exact_bytes_and_signed_webhooks() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmov", 4);
    let oracle = env.lab.install_oracle().unwrap();
    let d = env.start_daemon();
    env.lab.connect_all(CONNECT).expect("every client connects (the hook admits it)");

    // Every address of every client has a session named by the hook, before any traffic.
    let n_addrs: usize = (0..4).map(|i| addrs_of(&env.lab, i).len()).sum();
    env.wait("a session per address", Duration::from_secs(10), |e| e.active_sessions().len() == n_addrs);
    for i in 0..4 {
        let spec = env.lab.clients()[i].clone();
        for (_, ip) in addrs_of(&env.lab, i) {
            let s = env.session_of(ip).unwrap_or_else(|| panic!("no session for {ip}"));
            assert_eq!(s["username"], spec.username, "{s}");
            assert_eq!(s["common_name"], spec.name, "{s}");
            assert_eq!(s["protocol"], format!("openvpn-{}", spec.transport), "{s}");
            assert_eq!(s["instance"], spec.transport.as_str(), "{s}");
            assert_eq!(s["source"], "hook", "{s}");
            assert!(uuid::Uuid::parse_str(s["id"].as_str().unwrap()).is_ok(), "{s}");
        }
    }

    // Distinct traffic per client, over IPv4 and IPv6, TCP and UDP.
    for i in 0..4 {
        let k = i as u64 + 1;
        env.lab.tcp_transfer(i, false, 300_000 * k, 700_000 * k).unwrap();
        env.lab.tcp_transfer(i, true, 50_000 * k, 20_000 * k).unwrap();
        env.lab.udp_transfer(i, false, 20, 900, 300 + 50 * i).unwrap();
    }
    let counts = quiet(&oracle);
    env.settle();
    for i in 0..4 {
        for (dev, ip) in addrs_of(&env.lab, i) {
            let c = env.get(&format!("/api/v1/clients/{ip}"));
            let up = counts.client(dev, ip, Direction::Ingress);
            let down = counts.client(dev, ip, Direction::Egress);
            assert_eq!(c["upload"]["bytes"].as_u64(), Some(up.bytes), "{ip} upload: {c}");
            assert_eq!(c["upload"]["packets"].as_u64(), Some(up.packets), "{ip} upload packets: {c}");
            assert_eq!(c["download"]["bytes"].as_u64(), Some(down.bytes), "{ip} download: {c}");
            assert_eq!(c["download"]["packets"].as_u64(), Some(down.packets), "{ip} download packets: {c}");
            assert!(up.bytes > 0 && down.bytes > 0, "{ip}: no traffic counted by the oracle");
            // The API names the client and shows its live session bytes.
            let id = &c["identity"];
            assert_eq!(id["username"], env.lab.clients()[i].username, "{c}");
            assert_eq!(id["protocol"], format!("openvpn-{}", env.lab.clients()[i].transport), "{c}");
            assert_eq!(id["session"]["upload_bytes"].as_u64(), Some(up.bytes), "{c}");
            assert_eq!(id["session"]["download_bytes"].as_u64(), Some(down.bytes), "{c}");
        }
    }
    // OpenVPN's own view (its status file; the daemon holds the management connection, which
    // takes one client at a time) lists the same usernames.
    for t in Transport::ALL {
        let text = std::fs::read_to_string(env.lab.status_file(t)).unwrap();
        let listed = tunmeter_lab::openvpn::parse_status_clients(&text);
        let mut names: Vec<&str> = listed.iter().map(|c| c.username.as_str()).collect();
        names.sort();
        let mut want: Vec<&str> =
            env.lab.clients().iter().filter(|c| c.transport == t).map(|c| c.username.as_str()).collect();
        want.sort();
        assert_eq!(names, want, "{t}");
    }

    // bob disconnects: the hook closes his sessions with the bytes they carried.
    let bob = 1;
    let bob_ips = addrs_of(&env.lab, bob);
    let bob_ids: Vec<String> =
        bob_ips.iter().map(|(_, ip)| env.session_of(*ip).unwrap()["id"].as_str().unwrap().to_string()).collect();
    env.lab.disconnect(bob).unwrap();
    env.wait("bob's sessions closed", Duration::from_secs(15), |e| {
        bob_ips.iter().all(|(_, ip)| e.session_of(*ip).is_none())
    });
    for ((dev, ip), id) in bob_ips.iter().zip(&bob_ids) {
        let s = env.get(&format!("/api/v1/sessions/{id}"));
        assert_eq!(s["active"], false, "{s}");
        assert_eq!(s["close_reason"], "disconnected", "{s}");
        assert_eq!(s["up_bytes"].as_u64(), Some(counts.client(dev, *ip, Direction::Ingress).bytes), "{s}");
        assert_eq!(s["down_bytes"].as_u64(), Some(counts.client(dev, *ip, Direction::Egress).bytes), "{s}");
    }
    // The others are untouched.
    assert_eq!(env.active_sessions().len(), n_addrs - bob_ips.len());

    // Malformed ids are 400, unknown ones 404, a second open of an active client 409.
    assert_eq!(env.call("GET", "/api/v1/sessions/not-a-uuid", None).0, 400);
    assert_eq!(env.call("GET", &format!("/api/v1/sessions/{}", uuid::Uuid::new_v4()), None).0, 404);
    let alice_v4 = addrs_of(&env.lab, 0)[0].1;
    let (st, v) = env.call("POST", "/api/v1/sessions", Some(json!({"client_ip": alice_v4.to_string()})));
    assert_eq!(st, 409, "{v}");

    // A reset sends its event too.
    let (st, v) = env.call("POST", &format!("/api/v1/clients/{alice_v4}/reset"), None);
    assert_eq!(st, 200, "{v}");
    env.wait("the reset's webhook", Duration::from_secs(20), |e| {
        e.hooks.events().iter().any(|h| h["type"] == "reset" && h["subject"] == alice_v4.to_string())
    });
    let reset = env.hooks.events().into_iter().find(|h| h["type"] == "reset").unwrap();
    assert_eq!(reset["data"]["id"], v["id"], "{reset}");

    // Webhooks: an opened event per session and a closed event for each of bob's, all signed
    // (the receiver rejects bad signatures), in order per address.
    env.wait("webhooks delivered", Duration::from_secs(20), |e| {
        let ev = e.hooks.events();
        ev.iter().filter(|v| v["type"] == "session.opened").count() >= n_addrs
            && ev.iter().filter(|v| v["type"] == "session.closed").count() >= bob_ips.len()
    });
    let events = env.hooks.events();
    let mut per_subject: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &events {
        per_subject
            .entry(e["subject"].as_str().unwrap().to_string())
            .or_default()
            .push(e["type"].as_str().unwrap().into());
    }
    for (_, ip) in &bob_ips {
        let seq = &per_subject[&ip.to_string()];
        let first_closed = seq.iter().position(|t| t == "session.closed").unwrap();
        assert!(seq[..first_closed].contains(&"session.opened".to_string()), "{ip}: {seq:?}");
    }
    let closed = events.iter().find(|e| e["type"] == "session.closed").unwrap();
    assert_eq!(closed["data"]["close_reason"], "disconnected", "{closed}");
    assert_eq!(closed["node_id"], env.node, "{closed}");

    drop(d);
    oracle.remove().unwrap();
    let prefix = env.lab.prefix().to_string();
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}

#[test]
fn admission_fails_closed_and_sessions_follow_restarts_and_lost_management() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmof", 3);
    // No daemon: the hook cannot tell anyone, so OpenVPN must refuse the client.
    env.lab.connect(0).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    assert!(env.lab.connected_addrs(0).map(|a| a.is_none()).unwrap_or(true), "admitted without a daemon");
    let server_log = std::fs::read_to_string(env.lab.server_log(Transport::Udp)).unwrap();
    assert!(server_log.contains("client-connect"), "no client-connect failure in the server log:\n{server_log}");
    let _ = env.lab.disconnect(0);

    let mut d = env.start_daemon();
    env.lab.connect_all(CONNECT).expect("with the daemon every client is admitted");
    env.wait("sessions for all", Duration::from_secs(10), |e| {
        (0..3).all(|i| addrs_of(&e.lab, i).iter().all(|(_, ip)| e.session_of(*ip).is_some()))
    });
    let id_of =
        |e: &Env, i: usize| e.session_of(addrs_of(&e.lab, i)[0].1).map(|s| s["id"].as_str().unwrap().to_string());
    let (alice, bob) = (id_of(&env, 0).unwrap(), id_of(&env, 1).unwrap());
    let carol = id_of(&env, 2).unwrap();

    // The daemon stops; carol leaves while it is down; it comes back.
    assert!(d.stop().is_some_and(|s| s.success()));
    env.lab.disconnect(2).unwrap();
    let _d = env.start_daemon();
    env.wait("carol's session closed after the restart", Duration::from_secs(15), |e| id_of(e, 2).is_none());
    let s = env.get(&format!("/api/v1/sessions/{carol}"));
    assert_eq!(s["close_reason"], "disconnected", "{s}");
    // alice and bob are still there: the same sessions go on.
    assert_eq!(id_of(&env, 0).as_deref(), Some(alice.as_str()));
    assert_eq!(id_of(&env, 1).as_deref(), Some(bob.as_str()));

    // The UDP instance (alice's) dies without running its disconnect hooks (SIGKILL): its
    // management interface goes away, so its sessions close; bob's (TCP) stays.
    let pid: i32 = std::fs::read_to_string(env.lab.dir().join("server-udp.pid")).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = env.lab.stop_instance(Transport::Udp);
    env.wait("alice's session closed", Duration::from_secs(15), |e| id_of(e, 0).is_none());
    let s = env.get(&format!("/api/v1/sessions/{alice}"));
    assert_eq!(s["close_reason"], "management_lost", "{s}");
    assert_eq!(id_of(&env, 1).as_deref(), Some(bob.as_str()));

    // It comes back and alice reconnects: a new session.
    env.lab.start_instance(Transport::Udp).unwrap();
    let _ = env.lab.disconnect(0);
    env.lab.connect(0).unwrap();
    env.lab.wait_connected(0, CONNECT).unwrap();
    env.wait("alice's new session", Duration::from_secs(15), |e| id_of(e, 0).is_some_and(|id| id != alice));

    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}
