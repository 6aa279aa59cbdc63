//! Section 5: forwarded TCP throughput through the lab's server, a tunmeter forward rule vs
//! the same forwarding by iptables DNAT (alternating runs, ratio of medians), with the DNAT rule
//! and the cleanup guards this needs.

use super::*;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::support::ns_sh;

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

pub(super) fn steer_throughput() {
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
    let (mut tm_stats, mut nat_stats) = (super::bpfstats::Tally::default(), super::bpfstats::Tally::default());
    let stats = super::bpfstats::StatsOn::new();
    let (mut tm_bytes, mut tm_counted_to, mut tm_counted_from, mut dnat_conns) = (0u64, 0u64, 0u64, 0u64);
    for pair in 0..FWD_PAIRS {
        // Alternate which goes first.
        for tunmeter_run in if pair % 2 == 0 { [true, false] } else { [false, true] } {
            assert_eq!(nft_ruleset(&srv), "", "no netfilter table in the server namespace between runs");
            if tunmeter_run {
                steer_cli(
                    &srv,
                    pins.path(),
                    // The device is an Ethernet client, outside the VPN subnets: forced.
                    &["add", "forward", "--proto", "tcp", "--public-port", &pport, "--device", &device, "--force"],
                );
                let before = super::bpfstats::counters();
                let (gbps, bytes) = iperf_to(&cust.ns, &public, FWD_PUBLIC_PORT, FWD_SECS);
                tm_stats.window(&srv, &["eth0", "tun0"], &before);
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
                let forwarded = |l: &serde_json::Value| {
                    l["events"][tunmeter_common::SteerEvent::Forwarded.name()]["packets"].as_u64().unwrap()
                };
                let before = forwarded(&steer_json(&srv, pins.path()));
                let rule = DnatRule::add(&srv, "tcp", FWD_PUBLIC_PORT, &device);
                let runs_before = super::bpfstats::counters();
                let (gbps, _) = iperf_to(&cust.ns, &public, FWD_PUBLIC_PORT, FWD_SECS);
                nat_stats.window(&srv, &["eth0", "tun0"], &runs_before);
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
    drop(stats);
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
    println!(
        "The programs' own cost per packet under this traffic (kernel BPF run-time statistics, summed over the \
         runs of each kind). Every packet crosses the server's eth0 twice: in and out on the way to the device, \
         in and out on the way back. With the forward rule, eth0 ingress runs the forward (customer to public \
         port: rule and flow hit, rewrite) and the device's replies (no rule), eth0 egress the translated packet \
         (counting) and the reply's translation back (flow hit, rewrite). With DNAT, the same programs see the \
         same packets and only count (rule and flow misses)."
    );
    println!();
    println!("With the tunmeter forward rule:");
    println!();
    let label = |_: &str, hook: &str| {
        if hook.contains("ingress") { "forward in + replies in" } else { "forwarded out + replies translated out" }
    };
    tm_stats.print(label);
    println!("With iptables DNAT (tunmeter counting only):");
    println!();
    nat_stats.print(|_, hook| if hook.contains("ingress") { "both directions in" } else { "both directions out" });
}

/// An iptables DNAT rule in a namespace's `nat` table (`PREROUTING`), for comparison with a
/// forward rule. Dropping it deletes the rule and the whole `nat` table (iptables-nft keeps the
/// table and its base chains otherwise, and a registered NAT hook keeps conntrack running for
/// every packet of the namespace).
pub struct DnatRule {
    ns: String,
    spec: Vec<String>,
}

impl DnatRule {
    /// `iptables -t nat -A PREROUTING -p PROTO --dport PORT -j DNAT --to-destination TO`.
    pub fn add(ns: &str, proto: &str, port: u16, to: &str) -> DnatRule {
        let spec: Vec<String> = ["PREROUTING", "-p", proto, "--dport", &port.to_string(), "-j", "DNAT"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--to-destination".to_string(), to.to_string()])
            .collect();
        let r = DnatRule { ns: ns.into(), spec };
        let mut args = vec!["iptables", "-w", "-t", "nat", "-A"];
        args.extend(r.spec.iter().map(String::as_str));
        ns_sh(ns, &args);
        r
    }

    /// Packets the rule matched (the NAT table sees the first packet of each connection).
    pub fn packets(&self) -> u64 {
        let out = ns_sh(&self.ns, &["iptables", "-w", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"]);
        out.lines()
            .filter(|l| l.contains("DNAT"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for DnatRule {
    fn drop(&mut self) {
        let mut args = vec!["netns", "exec", &self.ns, "iptables", "-w", "-t", "nat", "-D"];
        args.extend(self.spec.iter().map(String::as_str));
        let quiet = |c: &mut Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        quiet(Command::new("ip").args(&args));
        quiet(Command::new("ip").args(["netns", "exec", &self.ns, "nft", "delete", "table", "ip", "nat"]));
    }
}

/// The namespace's nftables ruleset (iptables-nft rules included), empty when nothing hooks
/// netfilter there.
pub fn nft_ruleset(ns: &str) -> String {
    ns_sh(ns, &["nft", "list", "ruleset"]).trim().to_string()
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        let p = PathBuf::from(format!("/tmp/tmbench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        ScratchDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
