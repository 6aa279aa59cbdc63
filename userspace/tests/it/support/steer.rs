//! The steering maps pinned by a `Harness` (or a daemon), read and written directly with
//! explicit rule ids: forward rules, flows, fragments, redirect sources, bypass, rule counters and
//! events. The fixtures and the benchmark use this one type.
//!
//! Not `tunmeter::steer::SteerMaps`: that allocates rule ids by scanning every rule (quadratic
//! for 10,000 rules), takes the host-wide steering lock, and reads neither flows nor fragments.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use ipnet::IpNet;
use tunmeter::steer::table::addr_key;
use tunmeter_common::{
    AddrKey, BypassValue, DeviceKey, FlowIn, FlowInKey, FlowKey, FlowNat, FragKey, FragNat, FwdDevice, FwdKey, FwdRule,
    MAP_FWD_DEVICE_PORTS, MAP_FWD_DEVICES, MAP_FWD_EMPTY, MAP_FWD_FLOWS, MAP_FWD_FRAGS, MAP_FWD_INBOUND,
    MAP_FWD_RULELESS_PORTS, MAP_FWD_RULES, MAP_REDIRECT_BYPASS, MAP_REDIRECT_EMPTY, MAP_REDIRECT_SOURCES,
    MAP_RULE_COUNTERS, MAP_STEER_STATS, OutcomeCounter, RedirectRule, RuleCounters, SteerEvent,
};

use super::packet::ToIp;

/// An IPv4 address as the maps hold it (packet byte order in a `u32`).
pub fn addr(a: impl ToIp) -> u32 {
    match a.to_ip() {
        IpAddr::V4(a) => u32::from_ne_bytes(a.octets()),
        a => panic!("{a}: the steering maps hold IPv4 addresses"),
    }
}

/// A map address back as an `Ipv4Addr`.
pub fn show_addr(a: u32) -> Ipv4Addr {
    Ipv4Addr::from(a.to_ne_bytes())
}

/// A flow-table key (the reply's view: device -> customer).
pub fn flow_key(device: impl ToIp, device_port: u16, customer: impl ToIp, customer_port: u16, proto: u8) -> FlowKey {
    FlowKey {
        device_addr: addr(device),
        customer_addr: addr(customer),
        device_port_be: device_port.to_be(),
        customer_port_be: customer_port.to_be(),
        proto,
        _pad: [0; 3],
    }
}

/// A fragment-table key.
pub fn frag_key(src: impl ToIp, dst: impl ToIp, id: u16, proto: u8, dir: u8) -> FragKey {
    FragKey { src: addr(src), dst: addr(dst), id_be: id.to_be(), proto, dir }
}

/// A forward rule: protocol, public port, public address (None: any), device address and
/// port, rule id.
pub type Forward = (u8, u16, Option<Ipv4Addr>, Ipv4Addr, u16, u32);

