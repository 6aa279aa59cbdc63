//! `cargo xtask bench`: figures for BENCHMARKS.md. Ignored by default (run with --ignored);
//! never asserts timings, only prints them, measured in one run.
//!
//! 1. ns/packet of the counting program via BPF_PROG_TEST_RUN with 1, 10,000 and 100,000
//!    clients in the map, IPv4 and IPv6 (client hit path), plus the outside-subnet path.
//! 2. TCP throughput across a veth pair with the programs attached vs no program (iperf3),
//!    alternating runs, ratio of medians.

mod support;

use std::{net::Ipv6Addr, process::Command, time::Duration};

use aya::{maps::PerCpuValues, util::nr_cpus};
use support::{Harness, packets::*, require_root};
use tunmeter::{config::Layer, counters::ip_key, loader::PROG_INGRESS};
use tunmeter_common::ClientCounters;

const REPEAT: u32 = 1_000_000;
/// iperf3: alternating pairs of runs (without, with), each SECS long.
const PAIRS: usize = 5;
const SECS: u32 = 3;
/// Each figure is the median of this many BPF_PROG_TEST_RUN calls of REPEAT runs.
const SAMPLES: usize = 7;

fn fill(h: &Harness, n: u32, v6: bool) {
    let mut map = h.maps.clients().unwrap();
    let ncpu = nr_cpus().unwrap().get() as usize;
    for i in 0..n {
        let ip: std::net::IpAddr = if v6 {
            Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, (i >> 16) as u16, i as u16).into()
        } else {
            std::net::Ipv4Addr::from(0x0a08_0000u32 + i).into() // 10.8.x.y
        };
        let vals = PerCpuValues::try_from(vec![ClientCounters::default(); ncpu]).unwrap();
        map.insert(&ip_key(ip), vals, 0).unwrap();
    }
}

/// The `tunmeter_empty` program, loaded on its own.
struct EmptyProgram(aya::Ebpf);

impl EmptyProgram {
    fn load() -> EmptyProgram {
        let pins = support::PinDir::new("empty");
        std::fs::create_dir_all(pins.path()).unwrap();
        let mut ebpf =
            aya::EbpfLoader::new().default_map_pin_directory(pins.path()).load(tunmeter::loader::EBPF_OBJECT).unwrap();
        let p: &mut aya::programs::SchedClassifier = ebpf.program_mut("tunmeter_empty").unwrap().try_into().unwrap();
        p.load().unwrap();
        EmptyProgram(ebpf)
    }

    fn time(&mut self, data: &[u8]) -> f64 {
        use aya::programs::TestRun as _;
        let p: &mut aya::programs::SchedClassifier = self.0.program_mut("tunmeter_empty").unwrap().try_into().unwrap();
        sampled(|| {
            let opts = aya::programs::TestRunOptions {
                data_in: Some(data),
                repeat: REPEAT,
                ..aya::programs::TestRunOptions::new()
            };
            p.test_run(opts).unwrap().duration.as_nanos() as f64
        })
    }
}

