//! What the sources say is connected now: the merged client list of management snapshots, hook
//! announcements and WireGuard handshakes, with the rules that decide between them.
//!
//! - OpenVPN: the latest `status 3` of each management instance (authoritative for that
//!   instance while its management connection is up), plus clients announced by the
//!   client-connect hook that no snapshot has listed yet (a grace period covers the time between
//!   the hook and the client appearing in CLIENT_LIST);
//! - WireGuard: peers with a host route (/32, /128) among their allowed IPs and a handshake
//!   within `WG_SESSION_TIMEOUT`.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{openvpn::status::OvpnClient, wireguard::WgPeer};
use crate::types::{SessionProtocol, SessionSource};

/// How long a hook-announced connection counts as connected without being listed by its
/// instance's management interface.
pub const HOOK_GRACE: Duration = Duration::from_secs(15);
/// After a hook disconnect, a snapshot that still lists the connection (taken before the
/// disconnect) is not believed for this long.
pub const DISCONNECT_QUIET: Duration = Duration::from_secs(5);
/// WireGuard peers without a handshake for this long are not connected (REJECT_AFTER_TIME).
pub const WG_SESSION_TIMEOUT_MS: u64 = 180_000;

/// One connected address as the session it should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub protocol: SessionProtocol,
    pub instance: String,
    pub common_name: String,
    pub username: String,
    pub real_address: String,
    pub source: SessionSource,
}

impl Wanted {
    /// The same connection (a retried hook, or the snapshot of a hook-announced client)?
    pub fn same_connection(&self, instance: &str, real_address: &str) -> bool {
        self.instance == instance && self.real_address == real_address
    }
}

/// One management instance as last heard.
#[derive(Debug, Default)]
pub struct InstanceView {
    /// Up: the last snapshot is current. Down: the connection is lost (or never made).
    pub up: bool,
    pub clients: Vec<OvpnClient>,
}

/// A client-connect the hook reported.
#[derive(Debug, Clone)]
pub struct HookSeen {
    pub wanted: Wanted,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct Sources {
    /// Management instance name -> view.
    pub instances: BTreeMap<String, InstanceView>,
    /// Address -> the latest hook connect for it.
    pub hooks: HashMap<IpAddr, HookSeen>,
    /// (address, real address) -> when the hook said it disconnected.
    pub gone: HashMap<(IpAddr, String), Instant>,
    /// WireGuard interface -> peers (latest read).
    pub wg: BTreeMap<String, Vec<WgPeer>>,
}

/// The protocol of an instance ("openvpn-udp"), by instance name.
pub type Protocols = BTreeMap<String, SessionProtocol>;

impl Sources {
    /// Everything connected now, by address, and the instances whose absence of a client is
    /// authoritative (their sessions close when the client is not listed).
    pub fn wanted(&self, protocols: &Protocols, now: Instant, now_unix_ms: u64) -> BTreeMap<IpAddr, Wanted> {
        let mut out = BTreeMap::new();
        for (name, view) in &self.instances {
            if !view.up {
                continue;
            }
            let protocol = protocols.get(name).copied().unwrap_or(SessionProtocol::Openvpn);
            for c in &view.clients {
                for ip in c.addresses() {
                    if self.is_quiet(ip, &c.real_address, now) {
                        continue;
                    }
                    out.insert(
                        ip,
                        Wanted {
                            protocol,
                            instance: name.clone(),
                            common_name: c.common_name.clone(),
                            username: c.username.clone().unwrap_or_default(),
                            real_address: c.real_address.clone(),
                            source: SessionSource::Management,
                        },
                    );
                }
            }
        }
        for (ip, h) in &self.hooks {
            let listed = out.get(ip).is_some_and(|w| w.same_connection(&h.wanted.instance, &h.wanted.real_address));
            // A snapshot that does not list it wins after the grace period. Instances without a
            // management interface, or whose management is down, have only the hook: their
            // clients stay until it disconnects.
            if !listed && (!self.authoritative(&h.wanted.instance) || now.duration_since(h.at) < HOOK_GRACE) {
                out.insert(*ip, h.wanted.clone());
            } else if listed && h.wanted.username.len() > out[ip].username.len() {
                // The hook knows the username even when management prints UNDEF.
                out.get_mut(ip).expect("listed").username = h.wanted.username.clone();
            }
        }
        for (iface, peers) in &self.wg {
            for p in peers {
                let Some(hs) = p.latest_handshake_unix else { continue };
                if now_unix_ms.saturating_sub(hs * 1000) > WG_SESSION_TIMEOUT_MS {
                    continue;
                }
                for net in &p.allowed_ips {
                    if net.prefix_len() != net.max_prefix_len() {
                        continue;
                    }
                    out.entry(net.addr()).or_insert_with(|| Wanted {
                        protocol: SessionProtocol::Wireguard,
                        instance: iface.clone(),
                        // A peer is its key: the endpoint roams.
                        common_name: p.public_key.clone(),
                        username: String::new(),
                        real_address: p.endpoint.clone().unwrap_or_default(),
                        source: SessionSource::Wireguard,
                    });
                }
            }
        }
        out
    }

    /// Whether `instance`'s management interface is up: its snapshots decide who is connected.
    fn authoritative(&self, instance: &str) -> bool {
        self.instances.get(instance).is_some_and(|v| v.up)
    }

