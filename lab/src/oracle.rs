//! An independent traffic counter built from nftables netdev chains, to check tunmeter's
//! numbers against, per client address and direction.
//!
//! In the server namespace the oracle installs `table netdev tmoracle` with, for each of `tun0`
//! and `eth0`, one chain on hook `ingress` and one on hook `egress` (priority 0). Each chain has,
//! in this order (every rule only counts, the policy is accept):
//!
//! * one rule per client address of that device: ingress `ip[6] saddr A counter`, egress
//!   `ip[6] daddr A counter` (tun0: the tun clients, eth0: the Ethernet clients);
//! * "other" rules counting packets from/to no client (IPv4, IPv6 and non-IP, e.g. ARP, MLD, ND
//!   from link-local addresses), reported summed in [`OracleCounts::other`];
//! * a catch-all `counter` (the chain total, [`OracleCounts::totals`]).
//!
//! So for every chain: `sum(per_client) + other == total`.
//!
//! Byte semantics: nft counters add `skb->len`. On the netdev *egress* hook of an Ethernet device
//! that includes the 14-byte Ethernet header, on the *ingress* hook it does not (the header is
//! already pulled), and a TUN device has no L2 header at all. [`Oracle::read`] therefore
//! subtracts `14 * packets` from every `eth0` egress counter so that all byte counts it returns
//! are L3 bytes (IP header + payload).
//!
//! [`Oracle::install_on`] installs the same chains on any set of devices ([`OracleDevice`]), e.g.
//! `tun0`, `tun1` and `eth0` of the OpenVPN lab ([`crate::openvpn::OvpnLab::install_oracle`]).
//!
//! Why netdev ingress/egress, and not inet prerouting/postrouting: the oracle must see exactly
//! the packets a TC (clsact) program on the same device sees. On receive, the kernel runs TC
//! ingress and then, in the same function (`__netif_receive_skb_core`), the netdev ingress hook,
//! both before the IP stack, so nothing can drop a packet between them (prerouting would miss
//! packets dropped by conntrack, rp_filter or a bad header). On transmit, `__dev_queue_xmit` runs
//! the netdev egress hook and then TC egress, both after routing, POSTROUTING and the
//! neighbour layer, and both before GSO segmentation and the qdisc, so again no packet reaches
//! one but not the other (postrouting would also count packets later dropped by the neighbour
//! layer). Both hooks count `skb->len`, which on a TUN device is the IP packet length. The only
//! difference would be a TC program that drops or redirects a packet on ingress: the netdev
//! ingress hook then never sees it.
//!
//! Note on GSO: locally generated TCP is handed to the device as GSO "super packets" and
//! segmented only after the egress hook, so egress counters (like any tc/netdev egress hook)
//! count such a super packet as one packet whose length holds the headers once (over veth the
//! peer's ingress hook sees it the same way). [`crate::Lab::set_gso`]`(false)` makes every skb a
//! wire packet.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{ETH_DEV, Lab, TUN_DEV, netns_exec, run_stdin};

/// nftables table name (family netdev) the oracle uses.
pub const TABLE: &str = "tmoracle";
/// Ethernet header length added to `skb->len` on the netdev egress hook of eth0.
pub const ETH_HLEN: u64 = 14;

/// Hook a counter sits on, seen from the server device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Packets received by the server device (from the clients).
    Ingress,
    /// Packets sent by the server device (to the clients).
    Egress,
}

impl Direction {
    fn hook(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Direction::Ingress => "in",
            Direction::Egress => "out",
        }
    }
}

/// Packets and (L3) bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    fn add(&mut self, o: Counter) {
        self.packets += o.packets;
        self.bytes += o.bytes;
    }
}

impl std::ops::Add for Counter {
    type Output = Counter;
    fn add(mut self, o: Counter) -> Counter {
        Counter::add(&mut self, o);
        self
    }
}

