//! The namespace lab of the crate doc: server, LAN bridge, tun clients behind the relay and
//! Ethernet clients, their addresses, tun re-creation, GSO, teardown.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::relay::{AtomicStats, Relay, RelayFds, RelayStats};
use crate::sinks::Sinks;
use crate::{
    Namespaces, cleanup_on_drop, cleanup_prefix, finish_cleanup, in_netns, ipn, sys, traffic, validate_prefix,
};

/// Name of the TUN device in the server and in every tun client.
pub const TUN_DEV: &str = "tun0";
/// Name of the Ethernet (veth) device in the server and in every Ethernet client.
pub const ETH_DEV: &str = "eth0";

/// Lab shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    /// Namespace name prefix, 1..=8 chars of `[a-z0-9]`.
    pub prefix: String,
    /// Number of tun clients (`P-t1..`), 0..=200.
    pub tun_clients: usize,
    /// Number of Ethernet clients (`P-e1..`), 0..=200.
    pub eth_clients: usize,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig { prefix: "tmlab".into(), tun_clients: 3, eth_clients: 3 }
    }
}

/// One client namespace and its addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client {
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

const SERVER_TUN_V4: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 1);
const SERVER_TUN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, 1);
const SERVER_ETH_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const SERVER_ETH_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);
const MAX_CLIENTS: usize = 200;

fn tun_client(prefix: &str, i: usize) -> Client {
    Client {
        ns: format!("{prefix}-t{i}"),
        v4: Ipv4Addr::new(10, 8, 0, 1 + i as u8),
        v6: Ipv6Addr::new(0xfd00, 8, 0, 0, 0, 0, 0, 1 + i as u16),
    }
}

fn eth_client(prefix: &str, i: usize) -> Client {
    Client {
        ns: format!("{prefix}-e{i}"),
        v4: Ipv4Addr::new(10, 9, 0, 1 + i as u8),
        v6: Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1 + i as u16),
    }
}

