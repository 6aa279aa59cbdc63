//! The identity service: sources in, sessions, redirects and device states out, with one lock
//! around everything that changes sessions.
//!
//! One lock (`inner`) serialises everything that changes sessions: hook calls
//! (`admission.rs`), management snapshots and ticks (`reconcile.rs`). Slow reads (WireGuard
//! peers) and the device monitor run outside it, so a hook never waits for them.

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

use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    ClientIdentity, DeviceRef, SessionRef,
    openvpn::mgmt::MgmtEvent,
    redirects::Redirects,
    sources::{InstanceView, Protocols, Sources, WG_SESSION_TIMEOUT_MS},
    wireguard::{self, WgPeer},
};
use crate::{
    config::OpenvpnInstance,
    db::Database,
    ledger::{Ledger, LedgerError},
    registry::{
        RegistryError,
        connections::Connection,
        devices::{self, Device, Liveness},
        sessions::Session,
    },
    steer::SteerMaps,
    tasks::Tasks,
    time::unix_ms,
    types::{ConnectionProtocol, SessionProtocol},
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
    pub openvpn: Vec<OpenvpnInstance>,
    /// Instance name -> tun device (maps the hook's `dev` to an instance).
    pub openvpn_interfaces: BTreeMap<String, String>,
    pub wireguard: Vec<String>,
    pub reconcile: Duration,
    pub device_offline_after_ms: u64,
    /// Sessions of a lost management instance close after this long.
    pub management_grace: Duration,
}

/// The hook's work must be done within this (the hook gives each attempt 5 s): past it, what
/// the call did is undone and the client is refused.
pub(super) const HOOK_DEADLINE: Duration = Duration::from_secs(4);

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
    devices: HashMap<String, Device>,
    device_by_ip: HashMap<IpAddr, String>,
    /// username -> device id of openvpn connections.
    openvpn_users: HashMap<String, String>,
    /// address -> (public key, latest handshake ms).
    wg: HashMap<IpAddr, (String, Option<u64>)>,
}

/// Mutable state, changed under one lock.
#[derive(Default)]
pub(super) struct Inner {
    pub(super) sources: Sources,
    pub(super) active: HashMap<IpAddr, Session>,
    pub(super) devices: Vec<Device>,
    pub(super) connections: Vec<Connection>,
    /// Instances whose management connection failed, and since when.
    pub(super) lost: BTreeMap<String, Instant>,
    /// WireGuard interfaces read at least once since start, and when they last were.
    pub(super) wg_read: BTreeMap<String, Instant>,
    pub(super) redirects: Option<Redirects>,
    pub(super) loaded: bool,
    /// The last load failed (reported once until it works again).
    pub(super) db_down: bool,
}

pub struct Identity {
    pub(super) opts: IdentityOptions,
    pub(super) db: Database,
    pub(super) ledger: Arc<Ledger>,
    pub(super) hooks: Arc<Webhooks>,
    pub(super) protocols: Protocols,
    pub(super) inner: tokio::sync::Mutex<Inner>,
    view: RwLock<View>,
    pub(super) reload: AtomicBool,
    wake: Notify,
    /// WireGuard interfaces whose last read failed (reported once).
    wg_failing: std::sync::Mutex<BTreeSet<String>>,
}

/// The reads a tick makes outside the lock.
struct TickReads {
    /// Interface -> peers, or None if unreadable this time.
    wg: Vec<(String, Option<Vec<WgPeer>>)>,
}

