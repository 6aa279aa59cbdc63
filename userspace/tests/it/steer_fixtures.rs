//! BPF_PROG_TEST_RUN fixtures for steering: the real eBPF object, forward rules on the L2
//! (Ethernet) instance and redirect rules on the L3 (tun) instance, fed crafted packets with
//! valid checksums. Each translation is compared byte for byte with a packet built
//! independently (the same builders, the translated addresses) and every checksum of the
//! program's output is verified from scratch (`support::checksum`), as are the flow, fragment,
//! rule-counter and event maps.
//!
//! Run as root: `cargo test -p tunmeter --test it -- steer_fixtures::`.

use crate::support;

use std::{collections::BTreeMap, net::Ipv4Addr};

use support::{
    Harness, checksum,
    packet::{ACK, Ext, IP_MF, PSH, Packet, SYN, TCP, UDP},
    require_root,
    steer::{SteerTables, addr, flow_key, frag_key, show_addr},
};
use tunmeter::{
    config::Layer,
    loader::{PROG_EGRESS, PROG_INGRESS},
};
use tunmeter_common::{FRAG_FROM_DEVICE, FRAG_TO_DEVICE, FlowKey, FlowNat, FragNat, RuleCounters, SteerEvent};

const SUBNETS: &[&str] = &["10.8.0.0/24", "fd00:8::/64"];
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const ETH: usize = 14;

/// The addresses of a forward test: the server's public address (and another one of the
/// server), a customer on the Internet side, the device behind the VPN.
struct Net {
    name: &'static str,
    public: &'static str,
    other_public: &'static str,
    cust: &'static str,
    dev: &'static str,
}

/// The addresses of the brief. Note: 10.9.0.1 and 10.8.0.2 have the same one's-complement sum
/// (0x0a09 + 0x0001 = 0x0a08 + 0x0002), so rewriting one into the other leaves the IP header and
/// pseudo-header checksums unchanged: with these alone a missing address checksum update would
/// go unnoticed. Hence every forward test also runs with `SKEWED`.
const BRIEF: Net = Net {
    name: "brief addresses (public 10.9.0.1, device 10.8.0.2)",
    public: "10.9.0.1",
    other_public: "10.9.0.99",
    cust: "10.9.0.2",
    dev: "10.8.0.2",
};
/// Addresses whose rewrite changes every checksum.
const SKEWED: Net = Net {
    name: "skewed addresses (public 203.0.113.7, device 10.8.0.77)",
    public: "203.0.113.7",
    other_public: "203.0.113.99",
    cust: "198.51.100.20",
    dev: "10.8.0.77",
};

/// Run a forward test with both address sets (root only).
fn for_each_net(f: impl Fn(&Net)) {
    if !require_root() {
        return;
    }
    for n in [&BRIEF, &SKEWED] {
        eprintln!("=== with {}", n.name);
        f(n);
    }
}

/// The redirected VPN client of the redirect tests.
const CLIENT: &str = "10.8.0.2";
const CPORT: u16 = 40000;

const TCP_PUB_PORT: u16 = 8080;
const TCP_DEV_PORT: u16 = 3128;
const TCP_RULE: u32 = 7;
const UDP_PUB_PORT: u16 = 5353;
const UDP_DEV_PORT: u16 = 53;
const UDP_RULE: u32 = 9;

const REDIRECT_MARK: u32 = 0x746d_0001;

// ---------------------------------------------------------------------------------------------
// Map access
// ---------------------------------------------------------------------------------------------

fn show_flow(k: &FlowKey, v: &FlowNat) -> String {
    format!(
        "{{dev {}:{} cust {}:{} proto {} pad {:?}}} -> {{public {}:{} rule {}}}",
        show_addr(k.device_addr),
        u16::from_be(k.device_port_be),
        show_addr(k.customer_addr),
        u16::from_be(k.customer_port_be),
        k.proto,
        k._pad,
        show_addr(v.public_addr),
        u16::from_be(v.public_port_be),
        v.rule_id
    )
}

/// The flow table holds exactly `want` (key compared whole, padding included: a key with junk
/// padding would never be found by the other path; value compared by field).
fn assert_flows(s: &SteerTables, want: &[(FlowKey, &str, u16, u32)]) {
    let have = s.flows();
    let have_s: Vec<String> = have.iter().map(|(k, v)| show_flow(k, v)).collect();
    let mut want_s: Vec<String> = want
        .iter()
        .map(|(k, a, p, r)| {
            show_flow(k, &FlowNat { public_addr: addr(*a), public_port_be: p.to_be(), _pad: 0, rule_id: *r, _pad2: 0 })
        })
        .collect();
    let mut have_sorted = have_s.clone();
    have_sorted.sort();
    want_s.sort();
    assert_eq!(have_sorted, want_s, "FWD_FLOWS contents");
    for (k, _, _, _) in want {
        assert!(have.iter().any(|(hk, _)| hk == k), "FWD_FLOWS key bytes (padding) differ for {k:?}: have {have:?}");
    }
}

fn counters(to_b: usize, to_p: u64, from_b: usize, from_p: u64) -> RuleCounters {
    RuleCounters {
        to_target_bytes: to_b as u64,
        to_target_packets: to_p,
        from_target_bytes: from_b as u64,
        from_target_packets: from_p,
    }
}

fn events(list: &[(SteerEvent, u64, usize)]) -> BTreeMap<&'static str, (u64, u64)> {
    let mut m = BTreeMap::new();
    for (e, p, b) in list {
        let x: &mut (u64, u64) = m.entry(e.name()).or_default();
        x.0 += p;
        x.1 += *b as u64;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Packets and comparisons
// ---------------------------------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, c) in b.chunks(16).enumerate() {
        s.push_str(&format!("  {:04x}:", i * 16));
        for x in c {
            s.push_str(&format!(" {x:02x}"));
        }
        s.push('\n');
    }
    s
}

/// Name of the header field at frame offset `off` of an Ethernet + IPv4 (IHL 5) frame.
fn field_name(frame: &[u8], off: usize) -> String {
    if off < ETH {
        return "ethernet".into();
    }
    let ip = &frame[ETH..];
    let o = off - ETH;
    let ihl = checksum::ipv4_ihl(ip).unwrap_or(20);
    let name = match o {
        0 => "ip ver/ihl",
        2 | 3 => "ip total length",
        4 | 5 => "ip id",
        6 | 7 => "ip frag",
        10 | 11 => "ip checksum",
        12..=15 => "ip src",
        16..=19 => "ip dst",
        _ if o < ihl => "ip header",
        _ => {
            let l = o - ihl;
            let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
            match (ip[9], l, frag_off) {
                (_, _, f) if f != 0 => "fragment payload",
                (6 | 17, 0 | 1, _) => "l4 sport",
                (6 | 17, 2 | 3, _) => "l4 dport",
                (6, 16 | 17, _) => "tcp checksum",
                (17, 6 | 7, _) => "udp checksum",
                (1, 2 | 3, _) => "icmp checksum",
                (1, 8..=27, _) => match l - 8 {
                    10 | 11 => "inner ip checksum",
                    12..=15 => "inner ip src",
                    16..=19 => "inner ip dst",
                    _ => "inner ip header",
                },
                (1, 28 | 29, _) => "inner l4 sport",
                (1, 30 | 31, _) => "inner l4 dport",
                (1, 34 | 35, _) => "inner udp checksum",
                (1, 44 | 45, _) => "inner tcp checksum",
                _ => "l4/payload",
            }
        }
    };
    name.into()
}

