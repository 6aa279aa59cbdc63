//! `cargo xtask bench`: figures for BENCHMARKS.md. Ignored by default (run with --ignored);
//! never asserts timings, only prints them, measured in one run.
//!
//! 1. ns/packet of the counting program via BPF_PROG_TEST_RUN with 1, 10,000 and 100,000
//!    clients in the map, IPv4 and IPv6 (client hit path), plus the outside-subnet path.
//!    Then the cost of reading the whole client map (200,000 entries), entry by entry and
//!    batched.
//! 2. TCP throughput across a veth pair with the programs attached vs no program (iperf3),
//!    alternating runs, ratio of medians.
//! 3. The real daemon with 0 (idle), 10,000 and 100,000 clients, every one active at every
//!    poll: its CPU share of one core and RSS, the ledger's poll and flush times, and the
//!    latency of `GET /api/v1/clients` at 10,000 clients.
//!
//! 4. Steering, ns/packet via BPF_PROG_TEST_RUN with 10,000 forward rules (and 10,000 redirect
//!    sources): a forwarded packet, a reply translated back, a redirected packet, each against
//!    the same program on a packet without a rule and against the empty program.
//! 5. Forwarded TCP throughput (iperf3 through the lab's server): a tunmeter forward rule vs the
//!    same forwarding by iptables DNAT, alternating runs, ratio of medians.
//!
//! 6. Identity: the wall time of `tunmeter hook openvpn` (what OpenVPN waits for at each
//!    connect) against the real daemon, `status 3` parsing at 1,000 and 10,000 clients, and
//!    webhook delivery from the durable outbox (one subject vs 100 subjects).
//!
//! `TM_BENCH_QUICK=1` skips 2, 3 and 5. `TM_BENCH_ONLY=` a comma-separated list of `counting`
//! (1), `veth` (2), `daemon` (3), `steer` (4 and 5), `identity` (6) runs only those, e.g.
//! `TM_BENCH_ONLY=steer`.

use crate::support;

use std::{net::Ipv6Addr, process::Command, time::Duration};

use aya::{maps::PerCpuValues, util::nr_cpus};
use support::{
    Harness,
    packet::{ACK, PSH, Packet, SYN, TCP},
    require_root,
};
use tunmeter::{
    config::Layer,
    counters::{ip_key, read_sums, sum_cpus},
    loader::PROG_INGRESS,
};
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
    if let Some((n, iter_ms, batch_ms)) = read_ms {
        println!(
            "Reading the whole client map from userspace ({n} entries, per-CPU values summed, median of {READS}): \
             {iter_ms:.0} ms one entry at a time, {batch_ms:.1} ms batched (BPF_MAP_LOOKUP_BATCH), {:.1}x faster.",
            iter_ms / batch_ms
        );
        println!();
    }
}

/// Whole-map reads timed per method, each the median of this many.
const READS: usize = 3;

