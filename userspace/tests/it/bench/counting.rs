//! Section 1: ns/packet of the counting program under BPF_PROG_TEST_RUN with 1, 10,000 and
//! 100,000 clients (IPv4, IPv6, L2, outside subnets, not IP, the empty program), and the cost
//! of reading every client's counters (one-off, and the daemon's steady-state scan).

use super::*;

pub(super) fn ns_per_packet() {
    println!("## Counting program, BPF_PROG_TEST_RUN: median of {SAMPLES} runs of {REPEAT} repeats per figure");
    println!("Figures are ns/packet as BPF_PROG_TEST_RUN reports them; in parentheses, minus the");
    println!("harness cost (an empty program run the same way, last column).");
    println!();
    println!(
        "| clients in map | IPv4 client | IPv6 client | IPv4 client, L2 variant | outside subnets | not IP | empty program |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut empty = EmptyProgram::load();
    let mut read_ms = None;
    for n in [1u32, 10_000, 100_000] {
        let mut h = Harness::new(Layer::L3, 262_144, &["10.8.0.0/16", "fd00:8::/64"]);
        fill(&h, n, false);
        fill(&h, n, true);
        let mut h2 = Harness::new(Layer::L2, 262_144, &["10.8.0.0/16"]);
        fill(&h2, n, false);
        // A client in the middle of the populated range.
        let mid = n / 2;
        let v4 = std::net::Ipv4Addr::from(0x0a08_0000u32 + mid).to_string();
        let v6 = Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, (mid >> 16) as u16, mid as u16).to_string();
        let udp = Packet::udp().ports(1, 2).payload([0; 64]).l4_checksum(0);
        let (p4, p6, po) = (
            udp.clone().src(&v4).dst("1.1.1.1"),
            udp.clone().src(&v6).dst("2001:db8::1"),
            udp.src("192.168.7.7").dst("1.1.1.1"),
        );
        let (p4_frame, not_ip) = (p4.clone().eth().build(), Packet::junk([0u8; 64]).build());
        let (p4, p6, po) = (p4.build(), p6.build(), po.build());
        let t4 = sampled(|| h.time(PROG_INGRESS, &p4, REPEAT));
        let t6 = sampled(|| h.time(PROG_INGRESS, &p6, REPEAT));
        let to = sampled(|| h.time(PROG_INGRESS, &po, REPEAT));
        // Not IP: harness, parse and one stats bump, no hash lookup.
        let tn = sampled(|| h.time(PROG_INGRESS, &not_ip, REPEAT));
        let te = empty.time(&p4);
        let t2 = sampled(|| h2.time(PROG_INGRESS, &p4_frame, REPEAT));
        let c = h.client(&v4).unwrap();
        assert_eq!(c.up_packets, REPEAT as u64 * SAMPLES as u64, "every repeat counted");
        println!(
            "| {n} | {t4:.0} ({:.0}) | {t6:.0} ({:.0}) | {t2:.0} ({:.0}) | {to:.0} | {tn:.0} | {te:.0} |",
            t4 - te,
            t6 - te,
            t2 - te
        );
        if n == 100_000 {
            read_ms = Some(map_read(&h));
        }
    }
    println!();
    wire_bytes(&mut empty);
    if let Some((n, once_ms, scan_ms)) = read_ms {
        println!(
            "Reading every client's counters from userspace ({n} slots, median of {READS}): {once_ms:.0} ms one-off \
             (`tunmeter clients`: each owner confirmed with one index lookup), {scan_ms:.2} ms for the daemon's \
             poll (owners remembered: the mmapped slots only, no syscall)."
        );
        println!();
    }
}

/// The cost of wire-byte accounting (`count_wire_bytes`): the same IPv4 client packet on an
/// instance loaded with `WIRE_BYTES` 0 and 1, as a plain packet and as a 3-segment GSO packet
/// (the wire-byte path reads `gso_segs` and parses the IP and TCP header lengths).
fn wire_bytes(empty: &mut EmptyProgram) {
    let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    let p = Packet::bare_tcp().src("10.8.0.2").dst("1.1.1.1").ports(1, 2).tcp_options(ts).payload(vec![0; 3000]);
    let p = p.build();
    let mut row = Vec::new();
    for wire in [false, true] {
        let opts = tunmeter::bpf::loader::LoadOptions { wire_bytes: wire, ..Default::default() };
        let mut h = Harness::with_options(Layer::L3, 1024, &["10.8.0.0/16"], opts);
        h.run(PROG_INGRESS, &p);
        row.push(sampled(|| h.time_gso(PROG_INGRESS, &p, 1, 0, REPEAT)));
        row.push(sampled(|| h.time_gso(PROG_INGRESS, &p, 3, 1000, REPEAT)));
    }
    let te = empty.time(&p);
    println!("GSO byte accounting, IPv4 TCP client, 3,052-byte packet (ns/packet, minus the empty program):");
    println!();
    println!("| mode | plain packet | GSO packet, 3 segments |");
    println!("|---|---:|---:|");
    println!("| skb->len (default) | {:.0} ({:.0}) | {:.0} ({:.0}) |", row[0], row[0] - te, row[1], row[1] - te);
    println!(
        "| wire bytes (`count_wire_bytes`) | {:.0} ({:.0}) | {:.0} ({:.0}) |",
        row[2],
        row[2] - te,
        row[3],
        row[3] - te
    );
    println!();
}

/// Whole-map reads timed per method, each the median of this many.
const READS: usize = 3;

/// What a poll (or `tunmeter clients`) costs: a one-off read (`read_sums`: every owner
/// confirmed with one index lookup) vs the daemon's steady-state scan (owners remembered: the
/// mmapped slots only, no syscall). Returns (client slots, one-off ms, steady-state ms).
fn map_read(h: &Harness) -> (usize, f64, f64) {
    let (once_ms, mut once) = median_ms(|| read_sums(&h.maps).unwrap());
    let mut reader = SlotReader::open(&h.maps, false).unwrap();
    reader.for_each(|_, _, _| {}).unwrap();
    let (scan_ms, mut scanned) = median_ms(|| {
        let mut v = Vec::new();
        reader.for_each(|_, k, c| v.push((*k, *c))).unwrap();
        v
    });
    once.sort_by_key(|(k, _)| *k);
    scanned.sort_by_key(|(k, _)| *k);
    assert!(once == scanned, "one-off and steady-state reads agree");
    (scanned.iter().filter(|(k, _)| !k.is_reserved()).count(), once_ms, scan_ms)
}

/// Median wall-clock milliseconds of READS calls of `f`, and the last call's result.
fn median_ms<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut last = None;
    let times = (0..READS)
        .map(|_| {
            let t0 = std::time::Instant::now();
            last = Some(f());
            t0.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    (median(times), last.expect("READS > 0"))
}
