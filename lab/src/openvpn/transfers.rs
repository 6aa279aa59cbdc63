//! Counting and moving traffic in an OpenVPN lab: the nftables oracle on the server's devices,
//! exact transfers and pings per client, and traffic rounds for this or another process's lab.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{Result, anyhow};

use super::{CUST_V4, CUST_V6, OvpnLab, Transport, UpDown, tun_addrs};
use crate::oracle::{Counter, Direction, Oracle, OracleCounts, OracleDevice};
use crate::{list_prefix, traffic, transfer, validate_prefix};

impl OvpnLab {
    /// Install the nftables oracle in `P-srv`: `tun0` (UDP clients' addresses), `tun1` (TCP
    /// clients' addresses) and `eth0` (the customer's addresses, Ethernet). Works before clients
    /// connect (addresses are fixed) and survives instance restarts (kernel 6.18 re-binds netdev
    /// chains to a re-created device by name; [`Oracle::rebind`] resets one device's counters).
    pub fn install_oracle(&self) -> Result<Oracle> {
        let mut devs = Vec::new();
        for t in Transport::ALL {
            let addrs = (0..self.cfg.clients.len())
                .filter(|&i| self.cfg.clients[i].transport == t)
                .flat_map(|i| {
                    let a = self.expected_addrs(i);
                    std::iter::once(IpAddr::V4(a.v4)).chain(a.v6.map(IpAddr::V6))
                })
                .collect();
            devs.push(OracleDevice::tun(t.server_dev(), addrs));
        }
        devs.push(OracleDevice::ethernet("eth0", vec![CUST_V4.into(), CUST_V6.into()]));
        Oracle::install_on(&self.server_ns(), devs)
    }

    /// Client `i`'s counters in an oracle reading: upload = ingress on its instance's tun with
    /// source = its v4 or v6 address, download = egress with that destination.
    pub fn client_counts(&self, counts: &OracleCounts, i: usize) -> UpDown {
        let dev = self.cfg.clients[i].transport.server_dev();
        let a = self.expected_addrs(i);
        let addrs: Vec<IpAddr> = std::iter::once(IpAddr::V4(a.v4)).chain(a.v6.map(IpAddr::V6)).collect();
        let sum = |dir| addrs.iter().fold(Counter::default(), |acc, ip| acc + counts.client(dev, *ip, dir));
        UpDown { upload: sum(Direction::Ingress), download: sum(Direction::Egress) }
    }

    fn server_addr(&self, i: usize, v6: bool) -> IpAddr {
        let (a4, a6) = self.server_vpn_addrs(i);
        if v6 { a6.into() } else { a4.into() }
    }

    /// Through client `i`'s tunnel: send exactly `upload` TCP payload bytes (>= 16) to the
    /// transfer server in `P-srv` (its instance's server address, IPv6 if `v6`) and receive
    /// exactly `download` bytes ([`transfer::tcp_transfer`]).
    pub fn tcp_transfer(&self, i: usize, v6: bool, upload: u64, download: u64) -> Result<()> {
        self.check_index(i)?;
        transfer::tcp_transfer(&self.client_ns(i), self.server_addr(i, v6), upload, download)
    }

    /// Through client `i`'s tunnel: `count` UDP datagrams of `up_size` bytes, each answered with
    /// `down_size` bytes ([`transfer::udp_transfer`]).
    pub fn udp_transfer(&self, i: usize, v6: bool, count: usize, up_size: usize, down_size: usize) -> Result<()> {
        self.check_index(i)?;
        transfer::udp_transfer(&self.client_ns(i), self.server_addr(i, v6), count, up_size, down_size)
    }

    /// Ping the server's VPN address from client `i` ([`traffic::ping`]).
    pub fn ping(&self, i: usize, v6: bool, count: u32) -> Result<()> {
        self.check_index(i)?;
        traffic::ping(&self.client_ns(i), self.server_addr(i, v6), count)
    }

