//! `tunmeter run`: load, attach, and keep every configured interface attached until stopped.
//!
//! Stopping the daemon leaves the programs attached and the maps pinned, so counting goes on
//! while it is down; `tunmeter detach` removes everything.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use std::sync::Arc;

use futures::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiConfig, App, ServeError},
    attach::{self, AttachError, Attached, Mode},
    clock::{self, ClockError},
    config::{Config, Layer},
    db::{Database, DbError},
    ledger::{Ledger, LedgerConfig, LedgerError, source::KernelSource, store::Granularity},
    links::{LinkTable, Links, LinksError},
    loader::{Instance, LoadError, PinnedMaps, effective_max_clients},
    metrics::Metrics,
    steer::{HostError, SteerError, SteerMaps, host},
    system::{self, SystemError},
    tokens::TokenCache,
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Links(#[from] LinksError),
    #[error(transparent)]
    Clock(#[from] ClockError),
    #[error("interface {0} does not exist (check the name, and that the daemon runs in the right network namespace)")]
    MissingInterface(String),
    #[error(
        "interface {name} is configured as {configured:?} but its link type is {actual}: use --tun for tun/wg devices and --egress for Ethernet ones"
    )]
    WrongLayer { name: String, configured: Layer, actual: String },
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("interrupted while waiting for the database")]
    Interrupted,
    #[error(transparent)]
    Steer(#[from] SteerError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Webhook(#[from] crate::webhook::WebhookError),
}

/// Everything the running daemon owns.
pub struct Dataplane {
    cfg: Config,
    mode: Mode,
    maps: PinnedMaps,
    instances: BTreeMap<Layer, Instance>,
    attached: BTreeMap<String, Attached>,
    _pin_lock: system::DirLock,
    /// What the subnet map holds now (ifindex -> subnets).
    synced_subnets: BTreeMap<u32, Vec<ipnet::IpNet>>,
}

impl Dataplane {
    /// Load programs and attach every configured interface. On error, everything this call
    /// created is removed again (pins of a fresh pin directory included).
    pub fn start(cfg: Config, links: &LinkTable) -> Result<Dataplane, DaemonError> {
        for i in &cfg.interfaces {
            let link = links.get(&i.name).ok_or_else(|| DaemonError::MissingInterface(i.name.clone()))?;
            if link.layer != Some(i.layer) {
                return Err(DaemonError::WrongLayer {
                    name: i.name.clone(),
                    configured: i.layer,
                    actual: link
                        .layer
                        .map(|l| format!("{l:?}"))
                        .unwrap_or_else(|| "neither Ethernet nor raw IP".into()),
                });
            }
        }
        let mode = Mode::resolve(cfg.attach_mode)?;
        let fresh = !cfg.pin_dir.exists();
        if fresh {
            std::fs::create_dir_all(&cfg.pin_dir).map_err(|e| system::io_err(&cfg.pin_dir, e))?;
        }
        // The pin directory is locked too, so `tunmeter detach` refuses whatever state
        // directory it is given while a daemon uses these pins.
        let pin_lock = match system::lock_dir(&cfg.pin_dir) {
            Ok(l) => l,
            Err(e) => {
                if fresh {
                    let _ = remove_pins(&cfg.pin_dir);
                }
                return Err(e.into());
            }
        };
        let mut dp = Dataplane {
            _pin_lock: pin_lock,
            maps: PinnedMaps::new(&cfg.pin_dir),
            cfg,
            mode,
            instances: BTreeMap::new(),
            attached: BTreeMap::new(),
            synced_subnets: BTreeMap::new(),
        };
        match dp.bring_up(links) {
            Ok(()) => Ok(dp),
            Err(e) => {
                dp.roll_back(fresh);
                Err(e)
            }
        }
    }

    fn bring_up(&mut self, links: &LinkTable) -> Result<(), DaemonError> {
        let max = effective_max_clients(&self.cfg.pin_dir, self.cfg.max_clients);
        for layer in self.cfg.interfaces.iter().map(|i| i.layer).collect::<std::collections::BTreeSet<_>>() {
            self.instances
                .insert(layer, Instance::load_with(layer, &self.cfg.pin_dir, max, self.cfg.steer.policy.mark)?);
        }
        self.maps.ensure_reserved_buckets()?;
        // Interfaces attached by an earlier run but no longer configured: stop counting there.
        for name in attach::pinned_interfaces(&self.cfg.pin_dir) {
            if !self.cfg.interfaces.iter().any(|i| i.name == name) {
                attach::detach_interface(&self.cfg.pin_dir, &name, None, Mode::Tcx)?;
                warn!(iface = name, "detached: attached by an earlier run but no longer configured");
            }
        }
        let first = self.instances.values_mut().next().expect("at least one interface");
        clock::pin(first, &self.cfg.pin_dir)?;
        self.reconcile(links)?;
        Ok(())
    }

