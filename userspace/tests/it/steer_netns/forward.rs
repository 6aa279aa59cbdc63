//! Forward rules in the lab: the proxies work without steering, then behind forward rules
//! (50 MiB each, fragmented UDP), per-rule counters equal nftables `forward` hook counters, a
//! deleted rule refuses new connections while the others keep working.

use super::forward_lab::{Forward, Scratch, curl, lab_routes};
use super::*;

// ---- tests ----

/// The test's own servers, without tunmeter: the customer uses the device's proxies and echo
/// directly (routed by the server), and the transparent proxy answers connections to its own
/// address. When a steering test fails, this one says whether the fixtures work.
#[test]
fn fixtures_work_without_steering() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsx", 1, 2);
    let (srv, device, customer, web_host) = lab_routes(&env);
    ns_sh(&customer.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
    let web = WebServer::start(&web_host.ns, WEB_PORT);
    let tiny = Proxy::tinyproxy(&device.ns, HTTP_PROXY_PORT);
    let dante = Proxy::danted(&device.ns, SOCKS_PORT, "tun0");
    let echo = UdpEcho::start(&device.ns, ECHO_PORT);
    let tproxy = TransparentProxy::start(&srv, TPROXY_PORT).expect("transparent proxy");

    let out = Scratch::new("tmsx-big");
    let url = format!("http://{}:{WEB_PORT}/big", web_host.v4);
    for via in [format!("-x http://{}:{HTTP_PROXY_PORT}", device.v4), format!("--socks5 {}:{SOCKS_PORT}", device.v4)] {
        let mut args: Vec<&str> = via.split(' ').collect();
        args.push(&url);
        let t0 = Instant::now();
        curl(&customer.ns, &args, &out.0, 40)
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", tiny.log_text(), dante.log_text()));
        assert_eq!(proxies::sha256_file(&out.0).unwrap(), proxies::big_sha256(), "{via}");
        eprintln!("{via}: 50 MiB in {:?}", t0.elapsed());
    }
    assert!(web.requests().iter().all(|(p, _)| p.ip() == IpAddr::V4(device.v4)), "{:?}", web.requests());
    for n in [100, 3000, 8000] {
        let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let r = proxies::udp_request(&customer.ns, SocketAddr::from((device.v4, ECHO_PORT)), payload.clone(), SHORT)
            .expect("udp echo");
        assert!(r == payload, "udp echo of {n} bytes");
    }
    assert_eq!(echo.seen.lock().unwrap().len(), 3);

    // The transparent proxy, reached at its own (local) address: TCP and UDP, v4 and v6.
    for dst in [
        SocketAddr::from((env.lab.server_tun_v4(), TPROXY_PORT)),
        SocketAddr::from((env.lab.server_tun_v6(), TPROXY_PORT)),
    ] {
        let r = proxies::tcp_request(&device.ns, dst, vec![1; 5000], SHORT).expect("tcp to the transparent proxy");
        assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}\n"));
        let r = proxies::udp_request(&device.ns, dst, b"q".to_vec(), SHORT).expect("udp to the transparent proxy");
        assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}"));
    }
    let seen = tproxy.intercepted();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().filter(|i| i.proto == "tcp").all(|i| i.bytes == 5000), "{seen:?}");
    assert_no_nat(&lab_namespaces(&env));
}

#[test]
fn forward_rules_carry_http_proxy_socks5_and_fragmented_udp_without_nat() {
    if !require_root() {
        return;
    }
    let f = Forward::new("tmsf");
    let ns = lab_namespaces(&f.env);
    assert_no_nat(&ns);

    f.fetch_big(&f.http_proxy_args(), "http proxy (tinyproxy) via forward tcp/18080");
    f.fetch_big(&f.socks_args(), "socks5 (danted) via forward tcp/11080");
    // The proxies saw the customer's own address (no masquerading) ...
    let log = f.tinyproxy.log_text();
    assert!(log.contains(&format!("): {}", f.customer.v4)), "tinyproxy never saw {}:\n{log}", f.customer.v4);
    // ... and fetched from the web server under the device's VPN address.
    let reqs = f.web.requests();
    assert!(
        reqs.iter().filter(|(peer, t)| peer.ip() == IpAddr::V4(f.device.v4) && t.ends_with("/big")).count() >= 2,
        "web server requests: {reqs:?}"
    );

    // UDP, 3000 bytes fragmented on the way in (customer MTU 1500) and on the way back (device
    // tun MTU 1500).
    f.udp_roundtrips(&[64, 1400, 3000, 3000, 8000]);
    // The device saw the customer's own address: no masquerading.
    let seen = f.echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "datagrams at the device: {seen:?}");
    assert!(seen.iter().all(|(from, _)| from.ip() == IpAddr::V4(f.customer.v4)), "{seen:?}");
    assert_eq!(seen.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![64, 1400, 3000, 3000, 8000]);

    let list = steer_list(&f.env);
    let udp = forward_rule(&list, "udp", PUB_UDP).unwrap();
    assert_eq!(u(&udp, "to_target_packets"), 1 + 1 + 3 + 3 + 6, "udp rule: fragments to the device: {udp}");
    assert_eq!(u(&udp, "from_target_packets"), 1 + 1 + 3 + 3 + 6, "udp rule: fragments from the device: {udp}");
    eprintln!("{}", serde_json::to_string_pretty(&list).unwrap());
    for bad in [
        tunmeter_common::SteerEvent::RewriteFailed,
        tunmeter_common::SteerEvent::FragmentUnknown,
        tunmeter_common::SteerEvent::FlowTableError,
    ] {
        let bad = bad.name();
        assert_eq!(u(&list["events"][bad], "packets"), 0, "steering event {bad}: {}", list["events"]);
    }
    assert_no_nat(&ns);
}

