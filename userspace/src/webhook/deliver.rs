//! The webhook delivery worker: POSTs the outbox's events with retries and backoff, strictly in
//! order per subject, several subjects at once.
//!
//! One task scans the outbox; the HTTP requests run as child tasks. Per endpoint, up to
//! `MAX_IN_FLIGHT` requests run at once, each for a different subject, and only for the head
//! (oldest pending event) of its subject: so a subject's events go out strictly one after the
//! other, in sequence order, while a slow or failing subject does not hold up the others (with
//! one request at a time, a receiver that times out on one subject would delay every other
//! subject by the whole timeout per attempt).
//!
//! The worker scans when woken (`Webhooks::wake`, a finished request), when the earliest
//! backoff expires, and at least every `IDLE_RESCAN`. Results are written to the database
//! (attempt log + outbox row) before the next scan; while the database is down they are kept in
//! memory and written when it is back (nothing is sent meanwhile), and the outage is logged once.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    UNCONFIRMED_TTL, Webhooks,
    outbox::{self, Head, Outcome},
    sign,
};
use crate::time::unix_ms;

/// Requests in flight per endpoint (each for a different subject).
pub(super) const MAX_IN_FLIGHT: usize = 8;
/// Heads read per endpoint and scan (more than MAX_IN_FLIGHT: some may be busy or blocked).
const HEADS_PER_SCAN: usize = 64;
/// Scan at least this often, whatever happens.
const IDLE_RESCAN: Duration = Duration::from_secs(60);
/// While a subject waits for an older event to become visible, look again this soon.
const UNCONFIRMED_RESCAN: Duration = Duration::from_millis(100);
/// On shutdown, requests in flight get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// At most this much of a failed response's body goes into the log.
const ERROR_BODY_BYTES: usize = 200;

struct Worker<'a> {
    hooks: &'a Arc<Webhooks>,
    inflight: JoinSet<Outcome>,
    /// task -> (endpoint index, subject)
    tasks: HashMap<tokio::task::Id, (usize, String)>,
    busy: HashSet<(usize, String)>,
    per_endpoint: Vec<usize>,
    /// Results not yet written to the database, oldest first.
    unrecorded: VecDeque<Outcome>,
    db_down: bool,
    db_backoff: Duration,
}

pub(super) async fn run(hooks: &Arc<Webhooks>, stop: CancellationToken) {
    let mut w = Worker {
        hooks,
        inflight: JoinSet::new(),
        tasks: HashMap::new(),
        busy: HashSet::new(),
        per_endpoint: vec![0; hooks.endpoints.len()],
        unrecorded: VecDeque::new(),
        db_down: false,
        db_backoff: Duration::ZERO,
    };
    info!(endpoints = hooks.endpoints.len(), "webhook worker started; resuming pending deliveries");
    // A cancellation during a scan is seen at the next wait.
    while !stop.is_cancelled() {
        let next = match w.pass().await {
            Ok(next) => {
                if w.db_down {
                    info!(db = %hooks.db.shown_url, "webhook outbox reachable again; deliveries resume");
                }
                w.db_down = false;
                w.db_backoff = Duration::ZERO;
                next
            }
            Err(e) => {
                if !w.db_down {
                    error!(db = %hooks.db.shown_url, %e,
                        "webhook outbox unreachable; nothing is lost, deliveries resume when it is back");
                }
                w.db_down = true;
                w.db_backoff = (w.db_backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(30));
                Instant::now() + w.db_backoff
            }
        };
        let next = next.min(Instant::now() + IDLE_RESCAN);
        tokio::select! {
            Some(done) = w.inflight.join_next_with_id(), if !w.inflight.is_empty() => w.finished(done),
            _ = hooks.wake.notified() => {}
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = stop.cancelled() => break,
        }
    }
    w.stop().await;
    info!("webhook worker stopped");
}