impl std::ops::Sub for Counter {
    type Output = Counter;
    /// Saturating difference (e.g. "after - before").
    fn sub(self, o: Counter) -> Counter {
        Counter { packets: self.packets.saturating_sub(o.packets), bytes: self.bytes.saturating_sub(o.bytes) }
    }
}

/// One reading of all oracle counters. Byte counts are L3 bytes (see the module docs).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OracleCounts {
    /// (device, client address, direction) -> counter.
    pub per_client: BTreeMap<(String, IpAddr, Direction), Counter>,
    /// (device, direction) -> all packets of that chain.
    pub totals: BTreeMap<(String, Direction), Counter>,
    /// (device, direction) -> packets from (ingress) / to (egress) no client address.
    pub other: BTreeMap<(String, Direction), Counter>,
}

impl OracleCounts {
    /// Counter of one client (zero if unknown).
    pub fn client(&self, dev: &str, addr: IpAddr, dir: Direction) -> Counter {
        self.per_client.get(&(dev.to_string(), addr, dir)).copied().unwrap_or_default()
    }

    /// Chain total (zero if unknown).
    pub fn total(&self, dev: &str, dir: Direction) -> Counter {
        self.totals.get(&(dev.to_string(), dir)).copied().unwrap_or_default()
    }

    /// Sum of the per-client counters of one chain.
    pub fn client_sum(&self, dev: &str, dir: Direction) -> Counter {
        self.per_client
            .iter()
            .filter(|((d, _, di), _)| d == dev && *di == dir)
            .fold(Counter::default(), |acc, (_, c)| acc + *c)
    }

    /// Non-client counter of one chain (zero if unknown).
    pub fn other_of(&self, dev: &str, dir: Direction) -> Counter {
        self.other.get(&(dev.to_string(), dir)).copied().unwrap_or_default()
    }
}

/// One device the oracle counts on, with the client addresses that get their own counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OracleDevice {
    /// Interface name in the oracle's namespace (e.g. `tun0`, `tun1`, `eth0`).
    pub name: String,
    /// Client addresses: ingress rules match the source, egress rules the destination.
    pub addrs: Vec<IpAddr>,
    /// `true` for an Ethernet device: [`Oracle::read`] removes the 14-byte header the netdev
    /// egress hook includes, so every byte count is an L3 byte count. `false` for TUN devices.
    pub ethernet: bool,
}

impl OracleDevice {
    /// A TUN (L3) device.
    pub fn tun(name: &str, addrs: Vec<IpAddr>) -> OracleDevice {
        OracleDevice { name: name.to_string(), addrs, ethernet: false }
    }

    /// An Ethernet device.
    pub fn ethernet(name: &str, addrs: Vec<IpAddr>) -> OracleDevice {
        OracleDevice { name: name.to_string(), addrs, ethernet: true }
    }
}

/// The installed nftables counters in the server namespace. Removed on [`Oracle::remove`] and on
/// drop (best effort).
#[derive(Debug)]
pub struct Oracle {
    ns: String,
    devices: Vec<OracleDevice>,
    removed: bool,
}

fn chain_name(dev: &str, dir: Direction) -> String {
    format!("{dev}_{}", dir.short())
}

/// nft commands creating the two chains of `dev` with their counting rules.
fn chain_script(dev: &str, addrs: &[IpAddr]) -> String {
    let mut s = String::new();
    for dir in [Direction::Ingress, Direction::Egress] {
        let chain = chain_name(dev, dir);
        let field = match dir {
            Direction::Ingress => "saddr",
            Direction::Egress => "daddr",
        };
        let hook = dir.hook();
        s += &format!(
            "add chain netdev {TABLE} {chain} {{ type filter hook {hook} device \"{dev}\" priority 0; policy accept; }}\n"
        );
        let rule = |s: &mut String, expr: &str, tag: &str| {
            *s += &format!("add rule netdev {TABLE} {chain} {expr} counter comment \"{dev} {hook} {tag}\"\n");
        };
        for a in addrs {
            let fam = if a.is_ipv4() { "ip" } else { "ip6" };
            rule(&mut s, &format!("{fam} {field} {a}"), &a.to_string());
        }
        for (fam, v6) in [("ip", false), ("ip6", true)] {
            let set: Vec<String> = addrs.iter().filter(|a| a.is_ipv6() == v6).map(|a| a.to_string()).collect();
            let expr = if set.is_empty() {
                format!("meta protocol {fam}")
            } else {
                format!("{fam} {field} != {{ {} }}", set.join(", "))
            };
            rule(&mut s, &expr, "other");
        }
        rule(&mut s, "meta protocol != { ip, ip6 }", "other");
        rule(&mut s, "", "total");
    }
    s
}

