//! Redirected clients cannot reach the Internet around the proxy: IPv4 fragments and options,
//! IPv6 extension headers and other protocols sent raw onto the client's tun device never leave
//! the server's eth0 with the client's address (an nftables egress counter), while
//! `--allow icmp` and `--unparsed pass` let exactly what they name through (the counter works).

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::*;
use support::packet::{Ext, Packet};

/// nftables table (netdev family) of the leak counters in the server namespace.
const LEAK_TABLE: &str = "tmleak";

/// Count what leaves eth0 with the client's addresses as source.
fn install_leak_counters(srv: &str, v4: std::net::Ipv4Addr, v6: std::net::Ipv6Addr) {
    ns_sh(srv, &["nft", "add", "table", "netdev", LEAK_TABLE]);
    ns_sh(
        srv,
        &["nft", "add", "chain", "netdev", LEAK_TABLE, "eg", "{ type filter hook egress device eth0 priority 0 ; }"],
    );
    ns_sh(srv, &["nft", "add", "rule", "netdev", LEAK_TABLE, "eg", "ip", "saddr", &v4.to_string(), "counter"]);
    ns_sh(srv, &["nft", "add", "rule", "netdev", LEAK_TABLE, "eg", "ip6", "saddr", &v6.to_string(), "counter"]);
}

/// (IPv4 packets, IPv6 packets) that left eth0 with the client's source addresses.
fn leaked(srv: &str) -> (u64, u64) {
    let text = ns_sh(srv, &["nft", "list", "table", "netdev", LEAK_TABLE]);
    let count = |fam: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{fam} saddr")))
            .unwrap_or_else(|| panic!("no {fam} counter in:\n{text}"));
        let w: Vec<&str> = line.split_whitespace().collect();
        let i = w.iter().position(|x| *x == "packets").unwrap_or_else(|| panic!("no packets in {line}"));
        w[i + 1].parse().unwrap()
    };
    (count("ip"), count("ip6"))
}

