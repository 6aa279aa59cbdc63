//! The independent checksum routine against published examples, and translations whose new
//! checksum is zero (UDP: sent as 0xffff; TCP: 0x0000).

use super::*;

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