fn byte_diff(have: &[u8], want: &[u8]) -> String {
    let mut s = String::new();
    if have.len() != want.len() {
        s.push_str(&format!("  length: have {} want {}\n", have.len(), want.len()));
    }
    for i in 0..have.len().min(want.len()) {
        if have[i] != want[i] {
            s.push_str(&format!(
                "  offset {i:4} ({:#05x}) [{}]: have {:02x} want {:02x}\n",
                i,
                field_name(want, i),
                have[i],
                want[i]
            ));
        }
    }
    s
}

/// The program's output must be `want` byte for byte, with every checksum valid (checked from
/// scratch on the output itself), and the return code `want_ret`.
#[track_caller]
fn check_translated(what: &str, ret: u32, out: &[u8], want: &[u8]) {
    let problems_out = if out.len() > ETH { checksum::ipv4_problems(&out[ETH..]) } else { vec!["too short".into()] };
    let problems_want = checksum::ipv4_problems(&want[ETH..]);
    assert!(problems_want.is_empty(), "{what}: test bug, expected packet has checksum problems {problems_want:?}");
    if ret != TC_ACT_UNSPEC || out != want || !problems_out.is_empty() {
        panic!(
            "{what}: mismatch\n return code: have {ret:#x} want {TC_ACT_UNSPEC:#x}\n checksum problems in the output: {problems_out:?}\n differing bytes:\n{}\n output:\n{}\n expected:\n{}",
            byte_diff(out, want),
            hex(out),
            hex(want)
        );
    }
}

/// The program must leave the packet exactly as it was and return `want_ret`.
#[track_caller]
fn check_unchanged(what: &str, ret: u32, want_ret: u32, out: &[u8], input: &[u8]) {
    if let Some(p) = unchanged_problem(what, ret, want_ret, out, input) {
        panic!("{p}");
    }
}

fn unchanged_problem(what: &str, ret: u32, want_ret: u32, out: &[u8], input: &[u8]) -> Option<String> {
    (ret != want_ret || out != input).then(|| {
        format!(
            "{what}: must pass untouched\n return code: have {ret:#x} want {want_ret:#x}\n differing bytes:\n{}\n output:\n{}\n input:\n{}",
            byte_diff(out, input),
            hex(out),
            hex(input)
        )
    })
}

fn l3_len(frame: &[u8]) -> usize {
    frame.len() - ETH
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Reassemble IPv4 fragments (IP packets, any order): (src, dst, proto, whole L4 datagram).
fn reassemble(frags: &[&[u8]]) -> ([u8; 4], [u8; 4], u8, Vec<u8>) {
    let mut parts: Vec<(usize, bool, &[u8])> = frags
        .iter()
        .map(|p| {
            let ihl = checksum::ipv4_ihl(p).unwrap();
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            let f = u16::from_be_bytes([p[6], p[7]]);
            (((f & 0x1fff) as usize) * 8, f & IP_MF != 0, &p[ihl..total])
        })
        .collect();
    parts.sort_by_key(|x| x.0);
    let mut data = Vec::new();
    for (i, (off, mf, d)) in parts.iter().enumerate() {
        assert_eq!(*off, data.len(), "fragments not contiguous");
        assert_eq!(*mf, i + 1 != parts.len(), "MF flags");
        data.extend_from_slice(d);
    }
    let p = frags[0];
    for f in frags {
        assert_eq!((&f[12..20], f[9]), (&p[12..20], p[9]), "fragments disagree on addresses/protocol");
    }
    ([p[12], p[13], p[14], p[15]], [p[16], p[17], p[18], p[19]], p[9], data)
}

fn l2_with_rules(n: &Net) -> (Harness, SteerTables) {
    let h = Harness::new(Layer::L2, 1024, SUBNETS);
    let s = SteerTables::new(h.pins.path());
    s.add_forward(TCP, TCP_PUB_PORT, None, n.dev, TCP_DEV_PORT, TCP_RULE);
    s.add_forward(UDP, UDP_PUB_PORT, None, n.dev, UDP_DEV_PORT, UDP_RULE);
    (h, s)
}

/// Customer -> public TCP packet and the packet the device must receive.
fn tcp_to_public(n: &Net, flags: u8, data: &[u8], id: u16) -> (Vec<u8>, Vec<u8>) {
    let seg = Packet::tcp().src(n.cust).sport(CPORT).flags(flags).payload(data).id(id).df().eth();
    (seg.clone().dst(n.public).dport(TCP_PUB_PORT).build(), seg.dst(n.dev).dport(TCP_DEV_PORT).build())
}

/// Device -> customer TCP reply and the packet the customer must receive.
fn tcp_reply(n: &Net, flags: u8, data: &[u8], id: u16) -> (Vec<u8>, Vec<u8>) {
    let seg = Packet::tcp().dst(n.cust).dport(CPORT).flags(flags).payload(data).id(id).df().eth();
    (seg.clone().src(n.dev).sport(TCP_DEV_PORT).build(), seg.src(n.public).sport(TCP_PUB_PORT).build())
}

// ---------------------------------------------------------------------------------------------
// The checksum module itself
// ---------------------------------------------------------------------------------------------

#[test]
#[allow(non_snake_case)]
fn checksum_module_agrees_with_published_examples() {
    // RFC 1071 section 3 example: sum ddf2, checksum 220d.
    let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(checksum::fold(checksum::sum(&d, 0)), 0xddf2);
    assert_eq!(checksum::checksum(&d), 0x220d);
    // A well-known IPv4 header (192.168.0.1 -> 192.168.0.199, UDP) with checksum b861.
    let h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];
    assert!(checksum::ipv4_header_valid(&h));
    assert_eq!(checksum::ipv4_header_checksum(&h), 0xb861);
    let mut bad = h;
    bad[11] ^= 1;
    assert!(!checksum::ipv4_header_valid(&bad));
    let (CUST, PUB, DEV) = (SKEWED.cust, SKEWED.public, SKEWED.dev);
    // Builders: every checksum valid, and a flipped payload bit is caught.
    let t = Packet::tcp().src(CUST).dst(PUB).ports(1, 2).syn().payload(b"abc").id(1).build();
    let u = Packet::udp().src(CUST).dst(PUB).ports(1, 2).payload(b"abcd").id(1).build();
    let i = Packet::icmp_error(3, 3).quote(&u).src(DEV).dst(CUST).id(1).build();
    for p in [&t, &u, &i] {
        assert_eq!(checksum::ipv4_problems(p), Vec::<String>::new());
        let mut q = p.clone();
        *q.last_mut().unwrap() ^= 0x40;
        assert_eq!(checksum::ipv4_problems(&q).len(), 1, "corruption detected");
    }
    // UDP checksum 0 = none: accepted. A datagram whose sum is 0 gets 0xffff.
    let z = Packet::udp().src(CUST).dst(PUB).ports(1, 2).payload(b"x").l4_checksum(0).id(1).build();
    assert!(checksum::ipv4_problems(&z).is_empty());
    let data = udp_payload_with_zero_sum(CUST, PUB, 7, 9);
    assert_eq!(&Packet::udp().src(CUST).dst(PUB).ports(7, 9).payload(&data).l4_bytes()[6..8], &[0xff, 0xff]);
    // Pseudo-header matters: the same segment between other addresses does not verify.
    let seg = Packet::tcp().src(CUST).dst(PUB).ports(1, 2).syn().payload(b"abc").l4_bytes();
    assert!(!checksum::l4_valid(ip4(CUST), ip4(DEV), TCP, &seg));
    // ... except for the brief's addresses (see BRIEF).
    let seg = Packet::tcp().src(BRIEF.cust).dst(BRIEF.public).ports(1, 2).syn().payload(b"abc").l4_bytes();
    assert!(checksum::l4_valid(ip4(BRIEF.cust), ip4(BRIEF.dev), TCP, &seg), "BRIEF swap is checksum-neutral");
}

