//! The rules in the pinned maps: list with counters, add, delete, and the daemon's syncs of
//! config rules and bypass addresses. Every change holds a lock, so the CLI, the API and the
//! daemon never hand out one rule id twice.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    util::nr_cpus,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use nix::fcntl::Flock;
use serde::Serialize;
use tracing::{info, warn};
use tunmeter_common::{
    AddrKey, BypassValue, ClientKey, FwdKey, FwdRule, MAP_FWD_RULES, MAP_REDIRECT_BYPASS, MAP_REDIRECT_SOURCES,
    MAP_RULE_COUNTERS, MAP_STEER_STATS, MAX_BYPASS, MAX_RULES, OutcomeCounter, REDIRECT_UNPARSED_PASS,
    RULE_FROM_CONFIG, RedirectRule, RuleCounters, SteerEvent,
};

use crate::types::{Allow, ForwardSpec, Proto, RedirectSpec, Unparsed};

/// How long a rule change waits for another one (they take milliseconds) before it fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error(
        "no steering maps under {0}: start the daemon once with this pin directory (it creates them), or pass --pin-dir"
    )]
    NoMaps(PathBuf),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("a forward rule for {proto}/{port} exists already (delete it first)")]
    ForwardExists { proto: Proto, port: u16 },
    #[error("no forward rule for {proto}/{port}")]
    NoForward { proto: Proto, port: u16 },
    #[error("a redirect rule for {0} exists already (delete it first)")]
    RedirectExists(IpNet),
    #[error("no redirect rule for {0}")]
    NoRedirect(IpNet),
    #[error("all {MAX_RULES} rule ids are in use")]
    NoFreeId,
    #[error("{0} bypass entries; at most {MAX_BYPASS} fit the bypass map")]
    TooManyBypass(usize),
    #[error("steering lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("cannot determine the number of CPUs: {0}")]
    Cpus(String),
    #[error(transparent)]
    Rule(#[from] crate::types::RuleError),
    #[error(
        "{proto} port {port} is in use on this host ({listener}): a forward rule would take its traffic (force it with --force / force = true)"
    )]
    PortInUse { proto: Proto, port: u16, listener: String },
}

/// Where a rule came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The config file: re-applied and pruned at each daemon start.
    Config,
    /// `tunmeter steer add` or the API: kept until deleted.
    Runtime,
}

impl Origin {
    fn flags(self) -> u32 {
        match self {
            Origin::Config => RULE_FROM_CONFIG,
            Origin::Runtime => 0,
        }
    }
    fn of(flags: u32) -> Origin {
        if flags & RULE_FROM_CONFIG != 0 { Origin::Config } else { Origin::Runtime }
    }
}