/// What a poll (or `tunmeter clients`) costs: aya 0.16 iteration (one get-next-key and one
/// lookup syscall per entry) vs `read_sums` (BPF_MAP_LOOKUP_BATCH, many entries per syscall).
/// Returns (client entries, iterative ms, batched ms).
fn map_read(h: &Harness) -> (usize, f64, f64) {
    let (iter_ms, mut by_entry) = median_ms(|| {
        let map = h.maps.clients().unwrap();
        map.iter().map(|e| e.map(|(k, v)| (k, sum_cpus(v.iter()))).unwrap()).collect::<Vec<_>>()
    });
    let (batch_ms, mut batched) = median_ms(|| read_sums(&h.maps).unwrap());
    by_entry.sort_by_key(|(k, _)| *k);
    batched.sort_by_key(|(k, _)| *k);
    assert!(by_entry == batched, "batched and iterative reads agree");
    (batched.iter().filter(|(k, _)| !k.is_reserved()).count(), iter_ms, batch_ms)
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

/// Median of SAMPLES measurements.
fn sampled(mut f: impl FnMut() -> f64) -> f64 {
    median((0..SAMPLES).map(|_| f()).collect())
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let only = std::env::var("TM_BENCH_ONLY").ok().filter(|v| !v.trim().is_empty());
    let wants = |section: &str| only.as_deref().is_none_or(|o| o.split(',').any(|s| s.trim() == section));
    let quick = std::env::var_os("TM_BENCH_QUICK").is_some();
    if wants("counting") {
        ns_per_packet();
    }
    if !quick && wants("veth") {
        veth_throughput();
    }
    if !quick && wants("daemon") {
        daemon_cost();
    }
    if wants("steer") {
        steer_ns_per_packet();
    }
    if !quick && wants("steer") {
        steer_throughput();
    }
    if wants("identity") {
        support::identitybench::status_parsing();
        support::identitybench::hook_latency();
        support::identitybench::webhook_throughput();
    }
}

// ---- 3. The daemon: poll + ledger cost and API latency ---------------------------------------
//
// The real `tunmeter run` (the release binary under `cargo xtask bench`) in a network namespace
// of its own with a persistent tun device, its own pins and state, and the default SQLite
// ledger, poll interval and flush interval. This process writes N client entries
// into the pinned CLIENT_COUNTERS map and bumps every one of them once a second (the worst
// case: every client active at every poll); its own cost is not the daemon's.

/// Targets.
const CPU_TARGET_PCT: f64 = 10.0;
const RSS_TARGET_MIB: f64 = 64.0;
const API_P99_TARGET_MS: f64 = 20.0;
/// From the moment every client exists until the measured window starts, at least: the first
/// polls and the first flush (every row new) happen here (see `warmup`).
const WARMUP: Duration = Duration::from_secs(10);
/// The measured window: several flushes at the default flush interval.
const WINDOW: Duration = Duration::from_secs(30);

/// The daemon's default poll and flush intervals, as `tunmeter run` without a config file has
/// them.
fn default_intervals() -> (Duration, Duration) {
    let cfg = tunmeter::config::Config::load_settings(
        std::path::Path::new("/nonexistent/tunmeter-bench.toml"),
        false,
        &tunmeter::config::Overrides { node_id: Some(NODE_ID.into()), ..Default::default() },
    )
    .expect("default settings");
    (Duration::from_millis(cfg.ledger.poll_interval_ms), Duration::from_millis(cfg.ledger.flush_interval_ms))
}

/// Warm-up: WARMUP, and at least one flush interval and 5 s, so the first flush (every row new)
/// is over before the window starts.
fn warmup() -> Duration {
    WARMUP.max(default_intervals().1 + Duration::from_secs(5))
}
const API_REQUESTS: usize = 300;
const API_ADDR: &str = "127.0.0.1:9107";
const NODE_ID: &str = "bench";
const DAEMON_MAX_CLIENTS: &str = "131072";

/// The daemon in its own namespace; on drop (panic included): SIGTERM (SIGKILL after 30 s),
/// `tunmeter detach`, the namespace and the state directory removed.
struct DaemonLab {
    ns: String,
    namespaces: tunmeter_lab::Namespaces,
    pins: support::PinDir,
    state: std::path::PathBuf,
    daemon: Option<std::process::Child>,
    token: String,
}

impl DaemonLab {
    fn start(tag: &str) -> DaemonLab {
        let ns = format!("tmbd-{tag}-{}", std::process::id());
        let state = std::path::PathBuf::from(format!("/tmp/tmbench-daemon-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        let mut lab = DaemonLab {
            ns,
            namespaces: tunmeter_lab::Namespaces::new(),
            pins: support::PinDir::new(&format!("daemon-{tag}")),
            state,
            daemon: None,
            token: String::new(),
        };
        lab.namespaces.add(&lab.ns, false).unwrap();
        // A persistent tun device: layer 3 (link type "none"), as the daemon's --tun needs.
        sh(&["ip", "-n", &lab.ns, "tuntap", "add", "dev", "tun0", "mode", "tun"]);
        sh(&["ip", "-n", &lab.ns, "link", "set", "tun0", "up"]);
        std::fs::create_dir_all(&lab.state).unwrap();
        let log = std::fs::File::create(lab.log()).unwrap();
        let mut c = lab.tunmeter(&["run", "--tun", "tun0", "--subnet", "10.0.0.0/8", "--subnet", "fd00::/8"]);
        c.args(["--max-clients", DAEMON_MAX_CLIENTS, "--node-id", NODE_ID, "--api-listen", API_ADDR])
            .arg("--pin-dir")
            .arg(lab.pins.path())
            .arg("--state-dir")
            .arg(&lab.state)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        lab.daemon = Some(c.spawn().expect("spawn tunmeter run"));
        lab.wait_log("API listening", Duration::from_secs(30));
        // nsenter execs tunmeter: the child's pid is the daemon's.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", lab.pid())).unwrap_or_default();
        assert_eq!(comm.trim(), "tunmeter", "pid {} is the daemon", lab.pid());
        let out = lab
            .tunmeter(&["token", "create", "--role", "read", "--name", "bench", "--node-id", NODE_ID])
            .arg("--state-dir")
            .arg(&lab.state)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        lab.token = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim().to_string();
        assert!(lab.token.starts_with("tm_"), "token create printed {stdout:?}");
        lab
    }

    /// `tunmeter ARGS` in the namespace (mount namespace unchanged, so /sys/fs/bpf is ours).
    fn tunmeter(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(env!("CARGO_BIN_EXE_tunmeter"))
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info");
        c
    }

    fn log(&self) -> std::path::PathBuf {
        self.state.join("daemon.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon started").id()
    }

    fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let t0 = std::time::Instant::now();
        while !self.log_text().contains(needle) {
            if let Some(st) = self.daemon.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the daemon exited ({st}) before logging {needle:?}:\n{}", self.log_text());
            }
            assert!(t0.elapsed() < timeout, "no {needle:?} in the daemon log after {timeout:?}:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `f` with an API client on a thread inside the daemon's namespace.
    fn api<T: Send + 'static>(&self, f: impl FnOnce(&Api) -> T + Send + 'static) -> T {
        let token = self.token.clone();
        tunmeter_lab::in_netns(&self.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            // No proxy from the environment: the daemon is on this namespace's loopback.
            let client = reqwest::Client::builder().no_proxy().build()?;
            Ok(f(&Api { rt, client, token }))
        })
        .expect("API thread")
    }
}

impl Drop for DaemonLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let t0 = std::time::Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut detach = self.tunmeter(&["detach"]);
        detach.arg("--pin-dir").arg(self.pins.path()).arg("--state-dir").arg(&self.state);
        let _ = detach.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.state);
        // The namespace goes with `self.namespaces`, the pin directory (if detach left it) with
        // `self.pins`.
    }
}