fn ip4(a: &str) -> [u8; 4] {
    a.parse::<Ipv4Addr>().unwrap().octets()
}

/// A 16-byte UDP payload for which the datagram sport -> dport between `src` and `dst` sums to
/// 0xffff, so its computed checksum is 0 and goes on the wire as 0xffff.
fn udp_payload_with_zero_sum(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    for w in 0..=u16::MAX {
        let mut p = payload(14, 3);
        p.extend_from_slice(&w.to_be_bytes());
        let seg = Packet::udp().ports(sport, dport).payload(&p).l4_checksum(0).l4_bytes();
        let s = checksum::fold(checksum::sum(&seg, checksum::pseudo_sum(ip4(src), ip4(dst), UDP, seg.len())));
        if s == 0xffff {
            return p;
        }
    }
    unreachable!()
}

/// A TCP payload for which the SYN segment between `src` and `dst` has checksum 0x0000.
fn tcp_payload_with_zero_checksum(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    for w in 0..=u16::MAX {
        let mut p = payload(14, 5);
        p.extend_from_slice(&w.to_be_bytes());
        let seg = Packet::tcp().src(src).dst(dst).ports(sport, dport).syn().payload(&p).l4_bytes();
        if seg[16..18] == [0, 0] {
            return p;
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------------
// Forward: customer -> device, and replies
// ---------------------------------------------------------------------------------------------

#[test]
fn forward_tcp_rewrites_destination_address_and_port_only() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let (inp, want) = tcp_to_public(n, SYN, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", 0x1234);
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward TCP SYN", ret, &out, &want);
        // Only the destination address and port and the two checksums differ from the input.
        let changed: Vec<String> = (0..inp.len()).filter(|&i| inp[i] != out[i]).map(|i| field_name(&inp, i)).collect();
        for f in &changed {
            assert!(["ip dst", "ip checksum", "l4 dport", "tcp checksum"].contains(&f.as_str()), "changed {f}");
        }
        assert_flows(&s, &[(flow_key(n.dev, TCP_DEV_PORT, n.cust, CPORT, TCP), n.public, TCP_PUB_PORT, TCP_RULE)]);
        assert_eq!(s.rule(TCP_RULE), counters(l3_len(&inp), 1, 0, 0), "RULE_COUNTERS[{TCP_RULE}]");
        assert_eq!(s.rule(UDP_RULE), RuleCounters::default());
        assert_eq!(s.events(), events(&[(SteerEvent::Forwarded, 1, l3_len(&inp))]));
        assert!(s.frags().is_empty(), "no fragment entry for an unfragmented packet: {:?}", s.frags());
    });
}

#[test]
fn forward_tcp_with_ip_options_and_ethernet_padding() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        // IHL 6: the TCP header starts at 24.
        let opts = [1, 1, 1, 0];
        let ack = Packet::tcp().src(n.cust).sport(CPORT).ack().df().eth();
        let (to_public, to_dev) = (ack.clone().dst(n.public).dport(TCP_PUB_PORT), ack.dst(n.dev).dport(TCP_DEV_PORT));
        let inp = to_public.clone().options(opts).id(7).build();
        let want = to_dev.clone().options(opts).id(7).build();
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward TCP with IP options (IHL 6)", ret, &out, &want);
        // A 40-byte packet padded to the 60-byte Ethernet minimum: the padding is not TCP data.
        let inp2 = to_public.id(8).pad_to(60).build();
        let want2 = to_dev.id(8).pad_to(60).build();
        let (ret, out) = h.run_out(PROG_INGRESS, &inp2);
        check_translated("forward TCP in a padded Ethernet frame", ret, &out, &want2);
        assert_flows(&s, &[(flow_key(n.dev, TCP_DEV_PORT, n.cust, CPORT, TCP), n.public, TCP_PUB_PORT, TCP_RULE)]);
        // "L3 length (bytes from IP header to end)": the padded frame counts 46.
        assert_eq!(s.rule(TCP_RULE), counters(l3_len(&inp) + 46, 2, 0, 0));
        assert_eq!(s.events(), events(&[(SteerEvent::Forwarded, 2, l3_len(&inp) + 46)]));
    });
}

#[test]
fn reply_tcp_is_translated_back_on_egress() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let (syn, syn_want) = tcp_to_public(n, SYN, b"", 0x100);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_translated("forward SYN", ret, &out, &syn_want);

        let (synack, synack_want) = tcp_reply(n, SYN | ACK, b"", 0x200);
        let (ret, out) = h.run_out(PROG_EGRESS, &synack);
        check_translated("reply SYN-ACK on egress", ret, &out, &synack_want);

        // The rest of the flow goes through the same entry.
        let (ack, ack_want) = tcp_to_public(n, ACK | PSH, &payload(300, 1), 0x101);
        let (ret, out) = h.run_out(PROG_INGRESS, &ack);
        check_translated("forward data", ret, &out, &ack_want);
        let (data, data_want) = tcp_reply(n, ACK | PSH, &payload(1000, 2), 0x201);
        let (ret, out) = h.run_out(PROG_EGRESS, &data);
        check_translated("reply data", ret, &out, &data_want);

        assert_flows(&s, &[(flow_key(n.dev, TCP_DEV_PORT, n.cust, CPORT, TCP), n.public, TCP_PUB_PORT, TCP_RULE)]);
        let (to, from) = (l3_len(&syn) + l3_len(&ack), l3_len(&synack) + l3_len(&data));
        assert_eq!(s.rule(TCP_RULE), counters(to, 2, from, 2), "RULE_COUNTERS[{TCP_RULE}]");
        assert_eq!(s.events(), events(&[(SteerEvent::Forwarded, 2, to), (SteerEvent::ReplyTranslated, 2, from)]));

        // A reply whose source is the device but whose flow is another one (other customer port)
        // is not translated.
        let other = Packet::tcp().src(n.dev).dst(n.cust).ports(TCP_DEV_PORT, CPORT + 1).ack().id(9).df().eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &other);
        check_unchanged("reply of an unknown flow", ret, TC_ACT_UNSPEC, &out, &other);
        // Egress packets towards the device direction (device addr as destination) are never
        // translated by the reply path.
        let odd = Packet::tcp().src(n.cust).dst(n.dev).ports(CPORT, TCP_DEV_PORT).ack().id(9).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &odd);
        check_unchanged("egress packet to the device", ret, TC_ACT_UNSPEC, &out, &odd);
        assert_eq!(s.events(), events(&[(SteerEvent::Forwarded, 2, to), (SteerEvent::ReplyTranslated, 2, from)]));
    });
}

