//! Section 7: per-client counting by tunmeter, by nftables set-element counters and by
//! iptables rules (one per client), side by side at 1k, 10k and 100k clients: TCP and UDP
//! throughput over veth, CPU per packet, rule load time, and the time to read every counter.
//! What each setup is exactly: `nftables`, `iptables`, `tunmeter` below.

use std::time::Instant;

use super::*;

const COUNTS: [u32; 3] = [1_000, 10_000, 100_000];
const ROUNDS: usize = 3;
const SECS: u32 = 3;
const SERVER_NS: &str = "tmbalts";
const CLIENT_NS: &str = "tmbaltc";
const SERVER_IP: &str = "10.9.0.1";
/// The measured client: the last of every list.
const CLIENT_IP: &str = "10.9.0.2";
/// iptables counts as unusable at a client count where its rules take longer than this to
/// load or where its TCP throughput falls under a tenth of no filter; larger counts are skipped.
const IPTABLES_LOAD_LIMIT: Duration = Duration::from_secs(120);

/// The N-1 other clients: 10.10.0.0 and up.
fn other_clients(n: u32) -> impl Iterator<Item = std::net::Ipv4Addr> {
    (0..n - 1).map(|i| std::net::Ipv4Addr::from(0x0a0a_0000u32 + i))
}

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    None,
    Tunmeter,
    Nftables,
    Iptables,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::None => "no filter",
            Setup::Tunmeter => "tunmeter",
            Setup::Nftables => "nftables set counters",
            Setup::Iptables => "iptables rule per client",
        }
    }
}

/// What one setup measured at one client count.
struct Figures {
    setup: Setup,
    load: Option<Duration>,
    gbps: f64,
    kpps: f64,
    cpu_ns: f64,
    read: Option<Duration>,
    prog_ns: Option<f64>,
    note: String,
}

/// Busy ticks of all CPUs (everything but idle and iowait) from /proc/stat.
fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    f.iter().sum::<u64>() - f[3] - f[4]
}

/// Packets the server's eth0 received and sent.
fn eth0_packets() -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-n", SERVER_NS, "-s", "-j", "link", "show", "eth0"])).unwrap();
    let s = &v[0]["stats64"];
    s["rx"]["packets"].as_u64().unwrap() + s["tx"]["packets"].as_u64().unwrap()
}

