//! `cargo xtask bench`: figures for BENCHMARKS.md. Ignored by default (run with --ignored);
//! never asserts timings, only prints them, measured in one run.
//!
//! 1. ns/packet of the counting program via BPF_PROG_TEST_RUN with 1, 10,000 and 100,000
//!    clients in the map, IPv4 and IPv6 (client hit path), plus the outside-subnet path.
//!    Then the cost of reading every client's counters (100,000 slots), one-off and as the
//!    daemon's poll does.
//! 2. TCP throughput across a veth pair with the programs attached vs no program (iperf3),
//!    alternating runs, ratio of medians; what each attached program cost per packet in those
//!    runs (the kernel's BPF run-time statistics, `bpfstats`).
//! 3. The real daemon with 0 (idle), 10,000 and 100,000 clients, every one active at every
//!    poll, on SQLite and (100,000) on PostgreSQL: its CPU share of one core and RSS, the
//!    ledger's poll and flush times, and the latency of `GET /api/v1/clients` at 10,000
//!    clients. `TM_BENCH_CLIENTS=100000pg,1000000` runs other counts ("pg": on PostgreSQL).
//!
//! 4. Steering, ns/packet via BPF_PROG_TEST_RUN with 10,000 forward rules (and 10,000 redirect
//!    sources): a forwarded packet, a reply translated back, a redirected packet, each against
//!    the same program on a packet without a rule and against the empty program.
//! 5. Forwarded TCP throughput (iperf3 through the lab's server): a tunmeter forward rule vs the
//!    same forwarding by iptables DNAT, alternating runs, ratio of medians; the programs' cost
//!    per packet in both kinds of run (BPF run-time statistics); then the redirect path under a
//!    tun client's real upload (redirected, bypassed, no rule), by the same statistics.
//!
//! 6. Identity: the wall time of `tunmeter hook openvpn` (what OpenVPN waits for at each
//!    connect) against the real daemon, `status 3` parsing at 1,000 and 10,000 clients, and
//!    webhook delivery from the durable outbox (one subject vs 100 subjects).
//!
//! 7. Per-client counting against the alternatives an operator would run: nftables set
//!    counters and iptables rules, at 1,000, 10,000 and 100,000 clients (throughput, CPU per
//!    packet, time to read every counter).
//!
//! 8. Counter layouts (issue 14's design comparison), on prototypes with 100,000 clients: the
//!    per-CPU hash, a shared mmapable array with atomic adds, the array with change tracking;
//!    packet cost alone and with both CPUs on one client, and poll cost.
//!
//! `TM_BENCH_QUICK=1` skips 2, 3, 5 and 7. `TM_BENCH_ONLY=` a comma-separated list of `counting`
//! (1), `veth` (2), `daemon` (3), `steer` (4 and 5), `redirect` (the redirect part of 5 alone), `identity` (6), `alternatives` (7), `design` (8) runs only those, e.g.
//! `TM_BENCH_ONLY=steer`.
//!
//! This file: the entry point (`bench`), the shared timing helpers and the empty program; one
//! file per section (`counting`, `veth`, `daemon` with its lab in `daemon_lab`, `steer`,
//! `steer_fwd`, `steer_redirect`, `identity`, `bpfstats`).

mod alternatives;
mod bpfstats;
mod counting;
mod daemon;
mod daemon_lab;
mod design;
mod identity;
mod steer;
mod steer_fwd;
mod steer_redirect;
mod veth;

use crate::support;

use std::{net::Ipv6Addr, process::Command, time::Duration};

use aya::util::nr_cpus;
use support::{
    Harness,
    packet::{ACK, PSH, Packet, SYN, TCP},
    require_root,
};
use tunmeter::{
    bpf::{
        counters::{ip_key, read_sums},
        loader::PROG_INGRESS,
        slots::SlotReader,
    },
    types::Layer,
};
use tunmeter_common::ClientCounters;

const REPEAT: u32 = 1_000_000;
/// Each figure is the median of this many BPF_PROG_TEST_RUN calls of REPEAT runs.
const SAMPLES: usize = 7;

/// `n` client entries (10.8.x.y, or fd00:8::x:y with `v6`), all zero, in the harness's map.
fn fill(h: &Harness, n: u32, v6: bool) {
    let mut alloc = tunmeter::bpf::slots::SlotAlloc::open(&h.maps).unwrap();
    for i in 0..n {
        let ip: std::net::IpAddr = if v6 {
            Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
        } else {
            std::net::Ipv4Addr::from(0x0a08_0000u32 + i).into() // 10.8.x.y
        };
        alloc.admit(&ip_key(ip)).unwrap();
    }
}

/// The `tunmeter_empty` program, loaded on its own.
struct EmptyProgram(aya::Ebpf);

impl EmptyProgram {
    fn load() -> EmptyProgram {
        let pins = support::PinDir::new("empty");
        std::fs::create_dir_all(pins.path()).unwrap();
        let mut ebpf = aya::EbpfLoader::new()
            .default_map_pin_directory(pins.path())
            .load(tunmeter::bpf::loader::EBPF_OBJECT)
            .unwrap();
        let p: &mut aya::programs::SchedClassifier = ebpf.program_mut("tunmeter_empty").unwrap().try_into().unwrap();
        p.load().unwrap();
        EmptyProgram(ebpf)
    }

    fn time(&mut self, data: &[u8]) -> f64 {
        sampled(|| self.once(data))
    }

    /// One BPF_PROG_TEST_RUN of REPEAT repeats: ns per repeat.
    fn once(&mut self, data: &[u8]) -> f64 {
        use aya::programs::TestRun as _;
        let p: &mut aya::programs::SchedClassifier = self.0.program_mut("tunmeter_empty").unwrap().try_into().unwrap();
        let opts = aya::programs::TestRunOptions {
            data_in: Some(data),
            repeat: REPEAT,
            ..aya::programs::TestRunOptions::new()
        };
        p.test_run(opts).unwrap().duration.as_nanos() as f64
    }
}

/// Median of SAMPLES measurements.
fn sampled(mut f: impl FnMut() -> f64) -> f64 {
    median((0..SAMPLES).map(|_| f()).collect())
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn bench() {
    if !require_root() {
        return;
    }
    println!("# tunmeter benchmarks ({} CPUs, kernel {})", nr_cpus().unwrap(), sh(&["uname", "-r"]).trim());
    let only = std::env::var("TM_BENCH_ONLY").ok().filter(|v| !v.trim().is_empty());
    let wants = |section: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s.trim() == section));
    let quick = std::env::var_os("TM_BENCH_QUICK").is_some();
    if wants("counting") {
        counting::ns_per_packet();
    }
    if !quick && wants("veth") {
        veth::veth_throughput();
    }
    if !quick && wants("daemon") {
        daemon::daemon_cost();
    }
    if wants("steer") {
        steer::steer_ns_per_packet();
    }
    if !quick && wants("steer") {
        steer_fwd::steer_throughput();
    }
    if !quick && (wants("steer") || wants("redirect")) {
        steer_redirect::redirect_real_traffic();
    }
    if wants("identity") {
        identity::status_parsing();
        identity::hook_latency();
        identity::webhook_throughput();
    }
    if wants("design") {
        design::layouts();
    }
    if !quick && wants("alternatives") {
        alternatives::versus_alternatives();
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}