    /// Traffic targets of every client (for [`traffic_round`] / [`background`]).
    pub fn traffic_targets(&self) -> Vec<TrafficTarget> {
        (0..self.cfg.clients.len())
            .map(|i| {
                let (server_v4, server_v6) = self.server_vpn_addrs(i);
                TrafficTarget { ns: self.client_ns(i), index: i, server_v4, server_v6: Some(server_v6) }
            })
            .collect()
    }

    /// Background traffic from every client (see [`background`]).
    pub fn background(&self, interval: Duration) -> Result<traffic::Background> {
        background(self.traffic_targets(), interval)
    }
}

/// A client namespace and the server addresses it sends traffic to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTarget {
    pub ns: String,
    /// Client index (makes the per-client volumes differ).
    pub index: usize,
    pub server_v4: Ipv4Addr,
    pub server_v6: Option<Ipv6Addr>,
}

/// Find the clients of a running OpenVPN lab with this prefix (e.g. one started by another
/// process with `tunmeter-lab openvpn up`): every namespace `P-c<n>` whose `tun0` has an address;
/// the server address is `.1` of the client's /24 (and `::1` of its /64).
pub fn discover_targets(prefix: &str) -> Result<Vec<TrafficTarget>> {
    validate_prefix(prefix)?;
    let start = format!("{prefix}-c");
    let mut out = Vec::new();
    for ns in list_prefix(prefix)? {
        let Some(n) = ns.strip_prefix(&start).and_then(|n| n.parse::<usize>().ok()) else { continue };
        let Some(a) = tun_addrs(&ns, "tun0")? else { continue };
        let o = a.v4.octets();
        let server_v6 = a.v6.map(|v6| {
            let mut seg = v6.segments();
            seg[4..].copy_from_slice(&[0, 0, 0, 1]);
            Ipv6Addr::from(seg)
        });
        out.push(TrafficTarget {
            ns,
            index: n.saturating_sub(1),
            server_v4: Ipv4Addr::new(o[0], o[1], o[2], 1),
            server_v6,
        });
    }
    out.sort_by_key(|t| t.index);
    Ok(out)
}

/// Sizes of one traffic round per client `k` (its index): a TCP transfer of
/// `tcp_up + 1000*k` up / `tcp_down + 3000*k` down, `udp_count` UDP datagrams of 200 up / 600
/// down bytes, 2 pings, over IPv4 and (where the client has it) IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundSizes {
    pub tcp_up: u64,
    pub tcp_down: u64,
    pub udp_count: usize,
}

impl Default for RoundSizes {
    fn default() -> Self {
        RoundSizes { tcp_up: 4096, tcp_down: 16 * 1024, udp_count: 3 }
    }
}

/// One traffic round for every target, in parallel; all errors joined into one.
pub fn traffic_round(targets: &[TrafficTarget], sizes: RoundSizes) -> Result<()> {
    let handles: Vec<_> = targets
        .iter()
        .cloned()
        .map(|t| {
            std::thread::spawn(move || -> Result<()> {
                let k = t.index as u64;
                let dsts: Vec<IpAddr> =
                    std::iter::once(IpAddr::V4(t.server_v4)).chain(t.server_v6.map(IpAddr::V6)).collect();
                for dst in dsts {
                    transfer::tcp_transfer(&t.ns, dst, sizes.tcp_up + 1000 * k, sizes.tcp_down + 3000 * k)?;
                    transfer::udp_transfer(&t.ns, dst, sizes.udp_count, 200, 600)?;
                    traffic::ping(&t.ns, dst, 2)?;
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("traffic thread panicked".into()),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(anyhow!("{}", errors.join("\n"))) }
}

/// [`traffic_round`] with default sizes every `interval` on a thread until stopped. Rounds of
/// disconnected clients fail and are counted as errors.
pub fn background(targets: Vec<TrafficTarget>, interval: Duration) -> Result<traffic::Background> {
    traffic::background_fn(move || traffic_round(&targets, RoundSizes::default()), interval)
}
