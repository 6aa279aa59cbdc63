//! Redirect rules on the L3 (tun) instance, each test in a fresh network namespace: no proxy
//! (dropped), bypass, a real transparent listener, socket lookups. What cannot be proxied
//! (fragments, options, extension headers, other protocols) is in `evasion`.

use super::*;

/// The redirected VPN client of the redirect tests.
pub(super) const CLIENT: &str = "10.8.0.2";
const REDIRECT_MARK: u32 = 0x746d_0001;

pub(super) const PROXY_PORT: u16 = 12345;
pub(super) const REDIRECT_RULE: u32 = 3;
pub(super) const REDIRECT_RULE_V6: u32 = 4;

pub(super) fn redirect_harness() -> (Harness, SteerTables) {
    let h = Harness::new(Layer::L3, 1024, SUBNETS);
    let s = SteerTables::new(h.pins.path());
    s.add_redirect("10.8.0.0/24", PROXY_PORT, REDIRECT_RULE);
    s.add_redirect("fd00:8::/64", PROXY_PORT, REDIRECT_RULE_V6);
    s.add_bypass(["10.8.0.1/32", "192.0.2.0/24"].map(|n| n.parse().unwrap()));
    (h, s)
}

#[test]
fn redirect_without_a_proxy_socket_drops_bypasses_and_passes() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        let syn = Packet::tcp().src(CLIENT).dst("1.1.1.1").ports(CPORT, 443).syn().id(1).df().build();
        let udp_q = Packet::udp().src(CLIENT).dst("8.8.8.8").ports(CPORT, 53).payload(b"q").id(2).build();
        let v6 = Packet::bare_tcp().src("fd00:8::2").dst("2001:db8::1").ports(CPORT, 443).build();
        for (what, p) in [("TCP SYN", &syn), ("UDP", &udp_q), ("IPv6 TCP", &v6)] {
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            check_unchanged(&format!("redirected {what}, proxy missing"), ret, TC_ACT_SHOT, &out, p);
        }
        let missing = syn.len() + udp_q.len() + v6.len();

        let byp1 = Packet::tcp().src(CLIENT).dst("10.8.0.1").ports(CPORT, 22).syn().id(3).build();
        let byp2 = Packet::udp().src(CLIENT).dst("192.0.2.7").ports(CPORT, 53).payload(b"x").id(4).build();
        for (what, p) in [("to the server address", &byp1), ("to a bypassed subnet", &byp2)] {
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            check_unchanged(&format!("bypass {what}"), ret, TC_ACT_UNSPEC, &out, p);
        }
        let bypassed = byp1.len() + byp2.len();

        let frag: Vec<Vec<u8>> = Packet::udp()
            .src(CLIENT)
            .dst("1.1.1.1")
            .ports(1, 2)
            .payload([0; 100])
            .id(9)
            .fragments(&[48])
            .iter()
            .map(Packet::build)
            .collect();
        // The default policy (`unparsed = "drop"`): neither fragment, nor ICMP, goes around the proxy.
        let (ret, out) = h.run_out(PROG_INGRESS, &frag[0]);
        check_unchanged("first fragment from a redirected client", ret, TC_ACT_SHOT, &out, &frag[0]);
        let (ret, out) = h.run_out(PROG_INGRESS, &frag[1]);
        check_unchanged("later fragment from a redirected client", ret, TC_ACT_SHOT, &out, &frag[1]);
        let fragments = frag[0].len() + frag[1].len();
        let echo = Packet::icmp().src(CLIENT).dst("1.1.1.1").payload([0; 8]).id(6).build();
        let (ret, out) = h.run_out(PROG_INGRESS, &echo);
        check_unchanged("ICMP from a redirected client", ret, TC_ACT_SHOT, &out, &echo);

        let other = Packet::tcp().src("10.7.0.5").dst("1.1.1.1").ports(1, 443).syn().id(5).build();
        let (ret, out) = h.run_out(PROG_INGRESS, &other);
        check_unchanged("source not in REDIRECT_SOURCES", ret, TC_ACT_UNSPEC, &out, &other);
        // Egress (to the client) is never redirected.
        let down = Packet::tcp().src("1.1.1.1").dst(CLIENT).ports(443, CPORT).ack().id(7).build();
        let (ret, out) = h.run_out(PROG_EGRESS, &down);
        check_unchanged("egress to a redirected client", ret, TC_ACT_UNSPEC, &out, &down);

        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::ProxyMissing, 3, missing),
                (SteerEvent::Bypassed, 2, bypassed),
                (SteerEvent::RedirectFragment, 2, fragments),
                (SteerEvent::RedirectOtherProto, 1, echo.len()),
            ])
        );
    });
}