/// (packets, bytes) of the nft counter with this comment in `table inet tmsteer`.
fn nft_counter(ns: &str, comment: &str) -> (u64, u64) {
    let v: Value = serde_json::from_str(&ns_sh(ns, &["nft", "-j", "list", "table", "inet", "tmsteer"])).unwrap();
    for item in v["nftables"].as_array().unwrap() {
        let r = &item["rule"];
        if r["comment"] == comment {
            let c = r["expr"].as_array().unwrap().iter().find_map(|e| e.get("counter")).unwrap();
            return (c["packets"].as_u64().unwrap(), c["bytes"].as_u64().unwrap());
        }
    }
    panic!("no nft rule {comment:?}: {v}");
}

#[test]
fn forward_rule_counters_equal_nftables_forward_hook_counters() {
    if !require_root() {
        return;
    }
    let f = Forward::new("tmsc");
    let srv = f.env.lab.server_ns();
    let (d, p) = (f.device.v4, HTTP_PROXY_PORT);
    // The forward hook sees every forwarded skb the TC hooks see (after the ingress rewrite,
    // before the egress one); its counters add skb->len = L3 bytes, as the rule counters do.
    let script = format!(
        "add table inet tmsteer\n\
         add chain inet tmsteer tmfwd {{ type filter hook forward priority 0; policy accept; }}\n\
         add rule inet tmsteer tmfwd ip daddr {d} tcp dport {p} counter comment \"to_device\"\n\
         add rule inet tmsteer tmfwd ip saddr {d} tcp sport {p} counter comment \"from_device\"\n"
    );
    let path = format!("/tmp/tmtest-nft-{}-{}.nft", f.env.lab.prefix(), std::process::id());
    std::fs::write(&path, script).unwrap();
    let r = netns_exec(&srv, &["nft", "-f", &path]);
    let _ = std::fs::remove_file(&path);
    r.expect("nft counters on the forward hook");

    let read = |f: &Forward| {
        let r = forward_rule(&steer_list(&f.env), "tcp", PUB_HTTP).expect("the http forward rule");
        let tm = [
            u(&r, "to_target_packets"),
            u(&r, "to_target_bytes"),
            u(&r, "from_target_packets"),
            u(&r, "from_target_bytes"),
        ];
        let (tp, tb) = nft_counter(&srv, "to_device");
        let (fp, fb) = nft_counter(&srv, "from_device");
        (tm, [tp, tb, fp, fb])
    };
    let before = read(&f);
    assert_eq!(before.0, [0; 4], "a new rule starts at zero");
    f.fetch_big(&f.http_proxy_args(), "http proxy");
    for _ in 0..5 {
        f.fetch_small(&f.http_proxy_args(), 10).expect("small page via the http proxy");
    }
    // Read while nothing moves any more (two equal readings in a row, bounded).
    let mut prev = read(&f);
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = read(&f);
        if now == prev {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "traffic never went quiet: {now:?}");
        prev = now;
    }
    let (tm, nft) = prev;
    eprintln!("rule counters [to p, to B, from p, from B]: tunmeter {tm:?}, nftables {nft:?}");
    assert!(nft[0] > 0 && nft[2] > 0 && nft[3] > proxies::BIG_LEN as u64, "no traffic counted by nftables: {nft:?}");
    assert_eq!(tm, nft, "forward rule counters vs nftables on the forward hook\n{}", steer_dump(&f.env));
    // The other rules moved nothing.
    let list = steer_list(&f.env);
    let socks = forward_rule(&list, "tcp", PUB_SOCKS).unwrap();
    assert_eq!(u(&socks, "to_target_packets") + u(&socks, "from_target_packets"), 0, "{socks}");
}

#[test]
fn deleted_forward_rule_refuses_new_connections_and_others_keep_working() {
    if !require_root() {
        return;
    }
    let f = Forward::new("tmsd");
    f.fetch_small(&f.http_proxy_args(), 10).expect("http proxy before the delete");
    f.fetch_small(&f.socks_args(), 10).expect("socks before the delete");

    steer_ok(&f.env, &["del", "forward", "--proto", "tcp", "--public-port", &PUB_HTTP.to_string()]);
    let list = steer_list(&f.env);
    assert!(forward_rule(&list, "tcp", PUB_HTTP).is_none(), "deleted rule still listed: {list}");
    assert!(forward_rule(&list, "tcp", PUB_SOCKS).is_some(), "{list}");

    let t0 = Instant::now();
    let r = f.fetch_small(&f.http_proxy_args(), 4);
    assert!(r.is_err(), "a new connection to the deleted public port still reached the proxy");
    eprintln!("after the delete: {} ({:?})", r.unwrap_err(), t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(6));

    f.fetch_big(&f.socks_args(), "socks5 after deleting the http rule");
    f.udp_roundtrips(&[100, 3000]);
    // Deleting again is an error (nothing to delete).
    let again = steer(&f.env, &["del", "forward", "--proto", "tcp", "--public-port", &PUB_HTTP.to_string()]);
    assert!(!again.status.success(), "deleting a missing rule succeeded");
    assert_no_nat(&lab_namespaces(&f.env));
}
