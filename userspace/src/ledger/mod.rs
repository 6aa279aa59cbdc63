//! The usage ledger: kernel counters polled into a database, with lossless resets. Owns the
//! poller and the single writer, and the state both share.
//!
//! - `state`: the ledger in memory (cursors, totals, periods, pending usage).
//! - `store`: the SQL (batched upserts; history; resets).
//! - `writer`: the flush (pending usage written a group of clients per transaction).
//! - `source`: where readings come from (the pinned kernel map).
//! - `legacy`: an earlier version's per-CPU client map, carried over once after an upgrade.
//!
//! Two tasks run: the poller reads the kernel map every `poll_interval` and folds it into the
//! state (it never waits for the database), and the single writer takes everything pending every
//! `flush_interval` and writes it, a group of clients per transaction. While the database is down, pending usage
//! accumulates (one row per active client and minute) and is written when it returns. Resets go
//! through the writer too, so they are ordered with the usage around them.

pub mod legacy;
pub mod source;
pub mod state;
pub mod store;
mod writer;

use std::{
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{db::Database, tasks::Tasks, time::unix_ms};
use source::Source;
use state::{ClientState, ResetRecord, State};
use store::Granularity;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("no client {0} on this node")]
    UnknownClient(IpAddr),
    #[error("database unavailable, nothing was changed: {0}")]
    Unavailable(sqlx::Error),
    #[error("the ledger is shutting down")]
    ShuttingDown,
    #[error("loading the ledger from the database: {0}")]
    Load(sqlx::Error),
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub node_id: String,
    pub poll_interval: Duration,
    pub flush_interval: Duration,
    /// Days to keep minute, hour and day rows (0 = forever).
    pub retention_days: [(Granularity, u32); 3],
    /// Pending usage rows beyond two a client before the oldest are folded into coarser ones
    /// (0: no bound).
    pub max_pending_rows: usize,
}

/// Ledger health, for `/healthz`, stats and metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Health {
    pub database_up: bool,
    pub last_poll_ms: f64,
    pub last_flush_ms: f64,
    pub last_flush_unix_ms: Option<u64>,
    /// When the latest poll that read the kernel maps succeeded.
    pub last_poll_ok_unix_ms: Option<u64>,
    /// When the latest flush attempt succeeded (an empty one included).
    pub last_flush_ok_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub polls: u64,
    pub poll_errors: u64,
    /// Batches written.
    pub flushes: u64,
    pub flush_errors: u64,
    /// Flush attempts that succeeded, empty ones included (what "everything read so far is
    /// written" waits for).
    pub flush_cycles: u64,
}

/// How long polls and flushes take, as histograms (rendered by the API's `/metrics`).
pub struct Timings {
    pub poll_seconds: Histogram,
    pub flush_seconds: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        // 100 µs .. ~6.5 s
        Timings {
            poll_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
        }
    }
}

struct ResetRequest {
    ip: IpAddr,
    reply: oneshot::Sender<Result<ResetRecord, LedgerError>>,
}

pub struct Ledger {
    pub cfg: LedgerConfig,
    pub db: Database,
    source: Arc<dyn Source>,
    timings: Timings,
    state: Arc<Mutex<State>>,
    health: Mutex<Health>,
    /// Held across a kernel read and its application, so two readings are never applied out
    /// of order (a stale reading after a fresh one would look like a re-created entry).
    read_gate: tokio::sync::Mutex<Option<Instant>>,
    /// Held from taking a batch to its commit: client rows hold absolute values, so batches
    /// must commit in the order they were taken (an older one committed last would store an
    /// older cursor under newer usage).
    write_gate: tokio::sync::Mutex<()>,
    resets: mpsc::Sender<ResetRequest>,
    reset_rx: Mutex<Option<mpsc::Receiver<ResetRequest>>>,
    /// Where resets are announced: a `reset` webhook event written in the reset's transaction.
    reset_events: std::sync::OnceLock<(Arc<crate::webhook::Webhooks>, ResetEvent)>,
}

/// Builds the webhook event of a reset.
pub type ResetEvent = fn(&ResetRecord) -> crate::webhook::Event;