fn ns_per_packet() {
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
        let p4 = ipv4(&v4, "1.1.1.1", UDP, &udp(1, 2, &[0; 64]), &[], 0);
        let p6 = ipv6(&v6, "2001:db8::1", UDP, &udp(1, 2, &[0; 64]));
        let po = ipv4("192.168.7.7", "1.1.1.1", UDP, &udp(1, 2, &[0; 64]), &[], 0);
        let t4 = sampled(|| h.time(PROG_INGRESS, &p4, REPEAT));
        let t6 = sampled(|| h.time(PROG_INGRESS, &p6, REPEAT));
        let to = sampled(|| h.time(PROG_INGRESS, &po, REPEAT));
        // Not IP: harness, parse and one stats bump, no hash lookup.
        let tn = sampled(|| h.time(PROG_INGRESS, &[0u8; 64], REPEAT));
        let te = empty.time(&p4);
        let t2 = sampled(|| h2.time(PROG_INGRESS, &eth(ETH_IP, &p4), REPEAT));
        let c = h.client(&v4).unwrap();
        assert_eq!(c.up_packets, REPEAT as u64 * SAMPLES as u64, "every repeat counted");
        println!(
            "| {n} | {t4:.0} ({:.0}) | {t6:.0} ({:.0}) | {t2:.0} ({:.0}) | {to:.0} | {tn:.0} | {te:.0} |",
            t4 - te,
            t6 - te,
            t2 - te
        );
        if n == 100_000 {
            // What a poll (or `tunmeter clients`) costs: aya 0.16 has no batch lookups, so
            // this is one get-next-key and one lookup syscall per entry.
            let t0 = std::time::Instant::now();
            let snap = tunmeter::counters::read_clients(&h.maps, None).unwrap();
            read_ms = Some((t0.elapsed().as_secs_f64() * 1000.0, snap.clients.len()));
        }
    }
    println!();
    if let Some((ms, n)) = read_ms {
        println!("Reading the whole client map from userspace ({n} entries, per-CPU values summed): {ms:.0} ms.");
        println!();
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

struct Veth(&'static str);
impl Drop for Veth {
    fn drop(&mut self) {
        for ns in ["a", "b"] {
            let _ = Command::new("ip").args(["netns", "del", &format!("{}{ns}", self.0)]).status();
        }
    }
}

fn iperf_gbps(client_ns: &str, server_ip: &str, secs: u32) -> f64 {
    let out = sh(&["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", &secs.to_string(), "-J"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn veth_throughput() {
    let _g = Veth("tmbench");
    let _ = Command::new("ip").args(["netns", "del", "tmbencha"]).status();
    let _ = Command::new("ip").args(["netns", "del", "tmbenchb"]).status();
    sh(&["ip", "netns", "add", "tmbencha"]);
    sh(&["ip", "netns", "add", "tmbenchb"]);
    sh(&[
        "ip", "link", "add", "eth0", "netns", "tmbencha", "type", "veth", "peer", "name", "eth0", "netns", "tmbenchb",
    ]);
    sh(&["ip", "-n", "tmbencha", "addr", "add", "10.9.0.1/24", "dev", "eth0"]);
    sh(&["ip", "-n", "tmbenchb", "addr", "add", "10.9.0.2/24", "dev", "eth0"]);
    for ns in ["tmbencha", "tmbenchb"] {
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let mut server = Command::new("ip")
        .args(["netns", "exec", "tmbencha", "iperf3", "-s"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let pins = support::PinDir::new("bench");
    let bin = env!("CARGO_BIN_EXE_tunmeter");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..PAIRS {
        without.push(iperf_gbps("tmbenchb", "10.9.0.1", SECS));
        let mut d = Command::new("nsenter")
            .args(["--net=/run/netns/tmbencha", bin, "run", "--egress", "eth0", "--subnet", "10.9.0.0/24"])
            .arg("--pin-dir")
            .arg(pins.path())
            .args(["--state-dir", "/tmp/tunmeter-bench-state"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(800));
        with.push(iperf_gbps("tmbenchb", "10.9.0.1", SECS));
        let _ = d.kill();
        let _ = d.wait();
        let _ = std::fs::remove_dir_all(pins.path());
    }
    let _ = server.kill();
    let _ = server.wait();
    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.1}-{hi:.1}")
    };
    let (sa, sb) = (spread(&without), spread(&with));
    let (a, b) = (median(without), median(with));
    println!("## TCP throughput across a veth pair (iperf3, {PAIRS} x {SECS} s alternating runs, medians)");
    println!("| no program | programs attached (ingress+egress) | ratio | range without | range with |");
    println!("|---:|---:|---:|---:|---:|");
    println!("| {a:.2} Gbit/s | {b:.2} Gbit/s | {:.1}% | {sa} | {sb} |", 100.0 * b / a);
    println!();
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn bench() {
    if !require_root() {
        return;
    }
    println!("# tunmeter benchmarks ({} CPUs, kernel {})", nr_cpus().unwrap(), sh(&["uname", "-r"]).trim());
    ns_per_packet();
    if std::env::var_os("TM_BENCH_QUICK").is_none() {
        veth_throughput();
    }
}
