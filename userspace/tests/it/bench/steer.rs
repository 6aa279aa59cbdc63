//! Section 4: steering ns/packet under BPF_PROG_TEST_RUN with 10,000 forward rules and 10,000
//! redirect sources. A rewrite in one repeat is what the next repeat sees, so the timed packets
//! ping-pong between two rules (and their two flow entries) that map onto each other.

use super::*;

// BPF_PROG_TEST_RUN builds one skb and runs the program `repeat` times on it: a rewrite in one
// repeat is what the next repeat sees (measured below: `single_rule_forwarded`). A forward rule's
// rewrite moves the packet off the rule's port, so with one rule only the first repeat would be
// forwarded and the figure would be the no-match cost. The timed forwarded packet therefore
// ping-pongs between two of the 10,000 rules: public port P -> device D:Q, and public port Q ->
// the public address:P. Every repeat is then a full forward of a packet of an established flow
// (its cached destination in FWD_INBOUND and the rule generation check, address + port +
// checksum rewrite, rule counter, event), and an even number of repeats leaves the packet as it came in. The reply path
// ping-pongs the same way through the two flow entries those rules created.

/// Forward rules in FWD_RULES, redirect sources in REDIRECT_SOURCES, extra flows in FWD_FLOWS.
const STEER_RULES: u32 = 10_000;

/// The steering target for "lookup + rewrite", compared with the forwarded packet's cost
/// minus the empty program (counting + steering: the whole cost of a forwarded packet).
const STEER_TARGET_NS: f64 = 120.0;

/// The server's public address, a customer on the Internet (outside the client subnets).
const STEER_PUB: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 1);
const STEER_CUST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 7);
const STEER_CPORT: u16 = 40_000;

/// Forward rules on TCP ports FIRST_RULE_PORT.. (10,000 of them).
const FIRST_RULE_PORT: u16 = 10_000;
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const PROXY_PORT: u16 = 12_345;

/// The device of filler rule `i`: 10.8.0.2 and up.
fn rule_device(i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x0a08_0002u32 + i)
}

/// A TCP segment (with a 64-byte payload unless it is a SYN) in an IPv4 packet (DF) with valid
/// checksums.
fn tcp_packet(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Packet {
    let payload: &[u8] = if flags == SYN { &[] } else { &[0x5a; 64] };
    Packet::tcp().src(src).dst(dst).ports(sport, dport).flags(flags).payload(payload).df()
}

/// (src, dst, sport, dport) of an Ethernet + IPv4 + TCP frame, after checking both checksums.
fn tcp_tuple(frame: &[u8]) -> (std::net::Ipv4Addr, std::net::Ipv4Addr, u16, u16) {
    let ip = &frame[14..];
    assert!(support::checksum::ipv4_header_valid(ip), "IPv4 header checksum");
    let (src, dst): ([u8; 4], [u8; 4]) = (ip[12..16].try_into().unwrap(), ip[16..20].try_into().unwrap());
    assert!(support::checksum::l4_valid(src, dst, TCP, &ip[20..]), "TCP checksum");
    let port = |o: usize| u16::from_be_bytes([ip[20 + o], ip[21 + o]]);
    (src.into(), dst.into(), port(0), port(2))
}

/// What the forward and redirect timings measured (ns per packet, medians).
struct SteerTimes {
    fwd: f64,
    fwd_miss: f64,
    /// No-rule and no-flow packets in the ping-pong's mix of addresses (half to / from the
    /// device, a VPN client: the counting program's client path, half the public address): the
    /// steering share's baseline, so both sides do the same counting work.
    fwd_base: f64,
    reply_base: f64,
    /// A rule hit that stops at the rule's public-address check: lookup, no flow, no rewrite.
    fwd_other_addr: f64,
    reply: f64,
    reply_miss: f64,
    empty_l2: f64,
    redirect: f64,
    redirect_miss: f64,
    empty_l3: f64,
    /// The redirected packet's event (`redirected`, or `assign_failed` if BPF_PROG_TEST_RUN's
    /// skb cannot take a socket) and return code.
    redirect_event: String,
    redirect_ret: u32,
    /// Forwarded events after one BPF_PROG_TEST_RUN of `SEMANTICS_REPEAT` repeats with a single
    /// rule (1 = every repeat sees the packet the previous one rewrote).
    single_rule_forwarded: u64,
}

const SEMANTICS_REPEAT: u32 = 1_000;

/// Medians of SAMPLES rounds, each round running every figure once (interleaved, so slow drift
/// of the machine hits every figure alike).
fn interleaved<const N: usize>(mut round: impl FnMut() -> [f64; N]) -> [f64; N] {
    let mut v: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(SAMPLES));
    for _ in 0..SAMPLES {
        for (i, t) in round().into_iter().enumerate() {
            v[i].push(t);
        }
    }
    v.map(median)
}