/// Readings applied per taking of the state lock during a poll.
const APPLY_CHUNK: usize = 4096;

/// Where a reset's event goes, and the event.
type ResetNotice = (Arc<crate::webhook::Webhooks>, crate::webhook::Event);

impl Ledger {
    /// Announce every reset from now on with a `reset` webhook event, written in the same
    /// transaction as the reset. Set once.
    pub fn send_resets_to(&self, hooks: Arc<crate::webhook::Webhooks>, make: ResetEvent) {
        let _ = self.reset_events.set((hooks, make));
    }

    /// Load the node's ledger from the database.
    pub async fn open(cfg: LedgerConfig, db: Database, source: Arc<dyn Source>) -> Result<Arc<Ledger>, LedgerError> {
        let epoch = store::ensure_node(&db, &cfg.node_id, unix_ms()).await.map_err(LedgerError::Load)?;
        let clients = store::load_clients(&db, &cfg.node_id).await.map_err(LedgerError::Load)?;
        info!(node = cfg.node_id, clients = clients.len(), epoch, "ledger loaded");
        let (tx, rx) = mpsc::channel(64);
        let max_pending = cfg.max_pending_rows;
        Ok(Arc::new(Ledger {
            cfg,
            db,
            source,
            timings: Timings::default(),
            state: Arc::new(Mutex::new({
                let mut s = State::restore(epoch, clients);
                s.set_max_pending(max_pending);
                s
            })),
            health: Mutex::new(Health { database_up: true, ..Health::default() }),
            read_gate: tokio::sync::Mutex::new(None),
            write_gate: tokio::sync::Mutex::new(()),
            resets: tx,
            reset_rx: Mutex::new(Some(rx)),
            reset_events: std::sync::OnceLock::new(),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn health(&self) -> Health {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_health(&self, f: impl FnOnce(&mut Health)) {
        f(&mut self.health.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn client(&self, ip: IpAddr) -> Option<ClientState> {
        self.state().clients.get(&ip).cloned()
    }

    /// How long polls and flushes take.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Run `f` on the state without copying it (for building stream frames and metrics).
    pub fn with_clients<R>(&self, f: impl FnOnce(&state::ClientMap) -> R) -> R {
        f(&self.state().clients)
    }

    pub fn pending_rows(&self) -> usize {
        self.state().pending_rows()
    }

    /// Pending rows merged into coarser ones since the daemon started.
    pub fn folded_rows(&self) -> u64 {
        self.state().folded_rows()
    }

    /// Read the kernel map once and fold it in.
    pub async fn poll_once(&self) -> Result<(), crate::bpf::loader::LoadError> {
        self.poll_from(self.source.clone()).await
    }

    /// Read `src` once and fold it in (the daemon's source, or the legacy map after an upgrade).
    pub async fn poll_from(&self, src: Arc<dyn Source>) -> Result<(), crate::bpf::loader::LoadError> {
        let mut last = self.read_gate.lock().await;
        let started = Instant::now();
        let state = self.state.clone();
        let elapsed = last.map(|t| t.elapsed().as_secs_f64());
        let now_ms = unix_ms();
        // The readings are applied as they come, APPLY_CHUNK at a time under the state lock, so
        // a poll holds no copy of the whole map and the lock is never held across a read.
        // A read that fails part way leaves the readings before it applied: each is exact on
        // its own (cursor and total move together), and the next poll takes up the rest.
        let read = tokio::task::spawn_blocking(move || {
            let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
            let epoch = src.epoch()?;
            let mut out = state::PollOutcome::default();
            lock().begin_poll(&epoch, &mut out);
            let (mut buf, mut n) = (Vec::with_capacity(APPLY_CHUNK), 0);
            let apply = |buf: &mut Vec<state::Reading>, out: &mut state::PollOutcome| {
                let mut st = lock();
                for r in buf.drain(..) {
                    if st.apply_one(&r, now_ms, elapsed, out) {
                        out.changed += 1;
                    }
                }
            };
            src.read_all(&mut |r| {
                buf.push(r);
                n += 1;
                if buf.len() == APPLY_CHUNK {
                    apply(&mut buf, &mut out);
                }
            })?;
            apply(&mut buf, &mut out);
            lock().end_poll(n, now_ms, &mut out);
            Ok::<_, crate::bpf::loader::LoadError>((epoch, out))
        })
        .await
        .expect("poll task panicked");
        let (epoch, out) = match read {
            Ok(r) => r,
            Err(e) => {
                self.set_health(|h| h.poll_errors += 1);
                return Err(e);
            }
        };
        *last = Some(started);
        if out.new_epoch {
            warn!(epoch, "the kernel counter map is new (reboot or re-created pins): counting its entries from zero");
        }
        if !out.recreated.is_empty() {
            warn!(clients = ?out.recreated, "client entries were re-created in the kernel map; their new counts were added");
        }
        if out.folded > 0 {
            warn!(
                folded = out.folded,
                max_pending_rows = self.cfg.max_pending_rows,
                "pending usage hit its bound while the database is down: older minutes were merged into hour \
                 or day rows (totals stay exact)"
            );
        }
        drop(last);
        let took = started.elapsed();
        self.timings.poll_seconds.observe(took.as_secs_f64());
        self.set_health(|h| {
            h.polls += 1;
            h.last_poll_ms = took.as_secs_f64() * 1e3;
            h.last_poll_ok_unix_ms = Some(unix_ms());
        });
        Ok(())
    }

    /// Make sure `ip` has a durable row in the ledger (OpenVPN admits a client before its first
    /// packet; sessions refer to the row). Returns the client's current totals. Fails, changing
    /// nothing durable, when the database is unavailable.
    pub async fn admit(&self, ip: IpAddr) -> Result<state::Totals, LedgerError> {
        // The kernel entry too: downloads to an address without one are not counted as a client's.
        if let Err(e) = self.source.admit(ip) {
            warn!(%ip, %e, "creating the admitted client's counter entry failed; it gets one at its first upload");
        }
        let (totals, unwritten) = self.state().admit(ip, unix_ms());
        if unwritten {
            // A flush that took the row first holds the write gate until it committed (or put
            // the row back), so once this flush returns Ok the row is durable.
            self.flush().await.map_err(LedgerError::Unavailable)?;
        }
        Ok(totals)
    }

    /// `ip`'s session ended: drop its kernel entry if it never counted a byte (see
    /// `PinnedMaps::expire_if_unused`), so admitted-but-silent addresses do not fill the map.
    pub fn release(&self, ip: IpAddr) {
        if let Err(e) = self.source.release(ip) {
            warn!(%ip, %e, "removing an unused client entry failed");
        }
    }

    /// Reset a client: from this instant its visible usage starts from zero. Done by the writer,
    /// durable before it returns.
    pub async fn reset(&self, ip: IpAddr) -> Result<ResetRecord, LedgerError> {
        if self.client(ip).is_none() {
            return Err(LedgerError::UnknownClient(ip));
        }
        let (reply, rx) = oneshot::channel();
        self.resets.send(ResetRequest { ip, reply }).await.map_err(|_| LedgerError::ShuttingDown)?;
        rx.await.map_err(|_| LedgerError::ShuttingDown)?
    }

    async fn do_reset(&self, ip: IpAddr) -> Result<ResetRecord, LedgerError> {
        // The reset's instant is a fresh reading of this client, so bytes counted by the kernel
        // before it belong to the closed period and bytes after it to the new one.
        let _writing = self.write_gate.lock().await;
        let gate = self.read_gate.lock().await;
        let src = self.source.clone();
        let fresh = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::bpf::loader::LoadError>((src.epoch()?, src.read_one(ip)?))
        })
        .await
        .expect("read task panicked");
        let now = unix_ms();
        let rec = {
            let mut st = self.state();
            match fresh {
                Ok((epoch, Some(r))) if epoch == st.epoch => {
                    st.apply_one(&r, now, None, &mut Default::default());
                }
                Ok(_) => {}
                Err(e) => warn!(%ip, %e, "fresh read for reset failed; the reset takes effect at the last poll"),
            }
            st.prepare_reset(ip, now).ok_or(LedgerError::UnknownClient(ip))?
        };
        drop(gate);
        let notice = self.reset_events.get().map(|(hooks, make)| (hooks.clone(), make(&rec)));
        match self.write_pending(Some((&rec, notice.as_ref()))).await {
            Ok(_) => {
                if let Some((hooks, _)) = &notice {
                    hooks.wake();
                }
                self.state().commit_reset(&rec);
                self.set_health(|h| h.database_up = true);
                info!(%ip, closed_up = rec.closed.up_bytes, closed_down = rec.closed.down_bytes, "client reset");
                Ok(rec)
            }
            Err(e) => {
                self.set_health(|h| {
                    h.database_up = false;
                    h.last_error = Some(e.to_string());
                });
                Err(LedgerError::Unavailable(e))
            }
        }
    }

    /// Run the poller and the writer as tasks of `tasks`, until its token is cancelled; the
    /// writer then takes a last reading and writes everything held.
    pub fn spawn(self: &Arc<Self>, tasks: &mut Tasks) {
        let rx = self.reset_rx.lock().unwrap_or_else(|p| p.into_inner()).take().expect("spawned once");
        tasks.spawn("ledger poller", self.clone().run_poller(tasks.token()));
        tasks.spawn("ledger writer", self.clone().run_writer(rx, tasks.token()));
    }

    async fn run_poller(self: Arc<Self>, stop: CancellationToken) -> Result<(), Infallible> {
        let mut tick = tokio::time::interval(self.cfg.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            if let Err(e) = self.poll_once().await {
                error!(%e, "reading the kernel counters failed");
            }
        }
    }

    async fn run_writer(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<ResetRequest>,
        stop: CancellationToken,
    ) -> Result<(), Infallible> {
        let mut tick = tokio::time::interval(self.cfg.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backoff = Duration::ZERO;
        let mut retry_at = Instant::now();
        let mut next_retention = Instant::now();
        let mut next_rollup = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    // After a failure, wait out the backoff (resets are still served).
                    if Instant::now() < retry_at {
                        continue;
                    }
                    match self.flush().await {
                        Ok(_) => backoff = Duration::ZERO,
                        // Retry sooner than never, later than hammering: up to 30 s apart.
                        Err(_) => {
                            backoff = (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
                            retry_at = Instant::now() + backoff;
                        }
                    }
                    if backoff.is_zero() && Instant::now() >= next_rollup {
                        next_rollup = Instant::now() + Duration::from_secs(60);
                        if let Err(e) = store::roll_up(&self.db, &self.cfg.node_id, unix_ms()).await {
                            warn!(%e, "rolling up hour and day history failed; retrying in a minute");
                        }
                    }
                    if backoff.is_zero() && Instant::now() >= next_retention {
                        next_retention = Instant::now() + Duration::from_secs(600);
                        match store::apply_retention(&self.db, &self.cfg.node_id, unix_ms(), self.cfg.retention_days).await {
                            Ok(n) if n > 0 => info!(rows = n, "old history removed"),
                            Ok(_) => {}
                            Err(e) => warn!(%e, "applying retention failed"),
                        }
                    }
                }
                Some(req) = rx.recv() => {
                    let _ = req.reply.send(self.do_reset(req.ip).await);
                }
            }
        }
        // Resets asked for meanwhile are refused, not left hanging.
        rx.close();
        while let Ok(req) = rx.try_recv() {
            let _ = req.reply.send(Err(LedgerError::ShuttingDown));
        }
        self.final_flush().await;
        Ok(())
    }

    /// Take a last reading and write everything held (the writer does this when it stops).
    async fn final_flush(&self) {
        if let Err(e) = self.poll_once().await {
            warn!(%e, "last reading before shutdown failed; the next start catches up from the kernel");
        }
        match self.flush().await {
            Ok(rows) => info!(rows, "ledger flushed"),
            Err(e) => warn!(%e, "last flush failed; the next start recounts from the stored cursor (nothing is lost)"),
        }
    }
}
