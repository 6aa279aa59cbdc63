//! Redirect sources cannot go around the proxy: every packet of a redirected client that the
//! program cannot hand to the proxy (IPv4 fragments and options, IPv6 extension headers, other
//! protocols, cut-short headers) is dropped by default and counted by reason; `unparsed = "pass"`
//! and the `allow` list pass exactly what they name, and bypassed destinations stay bypassed.

use tunmeter_common::{REDIRECT_UNPARSED_PASS, redirect_allow_bit};

use super::{
    redirect::{CLIENT, PROXY_PORT, REDIRECT_RULE, REDIRECT_RULE_V6, redirect_harness},
    *,
};

const CLIENT6: &str = "fd00:8::2";

/// Every kind of packet a redirected client could try to get around the proxy with, and the
/// event it must be counted as.
fn evasive() -> Vec<(&'static str, Vec<u8>, SteerEvent)> {
    let v4 = || Packet::tcp().src(CLIENT).dst("1.1.1.1").ports(CPORT, 443);
    let v6 = || Packet::bare_tcp().src(CLIENT6).dst("2001:db8::1").ports(CPORT, 443);
    let frags = v4().syn().payload([0x5a; 64]).id(0x77).fragments(&[48]);
    let udp_frags =
        Packet::udp().src(CLIENT).dst("1.1.1.1").ports(CPORT, 53).payload([1; 100]).id(0x78).fragments(&[48]);
    let raw4 = |proto: u8| Packet::l4(proto, [0x42; 24]).src(CLIENT).dst("1.1.1.1").id(9).build();
    let raw6 = |proto: u8| Packet::l4(proto, [0x42; 24]).src(CLIENT6).dst("2001:db8::1").build();
    let routing = Ext::Routing { typ: 4, segments_left: 0, data: vec![0; 4] };
    vec![
        ("IPv4 first fragment (TCP)", frags[0].build(), SteerEvent::RedirectFragment),
        ("IPv4 later fragment (TCP)", frags[1].build(), SteerEvent::RedirectFragment),
        ("IPv4 first fragment (UDP)", udp_frags[0].build(), SteerEvent::RedirectFragment),
        ("IPv4 later fragment (UDP)", udp_frags[1].build(), SteerEvent::RedirectFragment),
        ("IPv4 TCP with options (NOPs)", v4().syn().options([1, 1, 1, 0]).build(), SteerEvent::RedirectIpOptions),
        ("IPv4 TCP with a cut-short header", v4().syn().truncate_l4(10).build(), SteerEvent::NotRedirectable),
        (
            "IPv4 ICMP echo",
            Packet::icmp().src(CLIENT).dst("1.1.1.1").payload([0; 8]).build(),
            SteerEvent::RedirectOtherProto,
        ),
        ("IPv4 GRE", raw4(47), SteerEvent::RedirectOtherProto),
        ("IPv4 ESP", raw4(50), SteerEvent::RedirectOtherProto),
        ("IPv4 SCTP", raw4(132), SteerEvent::RedirectOtherProto),
        ("IPv4 IP-in-IP", raw4(4), SteerEvent::RedirectOtherProto),
        ("IPv6 hop-by-hop before TCP", v6().ext(Ext::hop_by_hop()).build(), SteerEvent::RedirectExtHeader),
        ("IPv6 routing header before TCP", v6().ext(routing).build(), SteerEvent::RedirectExtHeader),
        ("IPv6 fragment header before TCP", v6().ext(Ext::fragment(0, true, 7)).build(), SteerEvent::RedirectExtHeader),
        (
            "IPv6 destination options (PadN) before TCP",
            v6().ext(Ext::dest_opts()).build(),
            SteerEvent::RedirectExtHeader,
        ),
        ("IPv6 AH", raw6(51), SteerEvent::RedirectOtherProto),
        ("IPv6 ESP", raw6(50), SteerEvent::RedirectOtherProto),
        ("IPv6 mobility header", raw6(135), SteerEvent::RedirectOtherProto),
        ("IPv6 no next header", raw6(59), SteerEvent::RedirectOtherProto),
        (
            "ICMPv6 echo",
            Packet::icmpv6().src(CLIENT6).dst("2001:db8::1").payload([0; 8]).build(),
            SteerEvent::RedirectOtherProto,
        ),
    ]
}

