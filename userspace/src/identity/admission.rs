//! The client-connect / client-disconnect hook (POST /api/v1/hooks/openvpn): admission is all
//! or nothing within a deadline, and a refused client leaves nothing behind.
//!
//! A connect is all or nothing: the client is admitted (200) only when every one of its
//! addresses has a durable session and its redirect rule (if its user has an openvpn
//! connection) is in place, within `HOOK_DEADLINE`. Otherwise whatever the call did is undone
//! (its sessions close as "rejected") and the hook exits non-zero, so OpenVPN refuses the
//! client and never calls client-disconnect for it.

use std::{net::IpAddr, time::Instant};

use tracing::{error, info, warn};

use crate::types::{CloseReason, SessionProtocol, SessionSource};

use super::{
    openvpn::hook::{HookCall, HookKind},
    service::{HOOK_DEADLINE, HookReply, HookSession, Identity, IdentityError, Inner},
    sources::{HookSeen, Wanted},
};

impl Identity {
    /// The client-connect / client-disconnect hook.
    pub async fn hook(&self, call: HookCall) -> Result<HookReply, IdentityError> {
        let mut ips = Vec::new();
        for (what, v) in [("vpn_v4", &call.vpn_v4), ("vpn_v6", &call.vpn_v6)] {
            if let Some(text) = v.as_deref().filter(|t| !t.is_empty()) {
                let ip: IpAddr = text
                    .parse()
                    .map_err(|_| IdentityError::BadRequest(format!("{what} {text:?} is not an IP address")))?;
                ips.push(ip);
            }
        }
        if ips.is_empty() {
            return Err(IdentityError::BadRequest(
                "neither vpn_v4 nor vpn_v6 is set: OpenVPN gave the client no pool address (ifconfig_pool_remote_ip)"
                    .into(),
            ));
        }
        if call.common_name.is_empty() {
            return Err(IdentityError::BadRequest("common_name is empty".into()));
        }
        let instance = self.instance_of_dev(&call.dev);
        let wanted = Wanted {
            protocol: self.protocols.get(&instance).copied().unwrap_or(SessionProtocol::Openvpn),
            instance,
            common_name: call.common_name.clone(),
            username: call.username.clone().unwrap_or_default(),
            real_address: call.real_address.clone(),
            source: SessionSource::Hook,
        };
        match call.kind {
            HookKind::ClientConnect => {
                let done = tokio::time::timeout(HOOK_DEADLINE, self.connect(&ips, &wanted)).await;
                let err = match done {
                    Ok(Ok(reply)) => {
                        info!(cn = call.common_name, username = wanted.username, addresses = ?ips,
                            instance = wanted.instance, "openvpn client admitted (hook)");
                        return Ok(reply);
                    }
                    Ok(Err(e)) => e,
                    Err(_) => IdentityError::Unavailable(format!(
                        "admitting the client took longer than {} s (database slow?)",
                        HOOK_DEADLINE.as_secs()
                    )),
                };
                error!(cn = call.common_name, addresses = ?ips, %err, "openvpn client refused (hook): undoing what was done");
                self.undo_connect(&ips, &wanted).await;
                Err(err)
            }
            HookKind::ClientDisconnect => self.disconnect(&ips, &wanted, &call.common_name).await,
        }
    }

    /// The hook's `dev` -> the management instance with that `interface`. A single instance
    /// without an `interface` takes every dev; otherwise the dev itself names a hook-only
    /// instance.
    fn instance_of_dev(&self, dev: &str) -> String {
        if let Some((name, _)) = self.opts.openvpn_interfaces.iter().find(|(_, d)| d.as_str() == dev) {
            return name.clone();
        }
        match self.opts.openvpn.as_slice() {
            [only] if !self.opts.openvpn_interfaces.contains_key(&only.name) => only.name.clone(),
            _ => dev.to_string(),
        }
    }

    async fn connect(&self, ips: &[IpAddr], w: &Wanted) -> Result<HookReply, IdentityError> {
        let mut inner = self.inner.lock().await;
        self.load(&mut inner).await?;
        let now = Instant::now();
        let mut reply = HookReply { sessions: Vec::new() };
        for ip in ips {
            inner.sources.gone.remove(&(*ip, w.real_address.clone()));
            inner.sources.hooks.insert(*ip, HookSeen { wanted: w.clone(), at: now });
            let (s, _) = self.ensure_session(&mut inner, *ip, w, true).await?;
            reply.sessions.push(HookSession { id: s.id, client_ip: ip.to_string() });
        }
        self.sync_redirects(&mut inner)
            .map_err(|e| IdentityError::Unavailable(format!("installing the redirect rule failed: {e}")))?;
        self.publish(&inner);
        Ok(reply)
    }

    /// After a refused connect: forget the hook's word, close the sessions of this connection
    /// ("rejected"), and put the redirect rules back in line.
    async fn undo_connect(&self, ips: &[IpAddr], w: &Wanted) {
        let mut inner = self.inner.lock().await;
        for ip in ips {
            if inner.sources.hooks.get(ip).is_some_and(|h| h.wanted.real_address == w.real_address) {
                inner.sources.hooks.remove(ip);
            }
            if let Some(s) = inner.active.get(ip).filter(|s| s.real_address == w.real_address).cloned()
                && let Err(e) = self.close_session(&mut inner, &s, CloseReason::Rejected).await
            {
                error!(%ip, session = s.id, %e, "closing the session of a refused client failed; the next tick retries");
            }
        }
        if let Err(e) = self.sync_redirects(&mut inner) {
            error!(%e, "removing the redirect of a refused client failed; retrying on the next tick");
        }
        self.publish(&inner);
    }

    async fn disconnect(&self, ips: &[IpAddr], w: &Wanted, cn: &str) -> Result<HookReply, IdentityError> {
        let mut inner = self.inner.lock().await;
        self.load(&mut inner).await?;
        let now = Instant::now();
        let mut reply = HookReply { sessions: Vec::new() };
        let mut first_err = None;
        for ip in ips {
            if let Err(e) = self.disconnect_one(&mut inner, *ip, w, now, &mut reply).await {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.sync_redirects(&mut inner) {
            error!(%e, "removing redirect rules after a disconnect failed; retrying on the next tick");
        }
        self.publish(&inner);
        match first_err {
            None => {
                info!(cn, addresses = ?ips, "openvpn client disconnected (hook)");
                Ok(reply)
            }
            Some(e) => {
                warn!(cn, addresses = ?ips, %e, "openvpn disconnect only partly recorded; the next ticks close the rest");
                Err(e)
            }
        }
    }

    async fn disconnect_one(
        &self,
        inner: &mut Inner,
        ip: IpAddr,
        w: &Wanted,
        now: Instant,
        reply: &mut HookReply,
    ) -> Result<(), IdentityError> {
        inner.sources.gone.insert((ip, w.real_address.clone()), now);
        if inner.sources.hooks.get(&ip).is_some_and(|h| h.wanted.real_address == w.real_address) {
            inner.sources.hooks.remove(&ip);
        }
        // A disconnect of an older connection of this address changes nothing.
        if let Some(s) = inner.active.get(&ip).filter(|s| s.real_address == w.real_address).cloned() {
            let closed = self.close_session(inner, &s, CloseReason::Disconnected).await?;
            reply.sessions.push(HookSession { id: closed.id, client_ip: ip.to_string() });
        }
        Ok(())
    }
}
