//! Forward rules: customer -> public address and port rewritten to the device, replies
//! translated back, TCP and UDP (with and without a checksum), IP options, the public-address
//! restriction.

use super::*;

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
        // IHL 6: the TCP header starts at 24. The SYN (which starts the flow) has the options.
        let opts = [1, 1, 1, 0];
        let seg = Packet::tcp().src(n.cust).sport(CPORT).df().eth();
        let (to_public, to_dev) = (seg.clone().dst(n.public).dport(TCP_PUB_PORT), seg.dst(n.dev).dport(TCP_DEV_PORT));
        let inp = to_public.clone().syn().options(opts).id(7).build();
        let want = to_dev.clone().syn().options(opts).id(7).build();
        let (ret, out) = h.run_out(PROG_INGRESS, &inp);
        check_translated("forward TCP with IP options (IHL 6)", ret, &out, &want);
        // A 40-byte packet padded to the 60-byte Ethernet minimum: the padding is not TCP data.
        let (to_public, to_dev) = (to_public.ack(), to_dev.ack());
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

        // A packet from the device's address and port whose flow is another one (other customer
        // port) is not translated: it is dropped, it would leak the device's address.
        let other = Packet::tcp().src(n.dev).dst(n.cust).ports(TCP_DEV_PORT, CPORT + 1).ack().id(9).df().eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &other);
        check_unchanged("reply of an unknown flow", ret, TC_ACT_SHOT, &out, &other);
        // Egress packets towards the device direction (device addr as destination) are never
        // translated by the reply path.
        let odd = Packet::tcp().src(n.cust).dst(n.dev).ports(CPORT, TCP_DEV_PORT).ack().id(9).eth().build();
        let (ret, out) = h.run_out(PROG_EGRESS, &odd);
        check_unchanged("egress packet to the device", ret, TC_ACT_UNSPEC, &out, &odd);
        assert_eq!(
            s.events(),
            events(&[
                (SteerEvent::Forwarded, 2, to),
                (SteerEvent::ReplyTranslated, 2, from),
                (SteerEvent::DeviceWithoutFlow, 1, l3_len(&other))
            ])
        );
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
fn the_flow_tables_take_their_configured_size_and_pinned_ones_keep_theirs() {
    use tunmeter::bpf::loader::{LoadOptions, effective_forward_flows};
    use tunmeter_common::{MAP_FWD_FLOWS, MAP_FWD_INBOUND};
    let opts = LoadOptions { forward_flows: 2048, ..Default::default() };
    let h = Harness::with_options(Layer::L2, 64, &[], opts);
    for map in [MAP_FWD_FLOWS, MAP_FWD_INBOUND] {
        let info = aya::maps::MapInfo::from_pin(h.pins.path().join(map)).unwrap();
        assert_eq!(info.max_entries(), 2048, "{map}");
    }
    assert_eq!(effective_forward_flows(h.pins.path(), 8192), 2048, "pinned tables keep their size");
    let empty = support::PinDir::new("fx-flows");
    assert_eq!(effective_forward_flows(empty.path(), 8192), 8192, "no pins: the configured size");
}
