//! Steering rule specifications as operators write them (config file, CLI, API), parsed and
//! checked: forward rules (protocol, public port -> device) and redirect rules (source -> proxy).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tunmeter_common::{IPPROTO_TCP, IPPROTO_UDP};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("bad protocol {0:?}: expected tcp or udp")]
    BadProto(String),
    #[error("bad port {0:?}: expected 1..=65535")]
    BadPort(String),
    #[error("bad device address {0:?}: expected an IPv4 address and port, like 10.8.0.2:3128")]
    BadDevice(String),
    #[error("bad public address {0:?}: expected an IPv4 address (forward rules are IPv4)")]
    BadPublicAddress(String),
    #[error("bad source {0:?}: expected an address or subnet, like 10.8.0.5 or 10.8.0.0/24")]
    BadSource(String),
    #[error("bad device address {0}: a device is a unicast VPN address, not 0.0.0.0, a broadcast or multicast address")]
    DeviceNotUnicast(Ipv4Addr),
}

/// Transport protocol of a forward rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(RuleError::BadProto(s.into())),
        }
    }
}

pub fn parse_port(s: &str) -> Result<u16, RuleError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(RuleError::BadPort(s.into())),
    }
}

/// (protocol, public port) -> device: what iptables DNAT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    pub proto: Proto,
    pub public_port: u16,
    /// Only packets to this address; None: any destination address (of packets arriving on an
    /// egress interface, which on a VPN server are addressed to the server).
    pub public_address: Option<Ipv4Addr>,
    pub device: SocketAddrV4,
}

impl ForwardSpec {
    pub fn parse(
        proto: &str,
        public_port: &str,
        device: &str,
        public_address: Option<&str>,
    ) -> Result<Self, RuleError> {
        let device: SocketAddrV4 = device.trim().parse().map_err(|_| RuleError::BadDevice(device.into()))?;
        if device.port() == 0 {
            return Err(RuleError::BadDevice(device.to_string()));
        }
        let ip = *device.ip();
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(RuleError::DeviceNotUnicast(ip));
        }
        let public_address = match public_address.map(str::trim) {
            None | Some("") => None,
            Some(a) => Some(a.parse::<Ipv4Addr>().map_err(|_| RuleError::BadPublicAddress(a.into()))?),
        };
        Ok(ForwardSpec { proto: proto.parse()?, public_port: parse_port(public_port)?, public_address, device })
    }
}

/// VPN client address or subnet -> local transparent proxy: what iptables REDIRECT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectSpec {
    pub source: IpNet,
    pub proxy_port: u16,
}

impl RedirectSpec {
    pub fn parse(source: &str, proxy_port: &str) -> Result<Self, RuleError> {
        Ok(RedirectSpec { source: parse_net(source)?, proxy_port: parse_port(proxy_port)? })
    }
}

/// An address (a /32 or /128) or a subnet; host bits are cleared (10.8.0.7/24 -> 10.8.0.0/24).
pub fn parse_net(s: &str) -> Result<IpNet, RuleError> {
    let t = s.trim();
    let net = match t.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => IpNet::from(t.parse::<IpAddr>().map_err(|_| RuleError::BadSource(s.into()))?),
    };
    Ok(net.trunc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs_parse_and_reject_bad_input() {
        let f = ForwardSpec::parse("TCP", "8080", "10.8.0.2:3128", None).unwrap();
        assert_eq!((f.proto, f.public_port, f.device.to_string()), (Proto::Tcp, 8080, "10.8.0.2:3128".into()));
        assert_eq!(
            ForwardSpec::parse("udp", "53", "10.8.0.2:53", Some("203.0.113.7")).unwrap().public_address,
            Some(Ipv4Addr::new(203, 0, 113, 7))
        );
        assert_eq!(ForwardSpec::parse("icmp", "1", "10.8.0.2:1", None), Err(RuleError::BadProto("icmp".into())));
        assert_eq!(ForwardSpec::parse("tcp", "0", "10.8.0.2:1", None), Err(RuleError::BadPort("0".into())));
        assert_eq!(ForwardSpec::parse("tcp", "70000", "10.8.0.2:1", None), Err(RuleError::BadPort("70000".into())));
        assert!(matches!(ForwardSpec::parse("tcp", "80", "10.8.0.2", None), Err(RuleError::BadDevice(_))));
        assert!(matches!(ForwardSpec::parse("tcp", "80", "[fd00::2]:80", None), Err(RuleError::BadDevice(_))));
        assert!(matches!(ForwardSpec::parse("tcp", "80", "10.8.0.2:0", None), Err(RuleError::BadDevice(_))));
        assert!(matches!(ForwardSpec::parse("tcp", "80", "0.0.0.0:80", None), Err(RuleError::DeviceNotUnicast(_))));
        assert!(matches!(
            ForwardSpec::parse("tcp", "80", "10.8.0.2:80", Some("fd00::1")),
            Err(RuleError::BadPublicAddress(_))
        ));
    }

    #[test]
    fn redirect_sources_are_addresses_or_subnets() {
        assert_eq!(RedirectSpec::parse("10.8.0.5", "12345").unwrap().source.to_string(), "10.8.0.5/32");
        assert_eq!(RedirectSpec::parse("10.8.0.7/24", "1").unwrap().source.to_string(), "10.8.0.0/24");
        assert_eq!(RedirectSpec::parse("fd00:8::3", "1").unwrap().source.to_string(), "fd00:8::3/128");
        assert!(matches!(RedirectSpec::parse("10.8.0.300", "1"), Err(RuleError::BadSource(_))));
        assert!(matches!(RedirectSpec::parse("10.8.0.3", "x"), Err(RuleError::BadPort(_))));
    }
}