impl Oracle {
    /// Install `table netdev tmoracle` in the lab's server namespace (replacing an old one).
    pub fn install(lab: &Lab) -> Result<Oracle> {
        let addrs = |cs: Vec<crate::Client>| -> Vec<IpAddr> {
            cs.iter().flat_map(|c| [IpAddr::V4(c.v4), IpAddr::V6(c.v6)]).collect()
        };
        Oracle::install_on(
            &lab.server_ns(),
            vec![
                OracleDevice::tun(TUN_DEV, addrs(lab.tun_clients())),
                OracleDevice::ethernet(ETH_DEV, addrs(lab.eth_clients())),
            ],
        )
    }

    /// Install `table netdev tmoracle` in `ns` (replacing an old one) with ingress and egress
    /// chains on every device of `devices`. The devices need not exist yet: kernel 6.18 binds a
    /// netdev chain by name (see [`Oracle::rebind`]).
    pub fn install_on(ns: &str, devices: Vec<OracleDevice>) -> Result<Oracle> {
        if devices.is_empty() {
            bail!("oracle: no devices");
        }
        for (k, d) in devices.iter().enumerate() {
            if d.name.is_empty() || d.name.len() > 15 || !d.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                bail!("oracle: bad device name {:?}", d.name);
            }
            if devices[..k].iter().any(|o| o.name == d.name) {
                bail!("oracle: device {} listed twice", d.name);
            }
        }
        let o = Oracle { ns: ns.to_string(), devices, removed: false };
        // "add" + "delete" makes the delete succeed whether or not an old table exists.
        let mut script = format!("add table netdev {TABLE}\ndelete table netdev {TABLE}\n");
        script += &format!("add table netdev {TABLE}\n");
        for d in &o.devices {
            script += &chain_script(&d.name, &d.addrs);
        }
        o.nft_script(&script).context("installing oracle")?;
        Ok(o)
    }

    /// The devices the oracle counts on.
    pub fn devices(&self) -> &[OracleDevice] {
        &self.devices
    }

    /// The namespace the oracle lives in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    fn nft_script(&self, script: &str) -> Result<()> {
        run_stdin("ip", &["netns", "exec", &self.ns, "nft", "-f", "-"], Some(script))
            .with_context(|| format!("nft script:\n{script}"))?;
        Ok(())
    }

    fn list_json(&self) -> Result<Value> {
        let out = netns_exec(&self.ns, &["nft", "-j", "list", "table", "netdev", TABLE])?;
        serde_json::from_str(&out).context("parsing nft -j output")
    }

    /// Rebuild the tun0 chains, e.g. after [`Lab::recreate_server_tun`]. **The tun0 counters
    /// restart at 0**; the eth0 counters are untouched.
    ///
    /// Older kernels bind a netdev chain to the device that existed when the chain was created
    /// (and drop the chain or its hook when that device goes away). Kernel 6.18 keeps the chain
    /// and re-attaches it by name to a new `tun0`, counters continuing; calling this anyway gives
    /// the same, known state (fresh chains at 0) on every kernel.
    pub fn rebind_tun(&self) -> Result<()> {
        self.rebind(TUN_DEV)
    }

    /// Rebuild the two chains of device `dev` (one of [`Oracle::devices`]); **its counters
    /// restart at 0**, the other devices' counters are untouched. See [`Oracle::rebind_tun`].
    pub fn rebind(&self, dev: &str) -> Result<()> {
        let d = self
            .devices
            .iter()
            .find(|d| d.name == dev)
            .ok_or_else(|| anyhow!("oracle: {dev} is not one of its devices"))?;
        let v = self.list_json()?;
        let existing: Vec<String> = items(&v)
            .filter_map(|i| i.get("chain"))
            .filter_map(|c| c.get("name").and_then(Value::as_str))
            .map(str::to_string)
            .collect();
        let mut script = String::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            let chain = chain_name(dev, dir);
            if existing.contains(&chain) {
                script += &format!("flush chain netdev {TABLE} {chain}\n");
                script += &format!("delete chain netdev {TABLE} {chain}\n");
            }
        }
        script += &chain_script(dev, &d.addrs);
        self.nft_script(&script).with_context(|| format!("rebinding {dev} chains"))
    }

    /// Read all counters (`nft -j list table netdev tmoracle`), bytes as L3 bytes.
    pub fn read(&self) -> Result<OracleCounts> {
        let eth: Vec<&str> = self.devices.iter().filter(|d| d.ethernet).map(|d| d.name.as_str()).collect();
        parse_counts(&self.list_json()?, &eth)
    }

    /// Delete the table.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        netns_exec(&self.ns, &["nft", "delete", "table", "netdev", TABLE])?;
        Ok(())
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        if !self.removed && std::path::Path::new(&crate::sys::netns_path(&self.ns)).exists() {
            let _ = netns_exec(&self.ns, &["nft", "delete", "table", "netdev", TABLE]);
        }
    }
}

