//! `[[interface]]` and `--tun`/`--egress`/`--subnet`: which devices are instrumented, at which
//! layer, and which subnets on each hold the clients.

use std::collections::BTreeSet;

use ipnet::IpNet;
use serde::Deserialize;

use super::{ConfigError, Overrides};
use crate::types::Layer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub name: String,
    pub layer: Layer,
    pub subnets: Vec<IpNet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileInterface {
    name: String,
    layer: Layer,
    #[serde(default)]
    subnets: Vec<String>,
}

/// The interfaces of the file (with their own subnets) and of the flags (every `--subnet` on
/// every `--tun`/`--egress`), checked: valid unique names, subnets on every tun device, at
/// most `MAX_SUBNETS` in all.
pub(super) fn build(
    file: Vec<FileInterface>,
    ov: &Overrides,
    need_interfaces: bool,
) -> Result<Vec<InterfaceConfig>, ConfigError> {
    let flag_subnets = ov.subnets.iter().map(|s| parse_subnet(s)).collect::<Result<Vec<_>, _>>()?;
    let mut interfaces = Vec::new();
    for fi in file {
        let subnets = fi.subnets.iter().map(|s| parse_subnet(s)).collect::<Result<Vec<_>, _>>()?;
        interfaces.push(InterfaceConfig { name: fi.name, layer: fi.layer, subnets });
    }
    for (names, layer) in [(&ov.tun, Layer::L3), (&ov.egress, Layer::L2)] {
        for name in names {
            interfaces.push(InterfaceConfig { name: name.clone(), layer, subnets: flag_subnets.clone() });
        }
    }
    let mut seen = BTreeSet::new();
    for i in &mut interfaces {
        validate_ifname(&i.name)?;
        if !seen.insert(i.name.clone()) {
            return Err(ConfigError::DuplicateInterface(i.name.clone()));
        }
        i.subnets.sort();
        i.subnets.dedup();
        // An Ethernet uplink listed only for forward rules has no clients of its own.
        if i.subnets.is_empty() && i.layer == Layer::L3 {
            return Err(ConfigError::NoSubnets(i.name.clone()));
        }
    }
    if interfaces.is_empty() && need_interfaces {
        return Err(ConfigError::NoInterfaces);
    }
    let subnets: usize = interfaces.iter().map(|i| i.subnets.len()).sum();
    if subnets > tunmeter_common::MAX_SUBNETS as usize {
        return Err(ConfigError::TooManySubnets(subnets));
    }
    Ok(interfaces)
}

/// Parse `10.8.0.0/24` or `fd00::/64`. Host bits must be zero, so a typo like
/// `10.8.0.1/24` is caught rather than silently widened.
pub fn parse_subnet(s: &str) -> Result<IpNet, ConfigError> {
    let bad = |reason: &str| ConfigError::BadSubnet { value: s.into(), reason: reason.into() };
    let net: IpNet = s.trim().parse().map_err(|_| bad("expected CIDR notation like 10.8.0.0/24 or fd00:8::/64"))?;
    if net.trunc() != net {
        return Err(bad(&format!("host bits set; did you mean {}?", net.trunc())));
    }
    Ok(net)
}

/// A Linux interface name: 1 to 15 bytes, no '/', no whitespace, not "." or "..".
pub fn validate_ifname(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(char::is_whitespace)
        || name == "."
        || name == ".."
    {
        return Err(ConfigError::BadInterfaceName(name.into()));
    }
    Ok(())
}
