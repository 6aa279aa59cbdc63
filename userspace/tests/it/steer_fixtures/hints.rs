//! The skip hints (`FWD_RULELESS_PORTS`, `REDIRECT_EMPTY`): rules added and deleted through
//! `SteerMaps` (what the CLI, the API and the daemon use) keep them true, and the programs obey
//! them: a hint that says "no rule" where there is one would pass the packet untouched.

use tunmeter::{
    steer::{Origin, SteerMaps},
    types::{ForwardSpec, Proto, RedirectSpec},
};
use tunmeter_common::{FWD_NONE, REDIRECT_NONE};

use super::{redirect::CLIENT, *};

#[test]
fn forward_hints_follow_the_rules_and_the_program_obeys_them() {
    for_each_net(|n| {
        let mut h = Harness::new(Layer::L2, 1024, SUBNETS);
        let s = SteerTables::new(h.pins.path());
        assert_eq!(s.looked_up_ports(), Some(vec![]), "no rule: every public port is skipped");
        assert_eq!(s.forward_empty(), FWD_NONE, "no rule: forwarding is skipped");
        let maps = SteerMaps::new(h.pins.path());
        let spec = ForwardSpec {
            proto: Proto::Tcp,
            public_port: TCP_PUB_PORT,
            public_address: None,
            device: format!("{}:{TCP_DEV_PORT}", n.dev).parse().unwrap(),
        };
        let id = maps.add_forward(&spec, Origin::Runtime).unwrap();
        assert_eq!(s.looked_up_ports(), Some(vec![TCP_PUB_PORT]));
        assert_eq!(s.forward_empty(), 0, "a rule: forwarding is not skipped");
        let (syn, want) = tcp_to_public(n, SYN, b"", 1);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_translated("SYN to the rule added through SteerMaps", ret, &out, &want);
        assert_eq!(s.rule(id).to_target_packets, 1);

        // A (wrong) hint that there is no forward rule at all: the program does not forward.
        s.force_forward_empty(FWD_NONE);
        let (syn, _) = tcp_to_public(n, SYN, b"", 3);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_unchanged("SYN while no forward rule is hinted", ret, TC_ACT_UNSPEC, &out, &syn);
        assert_eq!(s.rule(id).to_target_packets, 1, "the skipped packet was not forwarded");
        s.force_forward_empty(0);

        // A (wrong) hint that the port has no rule: the program does not look the rule up.
        s.force_port_ruleless(TCP_PUB_PORT);
        let (syn, _) = tcp_to_public(n, SYN, b"", 2);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_unchanged("SYN to a port hinted ruleless", ret, TC_ACT_UNSPEC, &out, &syn);
        assert_eq!(s.rule(id).to_target_packets, 1, "the skipped packet was not forwarded");

        maps.del_forward(Proto::Tcp, TCP_PUB_PORT).unwrap();
        assert_eq!(s.looked_up_ports(), Some(vec![]), "the port's last rule gone: skipped again");
        assert_eq!(s.forward_empty(), FWD_NONE, "the last rule gone: forwarding skipped again");
    });
}

/// A TCP segment customer -> public address, and what the device must receive at `dev_port`.
fn segment(n: &Net, flags: u8, id: u16, dev_port: u16) -> (Vec<u8>, Vec<u8>) {
    let seg = Packet::tcp().src(n.cust).sport(CPORT).flags(flags).payload(b"x").id(id).df().eth();
    (seg.clone().dst(n.public).dport(TCP_PUB_PORT).build(), seg.dst(n.dev).dport(dev_port).build())
}