fn items(v: &Value) -> impl Iterator<Item = &Value> {
    v.get("nftables").and_then(Value::as_array).into_iter().flatten()
}

fn parse_counts(v: &Value, ethernet: &[&str]) -> Result<OracleCounts> {
    let mut out = OracleCounts::default();
    let mut rules = 0;
    for rule in items(v).filter_map(|i| i.get("rule")) {
        let Some(comment) = rule.get("comment").and_then(Value::as_str) else {
            continue;
        };
        let parts: Vec<&str> = comment.split_whitespace().collect();
        let [dev, hook, tag] = parts[..] else {
            bail!("unexpected rule comment {comment:?}");
        };
        let dir = match hook {
            "ingress" => Direction::Ingress,
            "egress" => Direction::Egress,
            _ => bail!("unexpected hook in comment {comment:?}"),
        };
        let counter = rule
            .get("expr")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find_map(|e| e.get("counter"))
            .ok_or_else(|| anyhow!("rule {comment:?} has no counter"))?;
        let get =
            |k: &str| counter.get(k).and_then(Value::as_u64).ok_or_else(|| anyhow!("counter of {comment:?} lacks {k}"));
        let mut c = Counter { packets: get("packets")?, bytes: get("bytes")? };
        if ethernet.contains(&dev) && dir == Direction::Egress {
            // netdev egress on an Ethernet device counts skb->len *with* the 14-byte Ethernet
            // header (ingress does not): convert to L3 bytes.
            c.bytes = c.bytes.saturating_sub(ETH_HLEN * c.packets);
        }
        let key = (dev.to_string(), dir);
        match tag {
            "total" => out.totals.entry(key).or_default().add(c),
            "other" => out.other.entry(key).or_default().add(c),
            a => {
                let addr: IpAddr = a.parse().with_context(|| format!("address in comment {comment:?}"))?;
                out.per_client.entry((dev.to_string(), addr, dir)).or_default().add(c)
            }
        }
        rules += 1;
    }
    if rules == 0 {
        bail!("no oracle rules found in table {TABLE}");
    }
    Ok(out)
}