fn iperf(args: &[&str]) -> serde_json::Value {
    let t = SECS.to_string();
    let mut all = vec!["ip", "netns", "exec", CLIENT_NS, "iperf3", "-c", SERVER_IP, "-t", &t, "-J"];
    all.extend_from_slice(args);
    let out = Command::new(all[0]).args(&all[1..]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if !out.status.success() || v.get("error").is_some() {
        // An iptables walk of 100,000 rules may stall iperf3's control connection: no figure.
        return serde_json::Value::Null;
    }
    v
}

/// (TCP Gbit/s, UDP kpackets/s received, CPU ns per packet in the UDP runs): medians.
fn traffic() -> (f64, f64, f64) {
    let (mut tcp, mut udp, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let v = iperf(&[]);
        tcp.push(v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9);
        let (t0, p0) = (busy_ticks(), eth0_packets());
        let v = iperf(&["-u", "-b", "0", "-l", "64"]);
        let (t1, p1) = (busy_ticks(), eth0_packets());
        let s = &v["end"]["sum"];
        let got = s["packets"].as_u64().unwrap_or(0).saturating_sub(s["lost_packets"].as_u64().unwrap_or(0));
        udp.push(got as f64 / s["seconds"].as_f64().unwrap_or(SECS as f64) / 1e3);
        cpu.push((t1 - t0) as f64 * 1e9 / daemon_lab::clk_tck() / (p1 - p0).max(1) as f64);
    }
    (median(tcp), median(udp), median(cpu))
}

/// Median wall time of three runs of `f`.
fn timed(mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[1]
}

fn in_server(args: &[&str]) -> std::process::Output {
    let ns = format!("--net=/run/netns/{SERVER_NS}");
    Command::new("nsenter").arg(&ns).args(args).output().unwrap()
}

fn nftables(n: u32) -> Figures {
    let mut elems: Vec<String> = other_clients(n).map(|a| a.to_string()).collect();
    elems.push(CLIENT_IP.into());
    let elems = elems.join(", ");
    let rules = format!(
        "table netdev tmalt {{\n\
         set up {{ type ipv4_addr; counter; elements = {{ {elems} }} }}\n\
         set down {{ type ipv4_addr; counter; elements = {{ {elems} }} }}\n\
         chain in {{ type filter hook ingress device eth0 priority 0; ip saddr @up; }}\n\
         chain out {{ type filter hook egress device eth0 priority 0; ip daddr @down; }}\n}}\n"
    );
    let file = std::env::temp_dir().join(format!("tmbench-nft-{}.nft", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let t = Instant::now();
    let out = in_server(&["nft", "-f", file.to_str().unwrap()]);
    let load = t.elapsed();
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "nft -f: {}", String::from_utf8_lossy(&out.stderr));
    let (gbps, kpps, cpu_ns) = traffic();
    let mut counted = 0;
    let read = timed(|| {
        for set in ["up", "down"] {
            let out = in_server(&["nft", "-j", "list", "set", "netdev", "tmalt", set]);
            assert!(out.status.success());
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let elems = v["nftables"][1]["set"]["elem"].as_array().unwrap();
            assert_eq!(elems.len(), n as usize, "every element listed");
            counted = elems
                .iter()
                .find(|e| e["elem"]["val"] == CLIENT_IP)
                .and_then(|e| e["elem"]["counter"]["packets"].as_u64())
                .unwrap_or(0);
        }
    });
    let out = in_server(&["nft", "delete", "table", "netdev", "tmalt"]);
    assert!(out.status.success());
    let note = format!("the client's download element counted {counted} packets");
    Figures { setup: Setup::Nftables, load: Some(load), gbps, kpps, cpu_ns, read: Some(read), prog_ns: None, note }
}

fn iptables(n: u32) -> Option<Figures> {
    let mut rules = String::from(
        "*filter\n:TMUP - [0:0]\n:TMDOWN - [0:0]\n-A INPUT -i eth0 -j TMUP\n-A OUTPUT -o eth0 -j TMDOWN\n",
    );
    for a in other_clients(n).map(|a| a.to_string()).chain([CLIENT_IP.to_string()]) {
        rules.push_str(&format!("-A TMUP -s {a}/32\n-A TMDOWN -d {a}/32\n"));
    }
    rules.push_str("COMMIT\n");
    let file = std::env::temp_dir().join(format!("tmbench-ipt-{}.rules", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let t = Instant::now();
    let limit = IPTABLES_LOAD_LIMIT.as_secs().to_string();
    let out = in_server(&["timeout", &limit, "iptables-restore", file.to_str().unwrap()]);
    let load = t.elapsed();
    let _ = std::fs::remove_file(&file);
    let flush = || {
        for args in [&["iptables", "-F"][..], &["iptables", "-X"]] {
            let _ = in_server(args);
        }
    };
    if !out.status.success() {
        flush();
        return None;
    }
    let (gbps, kpps, cpu_ns) = traffic();
    let mut lines = 0;
    let read = timed(|| {
        let out = in_server(&["iptables-save", "-c"]);
        assert!(out.status.success());
        lines = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("-A TM")).count();
    });
    flush();
    let note = format!("{lines} rules listed with their counters");
    Some(Figures {
        setup: Setup::Iptables,
        load: Some(load),
        gbps,
        kpps,
        cpu_ns,
        read: Some(read),
        prog_ns: None,
        note,
    })
}

fn tunmeter(n: u32) -> Figures {
    let pins = support::PinDir::new("alt");
    let state = std::env::temp_dir().join(format!("tmbench-alt-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut d = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{SERVER_NS}"))
        .args([env!("CARGO_BIN_EXE_tunmeter"), "run", "--egress", "eth0", "--subnet", "10.0.0.0/8"])
        .args(["--max-clients", daemon_lab::DAEMON_MAX_CLIENTS, "--pin-dir"])
        .arg(pins.path())
        .arg("--state-dir")
        .arg(&state)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let map_pin = pins.path().join(tunmeter_common::MAP_CLIENTS);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !map_pin.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(800));
    // The other clients' slots, as the program would have taken them on their first packet.
    let maps = tunmeter::bpf::loader::PinnedMaps::new(pins.path());
    let mut alloc = tunmeter::bpf::slots::SlotAlloc::open(&maps).expect("the daemon's client slots");
    for a in other_clients(n) {
        alloc.admit(&tunmeter_common::ClientKey::v4(a.octets())).expect("a free slot");
    }
    let stats = bpfstats::StatsOn::new();
    let before = bpfstats::counters();
    let (gbps, kpps, cpu_ns) = traffic();
    let mut tally = bpfstats::Tally::default();
    tally.window(SERVER_NS, &["eth0"], &before);
    drop(stats);
    // As the daemon's poll reads them (owners confirmed once, then remembered).
    let mut reader = tunmeter::bpf::slots::SlotReader::open(&maps, false).unwrap();
    reader.for_each(|_, _, _| {}).unwrap();
    let mut entries = 0;
    let read = timed(|| {
        entries = 0;
        reader.for_each(|_, _, _| entries += 1).unwrap();
    });
    let _ = d.kill();
    let _ = d.wait();
    let _ = std::fs::remove_dir_all(pins.path());
    let _ = std::fs::remove_dir_all(&state);
    let note = format!("{entries} entries read");
    Figures {
        setup: Setup::Tunmeter,
        load: None,
        gbps,
        kpps,
        cpu_ns,
        read: Some(read),
        prog_ns: tally.ns_per_run(),
        note,
    }
}

fn none() -> Figures {
    let (gbps, kpps, cpu_ns) = traffic();
    Figures { setup: Setup::None, load: None, gbps, kpps, cpu_ns, read: None, prog_ns: None, note: String::new() }
}

pub(super) fn versus_alternatives() {
    let started = Instant::now();
    let mut namespaces = tunmeter_lab::Namespaces::new();
    for ns in [SERVER_NS, CLIENT_NS] {
        namespaces.add(ns, false).unwrap();
    }
    tunmeter_lab::Namespaces::veth(SERVER_NS, "eth0", "10.9.0.1/24", CLIENT_NS, "eth0", "10.9.0.2/24").unwrap();
    let mut server = Command::new("ip")
        .args(["netns", "exec", SERVER_NS, "iperf3", "-s"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut table: Vec<(u32, Figures)> = Vec::new();
    let mut iptables_usable = true;
    let mut iptables_note = String::new();
    for n in COUNTS {
        let base = none();
        let base_gbps = base.gbps;
        table.push((n, base));
        table.push((n, tunmeter(n)));
        table.push((n, nftables(n)));
        if iptables_usable {
            match iptables(n) {
                Some(f) => {
                    if f.gbps < base_gbps / 10.0 {
                        iptables_usable = false;
                        iptables_note = format!("at {n} clients its TCP throughput is under a tenth of no filter");
                    }
                    table.push((n, f));
                }
                None => {
                    iptables_usable = false;
                    iptables_note = format!("at {n} clients its rules did not load within {IPTABLES_LOAD_LIMIT:?}");
                }
            }
        }
    }
    let _ = server.kill();
    let _ = server.wait();

    println!(
        "## Per-client counting: tunmeter vs nftables vs iptables (iperf3 over veth, {ROUNDS} x {SECS} s per figure, medians)"
    );
    println!(
        "Counting on the server's eth0, both directions, for N clients (the measured client is the last of every \
         list). UDP: 64-byte datagrams, `-b 0`; CPU ns/packet: all CPUs' busy time over the UDP runs (sender, \
         receiver and filter together) per packet through the server's eth0; the difference to no filter is the \
         filter's share. tunmeter's program ns/run: BPF run-time statistics over its runs (both hooks). Read: the \
         time to read every counter once (median of 3)."
    );
    println!();
    println!(
        "| clients | setup | load | TCP Gbit/s | UDP kpps | CPU ns/packet | vs no filter | read all counters | program ns/run | check |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
    let mut base_cpu = 0.0;
    for (n, f) in &table {
        if f.setup == Setup::None {
            base_cpu = f.cpu_ns;
        }
        println!(
            "| {n} | {} | {} | {:.2} | {:.0} | {:.0} | {:+.0} | {} | {} | {} |",
            f.setup.name(),
            ms(f.load),
            f.gbps,
            f.kpps,
            f.cpu_ns,
            f.cpu_ns - base_cpu,
            ms(f.read),
            f.prog_ns.map_or("-".to_string(), |p| format!("{p:.0}")),
            f.note
        );
    }
    println!();
    if iptables_usable {
        println!("iptables stayed usable up to {} clients.", COUNTS[COUNTS.len() - 1]);
    } else {
        println!("iptables became unusable: {iptables_note}; larger counts were not tried.");
    }
    println!("This section took {:.0} s.", started.elapsed().as_secs_f64());
    println!();
}
