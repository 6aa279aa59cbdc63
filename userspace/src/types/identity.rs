//! Who is behind a VPN address, as enums with fixed wire names: a session's protocol and
//! source and why it closed, and the protocol of a connection sold on a device. Stored as
//! these names in the database and shown as them in the API.

use super::named::named_enum;

named_enum! {
    /// The protocol of a session. `Openvpn`: an OpenVPN client whose transport is unknown (the
    /// hook reported a `dev` that maps to no configured management instance, e.g. a hook-only
    /// setup).
    pub enum SessionProtocol("protocol") {
        OpenvpnUdp = "openvpn-udp",
        OpenvpnTcp = "openvpn-tcp",
        Openvpn = "openvpn",
        Wireguard = "wireguard",
        Other = "other",
    }
}

named_enum! {
    /// Who opened a session.
    pub enum SessionSource("source") {
        Hook = "hook",
        Management = "management",
        Wireguard = "wireguard",
        Api = "api",
    }
}

named_enum! {
    /// Why a session closed.
    pub enum CloseReason("close reason") {
        /// The client left (hook, management or a snapshot that no longer lists it).
        Disconnected = "disconnected",
        /// A new session of the same address replaced it.
        Superseded = "superseded",
        /// Its instance's management interface stayed unreachable past the grace period.
        ManagementLost = "management_lost",
        /// Admission failed: the hook's client-connect was refused and undone.
        Rejected = "rejected",
        /// The WireGuard peer's latest handshake is too old.
        HandshakeExpired = "handshake_expired",
        /// Opened by a management instance that is no longer configured.
        InstanceNotConfigured = "instance_not_configured",
        /// A WireGuard session whose interface is no longer configured.
        InterfaceNotConfigured = "interface_not_configured",
        /// Closed through the API.
        Api = "api",
    }
}

named_enum! {
    /// What a connection sold on a device is.
    pub enum ConnectionProtocol("protocol") {
        /// An HTTP proxy on the device, reached through a forward rule.
        Http = "http",
        /// A SOCKS5 proxy on the device, reached through a forward rule.
        Socks5 = "socks5",
        /// An OpenVPN user whose traffic is redirected to the local transparent proxy.
        Openvpn = "openvpn",
    }
}
