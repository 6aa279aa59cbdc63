//! Redirect rules of openvpn connections: while a user with an openvpn connection is
//! connected, its VPN address is redirected to the connection's proxy port.
//!
//! Every sync compares what is wanted with the rules in the pinned maps (not with a memory of
//! what was added: after a reboot or `tunmeter detach` the maps are new, and an operator may
//! have changed a rule). The rules this service added are also listed in
//! `<state_dir>/identity-redirects.json`, so that it removes only its own: a rule on the same
//! source from the config or `tunmeter steer add` is never touched (it is reported once).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::{
    steer::{Origin, SteerError, SteerMaps},
    types::RedirectSpec,
};

pub struct Redirects {
    steer: SteerMaps,
    file: PathBuf,
    /// What this service installed: source -> proxy port.
    ours: BTreeMap<IpNet, u16>,
    /// Sources held by someone else's rule, already reported.
    foreign: BTreeSet<IpNet>,
}

impl Redirects {
    pub fn new(steer: SteerMaps, state_dir: &std::path::Path) -> Redirects {
        let file = state_dir.join("identity-redirects.json");
        let ours = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice::<Vec<RedirectSpec>>(&b)
                .map(|v| v.into_iter().map(|s| (s.source, s.proxy_port)).collect())
                .unwrap_or_else(|e| {
                    warn!(path = %file.display(), %e, "unreadable list of identity redirects; starting empty");
                    BTreeMap::new()
                }),
            Err(_) => BTreeMap::new(),
        };
        Redirects { steer, file, ours, foreign: BTreeSet::new() }
    }

    /// Make the maps hold `want` (for the sources no one else holds). Returns the first error
    /// after trying everything.
    pub fn sync(&mut self, want: &BTreeMap<IpNet, u16>) -> Result<(), SteerError> {
        if want.is_empty() && self.ours.is_empty() {
            // Nothing to add and nothing of ours to remove: no need to read the maps.
            self.foreign.clear();
            return Ok(());
        }
        let have = self.steer.redirect_sources()?;
        let before = self.ours.clone();
        let mut first_err = None;
        // Ours that are no longer wanted (or point elsewhere now): remove if still ours.
        for (net, port) in before.iter().filter(|(n, p)| want.get(*n) != Some(*p)) {
            match have.get(net) {
                Some(&(p, Origin::Runtime)) if p == *port => match self.steer.del_redirect(*net) {
                    Ok(()) | Err(SteerError::NoRedirect(_)) => {
                        info!(source = %net, proxy_port = port, "redirect of a disconnected openvpn user removed");
                        self.ours.remove(net);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                },
                // Gone already, or replaced by someone else: not ours any more.
                _ => {
                    self.ours.remove(net);
                }
            }
        }
        for (net, port) in want {
            match have.get(net) {
                Some(&(p, Origin::Runtime)) if p == *port => {
                    // Present (added by us earlier, or an identical rule): keep it as ours only
                    // if we added it.
                    if !self.ours.contains_key(net) && !self.foreign.contains(net) {
                        self.ours.insert(*net, *port);
                    }
                }
                Some(&(p, origin)) => {
                    if self.foreign.insert(*net) {
                        warn!(source = %net, their_port = p, ?origin, wanted_port = port,
                            "a redirect rule added by someone else covers this openvpn user; left as it is");
                    }
                }
                None => match self.steer.add_redirect(&RedirectSpec::new(*net, *port), Origin::Runtime) {
                    Ok(id) => {
                        info!(source = %net, proxy_port = port, rule = id, "openvpn user redirected to its device's proxy");
                        self.foreign.remove(net);
                        self.ours.insert(*net, *port);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                },
            }
        }
        self.foreign.retain(|n| want.contains_key(n));
        if self.ours != before {
            self.save();
        }
        first_err.map_or(Ok(()), Err)
    }

    fn save(&self) {
        let list: Vec<RedirectSpec> = self.ours.iter().map(|(s, p)| RedirectSpec::new(*s, *p)).collect();
        let tmp = self.file.with_extension("json.tmp");
        let r = std::fs::write(&tmp, serde_json::to_vec(&list).expect("plain data"))
            .and_then(|_| std::fs::rename(&tmp, &self.file));
        if let Err(e) = r {
            warn!(path = %self.file.display(), %e, "cannot save the list of identity redirects");
        }
    }
}
