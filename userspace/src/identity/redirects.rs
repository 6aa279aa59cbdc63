//! Redirect rules of openvpn connections: while a user with an openvpn connection is
//! connected, its VPN address is redirected to the connection's proxy port.
//!
//! The rules this service added are remembered in `<state_dir>/identity-redirects.json`, so a
//! restarted daemon removes the rules of users who left while it was down, and never touches
//! rules an operator added with `tunmeter steer add`.

use std::{collections::BTreeMap, path::PathBuf};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::steer::{Origin, RedirectSpec, SteerError, SteerMaps};

pub struct Redirects {
    steer: SteerMaps,
    file: PathBuf,
    /// What this service installed: source -> proxy port.
    ours: BTreeMap<IpNet, u16>,
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
        Redirects { steer, file, ours }
    }

    /// Make the installed rules equal `want`. Rules of others on the same source are left
    /// alone (and reported). Returns the first error after trying everything.
    pub fn sync(&mut self, want: &BTreeMap<IpNet, u16>) -> Result<(), SteerError> {
        if *want == self.ours {
            return Ok(());
        }
        let mut first_err = None;
        for (net, port) in self.ours.clone() {
            if want.get(&net) != Some(&port) {
                match self.steer.del_redirect(net) {
                    Ok(()) | Err(SteerError::NoRedirect(_)) => {
                        info!(source = %net, proxy_port = port, "redirect of a disconnected openvpn user removed");
                        self.ours.remove(&net);
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        for (net, port) in want {
            if self.ours.contains_key(net) {
                continue;
            }
            match self.steer.add_redirect(&RedirectSpec { source: *net, proxy_port: *port }, Origin::Runtime) {
                Ok(id) => {
                    info!(source = %net, proxy_port = port, rule = id, "openvpn user redirected to its device's proxy");
                    self.ours.insert(*net, *port);
                }
                Err(e @ SteerError::RedirectExists(_)) => {
                    warn!(%e, "a redirect rule added by someone else covers this openvpn user; left as it is");
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.save();
        first_err.map_or(Ok(()), Err)
    }

    fn save(&self) {
        let list: Vec<RedirectSpec> =
            self.ours.iter().map(|(s, p)| RedirectSpec { source: *s, proxy_port: *p }).collect();
        let tmp = self.file.with_extension("json.tmp");
        let r = std::fs::write(&tmp, serde_json::to_vec(&list).expect("plain data"))
            .and_then(|_| std::fs::rename(&tmp, &self.file));
        if let Err(e) = r {
            warn!(path = %self.file.display(), %e, "cannot save the list of identity redirects");
        }
    }
}
