//! The builder against hand-written bytes (checksums worked out separately), and every default
//! packet against the independent verifier `support::checksum`.

use super::{ACK, Ext, FIN, IP_DF, IP_MF, Packet, RST, SYN, UDP};
use crate::support::checksum;

#[test]
fn tcp_syn_in_ipv4() {
    let p = Packet::tcp().src("10.9.0.2").dst("10.9.0.1").ports(40000, 8080).syn().df().build();
    #[rustfmt::skip]
    let want = [
        0x45, 0x00, 0x00, 0x28, 0x12, 0x34, 0x40, 0x00, // IHL 5, total 40, id 0x1234, DF
        0x40, 0x06, 0x14, 0x88, 10, 9, 0, 2, 10, 9, 0, 1, // TTL 64, TCP, checksum, addresses
        0x9c, 0x40, 0x1f, 0x90, 0x11, 0x22, 0x33, 0x44, // ports 40000 -> 8080, seq
        0x00, 0x00, 0x00, 0x00, 0x50, 0x02, 0xfa, 0xf0, // ack 0, offset 5, SYN, window
        0xa0, 0xa6, 0x00, 0x00, // checksum, urgent
    ];
    assert_eq!(p, want);
    // ACK brings its default acknowledgment number.
    let a = Packet::tcp().src("10.9.0.2").dst("10.9.0.1").ack().build();
    assert_eq!(&a[28..32], &[0x55, 0x66, 0x77, 0x88]);
}

