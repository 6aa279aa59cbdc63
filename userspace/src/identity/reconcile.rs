//! Sessions in line with the sources: open what is connected, close what left, keep the
//! redirect rules of openvpn users. Runs under the service's lock.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::atomic::Ordering,
    time::Instant,
};

use ipnet::IpNet;
use tracing::{error, info, warn};

use super::{
    service::{Identity, IdentityError, Inner},
    sources::Wanted,
};
use crate::{
    ledger::state::Totals,
    registry::{
        RegistryError, connections, devices,
        sessions::{self, NewSession, Session},
    },
    time::unix_ms,
    types::{CloseReason, ConnectionProtocol, SessionProtocol, SessionSource},
};

/// The same connection: a retried hook, the snapshot of a hook-announced client, a session
/// of the previous run. WireGuard peers are one connection per key (the endpoint roams).
fn same_connection(s: &Session, w: &Wanted) -> bool {
    s.instance == w.instance
        && if w.protocol == SessionProtocol::Wireguard {
            s.common_name == w.common_name
        } else {
            s.real_address == w.real_address
        }
}

impl Identity {
    /// Reload sessions, devices and connections from the database when asked to.
    pub(super) async fn load(&self, inner: &mut Inner) -> Result<(), IdentityError> {
        if !self.reload.swap(false, Ordering::SeqCst) && inner.loaded {
            return Ok(());
        }
        let r = async {
            let active = sessions::active(&self.db, self.node()).await?;
            let devs = devices::list(&self.db, self.node()).await?;
            let conns = connections::list(&self.db, self.node()).await?;
            Ok::<_, sqlx::Error>((active, devs, conns))
        }
        .await;
        match r {
            Ok((active, devs, conns)) => {
                if inner.db_down {
                    info!(db = %self.db.shown_url, "sessions, devices and connections readable again");
                }
                inner.db_down = false;
                inner.active = active.into_iter().map(|s| (s.client_ip, s)).collect();
                inner.devices = devs;
                inner.connections = conns;
                inner.loaded = true;
                Ok(())
            }
            Err(e) => {
                self.reload.store(true, Ordering::SeqCst);
                if !inner.db_down {
                    error!(db = %self.db.shown_url, %e,
                        "loading sessions, devices and connections failed; hooks are refused until it works, retrying every tick");
                }
                inner.db_down = true;
                Err(IdentityError::Unavailable(format!("database: {e}")))
            }
        }
    }

    /// Make `ip`'s active session the one `w` describes: keep it if it is that connection,
    /// else close what is there ("superseded") and open a new one, in one transaction.
    /// `force` (the hook): a session opened through the API is superseded too. Returns the
    /// session and whether this call opened it.
    pub(super) async fn ensure_session(
        &self,
        inner: &mut Inner,
        ip: IpAddr,
        w: &Wanted,
        force: bool,
    ) -> Result<(Session, bool), IdentityError> {
        let existing = inner.active.get(&ip).cloned();
        if let Some(s) = &existing
            && (same_connection(s, w) || (s.source == SessionSource::Api && !force))
        {
            return Ok((s.clone(), false));
        }
        let start = self.ledger.admit(ip).await?;
        let new = NewSession {
            client_ip: ip,
            protocol: w.protocol,
            instance: w.instance.clone(),
            common_name: w.common_name.clone(),
            username: w.username.clone(),
            real_address: w.real_address.clone(),
            source: w.source,
            start,
        };
        let opened = if existing.is_some() {
            sessions::replace(&self.db, self.node(), &self.hooks, &new, unix_ms()).await.map(|r| r.opened)
        } else {
            sessions::open(&self.db, self.node(), &self.hooks, &new, unix_ms()).await
        };
        match opened {
            Ok(s) => {
                inner.active.insert(ip, s.clone());
                Ok((s, true))
            }
            Err(e) => {
                // A session opened or closed elsewhere (the API) in between: reload to see it.
                self.reload.store(true, Ordering::SeqCst);
                Err(e.into())
            }
        }
    }

