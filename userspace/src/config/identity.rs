//! `[identity]`, `[[openvpn]]` and `[[wireguard]]`: where client names come from (OpenVPN
//! management interfaces and WireGuard peers) and how often they are re-read.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, interfaces::validate_ifname, ranged, read_secret};
use crate::types::SessionProtocol;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    pub openvpn: Vec<OpenvpnInstance>,
    /// Instance name -> its tun device (`dev` in the hook's environment).
    pub openvpn_interfaces: BTreeMap<String, String>,
    /// WireGuard interfaces whose peers are read.
    pub wireguard: Vec<String>,
    /// How often management `status 3` and WireGuard peers are re-read (safety net).
    pub reconcile_interval_ms: u64,
    /// A device is offline after this long without a packet or a WireGuard handshake.
    pub device_offline_after_secs: u64,
    /// Sessions of an instance whose management interface is lost close after this long
    /// (a management restart or a stall shorter than this changes nothing).
    pub management_grace_secs: u64,
}

/// Where a management interface listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MgmtAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for MgmtAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MgmtAddr::Tcp(a) => f.write_str(a),
            MgmtAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One `[[openvpn]]` instance. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenvpnInstance {
    /// Unique name, e.g. "udp" or "tcp" (stored with sessions).
    pub name: String,
    /// `openvpn-udp` or `openvpn-tcp` (the session's protocol).
    pub protocol: SessionProtocol,
    pub addr: MgmtAddr,
    /// Management password (`management ... pw-file`), if set. Like OpenVPN's pw-file, only
    /// the first line counts: later lines are never sent (they would be management commands).
    pub password: Option<String>,
    /// `status 3` is issued this often (default 2 s), and on every notification.
    pub reconcile: Duration,
}

impl std::fmt::Debug for OpenvpnInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenvpnInstance")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("addr", &self.addr)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("reconcile", &self.reconcile)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileIdentity {
    reconcile_interval_ms: Option<u64>,
    device_offline_after_secs: Option<u64>,
    management_grace_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileOpenvpn {
    name: String,
    protocol: String,
    management: String,
    interface: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileWireguard {
    interface: String,
}

pub(super) fn build(
    s: FileIdentity,
    ovpn: Vec<FileOpenvpn>,
    wg: Vec<FileWireguard>,
) -> Result<IdentitySettings, ConfigError> {
    let reconcile_interval_ms =
        ranged("[identity] reconcile_interval_ms", s.reconcile_interval_ms.unwrap_or(2000), 200, 60_000)?;
    let device_offline_after_secs =
        ranged("[identity] device_offline_after_secs", s.device_offline_after_secs.unwrap_or(120), 1, 30 * 86_400)?;
    let management_grace_secs =
        ranged("[identity] management_grace_secs", s.management_grace_secs.unwrap_or(30), 0, 3600)?;
    let mut openvpn: Vec<OpenvpnInstance> = Vec::new();
    let mut openvpn_interfaces = BTreeMap::new();
    for o in ovpn {
        let bad = |reason: String| ConfigError::BadOpenvpn { name: o.name.clone(), reason };
        if o.name.is_empty()
            || o.name.len() > 32
            || !o.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(bad("name must be 1 to 32 characters from A-Z a-z 0-9 - _".into()));
        }
        if openvpn.iter().any(|i| i.name == o.name) {
            return Err(bad("configured twice".into()));
        }
        let protocol = match o.protocol.as_str() {
            "udp" => SessionProtocol::OpenvpnUdp,
            "tcp" => SessionProtocol::OpenvpnTcp,
            p => return Err(bad(format!("protocol {p:?}: expected \"udp\" or \"tcp\""))),
        };
        let addr = mgmt_addr(&o.management).map_err(bad)?;
        if let Some(dev) = &o.interface {
            if validate_ifname(dev).is_err() {
                return Err(bad(format!("interface {dev:?}: bad interface name")));
            }
            if openvpn_interfaces.values().any(|d| d == dev) {
                return Err(bad(format!("interface {dev:?} belongs to another [[openvpn]] instance already")));
            }
            openvpn_interfaces.insert(o.name.clone(), dev.clone());
        }
        let password = o.password_file.as_deref().map(|p| read_secret("management password file", p)).transpose()?;
        openvpn.push(OpenvpnInstance {
            name: o.name.clone(),
            protocol,
            addr,
            password,
            reconcile: Duration::from_millis(reconcile_interval_ms),
        });
    }
    let mut wireguard: Vec<String> = Vec::new();
    for w in wg {
        if validate_ifname(&w.interface).is_err() || wireguard.contains(&w.interface) {
            return Err(ConfigError::BadWireguard(w.interface));
        }
        wireguard.push(w.interface);
    }
    Ok(IdentitySettings {
        openvpn,
        openvpn_interfaces,
        wireguard,
        reconcile_interval_ms,
        device_offline_after_secs,
        management_grace_secs,
    })
}

/// `HOST:PORT` or `unix:/absolute/path`.
fn mgmt_addr(text: &str) -> Result<MgmtAddr, String> {
    match text.strip_prefix("unix:") {
        Some(p) if p.starts_with('/') => Ok(MgmtAddr::Unix(p.into())),
        Some(p) => Err(format!("management unix:{p}: the socket path must be absolute")),
        None => {
            let ok = text.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(format!(
                    "management {text:?}: expected HOST:PORT like 127.0.0.1:7505 or unix:/run/openvpn/udp.sock"
                ));
            }
            Ok(MgmtAddr::Tcp(text.to_string()))
        }
    }
}