/// A blocking HTTP client of the daemon's API, on a thread in its namespace.
struct Api {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    token: String,
}

impl Api {
    /// GET `path` with the bearer token: status and body.
    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.rt.block_on(async {
            let r = self
                .client
                .get(format!("http://{API_ADDR}{path}"))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            let status = r.status().as_u16();
            (status, r.bytes().await.unwrap_or_else(|e| panic!("GET {path}: body: {e}")).to_vec())
        })
    }

    /// GET `path` to its last body byte, without copying the body: status and body length.
    fn get_len(&self, path: &str) -> (u16, usize) {
        self.rt.block_on(async {
            let r = self.client.get(format!("http://{API_ADDR}{path}")).bearer_auth(&self.token).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().len())
        })
    }

    fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }
}

/// Writes `n` client entries (10.1.0.0 and up) into the daemon's pinned client map and bumps
/// every one of them once a second (upload and download, last seen = now) until dropped.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The time each round of `n` map updates took.
    thread: Option<std::thread::JoinHandle<Vec<Duration>>>,
}

impl Traffic {
    fn start(pins: &std::path::Path, n: u32) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let pins = pins.to_owned();
        let clock = tunmeter::clock::KernelClock::open(&pins).expect("the daemon's clock program");
        let thread = std::thread::spawn(move || {
            let map = aya::maps::MapData::from_pin(pins.join(tunmeter_common::MAP_CLIENTS)).unwrap();
            let ncpu = nr_cpus().unwrap().get() as usize;
            let keys: Vec<_> =
                (0..n).map(|i| tunmeter_common::ClientKey::v4((0x0a01_0000u32 + i).to_be_bytes())).collect();
            let mut values = Vec::with_capacity(keys.len() * ncpu);
            let mut rounds = Vec::new();
            let mut next = std::time::Instant::now();
            let mut round = 0u64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                let t0 = std::time::Instant::now();
                let now = clock.jiffies().unwrap();
                values.clear();
                for i in 0..keys.len() as u64 {
                    let c = ClientCounters {
                        up_bytes: round * 1000 + i,
                        up_packets: round * 2,
                        down_bytes: round * 5000 + i,
                        down_packets: round * 4,
                        last_seen_jiffies: now,
                    };
                    // One slot per possible CPU, as the kernel program's per-CPU counters are.
                    values.extend(std::iter::repeat_n(c, ncpu));
                }
                tunmeter::batch::update_percpu(&map, &keys, &values, ncpu)
                    .expect("BPF_MAP_UPDATE_BATCH of the client map");
                rounds.push(t0.elapsed());
                next += Duration::from_secs(1);
                while std::time::Instant::now() < next && !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            rounds
        });
        Traffic { stop, thread: Some(thread) }
    }

    /// Stop; the slowest round of map updates.
    fn stop(mut self) -> Duration {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = self.thread.take().unwrap().join().expect("traffic thread");
        rounds.into_iter().max().unwrap_or_default()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after "(comm)": the 3rd field (state) first; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// A `Vm...:` line of /proc/PID/status, in MiB.
fn vm_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key} in status"));
    let kb: f64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().unwrap();
    kb / 1024.0
}

/// CPU ticks per thread name (digits stripped: "sqlx-sqlite-worker-0" -> "sqlx-sqlite-worker-"),
/// over the threads alive now.
fn thread_ticks(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_name = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        let name = stat[open + 1..close].trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        *by_name.entry(name).or_default() += ticks;
    }
    by_name
}

/// Clock ticks per second of utime/stime.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// What one daemon run measured.
struct DaemonCost {
    clients: u32,
    cpu_pct: f64,
    /// CPU share of one core per thread name, largest first.
    threads: Vec<(String, f64)>,
    rss_mib: f64,
    hwm_mib: f64,
    polls: u64,
    /// last_poll_ms samples of /api/v1/stats, one a second.
    poll_ms: Vec<f64>,
    /// last_flush_ms of each flush that ended in the window.
    flush_ms: Vec<f64>,
    /// If no flush ended in the window: how long the first one took, waited for afterwards.
    late_flush_ms: Option<f64>,
    max_pending: u64,
    /// The slowest round of N map updates by this process (must stay under 1 s).
    bump_ms: f64,
    /// `GET /api/v1/clients` while every client is active, then after the activity stopped.
    api: Option<(ApiLatency, ApiLatency)>,
}