#[test]
fn udp_with_checksum_both_ways() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let q = payload(40, 9);
        let query = Packet::udp().src(n.cust).sport(CPORT).payload(&q).id(0x11).eth();
        let inp = query.clone().dst(n.public).dport(UDP_PUB_PORT).build();
        let want = query.dst(n.dev).dport(UDP_DEV_PORT).build();
        assert_ne!(&inp[ETH + 26..ETH + 28], &[0, 0], "the query has a checksum");
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward UDP with checksum", ret, &out, &want);

        let r = payload(300, 10);
        let reply = Packet::udp().dst(n.cust).dport(CPORT).payload(&r).id(0x22).eth();
        let rep = reply.clone().src(n.dev).sport(UDP_DEV_PORT).build();
        let rep_want = reply.src(n.public).sport(UDP_PUB_PORT).build();
        let (ret, out) = h.run_out(PROG_EGRESS, &rep);
        check_translated("reply UDP with checksum", ret, &out, &rep_want);

        assert_flows(&s, &[(flow_key(n.dev, UDP_DEV_PORT, n.cust, CPORT, UDP), n.public, UDP_PUB_PORT, UDP_RULE)]);
        assert_eq!(s.rule(UDP_RULE), counters(l3_len(&inp), 1, l3_len(&rep), 1));
        assert_eq!(s.rule(TCP_RULE), RuleCounters::default());
        assert_eq!(
            s.events(),
            events(&[(SteerEvent::Forwarded, 1, l3_len(&inp)), (SteerEvent::ReplyTranslated, 1, l3_len(&rep))])
        );
    });
}

#[test]
fn udp_without_checksum_keeps_zero_both_ways() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let q = payload(33, 4);
        let query = Packet::udp().src(n.cust).sport(CPORT).payload(&q).l4_checksum(0).id(0x31).eth();
        let inp = query.clone().dst(n.public).dport(UDP_PUB_PORT).build();
        let want = query.dst(n.dev).dport(UDP_DEV_PORT).build();
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward UDP without checksum", ret, &out, &want);
        assert_eq!(&out[ETH + 26..ETH + 28], &[0, 0], "UDP checksum 0 stays 0");

        let reply = Packet::udp().dst(n.cust).dport(CPORT).payload(&q).l4_checksum(0).id(0x32).eth();
        let rep = reply.clone().src(n.dev).sport(UDP_DEV_PORT).build();
        let rep_want = reply.src(n.public).sport(UDP_PUB_PORT).build();
        let (ret, out) = h.run_out(PROG_EGRESS, &rep);
        check_translated("reply UDP without checksum", ret, &out, &rep_want);
        assert_eq!(&out[ETH + 26..ETH + 28], &[0, 0], "UDP checksum 0 stays 0");
        assert_eq!(s.rule(UDP_RULE), counters(l3_len(&inp), 1, l3_len(&rep), 1));
    });
}

/// Edge cases of the incremental update: a UDP checksum whose translated value computes to 0
/// must go out as 0xffff (0 would mean "no checksum", RFC 768); a TCP checksum that becomes
/// 0x0000 is sent as 0x0000 (what any stack computes).
#[test]
fn checksums_that_become_zero() {
    for_each_net(|n| {
        let (mut h, _s) = l2_with_rules(n);
        // Customer -> device: the payload is chosen so that the translated datagram sums to 0xffff.
        let p = udp_payload_with_zero_sum(n.cust, n.dev, CPORT, UDP_DEV_PORT);
        let inp = Packet::udp().src(n.cust).dst(n.public).ports(CPORT, UDP_PUB_PORT).payload(&p).id(0x41).eth().build();
        let want = Packet::udp().src(n.cust).dst(n.dev).ports(CPORT, UDP_DEV_PORT).payload(&p).id(0x41).eth().build();
        assert_eq!(&want[ETH + 26..ETH + 28], &[0xff, 0xff]);
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward UDP whose new checksum is 0 (must be sent as 0xffff)", ret, &out, &want);

        // Device -> customer, same idea.
        let p = udp_payload_with_zero_sum(n.public, n.cust, UDP_PUB_PORT, CPORT);
        let rep = Packet::udp().src(n.dev).dst(n.cust).ports(UDP_DEV_PORT, CPORT).payload(&p).id(0x42).eth().build();
        let rep_want =
            Packet::udp().src(n.public).dst(n.cust).ports(UDP_PUB_PORT, CPORT).payload(&p).id(0x42).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &rep);
        check_translated("reply UDP whose new checksum is 0 (must be sent as 0xffff)", ret, &out, &rep_want);

        // TCP: translated checksum 0x0000.
        let p = tcp_payload_with_zero_checksum(n.cust, n.dev, CPORT + 5, TCP_DEV_PORT);
        let inp = Packet::tcp()
            .src(n.cust)
            .dst(n.public)
            .ports(CPORT + 5, TCP_PUB_PORT)
            .syn()
            .payload(&p)
            .id(0x43)
            .eth()
            .build();
        let want = Packet::tcp()
            .src(n.cust)
            .dst(n.dev)
            .ports(CPORT + 5, TCP_DEV_PORT)
            .syn()
            .payload(&p)
            .id(0x43)
            .eth()
            .build();
        assert_eq!(&want[ETH + 36..ETH + 38], &[0, 0]);
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward TCP whose new checksum is 0x0000", ret, &out, &want);
    });
}

#[test]
fn public_address_restricts_the_rule() {
    for_each_net(|n| {
        let mut h = Harness::new(Layer::L2, 1024, SUBNETS);
        let s = SteerTables::new(h.pins.path());
        s.add_forward(TCP, TCP_PUB_PORT, Some(n.public), n.dev, TCP_DEV_PORT, TCP_RULE);
        let other = Packet::tcp().src(n.cust).dst(n.other_public).ports(CPORT, TCP_PUB_PORT).syn().id(1).eth().build();
        let (ret, out) = h.run_out(PROG_INGRESS, &other);
        check_unchanged("TCP to another address than the rule's public_addr", ret, TC_ACT_UNSPEC, &out, &other);
        assert!(s.flows().is_empty(), "no flow: {:?}", s.flows());
        assert_eq!(s.events(), events(&[]));

        let (inp, want) = tcp_to_public(n, SYN, b"", 2);
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("TCP to the rule's public_addr", ret, &out, &want);
        assert_flows(&s, &[(flow_key(n.dev, TCP_DEV_PORT, n.cust, CPORT, TCP), n.public, TCP_PUB_PORT, TCP_RULE)]);
        assert_eq!(s.events(), events(&[(SteerEvent::Forwarded, 1, l3_len(&inp))]));
    });
}

