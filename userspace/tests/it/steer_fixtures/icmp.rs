//! ICMP errors about forwarded flows, both ways: outer and quoted headers translated, minimal
//! quotes, routers on either side, IP options.

use super::*;

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
