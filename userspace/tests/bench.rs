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
//! `TM_BENCH_QUICK=1` skips 2 and 3; `TM_BENCH_ONLY=daemon` runs only 3.

mod support;

use std::{net::Ipv6Addr, process::Command, time::Duration};

use aya::{maps::PerCpuValues, util::nr_cpus};
use support::{Harness, packets::*, require_root};
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
    let only_daemon = std::env::var("TM_BENCH_ONLY").is_ok_and(|v| v == "daemon");
    let quick = std::env::var_os("TM_BENCH_QUICK").is_some();
    if !only_daemon {
        ns_per_packet();
    }
    if !quick && !only_daemon {
        veth_throughput();
    }
    if !quick {
        daemon_cost();
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
    pins: support::PinDir,
    state: std::path::PathBuf,
    daemon: Option<std::process::Child>,
    token: String,
}

impl DaemonLab {
    fn start(tag: &str) -> DaemonLab {
        let ns = format!("tmbd-{tag}-{}", std::process::id());
        let state = std::path::PathBuf::from(format!("/tmp/tmbench-daemon-{tag}-{}", std::process::id()));
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(std::process::Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&state);
        let mut lab = DaemonLab {
            ns,
            pins: support::PinDir::new(&format!("daemon-{tag}")),
            state,
            daemon: None,
            token: String::new(),
        };
        sh(&["ip", "netns", "add", &lab.ns]);
        sh(&["ip", "-n", &lab.ns, "link", "set", "lo", "up"]);
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
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.state);
        // The pin directory, if detach left it, goes with `self.pins`.
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
