//! `tunmeter run`: load, attach and keep every configured interface attached until stopped,
//! with the ledger, identity, webhooks and the API around the dataplane. One start order and
//! one shutdown path: background tasks run in two `Tasks` groups, the front (API, identity,
//! webhooks) and the ledger, stopped in that order so the ledger's last flush comes last.
//!
//! Stopping the daemon leaves the programs attached and the maps pinned, so counting goes on
//! while it is down; `tunmeter detach` removes everything.

mod dataplane;
mod error;
mod steering;

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

pub use dataplane::Dataplane;
pub use error::DaemonError;

use crate::{
    api::{self, ApiConfig, App},
    bpf::{
        links::{LinkEvents, Links},
        loader::PinnedMaps,
        system,
    },
    config::Config,
    control,
    db::{Database, DbError},
    identity::{Identity, IdentityOptions},
    ledger::{Ledger, LedgerConfig, source::KernelSource, store::Granularity},
    selfcheck::{SelfCheck, SelfCheckConfig},
    steer::SteerMaps,
    tasks::Tasks,
    tokens::TokenCache,
    webhook::Webhooks,
};

/// How long the front tasks may take to stop before they are aborted.
const FRONT_GRACE: Duration = Duration::from_secs(5);
/// How long the ledger's last reading and flush may take.
const LEDGER_GRACE: Duration = Duration::from_secs(30);

/// Run until SIGINT/SIGTERM.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    bound_malloc();
    system::check_kernel()?;
    system::check_bpffs(&cfg.pin_dir)?;
    let _lock = system::lock_state_dir(&cfg.state_dir)?;
    let mut signals = Signals::new()?;
    let (links, events) = Links::open()?;
    let mut dp = Dataplane::start(cfg, &links.dump().await?)?;
    info!(pin_dir = %dp.cfg.pin_dir.display(), mode = ?dp.mode, interfaces = dp.attached.len(), "counting");
    let steer = SteerMaps::new(&dp.cfg.pin_dir);
    steering::start_steering(&dp.cfg, &steer).await?;
    let ledger = open_ledger(&dp.cfg, &mut signals).await?;
    carry_over_legacy(&ledger, &dp.cfg.pin_dir, &mut signals).await?;
    let mut back = Tasks::new();
    let mut front = Tasks::new();
    ledger.spawn(&mut back);
    let served = serve(&mut dp, &ledger, &steer, (links, events), &mut signals, &mut front).await;
    if let Err(e) = &served {
        error!(%e, "stopping after an error");
    }
    info!("stopping; programs stay attached and keep counting (`tunmeter detach` removes them)");
    front.shutdown(FRONT_GRACE).await;
    back.shutdown(LEDGER_GRACE).await;
    control::server::remove(&control::socket_path(&dp.cfg.state_dir));
    if let Some(p) = &dp.cfg.api.hook_socket {
        control::server::remove(p);
    }
    served
}

