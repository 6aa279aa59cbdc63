//! Webhooks: events (device.offline, device.recovered, session.opened, session.closed, reset)
//! written to a durable outbox in the database, in the same transaction as the change they
//! report where there is one, and delivered by one worker with retries and exponential backoff.
//!
//! - `outbox`: the SQL (events, one outbox row per event and endpoint, the attempt log).
//! - `sign`: the HMAC-SHA256 request signature.
//! - `deliver`: the worker (HTTP POST with reqwest, backoff, per-subject ordering).
//!
//! Guarantees: at-least-once delivery (a row is pending until a 2xx answer is recorded; a crash
//! between the answer and the record sends it again), retried forever with
//! `min_backoff * 2^(attempts-1)` capped at `max_backoff`, and per (endpoint, subject) strictly
//! in enqueue (sequence) order: only the oldest pending event of a subject is ever attempted.
//! Different subjects do not wait for each other.
//!
//! Sequence numbers are assigned here (MAX(seq) at start, then a counter), because neither
//! AUTOINCREMENT nor SERIAL is portable. A number is taken inside the caller's transaction, so
//! two transactions can commit out of number order; the worker therefore remembers the numbers
//! it handed out that it has not yet seen committed, and holds back a subject's newer events
//! until its older ones are visible (or known abandoned: not visible after
//! `UNCONFIRMED_TTL`, a rolled-back transaction). The worker copies that set *before* it reads
//! the heads: a number that commits (and leaves the set) between the two would otherwise look
//! settled while the read's snapshot still missed its event, and the newer head would go first.
//!
//! Endpoint URLs may carry credentials (`user:password@`, a token in the query): logs, the API
//! and stored errors show them through `redact_url` only.

mod deliver;
pub mod outbox;
mod policy;
pub mod sign;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tracing::{error, info};

use crate::{db::Database, tasks::Tasks};

pub use crate::config::{Endpoint, redact_url};
pub use crate::types::EventKind;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("webhook {name:?}: {reason}")]
    Config { name: String, reason: String },
}

/// One event to send.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// Ordering key: events with the same subject are delivered in the order they were
    /// enqueued (device id for device.*, client IP for session.* and reset).
    pub subject: String,
    /// The event's payload (`data` in the JSON body).
    pub data: serde_json::Value,
}

impl Endpoint {
    /// The wait after the `attempts`-th failed attempt (1 = first):
    /// `min_backoff * 2^(attempts-1)`, at most `max_backoff`.
    pub fn backoff(&self, attempts: u64) -> Duration {
        let doublings = attempts.saturating_sub(1).min(32) as u32;
        self.min_backoff.saturating_mul(1u32 << doublings.min(31)).min(self.max_backoff)
    }

    fn check(&self) -> Result<(), WebhookError> {
        let bad = |reason: String| Err(WebhookError::Config { name: self.name.clone(), reason });
        if self.name.is_empty() || self.name.len() > 64 || self.name.chars().any(|c| c.is_control()) {
            return bad("the name must be 1 to 64 printable characters".into());
        }
        match reqwest::Url::parse(&self.url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(u) => {
                return bad(format!(
                    "url {:?}: expected http:// or https:// with a host, got {}:",
                    redact_url(&self.url),
                    u.scheme()
                ));
            }
            Err(e) => return bad(format!("url {:?}: {e}", redact_url(&self.url))),
        }
        if self.secret.is_empty() {
            return bad("the secret is empty".into());
        }
        if self.events.is_empty() {
            return bad("events is empty: nothing would be sent".into());
        }
        if self.timeout.is_zero() {
            return bad("timeout must be more than 0".into());
        }
        if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            return bad(format!(
                "backoff: need 0 < min_backoff ({:?}) <= max_backoff ({:?})",
                self.min_backoff, self.max_backoff
            ));
        }
        Ok(())
    }
}

