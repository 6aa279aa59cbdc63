//! Steering rule specifications as operators write them (config file, CLI, API), parsed and
//! checked: forward rules (protocol, public port -> device) and redirect rules (source -> proxy).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tunmeter_common::{IPPROTO_TCP, IPPROTO_UDP, REDIRECT_ALLOW, REDIRECT_UNPARSED_PASS};

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
    #[error("bad device address {0}: a loopback address is not a VPN device (force it with --force / force = true)")]
    DeviceLoopback(Ipv4Addr),
    #[error(
        "device address {device} is outside every client subnet ({subnets}): forwarded traffic would not reach a VPN client (force it with --force / force = true)"
    )]
    DeviceOutsideSubnets { device: Ipv4Addr, subnets: String },
    #[error(
        "redirect source {0} matches every address, the server's own traffic included (force it with --force / force = true)"
    )]
    SourceEverything(IpNet),
    #[error("bad unparsed policy {0:?}: expected drop or pass")]
    BadUnparsed(String),
    #[error("bad allowed protocol {0:?}: expected one of {ALLOW_NAMES}")]
    BadAllow(String),
}

/// The protocol names a redirect rule's `allow` list takes.
const ALLOW_NAMES: &str = "icmp, gre, esp, ah, sctp, ipip, ipv6";

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

    /// The device must be a VPN client: not loopback, and inside one of `subnets` (the client
    /// subnets; `None`: not known here, not checked). `force` skips both checks.
    pub fn check_device(&self, subnets: Option<&[IpNet]>, force: bool) -> Result<(), RuleError> {
        let ip = *self.device.ip();
        if force {
            return Ok(());
        }
        if ip.is_loopback() {
            return Err(RuleError::DeviceLoopback(ip));
        }
        match subnets {
            Some(nets) if !nets.iter().any(|n| n.contains(&IpAddr::V4(ip))) => Err(RuleError::DeviceOutsideSubnets {
                device: ip,
                subnets: if nets.is_empty() {
                    "none known".into()
                } else {
                    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                },
            }),
            _ => Ok(()),
        }
    }
}

/// What a redirect rule does with a packet of its source it cannot hand to the proxy
/// (fragments, IPv4 options, IPv6 extension headers, protocols not allowed): `drop` (default)
/// or `pass` (it goes around the proxy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Unparsed {
    #[default]
    Drop,
    Pass,
}

impl FromStr for Unparsed {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "drop" => Ok(Unparsed::Drop),
            "pass" => Ok(Unparsed::Pass),
            _ => Err(RuleError::BadUnparsed(s.into())),
        }
    }
}

/// Protocols other than TCP and UDP a redirect rule lets pass untouched (`allow = ["icmp"]`):
/// the `REDIRECT_ALLOW` flag bits of the rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Allow(u32);

impl Allow {
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Allow, RuleError> {
        names.iter().try_fold(Allow(0), |a, n| Ok(Allow(a.0 | Self::bit(n.as_ref())?)))
    }

    fn bit(name: &str) -> Result<u32, RuleError> {
        let n = name.trim().to_ascii_lowercase();
        REDIRECT_ALLOW.iter().find(|(p, _, _)| *p == n).map(|(_, _, b)| *b).ok_or(RuleError::BadAllow(name.into()))
    }

    /// From rule flags (other bits ignored).
    pub fn from_flags(flags: u32) -> Allow {
        Allow(REDIRECT_ALLOW.iter().map(|(_, _, b)| *b).filter(|b| flags & b != 0).fold(0, |a, b| a | b))
    }

    pub fn names(self) -> Vec<String> {
        REDIRECT_ALLOW.iter().filter(|(_, _, b)| self.0 & b != 0).map(|(n, _, _)| (*n).to_string()).collect()
    }
}

impl TryFrom<Vec<String>> for Allow {
    type Error = RuleError;
    fn try_from(v: Vec<String>) -> Result<Self, Self::Error> {
        Allow::parse(&v)
    }
}

impl From<Allow> for Vec<String> {
    fn from(a: Allow) -> Self {
        a.names()
    }
}

/// VPN client address or subnet -> local transparent proxy: what iptables REDIRECT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectSpec {
    pub source: IpNet,
    pub proxy_port: u16,
    #[serde(default)]
    pub unparsed: Unparsed,
    #[serde(default)]
    pub allow: Allow,
}

