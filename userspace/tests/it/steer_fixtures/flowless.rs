//! Forward flows cannot be created or hijacked by segments that do not start a connection:
//! only a TCP SYN without ACK, or a UDP datagram, creates a flow; any other TCP segment without
//! a flow is dropped (`flowless_segment`). On egress, a packet from a rule's device address and
//! port without a flow is dropped (`device_without_flow`) instead of leaking the device's address.

use super::*;

use support::packet::{FIN, RST};

#[test]
fn tcp_segments_without_a_flow_create_none_and_are_dropped() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let mut dropped = 0;
        for (what, flags, data) in [
            ("ACK", ACK, &b""[..]),
            ("ACK with data", ACK | PSH, &b"GET / HTTP/1.1\r\n\r\n"[..]),
            ("RST", RST, &b""[..]),
            ("RST+ACK", RST | ACK, &b""[..]),
            ("FIN+ACK", FIN | ACK, &b""[..]),
            ("SYN+ACK", SYN | ACK, &b""[..]),
            ("no flags", 0, &b"x"[..]),
        ] {
            let (inp, _) = tcp_to_public(n, flags, data, 0x300);
            let (ret, out) = h.run_out(PROG_INGRESS, &inp);
            check_unchanged(&format!("flowless {what}"), ret, TC_ACT_SHOT, &out, &inp);
            dropped += l3_len(&inp);
        }
        assert_flows(&s, &[]);
        assert_eq!(s.events(), events(&[(SteerEvent::FlowlessSegment, 7, dropped)]));
        assert_eq!(s.rule(TCP_RULE), RuleCounters::default());

        // A SYN starts the flow; then the same segments are the flow's and go through.
        let (syn, syn_want) = tcp_to_public(n, SYN, b"", 0x301);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_translated("SYN", ret, &out, &syn_want);
        let (ack, ack_want) = tcp_to_public(n, ACK | PSH, b"data", 0x302);
        let (ret, out) = h.run_out(PROG_INGRESS, &ack);
        check_translated("ACK of the flow", ret, &out, &ack_want);
        let flow = flow_key(n.dev, TCP_DEV_PORT, n.cust, CPORT, TCP);
        assert_flows(&s, &[(flow, n.public, TCP_PUB_PORT, TCP_RULE)]);

        // A forged segment of that 4-tuple to another address of the server does not take the
        // flow over.
        let forged = Packet::tcp()
            .src(n.cust)
            .sport(CPORT)
            .dst(n.other_public)
            .dport(TCP_PUB_PORT)
            .flags(RST | ACK)
            .id(0x303)
            .df()
            .eth()
            .build();
        let (ret, out) = h.run_out(PROG_INGRESS, &forged);
        check_unchanged("forged RST to another public address", ret, TC_ACT_SHOT, &out, &forged);
        assert_flows(&s, &[(flow, n.public, TCP_PUB_PORT, TCP_RULE)]);
        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::FlowlessSegment, 8, dropped + l3_len(&forged)),
                (SteerEvent::Forwarded, 2, l3_len(&syn) + l3_len(&ack)),
            ])
        );
    });
}

#[test]
fn a_udp_datagram_starts_a_flow() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let q = Packet::udp().src(n.cust).sport(CPORT).payload(b"query").id(5).eth();
        let (inp, want) =
            (q.clone().dst(n.public).dport(UDP_PUB_PORT).build(), q.dst(n.dev).dport(UDP_DEV_PORT).build());
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("first UDP datagram", ret, &out, &want);
        assert_flows(&s, &[(flow_key(n.dev, UDP_DEV_PORT, n.cust, CPORT, UDP), n.public, UDP_PUB_PORT, UDP_RULE)]);
    });
}

#[test]
fn device_packets_without_a_flow_are_dropped_on_egress() {
    for_each_net(|n| {
        let (mut h, s) = l2_with_rules(n);
        let tcp = Packet::tcp().src(n.dev).dst(n.cust).ports(TCP_DEV_PORT, CPORT).ack().id(1).df().eth().build();
        let udp = Packet::udp().src(n.dev).dst(n.cust).ports(UDP_DEV_PORT, CPORT).payload(b"a").id(2).eth().build();
        for (what, p) in [("TCP from the device's port", &tcp), ("UDP from the device's port", &udp)] {
            let (ret, out) = h.run_out(PROG_EGRESS, p);
            check_unchanged(&format!("{what}, no flow"), ret, TC_ACT_SHOT, &out, p);
        }
        // Not a rule's device port, or a rule's port under the other protocol: not ours.
        let other_port = Packet::tcp().src(n.dev).dst(n.cust).ports(TCP_DEV_PORT + 1, CPORT).ack().id(3).eth().build();
        let other_proto = Packet::udp().src(n.dev).dst(n.cust).ports(TCP_DEV_PORT, CPORT).id(4).eth().build();
        let host = Packet::tcp().src(n.public).dst(n.cust).ports(22, CPORT).ack().id(5).eth().build();
        for (what, p) in [("another port", &other_port), ("the other protocol", &other_proto), ("the host", &host)] {
            let (ret, out) = h.run_out(PROG_EGRESS, p);
            check_unchanged(&format!("from {what}"), ret, TC_ACT_UNSPEC, &out, p);
        }
        assert_eq!(s.events(), events(&[(SteerEvent::DeviceWithoutFlow, 2, l3_len(&tcp) + l3_len(&udp))]));

        // With a flow (its SYN) the device's reply is translated.
        let (syn, _) = tcp_to_public(n, SYN, b"", 6);
        let (ret, _) = h.run_out(PROG_INGRESS, &syn);
        assert_eq!(ret, TC_ACT_UNSPEC);
        let (synack, want) = tcp_reply(n, SYN | ACK, b"", 7);
        let (ret, out) = h.run_out(PROG_EGRESS, &synack);
        check_translated("reply of the flow", ret, &out, &want);
    });
}