/// GET /webhooks: an endpoint with its outbox counts (never the secret). Endpoints that are no
/// longer configured but still have rows are listed with `configured: false`; their pending rows
/// stay in the outbox and are not sent.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EndpointStatus {
    pub name: String,
    /// Without userinfo (`user:password@`) and with the query shown as `?…`; null when not
    /// configured any more.
    pub url: Option<String>,
    pub events: Vec<String>,
    pub configured: bool,
    /// Events waiting for this endpoint.
    pub pending: u64,
    pub delivered: u64,
    /// Attempts that did not get a 2xx answer, ever.
    pub failed_attempts: u64,
    /// Creation time of the oldest pending event.
    pub oldest_pending_unix_ms: Option<u64>,
}

/// A sequence number handed out whose event the worker has not yet seen committed.
struct Unconfirmed {
    subject: String,
    since: Instant,
}

/// After this long, a handed-out sequence number that never became visible is taken as
/// rolled back and stops holding back its subject. Longer than a transaction waits for the
/// SQLite write lock (busy_timeout 5 s); a caller that rolls back after `enqueue_in` delays
/// that subject by this much.
const UNCONFIRMED_TTL: Duration = Duration::from_secs(10);

/// The body POSTed, built once at enqueue time (field order as documented).
#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    node_id: &'a str,
    subject: &'a str,
    created_unix_ms: u64,
    data: &'a serde_json::Value,
}

/// The outbox and its delivery worker.
pub struct Webhooks {
    db: Database,
    node_id: String,
    endpoints: Vec<Endpoint>,
    /// One HTTP client per endpoint (its timeout; no redirects: a 3xx is not a delivery).
    clients: Vec<reqwest::Client>,
    /// The last sequence number handed out.
    seq: AtomicI64,
    unconfirmed: Mutex<BTreeMap<i64, Unconfirmed>>,
    wake: tokio::sync::Notify,
    spawned: AtomicBool,
}