/// Send raw IP packets out of `dev` in `ns` (an AF_PACKET datagram socket: the bytes are the
/// packet, from the IP header on), as a client's own stack would put them on its tun device.
fn send_raw(ns: &str, dev: &'static str, packets: Vec<Vec<u8>>) {
    tunmeter_lab::in_netns(ns, move || {
        let ifindex = nix::net::if_::if_nametoindex(dev)?;
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        for p in &packets {
            let proto: u16 = if p[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
            // SAFETY: zeroed sockaddr_ll, then filled.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto.to_be();
            sa.sll_ifindex = ifindex as i32;
            // SAFETY: buffer and address valid for the call.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&sa as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n != p.len() as isize {
                anyhow::bail!("sendto of {} bytes: {}", p.len(), io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .unwrap_or_else(|e| panic!("sending raw packets in {ns}: {e:#}"));
}

/// Every way around the proxy, from `src4`/`src6` to a host behind eth0, with the event each is
/// counted as.
fn evasive(
    c: &Client,
    dst4: std::net::Ipv4Addr,
    dst6: std::net::Ipv6Addr,
) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let tcp4 = || Packet::tcp().src(c.v4).dst(dst4).ports(40_001, 80).syn();
    let tcp6 = || Packet::tcp().src(c.v6).dst(dst6).ports(40_002, 80).syn();
    let raw4 = |proto: u8| Packet::l4(proto, [0x42; 24]).src(c.v4).dst(dst4).build();
    let raw6 = |proto: u8| Packet::l4(proto, [0x42; 24]).src(c.v6).dst(dst6).build();
    let frags = tcp4().payload([0x5a; 200]).id(0x4242).fragments(&[96]);
    let udp = Packet::udp().src(c.v4).dst(dst4).ports(40_003, 53).payload([1; 300]).id(0x4343).fragments(&[128]);
    let routing = Ext::Routing { typ: 4, segments_left: 0, data: vec![0; 4] };
    vec![
        ("IPv4 TCP first fragment", frags[0].build(), "redirect_fragment"),
        ("IPv4 TCP later fragment", frags[1].build(), "redirect_fragment"),
        ("IPv4 UDP first fragment", udp[0].build(), "redirect_fragment"),
        ("IPv4 UDP later fragment", udp[1].build(), "redirect_fragment"),
        ("IPv4 TCP with options", tcp4().options([1, 1, 1, 0]).build(), "redirect_ip_options"),
        ("IPv4 ICMP echo", Packet::icmp().src(c.v4).dst(dst4).payload([0; 16]).build(), "redirect_other_proto"),
        ("IPv4 GRE", raw4(47), "redirect_other_proto"),
        ("IPv4 ESP", raw4(50), "redirect_other_proto"),
        ("IPv4 SCTP", raw4(132), "redirect_other_proto"),
        ("IPv4 IP-in-IP", raw4(4), "redirect_other_proto"),
        ("IPv6 hop-by-hop + TCP", tcp6().ext(Ext::hop_by_hop()).build(), "redirect_ext_header"),
        ("IPv6 routing + TCP", tcp6().ext(routing).build(), "redirect_ext_header"),
        ("IPv6 fragment header + TCP", tcp6().ext(Ext::fragment(0, false, 9)).build(), "redirect_ext_header"),
        ("IPv6 destination options (PadN) + TCP", tcp6().ext(Ext::dest_opts()).build(), "redirect_ext_header"),
        ("IPv6 AH", raw6(51), "redirect_other_proto"),
        ("IPv6 ESP", raw6(50), "redirect_other_proto"),
        ("IPv6 mobility", raw6(135), "redirect_other_proto"),
        ("ICMPv6 echo", Packet::icmpv6().src(c.v6).dst(dst6).payload([0; 16]).build(), "redirect_other_proto"),
    ]
}

fn event(list: &Value, name: &str) -> u64 {
    list["events"][name]["packets"].as_u64().unwrap_or_else(|| panic!("no event {name} in {list}"))
}

/// Wait (bounded) until `f` holds; false if it never did.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..50 {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

fn set_rules(env: &Env, srcs: &[String], extra: &[&str]) {
    let port = TPROXY_PORT.to_string();
    for src in srcs {
        let _ = steer(env, &["del", "redirect", "--source", src]);
        steer_ok(env, &[&["add", "redirect", "--source", src.as_str(), "--proxy-port", &port], extra].concat());
    }
}

#[test]
fn redirected_clients_cannot_leave_around_the_proxy() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsv", 2, 2);
    let srv = env.lab.server_ns();
    let client = env.lab.tun_clients()[1].clone();
    let host = env.lab.eth_clients()[1].clone();
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
    ns_sh(&client.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
    ns_sh(&client.ns, &["ip", "-6", "route", "add", "default", "dev", "tun0"]);
    let daemon = env.start_daemon(&[]);
    let tproxy = TransparentProxy::start(&srv, TPROXY_PORT).expect("transparent proxy");
    install_leak_counters(&srv, client.v4, client.v6);
    let srcs = [format!("{}/32", client.v4), format!("{}/128", client.v6)];
    let kinds = evasive(&client, host.v4, host.v6);
    let packets: Vec<Vec<u8>> = kinds.iter().map(|(_, p, _)| p.clone()).collect();
    let (n4, n6) = (
        kinds.iter().filter(|(_, p, _)| p[0] >> 4 == 4).count() as u64,
        kinds.iter().filter(|(_, p, _)| p[0] >> 4 == 6).count() as u64,
    );

    // 1. The default policy: every kind is dropped, counted by reason, nothing leaves.
    set_rules(&env, &srcs, &[]);
    let list = steer_list(&env);
    assert_eq!(redirect_rule(&list, &srcs[0]).unwrap()["unparsed"], "drop", "{list}");
    // Proxied traffic works and does not leave with the client's address either.
    let dst = SocketAddr::from((host.v4, WEB_PORT));
    let r = proxies::tcp_request(&client.ns, dst, b"hello".to_vec(), SHORT).expect("TCP through the proxy");
    assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}\n"));
    send_raw(&client.ns, "tun0", packets.clone());
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, _, e) in &kinds {
        *want.entry(e).or_default() += 1;
    }
    let done = eventually(|| {
        let l = steer_list(&env);
        want.iter().all(|(e, n)| event(&l, e) >= *n)
    });
    let list = steer_list(&env);
    assert!(done, "not every evasive packet was counted: want {want:?}\n{list}");
    for (e, n) in &want {
        assert_eq!(event(&list, e), *n, "event {e}: {list}");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(leaked(&srv), (0, 0), "packets left eth0 around the proxy\n{}", steer_dump(&env));
    assert!(tproxy.intercepted().iter().all(|i| i.orig == dst), "{:?}", tproxy.intercepted());

    // 2. `--allow icmp`: the echo requests leave, nothing else does.
    set_rules(&env, &srcs, &["--allow", "icmp"]);
    send_raw(&client.ns, "tun0", packets.clone());
    assert!(eventually(|| leaked(&srv) == (1, 1)), "with --allow icmp: leaked {:?}, want (1, 1)", leaked(&srv));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(leaked(&srv), (1, 1), "with --allow icmp only the two echo requests leave");

    // 3. The counter sees what passes: with `--unparsed pass` every one of them leaves.
    set_rules(&env, &srcs, &["--unparsed", "pass"]);
    send_raw(&client.ns, "tun0", packets);
    let want_leak = (1 + n4, 1 + n6);
    let ok = eventually(|| leaked(&srv) == want_leak);
    assert!(
        ok,
        "with --unparsed pass: leaked {:?}, want {want_leak:?} (kinds: {:?})",
        leaked(&srv),
        kinds.iter().map(|k| k.0).collect::<Vec<_>>()
    );
    for src in &srcs {
        steer_ok(&env, &["del", "redirect", "--source", src]);
    }
    let _ = (&daemon, &tproxy);
}
