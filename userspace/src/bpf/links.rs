//! The network devices of this namespace, from rtnetlink: a dump on demand, a stream of link
//! events (device added, removed, renamed) that wakes the reconciler, and each device's own
//! packet counters (IFLA_STATS64) for the ledger's self-check.

use std::collections::BTreeMap;

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::{Handle, constants::RTMGRP_LINK};
use tracing::warn;

use crate::types::Layer;

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("listing network devices over rtnetlink: {0}")]
    Dump(rtnetlink::Error),
}

/// One device as seen now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    /// The layer its link type implies, if it is one we can count on.
    pub layer: Option<Layer>,
}

pub type LinkTable = BTreeMap<String, Link>;

/// A device's own counters (IFLA_STATS64), as the driver and the core count them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Packets the device dropped on transmit (after TC egress ran on them).
    pub tx_dropped: u64,
}

/// One `()` per link event (added, removed, renamed): a wake-up, not a description.
pub type LinkEvents = UnboundedReceiver<()>;

/// `ARPHRD_NONE` (tun, WireGuard) is L3; Ethernet (veth, NICs) is L2.
pub fn layer_of(t: LinkLayerType) -> Option<Layer> {
    match t {
        LinkLayerType::Ether => Some(Layer::L2),
        LinkLayerType::None => Some(Layer::L3),
        _ => None,
    }
}

fn to_entry(msg: &LinkMessage) -> Option<(String, Link)> {
    let name = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some((name, Link { ifindex: msg.header.index, layer: layer_of(msg.header.link_layer_type) }))
}

/// A handle for dumps; events arrive on the receiver returned by [`Links::open`].
pub struct Links {
    handle: Handle,
}

impl Links {
    /// Open two rtnetlink sockets: one for requests, one subscribed to link events.
    /// Must be called inside a tokio runtime.
    pub fn open() -> Result<(Links, LinkEvents), LinksError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinksError::Socket)?;
        tokio::spawn(conn);

        let (mut ev_conn, _, mut messages) = rtnetlink::new_connection().map_err(LinksError::Socket)?;
        ev_conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK)).map_err(LinksError::Socket)?;
        tokio::spawn(ev_conn);
        let (tx, rx) = futures::channel::mpsc::unbounded();
        tokio::spawn(async move {
            while messages.next().await.is_some() {
                if tx.unbounded_send(()).is_err() {
                    break;
                }
            }
            warn!("rtnetlink event stream ended; relying on periodic reconciliation");
        });
        Ok((Links { handle }, rx))
    }

    /// A handle for dumps only, without the event socket (for tasks that only read).
    pub fn requests() -> Result<Links, LinksError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(LinksError::Socket)?;
        tokio::spawn(conn);
        Ok(Links { handle })
    }

    /// Every device's own counters, by ifindex.
    pub async fn counters(&self) -> Result<BTreeMap<u32, DeviceCounters>, LinksError> {
        let mut out = BTreeMap::new();
        let mut s = self.handle.link().get().execute();
        while let Some(msg) = s.try_next().await.map_err(LinksError::Dump)? {
            let stats = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::Stats64(s) => Some(DeviceCounters {
                    rx_packets: s.rx_packets,
                    rx_bytes: s.rx_bytes,
                    tx_packets: s.tx_packets,
                    tx_bytes: s.tx_bytes,
                    tx_dropped: s.tx_dropped,
                }),
                _ => None,
            });
            if let Some(c) = stats {
                out.insert(msg.header.index, c);
            }
        }
        Ok(out)
    }

    pub async fn dump(&self) -> Result<LinkTable, LinksError> {
        let mut out = LinkTable::new();
        let mut s = self.handle.link().get().execute();
        while let Some(msg) = s.try_next().await.map_err(LinksError::Dump)? {
            if let Some((name, link)) = to_entry(&msg) {
                out.insert(name, link);
            }
        }
        Ok(out)
    }
}
