//! The identity service: sources in, sessions, redirects and device states out.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tracing::{error, info, warn};

use super::{
    ClientIdentity, DeviceRef, SessionRef,
    openvpn::{
        hook::{HookCall, HookKind},
        mgmt::{InstanceConfig, MgmtEvent},
    },
    redirects::Redirects,
    sources::{HookSeen, InstanceView, Protocols, Sources, Wanted},
    wireguard,
};
use crate::{
    clock::unix_ms,
    db::Database,
    ledger::{Ledger, LedgerError, state::Totals},
    registry::{
        RegistryError,
        connections::{self, Connection},
        devices::{self, Device, Liveness},
        sessions::{self, NewSession, Session},
    },
    steer::SteerMaps,
    webhook::Webhooks,
};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<LedgerError> for IdentityError {
    fn from(e: LedgerError) -> Self {
        IdentityError::Unavailable(format!("the ledger cannot admit the client: {e}"))
    }
}

impl From<RegistryError> for IdentityError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Conflict(m) => IdentityError::Conflict(m),
            RegistryError::BadId(_) | RegistryError::Invalid(_) | RegistryError::NotFound { .. } => {
                IdentityError::BadRequest(e.to_string())
            }
            RegistryError::Db(_) | RegistryError::Steer(_) => IdentityError::Unavailable(e.to_string()),
        }
    }
}

/// What the service is configured with.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    pub node_id: String,
    pub state_dir: PathBuf,
    pub openvpn: Vec<InstanceConfig>,
    /// Instance name -> tun device (maps the hook's `dev` to an instance).
    pub openvpn_interfaces: BTreeMap<String, String>,
    pub wireguard: Vec<String>,
    pub reconcile: Duration,
    pub device_offline_after_ms: u64,
}

/// A session the hook call opened or closed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HookSession {
    pub id: String,
    pub client_ip: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HookReply {
    pub sessions: Vec<HookSession>,
}

/// What `lookup` reads (rebuilt after every change).
#[derive(Default)]
struct View {
    sessions: HashMap<IpAddr, Session>,
    devices: Vec<Device>,
    /// username -> (device id, proxy port) of openvpn connections.
    openvpn_users: HashMap<String, (String, u16)>,
    /// address -> (public key, latest handshake ms).
    wg: HashMap<IpAddr, (String, Option<u64>)>,
}

/// Mutable state, changed under one lock (hook calls, snapshots and ticks are serialised).
#[derive(Default)]
struct Inner {
    sources: Sources,
    active: HashMap<IpAddr, Session>,
    devices: Vec<Device>,
    connections: Vec<Connection>,
    /// Instances whose management connection failed (their sessions were closed).
    lost: BTreeSet<String>,
    /// WireGuard interfaces read at least once since start.
    wg_read: BTreeSet<String>,
    redirects: Option<Redirects>,
    loaded: bool,
}

pub struct Identity {
    opts: IdentityOptions,
    db: Database,
    ledger: Arc<Ledger>,
    hooks: Arc<Webhooks>,
    protocols: Protocols,
    inner: tokio::sync::Mutex<Inner>,
    view: RwLock<View>,
    reload: AtomicBool,
    wake: Notify,
    stop: Notify,
}

impl Identity {
    pub fn new(
        opts: IdentityOptions,
        db: Database,
        ledger: Arc<Ledger>,
        hooks: Arc<Webhooks>,
        steer: Option<SteerMaps>,
    ) -> Arc<Identity> {
        let protocols = opts.openvpn.iter().map(|i| (i.name.clone(), i.protocol.clone())).collect();
        let mut inner = Inner { redirects: steer.map(|s| Redirects::new(s, &opts.state_dir)), ..Inner::default() };
        for i in &opts.openvpn {
            inner.sources.instances.insert(i.name.clone(), InstanceView::default());
        }
        Arc::new(Identity {
            opts,
            db,
            ledger,
            hooks,
            protocols,
            inner: tokio::sync::Mutex::new(inner),
            view: RwLock::new(View::default()),
            reload: AtomicBool::new(true),
            wake: Notify::new(),
            stop: Notify::new(),
        })
    }

    fn node(&self) -> &str {
        &self.opts.node_id
    }