    pub(super) async fn close_session(
        &self,
        inner: &mut Inner,
        s: &Session,
        reason: CloseReason,
    ) -> Result<Session, IdentityError> {
        let end = self.ledger.client(s.client_ip).map(|c| c.total).unwrap_or(Totals {
            up_bytes: s.start_up_bytes,
            down_bytes: s.start_down_bytes,
            ..Totals::default()
        });
        match sessions::close(&self.db, self.node(), &self.hooks, &s.id, reason, end, unix_ms()).await {
            Ok(c) => {
                inner.active.remove(&s.client_ip);
                self.ledger.release(s.client_ip);
                Ok(c)
            }
            Err(RegistryError::Conflict(_) | RegistryError::NotFound { .. }) => {
                // Closed elsewhere already (the API): nothing left to do.
                inner.active.remove(&s.client_ip);
                Ok(s.clone())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Bring sessions in line with the sources. Failures are retried at the next tick; each
    /// kind is reported once per tick at most.
    pub(super) async fn apply(&self, inner: &mut Inner) {
        if self.load(inner).await.is_err() {
            return;
        }
        let now = Instant::now();
        inner.sources.expire(now);
        let wanted = inner.sources.wanted(&self.protocols, now, unix_ms());
        let mut failed_opens = Vec::new();
        let mut last_err = None;
        for (ip, w) in &wanted {
            if let Err(e) = self.ensure_session(inner, *ip, w, false).await {
                failed_opens.push(*ip);
                last_err = Some(e);
            }
        }
        if let Some(e) = last_err {
            warn!(addresses = ?failed_opens, %e, "sessions not opened; retrying on the next tick");
        }
        let stale: Vec<(Session, CloseReason)> = inner
            .active
            .values()
            .filter(|s| s.source != SessionSource::Api && !wanted.contains_key(&s.client_ip))
            .filter_map(|s| self.close_reason(inner, s, now).map(|r| (s.clone(), r)))
            .collect();
        for (s, reason) in stale {
            if let Err(e) = self.close_session(inner, &s, reason).await {
                error!(ip = %s.client_ip, session = s.id, %reason, %e, "closing a session failed; retrying on the next tick");
            }
        }
        if let Err(e) = self.sync_redirects(inner) {
            error!(%e, "updating the redirect rules of openvpn users failed; retrying on the next tick");
        }
    }

    /// Why an active session that no source lists should close now (None: keep it).
    fn close_reason(&self, inner: &Inner, s: &Session, now: Instant) -> Option<CloseReason> {
        if s.protocol == SessionProtocol::Wireguard {
            if !self.opts.wireguard.contains(&s.instance) {
                return Some(CloseReason::InterfaceNotConfigured);
            }
            return inner.wg_read.contains_key(&s.instance).then_some(CloseReason::HandshakeExpired);
        }
        match inner.sources.instances.get(&s.instance) {
            Some(_) => match inner.lost.get(&s.instance) {
                Some(since) if now.duration_since(*since) >= self.opts.management_grace => {
                    Some(CloseReason::ManagementLost)
                }
                // Lost only a moment ago: a management restart or stall changes nothing.
                Some(_) => None,
                None if inner.sources.instances[&s.instance].up => Some(CloseReason::Disconnected),
                // Not heard from yet since start: wait for its first snapshot or failure.
                None => None,
            },
            // Listed by a management instance that is no longer configured.
            None if s.source == SessionSource::Management => Some(CloseReason::InstanceNotConfigured),
            // Hook-only clients (no management interface for their instance) leave by the hook.
            None => None,
        }
    }

    /// Redirect every active session of a user with an openvpn connection to its proxy port.
    pub(super) fn sync_redirects(&self, inner: &mut Inner) -> Result<(), crate::steer::SteerError> {
        let users: HashMap<&str, u16> = inner
            .connections
            .iter()
            .filter(|c| c.protocol == ConnectionProtocol::Openvpn)
            .filter_map(|c| Some((c.username.as_deref()?, c.proxy_port?)))
            .collect();
        let want: BTreeMap<IpNet, u16> = inner
            .active
            .values()
            .filter_map(|s| users.get(s.username.as_str()).map(|p| (IpNet::from(s.client_ip), *p)))
            .collect();
        match &mut inner.redirects {
            Some(r) => r.sync(&want),
            None => Ok(()),
        }
    }
}
