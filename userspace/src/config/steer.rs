//! `[steer]`, `[[forward]]` and `[[redirect]]` (docs/steering.md): the redirect policy route,
//! the addresses never redirected, and the rules the daemon applies at start.

use ipnet::IpNet;
use serde::Deserialize;

use super::ConfigError;
use crate::types::{
    Allow, DEFAULT_REDIRECT_MARK, DEFAULT_REDIRECT_TABLE, DEFAULT_RULE_PRIORITY, ForwardSpec, PolicyRoute, Proto,
    RedirectSpec, Unparsed, rules::parse_net,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SteerSettings {
    pub policy: PolicyRoute,
    /// Destinations never redirected besides this host's own addresses.
    pub bypass: Vec<IpNet>,
    /// Also bypass every address configured on this host (default true).
    pub bypass_local: bool,
    pub forward: Vec<ForwardSpec>,
    /// Forward rules with `force = true`: the daemon does not check whether this host listens
    /// on their public port.
    pub forced: std::collections::BTreeSet<(Proto, u16)>,
    pub redirect: Vec<RedirectSpec>,
    /// Entries of each forward flow table (`FWD_FLOWS`, `FWD_INBOUND`): kernel memory, about
    /// 96 bytes an entry each, allocated at load.
    pub max_forward_flows: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSteer {
    redirect_mark: Option<u32>,
    redirect_table: Option<u32>,
    rule_priority: Option<u32>,
    #[serde(default)]
    bypass: Vec<String>,
    bypass_local: Option<bool>,
    max_forward_flows: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileForward {
    proto: String,
    public_port: u32,
    device: String,
    public_address: Option<String>,
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRedirect {
    source: String,
    proxy_port: u32,
    unparsed: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    force: bool,
}

/// `subnets`: the client subnets of every interface, which forward devices must be in (`None`:
/// no interfaces configured here, not checked).
pub(super) fn build(
    s: FileSteer,
    fwd: &[FileForward],
    red: &[FileRedirect],
    subnets: Option<&[IpNet]>,
) -> Result<SteerSettings, ConfigError> {
    let policy = PolicyRoute {
        mark: s.redirect_mark.unwrap_or(DEFAULT_REDIRECT_MARK),
        table: s.redirect_table.unwrap_or(DEFAULT_REDIRECT_TABLE),
        priority: s.rule_priority.unwrap_or(DEFAULT_RULE_PRIORITY),
    };
    if policy.mark == 0 {
        return Err(ConfigError::OutOfRange { name: "[steer] redirect_mark", value: 0, min: 1, max: u32::MAX as u64 });
    }
    // Tables 0 and 253..=255 are the kernel's (unspec, default, main, local).
    if policy.table == 0 || (253..=255).contains(&policy.table) {
        return Err(ConfigError::ReservedTable(policy.table));
    }
    let bypass = s.bypass.iter().map(|b| parse_net(b)).collect::<Result<Vec<_>, _>>()?;
    let mut forward = Vec::new();
    let mut forced = std::collections::BTreeSet::new();
    for f in fwd {
        let spec = ForwardSpec::parse(&f.proto, &f.public_port.to_string(), &f.device, f.public_address.as_deref())?;
        spec.check_device(subnets, f.force)?;
        if f.force {
            forced.insert((spec.proto, spec.public_port));
        }
        if forward.iter().any(|o: &ForwardSpec| o.proto == spec.proto && o.public_port == spec.public_port) {
            return Err(ConfigError::DuplicateForward(format!("{}/{}", spec.proto, spec.public_port)));
        }
        forward.push(spec);
    }
    let mut redirect = Vec::new();
    for r in red {
        let mut spec = RedirectSpec::parse(&r.source, &r.proxy_port.to_string())?;
        spec.unparsed = r.unparsed.as_deref().map_or(Ok(Unparsed::Drop), str::parse)?;
        spec.allow = Allow::parse(&r.allow)?;
        spec.check_source(r.force)?;
        if redirect.iter().any(|o: &RedirectSpec| o.source == spec.source) {
            return Err(ConfigError::DuplicateRedirect(spec.source.to_string()));
        }
        redirect.push(spec);
    }
    let flows = s.max_forward_flows.unwrap_or(u64::from(tunmeter_common::FWD_FLOW_ENTRIES));
    let max_forward_flows = super::ranged("[steer] max_forward_flows", flows, 1024, 16_777_216)? as u32;
    Ok(SteerSettings {
        policy,
        bypass,
        bypass_local: s.bypass_local.unwrap_or(true),
        forward,
        forced,
        redirect,
        max_forward_flows,
    })
}