struct ApiLatency {
    clients: usize,
    bytes: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

/// Percentile (nearest rank) of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// API_REQUESTS sequential `GET /api/v1/clients`, each timed until its last body byte.
fn api_latency(lab: &DaemonLab) -> ApiLatency {
    lab.api(|api| {
        // Outside the timing: the response is complete and well-formed.
        let list = api.get_json("/api/v1/clients");
        let clients = list["clients"].as_array().unwrap().len();
        let mut ms = Vec::with_capacity(API_REQUESTS);
        let mut bytes = 0;
        for _ in 0..API_REQUESTS {
            let t0 = std::time::Instant::now();
            let (status, len) = api.get_len("/api/v1/clients");
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200);
            bytes = len;
        }
        ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        ApiLatency {
            clients,
            bytes,
            p50_ms: percentile(&ms, 50.0),
            p99_ms: percentile(&ms, 99.0),
            max_ms: *ms.last().unwrap(),
        }
    })
}

/// How long to wait after the window for a first flush that had not ended in it.
const LATE_FLUSH_WAIT: Duration = Duration::from_secs(120);

fn daemon_run(n: u32, measure_api: bool) -> DaemonCost {
    let lab = DaemonLab::start(&n.to_string());
    let pid = lab.pid();
    let traffic = (n > 0).then(|| Traffic::start(lab.pins.path(), n));
    std::thread::sleep(warmup());

    let (ticks, threads0, threads1, window, start_ms, samples) = lab.api(move |api| {
        let (c0, th0, t0) = (cpu_ticks(pid), thread_ticks(pid), std::time::Instant::now());
        let start_ms = tunmeter::clock::unix_ms();
        let mut samples = Vec::new();
        let mut next = t0;
        while t0.elapsed() < WINDOW {
            next += Duration::from_secs(1);
            while std::time::Instant::now() < next {
                std::thread::sleep(Duration::from_millis(10));
            }
            samples.push(api.get_json("/api/v1/stats")["ledger"].clone());
        }
        (cpu_ticks(pid) - c0, th0, thread_ticks(pid), t0.elapsed(), start_ms, samples)
    });
    let share = |ticks: u64| 100.0 * ticks as f64 / clk_tck() / window.as_secs_f64();
    let cpu_pct = share(ticks);
    let mut threads: Vec<(String, f64)> = threads1
        .iter()
        .map(|(name, t)| (name.clone(), share(t - threads0.get(name).copied().unwrap_or(0).min(*t))))
        .filter(|(_, pct)| *pct >= 0.05)
        .collect();
    threads.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
    let (rss_mib, hwm_mib) = (vm_mib(pid, "VmRSS:"), vm_mib(pid, "VmHWM:"));

    let mut flushes = std::collections::BTreeMap::new();
    for s in &samples {
        if let (Some(at), Some(ms)) = (s["last_flush_unix_ms"].as_u64(), s["last_flush_ms"].as_f64())
            && at >= start_ms
        {
            flushes.insert(at, ms);
        }
    }
    // With every client active the first flush (every row new) can outlast the window.
    let late_flush_ms = (n > 0 && flushes.is_empty()).then(|| {
        lab.api(move |api| {
            let t0 = std::time::Instant::now();
            while t0.elapsed() < LATE_FLUSH_WAIT {
                let l = api.get_json("/api/v1/stats")["ledger"].clone();
                if l["last_flush_unix_ms"].as_u64() >= Some(start_ms) {
                    return l["last_flush_ms"].as_f64();
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            None
        })
    });

    let api = measure_api.then(|| api_latency(&lab));
    let bump_ms = traffic.map_or(0.0, |t| t.stop().as_secs_f64() * 1000.0);
    let api = api.map(|busy| {
        // Quiet: no client moves, so polls change nothing and flushes have nothing to write
        // once the last activity is written.
        std::thread::sleep(Duration::from_secs(7));
        (busy, api_latency(&lab))
    });

    // Functional checks: the ledger saw every client and never failed.
    let last = samples.last().expect("samples");
    assert_eq!(last["clients"].as_u64(), Some(n as u64), "the ledger holds every client: {last}");
    assert_eq!(last["database"], "ok", "{last}");
    assert_eq!(last["poll_errors"].as_u64(), Some(0), "{last}");
    assert_eq!(last["flush_errors"].as_u64(), Some(0), "{last}");
    if let Some((busy, quiet)) = &api {
        assert_eq!((busy.clients, quiet.clients), (n as usize, n as usize), "GET /api/v1/clients lists every client");
    }
    let polls = last["polls"].as_u64().unwrap() - samples[0]["polls"].as_u64().unwrap();
    let poll_ms = samples.iter().filter_map(|s| s["last_poll_ms"].as_f64()).collect();
    let max_pending = samples.iter().filter_map(|s| s["pending_rows"].as_u64()).max().unwrap_or(0);
    DaemonCost {
        clients: n,
        cpu_pct,
        threads,
        rss_mib,
        hwm_mib,
        polls,
        poll_ms,
        flush_ms: flushes.into_values().collect(),
        late_flush_ms: late_flush_ms.flatten(),
        max_pending,
        bump_ms,
        api,
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn daemon_cost() {
    let runs: Vec<DaemonCost> =
        [(0, false), (10_000, true), (100_000, false)].into_iter().map(|(n, api)| daemon_run(n, api)).collect();
    let (poll, flush) = default_intervals();
    println!(
        "## The daemon: poll + ledger cost (real `tunmeter run`, SQLite ledger, defaults: poll every {} ms, flush \
         every {} ms)",
        poll.as_millis(),
        flush.as_millis()
    );
    println!("Every client's counters change every second (worst case: every client active at every poll).");
    println!(
        "{} s warm-up, then {} s measured: CPU = utime + stime of the daemon over wall time (100% = one core);",
        warmup().as_secs(),
        WINDOW.as_secs()
    );
    println!("RSS = VmRSS at the end, peak = VmHWM. Poll and flush times are the ledger's own (`GET /api/v1/stats`,");
    println!("sampled every second): poll = read the whole map + fold it in; flush = one SQL transaction.");
    println!(
        "Targets, at 10,000 and 100,000 clients: CPU < {CPU_TARGET_PCT:.0}% of one core, RSS < {RSS_TARGET_MIB:.0} MiB \
         (judged on the peak)."
    );
    println!();
    println!(
        "| clients | CPU (one core) | RSS | peak RSS | CPU target | RSS target | polls | poll ms (median / max) \
         | flushes | flush ms (mean / max) | pending rows (max) |"
    );
    println!("|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|");
    for r in &runs {
        let mut poll = r.poll_ms.clone();
        poll.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let poll_txt = if poll.is_empty() {
            "-".into()
        } else {
            format!("{:.1} / {:.1}", median(poll.clone()), poll[poll.len() - 1])
        };
        let flush_txt = if r.flush_ms.is_empty() {
            match r.late_flush_ms {
                Some(ms) => format!("none ended; the one running took {ms:.0}"),
                None if r.clients > 0 => {
                    format!("none ended, nor in {} s more", LATE_FLUSH_WAIT.as_secs())
                }
                None => "-".into(),
            }
        } else {
            let mean = r.flush_ms.iter().sum::<f64>() / r.flush_ms.len() as f64;
            format!("{mean:.0} / {:.0}", r.flush_ms.iter().cloned().fold(0.0, f64::max))
        };
        println!(
            "| {} | {:.1}% | {:.1} MiB | {:.1} MiB | < {CPU_TARGET_PCT:.0}%: {} | < {RSS_TARGET_MIB:.0} MiB: {} \
             | {} | {poll_txt} | {} | {flush_txt} | {} |",
            r.clients,
            r.cpu_pct,
            r.rss_mib,
            r.hwm_mib,
            verdict(r.cpu_pct < CPU_TARGET_PCT),
            verdict(r.hwm_mib < RSS_TARGET_MIB),
            r.polls,
            r.flush_ms.len(),
            r.max_pending,
        );
    }
    println!();
    println!("CPU by daemon thread in the same window (share of one core; names as the kernel shows them:");
    println!("tokio-rt-worker runs the async tasks and the blocking map reads, sqlx-sqlite-wor runs SQLite):");
    println!();
    for r in &runs {
        let threads: Vec<String> = r.threads.iter().map(|(name, pct)| format!("{name} {pct:.1}%")).collect();
        println!("- {} clients: {}", r.clients, if threads.is_empty() { "-".into() } else { threads.join(", ") });
    }
    println!();
    let bumps: Vec<String> =
        runs.iter().filter(|r| r.clients > 0).map(|r| format!("{:.0} ms for {}", r.bump_ms, r.clients)).collect();
    println!("The bench process's slowest round of map updates: {} (a round must fit in 1 s).", bumps.join(", "));
    println!();
    for r in &runs {
        let Some((busy, quiet)) = &r.api else { continue };
        println!(
            "## API: `GET /api/v1/clients` with {} clients ({API_REQUESTS} sequential requests, read token, keep-alive,",
            r.clients
        );
        println!("from the daemon's namespace; timed to the last body byte)");
        println!("| clients | while | response size | p50 | p99 | max | p99 target |");
        println!("|---:|---|---:|---:|---:|---:|---|");
        for (a, when) in [(busy, "every client active (run above)"), (quiet, "no client activity")] {
            println!(
                "| {} | {when} | {:.2} MB | {:.1} ms | {:.1} ms | {:.1} ms | < {API_P99_TARGET_MS:.0} ms: {} |",
                a.clients,
                a.bytes as f64 / 1e6,
                a.p50_ms,
                a.p99_ms,
                a.max_ms,
                verdict(a.p99_ms < API_P99_TARGET_MS)
            );
        }
        println!();
    }
}

// ---- 4. Steering: ns/packet via BPF_PROG_TEST_RUN --------------------------------------------
//
// BPF_PROG_TEST_RUN builds one skb and runs the program `repeat` times on it: a rewrite in one
// repeat is what the next repeat sees (measured below: `single_rule_forwarded`). A forward rule's
// rewrite moves the packet off the rule's port, so with one rule only the first repeat would be
// forwarded and the figure would be the no-match cost. The timed forwarded packet therefore
// ping-pongs between two of the 10,000 rules: public port P -> device D:Q, and public port Q ->
// the public address:P. Every repeat is then a full forward of a packet of an established flow
// (rule hit, flow-table hit without a write, address + port + checksum rewrite, rule counter,
// event), and an even number of repeats leaves the packet as it came in. The reply path
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
    let p = Packet::tcp().src(src).dst(dst).ports(sport, dport).flags(flags).payload(payload).df();
    p
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
    use tunmeter::loader::PROG_EGRESS;
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

    // Repeat semantics: one rule, SEMANTICS_REPEAT repeats of a packet to its port.
    let single_pkt = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, single, ACK | PSH).eth().build();
    let before = s.event(SteerEvent::Forwarded).0;
    h.time(PROG_INGRESS, &single_pkt, SEMANTICS_REPEAT);
    t.single_rule_forwarded = s.event(SteerEvent::Forwarded).0 - before;

    let fwd = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, p, ACK | PSH).eth().build();
    let fwd_miss = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, 80, ACK | PSH).eth().build();
    let fwd_other = tcp_packet(STEER_CUST, STEER_PUB, STEER_CPORT, port(other_idx), ACK | PSH).eth().build();
    let reply = tcp_packet(dev, STEER_CUST, q, STEER_CPORT, ACK | PSH).eth().build();
    let reply_miss = tcp_packet(STEER_PUB, STEER_CUST, 80, STEER_CPORT, ACK | PSH).eth().build();

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
    [t.fwd, t.fwd_miss, t.fwd_other_addr, t.reply, t.reply_miss, t.empty_l2] = interleaved(|| {
        [
            h.time(PROG_INGRESS, &fwd, REPEAT),
            h.time(PROG_INGRESS, &fwd_miss, REPEAT),
            h.time(PROG_INGRESS, &fwd_other, REPEAT),
            h.time(PROG_EGRESS, &reply, REPEAT),
            h.time(PROG_EGRESS, &reply_miss, REPEAT),
            empty.once(&fwd),
        ]
    });
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
        let listener = transparent_listener(PROXY_PORT);

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
            event == ["redirected"] || event == ["assign_failed"],
            "the redirected SYN found the proxy's socket: events {event:?}"
        );
        let event = event[0].to_string();
        let mut empty = EmptyProgram::load();
        let e0 = s.event(SteerEvent::ALL.into_iter().find(|e| e.name() == event).unwrap()).0;
        let times = interleaved(|| {
            [h.time(PROG_INGRESS, &syn, REPEAT), h.time(PROG_INGRESS, &syn_miss, REPEAT), empty.once(&syn)]
        });
        let e1 = s.event(SteerEvent::ALL.into_iter().find(|e| e.name() == event).unwrap()).0;
        assert_eq!(e1 - e0, REPEAT as u64 * SAMPLES as u64, "every timed repeat took the {event} path");
        assert_eq!(s.event(SteerEvent::ProxyMissing).0, 0);
        drop(listener);
        (times, event, ret)
    });
    ([t.redirect, t.redirect_miss, t.empty_l3], t.redirect_event, t.redirect_ret) = r;
}