#[test]
fn packets_without_a_rule_or_flow_pass_untouched() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let ing: Vec<(&str, Vec<u8>)> = vec![
            (
                "TCP to another port",
                Packet::tcp().src(n.cust).dst(n.public).ports(CPORT, TCP_PUB_PORT + 1).syn().id(1).eth().build(),
            ),
            (
                "UDP to the TCP rule's port",
                Packet::udp().src(n.cust).dst(n.public).ports(CPORT, TCP_PUB_PORT).payload(b"x").id(2).eth().build(),
            ),
            (
                "TCP to the UDP rule's port",
                Packet::tcp().src(n.cust).dst(n.public).ports(CPORT, UDP_PUB_PORT).syn().id(3).eth().build(),
            ),
            (
                "TCP from the rule's port (source port is not the key)",
                Packet::tcp().src(n.cust).dst(n.public).ports(TCP_PUB_PORT, 9999).syn().id(4).eth().build(),
            ),
            ("ICMP echo", Packet::icmp().src(n.cust).dst(n.public).payload([0; 32]).id(5).eth().build()),
            (
                "ICMP error about nothing forwarded",
                Packet::icmp_error(3, 3)
                    .quote(Packet::udp().src(n.public).dst(n.cust).ports(1234, CPORT).payload(b"q").id(6).build())
                    .src(n.cust)
                    .dst(n.public)
                    .id(6)
                    .eth()
                    .build(),
            ),
            (
                "IPv6 TCP to the port",
                Packet::bare_tcp().src("fd00:9::2").dst("fd00:9::1").ports(CPORT, TCP_PUB_PORT).eth().build(),
            ),
            ("ARP", Packet::arp().eth().build()),
        ];
        for (what, p) in &ing {
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            check_unchanged(what, ret, TC_ACT_UNSPEC, &out, p);
        }
        let egr: Vec<(&str, Vec<u8>)> = vec![
            ("reply without a flow", tcp_reply(n, SYN | ACK, b"", 7).0),
            (
                "UDP reply without a flow",
                Packet::udp().src(n.dev).dst(n.cust).ports(UDP_DEV_PORT, CPORT).payload(b"r").id(8).eth().build(),
            ),
            (
                "ordinary egress traffic",
                Packet::tcp()
                    .src(n.public)
                    .dst(n.cust)
                    .ports(TCP_PUB_PORT, CPORT)
                    .ack()
                    .payload(b"z")
                    .id(9)
                    .eth()
                    .build(),
            ),
            (
                "ICMP error from the device about no flow",
                Packet::icmp_error(3, 3)
                    .quote(Packet::udp().src(n.cust).dst(n.dev).ports(CPORT, UDP_DEV_PORT).payload(b"q").id(6).build())
                    .src(n.dev)
                    .dst(n.cust)
                    .id(10)
                    .eth()
                    .build(),
            ),
        ];
        for (what, p) in &egr {
            let (ret, out) = h.run_out(PROG_EGRESS, p);
            check_unchanged(what, ret, TC_ACT_UNSPEC, &out, p);
        }
        assert!(s.flows().is_empty(), "no flows: {:?}", s.flows());
        assert_eq!(s.events(), events(&[]), "steering counts nothing for packets it has nothing to do with");
        assert_eq!(s.rule(TCP_RULE), RuleCounters::default());
    });
}

// ---------------------------------------------------------------------------------------------
// Fragments
// ---------------------------------------------------------------------------------------------

#[test]
fn fragments_to_the_device() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let data = payload(1200, 77);
        let id = 0x4242;
        let query = Packet::udp().src(n.cust).sport(CPORT).payload(&data).id(id).eth();
        let (to_public, to_dev) =
            (query.clone().dst(n.public).dport(UDP_PUB_PORT), query.dst(n.dev).dport(UDP_DEV_PORT));
        let dgram_t = to_dev.l4_bytes();
        // Three fragments: first (MF, offset 0), middle (MF, offset 50), last (offset 100).
        let frags: Vec<Vec<u8>> = to_public.fragments(&[400, 400]).iter().map(Packet::build).collect();
        let frags_t: Vec<Vec<u8>> = to_dev.fragments(&[400, 400]).iter().map(Packet::build).collect();
        let mut outs = Vec::new();
        let mut l3 = Vec::new();
        for (i, (inp, want)) in frags.iter().zip(&frags_t).enumerate() {
            let (ret, out) = h.run_out(PROG_INGRESS, inp);
            check_translated(&format!("fragment {i} to the device"), ret, &out, want);
            if i > 0 {
                assert_eq!(&out[ETH + 20..], &inp[ETH + 20..], "a later fragment's payload is unchanged");
            }
            l3.push(l3_len(inp));
            outs.push(out);
            if i == 0 {
                assert_eq!(
                    s.frags(),
                    vec![(
                        frag_key(n.cust, n.public, id, UDP, FRAG_TO_DEVICE),
                        FragNat { addr: addr(n.dev), rule_id: UDP_RULE }
                    )],
                    "FWD_FRAGS after the first fragment"
                );
            }
        }
        // The UDP checksum (in the first fragment) is valid over the whole reassembled datagram.
        let parts: Vec<&[u8]> = outs.iter().map(|o| &o[ETH..]).collect();
        let (src, dst, proto, whole) = reassemble(&parts);
        assert_eq!((src, dst, proto), (ip4(n.cust), ip4(n.dev), UDP));
        assert!(
            checksum::l4_valid(src, dst, UDP, &whole),
            "UDP checksum over the reassembled datagram: have {:#06x}, want {:#06x}",
            u16::from_be_bytes([whole[6], whole[7]]),
            checksum::l4_checksum(src, dst, UDP, &whole)
        );
        assert_eq!(whole, dgram_t);
        assert_flows(&s, &[(flow_key(n.dev, UDP_DEV_PORT, n.cust, CPORT, UDP), n.public, UDP_PUB_PORT, UDP_RULE)]);
        assert_eq!(
            s.events(),
            events(&[(SteerEvent::Forwarded, 1, l3[0]), (SteerEvent::FragmentTranslated, 2, l3[1] + l3[2])])
        );
        // Inferred (FragNat carries rule_id; RuleCounters count L3 bytes customer -> device): the
        // later fragments are the rule's traffic too.
        assert_eq!(
            s.rule(UDP_RULE),
            counters(l3.iter().sum(), 3, 0, 0),
            "RULE_COUNTERS[{UDP_RULE}] should count every fragment (first only = {})",
            l3[0]
        );
    });
}