    fn is_quiet(&self, ip: IpAddr, real: &str, now: Instant) -> bool {
        self.gone.get(&(ip, real.to_string())).is_some_and(|t| now.duration_since(*t) < DISCONNECT_QUIET)
    }

    /// Forget hook records and disconnect marks that no longer matter.
    pub fn expire(&mut self, now: Instant) {
        let up: Vec<String> = self.instances.iter().filter(|(_, v)| v.up).map(|(n, _)| n.clone()).collect();
        self.hooks.retain(|_, h| !up.contains(&h.wanted.instance) || now.duration_since(h.at) < HOOK_GRACE * 4);
        self.gone.retain(|_, t| now.duration_since(*t) < DISCONNECT_QUIET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(cn: &str, v4: &str, real: &str) -> OvpnClient {
        OvpnClient {
            common_name: cn.into(),
            username: None,
            real_address: real.into(),
            virtual_v4: Some(v4.parse().unwrap()),
            virtual_v6: None,
            bytes_received: 0,
            bytes_sent: 0,
            connected_since_unix: 0,
            client_id: 0,
            peer_id: None,
        }
    }

    fn protocols() -> Protocols {
        [("udp".to_string(), SessionProtocol::OpenvpnUdp)].into()
    }

    fn hook(real: &str, at: Instant) -> HookSeen {
        HookSeen {
            wanted: Wanted {
                protocol: SessionProtocol::OpenvpnUdp,
                instance: "udp".into(),
                common_name: "alice".into(),
                username: "alice-user".into(),
                real_address: real.into(),
                source: SessionSource::Hook,
            },
            at,
        }
    }

    #[test]
    fn snapshots_of_instances_that_are_up_count() {
        let mut s = Sources::default();
        s.instances
            .insert("udp".into(), InstanceView { up: true, clients: vec![client("alice", "10.8.0.2", "1.2.3.4:5")] });
        s.instances
            .insert("tcp".into(), InstanceView { up: false, clients: vec![client("bob", "10.8.100.2", "1.2.3.5:6")] });
        let w = s.wanted(&protocols(), Instant::now(), 0);
        assert_eq!(w.len(), 1);
        let a = &w[&"10.8.0.2".parse().unwrap()];
        assert_eq!(
            (a.protocol, a.source, a.common_name.as_str()),
            (SessionProtocol::OpenvpnUdp, SessionSource::Management, "alice")
        );
    }

    #[test]
    fn a_hook_connect_counts_until_its_grace_ends_and_lends_its_username() {
        let now = Instant::now();
        let ip: IpAddr = "10.8.0.2".parse().unwrap();
        let mut s = Sources::default();
        s.instances.insert("udp".into(), InstanceView { up: true, ..Default::default() });
        s.hooks.insert(ip, hook("1.2.3.4:5", now));
        assert_eq!(s.wanted(&protocols(), now, 0)[&ip].source, SessionSource::Hook);
        assert!(s.wanted(&protocols(), now + HOOK_GRACE, 0).is_empty());
        // While management is down the hook alone decides.
        s.instances.get_mut("udp").unwrap().up = false;
        assert_eq!(s.wanted(&protocols(), now + HOOK_GRACE * 10, 0)[&ip].source, SessionSource::Hook);
        s.expire(now + HOOK_GRACE * 10);
        assert!(s.hooks.contains_key(&ip));
        s.instances.get_mut("udp").unwrap().up = true;
        s.instances.get_mut("udp").unwrap().clients.push(client("alice", "10.8.0.2", "1.2.3.4:5"));
        let w = s.wanted(&protocols(), now + HOOK_GRACE, 0);
        assert_eq!((w[&ip].source, w[&ip].username.as_str()), (SessionSource::Management, "alice-user"));
    }

    #[test]
    fn a_stale_snapshot_does_not_revive_a_disconnected_client() {
        let now = Instant::now();
        let ip: IpAddr = "10.8.0.2".parse().unwrap();
        let mut s = Sources::default();
        s.instances
            .insert("udp".into(), InstanceView { up: true, clients: vec![client("alice", "10.8.0.2", "1.2.3.4:5")] });
        s.gone.insert((ip, "1.2.3.4:5".into()), now);
        assert!(s.wanted(&protocols(), now, 0).is_empty());
        // A new connection of the same address (another source port) is believed.
        s.instances.get_mut("udp").unwrap().clients[0].real_address = "1.2.3.4:6".into();
        assert_eq!(s.wanted(&protocols(), now, 0).len(), 1);
    }

    #[test]
    fn wireguard_peers_with_recent_handshakes_and_host_routes() {
        let mut s = Sources::default();
        let peer = |hs: Option<u64>, ips: &[&str]| WgPeer {
            public_key: "k".into(),
            endpoint: Some("172.30.0.2:51820".into()),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            latest_handshake_unix: hs,
            rx_bytes: 0,
            tx_bytes: 0,
        };
        s.wg.insert(
            "wg0".into(),
            vec![
                peer(Some(1000), &["10.7.0.2/32", "fd00:7::2/128", "192.168.50.0/24"]),
                peer(Some(1), &["10.7.0.3/32"]),
                peer(None, &["10.7.0.4/32"]),
            ],
        );
        let w = s.wanted(&Protocols::new(), Instant::now(), 1_010_000);
        assert_eq!(w.keys().map(|k| k.to_string()).collect::<Vec<_>>(), ["10.7.0.2", "fd00:7::2"]);
    }
}