impl Identity {
    pub fn new(
        opts: IdentityOptions,
        db: Database,
        ledger: Arc<Ledger>,
        hooks: Arc<Webhooks>,
        steer: Option<SteerMaps>,
    ) -> Arc<Identity> {
        let protocols = opts.openvpn.iter().map(|i| (i.name.clone(), i.protocol)).collect();
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
            wg_failing: Default::default(),
        })
    }

    pub(super) fn node(&self) -> &str {
        &self.opts.node_id
    }

    /// What is known of `ip` now.
    pub fn lookup(&self, ip: IpAddr) -> Option<ClientIdentity> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        let s = v.sessions.get(&ip);
        let wg = v.wg.get(&ip);
        let own_device = v.device_by_ip.get(&ip).and_then(|id| v.devices.get(id));
        let via = s.and_then(|s| v.openvpn_users.get(&s.username)).and_then(|dev| v.devices.get(dev));
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
        let now = s.and_then(|_| self.ledger.client(ip)).map(|c| c.total);
        Some(ClientIdentity {
            username: s.and_then(|s| nonempty(&s.username).or_else(|| nonempty(&s.common_name))),
            common_name: s.and_then(|s| nonempty(&s.common_name)),
            protocol: s.map(|s| s.protocol).or(wg.map(|_| SessionProtocol::Wireguard)),
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

    /// Something changed in the database behind the service's back (a session opened or
    /// closed through the API, a connection or device created or deleted): reload soon.
    pub fn changed(&self) {
        self.reload.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Rebuild what `lookup` reads.
    pub(super) fn publish(&self, inner: &Inner) {
        let mut v = View {
            sessions: inner.active.clone(),
            devices: inner.devices.iter().map(|d| (d.id.clone(), d.clone())).collect(),
            device_by_ip: inner.devices.iter().map(|d| (d.vpn_ip, d.id.clone())).collect(),
            openvpn_users: inner
                .connections
                .iter()
                .filter(|c| c.protocol == ConnectionProtocol::Openvpn)
                .filter_map(|c| Some((c.username.clone()?, c.device_id.clone())))
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

    fn on_mgmt(&self, inner: &mut Inner, ev: MgmtEvent) {
        match ev {
            MgmtEvent::Snapshot { instance, clients } => {
                if inner.lost.remove(&instance).is_some() {
                    info!(instance, clients = clients.len(), "openvpn management is back");
                }
                let v = inner.sources.instances.entry(instance).or_default();
                v.up = true;
                v.clients = clients;
            }
            MgmtEvent::Lost { instance, error } => {
                if !inner.lost.contains_key(&instance) {
                    error!(
                        instance,
                        error,
                        grace_s = self.opts.management_grace.as_secs(),
                        "openvpn management interface lost; its sessions close unless it is back within the grace period"
                    );
                    inner.lost.insert(instance.clone(), Instant::now());
                }
                let v = inner.sources.instances.entry(instance).or_default();
                v.up = false;
                v.clients.clear();
            }
        }
    }

    /// Read every WireGuard interface (outside the lock: `wg` may take a while).
    async fn read_wireguard(&self) -> TickReads {
        let mut wg = Vec::new();
        for iface in &self.opts.wireguard {
            let r = wireguard::read_peers(iface).await;
            let mut failing = self.wg_failing.lock().unwrap_or_else(|p| p.into_inner());
            match r {
                Ok(peers) => {
                    if failing.remove(iface) {
                        info!(iface, "WireGuard peers readable again");
                    }
                    wg.push((iface.clone(), Some(peers)));
                }
                Err(e) => {
                    if failing.insert(iface.clone()) {
                        warn!(iface, %e, "reading WireGuard peers failed; retrying every tick");
                    }
                    wg.push((iface.clone(), None));
                }
            }
        }
        TickReads { wg }
    }

    fn take_reads(&self, inner: &mut Inner, reads: TickReads) {
        let now = Instant::now();
        for (iface, peers) in reads.wg {
            match peers {
                Some(p) => {
                    inner.sources.wg.insert(iface.clone(), p);
                    inner.wg_read.insert(iface, now);
                }
                // Unreadable for longer than a handshake lives: nobody is connected there.
                None => {
                    let stale = inner
                        .wg_read
                        .get(&iface)
                        .is_none_or(|t| now.duration_since(*t) > Duration::from_millis(WG_SESSION_TIMEOUT_MS));
                    if stale {
                        inner.sources.wg.insert(iface.clone(), Vec::new());
                        inner.wg_read.insert(iface, now);
                    }
                }
            }
        }
    }

    /// One device monitor pass (outside the lock).
    async fn monitor_devices(&self) {
        let wg: HashMap<IpAddr, Option<u64>> = {
            let v = self.view.read().unwrap_or_else(|p| p.into_inner());
            if v.devices.is_empty() {
                return;
            }
            v.wg.iter().map(|(ip, (_, hs))| (*ip, *hs)).collect()
        };
        let ledger = self.ledger.clone();
        let liveness = move |ip: IpAddr| Liveness {
            last_seen_ms: ledger.client(ip).and_then(|c| c.last_seen_ms()),
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
                self.changed();
            }
            Ok(_) => {}
            Err(e) => error!(%e, "device monitor pass failed; retrying on the next tick"),
        }
    }

    /// Run the service as a task of `tasks` until its token is cancelled: management
    /// instances, WireGuard reads, reconcile ticks.
    pub fn spawn(self: &Arc<Self>, tasks: &mut Tasks) {
        tasks.spawn("identity", self.clone().run(tasks.token()));
    }

    async fn run(self: Arc<Self>, stop: CancellationToken) -> Result<(), std::convert::Infallible> {
        let me = self;
        {
            let (tx, mut rx) = mpsc::channel(64);
            // One task per management interface; dropped (aborted) with this set.
            let mut instances = tokio::task::JoinSet::new();
            for cfg in me.opts.openvpn.clone() {
                instances.spawn(super::openvpn::mgmt::run_instance(cfg, tx.clone()));
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
                    _ = stop.cancelled() => break,
                };
                let is_tick = matches!(wake, Wake::Tick);
                let reads = if is_tick { Some(me.read_wireguard().await) } else { None };
                {
                    let mut inner = me.inner.lock().await;
                    match wake {
                        Wake::Mgmt(ev) => {
                            me.on_mgmt(&mut inner, ev);
                            // Drain a burst (both instances answer at once).
                            while let Ok(ev) = rx.try_recv() {
                                me.on_mgmt(&mut inner, ev);
                            }
                        }
                        Wake::Tick | Wake::Changed => {}
                    }
                    if let Some(r) = reads {
                        me.take_reads(&mut inner, r);
                    }
                    me.apply(&mut inner).await;
                    me.publish(&inner);
                }
                if is_tick {
                    me.monitor_devices().await;
                }
            }
            instances.abort_all();
        }
        Ok(())
    }
}
