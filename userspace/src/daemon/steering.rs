//! What the daemon does for steering besides the maps: the config's rules at start, the
//! policy route, the bypass set and reserved ports (refreshed every tick), and the forward
//! rules of the registry's connections (restored after a reboot or a detach).

use tracing::{error, info, warn};

use super::DaemonError;
use crate::{
    config::Config,
    ledger::Ledger,
    steer::{SteerMaps, guard, host},
    types::Layer,
};

/// Re-add the forward rules of http/socks5 connections. True when done.
pub async fn sync_connection_rules(ledger: &Ledger, node: &str, steer: &SteerMaps) -> bool {
    match crate::registry::connections::sync_forward_rules(&ledger.db, node, steer).await {
        Ok(0) => true,
        Ok(n) => {
            info!(rules = n, "forward rules of connections restored");
            true
        }
        Err(e) => {
            error!(%e, "restoring the forward rules of connections failed; retrying on the next tick");
            false
        }
    }
}

/// Apply the config's steering rules and what the host needs for them. Runs before the API
/// serves, so rules are in place when the daemon reports itself running.
pub async fn start_steering(cfg: &Config, steer: &SteerMaps) -> Result<(), DaemonError> {
    // The devices were checked with the config; what this host listens on is checked now.
    for f in cfg.steer.forward.iter().filter(|f| !cfg.steer.forced.contains(&(f.proto, f.public_port))) {
        guard::check_forward(f, None, false)?;
    }
    steer.sync_config(&cfg.steer.forward, &cfg.steer.redirect)?;
    // Redirected packets must be delivered locally: the policy route is installed whenever tun
    // devices are configured (rules can be added at run time) and stays while the programs do.
    if cfg.interfaces.iter().any(|i| i.layer == Layer::L3) {
        cfg.steer.policy.install().await?;
    }
    refresh_steering(cfg, steer)?;
    let ports = steer.forward_ports()?;
    if !ports.is_empty() && !host::ipv4_forwarding() {
        warn!("forward rules exist but net.ipv4.ip_forward is 0: forwarded traffic cannot reach devices");
    }
    Ok(())
}

/// Keep the bypass set equal to this host's addresses (they change) plus the configured ones,
/// and reserve the public ports of rules added at run time.
pub fn refresh_steering(cfg: &Config, steer: &SteerMaps) -> Result<(), DaemonError> {
    let mut bypass: std::collections::BTreeSet<ipnet::IpNet> =
        host::ALWAYS_BYPASS.iter().map(|s| s.parse().expect("valid constant")).collect();
    bypass.extend(cfg.steer.bypass.iter().copied());
    if cfg.steer.bypass_local {
        bypass.extend(host::local_addresses()?);
    }
    if steer.sync_bypass(&bypass)? {
        info!(entries = bypass.len(), "redirect bypass set updated");
    }
    host::reserve_ports(&steer.forward_ports()?)?;
    Ok(())
}