/// A running lab. Dropping it stops the relay and the sinks and deletes every namespace.
pub struct Lab {
    prefix: String,
    /// Namespaces created so far, in creation order.
    namespaces: Namespaces,
    tun_clients: Vec<Client>,
    eth_clients: Vec<Client>,
    relay: Option<Relay>,
    stats: Arc<AtomicStats>,
    server_tun_ifindex: u32,
    sinks: Option<Sinks>,
    /// `false` after `set_gso(false)`: re-applied to a re-created server tun.
    gso: bool,
    cleaned: bool,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.prefix)
            .field("namespaces", &self.namespaces)
            .field("server_tun_ifindex", &self.server_tun_ifindex)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// Build the lab. Leftovers with the same prefix are removed first. On failure everything
    /// created so far is removed again before the error is returned.
    pub fn up(cfg: LabConfig) -> Result<Lab> {
        validate_prefix(&cfg.prefix)?;
        if cfg.tun_clients > MAX_CLIENTS || cfg.eth_clients > MAX_CLIENTS {
            bail!("at most {MAX_CLIENTS} clients of each kind");
        }
        cleanup_prefix(&cfg.prefix).context("removing leftovers")?;
        let mut lab = Lab {
            prefix: cfg.prefix.clone(),
            namespaces: Namespaces::new(),
            tun_clients: (1..=cfg.tun_clients).map(|i| tun_client(&cfg.prefix, i)).collect(),
            eth_clients: (1..=cfg.eth_clients).map(|i| eth_client(&cfg.prefix, i)).collect(),
            relay: None,
            stats: Arc::default(),
            server_tun_ifindex: 0,
            sinks: None,
            gso: true,
            cleaned: false,
        };
        // On error `lab` is dropped here, which removes whatever was built.
        lab.build().with_context(|| format!("building lab {}", cfg.prefix))?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        // The bridge namespace carries no IPv6 at all (its ports would otherwise send RS/MLD
        // into the LAN).
        let lan = ns == self.lan_ns();
        self.namespaces.add(ns, lan)
    }

    fn build(&mut self) -> Result<()> {
        let srv = self.server_ns();
        let lan = self.lan_ns();
        self.add_ns(&srv)?;
        self.add_ns(&lan)?;
        ipn(&lan, &["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        ipn(&lan, &["link", "set", "br0", "up"])?;

        // Server Ethernet side.
        ipn(&srv, &["link", "add", ETH_DEV, "type", "veth", "peer", "name", "srvport", "netns", &lan])?;
        ipn(&lan, &["link", "set", "srvport", "master", "br0", "up"])?;
        addr_up(&srv, ETH_DEV, SERVER_ETH_V4, SERVER_ETH_V6)?;

        // Ethernet clients.
        for (i, c) in self.eth_clients.clone().iter().enumerate() {
            self.add_ns(&c.ns)?;
            let port = format!("e{}", i + 1);
            ipn(&lan, &["link", "add", &port, "type", "veth", "peer", "name", ETH_DEV, "netns", &c.ns])?;
            ipn(&lan, &["link", "set", &port, "master", "br0", "up"])?;
            addr_up(&c.ns, ETH_DEV, c.v4, c.v6)?;
        }

        // TUN devices: server first, then the clients.
        let (server_fd, idx) = create_tun(&srv, SERVER_TUN_V4, SERVER_TUN_V6)?;
        self.server_tun_ifindex = idx;
        let mut clients = Vec::new();
        for c in self.tun_clients.clone() {
            self.add_ns(&c.ns)?;
            let (fd, _) = create_tun(&c.ns, c.v4, c.v6)?;
            clients.push((fd, c.v4, c.v6));
        }
        self.relay = Some(Relay::start(RelayFds { server: server_fd, clients }, self.stats.clone())?);
        self.sinks = Some(Sinks::start(&srv)?);
        Ok(())
    }

    /// The lab's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `P-srv`: the VPN server namespace (tun0, eth0, the echo sinks).
    pub fn server_ns(&self) -> String {
        format!("{}-srv", self.prefix)
    }

    /// `P-lan`: the namespace holding the bridge `br0`.
    pub fn lan_ns(&self) -> String {
        format!("{}-lan", self.prefix)
    }

    /// Tun clients `P-t1..`, in order; `P-ti` has 10.8.0.(1+i) and fd00:8::(1+i).
    pub fn tun_clients(&self) -> Vec<Client> {
        self.tun_clients.clone()
    }

    /// Ethernet clients `P-e1..`, in order; `P-ei` has 10.9.0.(1+i) and fd00:9::(1+i).
    pub fn eth_clients(&self) -> Vec<Client> {
        self.eth_clients.clone()
    }

    /// 10.8.0.1
    pub fn server_tun_v4(&self) -> Ipv4Addr {
        SERVER_TUN_V4
    }

    /// fd00:8::1
    pub fn server_tun_v6(&self) -> Ipv6Addr {
        SERVER_TUN_V6
    }

    /// 10.9.0.1
    pub fn server_eth_v4(&self) -> Ipv4Addr {
        SERVER_ETH_V4
    }

    /// fd00:9::1
    pub fn server_eth_v6(&self) -> Ipv6Addr {
        SERVER_ETH_V6
    }

    /// Current ifindex of `tun0` in `P-srv` (changes with [`Lab::recreate_server_tun`]).
    pub fn server_tun_ifindex(&self) -> u32 {
        self.server_tun_ifindex
    }

    /// Close the server-side tun fd (tun0 disappears from `P-srv`), wait until it is gone, create
    /// it again with the same name and addresses and resume relaying. Returns the new ifindex.
    ///
    /// Packets the clients send meanwhile wait in the client tun queues (or are dropped by them
    /// when full); relay counters continue.
    pub fn recreate_server_tun(&mut self) -> Result<u32> {
        let relay = self.relay.take().ok_or_else(|| anyhow!("relay is not running"))?;
        let RelayFds { server, clients } = relay.stop()?;
        drop(server);
        let srv = self.server_ns();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let gone = in_netns(&srv, || Ok(sys::ifindex(TUN_DEV) == 0))?;
            if gone {
                break;
            }
            if Instant::now() > deadline {
                bail!("{TUN_DEV} still present in {srv} 5 s after closing its fd");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (server, idx) = create_tun(&srv, SERVER_TUN_V4, SERVER_TUN_V6)?;
        self.server_tun_ifindex = idx;
        if !self.gso {
            set_gso_max_segs(&srv, TUN_DEV, false)?;
        }
        self.relay = Some(Relay::start(RelayFds { server, clients }, self.stats.clone())?);
        Ok(idx)
    }

    /// Turn GSO "super packets" off (`false`) or back on (`true`, the kernel default) on the
    /// server's `tun0` and `eth0` and on every Ethernet client's `eth0` (via `gso_max_segs`).
    ///
    /// With GSO on, locally generated TCP reaches the netdev/tc *egress* hooks (and, over veth,
    /// the peer's *ingress* hooks) as one skb per up to 64 KiB, segmented only later, so hook
    /// counters see fewer, bigger packets than the wire. With GSO off, every skb is one wire
    /// packet. Packets the relay writes into the server tun are always single packets.
    pub fn set_gso(&mut self, enabled: bool) -> Result<()> {
        self.gso = enabled;
        let srv = self.server_ns();
        set_gso_max_segs(&srv, TUN_DEV, enabled)?;
        set_gso_max_segs(&srv, ETH_DEV, enabled)?;
        for c in &self.eth_clients {
            set_gso_max_segs(&c.ns, ETH_DEV, enabled)?;
        }
        Ok(())
    }

    /// Relay counters (cumulative).
    pub fn relay_stats(&self) -> RelayStats {
        self.stats.snapshot()
    }

    /// Tear everything down, reporting errors (drop does the same silently).
    pub fn down(mut self) -> Result<()> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let mut errors: Vec<String> = Vec::new();
        // Closing the tun fds removes the tun devices (and drops the namespace references the
        // fds hold), so the relay goes first.
        if let Some(r) = self.relay.take()
            && let Err(e) = r.stop()
        {
            errors.push(format!("{e:#}"));
        }
        if let Some(mut s) = self.sinks.take() {
            s.stop();
        }
        let prefix = self.prefix.clone();
        finish_cleanup("lab", &mut self.namespaces, errors, || cleanup_prefix(&prefix))
    }

    /// A copy of the clients and server addresses, for [`traffic::round_with`] and
    /// [`traffic::background_with`].
    pub fn targets(&self) -> traffic::Targets {
        traffic::Targets {
            tun_clients: self.tun_clients.clone(),
            eth_clients: self.eth_clients.clone(),
            server_tun: (SERVER_TUN_V4, SERVER_TUN_V6),
            server_eth: (SERVER_ETH_V4, SERVER_ETH_V6),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        cleanup_on_drop("lab", || self.cleanup());
    }
}

/// Configure addresses on `dev` in `ns` (IPv6 with `nodad`) and bring it up (MTU 1500).
fn addr_up(ns: &str, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    ipn(ns, &["addr", "add", &format!("{v4}/24"), "dev", dev])?;
    ipn(ns, &["addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"])?;
    // A deep queue: the relay is a userspace thread that can fall behind on a loaded 2-core
    // machine, and a dropped packet would fail a ping or an echo in the tests.
    ipn(ns, &["link", "set", dev, "mtu", "1500", "txqueuelen", "10000", "up"])?;
    Ok(())
}

fn set_gso_max_segs(ns: &str, dev: &str, enabled: bool) -> Result<()> {
    let segs = if enabled { "65535" } else { "1" };
    ipn(ns, &["link", "set", "dev", dev, "gso_max_segs", segs])?;
    Ok(())
}

/// Create `tun0` in `ns` from a thread that entered `ns`, configure it; returns (fd, ifindex).
fn create_tun(ns: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<(OwnedFd, u32)> {
    let (fd, idx) = in_netns(ns, || {
        let fd = sys::open_tun(TUN_DEV)?;
        Ok((fd, sys::ifindex(TUN_DEV)))
    })?;
    if idx == 0 {
        bail!("{TUN_DEV} created in {ns} but has no ifindex");
    }
    addr_up(ns, TUN_DEV, v4, v6)?;
    Ok((fd, idx))
}
