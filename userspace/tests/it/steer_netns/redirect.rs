//! Redirect rules in the lab: TCP and UDP (IPv4 and IPv6) of a VPN client handed to a
//! transparent proxy that reports the original destination, bypass, and no NAT rule anywhere.

use super::*;

/// Upload of `ip` (tunmeter) and tun0 ingress from `ip` (the oracle), read while nothing moves.
fn quiet_upload(env: &Env, ip: IpAddr) -> (Count, Count) {
    let read = || {
        let tm = read_clients(&env.maps(), None).unwrap();
        let up = tm.clients.iter().find(|c| c.ip == ip).map(|c| c.upload).unwrap_or_default();
        let o = env.oracle.read().unwrap().client("tun0", ip, Direction::Ingress);
        (up, Count { bytes: o.bytes, packets: o.packets })
    };
    let mut prev = read();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(300));
        let now = read();
        if now == prev {
            return now;
        }
        prev = now;
    }
    panic!("traffic never went quiet");
}

fn minus(a: Count, b: Count) -> Count {
    a.saturating_sub(b)
}

#[test]
fn redirect_rule_hands_connections_to_a_transparent_proxy_with_their_original_destination() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsr", 2, 2);
    let srv = env.lab.server_ns();
    let (t1, t2) = (env.lab.tun_clients()[0].clone(), env.lab.tun_clients()[1].clone());
    let web_host = env.lab.eth_clients()[1].clone();
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    for c in [&t1, &t2] {
        ns_sh(&c.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
        ns_sh(&c.ns, &["ip", "-6", "route", "add", "default", "dev", "tun0"]);
    }
    ns_sh(&web_host.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
    let daemon = env.start_daemon(&[]);
    let web = WebServer::start(&web_host.ns, WEB_PORT);
    let tproxy = TransparentProxy::start(&srv, TPROXY_PORT).expect("transparent proxy");
    let web_addr = SocketAddr::from((web_host.v4, WEB_PORT));
    let get_small = b"GET /small HTTP/1.0\r\nHost: web\r\n\r\n".to_vec();

    // Before any rule: P-t2 reaches the real web server.
    let r = proxies::tcp_request(&t2.ns, web_addr, get_small.clone(), SHORT).expect("P-t2 to the web before the rule");
    assert!(String::from_utf8_lossy(&r).ends_with(proxies::SMALL_BODY), "{}", String::from_utf8_lossy(&r));

    let src4 = format!("{}/32", t2.v4);
    let src6 = format!("{}/128", t2.v6);
    for src in [&src4, &src6] {
        steer_ok(&env, &["add", "redirect", "--source", src, "--proxy-port", &TPROXY_PORT.to_string()]);
    }
    let list = steer_list(&env);
    assert!(redirect_rule(&list, &src4).is_some() && redirect_rule(&list, &src6).is_some(), "{list}");
    assert_no_nat(&lab_namespaces(&env));
    let (up0, oracle0) = quiet_upload(&env, IpAddr::V4(t2.v4));

    // TCP to arbitrary destinations: each reaches the proxy, which sees the original one.
    let bulk = 300_000;
    let mut sent = 0;
    for (k, dst) in
        ["10.9.0.3:80", "192.0.2.55:443", "198.51.100.7:22", "[2001:db8::5]:80"].into_iter().map(sock).enumerate()
    {
        let payload = if k == 0 { vec![0x5a; bulk] } else { format!("hello {dst}").into_bytes() };
        sent += payload.len();
        match proxies::tcp_request(&t2.ns, dst, payload, SHORT) {
            Ok(r) => assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}\n"), "TCP from P-t2 to {dst}"),
            Err(e) => panic!("TCP from P-t2 to {dst}: {e:#}\n{}", steer_dump(&env)),
        }
    }
    // UDP, IPv4 and IPv6.
    for dst in ["192.0.2.55:53", "[2001:db8::5]:53"].map(sock) {
        let payload = format!("query for {dst}").into_bytes();
        sent += payload.len();
        match proxies::udp_request(&t2.ns, dst, payload, SHORT) {
            Ok(r) => assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}"), "UDP from P-t2 to {dst}"),
            Err(e) => panic!("UDP from P-t2 to {dst}: {e:#}\n{}", steer_dump(&env)),
        }
    }
    let seen = tproxy.intercepted();
    eprintln!("intercepted: {seen:#?}");
    let big = seen.iter().find(|i| i.proto == "tcp" && i.orig == web_addr).expect("the bulk connection");
    assert_eq!(big.bytes, bulk, "bytes the proxy received on the bulk connection");
    assert!(
        seen.iter().all(|i| i.peer.ip() == IpAddr::V4(t2.v4) || i.peer.ip() == IpAddr::V6(t2.v6)),
        "the proxy saw the client's own address: {seen:?}"
    );

    // Bypass: the server's own address is not redirected (the lab's echo sink answers).
    let echo =
        proxies::tcp_request(&t2.ns, SocketAddr::from((env.lab.server_tun_v4(), SINK_PORT)), vec![7; 1000], SHORT)
            .expect("P-t2 to the server's echo sink");
    assert_eq!(echo, vec![7; 1000], "the server's echo sink (bypass), not the proxy");
    // A client without a rule reaches the real web server.
    let r = proxies::tcp_request(&t1.ns, web_addr, get_small.clone(), SHORT).expect("P-t1 to the web server");
    assert!(String::from_utf8_lossy(&r).ends_with(proxies::SMALL_BODY), "P-t1 got {}", String::from_utf8_lossy(&r));
    assert!(web.requests().iter().any(|(p, _)| p.ip() == IpAddr::V4(t1.v4)), "{:?}", web.requests());
    assert_eq!(tproxy.intercepted().len(), seen.len(), "bypass and P-t1 traffic must not reach the proxy");

    // The client's bytes are still its own: upload grew by at least what it sent, and equals
    // the nftables count of tun0 ingress from its address.
    let (up1, oracle1) = quiet_upload(&env, IpAddr::V4(t2.v4));
    let (tm, o) = (minus(up1, up0), minus(oracle1, oracle0));
    eprintln!("upload of {}: tunmeter {tm:?}, nftables {o:?}, payload {sent}", t2.v4);
    assert!(tm.bytes >= (sent - 2 * 20) as u64, "upload of {} grew by {tm:?}, sent {sent}", t2.v4);
    assert_eq!(tm, o, "upload of {} vs nftables on tun0 ingress", t2.v4);
    let list = steer_list(&env);
    let r4 = redirect_rule(&list, &src4).unwrap();
    assert!(u(&r4, "to_target_packets") > 0 && u(&r4, "to_target_bytes") >= bulk as u64, "{r4}");

    // After the delete nothing is redirected any more.
    for src in [&src4, &src6] {
        steer_ok(&env, &["del", "redirect", "--source", src]);
    }
    let list = steer_list(&env);
    assert!(redirect_rule(&list, &src4).is_none() && redirect_rule(&list, &src6).is_none(), "{list}");
    let r = proxies::tcp_request(&t2.ns, web_addr, get_small, SHORT).expect("P-t2 to the web after the delete");
    assert!(
        String::from_utf8_lossy(&r).ends_with(proxies::SMALL_BODY),
        "P-t2 after the delete got {}",
        String::from_utf8_lossy(&r)
    );
    let r = proxies::tcp_request(&t2.ns, sock("192.0.2.55:443"), b"x".to_vec(), Duration::from_secs(3));
    assert!(r.as_ref().map_or(true, |b| !b.starts_with(b"ORIG")), "still redirected after the delete: {r:?}");
    let r = proxies::udp_request(&t2.ns, sock("192.0.2.55:53"), b"q".to_vec(), Duration::from_secs(2));
    assert!(r.is_err(), "UDP still answered after the delete: {r:?}");
    assert_eq!(tproxy.intercepted().len(), seen.len(), "the proxy got connections after the delete");
    assert_no_nat(&lab_namespaces(&env));
    // (Drop order: proxy, web server, daemon, then the lab.)
    let _ = (&daemon, &tproxy, &web);
}