/// Both redirect rules of the harness again, with `flags`.
fn set_flags(s: &SteerTables, flags: u32) {
    s.add_redirects_flagged([
        ("10.8.0.0/24".parse().unwrap(), PROXY_PORT, REDIRECT_RULE, flags),
        ("fd00:8::/64".parse().unwrap(), PROXY_PORT, REDIRECT_RULE_V6, flags),
    ]);
}

/// Run every evasive packet; each must come back unchanged with `want_ret`. Returns the events
/// they must have counted.
fn run_all(h: &mut Harness, want_ret: u32, policy: &str) -> Vec<(SteerEvent, u64, usize)> {
    evasive()
        .into_iter()
        .map(|(what, p, e)| {
            let (ret, out) = h.run_out(PROG_INGRESS, &p);
            check_unchanged(&format!("{what} from a redirected client ({policy})"), ret, want_ret, &out, &p);
            (e, 1, p.len())
        })
        .collect()
}

#[test]
fn redirect_sources_cannot_evade_the_proxy_by_default_and_pass_only_when_told() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        let dropped = run_all(&mut h, TC_ACT_SHOT, "default policy: drop");
        assert_eq!(s.events(), events(&dropped), "STEER_STATS after the default policy");
        assert_eq!(s.rule(REDIRECT_RULE), RuleCounters::default(), "nothing reached the proxy");

        set_flags(&s, REDIRECT_UNPARSED_PASS);
        let passed = run_all(&mut h, TC_ACT_UNSPEC, "unparsed = pass");
        assert_eq!(s.events(), events(&[dropped, passed].concat()), "STEER_STATS after unparsed = pass");
    });
}

#[test]
fn redirect_allow_list_passes_only_the_protocols_it_names() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        set_flags(&s, redirect_allow_bit(1));
        let echo = Packet::icmp().src(CLIENT).dst("1.1.1.1").payload([0; 8]).build();
        let echo6 = Packet::icmpv6().src(CLIENT6).dst("2001:db8::1").payload([0; 8]).build();
        let gre = Packet::l4(47, [0x42; 24]).src(CLIENT).dst("1.1.1.1").build();
        let frag = Packet::icmp().src(CLIENT).dst("1.1.1.1").payload([0; 100]).id(3).fragments(&[48]);
        let (frag0, frag1) = (frag[0].build(), frag[1].build());
        for (what, p, want) in [
            ("ICMP echo, icmp allowed", &echo, TC_ACT_UNSPEC),
            ("ICMPv6 echo, icmp allowed", &echo6, TC_ACT_UNSPEC),
            ("fragmented ICMP, icmp allowed", &frag0, TC_ACT_UNSPEC),
            ("later ICMP fragment, icmp allowed", &frag1, TC_ACT_UNSPEC),
            ("GRE, only icmp allowed", &gre, TC_ACT_SHOT),
        ] {
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            check_unchanged(what, ret, want, &out, p);
        }
        let allowed = echo.len() + echo6.len() + frag0.len() + frag1.len();
        assert_eq!(
            s.events(),
            events(&[(SteerEvent::RedirectAllowed, 4, allowed), (SteerEvent::RedirectOtherProto, 1, gre.len())])
        );
        set_flags(&s, redirect_allow_bit(1) | redirect_allow_bit(47));
        let (ret, out) = h.run_out(PROG_INGRESS, &gre);
        check_unchanged("GRE, gre allowed", ret, TC_ACT_UNSPEC, &out, &gre);
    });
}

#[test]
fn bypassed_destinations_stay_reachable_whatever_the_packet() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        // 10.8.0.1 (the server) and 192.0.2.0/24 are bypassed by the harness.
        let ping = Packet::icmp().src(CLIENT).dst("10.8.0.1").payload([0; 8]).build();
        let frags =
            Packet::udp().src(CLIENT).dst("192.0.2.9").ports(CPORT, 53).payload([1; 100]).id(4).fragments(&[48]);
        let opts = Packet::tcp().src(CLIENT).dst("10.8.0.1").ports(CPORT, 22).syn().options([1, 1, 1, 0]).build();
        let mut total = 0;
        for (what, p) in [
            ("ping to the server", ping),
            ("UDP fragment", frags[0].build()),
            ("later fragment", frags[1].build()),
            ("IPv4 options", opts),
        ] {
            let (ret, out) = h.run_out(PROG_INGRESS, &p);
            check_unchanged(&format!("{what} to a bypassed destination"), ret, TC_ACT_UNSPEC, &out, &p);
            total += p.len();
        }
        assert_eq!(s.events(), events(&[(SteerEvent::Bypassed, 4, total)]));
    });
}