/// Counter sums of one rule (all CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RuleTotals {
    pub to_target_bytes: u64,
    pub to_target_packets: u64,
    pub from_target_bytes: u64,
    pub from_target_packets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForwardView {
    pub id: u32,
    pub proto: Proto,
    pub public_port: u16,
    pub public_address: Option<Ipv4Addr>,
    pub device: SocketAddrV4,
    pub origin: Origin,
    #[serde(flatten)]
    pub counters: RuleTotals,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedirectView {
    pub id: u32,
    pub source: IpNet,
    pub proxy_port: u16,
    pub origin: Origin,
    pub unparsed: Unparsed,
    pub allow: Allow,
    pub to_target_bytes: u64,
    pub to_target_packets: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCount {
    pub packets: u64,
    pub bytes: u64,
}

/// Everything `tunmeter steer list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct SteerList {
    pub forward: Vec<ForwardView>,
    pub redirect: Vec<RedirectView>,
    pub bypass: Vec<IpNet>,
    pub events: BTreeMap<&'static str, EventCount>,
}

/// The steering maps pinned under one directory.
pub struct SteerMaps {
    dir: PathBuf,
}

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> SteerError {
    move |source| SteerError::Map { name, source }
}

impl SteerMaps {
    pub fn new(pin_dir: &Path) -> Self {
        SteerMaps { dir: pin_dir.to_owned() }
    }

    pub(super) fn open(&self, name: &'static str) -> Result<MapData, SteerError> {
        let path = self.dir.join(name);
        if !path.exists() {
            return Err(SteerError::NoMaps(self.dir.clone()));
        }
        MapData::from_pin(path).map_err(map_err(name))
    }

    pub(super) fn fwd_rules(&self) -> Result<HashMap<MapData, FwdKey, FwdRule>, SteerError> {
        HashMap::try_from(Map::HashMap(self.open(MAP_FWD_RULES)?)).map_err(map_err(MAP_FWD_RULES))
    }

    fn redirects(&self) -> Result<LpmTrie<MapData, AddrKey, RedirectRule>, SteerError> {
        LpmTrie::try_from(Map::LpmTrie(self.open(MAP_REDIRECT_SOURCES)?)).map_err(map_err(MAP_REDIRECT_SOURCES))
    }

    fn bypass(&self) -> Result<LpmTrie<MapData, AddrKey, BypassValue>, SteerError> {
        LpmTrie::try_from(Map::LpmTrie(self.open(MAP_REDIRECT_BYPASS)?)).map_err(map_err(MAP_REDIRECT_BYPASS))
    }

    fn counters(&self) -> Result<PerCpuArray<MapData, RuleCounters>, SteerError> {
        PerCpuArray::try_from(Map::PerCpuArray(self.open(MAP_RULE_COUNTERS)?)).map_err(map_err(MAP_RULE_COUNTERS))
    }

    fn stats(&self) -> Result<PerCpuArray<MapData, OutcomeCounter>, SteerError> {
        PerCpuArray::try_from(Map::PerCpuArray(self.open(MAP_STEER_STATS)?)).map_err(map_err(MAP_STEER_STATS))
    }

    /// Serialise rule changes (CLI, API, daemon). One host-wide lock file (not one per pin
    /// directory, which would pile up): changes are rare and short.
    pub(super) fn lock(&self) -> Result<Flock<File>, SteerError> {
        let base = if Path::new("/run/lock").is_dir() { PathBuf::from("/run/lock") } else { std::env::temp_dir() };
        let path = base.join("tunmeter-steer.lock");
        super::host::lock_private(&path, LOCK_WAIT).map_err(|source| SteerError::Lock { path, source })
    }

    fn rule_totals(&self, counters: &PerCpuArray<MapData, RuleCounters>, id: u32) -> RuleTotals {
        let c = counters
            .get(&id, 0)
            .map_or(RuleCounters::default(), |v| v.iter().fold(RuleCounters::default(), |s, c| s.plus(*c)));
        RuleTotals {
            to_target_bytes: c.to_target_bytes,
            to_target_packets: c.to_target_packets,
            from_target_bytes: c.from_target_bytes,
            from_target_packets: c.from_target_packets,
        }
    }

    pub fn list(&self) -> Result<SteerList, SteerError> {
        let counters = self.counters()?;
        let mut forward: Vec<ForwardView> = self
            .fwd_rules()?
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, r)| {
                Some(ForwardView {
                    id: r.rule_id,
                    proto: Proto::from_number(k.proto)?,
                    public_port: u16::from_be(k.port_be),
                    public_address: (r.public_addr != 0).then(|| Ipv4Addr::from(r.public_addr.to_ne_bytes())),
                    device: SocketAddrV4::new(
                        Ipv4Addr::from(r.device_addr.to_ne_bytes()),
                        u16::from_be(r.device_port_be),
                    ),
                    origin: Origin::of(r.flags),
                    counters: self.rule_totals(&counters, r.rule_id),
                })
            })
            .collect();
        forward.sort_by_key(|f| (f.proto, f.public_port));
        let mut redirect: Vec<RedirectView> = self
            .redirects()?
            .iter()
            .filter_map(Result::ok)
            .map(|(k, r)| {
                let t = self.rule_totals(&counters, r.rule_id);
                RedirectView {
                    id: r.rule_id,
                    source: net_of(&k),
                    proxy_port: u16::from_be(r.proxy_port_be),
                    origin: Origin::of(r.flags),
                    unparsed: if r.flags & REDIRECT_UNPARSED_PASS != 0 { Unparsed::Pass } else { Unparsed::Drop },
                    allow: Allow::from_flags(r.flags),
                    to_target_bytes: t.to_target_bytes,
                    to_target_packets: t.to_target_packets,
                }
            })
            .collect();
        redirect.sort_by_key(|r| r.source);
        let mut bypass: Vec<IpNet> = self.bypass()?.keys().filter_map(Result::ok).map(|k| net_of(&k)).collect();
        bypass.sort();
        let stats = self.stats()?;
        let events = SteerEvent::ALL
            .iter()
            .map(|e| {
                let mut c = EventCount::default();
                if let Ok(v) = stats.get(&(*e as u32), 0) {
                    for s in v.iter() {
                        c.packets += s.packets;
                        c.bytes += s.bytes;
                    }
                }
                (e.name(), c)
            })
            .collect();
        Ok(SteerList { forward, redirect, bypass, events })
    }

    /// The redirect rules without their counters: source -> (proxy port, origin).
    pub fn redirect_sources(&self) -> Result<BTreeMap<IpNet, (u16, Origin)>, SteerError> {
        Ok(self
            .redirects()?
            .iter()
            .filter_map(Result::ok)
            .map(|(k, r)| (net_of(&k), (u16::from_be(r.proxy_port_be), Origin::of(r.flags))))
            .collect())
    }

    /// Ids in use by any rule.
    fn used_ids(&self) -> Result<BTreeSet<u32>, SteerError> {
        let mut ids: BTreeSet<u32> = self.fwd_rules()?.iter().filter_map(Result::ok).map(|(_, r)| r.rule_id).collect();
        ids.extend(self.redirects()?.iter().filter_map(Result::ok).map(|(_, r)| r.rule_id));
        Ok(ids)
    }

    /// The smallest free id, with its counters zeroed (a reused id must not inherit counts).
    fn new_id(&self) -> Result<u32, SteerError> {
        let used = self.used_ids()?;
        let id = (0..MAX_RULES).find(|i| !used.contains(i)).ok_or(SteerError::NoFreeId)?;
        let ncpus = nr_cpus().map_err(|(_, e)| SteerError::Cpus(e.to_string()))?;
        let zero = PerCpuValues::try_from(vec![RuleCounters::default(); ncpus.get() as usize])
            .map_err(|e| SteerError::Cpus(e.to_string()))?;
        self.counters()?.set(id, zero, 0).map_err(map_err(MAP_RULE_COUNTERS))?;
        Ok(id)
    }

    pub fn add_forward(&self, spec: &ForwardSpec, origin: Origin) -> Result<u32, SteerError> {
        let _lock = self.lock()?;
        let id = self.add_forward_locked(spec, origin, false)?;
        self.sync_devices()?;
        Ok(id)
    }

    fn add_forward_locked(&self, spec: &ForwardSpec, origin: Origin, replace: bool) -> Result<u32, SteerError> {
        let mut rules = self.fwd_rules()?;
        let key = fwd_key(spec.proto, spec.public_port);
        let existing = rules.get(&key, 0).ok();
        let id = match existing {
            Some(r) if replace => r.rule_id,
            Some(_) => return Err(SteerError::ForwardExists { proto: spec.proto, port: spec.public_port }),
            None => self.new_id()?,
        };
        let mut value = FwdRule {
            public_addr: spec.public_address.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            device_addr: u32::from_ne_bytes(spec.device.ip().octets()),
            device_port_be: spec.device.port().to_be(),
            _pad: 0,
            rule_id: id,
            flags: origin.flags(),
            generation: existing.map_or(0, |r| r.generation),
        };
        if existing == Some(value) {
            return Ok(id);
        }
        self.unskip_port(spec.public_port)?;
        value.generation = self.next_rule_gen(id)?;
        rules.insert(&key, &value, 0).map_err(map_err(MAP_FWD_RULES))?;
        info!(id, proto = %spec.proto, port = spec.public_port, device = %spec.device, ?origin, "forward rule set");
        Ok(id)
    }

    pub fn del_forward(&self, proto: Proto, port: u16) -> Result<(), SteerError> {
        let _lock = self.lock()?;
        let mut rules = self.fwd_rules()?;
        let id = rules.get(&fwd_key(proto, port), 0).map(|r| r.rule_id);
        match rules.remove(&fwd_key(proto, port)) {
            Ok(()) => {
                info!(%proto, port, "forward rule deleted");
                if let Ok(id) = id {
                    self.next_rule_gen(id)?;
                }
                self.sync_devices()
            }
            Err(MapError::KeyNotFound) => Err(SteerError::NoForward { proto, port }),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Err(SteerError::NoForward { proto, port })
            }
            Err(e) => Err(map_err(MAP_FWD_RULES)(e)),
        }
    }

    pub fn add_redirect(&self, spec: &RedirectSpec, origin: Origin) -> Result<u32, SteerError> {
        let _lock = self.lock()?;
        self.add_redirect_locked(spec, origin, false)
    }

    fn add_redirect_locked(&self, spec: &RedirectSpec, origin: Origin, replace: bool) -> Result<u32, SteerError> {
        let mut trie = self.redirects()?;
        let key = addr_key(&spec.source);
        let existing = trie.iter().filter_map(Result::ok).find(|(k, _)| same_key(k, &key)).map(|(_, r)| r);
        let id = match existing {
            Some(r) if replace => r.rule_id,
            Some(_) => return Err(SteerError::RedirectExists(spec.source)),
            None => self.new_id()?,
        };
        let flags = origin.flags() | spec.policy_flags();
        let value = RedirectRule { proxy_port_be: spec.proxy_port.to_be(), _pad: 0, rule_id: id, flags };
        if existing == Some(value) {
            return Ok(id);
        }
        self.set_redirect_empty(false)?;
        trie.insert(&key, &value, 0).map_err(map_err(MAP_REDIRECT_SOURCES))?;
        info!(id, source = %spec.source, proxy_port = spec.proxy_port, ?origin, unparsed = ?spec.unparsed,
            allow = ?spec.allow.names(), "redirect rule set");
        Ok(id)
    }

    pub fn del_redirect(&self, source: IpNet) -> Result<(), SteerError> {
        let _lock = self.lock()?;
        let mut trie = self.redirects()?;
        let key = addr_key(&source.trunc());
        if !trie.iter().filter_map(Result::ok).any(|(k, _)| same_key(&k, &key)) {
            return Err(SteerError::NoRedirect(source));
        }
        trie.remove(&key).map_err(map_err(MAP_REDIRECT_SOURCES))?;
        info!(%source, "redirect rule deleted");
        self.set_redirect_empty(trie.keys().next().is_none())
    }

    /// Make the config's rules present (updated in place, keeping their ids and counters) and
    /// remove config rules no longer in the config. Runtime rules stay, unless the config now
    /// claims the same key: then the config wins, with a warning.
    pub fn sync_config(&self, forward: &[ForwardSpec], redirect: &[RedirectSpec]) -> Result<(), SteerError> {
        let _lock = self.lock()?;
        let wanted_fwd: BTreeSet<FwdKey> = forward.iter().map(|f| fwd_key(f.proto, f.public_port)).collect();
        let mut rules = self.fwd_rules()?;
        let stale: Vec<(FwdKey, FwdRule)> = rules
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, r)| Origin::of(r.flags) == Origin::Config && !wanted_fwd.contains(k))
            .collect();
        for (k, r) in stale {
            rules.remove(&k).map_err(map_err(MAP_FWD_RULES))?;
            self.next_rule_gen(r.rule_id)?;
            info!(id = r.rule_id, port = u16::from_be(k.port_be), "forward rule removed: no longer in the config");
        }
        for f in forward {
            if let Ok(r) = rules.get(&fwd_key(f.proto, f.public_port), 0)
                && Origin::of(r.flags) == Origin::Runtime
            {
                warn!(proto = %f.proto, port = f.public_port, "the config's forward rule replaces a runtime rule");
            }
            self.add_forward_locked(f, Origin::Config, true)?;
        }
        self.sync_devices()?;
        let wanted_red: Vec<Key<AddrKey>> = redirect.iter().map(|r| addr_key(&r.source)).collect();
        let mut trie = self.redirects()?;
        let stale: Vec<Key<AddrKey>> = trie
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, r)| Origin::of(r.flags) == Origin::Config && !wanted_red.iter().any(|w| same_key(w, k)))
            .map(|(k, _)| k)
            .collect();
        for k in stale {
            trie.remove(&k).map_err(map_err(MAP_REDIRECT_SOURCES))?;
            info!(source = %net_of(&k), "redirect rule removed: no longer in the config");
        }
        for r in redirect {
            self.add_redirect_locked(r, Origin::Config, true)?;
        }
        self.set_redirect_empty(trie.keys().next().is_none())
    }

    /// Make the bypass map hold exactly `nets`.
    pub fn sync_bypass(&self, nets: &BTreeSet<IpNet>) -> Result<bool, SteerError> {
        if nets.len() > MAX_BYPASS as usize {
            return Err(SteerError::TooManyBypass(nets.len()));
        }
        let _lock = self.lock()?;
        let mut trie = self.bypass()?;
        let have: Vec<Key<AddrKey>> = trie.keys().filter_map(Result::ok).collect();
        let want: Vec<Key<AddrKey>> = nets.iter().map(addr_key).collect();
        let mut changed = false;
        for k in &have {
            if !want.iter().any(|w| same_key(w, k)) {
                trie.remove(k).map_err(map_err(MAP_REDIRECT_BYPASS))?;
                changed = true;
            }
        }
        for k in &want {
            if !have.iter().any(|h| same_key(h, k)) {
                trie.insert(k, &BypassValue { flags: 1 }, 0).map_err(map_err(MAP_REDIRECT_BYPASS))?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Public ports of every forward rule (for the reserved-ports sysctl).
    pub fn forward_ports(&self) -> Result<BTreeSet<u16>, SteerError> {
        Ok(self.fwd_rules()?.keys().filter_map(Result::ok).map(|k| u16::from_be(k.port_be)).collect())
    }
}

fn fwd_key(proto: Proto, port: u16) -> FwdKey {
    FwdKey { proto: proto.number(), _pad: 0, port_be: port.to_be() }
}

fn same_key(a: &Key<AddrKey>, b: &Key<AddrKey>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

/// LPM key of a subnet (IPv4 mapped into IPv6 as in the client map).
pub fn addr_key(net: &IpNet) -> Key<AddrKey> {
    match net {
        IpNet::V4(n) => {
            Key::new(AddrKey::v4_prefix_len(n.prefix_len()), AddrKey { addr: ClientKey::v4(n.network().octets()).addr })
        }
        IpNet::V6(n) => Key::new(AddrKey::v6_prefix_len(n.prefix_len()), AddrKey { addr: n.network().octets() }),
    }
}

/// The subnet an LPM key stands for.
pub fn net_of(k: &Key<AddrKey>) -> IpNet {
    let data = k.data();
    let ck = ClientKey::v6(data.addr);
    match ck.as_v4() {
        Some(v4) if k.prefix_len() >= 96 => {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(v4), (k.prefix_len() - 96) as u8).expect("prefix <= 32"))
        }
        _ => IpNet::V6(Ipv6Net::new(Ipv6Addr::from(data.addr), k.prefix_len().min(128) as u8).expect("prefix <= 128")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_keys_round_trip_subnets() {
        for s in ["10.8.0.0/24", "10.8.0.5/32", "0.0.0.0/0", "fd00:8::/64", "fd00:8::3/128", "::/0"] {
            let n: IpNet = s.parse().unwrap();
            assert_eq!(net_of(&addr_key(&n)), n, "{s}");
        }
        assert_eq!(addr_key(&"10.8.0.0/24".parse().unwrap()).prefix_len(), 120);
    }
}