/// Interface counters from `ip -j -s link show dev`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Read the kernel's interface counters of `dev` in `ns`.
pub fn link_stats(ns: &str, dev: &str) -> Result<LinkStats> {
    let out = crate::run("ip", &["-n", ns, "-j", "-s", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).context("parsing ip -j output")?;
    parse_link_stats(&v).with_context(|| format!("link stats of {dev} in {ns}"))
}

fn parse_link_stats(v: &Value) -> Result<LinkStats> {
    let link = v.as_array().and_then(|a| a.first()).ok_or_else(|| anyhow!("empty ip -j output"))?;
    let stats =
        link.get("stats64").or_else(|| link.get("stats")).ok_or_else(|| anyhow!("no stats64 in ip -j output"))?;
    let get = |dir: &str, k: &str| -> Result<u64> {
        stats.get(dir).and_then(|d| d.get(k)).and_then(Value::as_u64).ok_or_else(|| anyhow!("no {dir}.{k}"))
    };
    Ok(LinkStats {
        rx_bytes: get("rx", "bytes")?,
        rx_packets: get("rx", "packets")?,
        rx_errors: get("rx", "errors")?,
        rx_dropped: get("rx", "dropped")?,
        tx_bytes: get("tx", "bytes")?,
        tx_packets: get("tx", "packets")?,
        tx_errors: get("tx", "errors")?,
        tx_dropped: get("tx", "dropped")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_has_rules_for_every_address() {
        let addrs: Vec<IpAddr> = vec!["10.8.0.2".parse().unwrap(), "fd00:8::2".parse().unwrap()];
        let s = chain_script("tun0", &addrs);
        assert!(s.contains("hook ingress device \"tun0\""));
        assert!(s.contains("hook egress device \"tun0\""));
        assert!(s.contains("ip saddr 10.8.0.2 counter comment \"tun0 ingress 10.8.0.2\""));
        assert!(s.contains("ip6 daddr fd00:8::2 counter comment \"tun0 egress fd00:8::2\""));
        assert!(s.contains("ip saddr != { 10.8.0.2 } counter"));
        let empty = chain_script("eth0", &[]);
        assert!(empty.contains("meta protocol ip counter comment \"eth0 egress other\""));
    }

    #[test]
    fn parses_counts_and_strips_ethernet_header() {
        let v: Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},
            {"rule":{"chain":"eth0_out","comment":"eth0 egress 10.9.0.2","expr":[{"match":{}},{"counter":{"packets":2,"bytes":196}}]}},
            {"rule":{"chain":"eth0_out","comment":"eth0 egress other","expr":[{"counter":{"packets":1,"bytes":42}}]}},
            {"rule":{"chain":"eth0_out","comment":"eth0 egress total","expr":[{"counter":{"packets":3,"bytes":238}}]}},
            {"rule":{"chain":"tun0_in","comment":"tun0 ingress 10.8.0.2","expr":[{"counter":{"packets":2,"bytes":168}}]}}]}"#,
        )
        .unwrap();
        let c = parse_counts(&v, &["eth0"]).unwrap();
        let a: IpAddr = "10.9.0.2".parse().unwrap();
        assert_eq!(c.client("eth0", a, Direction::Egress), Counter { packets: 2, bytes: 168 });
        assert_eq!(c.total("eth0", Direction::Egress).bytes, 238 - 42);
        assert_eq!(c.other_of("eth0", Direction::Egress).bytes, 28);
        assert_eq!(c.client_sum("tun0", Direction::Ingress).bytes, 168);
    }

    #[test]
    fn parses_link_stats() {
        let v: Value = serde_json::from_str(
            r#"[{"ifname":"tun0","stats64":{"rx":{"bytes":10,"packets":1,"errors":0,"dropped":2,"over_errors":0,"multicast":0},
            "tx":{"bytes":20,"packets":3,"errors":0,"dropped":4,"carrier_errors":0,"collisions":0}}}]"#,
        )
        .unwrap();
        let s = parse_link_stats(&v).unwrap();
        assert_eq!((s.rx_bytes, s.rx_dropped, s.tx_packets, s.tx_dropped), (10, 2, 3, 4));
    }
}