impl RedirectSpec {
    /// A rule with the default policy: drop what cannot be proxied, allow nothing else.
    pub fn new(source: IpNet, proxy_port: u16) -> Self {
        RedirectSpec { source, proxy_port, unparsed: Unparsed::Drop, allow: Allow::default() }
    }

    pub fn parse(source: &str, proxy_port: &str) -> Result<Self, RuleError> {
        Ok(RedirectSpec::new(parse_net(source)?, parse_port(proxy_port)?))
    }

    /// The policy part of the rule's map flags.
    pub fn policy_flags(&self) -> u32 {
        self.allow.0 | if self.unparsed == Unparsed::Pass { REDIRECT_UNPARSED_PASS } else { 0 }
    }

    /// A source of every address (0.0.0.0/0, ::/0) is refused unless forced: it would also
    /// take the traffic of everything else on the tun devices.
    pub fn check_source(&self, force: bool) -> Result<(), RuleError> {
        if self.source.prefix_len() == 0 && !force {
            return Err(RuleError::SourceEverything(self.source));
        }
        Ok(())
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

    #[test]
    fn forced_checks_of_devices_and_sources() {
        let nets: Vec<IpNet> = vec!["10.8.0.0/24".parse().unwrap()];
        let f = |d: &str| ForwardSpec::parse("tcp", "80", d, None).unwrap();
        assert_eq!(f("10.8.0.2:80").check_device(Some(&nets), false), Ok(()));
        assert!(matches!(f("127.0.0.1:80").check_device(Some(&nets), false), Err(RuleError::DeviceLoopback(_))));
        assert!(matches!(f("127.0.0.1:80").check_device(None, false), Err(RuleError::DeviceLoopback(_))));
        let e = f("10.9.0.2:80").check_device(Some(&nets), false).unwrap_err();
        assert!(e.to_string().contains("10.9.0.2") && e.to_string().contains("10.8.0.0/24"), "{e}");
        assert!(matches!(f("10.9.0.2:80").check_device(Some(&[]), false), Err(RuleError::DeviceOutsideSubnets { .. })));
        assert_eq!(f("10.9.0.2:80").check_device(None, false), Ok(()));
        assert_eq!(f("127.0.0.1:80").check_device(Some(&nets), true), Ok(()));
        for src in ["0.0.0.0/0", "::/0"] {
            let r = RedirectSpec::parse(src, "1").unwrap();
            assert!(matches!(r.check_source(false), Err(RuleError::SourceEverything(_))), "{src}");
            assert_eq!(r.check_source(true), Ok(()));
        }
        assert_eq!(RedirectSpec::parse("10.0.0.0/8", "1").unwrap().check_source(false), Ok(()));
    }

    #[test]
    fn redirect_policies_parse_and_round_trip() {
        let a = Allow::parse(&["ICMP", "gre"]).unwrap();
        assert_eq!(a.names(), ["icmp", "gre"]);
        assert_eq!(Allow::from_flags(a.0 | tunmeter_common::RULE_FROM_CONFIG | REDIRECT_UNPARSED_PASS), a);
        assert_eq!(Allow::parse(&["tcp"]), Err(RuleError::BadAllow("tcp".into())));
        assert_eq!("PASS".parse::<Unparsed>(), Ok(Unparsed::Pass));
        assert!(matches!("maybe".parse::<Unparsed>(), Err(RuleError::BadUnparsed(_))));
        let mut r = RedirectSpec::parse("10.8.0.5", "1").unwrap();
        assert_eq!(r.policy_flags(), 0, "default: drop, allow nothing");
        r.unparsed = Unparsed::Pass;
        r.allow = a;
        assert_eq!(r.policy_flags(), a.0 | REDIRECT_UNPARSED_PASS);
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains(r#""allow":["icmp","gre"]"#) && json.contains(r#""unparsed":"pass""#), "{json}");
        assert_eq!(serde_json::from_str::<RedirectSpec>(&json).unwrap(), r);
        // Stored before the policy existed: the default policy.
        let old: RedirectSpec = serde_json::from_str(r#"{"source":"10.8.0.5/32","proxy_port":1}"#).unwrap();
        assert_eq!(old, RedirectSpec::parse("10.8.0.5", "1").unwrap());
    }
}