/// The steering maps pinned in one directory.
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

    fn fwd_rules(&self) -> HashMap<MapData, FwdKey, FwdRule> {
        HashMap::try_from(self.open(MAP_FWD_RULES)).unwrap()
    }

    fn fwd_flows(&self) -> HashMap<MapData, FlowKey, FlowNat> {
        HashMap::try_from(self.open(MAP_FWD_FLOWS)).unwrap()
    }

    fn redirects(&self) -> LpmTrie<MapData, AddrKey, RedirectRule> {
        LpmTrie::try_from(self.open(MAP_REDIRECT_SOURCES)).unwrap()
    }

    /// One forward rule, addresses as text.
    pub fn add_forward(&self, proto: u8, public_port: u16, public: Option<&str>, device: &str, port: u16, id: u32) {
        let v4 = |a: &str| a.parse::<Ipv4Addr>().unwrap_or_else(|e| panic!("{a}: {e}"));
        self.add_forwards([(proto, public_port, public.map(v4), v4(device), port, id)]);
    }

    /// Insert forward rules, and their devices into `FWD_DEVICES` as `SteerMaps` does.
    pub fn add_forwards(&self, rules: impl IntoIterator<Item = Forward>) {
        let mut m = self.fwd_rules();
        let mut devices: HashMap<MapData, DeviceKey, FwdDevice> =
            HashMap::try_from(self.open(MAP_FWD_DEVICES)).unwrap();
        for (proto, port, public, device, device_port, rule_id) in rules {
            let key = FwdKey { proto, _pad: 0, port_be: port.to_be() };
            let rule = FwdRule {
                public_addr: public.map_or(0, addr),
                device_addr: addr(device),
                device_port_be: device_port.to_be(),
                _pad: 0,
                rule_id,
                flags: 0,
                generation: 0,
            };
            // As `SteerMaps` does: the skip hints go before the rule.
            let mut empty: Array<MapData, u32> = Array::try_from(self.open(MAP_FWD_EMPTY)).unwrap();
            empty.set(0, &0, 0).unwrap();
            let mut free: Array<MapData, u64> = Array::try_from(self.open(MAP_FWD_RULELESS_PORTS)).unwrap();
            let i = (port / 64) as u32;
            let w = free.get(&i, 0).unwrap();
            free.set(i, &(w & !(1 << (port % 64))), 0).unwrap();
            m.insert(&key, &rule, 0).unwrap();
            let dev = DeviceKey { device_addr: rule.device_addr, device_port_be: rule.device_port_be, proto, _pad: 0 };
            devices.insert(&dev, &FwdDevice { rule_id }, 0).unwrap();
            let mut bits: Array<MapData, u64> = Array::try_from(self.open(MAP_FWD_DEVICE_PORTS)).unwrap();
            let i = (device_port / 64) as u32;
            let w = bits.get(&i, 0).unwrap();
            bits.set(i, &(w | 1 << (device_port % 64)), 0).unwrap();
        }
    }

    /// `FWD_DEVICES` as (device address, device port, protocol), sorted.
    pub fn devices(&self) -> Vec<(Ipv4Addr, u16, u8)> {
        let m: HashMap<MapData, DeviceKey, FwdDevice> = HashMap::try_from(self.open(MAP_FWD_DEVICES)).unwrap();
        let mut v: Vec<(Ipv4Addr, u16, u8)> = m
            .keys()
            .map(Result::unwrap)
            .map(|k| (show_addr(k.device_addr), u16::from_be(k.device_port_be), k.proto))
            .collect();
        v.sort();
        v
    }

    /// The ports whose bit is set in `FWD_DEVICE_PORTS`.
    pub fn device_ports(&self) -> Vec<u16> {
        let bits: Array<MapData, u64> = Array::try_from(self.open(MAP_FWD_DEVICE_PORTS)).unwrap();
        (0..=u16::MAX).filter(|p| bits.get(&(*p as u32 / 64), 0).unwrap() & (1 << (p % 64)) != 0).collect()
    }

    pub fn forward_count(&self) -> usize {
        self.fwd_rules().keys().count()
    }

    /// Insert flow-table entries: (key, public address, public port, rule id).
    pub fn add_flows(&self, flows: impl IntoIterator<Item = (FlowKey, Ipv4Addr, u16, u32)>) {
        let mut m = self.fwd_flows();
        for (key, public, port, rule_id) in flows {
            let nat = FlowNat { public_addr: addr(public), public_port_be: port.to_be(), _pad: 0, rule_id, _pad2: 0 };
            m.insert(&key, &nat, 0).unwrap();
        }
    }

    /// How many entries `FWD_INBOUND` (established TCP flows, customer side) holds.
    pub fn inbound_flows(&self) -> usize {
        let m: HashMap<MapData, FlowInKey, FlowIn> = HashMap::try_from(self.open(MAP_FWD_INBOUND)).unwrap();
        m.keys().count()
    }

    /// Every flow, sorted by ports, protocol and customer.
    pub fn flows(&self) -> Vec<(FlowKey, FlowNat)> {
        let mut v: Vec<(FlowKey, FlowNat)> = self.fwd_flows().iter().map(Result::unwrap).collect();
        v.sort_by_key(|(k, _)| (k.device_port_be, k.customer_port_be, k.proto, k.customer_addr));
        v
    }

    pub fn flow(&self, key: &FlowKey) -> Option<FlowNat> {
        self.fwd_flows().get(key, 0).ok()
    }

    pub fn frags(&self) -> Vec<(FragKey, FragNat)> {
        let m: HashMap<MapData, FragKey, FragNat> = HashMap::try_from(self.open(MAP_FWD_FRAGS)).unwrap();
        m.iter().map(Result::unwrap).collect()
    }

    /// One redirect rule: source subnet as text, proxy port, rule id.
    pub fn add_redirect(&self, source: &str, proxy_port: u16, rule_id: u32) {
        self.add_redirects([(source.parse().unwrap_or_else(|e| panic!("{source}: {e}")), proxy_port, rule_id)]);
    }

    /// Insert redirect rules with the default policy: (source, proxy port, rule id).
    pub fn add_redirects(&self, rules: impl IntoIterator<Item = (IpNet, u16, u32)>) {
        self.add_redirects_flagged(rules.into_iter().map(|(s, p, id)| (s, p, id, 0)));
    }

    /// Insert redirect rules: (source, proxy port, rule id, flags: `REDIRECT_UNPARSED_PASS`, the
    /// `REDIRECT_ALLOW` bits).
    pub fn add_redirects_flagged(&self, rules: impl IntoIterator<Item = (IpNet, u16, u32, u32)>) {
        // As `SteerMaps` does: the "no redirect rule" hint goes before the rules.
        let mut empty: Array<MapData, u32> = Array::try_from(self.open(MAP_REDIRECT_EMPTY)).unwrap();
        empty.set(0, &0, 0).unwrap();
        let mut t = self.redirects();
        for (source, proxy_port, rule_id, flags) in rules {
            let rule = RedirectRule { proxy_port_be: proxy_port.to_be(), _pad: 0, rule_id, flags };
            t.insert(&addr_key(&source), &rule, 0).unwrap();
        }
    }

    /// The public ports whose skip hint is clear in `FWD_RULELESS_PORTS` (looked up), if fewer
    /// than 64 are (else `None`: a map nobody synced).
    pub fn looked_up_ports(&self) -> Option<Vec<u16>> {
        let bits: Array<MapData, u64> = Array::try_from(self.open(MAP_FWD_RULELESS_PORTS)).unwrap();
        let v: Vec<u16> =
            (0..=u16::MAX).filter(|p| bits.get(&(*p as u32 / 64), 0).unwrap() & (1 << (p % 64)) == 0).collect();
        (v.len() < 64).then_some(v)
    }

    /// Mark `port` ruleless by hand, whatever the rules (to prove the program obeys the hint).
    pub fn force_port_ruleless(&self, port: u16) {
        let mut free: Array<MapData, u64> = Array::try_from(self.open(MAP_FWD_RULELESS_PORTS)).unwrap();
        let i = (port / 64) as u32;
        let w = free.get(&i, 0).unwrap();
        free.set(i, &(w | 1 << (port % 64)), 0).unwrap();
    }

    /// Set `FWD_EMPTY` by hand, whatever the rules.
    pub fn force_forward_empty(&self, v: u32) {
        let mut empty: Array<MapData, u32> = Array::try_from(self.open(MAP_FWD_EMPTY)).unwrap();
        empty.set(0, &v, 0).unwrap();
    }

    /// `FWD_EMPTY`'s word (`FWD_NONE`: forwarding is skipped on ingress).
    pub fn forward_empty(&self) -> u32 {
        let a: Array<MapData, u32> = Array::try_from(self.open(MAP_FWD_EMPTY)).unwrap();
        a.get(&0, 0).unwrap()
    }

    /// Set `REDIRECT_EMPTY` to `REDIRECT_NONE` by hand, whatever the rules.
    pub fn force_redirect_empty(&self) {
        let mut empty: Array<MapData, u32> = Array::try_from(self.open(MAP_REDIRECT_EMPTY)).unwrap();
        empty.set(0, &tunmeter_common::REDIRECT_NONE, 0).unwrap();
    }

    /// `REDIRECT_EMPTY`'s word (`REDIRECT_NONE`: the redirect lookup is skipped).
    pub fn redirect_empty(&self) -> u32 {
        let a: Array<MapData, u32> = Array::try_from(self.open(MAP_REDIRECT_EMPTY)).unwrap();
        a.get(&0, 0).unwrap()
    }

    pub fn redirect_count(&self) -> usize {
        self.redirects().keys().count()
    }

    pub fn add_bypass(&self, nets: impl IntoIterator<Item = IpNet>) {
        let mut t: LpmTrie<MapData, AddrKey, BypassValue> = LpmTrie::try_from(self.open(MAP_REDIRECT_BYPASS)).unwrap();
        for net in nets {
            t.insert(&addr_key(&net), &BypassValue { flags: 0 }, 0).unwrap();
        }
    }

    /// A rule's counters, all CPUs.
    pub fn rule(&self, id: u32) -> RuleCounters {
        let a: PerCpuArray<MapData, RuleCounters> = PerCpuArray::try_from(self.open(MAP_RULE_COUNTERS)).unwrap();
        a.get(&id, 0).unwrap().iter().fold(RuleCounters::default(), |s, c| s.plus(*c))
    }

    /// (packets, bytes) of a steering event, all CPUs.
    pub fn event(&self, e: SteerEvent) -> (u64, u64) {
        let a: PerCpuArray<MapData, OutcomeCounter> = PerCpuArray::try_from(self.open(MAP_STEER_STATS)).unwrap();
        a.get(&(e as u32), 0).unwrap().iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes))
    }

    /// Every event that happened: name -> (packets, bytes).
    pub fn events(&self) -> BTreeMap<&'static str, (u64, u64)> {
        SteerEvent::ALL.iter().map(|e| (e.name(), self.event(*e))).filter(|(_, c)| *c != (0, 0)).collect()
    }
}