/// Start the front (webhooks, identity, API) in `front`, then reconcile on link events and
/// ticks until a signal.
async fn serve(
    dp: &mut Dataplane,
    ledger: &Arc<Ledger>,
    steer: &SteerMaps,
    (links, mut events): (Links, LinkEvents),
    signals: &mut Signals,
    front: &mut Tasks,
) -> Result<(), DaemonError> {
    let cfg = dp.cfg.clone();
    let webhooks = Webhooks::new(ledger.db.clone(), cfg.node_id.clone(), cfg.webhooks.clone()).await?;
    webhooks.spawn(front);
    ledger.send_resets_to(webhooks.clone(), api::views::reset_event);
    // Forward rules of http/socks5 connections live in the pinned maps; re-add any that are
    // missing (new pins after a reboot or a detach). Retried on every tick until it worked.
    let mut connection_rules_synced = steering::sync_connection_rules(ledger, &cfg.node_id, steer).await;
    let identity = Identity::new(
        IdentityOptions {
            node_id: cfg.node_id.clone(),
            state_dir: cfg.state_dir.clone(),
            openvpn: cfg.identity.openvpn.clone(),
            openvpn_interfaces: cfg.identity.openvpn_interfaces.clone(),
            wireguard: cfg.identity.wireguard.clone(),
            reconcile: Duration::from_millis(cfg.identity.reconcile_interval_ms),
            device_offline_after_ms: cfg.identity.device_offline_after_secs * 1000,
            management_grace: Duration::from_secs(cfg.identity.management_grace_secs),
        },
        ledger.db.clone(),
        ledger.clone(),
        webhooks.clone(),
        Some(SteerMaps::new(&cfg.pin_dir)),
    );
    identity.spawn(front);
    let selfcheck = SelfCheck::new(
        SelfCheckConfig {
            interval: Duration::from_millis(cfg.ledger.poll_interval_ms),
            threshold_packets: cfg.ledger.drift_threshold_packets,
            polls: cfg.ledger.drift_polls,
        },
        PinnedMaps::new(&cfg.pin_dir),
        Some(webhooks.clone()),
    );
    selfcheck.watch(dp.watched());
    selfcheck.spawn(front);
    let app = Arc::new(App {
        cfg: ApiConfig {
            listen: cfg.api.listen,
            offline_after_ms: cfg.api.offline_after_secs * 1000,
            device_offline_after_ms: cfg.identity.device_offline_after_secs * 1000,
            metrics_max_clients: cfg.api.metrics_max_clients,
            stream_interval: Duration::from_millis(cfg.api.stream_interval_ms),
            stall_timeout: Duration::from_secs(cfg.api.stream_stall_timeout_secs),
            max_connections: cfg.api.max_connections,
            max_stream_subscribers: cfg.api.max_stream_subscribers,
            hook_group: cfg.api.hook_group.clone(),
            hook_socket: cfg.api.hook_socket.clone(),
        },
        tokens: TokenCache::new(ledger.db.clone(), cfg.node_id.clone()),
        ledger: ledger.clone(),
        hub: Default::default(),
        tickets: Default::default(),
        maps: Some(PinnedMaps::new(&cfg.pin_dir)),
        list_cache: Default::default(),
        webhooks: webhooks.clone(),
        identity: Some(identity.clone()),
        selfcheck: Some(selfcheck.clone()),
        shutdown: front.token(),
    });
    api::serve(app, &cfg.state_dir, front).await?;
    info!(node = cfg.node_id, "ledger and API running");

    let mut tick = tokio::time::interval(Duration::from_millis(cfg.reconcile_interval_ms));
    // If the event stream ends (socket error), the periodic tick alone keeps reconciling.
    let mut events_open = true;
    loop {
        tokio::select! {
            _ = signals.recv() => return Ok(()),
            ev = events.next(), if events_open => events_open = ev.is_some(),
            _ = tick.tick() => {}
            // A front task that ends on its own is logged by `next_exit`; the rest keeps going.
            _ = front.next_exit() => continue,
        }
        // Link events come in bursts (a new tun gets several): one dump per wake-up is enough.
        while let Ok(()) = events.try_recv() {}
        match links.dump().await {
            Ok(table) => {
                if let Err(e) = dp.reconcile(&table) {
                    error!(%e, "reconcile failed; retrying on the next event or tick");
                }
                selfcheck.watch(dp.watched());
            }
            Err(e) => error!(%e, "listing devices failed"),
        }
        if !connection_rules_synced {
            connection_rules_synced = steering::sync_connection_rules(ledger, &cfg.node_id, steer).await;
        }
        if let Err(e) = steering::refresh_steering(&cfg, steer) {
            error!(%e, "refreshing the bypass set or reserved ports failed; retrying on the next tick");
        }
    }
}

/// Open the database and the ledger, retrying while the database is unreachable (the kernel
/// keeps counting meanwhile, so nothing is lost by waiting). A bad URL or schema fails at once.
async fn open_ledger(cfg: &Config, stop: &mut Signals) -> Result<Arc<Ledger>, DaemonError> {
    let lcfg = LedgerConfig {
        node_id: cfg.node_id.clone(),
        poll_interval: Duration::from_millis(cfg.ledger.poll_interval_ms),
        flush_interval: Duration::from_millis(cfg.ledger.flush_interval_ms),
        retention_days: [
            (Granularity::Minute, cfg.ledger.retention_minute_days),
            (Granularity::Hour, cfg.ledger.retention_hour_days),
            (Granularity::Day, cfg.ledger.retention_day_days),
        ],
        max_pending_rows: cfg.ledger.max_pending_rows as usize,
    };
    let source = Arc::new(KernelSource::new(&cfg.pin_dir));
    let mut warned = false;
    loop {
        let attempt = async {
            let db = Database::open(&cfg.ledger.database_url).await?;
            Ok::<_, DaemonError>(Ledger::open(lcfg.clone(), db, source.clone()).await?)
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

/// Before the poller starts: carry an earlier version's per-CPU client map over into the
/// ledger, retrying while the database is unreachable (the new map counts meanwhile).
async fn carry_over_legacy(ledger: &Ledger, pin_dir: &std::path::Path, stop: &mut Signals) -> Result<(), DaemonError> {
    let mut warned = false;
    loop {
        match ledger.carry_over_legacy(pin_dir).await {
            Ok(_) => return Ok(()),
            Err(e) if !warned => {
                error!(%e, "carrying the earlier version's counters over failed; retrying every 2 s");
                warned = true;
            }
            Err(_) => {}
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

/// Keep the allocator from holding on to freed memory: glibc raises its mmap threshold after
/// each large free (up to 32 MiB), after which the ledger's large per-poll and per-flush
/// buffers come from arenas that fragment and never shrink, and every thread may get an arena
/// of its own. A fixed threshold returns each large buffer to the kernel when it is freed; two
/// arenas are plenty for a daemon whose threads mostly wait.
fn bound_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; it is called before the daemon starts
    // its threads' work and takes no pointers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