impl Worker<'_> {
    /// Record results, then start every due head that may go. Returns when to scan next.
    async fn pass(&mut self) -> Result<Instant, sqlx::Error> {
        while let Some(done) = self.inflight.try_join_next_with_id() {
            self.finished(done);
        }
        self.record().await?;
        let mut next = Instant::now() + IDLE_RESCAN;
        if self.confirm().await? {
            next = next.min(Instant::now() + UNCONFIRMED_RESCAN);
        }
        let hooks = self.hooks;
        let node = hooks.node_id.as_str();
        for (i, ep) in hooks.endpoints.iter().enumerate() {
            if self.per_endpoint[i] >= MAX_IN_FLIGHT {
                continue; // a finished request wakes us
            }
            // Copied before the read: see `held_back`.
            let unconfirmed = hooks.unconfirmed_snapshot();
            let heads = outbox::heads(&hooks.db, node, &ep.name, HEADS_PER_SCAN).await?;
            let now_ms = unix_ms();
            for h in heads {
                if self.busy.contains(&(i, h.subject.clone())) {
                    continue;
                }
                if held_back(&unconfirmed, &h) {
                    next = next.min(Instant::now() + UNCONFIRMED_RESCAN);
                    continue;
                }
                if h.next_attempt_ms > now_ms {
                    // Heads come earliest first: the rest are later still.
                    next = next.min(Instant::now() + Duration::from_millis(h.next_attempt_ms - now_ms));
                    break;
                }
                if self.per_endpoint[i] >= MAX_IN_FLIGHT {
                    break;
                }
                self.start(i, h);
            }
        }
        Ok(next)
    }

    /// Write the results held, oldest first; stop at the first failure (the rest stay held).
    async fn record(&mut self) -> Result<(), sqlx::Error> {
        while let Some(o) = self.unrecorded.front() {
            if let Err(e) = outbox::record(&self.hooks.db, &self.hooks.node_id, o).await {
                if !self.db_down {
                    warn!(endpoint = o.endpoint, event = o.event_id, subject = o.subject, %e,
                        "recording a webhook attempt failed; kept in memory and retried");
                }
                return Err(e);
            }
            self.unrecorded.pop_front();
        }
        Ok(())
    }

    /// Drop handed-out sequence numbers that are committed now, or abandoned. True if some
    /// are still unseen.
    async fn confirm(&mut self) -> Result<bool, sqlx::Error> {
        let range = {
            let u = self.hooks.unconfirmed();
            match (u.keys().next(), u.keys().next_back()) {
                (Some(lo), Some(hi)) => (*lo, *hi),
                _ => return Ok(false),
            }
        };
        let seen = outbox::visible_seqs(&self.hooks.db, &self.hooks.node_id, range.0, range.1).await?;
        let mut u = self.hooks.unconfirmed();
        for s in seen {
            u.remove(&s);
        }
        u.retain(|seq, x| {
            let keep = x.since.elapsed() < UNCONFIRMED_TTL;
            if !keep {
                warn!(
                    seq,
                    subject = x.subject,
                    "webhook event number never committed (transaction rolled back?); \
                    its subject's later events go ahead"
                );
            }
            keep
        });
        Ok(!u.is_empty())
    }

    fn start(&mut self, i: usize, h: Head) {
        let hooks = self.hooks.clone();
        let key = (i, h.subject.clone());
        let handle = self.inflight.spawn(async move { attempt(&hooks, i, h).await });
        self.tasks.insert(handle.id(), key.clone());
        self.busy.insert(key);
        self.per_endpoint[i] += 1;
    }

    fn finished(&mut self, done: Result<(tokio::task::Id, Outcome), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        if let Some(key) = self.tasks.remove(&id) {
            self.per_endpoint[key.0] -= 1;
            self.busy.remove(&key);
        }
        match done {
            Ok((_, o)) => self.unrecorded.push_back(o),
            // Not recorded: the event stays pending and is attempted again.
            Err(e) if e.is_cancelled() => {}
            Err(e) => error!(%e, "a webhook delivery task failed; the event stays pending"),
        }
    }

    async fn stop(&mut self) {
        let grace = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(grace);
        while !self.inflight.is_empty() {
            tokio::select! {
                Some(done) = self.inflight.join_next_with_id() => self.finished(done),
                _ = &mut grace => {
                    warn!(requests = self.inflight.len(),
                        "webhook requests still running at shutdown were cancelled; sent again at the next start");
                    self.inflight.abort_all();
                    while let Some(done) = self.inflight.join_next_with_id().await {
                        self.finished(done);
                    }
                }
            }
        }
        if let Err(e) = self.record().await {
            error!(results = self.unrecorded.len(), %e,
                "webhook results could not be recorded at shutdown; those events are sent again at the next start");
        }
    }
}

