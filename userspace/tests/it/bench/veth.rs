//! Section 2: TCP throughput across a veth pair with the programs attached vs no program
//! (iperf3), alternating runs, ratio of medians.

use super::*;

/// iperf3: alternating pairs of runs (without, with), each SECS long.
const PAIRS: usize = 5;
const SECS: u32 = 3;

fn iperf_gbps(client_ns: &str, server_ip: &str, secs: u32) -> f64 {
    let out = sh(&["ip", "netns", "exec", client_ns, "iperf3", "-c", server_ip, "-t", &secs.to_string(), "-J"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap() / 1e9
}

pub(super) fn veth_throughput() {
    let mut namespaces = tunmeter_lab::Namespaces::new();
    for ns in ["tmbencha", "tmbenchb"] {
        namespaces.add(ns, false).unwrap();
    }
    tunmeter_lab::Namespaces::veth("tmbencha", "eth0", "10.9.0.1/24", "tmbenchb", "eth0", "10.9.0.2/24").unwrap();
    let mut server = Command::new("ip")
        .args(["netns", "exec", "tmbencha", "iperf3", "-s"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let pins = support::PinDir::new("bench");
    let bin = env!("CARGO_BIN_EXE_tunmeter");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut tally = bpfstats::Tally::default();
    let stats = bpfstats::StatsOn::new();
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
        let before = bpfstats::counters();
        with.push(iperf_gbps("tmbenchb", "10.9.0.1", SECS));
        tally.window("tmbencha", &["eth0"], &before);
        let _ = d.kill();
        let _ = d.wait();
        let _ = std::fs::remove_dir_all(pins.path());
    }
    drop(stats);
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
    println!(
        "The programs' own cost in the runs with programs (kernel BPF run-time statistics, summed over the \
         {PAIRS} runs; counting only, no rule). These include the statistics' own two clock reads a run and \
         the cache misses of real traffic, which the BPF_PROG_TEST_RUN figures (one hot packet) leave out. \
         iperf3's data arrives on eth0 ingress as GRO-merged packets, its ACKs leave on egress:"
    );
    println!();
    tally.print(|_, hook| if hook.contains("ingress") { "iperf3 data (client upload)" } else { "iperf3 ACKs" });
}