    /// What is known of `ip` now.
    pub fn lookup(&self, ip: IpAddr) -> Option<ClientIdentity> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        let s = v.sessions.get(&ip);
        let wg = v.wg.get(&ip);
        let own_device = v.devices.iter().find(|d| d.vpn_ip == ip);
        let via = s
            .and_then(|s| v.openvpn_users.get(&s.username))
            .and_then(|(dev, _)| v.devices.iter().find(|d| &d.id == dev));
        if s.is_none() && wg.is_none() && own_device.is_none() {
            return None;
        }
        let device = own_device.map(|d| (d, "self")).or(via.map(|d| (d, "via"))).map(|(d, relation)| DeviceRef {
            id: d.id.clone(),
            name: d.name.clone(),
            relation,
            status: d.status.clone(),
        });
        let nonempty = |x: &str| (!x.is_empty()).then(|| x.to_string());
        let now = self.ledger.client(ip).map(|c| c.total);
        Some(ClientIdentity {
            username: s.and_then(|s| nonempty(&s.username).or_else(|| nonempty(&s.common_name))),
            common_name: s.and_then(|s| nonempty(&s.common_name)),
            protocol: s.map(|s| s.protocol.clone()).or(wg.map(|_| "wireguard".into())),
            instance: s.and_then(|s| nonempty(&s.instance)),
            real_address: s.and_then(|s| nonempty(&s.real_address)),
            wg_public_key: wg.map(|w| w.0.clone()),
            latest_handshake_unix_ms: wg.and_then(|w| w.1),
            session: s.map(|s| {
                let t = now.unwrap_or_default();
                SessionRef {
                    id: s.id.clone(),
                    opened_unix_ms: s.opened_unix_ms,
                    upload_bytes: t.up_bytes.saturating_sub(s.start_up_bytes),
                    download_bytes: t.down_bytes.saturating_sub(s.start_down_bytes),
                }
            }),
            device,
        })
    }

    /// Latest WireGuard handshake of `ip`, if it is a peer's address.
    pub fn wg_handshake_ms(&self, ip: IpAddr) -> Option<u64> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).wg.get(&ip).and_then(|w| w.1)
    }

    /// Something changed in the database behind the service's back (a session opened or
    /// closed through the API, a connection or device created or deleted): reload soon.
    pub fn changed(&self) {
        self.reload.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

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
            protocol: self.protocols.get(&instance).cloned().unwrap_or_else(|| "openvpn".into()),
            instance,
            common_name: call.common_name.clone(),
            username: call.username.clone().unwrap_or_default(),
            real_address: call.real_address.clone(),
            source: "hook",
        };
        let mut inner = self.inner.lock().await;
        self.load(&mut inner).await?;
        let now = Instant::now();
        let mut reply = HookReply { sessions: Vec::new() };
        match call.kind {
            HookKind::ClientConnect => {
                for ip in &ips {
                    inner.sources.gone.remove(&(*ip, wanted.real_address.clone()));
                    inner.sources.hooks.insert(*ip, HookSeen { wanted: wanted.clone(), at: now });
                    let s = self.ensure_session(&mut inner, *ip, &wanted, true).await?;
                    reply.sessions.push(HookSession { id: s.id, client_ip: ip.to_string() });
                }
                info!(cn = call.common_name, username = wanted.username, addresses = ?ips, instance = wanted.instance, "openvpn client connected (hook)");
            }
            HookKind::ClientDisconnect => {
                for ip in &ips {
                    inner.sources.gone.insert((*ip, wanted.real_address.clone()), now);
                    if inner.sources.hooks.get(ip).is_some_and(|h| h.wanted.real_address == wanted.real_address) {
                        inner.sources.hooks.remove(ip);
                    }
                    let same = inner.active.get(ip).filter(|s| s.real_address == wanted.real_address).cloned();
                    if let Some(s) = same {
                        let closed = self.close_session(&mut inner, &s, "disconnected").await?;
                        reply.sessions.push(HookSession { id: closed.id, client_ip: ip.to_string() });
                    }
                }
                info!(cn = call.common_name, addresses = ?ips, "openvpn client disconnected (hook)");
            }
        }
        if let Err(e) = self.sync_redirects(&mut inner) {
            // Fail closed: a client whose redirect could not be installed is not admitted.
            if call.kind == HookKind::ClientConnect {
                return Err(IdentityError::Unavailable(format!("installing the redirect rule failed: {e}")));
            }
            error!(%e, "removing redirect rules after a disconnect failed; retrying on the next tick");
        }
        self.publish(&inner);
        Ok(reply)
    }

    fn instance_of_dev(&self, dev: &str) -> String {
        if let Some((name, _)) = self.opts.openvpn_interfaces.iter().find(|(_, d)| d.as_str() == dev) {
            return name.clone();
        }
        match self.opts.openvpn.as_slice() {
            [only] => only.name.clone(),
            _ => dev.to_string(),
        }
    }

    /// Reload sessions, devices and connections from the database when asked to.
    async fn load(&self, inner: &mut Inner) -> Result<(), IdentityError> {
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
                inner.active = active.into_iter().map(|s| (s.client_ip, s)).collect();
                inner.devices = devs;
                inner.connections = conns;
                inner.loaded = true;
                Ok(())
            }
            Err(e) => {
                self.reload.store(true, Ordering::SeqCst);
                error!(db = %self.db.shown_url, %e, "loading sessions, devices and connections failed; retrying");
                Err(IdentityError::Unavailable(format!("database: {e}")))
            }
        }
    }

    /// Make `ip`'s active session the one `w` describes: keep it if it is that connection,
    /// else close what is there ("superseded") and open a new one. `force` (the hook): a
    /// session opened through the API is superseded too.
    async fn ensure_session(
        &self,
        inner: &mut Inner,
        ip: IpAddr,
        w: &Wanted,
        force: bool,
    ) -> Result<Session, IdentityError> {
        let existing = inner.active.get(&ip).cloned();
        if let Some(s) = &existing {
            if s.instance == w.instance && s.real_address == w.real_address {
                return Ok(s.clone());
            }
            if s.source == "api" && !force {
                return Ok(s.clone());
            }
        }
        let start = self.ledger.admit(ip).await?;
        let new = NewSession {
            client_ip: ip,
            protocol: w.protocol.clone(),
            instance: w.instance.clone(),
            common_name: w.common_name.clone(),
            username: w.username.clone(),
            real_address: w.real_address.clone(),
            source: w.source,
            start,
        };
        // Another connection holds the address: close it ("superseded") and open the new one
        // in one transaction, so the address is never without a session in between.
        let opened = if existing.is_some() {
            sessions::replace(&self.db, self.node(), &self.hooks, &new, unix_ms()).await.map(|r| r.opened)
        } else {
            sessions::open(&self.db, self.node(), &self.hooks, &new, unix_ms()).await
        };
        match opened {
            Ok(s) => {
                inner.active.insert(ip, s.clone());
                Ok(s)
            }
            Err(e) => {
                // A session opened or closed elsewhere (the API) in between: reload to see it.
                self.reload.store(true, Ordering::SeqCst);
                error!(%ip, %e, "opening a session failed");
                Err(e.into())
            }
        }
    }

    async fn close_session(&self, inner: &mut Inner, s: &Session, reason: &str) -> Result<Session, IdentityError> {
        let end = self.ledger.client(s.client_ip).map(|c| c.total).unwrap_or(Totals {
            up_bytes: s.start_up_bytes,
            down_bytes: s.start_down_bytes,
            ..Totals::default()
        });
        match sessions::close(&self.db, self.node(), &self.hooks, &s.id, reason, end, unix_ms()).await {
            Ok(c) => {
                inner.active.remove(&s.client_ip);
                Ok(c)
            }
            Err(RegistryError::Conflict(_) | RegistryError::NotFound { .. }) => {
                // Closed elsewhere already (the API): nothing left to do.
                inner.active.remove(&s.client_ip);
                Ok(s.clone())
            }
            Err(e) => {
                error!(ip = %s.client_ip, session = s.id, reason, %e, "closing a session failed; retrying on the next tick");
                Err(e.into())
            }
        }
    }

    /// Bring sessions in line with the sources.
    async fn apply(&self, inner: &mut Inner) {
        if self.load(inner).await.is_err() {
            return;
        }
        let now = Instant::now();
        inner.sources.expire(now);
        let wanted = inner.sources.wanted(&self.protocols, now, unix_ms());
        for (ip, w) in &wanted {
            if let Err(e) = self.ensure_session(inner, *ip, w, false).await {
                warn!(%ip, %e, "session not opened; retrying on the next tick");
            }
        }
        let stale: Vec<(Session, &'static str)> = inner
            .active
            .values()
            .filter(|s| s.source != "api" && !wanted.contains_key(&s.client_ip))
            .filter_map(|s| self.close_reason(inner, s).map(|r| (s.clone(), r)))
            .collect();
        for (s, reason) in stale {
            let _ = self.close_session(inner, &s, reason).await;
        }
        if let Err(e) = self.sync_redirects(inner) {
            error!(%e, "updating the redirect rules of openvpn users failed; retrying on the next tick");
        }
    }

    /// Why an active session that no source lists should close now (None: keep it).
    fn close_reason(&self, inner: &Inner, s: &Session) -> Option<&'static str> {
        if s.protocol == "wireguard" {
            if !self.opts.wireguard.contains(&s.instance) {
                return Some("interface_not_configured");
            }
            return inner.wg_read.contains(&s.instance).then_some("handshake_expired");
        }
        match inner.sources.instances.get(&s.instance) {
            Some(_) if inner.lost.contains(&s.instance) => Some("management_lost"),
            Some(v) if v.up => Some("disconnected"),
            // Not heard from yet since start: wait for its first snapshot or failure.
            Some(_) => None,
            // Hook-only clients (no management interface for their instance) leave by the hook.
            None => None,
        }
    }

    fn sync_redirects(&self, inner: &mut Inner) -> Result<(), crate::steer::SteerError> {
        let users: HashMap<&str, u16> = inner
            .connections
            .iter()
            .filter(|c| c.protocol == "openvpn")
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

    /// Rebuild what `lookup` reads.
    fn publish(&self, inner: &Inner) {
        let mut v = View {
            sessions: inner.active.clone(),
            devices: inner.devices.clone(),
            openvpn_users: inner
                .connections
                .iter()
                .filter(|c| c.protocol == "openvpn")
                .filter_map(|c| Some((c.username.clone()?, (c.device_id.clone(), c.proxy_port?))))
                .collect(),
            wg: HashMap::new(),
        };
        for peers in inner.sources.wg.values() {
            for p in peers {
                for n in p.allowed_ips.iter().filter(|n| n.prefix_len() == n.max_prefix_len()) {
                    v.wg.insert(n.addr(), (p.public_key.clone(), p.latest_handshake_unix.map(|s| s * 1000)));
                }
            }
        }
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = v;
    }

    async fn on_mgmt(&self, inner: &mut Inner, ev: MgmtEvent) {
        match ev {
            MgmtEvent::Snapshot { instance, clients } => {
                if inner.lost.remove(&instance) {
                    info!(instance, clients = clients.len(), "openvpn management is back");
                }
                let v = inner.sources.instances.entry(instance).or_default();
                v.up = true;
                v.clients = clients;
                v.at = Some(Instant::now());
            }
            MgmtEvent::Lost { instance, error } => {
                if inner.lost.insert(instance.clone()) {
                    error!(instance, error, "openvpn management interface lost; closing its sessions");
                }
                let v = inner.sources.instances.entry(instance).or_default();
                v.up = false;
                v.clients.clear();
            }
        }
    }

    async fn read_wireguard(&self, inner: &mut Inner) {
        for iface in &self.opts.wireguard {
            match wireguard::read_peers(iface).await {
                Ok(peers) => {
                    inner.sources.wg.insert(iface.clone(), peers);
                    inner.wg_read.insert(iface.clone());
                }
                Err(e) => {
                    // Unreadable: keep the last list (sessions stay) and say so once per tick.
                    warn!(iface, %e, "reading WireGuard peers failed");
                }
            }
        }
    }

    async fn monitor_devices(&self, inner: &mut Inner) {
        if inner.devices.is_empty() {
            return;
        }
        let ledger = self.ledger.clone();
        let wg: HashMap<IpAddr, Option<u64>> = inner
            .sources
            .wg
            .values()
            .flatten()
            .flat_map(|p| p.allowed_ips.iter().map(move |n| (n.addr(), p.latest_handshake_unix.map(|s| s * 1000))))
            .collect();
        let liveness = move |ip: IpAddr| Liveness {
            last_seen_ms: ledger.client(ip).and_then(|c| c.last_seen_ms),
            latest_handshake_ms: wg.get(&ip).copied().flatten(),
        };
        match devices::monitor_pass(
            &self.db,
            self.node(),
            &self.hooks,
            &liveness,
            self.opts.device_offline_after_ms,
            unix_ms(),
        )
        .await
        {
            Ok(changed) if !changed.is_empty() => {
                self.hooks.wake();
                for d in &changed {
                    info!(device = d.name, ip = %d.vpn_ip, status = d.status, "device status changed");
                }
                self.reload.store(true, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => error!(%e, "device monitor pass failed; retrying on the next tick"),
        }
    }

    /// Run the service: management instances, WireGuard reads, reconcile ticks.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(64);
            let mut tasks = Vec::new();
            for cfg in me.opts.openvpn.clone() {
                tasks.push(tokio::spawn(super::openvpn::mgmt::run_instance(cfg, tx.clone())));
            }
            drop(tx);
            let mut tick = tokio::time::interval(me.opts.reconcile);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            enum Wake {
                Mgmt(MgmtEvent),
                Tick,
                Changed,
            }
            loop {
                let wake = tokio::select! {
                    Some(ev) = rx.recv() => Wake::Mgmt(ev),
                    _ = tick.tick() => Wake::Tick,
                    _ = me.wake.notified() => Wake::Changed,
                    _ = me.stop.notified() => break,
                };
                let mut inner = me.inner.lock().await;
                match wake {
                    Wake::Mgmt(ev) => {
                        me.on_mgmt(&mut inner, ev).await;
                        // Drain a burst (both instances answer at once).
                        while let Ok(ev) = rx.try_recv() {
                            me.on_mgmt(&mut inner, ev).await;
                        }
                    }
                    Wake::Tick => {
                        me.read_wireguard(&mut inner).await;
                        me.monitor_devices(&mut inner).await;
                    }
                    Wake::Changed => {}
                }
                me.apply(&mut inner).await;
                me.publish(&inner);
            }
            for t in tasks {
                t.abort();
            }
        })
    }

    pub fn shutdown(&self) {
        self.stop.notify_one();
    }
}