#[test]
fn udp_in_ipv6_behind_a_hop_by_hop_header() {
    let p = Packet::udp().src("fd00:8::2").dst("2001:db8::1").ports(53, 5353).payload(b"abcd");
    let p = p.ext(Ext::hop_by_hop()).build();
    #[rustfmt::skip]
    let mut want = vec![
        0x60, 0, 0, 0, 0x00, 20, 0, 64, // payload 8 + 12, next header hop-by-hop, hop limit
    ];
    want.extend_from_slice(&"fd00:8::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    want.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    #[rustfmt::skip]
    want.extend_from_slice(&[
        UDP, 0, 1, 4, 0, 0, 0, 0, // hop-by-hop: next UDP, length 0, PadN(4)
        0, 53, 0x14, 0xe9, 0, 12, 0xfb, 0x2c, b'a', b'b', b'c', b'd', // UDP with its checksum
    ]);
    assert_eq!(p, want);
}

#[test]
fn icmp_error_quoting_a_udp_datagram_in_an_ethernet_frame() {
    let quoted = Packet::udp().src("203.0.113.7").dst("198.51.100.20").ports(1234, 40000).payload(b"q").id(6);
    let p = Packet::icmp_error(3, 3).quote(quoted.build()).src("198.51.100.20").dst("203.0.113.7").id(7);
    #[rustfmt::skip]
    let want = [
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00, // Ethernet, IPv4
        0x45, 0, 0, 57, 0, 7, 0, 0, 64, 1, 0x14, 0x6e, 198, 51, 100, 20, 203, 0, 113, 7, // outer IPv4
        3, 3, 0x63, 0x67, 0, 0, 0, 0, // port unreachable, checksum, unused
        0x45, 0, 0, 29, 0, 6, 0, 0, 64, 17, 0x14, 0x7b, 203, 0, 113, 7, 198, 51, 100, 20, // quote
        0x04, 0xd2, 0x9c, 0x40, 0, 9, 0x87, 0x79, b'q',
    ];
    assert_eq!(p.eth().build(), want);
}

#[test]
fn ipv4_fragments_of_a_udp_datagram() {
    let d = Packet::udp().src("10.8.0.2").dst("1.1.1.1").ports(1, 2).payload([0xab; 16]).id(9);
    let f: Vec<Vec<u8>> = d.fragments(&[8]).iter().map(Packet::build).collect();
    #[rustfmt::skip]
    let first = [
        0x45, 0, 0, 28, 0, 9, 0x20, 0x00, 64, 17, 0x4e, 0xbd, 10, 8, 0, 2, 1, 1, 1, 1, // MF, offset 0
        0, 1, 0, 2, 0, 24, 0x96, 0x52, // the UDP header, checksum over the whole datagram
    ];
    let mut last = vec![0x45, 0, 0, 36, 0, 9, 0x00, 0x01, 64, 17, 0x6e, 0xb4, 10, 8, 0, 2, 1, 1, 1, 1]; // offset 8
    last.extend_from_slice(&[0xab; 16]);
    assert_eq!(f, vec![first.to_vec(), last]);
}

#[test]
fn deliberately_broken_fields() {
    let syn = Packet::tcp().src("10.9.0.2").dst("10.9.0.1").ports(40000, 8080).syn().df();
    let good = syn.build();
    // IHL 4 as the sender wrote it: the checksum covers the 16 bytes it claims.
    let ihl4 = syn.clone().ihl(4).build();
    assert_eq!((ihl4[0], &ihl4[10..12]), (0x44, &[0x1f, 0x92][..]));
    assert_eq!(ihl4[12..], good[12..]);
    // Damage after sending: only the poked byte differs.
    let poked = syn.clone().poke(0, 0x4f).build();
    assert_eq!((poked[0], &poked[1..]), (0x4f, &good[1..]));
    assert_eq!(&syn.clone().ip_len_field(19).build()[2..4], &[0, 19]);
    assert_eq!(&Packet::udp().udp_len(3).build()[24..26], &[0, 3]);
    assert_eq!(&syn.clone().ip_checksum(0xbeef).build()[10..12], &[0xbe, 0xef]);
    assert_eq!(&syn.clone().bad_ip_checksum().build()[10..12], &[0x14, 0x89]);
    assert_eq!(&syn.clone().bad_l4_checksum().build()[36..38], &[0xa0, 0xa7]);
    assert_eq!(&syn.clone().l4_checksum(0).build()[36..38], &[0, 0]);
    // A cut segment: the IP header counts what is left, the TCP checksum is the whole one's.
    let cut = syn.clone().truncate_l4(18).build();
    assert_eq!((cut.len(), &cut[2..4], &cut[36..38]), (38, &[0, 38][..], &[0xa0, 0xa6][..]));
    // A cut packet: the header still claims 40 bytes.
    assert_eq!(syn.clone().truncate(16).build(), good[..16]);
    assert_eq!(syn.clone().eth().pad_to(60).build().len(), 60);
    assert_eq!(&syn.clone().ethertype(0x88b5).build()[12..14], &[0x88, 0xb5]);
    let raw = syn.frag_field(IP_MF | IP_DF | 3).ttl(1).tos(0xb8).build();
    assert_eq!((raw[1], &raw[6..8], raw[8]), (0xb8, &[0x60, 0x03][..], 1));
}

#[test]
fn icmpv6_errors_extension_headers_and_ipv6_fragments() {
    let (a, b) = ("fd00:8::1", "fd00:8::2");
    let ptb = Packet::icmpv6_error(2, 0).rest(1280).quote([0, 1, 2, 3, 4, 5, 6, 7]).src(a).dst(b);
    assert_eq!(&ptb.build()[40..48], &[2, 0, 0xf2, 0x90, 0, 0, 5, 0]);
    assert_eq!(Packet::icmpv6().src(a).dst(b).icmp_type(129).icmp_code(0).build()[40], 129);
    // Routing (43) then destination options (60) then a raw header (253) then TCP.
    let p = Packet::tcp().src(a).dst(b).fin().rst().flags(SYN | ACK | FIN | RST).tcp_options([2, 4, 5, 0xb4]);
    let p = p
        .ext(Ext::Routing { typ: 4, segments_left: 0, data: vec![] })
        .ext(Ext::DestOpts(vec![0x1e, 1, 0xff]))
        .ext(Ext::Raw { kind: 253, bytes: vec![0, 0, 0, 0, 0, 0, 0] })
        .build();
    #[rustfmt::skip]
    let chain = [
        60, 0, 4, 0, 0, 0, 0, 0, // routing: next destination options, type 4, zero-padded
        253, 0, 0x1e, 1, 0xff, 1, 1, 0, // destination options: the option, then PadN(1)
        6, 0, 0, 0, 0, 0, 0, 0, // raw 253: next TCP, bytes as given
    ];
    assert_eq!((p[6], &p[40..64]), (43, &chain[..]));
    assert_eq!((p[64 + 12], p[64 + 13]), (0x60, 0x17), "data offset 6, SYN ACK FIN RST");
    // IPv6 fragments get a fragment header after the others.
    let d = Packet::udp().src(a).dst(b).ports(1, 2).payload([7; 16]).id(5).ext(Ext::dest_opts());
    let f: Vec<Vec<u8>> = d.fragments(&[8]).iter().map(Packet::build).collect();
    assert_eq!(&f[0][40..56], &[44, 0, 1, 4, 0, 0, 0, 0, UDP, 0, 0, 1, 0, 0, 0, 5]);
    assert_eq!(&f[1][48..56], &[UDP, 0, 0, 8, 0, 0, 0, 5]);
    assert_eq!(Ext::fragment(8, true, 5), Ext::Fragment { offset: 8, more: true, id: 5 });
}

/// The builder's checksums agree with the independent verifier, for every kind of IPv4 packet.
#[test]
fn default_checksums_verify_independently() {
    let (s, d) = ("198.51.100.20", "203.0.113.7");
    let udp = Packet::udp().src(s).dst(d).ports(7, 9).payload(b"hello");
    let packets = [
        Packet::tcp().src(s).dst(d).ports(1, 2).syn().payload(b"abc").options([1, 1, 1, 0]).build(),
        udp.build(),
        Packet::icmp().src(s).dst(d).payload([0; 56]).build(),
        Packet::icmp_error(3, 4).rest(1280).quote(udp.build()).src(d).dst(s).build(),
        Packet::l4(99, [1, 2, 3]).src(s).dst(d).build(),
    ];
    for p in &packets {
        assert_eq!(checksum::ipv4_problems(p), Vec::<String>::new(), "{p:02x?}");
    }
    assert!(!checksum::ipv4_problems(&udp.clone().bad_l4_checksum().build()).is_empty());
    assert!(!checksum::ipv4_problems(&udp.bad_ip_checksum().build()).is_empty());
    assert_eq!(Packet::arp().eth().build().len(), 42);
    assert_eq!(Packet::junk([0; 16]).eth().build()[12..14], [0x08, 0x00]);
}