    /// Remove what this run attached (adopted links stay: they were there before), and the
    /// whole pin directory if this run created it.
    fn roll_back(&mut self, fresh_pin_dir: bool) {
        for (name, a) in std::mem::take(&mut self.attached) {
            if !a.adopted
                && let Err(e) = attach::detach_interface(&self.cfg.pin_dir, &name, Some(a.ifindex), self.mode)
            {
                error!(iface = name, %e, "rollback: detaching failed");
            }
        }
        self.instances.clear();
        if fresh_pin_dir && let Err(e) = remove_pins(&self.cfg.pin_dir) {
            error!(path = %self.cfg.pin_dir.display(), %e, "rollback: removing pins failed");
        }
    }

    /// Make attachments match the devices that exist now: point the subnet map at the current
    /// interface indexes (before attaching, so a device's first packets already find its
    /// subnets), attach new or re-created devices, and forget vanished ones.
    pub fn reconcile(&mut self, links: &LinkTable) -> Result<(), DaemonError> {
        let present = |i: &crate::config::InterfaceConfig| {
            links.get(&i.name).filter(|l| l.layer == Some(i.layer)).map(|l| l.ifindex)
        };
        let wanted: BTreeMap<u32, Vec<ipnet::IpNet>> =
            self.cfg.interfaces.iter().filter_map(|i| present(i).map(|idx| (idx, i.subnets.clone()))).collect();
        if wanted != self.synced_subnets {
            self.maps.sync_subnets(&wanted)?;
            self.synced_subnets = wanted;
        }
        // One failing interface must not keep the others from being (re-)attached: each is
        // tried on its own, and the first error is reported after all were tried.
        let mut first_err = None;
        for i in self.cfg.interfaces.clone() {
            if let Err(e) = self.reconcile_one(&i, present(&i)) {
                error!(iface = i.name, %e, "attaching failed");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn reconcile_one(&mut self, i: &crate::config::InterfaceConfig, now: Option<u32>) -> Result<(), DaemonError> {
        let had = self.attached.get(&i.name).map(|a| a.ifindex);
        if now == had {
            return Ok(());
        }
        if let Some(old) = self.attached.remove(&i.name) {
            warn!(iface = i.name, old_ifindex = old.ifindex, "interface went away; will re-attach when it returns");
            attach::detach_interface(&self.cfg.pin_dir, &i.name, None, self.mode)?;
        }
        if let Some(ifindex) = now {
            let started = Instant::now();
            let inst = self.instances.get_mut(&i.layer).expect("instance loaded for every configured layer");
            let a = attach::attach_interface(inst, &i.name, ifindex, &self.cfg.pin_dir, self.mode)?;
            info!(
                iface = i.name,
                ifindex,
                adopted = a.adopted,
                took_ms = started.elapsed().as_millis() as u64,
                "interface attached"
            );
            self.attached.insert(i.name.clone(), a);
        }
        Ok(())
    }
}

/// Open the database and the ledger, retrying while the database is unreachable (the kernel
/// keeps counting meanwhile, so nothing is lost by waiting). A bad URL or schema fails at once.
async fn open_ledger(cfg: &Config, metrics: Arc<Metrics>, stop: &mut Signals) -> Result<Arc<Ledger>, DaemonError> {
    let lcfg = LedgerConfig {
        node_id: cfg.node_id.clone(),
        poll_interval: Duration::from_millis(cfg.ledger.poll_interval_ms),
        flush_interval: Duration::from_millis(cfg.ledger.flush_interval_ms),
        retention_days: [
            (Granularity::Minute, cfg.ledger.retention_minute_days),
            (Granularity::Hour, cfg.ledger.retention_hour_days),
            (Granularity::Day, cfg.ledger.retention_day_days),
        ],
    };
    let source = Arc::new(KernelSource::new(&cfg.pin_dir));
    let mut warned = false;
    loop {
        let attempt = async {
            let db = Database::open(&cfg.ledger.database_url).await?;
            Ok::<_, DaemonError>(Ledger::open(lcfg.clone(), db, source.clone(), metrics.clone()).await?)
        };
        match attempt.await {
            Ok(l) => return Ok(l),
            Err(e @ (DaemonError::Db(DbError::BadUrl { .. }) | DaemonError::Db(DbError::Migrate { .. }))) => {
                return Err(e);
            }
            Err(e) => {
                if !warned {
                    error!(%e, "database unavailable; counting continues in the kernel, retrying every 2 s");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.recv() => return Err(DaemonError::Interrupted),
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, DaemonError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(DaemonError::Signal)?,
            int: signal(SignalKind::interrupt()).map_err(DaemonError::Signal)?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Run until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    system::check_kernel()?;
    system::check_bpffs(&cfg.pin_dir)?;
    let _lock = system::lock_state_dir(&cfg.state_dir)?;
    let mut signals = Signals::new()?;
    let (links, mut events) = Links::open()?;
    let interval = Duration::from_millis(cfg.reconcile_interval_ms);
    let mut dp = Dataplane::start(cfg, &links.dump().await?)?;
    info!(pin_dir = %dp.cfg.pin_dir.display(), mode = ?dp.mode, interfaces = dp.attached.len(), "counting");
    let steer = SteerMaps::new(&dp.cfg.pin_dir);
    start_steering(&dp.cfg, &steer).await?;

    let metrics = Arc::new(Metrics::default());
    let ledger = open_ledger(&dp.cfg, metrics.clone(), &mut signals).await?;
    let tasks = ledger.spawn();
    let webhooks =
        match crate::webhook::Webhooks::new(ledger.db.clone(), dp.cfg.node_id.clone(), dp.cfg.webhooks.clone()).await {
            Ok(w) => w,
            Err(e) => {
                ledger.shutdown().await;
                return Err(e.into());
            }
        };
    let webhook_task = webhooks.spawn();
    ledger.send_resets_to(webhooks.clone(), api::routes::reset_event);
    // Forward rules of http/socks5 connections live in the pinned maps; re-add any that are
    // missing (new pins after a reboot or a detach). Retried on every tick until it worked.
    let mut connection_rules_synced = sync_connection_rules(&ledger, &dp.cfg.node_id, &steer).await;
    let identity = crate::identity::Identity::new(
        crate::identity::IdentityOptions {
            node_id: dp.cfg.node_id.clone(),
            state_dir: dp.cfg.state_dir.clone(),
            openvpn: dp.cfg.identity.openvpn.clone(),
            openvpn_interfaces: dp.cfg.identity.openvpn_interfaces.clone(),
            wireguard: dp.cfg.identity.wireguard.clone(),
            reconcile: Duration::from_millis(dp.cfg.identity.reconcile_interval_ms),
            device_offline_after_ms: dp.cfg.identity.device_offline_after_secs * 1000,
            management_grace: Duration::from_secs(dp.cfg.identity.management_grace_secs),
        },
        ledger.db.clone(),
        ledger.clone(),
        webhooks.clone(),
        Some(SteerMaps::new(&dp.cfg.pin_dir)),
    );
    let identity_task = identity.spawn();
    let app = Arc::new(App {
        cfg: ApiConfig {
            listen: dp.cfg.api.listen,
            offline_after_ms: dp.cfg.api.offline_after_secs * 1000,
            device_offline_after_ms: dp.cfg.identity.device_offline_after_secs * 1000,
            metrics_max_clients: dp.cfg.api.metrics_max_clients,
            stream_interval: Duration::from_millis(dp.cfg.api.stream_interval_ms),
            stall_timeout: Duration::from_secs(dp.cfg.api.stream_stall_timeout_secs),
        },
        tokens: TokenCache::new(ledger.db.clone(), dp.cfg.node_id.clone()),
        ledger: ledger.clone(),
        metrics,
        hub: Default::default(),
        maps: Some(crate::loader::PinnedMaps::new(&dp.cfg.pin_dir)),
        list_cache: Default::default(),
        webhooks: webhooks.clone(),
        identity: Some(identity.clone()),
    });
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = match api::serve(app, &dp.cfg.state_dir, async move {
        let _ = api_stopped.await;
    })
    .await
    {
        Ok(s) => s,
        Err(e) => {
            identity.shutdown();
            webhooks.shutdown().await;
            ledger.shutdown().await;
            return Err(e.into());
        }
    };
    info!(node = dp.cfg.node_id, "ledger and API running");

    let mut tick = tokio::time::interval(interval);
    // If the event stream ends (socket error), the periodic tick alone keeps reconciling.
    let mut events_open = true;
    loop {
        tokio::select! {
            _ = signals.recv() => break,
            ev = events.next(), if events_open => events_open = ev.is_some(),
            _ = tick.tick() => {}
        }
        // Link events come in bursts (a new tun gets several): one dump per wake-up is enough.
        while let Ok(()) = events.try_recv() {}
        match links.dump().await {
            Ok(table) => {
                if let Err(e) = dp.reconcile(&table) {
                    error!(%e, "reconcile failed; retrying on the next event or tick");
                }
            }
            Err(e) => error!(%e, "listing devices failed"),
        }
        if !connection_rules_synced {
            connection_rules_synced = sync_connection_rules(&ledger, &dp.cfg.node_id, &steer).await;
        }
        if let Err(e) = refresh_steering(&dp.cfg, &steer) {
            error!(%e, "refreshing the bypass set or reserved ports failed; retrying on the next tick");
        }
    }
    info!("stopping; programs stay attached and keep counting (`tunmeter detach` removes them)");
    let _ = api_stop.send(());
    identity.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), identity_task).await;
    webhooks.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), webhook_task).await;
    ledger.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    tasks.join().await;
    let _ = std::fs::remove_file(api::control_socket(&dp.cfg.state_dir));
    Ok(())
}

/// Re-add the forward rules of http/socks5 connections. True when done.
async fn sync_connection_rules(ledger: &Ledger, node: &str, steer: &SteerMaps) -> bool {
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
async fn start_steering(cfg: &Config, steer: &SteerMaps) -> Result<(), DaemonError> {
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
fn refresh_steering(cfg: &Config, steer: &SteerMaps) -> Result<(), DaemonError> {
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

/// Remove map pins, link pins and the pin directory.
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}
