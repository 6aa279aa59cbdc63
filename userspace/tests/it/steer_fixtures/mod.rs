//! BPF_PROG_TEST_RUN fixtures for steering: the real eBPF object fed crafted packets, each
//! translation compared byte for byte and every checksum verified from scratch.
//!
//! BPF_PROG_TEST_RUN fixtures for steering: the real eBPF object, forward rules on the L2
//! (Ethernet) instance and redirect rules on the L3 (tun) instance, fed crafted packets with
//! valid checksums. Each translation is compared byte for byte with a packet built
//! independently (the same builder, the translated addresses) and every checksum of the
//! program's output is verified from scratch (`support::checksum`), as are the flow, fragment,
//! rule-counter and event maps. This file: the address sets, rules and expectations the tests
//! share; `compare` reports differences; one file per area of tests.
//!
//! Run as root: `cargo test -p tunmeter --test it -- steer_fixtures::`.

mod checksums;
mod compare;
mod evasion;
mod flowless;
mod forward;
mod fragments;
mod hints;
mod icmp;
mod redirect;
mod untouched;

use std::{collections::BTreeMap, net::Ipv4Addr};

use support::{
    Harness, checksum,
    packet::{ACK, Ext, IP_MF, PSH, Packet, SYN, TCP, UDP},
    require_root,
    steer::{SteerTables, addr, flow_key, frag_key, show_addr},
};
use tunmeter::{
    bpf::loader::{PROG_EGRESS, PROG_INGRESS},
    types::Layer,
};
use tunmeter_common::{FRAG_FROM_DEVICE, FRAG_TO_DEVICE, FlowKey, FlowNat, FragNat, RuleCounters, SteerEvent};

use crate::support;
use compare::{check_translated, check_unchanged, field_name, reassemble, unchanged_problem};

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

const CPORT: u16 = 40000;
const TCP_PUB_PORT: u16 = 8080;
const TCP_DEV_PORT: u16 = 3128;
const TCP_RULE: u32 = 7;
const UDP_PUB_PORT: u16 = 5353;
const UDP_DEV_PORT: u16 = 53;
const UDP_RULE: u32 = 9;

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

fn l3_len(frame: &[u8]) -> usize {
    frame.len() - ETH
}

fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
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

fn ip4(a: &str) -> [u8; 4] {
    a.parse::<Ipv4Addr>().unwrap().octets()
}