/// A TCP socket listening on 0.0.0.0:port with IP_TRANSPARENT, as a transparent proxy has.
fn transparent_listener(port: u16) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt::{IpTransparent, ReuseAddr},
    };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    setsockopt(&fd, IpTransparent, &true).unwrap();
    setsockopt(&fd, ReuseAddr, &true).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::new(0, 0, 0, 0, port)).unwrap();
    listen(&fd, Backlog::new(16).unwrap()).unwrap();
    fd
}

fn steer_ns_per_packet() {
    let mut t = SteerTimes {
        fwd: 0.0,
        fwd_miss: 0.0,
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
        "\"steering share\" subtracts the same program on a packet that matches nothing (counting and the miss \
         lookup stay in that baseline)."
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
        "TCP to a forwarded port: rule hit, flow-table hit, address + port + checksum rewrite",
        t.fwd,
        e2,
        Some(t.fwd_miss),
    );
    row(
        "forward (L2 `tunmeter_in`)",
        "TCP to a forwarded port of another public address: rule hit, stops there (no flow, no rewrite)",
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
        Some(t.reply_miss),
    );
    row("reply (L2 `tunmeter_out`)", "TCP of a flow never forwarded: counting + flow miss", t.reply_miss, e2, None);
    let redirect_what = if t.redirect_event == "redirected" {
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
    let share = t.fwd - t.fwd_miss;
    println!(
        "Target: lookup + rewrite <= {STEER_TARGET_NS:.0} ns. Compared with it: the forwarded packet's program cost \
         (counting + steering, harness subtracted) {cost:.0} ns: {}. The steering share alone (forwarded minus the \
         no-rule packet, same program) {share:.0} ns: {}; of it, the rule lookup (a hit that stops at the address \
         check, minus a miss) {:.0} ns, the rest is the flow-table read, the rewrite (two stores, three checksum \
         helpers) and the rule and event counters. The reply path's steering share: {:.0} ns.",
        verdict(cost <= STEER_TARGET_NS),
        verdict(share <= STEER_TARGET_NS),
        t.fwd_other_addr - t.fwd_miss,
        t.reply - t.reply_miss
    );
    println!();
    println!(
        "Method: BPF_PROG_TEST_RUN runs the program `repeat` times on one skb, so a rewrite is seen by the next \
         repeat: with a single rule, {SEMANTICS_REPEAT} repeats of a packet to its port counted {} forwarded \
         packet(s). The forwarded packet is therefore timed between two of the {STEER_RULES} rules that map onto \
         each other (port P -> device D:Q, port Q -> public address:P): every repeat is a full forward of a packet \
         of an established flow (flow entry read, not written), checked afterwards: forwarded events = repeats, \
         half on each rule, no flow created. The reply path alternates the same way between the two flow entries \
         those rules created (the table holds {STEER_RULES} other flows). Not timed: the first packet of a flow \
         (one flow-table write more), fragments and ICMP errors.",
        t.single_rule_forwarded
    );
    println!();
}

// ---- 5. Forwarded TCP throughput: tunmeter forward rule vs iptables DNAT ---------------------
//
// The lab (tunmeter_lab) with two Ethernet clients on the server's LAN: `e1` is the customer,
// `e2` the device (iperf3 server). The customer connects to the server's address:8080, which
// is forwarded to e2:5201; e2 routes its replies to the customer through the server (a host
// route), so both directions cross the server's eth0 (in and out again: a hairpin). The device
// is an Ethernet client, not a tun client, because the lab's tun clients sit behind a
// userspace relay that would cap both runs alike and hide the dataplane. The daemon counts on
// tun0 and eth0 in both runs; the runs differ only in who forwards: (A) a tunmeter forward rule
// (no netfilter table in the namespace), (B) no rule, an iptables DNAT rule (nf_nat +
// conntrack; the whole nat table is deleted after each B run).

const FWD_PAIRS: usize = 3;
const FWD_SECS: u32 = 5;
const FWD_PUBLIC_PORT: u16 = 8080;
const FWD_DEVICE_PORT: u16 = 5201;

/// One iperf3 run: (Gbit/s received, bytes received).
fn iperf_to(client_ns: &str, host: &str, port: u16, secs: u32) -> (f64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", client_ns, "iperf3", "-c", host, "-p", &port.to_string()])
        .args(["-t", &secs.to_string(), "-J", "--connect-timeout", "3000"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("iperf3 to {host}:{port}: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success() && v.get("error").is_none(), "iperf3 to {host}:{port}: {}", v["error"]);
    let r = &v["end"]["sum_received"];
    (r["bits_per_second"].as_f64().unwrap() / 1e9, r["bytes"].as_u64().unwrap())
}

fn steer_json(ns: &str, pins: &std::path::Path) -> serde_json::Value {
    let pin = pins.display().to_string();
    let out = support::daemon::output(ns, &["steer", "list", "--json", "--pin-dir", &pin]);
    assert!(out.status.success(), "steer list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn steer_cli(ns: &str, pins: &std::path::Path, args: &[&str]) {
    let pin = pins.display().to_string();
    let out = support::daemon::output(ns, &[&["steer"], args, &["--pin-dir", &pin]].concat());
    assert!(out.status.success(), "steer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn steer_throughput() {
    use support::{
        ns_sh,
        steerbench::{DnatRule, KillOnDrop, ScratchDir, nft_ruleset},
    };
    use tunmeter_lab::{Lab, LabConfig};

    // Dropped in reverse order on every path: iperf3 server, daemon, pins, state, lab.
    let lab = Lab::up(LabConfig { prefix: "tmbfwd".into(), tun_clients: 0, eth_clients: 2 }).expect("lab up");
    let srv = lab.server_ns();
    let (cust, dev) = (lab.eth_clients()[0].clone(), lab.eth_clients()[1].clone());
    let public = lab.server_eth_v4().to_string();
    // Routing: forwarding on, no ICMP redirects (the server forwards out of the interface the
    // packet came in by: it would tell the customer and the device to talk directly).
    for kv in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.default.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
    ] {
        ns_sh(&srv, &["sysctl", "-q", "-w", kv]);
    }
    ns_sh(&dev.ns, &["ip", "route", "add", &format!("{}/32", cust.v4), "via", &public]);
    for kv in ["net.ipv4.conf.all.accept_redirects=0", "net.ipv4.conf.eth0.accept_redirects=0"] {
        ns_sh(&dev.ns, &["sysctl", "-q", "-w", kv]);
    }
    let state = ScratchDir::new("steer-fwd");
    let pins = support::PinDir::new("steer-fwd");
    let (pin, st) = (pins.path().display().to_string(), state.path().display().to_string());
    let args = [
        "--tun",
        "tun0",
        "--egress",
        "eth0",
        "--subnet",
        "10.8.0.0/24",
        "--subnet",
        "10.9.0.0/24",
        "--pin-dir",
        &pin,
        "--state-dir",
        &st,
        "--node-id",
        "steerbench",
    ];
    let mut daemon = support::daemon::Daemon::start(&srv, &args, &state.path().join("daemon.log"));
    let _iperf_server = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &dev.ns, "iperf3", "-s", "-p", &FWD_DEVICE_PORT.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let device = format!("{}:{FWD_DEVICE_PORT}", dev.v4);
    let pport = FWD_PUBLIC_PORT.to_string();

    let (mut tm, mut nat) = (Vec::new(), Vec::new());
    let (mut tm_bytes, mut tm_counted_to, mut tm_counted_from, mut dnat_conns) = (0u64, 0u64, 0u64, 0u64);
    for pair in 0..FWD_PAIRS {
        // Alternate which goes first.
        for tunmeter_run in if pair % 2 == 0 { [true, false] } else { [false, true] } {
            assert_eq!(nft_ruleset(&srv), "", "no netfilter table in the server namespace between runs");
            if tunmeter_run {
                steer_cli(
                    &srv,
                    pins.path(),
                    &["add", "forward", "--proto", "tcp", "--public-port", &pport, "--device", &device],
                );
                let (gbps, bytes) = iperf_to(&cust.ns, &public, FWD_PUBLIC_PORT, FWD_SECS);
                let list = steer_json(&srv, pins.path());
                let rule = list["forward"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["public_port"] == FWD_PUBLIC_PORT)
                    .cloned()
                    .expect("the forward rule");
                let (to, from) =
                    (rule["to_target_bytes"].as_u64().unwrap(), rule["from_target_bytes"].as_u64().unwrap());
                // Every payload byte the device received went through the rule (its counter
                // holds L3 bytes: payload plus headers).
                assert!(to >= bytes, "rule counted {to} bytes to the device, iperf3 received {bytes}: {rule}");
                assert!(rule["from_target_packets"].as_u64().unwrap() > 0, "replies translated: {rule}");
                steer_cli(&srv, pins.path(), &["del", "forward", "--proto", "tcp", "--public-port", &pport]);
                tm.push(gbps);
                (tm_bytes, tm_counted_to, tm_counted_from) =
                    (tm_bytes + bytes, tm_counted_to + to, tm_counted_from + from);
            } else {
                let forwarded = |l: &serde_json::Value| l["events"]["forwarded"]["packets"].as_u64().unwrap();
                let before = forwarded(&steer_json(&srv, pins.path()));
                let rule = DnatRule::add(&srv, "tcp", FWD_PUBLIC_PORT, &device);
                let (gbps, _) = iperf_to(&cust.ns, &public, FWD_PUBLIC_PORT, FWD_SECS);
                let conns = rule.packets();
                assert!(conns >= 2, "the DNAT rule translated iperf3's connections ({conns} packets)");
                drop(rule);
                assert_eq!(
                    forwarded(&steer_json(&srv, pins.path())),
                    before,
                    "tunmeter forwarded nothing in a DNAT run"
                );
                nat.push(gbps);
                dnat_conns += conns;
            }
        }
    }
    daemon.stop();
    let _ = support::daemon::output(&srv, &["detach", "--pin-dir", &pin, "--state-dir", &st]);

    let spread = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        format!("{lo:.2}-{hi:.2}")
    };
    let (sa, sb) = (spread(&tm), spread(&nat));
    let (a, b) = (median(tm), median(nat));
    println!(
        "## Forwarded TCP throughput: tunmeter forward rule vs iptables DNAT (iperf3, {FWD_PAIRS} x {FWD_SECS} s \
         each, alternating, medians)"
    );
    println!(
        "Lab: customer (Ethernet client) -> server public address:{FWD_PUBLIC_PORT} -> device (another Ethernet \
         client) :{FWD_DEVICE_PORT}, replies routed back through the server (both directions cross its eth0 twice). \
         The daemon counts on tun0 and eth0 in both runs; only the forwarding differs: a tunmeter forward rule with \
         no netfilter table in the namespace, or iptables DNAT (iptables-nft: nf_nat + conntrack) with no forward \
         rule. The device is an Ethernet client rather than a tun client: the lab's tun clients sit behind a \
         userspace relay that would cap both runs alike."
    );
    println!();
    println!("| tunmeter forward rule | iptables DNAT | ratio | range tunmeter | range DNAT |");
    println!("|---:|---:|---:|---:|---:|");
    println!("| {a:.2} Gbit/s | {b:.2} Gbit/s | {:.1}% | {sa} | {sb} |", 100.0 * a / b);
    println!();
    println!(
        "Check: over the tunmeter runs iperf3 delivered {:.2} GB and the forward rule counted {:.2} GB to the device \
         and {:.2} MB back (L3 bytes, headers included); over the DNAT runs tunmeter forwarded nothing and the DNAT \
         rule translated {dnat_conns} connections.",
        tm_bytes as f64 / 1e9,
        tm_counted_to as f64 / 1e9,
        tm_counted_from as f64 / 1e6
    );
    println!();
}