fn steer_forward_times(t: &mut SteerTimes) {
    use std::net::Ipv4Addr;
    use support::steer::{SteerTables, flow_key};
    use tunmeter::bpf::loader::PROG_EGRESS;
    use tunmeter_common::SteerEvent;

    let mut h = Harness::new(Layer::L2, 262_144, &["10.8.0.0/16"]);
    let s = SteerTables::new(h.pins.path());
    // The ping-pong pair, in the middle of the rule range, and a rule whose device port has no
    // rule (for the repeat-semantics check).
    // A rule restricted to another public address (lookup only).
    let (p_idx, q_idx, single_idx, other_idx) = (5_000u32, 5_001u32, 2_000u32, 3_000u32);
    let port = |i: u32| FIRST_RULE_PORT + i as u16;
    let (p, q, single) = (port(p_idx), port(q_idx), port(single_idx));
    let dev = rule_device(p_idx);
    s.add_forwards((0..STEER_RULES).map(|i| match i {
        i if i == p_idx => (TCP, p, None, dev, q, i),
        i if i == q_idx => (TCP, q, None, STEER_PUB, p, i),
        i if i == other_idx => (TCP, port(i), Some(Ipv4Addr::new(192, 0, 2, 99)), rule_device(i), 3_000, i),
        // Device ports 3000..3999: below the rule range, so a rewritten packet matches no rule.
        i => (TCP, port(i), None, rule_device(i), 3_000 + (i % 1_000) as u16, i),
    }));
    // Other customers' flows, one per rule, so the flow table is not near-empty.
    s.add_flows((0..STEER_RULES).map(|i| {
        let cust = Ipv4Addr::from(0x6440_0000u32 + i); // 100.64.x.y
        (flow_key(rule_device(i), 3_000 + (i % 1_000) as u16, cust, 50_000, TCP), STEER_PUB, port(i), i)
    }));
    assert_eq!(s.forward_count(), STEER_RULES as usize);

    // Repeat semantics: one rule, SEMANTICS_REPEAT repeats of a packet to its port (a SYN: only
    // a SYN may create a flow).
    let single_pkt = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, single, SYN).eth().build();
    let before = s.event(SteerEvent::Forwarded).0;
    h.time(PROG_INGRESS, &single_pkt, SEMANTICS_REPEAT);
    t.single_rule_forwarded = s.event(SteerEvent::Forwarded).0 - before;

    let fwd = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, p, ACK | PSH).eth().build();
    let fwd_miss = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, 80, ACK | PSH).eth().build();
    let fwd_other = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, port(other_idx), ACK | PSH).eth().build();
    let reply = tcp_packet(dev, STEER_CUST, q, STEER_CPORT, ACK | PSH).eth().build();
    let reply_miss = tcp_packet(STEER_PUB, STEER_CUST, 80, STEER_CPORT, ACK | PSH).eth().build();
    let fwd_miss_dev = tcp_packet(STEER_CUST, dev, STEER_CPORT, 80, ACK | PSH).eth().build();
    let reply_miss_dev = tcp_packet(dev, STEER_CUST, 80, STEER_CPORT, ACK | PSH).eth().build();

    // The ping-pong flow is established: its SYN through rule P, then (as the device's address
    // and port Q) through rule Q, creates both flow entries.
    let syn = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, p, SYN).eth().build();
    let (_, syn_dev) = h.run_out(PROG_INGRESS, &syn);
    let (_, syn_back) = h.run_out(PROG_INGRESS, &syn_dev);
    assert_eq!(syn_back, syn, "the SYN ping-pongs through rules P and Q");
    // Correctness outside the timing: one repeat translates, the second restores the packet.
    let (ret, out) = h.run_out(PROG_INGRESS, &fwd);
    assert_eq!(ret, TC_ACT_UNSPEC);
    assert_eq!(tcp_tuple(&out), (STEER_CUST, dev, STEER_CPORT, q), "rule P forwards to D:Q");
    let (_, back) = h.run_out(PROG_INGRESS, &out);
    assert_eq!(back, fwd, "rule Q forwards back to the public address:P");
    let (ret, out) = h.run_out(PROG_EGRESS, &reply);
    assert_eq!(ret, TC_ACT_UNSPEC);
    assert_eq!(tcp_tuple(&out), (STEER_PUB, STEER_CUST, p, STEER_CPORT), "the reply leaves as public:P");
    let (_, back) = h.run_out(PROG_EGRESS, &out);
    assert_eq!(back, reply, "the ping-pong flow entry translates it back");
    for (what, pkt, prog) in [
        ("no-rule packet", &fwd_miss, PROG_INGRESS),
        ("packet to another address's rule", &fwd_other, PROG_INGRESS),
        ("no-flow packet", &reply_miss, PROG_EGRESS),
        ("no-rule packet to the device", &fwd_miss_dev, PROG_INGRESS),
        ("no-flow packet from the device", &reply_miss_dev, PROG_EGRESS),
    ] {
        let (ret, out) = h.run_out(prog, pkt);
        assert_eq!((ret, &out), (TC_ACT_UNSPEC, pkt), "{what} passes untouched");
    }
    assert!(s.flow(&flow_key(dev, q, STEER_CUST, STEER_CPORT, TCP)).is_some());
    assert!(s.flow(&flow_key(STEER_PUB, p, STEER_CUST, STEER_CPORT, TCP)).is_some());
    let flows = s.flows().len();

    let mut empty = EmptyProgram::load();
    let ev = |e| s.event(e).0;
    let (fwd0, reply0, rp0, rq0) =
        (ev(SteerEvent::Forwarded), ev(SteerEvent::ReplyTranslated), s.rule(p_idx), s.rule(q_idx));
    let (t_fwd_miss_dev, t_reply_miss_dev);
    [t.fwd, t.fwd_miss, t.fwd_other_addr, t.reply, t.reply_miss, t.empty_l2, t_fwd_miss_dev, t_reply_miss_dev] =
        interleaved(|| {
            [
                h.time(PROG_INGRESS, &fwd, REPEAT),
                h.time(PROG_INGRESS, &fwd_miss, REPEAT),
                h.time(PROG_INGRESS, &fwd_other, REPEAT),
                h.time(PROG_EGRESS, &reply, REPEAT),
                h.time(PROG_EGRESS, &reply_miss, REPEAT),
                empty.once(&fwd),
                h.time(PROG_INGRESS, &fwd_miss_dev, REPEAT),
                h.time(PROG_EGRESS, &reply_miss_dev, REPEAT),
            ]
        });
    t.fwd_base = (t.fwd_miss + t_fwd_miss_dev) / 2.0;
    t.reply_base = (t.reply_miss + t_reply_miss_dev) / 2.0;
    // Every timed repeat was steered: each forwarded packet (and no no-rule packet) was
    // forwarded, each reply translated, half of them by each rule of the pair.
    let n = REPEAT as u64 * SAMPLES as u64;
    assert_eq!(ev(SteerEvent::Forwarded) - fwd0, n, "every timed repeat of the forwarded packet was forwarded");
    assert_eq!(ev(SteerEvent::ReplyTranslated) - reply0, n, "every timed repeat of the reply was translated");
    let (rp, rq) = (s.rule(p_idx), s.rule(q_idx));
    assert_eq!(rp.to_target_packets - rp0.to_target_packets, n / 2);
    assert_eq!(rq.to_target_packets - rq0.to_target_packets, n / 2);
    assert_eq!(rp.from_target_packets - rp0.from_target_packets, n / 2);
    assert_eq!(rq.from_target_packets - rq0.from_target_packets, n / 2);
    for e in [SteerEvent::RewriteFailed, SteerEvent::FlowTableError] {
        assert_eq!(ev(e), 0, "{}", e.name());
    }
    assert_eq!(s.flows().len(), flows, "no flow was created while timing");
}

