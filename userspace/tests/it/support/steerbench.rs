//! Helpers of the steering benchmarks (userspace/tests/bench.rs, sections 4 and 5): bulk fills
//! of the steering maps pinned by a `Harness`, their counters, and cleanup guards for the
//! forwarding lab (an iptables DNAT rule, a process, a scratch directory).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key};
use tunmeter_common::{
    AddrKey, BypassValue, FlowKey, FlowNat, FwdKey, FwdRule, MAP_FWD_FLOWS, MAP_FWD_RULES, MAP_REDIRECT_BYPASS,
    MAP_REDIRECT_SOURCES, MAP_RULE_COUNTERS, MAP_STEER_STATS, OutcomeCounter, RedirectRule, RuleCounters, SteerEvent,
};

/// An IPv4 address as the maps hold it (packet byte order in a `u32`).
pub fn addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// The LPM key of the redirect maps for the IPv4 prefix `a/len` (IPv4-mapped).
pub fn lpm_v4(a: Ipv4Addr, len: u8) -> Key<AddrKey> {
    let mut k = [0u8; 16];
    k[10] = 0xff;
    k[11] = 0xff;
    k[12..].copy_from_slice(&a.octets());
    Key::new(AddrKey::v4_prefix_len(len), AddrKey { addr: k })
}

/// A flow-table key (the reply's view: device -> customer).
pub fn flow_key(device: Ipv4Addr, device_port: u16, customer: Ipv4Addr, customer_port: u16, proto: u8) -> FlowKey {
    FlowKey {
        device_addr: addr(device),
        customer_addr: addr(customer),
        device_port_be: device_port.to_be(),
        customer_port_be: customer_port.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// The steering maps pinned in one directory, written directly (the CLI's `SteerMaps` scans
/// every rule to find a free id, which is quadratic for 10,000 rules).
pub struct SteerTables {
    dir: PathBuf,
}

impl SteerTables {
    pub fn new(pins: &Path) -> SteerTables {
        SteerTables { dir: pins.to_owned() }
    }

    fn open(&self, name: &str) -> Map {
        let data = MapData::from_pin(self.dir.join(name))
            .unwrap_or_else(|e| panic!("steering map {name} not pinned in {}: {e}", self.dir.display()));
        Map::from_map_data(data).unwrap()
    }

    /// Insert forward rules: (proto, public port, public address or None, device, device port,
    /// rule id).
    pub fn add_forwards(&self, rules: impl IntoIterator<Item = (u8, u16, Option<Ipv4Addr>, Ipv4Addr, u16, u32)>) {
        let mut m: HashMap<MapData, FwdKey, FwdRule> = HashMap::try_from(self.open(MAP_FWD_RULES)).unwrap();
        for (proto, port, public, device, device_port, rule_id) in rules {
            let key = FwdKey { proto, _pad: 0, port_be: port.to_be() };
            let rule = FwdRule {
                public_addr: public.map_or(0, addr),
                device_addr: addr(device),
                device_port_be: device_port.to_be(),
                _pad: 0,
                rule_id,
                flags: 0,
                _pad2: 0,
            };
            m.insert(&key, &rule, 0).unwrap();
        }
    }

    pub fn forward_count(&self) -> usize {
        let m: HashMap<MapData, FwdKey, FwdRule> = HashMap::try_from(self.open(MAP_FWD_RULES)).unwrap();
        m.keys().count()
    }

    /// Insert flow-table entries: (key, public address, public port, rule id).
    pub fn add_flows(&self, flows: impl IntoIterator<Item = (FlowKey, Ipv4Addr, u16, u32)>) {
        let mut m: HashMap<MapData, FlowKey, FlowNat> = HashMap::try_from(self.open(MAP_FWD_FLOWS)).unwrap();
        for (key, public, port, rule_id) in flows {
            let nat = FlowNat { public_addr: addr(public), public_port_be: port.to_be(), _pad: 0, rule_id, _pad2: 0 };
            m.insert(&key, &nat, 0).unwrap();
        }
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowNat> {
        let m: HashMap<MapData, FlowKey, FlowNat> = HashMap::try_from(self.open(MAP_FWD_FLOWS)).unwrap();
        m.get(key, 0).ok()
    }

    pub fn flow_count(&self) -> usize {
        let m: HashMap<MapData, FlowKey, FlowNat> = HashMap::try_from(self.open(MAP_FWD_FLOWS)).unwrap();
        m.keys().count()
    }

    /// Insert redirect rules: (source, prefix length, proxy port, rule id).
    pub fn add_redirects(&self, rules: impl IntoIterator<Item = (Ipv4Addr, u8, u16, u32)>) {
        let mut t: LpmTrie<MapData, AddrKey, RedirectRule> =
            LpmTrie::try_from(self.open(MAP_REDIRECT_SOURCES)).unwrap();
        for (source, len, proxy_port, rule_id) in rules {
            let rule = RedirectRule { proxy_port_be: proxy_port.to_be(), _pad: 0, rule_id, flags: 0 };
            t.insert(&lpm_v4(source, len), &rule, 0).unwrap();
        }
    }

    pub fn redirect_count(&self) -> usize {
        let t: LpmTrie<MapData, AddrKey, RedirectRule> = LpmTrie::try_from(self.open(MAP_REDIRECT_SOURCES)).unwrap();
        t.keys().count()
    }

    pub fn add_bypass(&self, nets: impl IntoIterator<Item = (Ipv4Addr, u8)>) {
        let mut t: LpmTrie<MapData, AddrKey, BypassValue> = LpmTrie::try_from(self.open(MAP_REDIRECT_BYPASS)).unwrap();
        for (a, len) in nets {
            t.insert(&lpm_v4(a, len), &BypassValue { flags: 0 }, 0).unwrap();
        }
    }

    /// (packets, bytes) of a steering event, all CPUs.
    pub fn event(&self, e: SteerEvent) -> (u64, u64) {
        let a: PerCpuArray<MapData, OutcomeCounter> = PerCpuArray::try_from(self.open(MAP_STEER_STATS)).unwrap();
        a.get(&(e as u32), 0).unwrap().iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }

    /// Every event with a non-zero packet count: name -> packets.
    pub fn events(&self) -> std::collections::BTreeMap<&'static str, u64> {
        SteerEvent::ALL.iter().map(|e| (e.name(), self.event(*e).0)).filter(|(_, p)| *p > 0).collect()
    }

    /// A rule's counters, all CPUs.
    pub fn rule(&self, id: u32) -> RuleCounters {
        let a: PerCpuArray<MapData, RuleCounters> = PerCpuArray::try_from(self.open(MAP_RULE_COUNTERS)).unwrap();
        a.get(&id, 0).unwrap().iter().fold(RuleCounters::default(), |s, c| s.plus(*c))
    }
}

/// `cmd args...` inside network namespace `ns` (`ip netns exec`); stdout, panics with stderr.
pub fn ns_sh(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"));
    assert!(out.status.success(), "{ns}: {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
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
