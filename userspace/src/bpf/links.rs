//! The network devices of this namespace, from rtnetlink: a dump on demand and a stream of
//! link events (device added, removed, renamed) that wakes the reconciler.

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