/// Redirect: the L3 (tun) instance, a SYN from a redirected client with a transparent listener
/// on the proxy port, in a fresh network namespace (socket lookups use the caller's).
fn steer_redirect_times(t: &mut SteerTimes) {
    use ipnet::Ipv4Net;
    use std::net::Ipv4Addr;
    use support::steer::SteerTables;
    use tunmeter_common::SteerEvent;

    let r = tunmeter_lab::in_new_netns(move || {
        let mut h = Harness::new(Layer::L3, 262_144, &["10.8.0.0/16"]);
        fill(&h, 2 * STEER_RULES, false); // clients 10.8.0.0 and up
        let s = SteerTables::new(h.pins.path());
        let host = |a: Ipv4Addr| Ipv4Net::new(a, 32).unwrap().into();
        s.add_redirects((0..STEER_RULES).map(|i| (host(Ipv4Addr::from(0x0a08_0000u32 + i)), PROXY_PORT, i)));
        // What the daemon puts there: the host's addresses.
        s.add_bypass([
            host(Ipv4Addr::new(10, 8, 0, 1)),
            host(STEER_PUB),
            Ipv4Net::new(Ipv4Addr::new(127, 0, 0, 0), 8).unwrap().into(),
        ]);
        assert_eq!(s.redirect_count(), STEER_RULES as usize);
        // A transparent proxy's listener on the proxy port.
        let listener =
            tunmeter_lab::sockets::transparent_tcp_listener((Ipv4Addr::UNSPECIFIED, PROXY_PORT).into()).unwrap();

        let client = Ipv4Addr::from(0x0a08_0000u32 + STEER_RULES / 2);
        let other = Ipv4Addr::from(0x0a08_0000u32 + STEER_RULES + STEER_RULES / 2); // a client, no rule
        let dst = Ipv4Addr::new(1, 1, 1, 1);
        let syn = tcp_packet(client, dst, STEER_CPORT, 443, SYN).build();
        let syn_miss = tcp_packet(other, dst, STEER_CPORT, 443, SYN).build();
        let before = s.events();
        let ret = h.run(PROG_INGRESS, &syn);
        let after = s.events();
        let event: Vec<&str> = after.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, _)| *k).collect();
        assert!(
            event == [SteerEvent::Redirected.name()] || event == [SteerEvent::AssignFailed.name()],
            "the redirected SYN found the proxy's socket: events {event:?}"
        );
        let event = event[0].to_string();
        let mut empty = EmptyProgram::load();
        let e0 = s.event(SteerEvent::from_name(&event).unwrap()).0;
        let times = interleaved(|| {
            [h.time(PROG_INGRESS, &syn, REPEAT), h.time(PROG_INGRESS, &syn_miss, REPEAT), empty.once(&syn)]
        });
        let e1 = s.event(SteerEvent::from_name(&event).unwrap()).0;
        assert_eq!(e1 - e0, REPEAT as u64 * SAMPLES as u64, "every timed repeat took the {event} path");
        assert_eq!(s.event(SteerEvent::ProxyMissing).0, 0);
        drop(listener);
        (times, event, ret)
    });
    ([t.redirect, t.redirect_miss, t.empty_l3], t.redirect_event, t.redirect_ret) = r;
}