#[test]
fn fragments_from_the_device() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        // The query creates the flow.
        let q = Packet::udp().src(n.cust).dst(n.public).ports(CPORT, UDP_PUB_PORT).payload(b"q").id(0x50).eth().build();
        let (ret, _) = h.run_out(PROG_INGRESS, &q);
        assert_eq!(ret, TC_ACT_UNSPEC);
        let data = payload(2000, 13);
        let id = 0x7777;
        let reply = Packet::udp().dst(n.cust).dport(CPORT).payload(&data).id(id).eth();
        let (from_dev, from_public) =
            (reply.clone().src(n.dev).sport(UDP_DEV_PORT), reply.src(n.public).sport(UDP_PUB_PORT));
        let frags: Vec<Vec<u8>> = from_dev.fragments(&[1000, 504]).iter().map(Packet::build).collect();
        let frags_t: Vec<Vec<u8>> = from_public.fragments(&[1000, 504]).iter().map(Packet::build).collect();
        let mut outs = Vec::new();
        let mut l3 = Vec::new();
        for (i, (inp, want)) in frags.iter().zip(&frags_t).enumerate() {
            let (ret, out) = h.run_out(PROG_EGRESS, inp);
            check_translated(&format!("fragment {i} from the device"), ret, &out, want);
            l3.push(l3_len(inp));
            outs.push(out);
            if i == 0 {
                assert_eq!(
                    s.frags(),
                    vec![(
                        frag_key(n.dev, n.cust, id, UDP, FRAG_FROM_DEVICE),
                        FragNat { addr: addr(n.public), rule_id: UDP_RULE }
                    )],
                    "FWD_FRAGS after the first reply fragment"
                );
            }
        }
        let parts: Vec<&[u8]> = outs.iter().map(|o| &o[ETH..]).collect();
        let (src, dst, _, whole) = reassemble(&parts);
        assert_eq!((src, dst), (ip4(n.public), ip4(n.cust)));
        assert!(
            checksum::l4_valid(src, dst, UDP, &whole),
            "UDP checksum over the reassembled reply: have {:#06x}, want {:#06x}",
            u16::from_be_bytes([whole[6], whole[7]]),
            checksum::l4_checksum(src, dst, UDP, &whole)
        );
        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::Forwarded, 1, l3_len(&q)),
                (SteerEvent::ReplyTranslated, 1, l3[0]),
                (SteerEvent::FragmentTranslated, 2, l3[1] + l3[2])
            ])
        );
        assert_eq!(
            s.rule(UDP_RULE),
            counters(l3_len(&q), 1, l3.iter().sum(), 3),
            "RULE_COUNTERS[{UDP_RULE}] (inferred: every reply fragment counts from_target)"
        );
    });
}

#[test]
fn later_fragments_of_unknown_datagrams_pass_untouched() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        // A translated first fragment with id 0x4242 ...
        let query = Packet::udp().src(n.cust).dst(n.public).ports(CPORT, UDP_PUB_PORT).payload(payload(600, 1));
        let dgram = query.l4_bytes();
        let first = query.id(0x4242).fragments(&[304]).remove(0);
        let (ret, _) = h.run_out(PROG_INGRESS, &first.clone().eth().build());
        assert_eq!(ret, TC_ACT_UNSPEC);
        // ... does not make a later fragment with another id, another source or another protocol
        // known.
        let mut cases = Vec::new();
        let later = |src: &str, id: u16, proto: u8| {
            Packet::l4(proto, &dgram[304..]).src(src).dst(n.public).id(id).frag(304, false).eth().build()
        };
        cases.push(("later fragment with an unknown id", later(n.cust, 0x4243, UDP)));
        cases.push(("later fragment from another source", later("10.9.0.3", 0x4242, UDP)));
        cases.push(("later fragment of another protocol", later(n.cust, 0x4242, TCP)));
        let mut unknown = 0;
        for (what, p) in &cases {
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            check_unchanged(what, ret, TC_ACT_UNSPEC, &out, p);
            unknown += l3_len(p);
        }
        // Egress: a later reply fragment whose first fragment was never seen.
        let rep = Packet::l4(UDP, payload(200, 3)).src(n.dev).dst(n.cust).id(0x9999).frag(800, false).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &rep);
        check_unchanged("later reply fragment with an unknown id", ret, TC_ACT_UNSPEC, &out, &rep);
        unknown += l3_len(&rep);
        assert_eq!(
            s.events(),
            events(&[(SteerEvent::Forwarded, 1, first.build().len()), (SteerEvent::FragmentUnknown, 4, unknown)])
        );
    });
}

// ---------------------------------------------------------------------------------------------
// ICMP errors
// ---------------------------------------------------------------------------------------------

#[test]
fn icmp_port_unreachable_from_the_device() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let q = payload(24, 8);
        let dgram = Packet::udp().src(n.cust).sport(CPORT).payload(&q).id(0x1111);
        let to_public = dgram.clone().dst(n.public).dport(UDP_PUB_PORT);
        let query = to_public.clone().eth().build();
        let (ret, fwd) = h.run_out(PROG_INGRESS, &query);
        assert_eq!(ret, TC_ACT_UNSPEC);
        // The device quotes the datagram it received (translated).
        let received = &fwd[ETH..];
        let icmp = Packet::icmp_error(3, 3).quote(received).src(n.dev).dst(n.cust).id(0x2222).eth().build();
        // The customer must see an error from the public address about its own datagram:
        // inner dst = public addr:port; the inner UDP checksum is left as it was.
        let inner_want = to_public.l4_checksum(dgram.dst(n.dev).dport(UDP_DEV_PORT).l4_checksum_value()).build();
        let want = Packet::icmp_error(3, 3).quote(&inner_want).src(n.public).dst(n.cust).id(0x2222).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &icmp);
        check_translated("ICMP port unreachable from the device", ret, &out, &want);
        assert_eq!(
            s.events(),
            events(&[(SteerEvent::Forwarded, 1, l3_len(&query)), (SteerEvent::IcmpTranslated, 1, l3_len(&icmp))])
        );
    });
}

#[test]
fn icmp_frag_needed_from_the_customer() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let (syn, _) = tcp_to_public(n, SYN, b"", 0x100);
        assert_eq!(h.run_out(PROG_INGRESS, &syn).0, TC_ACT_UNSPEC);
        // The reply as the customer saw it (1440 bytes of data, DF), quoted as Linux does: as much
        // as fits; here IP header + TCP header + 64 bytes.
        let data = payload(1400, 99);
        let reply_seg = Packet::tcp().dst(n.cust).dport(CPORT).ack().payload(&data).id(0x3333).df();
        let seen = reply_seg.clone().src(n.public).sport(TCP_PUB_PORT);
        let reply = seen.build();
        let quote = &reply[..104];
        let icmp = Packet::icmp_error(3, 4).rest(1280).quote(quote).src(n.cust).dst(n.public).id(0x4444).eth().build();
        let inner_want =
            reply_seg.src(n.dev).sport(TCP_DEV_PORT).l4_checksum(seen.l4_checksum_value()).truncate(104).build();
        let want =
            Packet::icmp_error(3, 4).rest(1280).quote(&inner_want).src(n.cust).dst(n.dev).id(0x4444).eth().build();
        let (ret, out) = h.run_out(PROG_INGRESS, &icmp);
        check_translated("ICMP fragmentation needed from the customer", ret, &out, &want);
        assert_eq!(
            s.events(),
            events(&[(SteerEvent::Forwarded, 1, l3_len(&syn)), (SteerEvent::IcmpTranslated, 1, l3_len(&icmp))])
        );
    });
}