impl Webhooks {
    /// Set up (loads the next sequence number from the database). Checks the endpoints:
    /// unique names, http(s) URLs, non-empty secret and events, sane timeout and backoff.
    pub async fn new(db: Database, node_id: String, endpoints: Vec<Endpoint>) -> Result<Arc<Webhooks>, WebhookError> {
        for (i, ep) in endpoints.iter().enumerate() {
            ep.check()?;
            if endpoints[..i].iter().any(|o| o.name == ep.name) {
                return Err(WebhookError::Config {
                    name: ep.name.clone(),
                    reason: "two webhooks have this name".into(),
                });
            }
        }
        let clients = endpoints
            .iter()
            .map(|ep| {
                let mut builder = reqwest::Client::builder();
                if let Some(r) = policy::resolver(ep.allow_private) {
                    builder = builder.dns_resolver(r);
                }
                builder
                    .timeout(ep.timeout)
                    .connect_timeout(ep.timeout)
                    // Headers and body go out in separate writes: without NODELAY the body
                    // waits for the receiver's delayed ACK of the headers (tens of ms an event,
                    // and events of one subject go strictly one after another).
                    .tcp_nodelay(true)
                    .redirect(reqwest::redirect::Policy::none())
                    .user_agent(concat!("tunmeter/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| WebhookError::Config { name: ep.name.clone(), reason: format!("HTTP client: {e}") })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let last = outbox::max_seq(&db, &node_id).await?;
        info!(node = node_id, endpoints = endpoints.len(), last_seq = last, "webhooks ready");
        Ok(Arc::new(Webhooks {
            db,
            node_id,
            endpoints,
            clients,
            seq: AtomicI64::new(last),
            unconfirmed: Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
            spawned: AtomicBool::new(false),
        }))
    }

    /// The configured endpoints.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Write `ev` (and one outbox row per endpoint that wants it) inside the caller's
    /// transaction. Returns the event's id (UUID). Call `wake()` after the commit.
    pub async fn enqueue_in(
        &self,
        conn: &mut sqlx::AnyConnection,
        ev: &Event,
        now_ms: u64,
    ) -> Result<String, sqlx::Error> {
        self.write_event(conn, ev, now_ms).await.map(|(id, _)| id)
    }

    /// `enqueue_in`, also returning the sequence number.
    async fn write_event(
        &self,
        conn: &mut sqlx::AnyConnection,
        ev: &Event,
        now_ms: u64,
    ) -> Result<(String, i64), sqlx::Error> {
        let id = uuid::Uuid::new_v4().to_string();
        let body = serde_json::to_string(&Body {
            id: &id,
            kind: ev.kind.as_str(),
            node_id: &self.node_id,
            subject: &ev.subject,
            created_unix_ms: now_ms,
            data: &ev.data,
        })
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let seq = {
            // Number and entry together under the lock: the worker's copy of the set never
            // lacks a number lower than one it could see committed.
            let mut u = self.unconfirmed();
            let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
            u.insert(seq, Unconfirmed { subject: ev.subject.clone(), since: Instant::now() });
            seq
        };
        let wanted: Vec<&str> =
            self.endpoints.iter().filter(|e| e.events.contains(&ev.kind)).map(|e| e.name.as_str()).collect();
        let new = outbox::NewEvent {
            seq,
            id: &id,
            kind: ev.kind.as_str(),
            subject: &ev.subject,
            body: &body,
            created_ms: now_ms,
        };
        if let Err(e) = outbox::insert_event(conn, &self.node_id, &new, &wanted).await {
            // The caller's transaction is lost with this error: the number holds nothing back.
            self.unconfirmed().remove(&seq);
            error!(kind = ev.kind.as_str(), subject = ev.subject, seq, %e, "writing a webhook event failed");
            return Err(e);
        }
        Ok((id, seq))
    }

    /// Write `ev` in its own transaction and wake the worker. Durable when it returns.
    pub async fn enqueue(&self, ev: &Event) -> Result<String, sqlx::Error> {
        let mut tx = self.db.pool.begin().await?;
        let (id, seq) = self.write_event(&mut tx, ev, crate::time::unix_ms()).await?;
        tx.commit().await?;
        // Committed: its number holds nothing back any more. (If the commit failed, whether it
        // committed is unknown: the worker finds out, or the number expires.)
        self.unconfirmed().remove(&seq);
        self.wake();
        Ok(id)
    }

    /// Tell the worker that new rows were committed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Run the delivery worker as a task of `tasks` until its token is cancelled; requests in
    /// flight then get a short grace period and their results are recorded; anything
    /// unfinished is sent again by the next start. Call once; it resumes whatever is pending
    /// in the database.
    pub fn spawn(self: &Arc<Self>, tasks: &mut Tasks) {
        if self.spawned.swap(true, Ordering::SeqCst) {
            error!("Webhooks::spawn called twice; the second worker is not started");
            return;
        }
        let me = self.clone();
        let stop = tasks.token();
        tasks.spawn("webhook worker", async move {
            deliver::run(&me, stop).await;
            Ok::<_, std::convert::Infallible>(())
        });
    }

    /// Every configured endpoint with its counts, then endpoints that are no longer configured
    /// but still have rows.
    pub async fn status(&self) -> Result<Vec<EndpointStatus>, sqlx::Error> {
        let mut counts = outbox::endpoint_counts(&self.db, &self.node_id).await?;
        let mut out = Vec::with_capacity(self.endpoints.len());
        for ep in &self.endpoints {
            let c = counts.iter().position(|c| c.endpoint == ep.name).map(|i| counts.remove(i)).unwrap_or_default();
            out.push(EndpointStatus {
                name: ep.name.clone(),
                url: Some(redact_url(&ep.url)),
                events: ep.events.iter().map(|k| k.as_str().to_string()).collect(),
                configured: true,
                pending: c.pending,
                delivered: c.delivered,
                failed_attempts: c.failed_attempts,
                oldest_pending_unix_ms: c.oldest_pending_unix_ms,
            });
        }
        out.extend(counts.into_iter().map(|c| EndpointStatus {
            name: c.endpoint,
            url: None,
            events: Vec::new(),
            configured: false,
            pending: c.pending,
            delivered: c.delivered,
            failed_attempts: c.failed_attempts,
            oldest_pending_unix_ms: c.oldest_pending_unix_ms,
        }));
        Ok(out)
    }

    fn unconfirmed(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, Unconfirmed>> {
        self.unconfirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the unconfirmed (sequence number, subject) pairs, lowest number first.
    fn unconfirmed_snapshot(&self) -> Vec<(i64, String)> {
        self.unconfirmed().iter().map(|(seq, x)| (*seq, x.subject.clone())).collect()
    }
}