#[test]
fn cached_inbound_flows_end_with_their_rule() {
    for_each_net(|n| {
        let mut h = Harness::new(Layer::L2, 1024, SUBNETS);
        let s = SteerTables::new(h.pins.path());
        let maps = SteerMaps::new(h.pins.path());
        let rule = |proto, dev_port: u16| ForwardSpec {
            proto,
            public_port: TCP_PUB_PORT,
            public_address: None,
            device: format!("{}:{dev_port}", n.dev).parse().unwrap(),
        };
        // A UDP rule on the same port keeps the port looked up when the TCP rule goes.
        let udp = rule(Proto::Udp, UDP_DEV_PORT);
        let (old_port, new_port) = (TCP_DEV_PORT, TCP_DEV_PORT + 1);
        maps.sync_config(&[rule(Proto::Tcp, old_port), udp], &[]).unwrap();
        let (syn, want) = segment(n, SYN, 1, old_port);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_translated("SYN, first packet of the flow", ret, &out, &want);
        assert_eq!(s.inbound_flows(), 1, "the flow's destination is cached");
        let (ack, want) = segment(n, ACK, 2, old_port);
        let (ret, out) = h.run_out(PROG_INGRESS, &ack);
        check_translated("ACK of the established flow (cached)", ret, &out, &want);

        // The rule changed (another device port): the cached destination is not used; the
        // segment has no flow to the new destination and may not start one.
        maps.sync_config(&[rule(Proto::Tcp, new_port), udp], &[]).unwrap();
        let (ack, _) = segment(n, ACK, 3, old_port);
        let (ret, out) = h.run_out(PROG_INGRESS, &ack);
        check_unchanged("ACK after the rule changed", ret, TC_ACT_SHOT, &out, &ack);
        let (syn, want) = segment(n, SYN, 4, new_port);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_translated("SYN under the changed rule", ret, &out, &want);
        let (ack, want) = segment(n, ACK, 5, new_port);
        let (ret, out) = h.run_out(PROG_INGRESS, &ack);
        check_translated("ACK under the changed rule (cached again)", ret, &out, &want);

        // The TCP rule deleted: the cached flow ends with it.
        maps.sync_config(&[udp], &[]).unwrap();
        assert_eq!(s.looked_up_ports(), Some(vec![TCP_PUB_PORT]), "the UDP rule keeps the port looked up");
        let (ack, _) = segment(n, ACK, 6, new_port);
        let (ret, out) = h.run_out(PROG_INGRESS, &ack);
        check_unchanged("ACK after its rule was deleted", ret, TC_ACT_UNSPEC, &out, &ack);
    });
}

#[test]
fn redirect_hint_follows_the_rules_and_the_program_obeys_it() {
    if !require_root() {
        return;
    }
    tunmeter_lab::in_new_netns(|| {
        let mut h = Harness::new(Layer::L3, 1024, SUBNETS);
        let s = SteerTables::new(h.pins.path());
        assert_eq!(s.redirect_empty(), REDIRECT_NONE, "no rule: the lookup is skipped");
        let maps = SteerMaps::new(h.pins.path());
        maps.add_redirect(&RedirectSpec::new("10.8.0.0/24".parse().unwrap(), 12345), Origin::Runtime).unwrap();
        assert_eq!(s.redirect_empty(), 0);
        // No proxy listens in this namespace: a redirected SYN is dropped (proxy missing).
        let syn = Packet::tcp().src(CLIENT).dst("1.1.1.1").ports(CPORT, 443).syn().id(1).df().build();
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_unchanged("SYN of a client redirected through SteerMaps, no proxy", ret, TC_ACT_SHOT, &out, &syn);

        s.force_redirect_empty();
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_unchanged("SYN while REDIRECT_EMPTY says no rule", ret, TC_ACT_UNSPEC, &out, &syn);

        maps.del_redirect("10.8.0.0/24".parse().unwrap()).unwrap();
        assert_eq!(s.redirect_empty(), REDIRECT_NONE, "the last rule gone: skipped again");
        // A second rule, then one of two deleted: still looked up.
        for net in ["10.8.0.0/25", "fd00:8::/64"] {
            maps.add_redirect(&RedirectSpec::new(net.parse().unwrap(), 12345), Origin::Runtime).unwrap();
        }
        maps.del_redirect("10.8.0.0/25".parse().unwrap()).unwrap();
        assert_eq!(s.redirect_empty(), 0, "one rule left: looked up");
    });
}