/// Robustness beyond the fixed cases: a router on the path (outer source != customer) sends
/// the error, and it quotes only the IP header and 8 bytes (the RFC 792 minimum); time
/// exceeded (type 11) from the device side.
#[test]
fn icmp_errors_from_a_router_with_minimal_quotes() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let (syn, _) = tcp_to_public(n, SYN, b"", 0x100);
        assert_eq!(h.run_out(PROG_INGRESS, &syn).0, TC_ACT_UNSPEC);
        let router = "10.9.0.254";
        let reply_seg = Packet::tcp().dst(n.cust).dport(CPORT).ack().payload(payload(1400, 1)).id(0x3333).df();
        let seen = reply_seg.clone().src(n.public).sport(TCP_PUB_PORT);
        let reply = seen.build();
        let icmp =
            Packet::icmp_error(3, 4).rest(1280).quote(&reply[..28]).src(router).dst(n.public).id(5).eth().build();
        let inner_want =
            reply_seg.src(n.dev).sport(TCP_DEV_PORT).l4_checksum(seen.l4_checksum_value()).truncate(28).build();
        let want = Packet::icmp_error(3, 4).rest(1280).quote(&inner_want).src(router).dst(n.dev).id(5).eth().build();
        let (ret, out) = h.run_out(PROG_INGRESS, &icmp);
        check_translated("ICMP frag needed from a router, 8-byte quote", ret, &out, &want);

        // Device side: time exceeded sent by the device itself (outer src = device) about the
        // forwarded packet: the outer source becomes public.
        let seg = Packet::tcp().src(n.cust).sport(CPORT).syn().id(0x100).df();
        let at_dev = seg.clone().dst(n.dev).dport(TCP_DEV_PORT);
        let received = at_dev.build();
        let icmp2 = Packet::icmp_error(11, 0).quote(&received[..28]).src(n.dev).dst(n.cust).id(6).eth().build();
        let inner2 = seg.dst(n.public).dport(TCP_PUB_PORT).l4_checksum(at_dev.l4_checksum_value()).truncate(28).build();
        let want2 = Packet::icmp_error(11, 0).quote(&inner2).src(n.public).dst(n.cust).id(6).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &icmp2);
        check_translated("ICMP time exceeded from the device, 8-byte quote", ret, &out, &want2);
        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::Forwarded, 1, l3_len(&syn)),
                (SteerEvent::IcmpTranslated, 2, l3_len(&icmp) + l3_len(&icmp2))
            ])
        );
    });
}

/// IP options on the outer and on the quoted header (IHL 6 both), and an error from a router on
/// the device's side (outer source neither device nor public: kept).
#[test]
fn icmp_errors_with_ip_options_and_a_router_on_the_device_side() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let opt = [1, 1, 1, 0];
        let q = payload(20, 4);
        let dgram = Packet::udp().src(n.cust).sport(CPORT).payload(&q).options(opt).id(0x61);
        let to_public = dgram.clone().dst(n.public).dport(UDP_PUB_PORT);
        let at_dev = dgram.dst(n.dev).dport(UDP_DEV_PORT);
        let query = to_public.clone().eth().build();
        assert_eq!(h.run_out(PROG_INGRESS, &query).0, TC_ACT_UNSPEC);
        let received = at_dev.build();
        let inner_want = to_public.l4_checksum(at_dev.l4_checksum_value()).build();
        // From the device, outer IHL 6.
        let icmp = Packet::icmp_error(3, 3).quote(&received).src(n.dev).dst(n.cust).options(opt).id(0x62).eth().build();
        let want =
            Packet::icmp_error(3, 3).quote(&inner_want).src(n.public).dst(n.cust).options(opt).id(0x62).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &icmp);
        check_translated("ICMP port unreachable, outer and inner IHL 6", ret, &out, &want);
        // From a router on the VPN side: only the quote changes.
        let router = "10.8.0.1";
        let icmp2 = Packet::icmp_error(11, 0).quote(&received).src(router).dst(n.cust).id(0x63).eth().build();
        let want2 = Packet::icmp_error(11, 0).quote(&inner_want).src(router).dst(n.cust).id(0x63).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &icmp2);
        check_translated("ICMP time exceeded from a VPN-side router", ret, &out, &want2);
        // Customer side: frag needed about a reply, outer and inner IHL 6.
        let (syn, _) = tcp_to_public(n, SYN, b"", 0x100);
        assert_eq!(h.run_out(PROG_INGRESS, &syn).0, TC_ACT_UNSPEC);
        let reply_seg =
            Packet::tcp().dst(n.cust).dport(CPORT).ack().payload(payload(100, 5)).options(opt).id(0x64).df();
        let seen = reply_seg.clone().src(n.public).sport(TCP_PUB_PORT);
        let reply = seen.build();
        let icmp3 = Packet::icmp_error(3, 4)
            .rest(1280)
            .quote(&reply)
            .src(n.cust)
            .dst(n.public)
            .options(opt)
            .id(0x65)
            .eth()
            .build();
        let inner3 = reply_seg.src(n.dev).sport(TCP_DEV_PORT).l4_checksum(seen.l4_checksum_value()).build();
        let want3 = Packet::icmp_error(3, 4)
            .rest(1280)
            .quote(&inner3)
            .src(n.cust)
            .dst(n.dev)
            .options(opt)
            .id(0x65)
            .eth()
            .build();
        let (ret, out) = h.run_out(PROG_INGRESS, &icmp3);
        check_translated("ICMP frag needed, outer and inner IHL 6", ret, &out, &want3);
        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::Forwarded, 2, l3_len(&query) + l3_len(&syn)),
                (SteerEvent::IcmpTranslated, 3, l3_len(&icmp) + l3_len(&icmp2) + l3_len(&icmp3))
            ])
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Truncated and malformed packets to forwarded ports
// ---------------------------------------------------------------------------------------------

