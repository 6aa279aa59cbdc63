//! The skip hints (`FWD_RULELESS_PORTS`, `REDIRECT_EMPTY`): rules added and deleted through
//! `SteerMaps` (what the CLI, the API and the daemon use) keep them true, and the programs obey
//! them: a hint that says "no rule" where there is one would pass the packet untouched.

use tunmeter::{
    steer::{Origin, SteerMaps},
    types::{ForwardSpec, Proto, RedirectSpec},
};
use tunmeter_common::REDIRECT_NONE;

use super::{redirect::CLIENT, *};

#[test]
fn forward_hints_follow_the_rules_and_the_program_obeys_them() {
    for_each_net(|n| {
        let mut h = Harness::new(Layer::L2, 1024, SUBNETS);
        let s = SteerTables::new(h.pins.path());
        assert_eq!(s.looked_up_ports(), Some(vec![]), "no rule: every public port is skipped");
        let maps = SteerMaps::new(h.pins.path());
        let spec = ForwardSpec {
            proto: Proto::Tcp,
            public_port: TCP_PUB_PORT,
            public_address: None,
            device: format!("{}:{TCP_DEV_PORT}", n.dev).parse().unwrap(),
        };
        let id = maps.add_forward(&spec, Origin::Runtime).unwrap();
        assert_eq!(s.looked_up_ports(), Some(vec![TCP_PUB_PORT]));
        let (syn, want) = tcp_to_public(n, SYN, b"", 1);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_translated("SYN to the rule added through SteerMaps", ret, &out, &want);
        assert_eq!(s.rule(id).to_target_packets, 1);

        // A (wrong) hint that the port has no rule: the program does not look the rule up.
        s.force_skip(TCP_PUB_PORT);
        let (syn, _) = tcp_to_public(n, SYN, b"", 2);
        let (ret, out) = h.run_out(PROG_INGRESS, &syn);
        check_unchanged("SYN to a port hinted ruleless", ret, TC_ACT_UNSPEC, &out, &syn);
        assert_eq!(s.rule(id).to_target_packets, 1, "the skipped packet was not forwarded");

        maps.del_forward(Proto::Tcp, TCP_PUB_PORT).unwrap();
        assert_eq!(s.looked_up_ports(), Some(vec![]), "the port's last rule gone: skipped again");
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

        s.force_skip(0);
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
