//! IPv4 fragments of forwarded datagrams, both ways: the first translated, later ones by the
//! fragment table, reassembled and checked; unknown later fragments pass.

use super::*;

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