#[test]
fn truncated_and_malformed_packets_to_a_forwarded_port_pass_untouched() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let full_tcp = Packet::tcp().src(n.cust).dst(n.public).ports(CPORT, TCP_PUB_PORT).syn().id(1);
        let full_udp = Packet::udp().src(n.cust).dst(n.public).ports(CPORT, UDP_PUB_PORT).payload(b"abcd").id(2);
        let mut cases: Vec<(&str, Packet)> = Vec::new();
        cases.push(("IHL 4", full_tcp.clone().ihl(4)));
        // The IHL 5 header's checksum from here on: damage on the way.
        cases.push(("IHL 0", full_tcp.clone().poke(0, 0x40)));
        // IHL 15: the header claims 60 bytes, the packet has 40.
        cases.push(("IHL 15 beyond the packet", full_tcp.clone().poke(0, 0x4f)));
        // IHL 9: options claimed, so the TCP header would start at 36 and be cut off.
        cases.push(("IHL 9, TCP header cut off by the options", full_tcp.clone().poke(0, 0x49)));
        // TCP header cut after 10 bytes: ports present, checksum field missing.
        cases.push(("TCP header cut off", full_tcp.clone().id(3).truncate_l4(10)));
        cases.push(("UDP header cut off", full_udp.clone().id(5).truncate_l4(6)));
        cases.push(("IP total length < 20", full_udp.clone().ip_len_field(19)));
        cases.push(("IP version 6 behind an IPv4 EtherType", full_udp.clone().poke(0, 0x65)));
        // ICMP error from the customer with the quote cut inside the inner IP header.
        let reply = Packet::tcp().src(n.public).dst(n.cust).ports(TCP_PUB_PORT, CPORT).ack().id(6).build();
        let error = Packet::icmp_error(3, 4).rest(1280).src(n.cust).dst(n.public);
        cases.push(("ICMP error, quote cut in the inner IP header", error.clone().quote(&reply[..12]).id(7)));
        cases.push(("ICMP error, quote without ports", error.quote(&reply[..22]).id(8)));
        // Give those ICMP errors a flow to be about.
        let (syn, _) = tcp_to_public(n, SYN, b"", 0x100);
        assert_eq!(h.run_out(PROG_INGRESS, &syn).0, TC_ACT_UNSPEC);

        // Every case runs; the failures are reported together.
        let mut failures = Vec::new();
        for (what, l3) in &cases {
            let p = l3.clone().eth().build();
            match h.try_run_out(PROG_INGRESS, &p) {
                Ok((ret, out)) => failures.extend(unchanged_problem(what, ret, TC_ACT_UNSPEC, &out, &p)),
                Err(e) => failures.push(format!("{what}: BPF_PROG_TEST_RUN refused the frame: {e:?}")),
            }
        }
        // An IPv4 header cut short: BPF_PROG_TEST_RUN itself may refuse to build such an skb.
        let short = full_tcp.truncate(16).eth().build();
        match h.try_run_out(PROG_INGRESS, &short) {
            Ok((ret, out)) => check_unchanged("IPv4 header cut short", ret, TC_ACT_UNSPEC, &out, &short),
            Err(e) => eprintln!("note: BPF_PROG_TEST_RUN refuses a 16-byte IPv4 header on L2 ({e}); not testable here"),
        }
        assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
        let st = s.events();
        assert_eq!(st, events(&[(SteerEvent::Forwarded, 1, l3_len(&syn))]), "only the SYN was steered");
        assert_eq!(s.rule(TCP_RULE), counters(l3_len(&syn), 1, 0, 0));
    });
}

// ---------------------------------------------------------------------------------------------
// Redirect (L3 instance, tun ingress)
// ---------------------------------------------------------------------------------------------

const PROXY_PORT: u16 = 12345;
const REDIRECT_RULE: u32 = 3;
const REDIRECT_RULE_V6: u32 = 4;

fn redirect_harness() -> (Harness, SteerTables) {
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
        let (ret, out) = h.run_out(PROG_INGRESS, &frag[0]);
        check_unchanged("first fragment from a redirected client", ret, TC_ACT_UNSPEC, &out, &frag[0]);
        let (ret, out) = h.run_out(PROG_INGRESS, &frag[1]);
        check_unchanged("later fragment from a redirected client", ret, TC_ACT_UNSPEC, &out, &frag[1]);
        let not_redir = frag[0].len() + frag[1].len();

        let other = Packet::tcp().src("10.7.0.5").dst("1.1.1.1").ports(1, 443).syn().id(5).build();
        let echo = Packet::icmp().src(CLIENT).dst("1.1.1.1").payload([0; 8]).id(6).build();
        for (what, p) in [("source not in REDIRECT_SOURCES", &other), ("ICMP from a redirected client", &echo)] {
            let (ret, out) = h.run_out(PROG_INGRESS, p);
            check_unchanged(what, ret, TC_ACT_UNSPEC, &out, p);
        }
        // Egress (to the client) is never redirected.
        let down = Packet::tcp().src("1.1.1.1").dst(CLIENT).ports(443, CPORT).ack().id(7).build();
        let (ret, out) = h.run_out(PROG_EGRESS, &down);
        check_unchanged("egress to a redirected client", ret, TC_ACT_UNSPEC, &out, &down);

        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::ProxyMissing, 3, missing),
                (SteerEvent::Bypassed, 2, bypassed),
                (SteerEvent::NotRedirectable, 2, not_redir)
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
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt::{IpTransparent, ReuseAddr},
    };
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        let tcp_l = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
        setsockopt(&tcp_l, IpTransparent, &true).unwrap();
        setsockopt(&tcp_l, ReuseAddr, &true).unwrap();
        bind(std::os::fd::AsRawFd::as_raw_fd(&tcp_l), &SockaddrIn::new(0, 0, 0, 0, PROXY_PORT)).unwrap();
        listen(&tcp_l, nix::sys::socket::Backlog::new(16).unwrap()).unwrap();
        let udp_s = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).unwrap();
        setsockopt(&udp_s, IpTransparent, &true).unwrap();
        bind(std::os::fd::AsRawFd::as_raw_fd(&udp_s), &SockaddrIn::new(0, 0, 0, 0, PROXY_PORT)).unwrap();

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
            assert!(!delta.contains(&"proxy_missing"), "{what}: the listener on 0.0.0.0:{PROXY_PORT} was not found");
            report.push((what, ret, skb.mark, delta));
        }
        let mut redirected = 0;
        for (what, ret, mark, delta) in report {
            if delta == ["assign_failed"] {
                eprintln!(
                    "note: {what}: bpf_sk_assign fails under BPF_PROG_TEST_RUN (no TC-ingress skb); the lookup found the proxy socket"
                );
                assert_eq!(ret, TC_ACT_SHOT, "{what}: assign failure drops");
            } else {
                assert_eq!(delta, ["redirected"], "{what}: events");
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

/// Contract (`SteerEvent::NotRedirectable`): "From a redirected client, not redirectable
/// (fragment, IPv6 extension header): passed." A TCP segment behind a hop-by-hop or
/// destination-options header is passed and must be counted as such.
#[test]
fn redirect_ipv6_extension_headers_are_counted_not_redirectable() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        let (mut h, s) = redirect_harness();
        let seg = Packet::bare_tcp().src("fd00:8::2").dst("2001:db8::1").ports(CPORT, 443);
        let mut total = 0;
        for (ext, name) in [(Ext::hop_by_hop(), "hop-by-hop"), (Ext::dest_opts(), "destination options")] {
            // 8-byte extension header: next header TCP, length 0, PadN over the rest.
            let p = seg.clone().ext(ext).build();
            let (ret, out) = h.run_out(PROG_INGRESS, &p);
            check_unchanged(&format!("IPv6 TCP behind a {name} header"), ret, TC_ACT_UNSPEC, &out, &p);
            total += p.len();
        }
        assert_eq!(s.events(), events(&[(SteerEvent::NotRedirectable, 2, total)]), "STEER_STATS");
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
            delta == ["assign_failed"] || (delta == ["redirected"] && ret == TC_ACT_UNSPEC),
            "established connection not found by the real tuple: events {delta:?}, ret {ret:#x}"
        );
        let syn = Packet::tcp().src(lo).dst(lo).ports(1, lport).syn().id(2).df().build();
        let (ret, delta) = run("SYN to a port with a foreign listener, no proxy", &syn);
        assert_eq!(
            (ret, delta),
            (TC_ACT_SHOT, vec!["proxy_missing"]),
            "the listener at the original port is not the proxy"
        );
    });
}