/// True if an older event of the head's subject may still commit. `unconfirmed` (the unconfirmed
/// numbers with their subjects, lowest first) must be copied *before* the heads were read: an
/// older number that committed after the copy is then still in it (the head waits one rescan),
/// while with the live set it could already be gone although the read did not see its event, and
/// the newer head would go out first.
fn held_back(unconfirmed: &[(i64, String)], h: &Head) -> bool {
    unconfirmed.iter().take_while(|(seq, _)| *seq < h.seq).any(|(_, subject)| *subject == h.subject)
}

/// One POST of `h` to endpoint `i`.
async fn attempt(hooks: &Webhooks, i: usize, h: Head) -> Outcome {
    let ep = &hooks.endpoints[i];
    let at_ms = unix_ms();
    let timestamp = at_ms / 1000;
    let signature = sign::signature(&ep.secret, timestamp, h.body.as_bytes());
    let started = Instant::now();
    let refused = if ep.allow_private { None } else { super::policy::check_literal(&ep.url) };
    if let Some(reason) = refused {
        return failed(ep, h, at_ms, started, None, reason);
    }
    let sent = hooks.clients[i]
        .post(&ep.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Tunmeter-Event", &h.kind)
        .header("X-Tunmeter-Delivery", &h.id)
        .header("X-Tunmeter-Timestamp", timestamp.to_string())
        .header("X-Tunmeter-Signature", signature)
        .body(h.body.clone())
        .send()
        .await;
    let (status, error) = match sent {
        Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
        Ok(mut resp) => {
            let status = resp.status();
            let mut body = Vec::new();
            while body.len() < ERROR_BODY_BYTES {
                match resp.chunk().await {
                    Ok(Some(c)) => body.extend_from_slice(&c),
                    _ => break,
                }
            }
            body.truncate(ERROR_BODY_BYTES);
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            let error = if text.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {text}") };
            (Some(status.as_u16()), Some(error))
        }
        Err(e) if e.is_timeout() => (None, Some(format!("timed out after {} ms", ep.timeout.as_millis()))),
        // Without the URL: it may carry credentials, and this text is logged and stored.
        Err(e) => (None, Some(chain(&e.without_url()))),
    };
    match error {
        Some(e) => failed(ep, h, at_ms, started, status, e),
        None => outcome(ep, h, at_ms, started, status, None),
    }
}

fn failed(ep: &super::Endpoint, h: Head, at_ms: u64, started: Instant, status: Option<u16>, error: String) -> Outcome {
    outcome(ep, h, at_ms, started, status, Some(scrub(error, &ep.url)))
}

fn outcome(
    ep: &super::Endpoint,
    h: Head,
    at_ms: u64,
    started: Instant,
    status: Option<u16>,
    error: Option<String>,
) -> Outcome {
    let duration_ms = started.elapsed().as_millis() as u64;
    let attempt = h.attempts + 1;
    let backoff = ep.backoff(attempt);
    let next_attempt_ms = unix_ms() + backoff.as_millis() as u64;
    match &error {
        None => debug!(
            endpoint = ep.name,
            event = h.id,
            seq = h.seq,
            subject = h.subject,
            attempt,
            duration_ms,
            "webhook delivered"
        ),
        Some(err) => warn!(
            endpoint = ep.name,
            url = super::redact_url(&ep.url),
            event = h.id,
            kind = h.kind,
            seq = h.seq,
            subject = h.subject,
            attempt,
            status,
            error = err,
            retry_in_ms = backoff.as_millis() as u64,
            "webhook delivery failed; retrying"
        ),
    }
    Outcome {
        endpoint: ep.name.clone(),
        seq: h.seq,
        subject: h.subject,
        event_id: h.id,
        attempt,
        at_ms,
        duration_ms,
        status,
        error,
        next_attempt_ms,
    }
}

/// `text` with any copy of `url` replaced by its redacted form (the causes of an error should
/// not name the URL once it is removed; this makes sure).
fn scrub(text: String, url: &str) -> String {
    let shown = super::redact_url(url);
    if shown == url {
        return text;
    }
    let mut text = text.replace(url, &shown);
    if let Ok(u) = reqwest::Url::parse(url) {
        text = text.replace(u.as_str(), &shown);
    }
    text
}

/// An error with its causes ("error sending request: connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: i64, subject: &str) -> Head {
        Head {
            seq,
            subject: subject.into(),
            attempts: 0,
            next_attempt_ms: 0,
            id: format!("id-{seq}"),
            kind: "session.opened".into(),
            body: "{}".into(),
        }
    }

    #[test]
    fn webhook_held_back_by_an_older_number_of_its_subject_only() {
        let unconfirmed = vec![(5, "a".to_string()), (7, "b".to_string()), (9, "a".to_string())];
        assert!(held_back(&unconfirmed, &head(6, "a")), "5 (a) is older and unconfirmed");
        assert!(held_back(&unconfirmed, &head(10, "a")));
        assert!(!held_back(&unconfirmed, &head(4, "a")), "nothing older");
        assert!(!held_back(&unconfirmed, &head(5, "a")), "its own number does not hold it");
        assert!(!held_back(&unconfirmed, &head(8, "c")), "other subjects do not hold it");
        assert!(held_back(&unconfirmed, &head(8, "b")));
        assert!(!held_back(&[], &head(8, "b")));
    }

    /// The race: seq 1 (subject s) is unconfirmed when the worker copies the set; it commits and
    /// leaves the live set before `held_back` runs, while the heads read (whose snapshot missed
    /// seq 1) returned seq 2. The decision uses the copy: seq 2 waits.
    #[tokio::test]
    async fn webhook_copy_taken_before_the_heads_read_holds_the_newer_head() {
        let dir = std::env::temp_dir().join(format!("tm-webhook-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = crate::db::Database::open(&format!("sqlite://{}?mode=rwc", dir.join("t.db").display())).await.unwrap();
        let ep = super::super::Endpoint {
            name: "panel".into(),
            url: "http://127.0.0.1:9/hooks".into(),
            secret: b"k".to_vec(),
            events: super::super::EventKind::ALL.to_vec(),
            timeout: Duration::from_secs(1),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            allow_private: true,
        };
        let hooks = Webhooks::new(db.clone(), "n".into(), vec![ep]).await.unwrap();
        let ev = super::super::Event {
            kind: super::super::EventKind::SessionOpened,
            subject: "s".into(),
            data: serde_json::json!({}),
        };
        let mut t1 = db.pool.begin().await.unwrap();
        let (_, older) = hooks.write_event(&mut t1, &ev, 1).await.unwrap();
        // The worker's copy, taken before its heads read.
        let copy = hooks.unconfirmed_snapshot();
        t1.rollback().await.unwrap(); // (SQLite has one writer: stand-in for "still uncommitted")
        let (_, newer) = {
            let mut t2 = db.pool.begin().await.unwrap();
            let r = hooks.write_event(&mut t2, &ev, 2).await.unwrap();
            t2.commit().await.unwrap();
            r
        };
        // The heads read: it sees only the newer event.
        let heads = outbox::heads(&db, "n", "panel", 10).await.unwrap();
        assert_eq!(heads.iter().map(|h| h.seq).collect::<Vec<_>>(), vec![newer]);
        // The older one "commits" and leaves the live set before the decision.
        hooks.unconfirmed().remove(&older);
        hooks.unconfirmed().remove(&newer);
        let live = hooks.unconfirmed_snapshot();
        assert!(!held_back(&live, &heads[0]), "the live set would let the newer head go first");
        assert!(held_back(&copy, &heads[0]), "the copy holds it back");
        drop(hooks);
        db.pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
