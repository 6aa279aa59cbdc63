//! An `openvpn` connection sends its user to a transparent proxy while connected: the rule is
//! in place when the hook answers and removed at disconnect.

use super::*;

#[test]
fn an_openvpn_connection_sends_its_user_to_the_proxy_while_connected() {
    if !require_root() {
        return;
    }
    let mut env = Env::new("tmoc", 2);
    let _d = env.start_daemon();
    let proxy = TransparentProxy::start(&env.lab.server_ns(), 12345).unwrap();
    // bob's address is a device; alice's openvpn connection goes there through the proxy.
    let bob_ip = env.lab.expected_addrs(1).v4;
    let (st, dev) =
        env.call("POST", "/api/v1/devices", Some(json!({"name": "phone-bob", "vpn_ip": bob_ip.to_string()})));
    assert_eq!(st, 201, "{dev}");
    let (st, conn) = env.call(
        "POST",
        "/api/v1/connections",
        Some(json!({"device_id": dev["id"], "protocol": "openvpn", "username": "alice", "proxy_port": 12345})),
    );
    assert_eq!(st, 201, "{conn}");

    env.lab.connect_all(CONNECT).unwrap();
    let alice = env.lab.expected_addrs(0).v4;
    let steer = |e: &Env| {
        let out = support::daemon::output(
            &e.lab.server_ns(),
            &["steer", "list", "--json", "--pin-dir", &e.pins.path().display().to_string()],
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // The rule is in place when the hook answers, before alice's first packet.
    let rules = steer(&env);
    let r = rules["redirect"].as_array().unwrap();
    assert!(r.iter().any(|r| r["source"] == format!("{alice}/32") && r["proxy_port"] == 12345), "{rules}");
    assert!(!r.iter().any(|r| r["source"] == format!("{bob_ip}/32")), "{rules}");

    // alice's traffic to the world reaches the proxy with its original destination.
    let alice_ns = env.lab.client_ns(0);
    tunmeter_lab::netns_exec(&alice_ns, &["ip", "route", "add", "198.51.100.0/24", "dev", "tun0"]).unwrap();
    let dst: SocketAddr = "198.51.100.7:80".parse().unwrap();
    let reply = support::proxies::tcp_request(&alice_ns, dst, b"hello".to_vec(), Duration::from_secs(10)).unwrap();
    assert_eq!(String::from_utf8_lossy(&reply).trim(), format!("ORIG {dst}"));
    assert!(proxy.intercepted().iter().any(|i| i.orig == dst && i.peer.ip() == IpAddr::V4(alice)));

    // The API shows the device alice's traffic goes to.
    let c = env.get(&format!("/api/v1/clients/{alice}"));
    assert_eq!(c["identity"]["device"]["name"], "phone-bob", "{c}");
    assert_eq!(c["identity"]["device"]["relation"], "via", "{c}");
    let c = env.get(&format!("/api/v1/clients/{bob_ip}"));
    assert_eq!(c["identity"]["device"]["relation"], "self", "{c}");

    // alice leaves: the rule goes.
    env.lab.disconnect(0).unwrap();
    env.wait("alice's redirect removed", Duration::from_secs(15), |e| {
        !steer(e)["redirect"].as_array().unwrap().iter().any(|r| r["source"] == format!("{alice}/32"))
    });
    drop(proxy);
    let prefix = env.lab.prefix().to_string();
    drop(_d);
    env.lab.down().unwrap();
    assert!(tunmeter_lab::list_prefix(&prefix).unwrap().is_empty());
}