pub(super) fn steer_ns_per_packet() {
    let mut t = SteerTimes {
        fwd: 0.0,
        fwd_miss: 0.0,
        fwd_base: 0.0,
        reply_base: 0.0,
        fwd_other_addr: 0.0,
        reply: 0.0,
        reply_miss: 0.0,
        empty_l2: 0.0,
        redirect: 0.0,
        redirect_miss: 0.0,
        empty_l3: 0.0,
        redirect_event: String::new(),
        redirect_ret: 0,
        single_rule_forwarded: 0,
    };
    steer_forward_times(&mut t);
    steer_redirect_times(&mut t);

    println!(
        "## Steering, BPF_PROG_TEST_RUN: {STEER_RULES} forward rules, {STEER_RULES} redirect sources; median of \
         {SAMPLES} runs of {REPEAT} repeats per figure"
    );
    println!(
        "ns/packet as BPF_PROG_TEST_RUN reports them; \"program cost\" subtracts the harness (the empty program, run \
         the same way on the same packet);"
    );
    println!(
        "\"steering share\" subtracts the same program on packets that match nothing, with the timed packet's mix \
         of addresses (the ping-pong below alternates between the public address and the device, a VPN client, \
         which the counting program treats differently; counting and the miss lookup stay in that baseline)."
    );
    println!(
        "Figures of a table were sampled in interleaved rounds. Customers are Internet addresses (counting: the \
         outside-subnets path); redirected clients are VPN clients with a counter entry (client-hit path)."
    );
    println!();
    println!("| path | packet | ns/packet | program cost | steering share |");
    println!("|---|---|---:|---:|---:|");
    let row = |path: &str, what: &str, total: f64, empty: f64, base: Option<f64>| {
        let share = base.map_or("-".to_string(), |b| format!("{:.0}", total - b));
        println!("| {path} | {what} | {total:.0} | {:.0} | {share} |", total - empty);
    };
    let (e2, e3) = (t.empty_l2, t.empty_l3);
    row(
        "forward (L2 `tunmeter_in`)",
        "TCP of an established forwarded flow: cached destination hit (no rule or flow-table lookup), address + port + checksum rewrite",
        t.fwd,
        e2,
        Some(t.fwd_base),
    );
    row(
        "forward (L2 `tunmeter_in`)",
        "TCP to a forwarded port of another public address: cache miss, rule hit, stops there (no flow, no rewrite)",
        t.fwd_other_addr,
        e2,
        Some(t.fwd_miss),
    );
    row("forward (L2 `tunmeter_in`)", "TCP to a port without a rule: counting + rule miss", t.fwd_miss, e2, None);
    row(
        "reply (L2 `tunmeter_out`)",
        "TCP from the device: flow-table hit, address + port + checksum rewrite",
        t.reply,
        e2,
        Some(t.reply_base),
    );
    row("reply (L2 `tunmeter_out`)", "TCP of a flow never forwarded: counting + flow miss", t.reply_miss, e2, None);
    let redirect_what = if t.redirect_event == tunmeter_common::SteerEvent::Redirected.name() {
        "SYN from a redirected client: LPM hit, bypass miss, 2 socket lookups, `bpf_sk_assign`, mark".to_string()
    } else {
        format!(
            "SYN from a redirected client: LPM hit, bypass miss, 2 socket lookups (proxy found), `bpf_sk_assign` \
             refused under BPF_PROG_TEST_RUN ({}, return {})",
            t.redirect_event, t.redirect_ret as i32
        )
    };
    row("redirect (L3 `tunmeter_in`)", &redirect_what, t.redirect, e3, Some(t.redirect_miss));
    row(
        "redirect (L3 `tunmeter_in`)",
        "SYN from a client without a rule: counting + LPM miss",
        t.redirect_miss,
        e3,
        None,
    );
    println!("| harness | empty program, L2 frame / L3 packet | {e2:.0} / {e3:.0} | 0 | - |");
    println!();
    let cost = t.fwd - e2;
    let share = t.fwd - t.fwd_base;
    println!(
        "Target: lookup + rewrite <= {STEER_TARGET_NS:.0} ns. Compared with it: the forwarded packet's program cost \
         (counting + steering, harness subtracted) {cost:.0} ns: {}. The steering share alone (forwarded minus the \
         no-rule packets, same program) {share:.0} ns: {}. A packet no rule can match skips the rule lookup \
         (`FWD_RULELESS_PORTS`); a port with a rule costs a cache miss and the rule lookup (a hit that stops at \
         the address check, minus the no-rule packet) {:.0} ns; an established flow's packet needs the cached \
         destination (one lookup), the rewrite (two transport-checksum helpers and one store of the IP checksum, \
         addresses and ports) and the rule and event counters. The reply path's steering share: {:.0} ns.",
        verdict(cost <= STEER_TARGET_NS),
        verdict(share <= STEER_TARGET_NS),
        t.fwd_other_addr - t.fwd_miss,
        t.reply - t.reply_base
    );
    println!();
    println!(
        "Method: BPF_PROG_TEST_RUN runs the program `repeat` times on one skb, so a rewrite is seen by the next \
         repeat: with a single rule, {SEMANTICS_REPEAT} repeats of a packet to its port counted {} forwarded \
         packet(s). The forwarded packet is therefore timed between two of the {STEER_RULES} rules that map onto \
         each other (port P -> device D:Q, port Q -> public address:P): every repeat is a full forward of a packet \
         of an established flow (its cached destination read, nothing written), checked afterwards: forwarded events = repeats, \
         half on each rule, no flow created. The reply path alternates the same way between the two flow entries \
         those rules created (the table holds {STEER_RULES} other flows). Not timed: the first packet of a flow \
         (one flow-table write more), fragments and ICMP errors.",
        t.single_rule_forwarded
    );
    println!();
}