/// With a transparent listener on the proxy port in the namespace, a SYN is handed to it.
/// Whether `bpf_sk_assign` can succeed under BPF_PROG_TEST_RUN is what this finds out: it
/// requires an skb at TC ingress, which a test run may not provide. In that case the lookup
/// must still have found the socket (no `proxy_missing`).
#[test]
fn redirect_to_a_transparent_listener() {
    if !require_root() {
        return;
    }
    use tunmeter_lab::sockets::{transparent_tcp_listener, transparent_udp};
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        let any = std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT));
        let (_tcp_l, _udp_s) = (transparent_tcp_listener(any).unwrap(), transparent_udp(any).unwrap());

        let syn = Packet::tcp().src(CLIENT).dst("1.1.1.1").ports(CPORT, 443).syn().id(1).df().build();
        let udp_q = Packet::udp().src(CLIENT).dst("8.8.8.8").ports(CPORT, 53).payload(b"q").id(2).build();
        let mut report = Vec::new();
        for (what, p) in [("TCP SYN", &syn), ("UDP", &udp_q)] {
            let before = s.events();
            let (ret, out, skb) = h.try_run_skb(PROG_INGRESS, p).expect("test run");
            let after = s.events();
            let delta: Vec<&str> = after.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, _)| *k).collect();
            eprintln!("redirect {what}: ret {ret:#x}, mark {:#x}, events {delta:?}", skb.mark);
            assert_eq!(out, *p, "{what}: redirect changes no byte of the packet");
            assert!(
                !delta.contains(&SteerEvent::ProxyMissing.name()),
                "{what}: the listener on 0.0.0.0:{PROXY_PORT} was not found"
            );
            report.push((what, ret, skb.mark, delta));
        }
        let mut redirected = 0;
        for (what, ret, mark, delta) in report {
            if delta == [SteerEvent::AssignFailed.name()] {
                eprintln!(
                    "note: {what}: bpf_sk_assign fails under BPF_PROG_TEST_RUN (no TC-ingress skb); the lookup found the proxy socket"
                );
                assert_eq!(ret, TC_ACT_SHOT, "{what}: assign failure drops");
            } else {
                assert_eq!(delta, [SteerEvent::Redirected.name()], "{what}: events");
                assert_eq!(ret, TC_ACT_UNSPEC, "{what}: a redirected packet continues");
                assert_eq!(mark, REDIRECT_MARK, "{what}: skb->mark");
                redirected += 1;
            }
        }
        let rc = s.rule(REDIRECT_RULE);
        eprintln!("RULE_COUNTERS[{REDIRECT_RULE}] = {rc:?}");
        if redirected == 2 {
            assert_eq!(rc, counters(syn.len() + udp_q.len(), 2, 0, 0), "redirect rule counts what it steered");
        }
    });
}

/// The TCP lookups under BPF_PROG_TEST_RUN, told apart by the event they end in (no proxy
/// socket exists at the proxy port): a segment of an established connection finds that
/// connection's socket (-> an assign attempt, not `proxy_missing`); a SYN to a port with only a
/// listener skips the listener and finds no proxy (`proxy_missing`).
#[test]
fn redirect_tcp_lookup_finds_established_and_skips_foreign_listeners() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        tunmeter_lab::loopback_up().unwrap();
        let h = Harness::new(Layer::L3, 1024, SUBNETS);
        let s = SteerTables::new(h.pins.path());
        let mut h = h;
        s.add_redirect("127.0.0.0/8", PROXY_PORT, 5);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_a, _) = l.accept().unwrap();
        let (lport, cport) = (l.local_addr().unwrap().port(), c.local_addr().unwrap().port());
        let lo = "127.0.0.1";
        let mut run = |what: &str, p: &[u8]| {
            let before = s.events();
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            assert_eq!(out, p, "{what}: no byte changes");
            let after = s.events();
            let delta: Vec<&str> = after.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, _)| *k).collect();
            eprintln!("{what}: ret {ret:#x}, events {delta:?}");
            (ret, delta)
        };
        let est = Packet::tcp().src(lo).dst(lo).ports(cport, lport).ack().payload(b"x").id(1).df().build();
        let (ret, delta) = run("segment of an established connection", &est);
        assert!(
            delta == [SteerEvent::AssignFailed.name()]
                || (delta == [SteerEvent::Redirected.name()] && ret == TC_ACT_UNSPEC),
            "established connection not found by the real tuple: events {delta:?}, ret {ret:#x}"
        );
        let syn = Packet::tcp().src(lo).dst(lo).ports(1, lport).syn().id(2).df().build();
        let (ret, delta) = run("SYN to a port with a foreign listener, no proxy", &syn);
        assert_eq!(
            (ret, delta),
            (TC_ACT_SHOT, vec![SteerEvent::ProxyMissing.name()]),
            "the listener at the original port is not the proxy"
        );
    });
}
