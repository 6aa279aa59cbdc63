//! Who is behind each VPN address: OpenVPN management and hook, WireGuard peers, merged into
//! one list that becomes sessions, redirect rules and device states.
//!
//! Sources: OpenVPN management interfaces (`openvpn::mgmt`), the OpenVPN hook
//! (`openvpn::hook`, POST /api/v1/hooks/openvpn) and WireGuard peers (`wireguard`), merged in
//! `sources`. The `Identity` service turns the merged list into sessions (`registry::sessions`:
//! one per connected address, opened when it connects, closed when it goes), keeps the redirect
//! rules of openvpn connections (`redirects`), runs the device monitor, and answers `lookup`
//! for the API.

mod admission;
pub mod openvpn;
mod reconcile;
mod redirects;
pub mod service;
pub mod sources;
pub mod wireguard;

pub use service::{Identity, IdentityError, IdentityOptions};

use serde::Serialize;

/// The session a client is in now.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SessionRef {
    pub id: String,
    pub opened_unix_ms: u64,
    /// Bytes since the session opened (ledger).
    pub upload_bytes: u64,
    pub download_bytes: u64,
}

/// The device a client is, or the device its traffic goes to.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DeviceRef {
    pub id: String,
    pub name: String,
    /// "self": this client is the device; "via": an openvpn connection sends its traffic there.
    pub relation: &'static str,
    pub status: String,
}

/// What the API shows next to a client's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ClientIdentity {
    /// The username (auth-user-pass), else the certificate's common name.
    pub username: Option<String>,
    pub common_name: Option<String>,
    /// openvpn-udp, openvpn-tcp, wireguard, other
    pub protocol: Option<crate::types::SessionProtocol>,
    /// Management instance or WireGuard interface.
    pub instance: Option<String>,
    pub real_address: Option<String>,
    pub wg_public_key: Option<String>,
    pub latest_handshake_unix_ms: Option<u64>,
    pub session: Option<SessionRef>,
    pub device: Option<DeviceRef>,
}
