//! Webhook delivery against a real HTTP receiver in this process (axum on 127.0.0.1), on a
//! SQLite file and on a PostgreSQL server started by the test. The receiver checks every
//! signature itself (its own HMAC, not the daemon's code) and records what arrives.
//!
//! Scenarios (each on its own node id in the same database):
//! - a: receiver up: 3 subjects arrive, signed, with the right body; the endpoint's event filter;
//!   an event written in a rolled-back transaction is never sent.
//! - b: receiver down (connections refused), 36 events on 4 subjects, the daemon "crashes" and
//!   a new `Webhooks` is created on the same database, the receiver comes back on the same port:
//!   everything arrives, signed, per subject in enqueue order, after failed attempts whose
//!   intervals grow (exponential backoff).
//! - c: the receiver answers 500 for one subject: the others are delivered, that subject's later
//!   events wait behind its head until it succeeds.
//! - d: the API through the real router (served on TCP with a real token): pending, then
//!   delivered counts, the events and delivery log, 400/401/404 answers, and an endpoint removed
//!   from the configuration (its rows are listed, never sent).
//! - g: an endpoint URL with userinfo and a query token: neither shows in stored errors or the API.
//! - e (PostgreSQL only): the database stops while deliveries are pending, and comes back.
//! - f (PostgreSQL only): two transactions commit events of one subject out of number order.

use crate::support;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tunmeter::{
    api::{ApiConfig, App},
    db::Database,
    ledger::{Ledger, LedgerConfig, source::Source, state::Reading, store::Granularity},
    loader::LoadError,
    metrics::Metrics,
    tokens::{self, Role, TokenCache},
    webhook::{Endpoint, Event, EventKind, Webhooks, outbox},
};

// ---- the receiver --------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Got {
    /// Which endpoint path it came in on (/hooks/<name>).
    endpoint: String,
    id: String,
    kind: String,
    subject: String,
    timestamp: u64,
    body: Value,
    /// What the receiver answered.
    answered: u16,
}

#[derive(Clone, Default)]
struct RxState {
    got: Arc<Mutex<Vec<Got>>>,
    /// Subjects answered with 500.
    fail: Arc<Mutex<HashSet<String>>>,
    /// Endpoint name -> secret.
    secrets: Arc<HashMap<String, Vec<u8>>>,
    /// Requests with a bad signature or inconsistent headers (must stay empty).
    bad: Arc<Mutex<Vec<String>>>,
}

impl RxState {
    fn new(secrets: &[(&str, &[u8])]) -> RxState {
        RxState {
            secrets: Arc::new(secrets.iter().map(|(n, s)| (n.to_string(), s.to_vec())).collect()),
            ..Default::default()
        }
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Delivered (answered 2xx) at `endpoint`.
    fn delivered(&self, endpoint: &str) -> Vec<Got> {
        self.got().into_iter().filter(|g| g.endpoint == endpoint && g.answered == 200).collect()
    }

    fn assert_no_bad(&self) {
        let bad = self.bad.lock().unwrap();
        assert!(bad.is_empty(), "the receiver rejected requests: {bad:#?}");
    }
}

/// HMAC-SHA256(secret, "<timestamp>.<body>"), computed here independently of the daemon.
fn expected_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    m.update(timestamp.as_bytes());
    m.update(b".");
    m.update(body);
    format!("sha256={}", hex::encode(m.finalize().into_bytes()))
}

async fn hook(
    State(st): State<RxState>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1], &'static str) {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let reject = |why: String| {
        st.bad.lock().unwrap().push(why);
        (StatusCode::UNAUTHORIZED, [("connection", "close")], "rejected")
    };
    let Some(secret) = st.secrets.get(&endpoint) else {
        return reject(format!("unknown endpoint path {endpoint}"));
    };
    let ts = h("x-tunmeter-timestamp");
    let want = expected_signature(secret, &ts, &body);
    if h("x-tunmeter-signature") != want {
        return reject(format!("{endpoint}: signature {:?}, expected {want}", h("x-tunmeter-signature")));
    }
    let Ok(timestamp) = ts.parse::<u64>() else {
        return reject(format!("timestamp {ts:?}"));
    };
    let now_s = tunmeter::clock::unix_ms() / 1000;
    if timestamp + 60 < now_s || timestamp > now_s + 1 {
        return reject(format!("timestamp {timestamp} is not now ({now_s})"));
    }
    if h("content-type") != "application/json" {
        return reject(format!("content-type {:?}", h("content-type")));
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reject(format!("body is not JSON: {e}")),
    };
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    if h("x-tunmeter-event") != s("type") || h("x-tunmeter-delivery") != s("id") {
        return reject(format!(
            "headers {:?}/{:?} do not match the body {v}",
            h("x-tunmeter-event"),
            h("x-tunmeter-delivery")
        ));
    }
    let fail = st.fail.lock().unwrap().contains(&s("subject"));
    let answered = if fail { 500 } else { 200 };
    st.got.lock().unwrap().push(Got {
        endpoint,
        id: s("id"),
        kind: s("type"),
        subject: s("subject"),
        timestamp,
        body: v,
        answered,
    });
    if fail {
        (StatusCode::INTERNAL_SERVER_ERROR, [("connection", "close")], "subject failing on purpose")
    } else {
        (StatusCode::OK, [("connection", "close")], "ok")
    }
}

struct Receiver {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    /// Listen on `port` (0: any free port), retrying a taken port for up to 5 s.
    async fn start(port: u16, st: &RxState) -> Receiver {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding the receiver to port {port}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("binding the receiver to port {port}: {e}"),
            }
        };
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/hooks/{endpoint}", post(hook)).with_state(st.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Receiver { addr, stop: Some(tx), task: Some(task) }
    }

    fn url(&self, endpoint: &str) -> String {
        format!("http://{}/hooks/{endpoint}", self.addr)
    }

    /// Stop serving and close the listener: connections to the port are refused afterwards.
    async fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut t) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut t).await.is_err()
        {
            t.abort();
            let _ = t.await;
        }
        let refused = tokio::net::TcpStream::connect(self.addr).await;
        assert!(refused.is_err(), "the receiver's port {} still accepts connections", self.addr);
    }
}

// ---- helpers -------------------------------------------------------------------------------

/// Poll `f` every 20 ms until it is true; panic after `limit` with `what`.
async fn wait_for(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint(name: &str, url: String, secret: &[u8], events: &[EventKind]) -> Endpoint {
    Endpoint {
        name: name.into(),
        url,
        secret: secret.to_vec(),
        events: events.to_vec(),
        timeout: Duration::from_secs(2),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
    }
}

fn ev(kind: EventKind, subject: &str, n: u64) -> Event {
    Event { kind, subject: subject.into(), data: json!({ "n": n, "subject": subject, "nested": { "k": [1, 2, 3] } }) }
}

/// The ids of `got` in first-arrival order, per subject.
fn first_arrivals(got: &[Got]) -> HashMap<String, Vec<String>> {
    let mut seen = HashSet::new();
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for g in got {
        if seen.insert(g.id.clone()) {
            out.entry(g.subject.clone()).or_default().push(g.id.clone());
        }
    }
    out
}

/// The ids enqueued, per subject, in enqueue order.
fn by_subject(sent: &[(String, Event)]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (id, e) in sent {
        out.entry(e.subject.clone()).or_default().push(id.clone());
    }
    out
}

async fn pending(hooks: &Webhooks, name: &str) -> u64 {
    hooks.status().await.unwrap().into_iter().find(|s| s.name == name).map_or(0, |s| s.pending)
}

// ---- scenarios -----------------------------------------------------------------------------

/// a: receiver up; body and headers; the event filter; the caller's transaction.
async fn receiver_up(db: &Database) {
    let node = "a-node";
    let st = RxState::new(&[("panel", b"panel-secret"), ("opens", b"another secret")]);
    let rx = Receiver::start(0, &st).await;
    let hooks = Webhooks::new(
        db.clone(),
        node.into(),
        vec![
            endpoint("panel", rx.url("panel"), b"panel-secret", &EventKind::ALL),
            endpoint("opens", rx.url("opens"), b"another secret", &[EventKind::SessionOpened]),
        ],
    )
    .await
    .unwrap();
    let worker = hooks.spawn();
    let before = tunmeter::clock::unix_ms();
    let mut sent = Vec::new();
    for i in 0..3 {
        for (kind, subject) in [
            (EventKind::SessionOpened, "10.8.0.2"),
            (EventKind::Reset, "10.8.0.3"),
            (EventKind::DeviceOffline, "0f5a3b8e-dev-1"),
        ] {
            let e = ev(kind, subject, i);
            sent.push((hooks.enqueue(&e).await.unwrap(), e));
        }
    }
    // Written in the caller's transaction: a rollback sends nothing, a commit + wake sends it. (The
    // rolled-back one has a subject of its own: it holds its subject back for a while.)
    let rolled_back = {
        let mut tx = db.pool.begin().await.unwrap();
        let id = hooks.enqueue_in(&mut tx, &ev(EventKind::SessionClosed, "10.8.0.99", 99), before).await.unwrap();
        tx.rollback().await.unwrap();
        id
    };
    {
        let e = ev(EventKind::SessionClosed, "10.8.0.2", 3);
        let mut tx = db.pool.begin().await.unwrap();
        let id = hooks.enqueue_in(&mut tx, &e, tunmeter::clock::unix_ms()).await.unwrap();
        tx.commit().await.unwrap();
        hooks.wake();
        sent.push((id, e));
    }
    let after = tunmeter::clock::unix_ms();
    wait_for("10 events at panel, 3 at opens", Duration::from_secs(10), async || {
        st.delivered("panel").len() >= 10 && st.delivered("opens").len() >= 3
    })
    .await;
    st.assert_no_bad();

    let panel = st.delivered("panel");
    let ids: HashSet<&str> = panel.iter().map(|g| g.id.as_str()).collect();
    for (id, e) in &sent {
        assert!(ids.contains(id.as_str()), "event {id} ({:?} {}) did not arrive", e.kind, e.subject);
        let g = panel.iter().find(|g| &g.id == id).unwrap();
        assert_eq!(g.kind, e.kind.as_str());
        assert_eq!(g.subject, e.subject);
        assert_eq!(g.body["id"], json!(id));
        assert_eq!(g.body["type"], json!(e.kind.as_str()));
        assert_eq!(g.body["node_id"], json!(node));
        assert_eq!(g.body["subject"], json!(e.subject));
        assert_eq!(g.body["data"], e.data, "data of {id}");
        let created = g.body["created_unix_ms"].as_u64().expect("created_unix_ms is a number");
        assert!((before..=after).contains(&created), "created_unix_ms {created} not in {before}..={after}");
        assert!(g.timestamp * 1000 + 1000 >= before, "timestamp header {} before the enqueue", g.timestamp);
        let keys: Vec<&str> = g.body.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "body fields: {keys:?}");
    }
    assert!(!ids.contains(rolled_back.as_str()), "an event of a rolled-back transaction was sent");
    // Per subject, in enqueue order.
    let want = by_subject(&sent);
    let got = first_arrivals(&panel);
    for (subject, ids) in &want {
        assert_eq!(got.get(subject), Some(ids), "arrival order of subject {subject}");
    }
    // The filter: "opens" gets session.opened only.
    let opens = st.delivered("opens");
    assert!(opens.iter().all(|g| g.kind == "session.opened"), "opens got {opens:#?}");
    let want_opens: HashSet<&str> =
        sent.iter().filter(|(_, e)| e.kind == EventKind::SessionOpened).map(|(id, _)| id.as_str()).collect();
    assert_eq!(opens.iter().map(|g| g.id.as_str()).collect::<HashSet<_>>(), want_opens);
    // The outbox agrees; the rolled-back event is nowhere.
    wait_for("outbox counts", Duration::from_secs(5), async || pending(&hooks, "panel").await == 0).await;
    let status = hooks.status().await.unwrap();
    let p = status.iter().find(|s| s.name == "panel").unwrap();
    assert_eq!((p.pending, p.delivered, p.failed_attempts, p.oldest_pending_unix_ms), (0, 10, 0, None));
    let o = status.iter().find(|s| s.name == "opens").unwrap();
    assert_eq!((o.pending, o.delivered), (0, 3));
    assert!(!outbox::event_exists(db, node, &rolled_back).await.unwrap());
    hooks.shutdown().await;
    worker.await.unwrap();
}

/// b: receiver down, restart of the daemon, receiver back on the same port.
async fn receiver_down_and_restart(db: &Database) {
    let node = "b-node";
    let st = RxState::new(&[("panel", b"s3cret-b")]);
    let mut rx = Receiver::start(0, &st).await;
    let port = rx.addr.port();
    let url = rx.url("panel");
    rx.kill().await;
    let ep = endpoint("panel", url, b"s3cret-b", &EventKind::ALL);

    let hooks = Webhooks::new(db.clone(), node.into(), vec![ep.clone()]).await.unwrap();
    let worker = hooks.spawn();
    let subjects = ["10.8.0.10", "10.8.0.11", "fd00:8::12", "dev-13"];
    let kinds = [EventKind::SessionOpened, EventKind::SessionClosed, EventKind::Reset, EventKind::DeviceOffline];
    let mut sent = Vec::new();
    for i in 0..36u64 {
        let e = ev(kinds[(i % 4) as usize], subjects[(i % 4) as usize], i);
        sent.push((hooks.enqueue(&e).await.unwrap(), e));
    }
    // Failed attempts accumulate: 50, 100, 200, 400, 800 ms apart.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert!(st.got().is_empty(), "the receiver is down, yet it got {:?}", st.got());
    let failed = outbox::attempts(db, node, None, Some("panel"), 1000).await.unwrap();
    assert!(failed.len() >= 4 * 4, "expected >= 4 failed attempts per subject head, got {}", failed.len());
    assert!(failed.iter().all(|a| a.status.is_none() && a.error.is_some()), "{failed:#?}");
    let groups = by_subject(&sent);
    let heads: HashSet<&str> = groups.values().map(|v| v[0].as_str()).collect();
    let tried: HashSet<&str> = failed.iter().map(|a| a.event_id.as_str()).collect();
    assert_eq!(tried, heads, "only the head of each subject may be attempted");

    // The daemon dies (no clean stop), and a new one starts on the same database.
    worker.abort();
    let _ = worker.await;
    drop(hooks);
    let hooks = Webhooks::new(db.clone(), node.into(), vec![ep.clone()]).await.unwrap();
    let worker = hooks.spawn();
    // Numbering continues after a restart: these go after the earlier ones of their subject.
    for i in 36..40u64 {
        let e = ev(kinds[(i % 4) as usize], subjects[(i % 4) as usize], i);
        sent.push((hooks.enqueue(&e).await.unwrap(), e));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(st.got().is_empty());

    let _rx = Receiver::start(port, &st).await;
    wait_for("40 events delivered after the receiver came back", Duration::from_secs(20), async || {
        first_arrivals(&st.delivered("panel")).values().map(Vec::len).sum::<usize>() >= 40
    })
    .await;
    st.assert_no_bad();
    let got = st.delivered("panel");
    let want = by_subject(&sent);
    let first = first_arrivals(&got);
    for (subject, ids) in &want {
        assert_eq!(first.get(subject), Some(ids), "first-arrival order of subject {subject}");
    }
    for (id, e) in &sent {
        let g = got.iter().find(|g| &g.id == id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(g.body["data"], e.data);
    }
    wait_for("nothing pending", Duration::from_secs(5), async || pending(&hooks, "panel").await == 0).await;

    // The delivery log of each subject's head: failures with growing gaps, then success.
    for head in &heads {
        let mut log = outbox::attempts(db, node, Some(head), Some("panel"), 1000).await.unwrap();
        log.sort_by_key(|a| a.attempt);
        let last = log.last().unwrap();
        assert_eq!((last.status, last.error.as_deref()), (Some(200), None), "head {head}: {log:#?}");
        let fails: Vec<_> = log.iter().filter(|a| a.error.is_some()).collect();
        assert!(fails.len() >= 4, "head {head}: {} failed attempts before success: {log:#?}", fails.len());
        for w in log.windows(2) {
            let gap = w[1].at_unix_ms - w[0].at_unix_ms;
            let least = ep.backoff(w[0].attempt).as_millis() as u64;
            assert!(
                gap >= least,
                "head {head}: attempt {} came {gap} ms after the previous, backoff is {least} ms",
                w[1].attempt
            );
        }
        // Uncapped part (50, 100, 200 ms): the intervals grow (the bounds above are minimums;
        // this shows they are not all long for another reason).
        let gaps: Vec<u64> = fails.windows(2).take(3).map(|w| w[1].at_unix_ms - w[0].at_unix_ms).collect();
        assert!(gaps[2] > 2 * gaps[0] && gaps[1] > gaps[0], "head {head}: gaps {gaps:?} do not grow");
    }
    // Only heads were retried: every later event went through on its first attempt.
    let all = outbox::attempts(db, node, None, Some("panel"), 1000).await.unwrap();
    for (id, _) in &sent {
        if !heads.contains(id.as_str()) {
            let n = all.iter().filter(|a| &a.event_id == id).count();
            assert_eq!(n, 1, "event {id} (not a head) was attempted {n} times");
        }
    }
    hooks.shutdown().await;
    worker.await.unwrap();
}

/// c: one subject fails; the others are not held up; its later events wait behind its head.
async fn one_subject_fails(db: &Database) {
    let node = "c-node";
    let st = RxState::new(&[("panel", b"c-secret")]);
    st.fail.lock().unwrap().insert("10.8.0.66".into());
    let _rx = Receiver::start(0, &st).await;
    let hooks =
        Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", _rx.url("panel"), b"c-secret", &EventKind::ALL)])
            .await
            .unwrap();
    let worker = hooks.spawn();
    let mut sent = Vec::new();
    for i in 0..4 {
        for subject in ["10.8.0.66", "10.8.0.5", "dev-7"] {
            let e = ev(EventKind::SessionOpened, subject, i);
            sent.push((hooks.enqueue(&e).await.unwrap(), e));
        }
    }
    let want = by_subject(&sent);
    wait_for("the 8 events of the healthy subjects", Duration::from_secs(10), async || {
        st.delivered("panel").len() >= 8
    })
    .await;
    // Give the failing head a few more retries (50, 100, 200 ms...).
    wait_for("4 failed attempts of the failing head", Duration::from_secs(10), async || {
        st.got().iter().filter(|g| g.answered == 500).count() >= 4
    })
    .await;
    st.assert_no_bad();
    let bad = &want["10.8.0.66"];
    let tried: HashSet<String> = st.got().iter().filter(|g| g.subject == "10.8.0.66").map(|g| g.id.clone()).collect();
    assert_eq!(tried, HashSet::from([bad[0].clone()]), "later events of the failing subject went out");
    for subject in ["10.8.0.5", "dev-7"] {
        assert_eq!(first_arrivals(&st.delivered("panel")).get(subject), Some(&want[subject]));
    }
    wait_for("4 recorded attempts of the failing head", Duration::from_secs(5), async || {
        let evs = outbox::events(db, node, 100, Some("10.8.0.66")).await.unwrap();
        evs.iter().find(|e| e.id == bad[0]).is_some_and(|e| e.deliveries[0].attempts >= 4)
    })
    .await;
    let evs = outbox::events(db, node, 100, Some("10.8.0.66")).await.unwrap();
    assert_eq!(evs.len(), 4);
    let head = evs.iter().find(|e| e.id == bad[0]).unwrap();
    let d = &head.deliveries[0];
    assert!(d.delivered_unix_ms.is_none(), "{d:?}");
    assert_eq!(d.last_status, Some(500));
    assert!(d.last_error.as_deref().is_some_and(|e| e.contains("500") && e.contains("failing on purpose")), "{d:?}");
    for e in evs.iter().filter(|e| e.id != bad[0]) {
        assert_eq!(e.deliveries[0].attempts, 0, "{} was attempted while its head was pending", e.id);
    }
    // The subject recovers: its events follow, in order.
    st.fail.lock().unwrap().clear();
    wait_for("the failing subject's 4 events", Duration::from_secs(10), async || st.delivered("panel").len() >= 12)
        .await;
    assert_eq!(first_arrivals(&st.delivered("panel")).get("10.8.0.66"), Some(bad));
    hooks.shutdown().await;
    worker.await.unwrap();
}

struct NoCounters;

impl Source for NoCounters {
    fn epoch(&self) -> Result<String, LoadError> {
        Ok("webhook-test".into())
    }
    fn read_all(&self) -> Result<Vec<Reading>, LoadError> {
        Ok(Vec::new())
    }
    fn read_one(&self, _: IpAddr) -> Result<Option<Reading>, LoadError> {
        Ok(None)
    }
}

/// The real API router for `hooks` on 127.0.0.1 (any port), with a read token: (base URL of
/// /api/v1, token, server task).
async fn serve_api(db: &Database, node: &str, hooks: &Arc<Webhooks>) -> (String, String, tokio::task::JoinHandle<()>) {
    let ledger = Ledger::open(
        LedgerConfig {
            node_id: node.into(),
            poll_interval: Duration::from_secs(3600),
            flush_interval: Duration::from_secs(3600),
            retention_days: [(Granularity::Minute, 2), (Granularity::Hour, 90), (Granularity::Day, 0)],
        },
        db.clone(),
        Arc::new(NoCounters),
        Arc::new(Metrics::default()),
    )
    .await
    .unwrap();
    let (_, token) = tokens::create(db, node, Role::Read, "webhook test").await.unwrap();
    let app = Arc::new(App {
        cfg: ApiConfig {
            listen: None,
            offline_after_ms: 120_000,
            device_offline_after_ms: 120_000,
            metrics_max_clients: 100,
            stream_interval: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(10),
        },
        ledger,
        tokens: TokenCache::new(db.clone(), node.into()),
        metrics: Arc::new(Metrics::default()),
        hub: Default::default(),
        maps: None,
        list_cache: Default::default(),
        webhooks: hooks.clone(),
        identity: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, tunmeter::api::router(app)).await.unwrap();
    });
    (base, token, server)
}

/// d: the API, through the real router on TCP with a real token.
async fn api(db: &Database) {
    let node = "d-node";
    let st = RxState::new(&[("panel", b"d-secret-XYZ"), ("gone", b"gone-secret-XYZ")]);
    // A port for the receiver, not listening yet.
    let mut rx = Receiver::start(0, &st).await;
    let port = rx.addr.port();
    let (panel_url, gone_url) = (rx.url("panel"), rx.url("gone"));
    rx.kill().await;
    let panel = endpoint("panel", panel_url, b"d-secret-XYZ", &EventKind::ALL);
    // Events written while "gone" was configured; then it is removed from the configuration.
    {
        let old = Webhooks::new(
            db.clone(),
            node.into(),
            vec![panel.clone(), endpoint("gone", gone_url, b"gone-secret-XYZ", &EventKind::ALL)],
        )
        .await
        .unwrap();
        old.enqueue(&ev(EventKind::DeviceRecovered, "dev-1", 0)).await.unwrap();
    }
    let hooks = Webhooks::new(db.clone(), node.into(), vec![panel.clone()]).await.unwrap();
    let worker = hooks.spawn();
    let mut ids = vec![];
    for (i, subject) in ["10.8.0.2", "10.8.0.3"].into_iter().enumerate() {
        ids.push(hooks.enqueue(&ev(EventKind::SessionOpened, subject, i as u64)).await.unwrap());
    }

    let (base, token, server) = serve_api(db, node, &hooks).await;
    let http = reqwest::Client::new();
    let get = async |path: &str| -> (u16, String) {
        let r = http.get(format!("{base}{path}")).bearer_auth(&token).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let json_of = |(code, body): (u16, String)| -> Value {
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };

    // Pending, with failed attempts (the receiver is down).
    wait_for("failed attempts in the API", Duration::from_secs(10), async || {
        let v = json_of(get("/webhooks").await);
        v["endpoints"][0]["failed_attempts"].as_u64().unwrap_or(0) >= 2
    })
    .await;
    let (code, text) = get("/webhooks").await;
    assert_eq!(code, 200);
    assert!(!text.contains("secret-XYZ"), "a secret is in the API: {text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["node_id"], json!(node));
    let eps = v["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2, "{v:#}");
    let (p, g) = (&eps[0], &eps[1]);
    assert_eq!((p["name"].as_str(), p["configured"].as_bool()), (Some("panel"), Some(true)));
    assert_eq!(p["url"], json!(panel.url));
    assert_eq!(p["events"].as_array().unwrap().len(), 5);
    assert_eq!((p["pending"].as_u64(), p["delivered"].as_u64()), (Some(3), Some(0)), "{p:#}");
    assert!(p["oldest_pending_unix_ms"].as_u64().is_some());
    assert_eq!((g["name"].as_str(), g["configured"].as_bool()), (Some("gone"), Some(false)));
    assert_eq!((g["pending"].as_u64(), g["url"].clone()), (Some(1), Value::Null), "{g:#}");

    let v = json_of(get("/webhooks/events?limit=2").await);
    let evs = v["events"].as_array().unwrap();
    assert_eq!(evs.len(), 2);
    assert_eq!(evs[0]["id"], json!(ids[1]), "newest first");
    assert_eq!(evs[1]["id"], json!(ids[0]));
    assert_eq!(evs[0]["type"], json!("session.opened"));
    assert_eq!(evs[0]["data"]["n"], json!(1));
    let d = &evs[0]["deliveries"][0];
    assert_eq!(d["endpoint"], json!("panel"));
    assert!(d["delivered_unix_ms"].is_null() && d["next_attempt_unix_ms"].as_u64().is_some(), "{d:#}");
    let v = json_of(get("/webhooks/events?subject=10.8.0.2").await);
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    let v = json_of(get("/webhooks/events?subject=dev-1").await);
    let gone_ev = &v["events"][0];
    assert_eq!(gone_ev["deliveries"].as_array().unwrap().len(), 2, "{gone_ev:#}");

    let v = json_of(get(&format!("/webhooks/deliveries?event={}&endpoint=panel", ids[0])).await);
    let log = v["deliveries"].as_array().unwrap();
    assert!(!log.is_empty());
    assert!(log.iter().all(|a| a["event_id"] == json!(ids[0]) && a["status"].is_null() && a["error"].is_string()));

    // Bad input: 400 with the error body; unknown event: 404; no token: 401.
    for q in [
        "/webhooks/events?limit=0",
        "/webhooks/events?limit=abc",
        "/webhooks/events?limit=5000",
        "/webhooks/events?bogus=1",
        "/webhooks/events?subject=",
        "/webhooks/deliveries?event=not-a-uuid",
        "/webhooks/deliveries?limit=-1",
    ] {
        let (code, body) = get(q).await;
        assert_eq!(code, 400, "{q}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], json!("bad_request"), "{q}: {body}");
    }
    let (code, body) = get(&format!("/webhooks/deliveries?event={}", uuid::Uuid::new_v4())).await;
    assert_eq!(code, 404, "{body}");
    let r = http.get(format!("{base}/webhooks")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // The receiver comes back: delivered, and "gone" is never sent to.
    let _rx = Receiver::start(port, &st).await;
    wait_for("delivered in the API", Duration::from_secs(10), async || {
        let v = json_of(get("/webhooks").await);
        v["endpoints"][0]["pending"] == json!(0) && v["endpoints"][0]["delivered"] == json!(3)
    })
    .await;
    let v = json_of(get("/webhooks").await);
    assert!(v["endpoints"][0]["oldest_pending_unix_ms"].is_null());
    assert_eq!(v["endpoints"][1]["pending"], json!(1), "the removed endpoint's row stays");
    let v = json_of(get(&format!("/webhooks/deliveries?event={}&limit=1", ids[0])).await);
    assert_eq!(v["deliveries"][0]["status"], json!(200));
    assert!(v["deliveries"][0]["error"].is_null());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(st.got().iter().all(|g| g.endpoint == "panel"), "a removed endpoint was sent to");
    st.assert_no_bad();
    hooks.shutdown().await;
    worker.await.unwrap();
    server.abort();
}

/// g: an endpoint URL with credentials (userinfo and a token in the query) at a closed port: the
/// stored errors and every API answer show neither the password nor the query value.
async fn credentials_in_url(db: &Database) {
    let node = "g-node";
    let port = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let (user, password, token_value) = ("hookuser", "pa55-Wd-in-url", "tok-QQQ-in-query");
    let url = format!("http://{user}:{password}@127.0.0.1:{port}/hooks/panel?token={token_value}&x=1");
    let hooks = Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", url, b"g-secret", &EventKind::ALL)])
        .await
        .unwrap();
    let worker = hooks.spawn();
    let id = hooks.enqueue(&ev(EventKind::SessionOpened, "10.8.3.1", 0)).await.unwrap();
    wait_for("2 failed attempts", Duration::from_secs(10), async || {
        outbox::attempts(db, node, None, None, 100).await.unwrap().len() >= 2
    })
    .await;
    let leaked = |what: &str, text: &str| {
        for secret in [password, token_value, user] {
            assert!(!text.contains(secret), "{what} shows {secret:?}: {text}");
        }
    };
    for a in outbox::attempts(db, node, None, None, 100).await.unwrap() {
        let err = a.error.expect("a failed attempt has an error");
        assert!(!err.is_empty());
        leaked("webhook_attempts.error", &err);
    }
    let evs = outbox::events(db, node, 10, None).await.unwrap();
    let last = evs[0].deliveries[0].last_error.clone().expect("last_error is set");
    leaked("webhook_outbox.last_error", &last);

    let (base, token, server) = serve_api(db, node, &hooks).await;
    let http = reqwest::Client::new();
    for path in ["/webhooks", "/webhooks/events", &format!("/webhooks/deliveries?event={id}")] {
        let r = http.get(format!("{base}{path}")).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let text = r.text().await.unwrap();
        leaked(path, &text);
        if path == "/webhooks" {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["endpoints"][0]["url"], json!(format!("http://127.0.0.1:{port}/hooks/panel?…")));
        }
    }
    leaked("Endpoint's Debug", &format!("{:?}", hooks.endpoints()));
    hooks.shutdown().await;
    worker.await.unwrap();
    server.abort();
}

/// e (PostgreSQL): the database goes down while deliveries are pending: nothing is sent while
/// results cannot be recorded, nothing is lost, everything goes out in order once it is back.
async fn database_outage(db: &Database, pg: &mut support::postgres::Postgres) {
    let node = "e-node";
    let st = RxState::new(&[("panel", b"e-secret")]);
    let mut rx = Receiver::start(0, &st).await;
    let port = rx.addr.port();
    let hooks =
        Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", rx.url("panel"), b"e-secret", &EventKind::ALL)])
            .await
            .unwrap();
    let worker = hooks.spawn();
    rx.kill().await;
    let mut sent = Vec::new();
    for i in 0..6u64 {
        let e = ev(EventKind::SessionOpened, ["10.8.1.1", "10.8.1.2"][(i % 2) as usize], i);
        sent.push((hooks.enqueue(&e).await.unwrap(), e));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| pg.stop());
    let down = hooks.enqueue(&ev(EventKind::Reset, "10.8.1.1", 99)).await;
    assert!(down.is_err(), "enqueue while the database is down must fail, got {down:?}");
    let _rx = Receiver::start(port, &st).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(st.got().is_empty(), "sent while the database was down: {:?}", st.got());
    tokio::task::block_in_place(|| pg.start());
    wait_for("6 events after the database came back", Duration::from_secs(40), async || {
        st.delivered("panel").len() >= 6
    })
    .await;
    st.assert_no_bad();
    let first = first_arrivals(&st.delivered("panel"));
    for (subject, ids) in by_subject(&sent) {
        assert_eq!(first.get(&subject), Some(&ids), "order of {subject}");
    }
    wait_for("nothing pending", Duration::from_secs(10), async || {
        hooks.status().await.is_ok_and(|s| s[0].pending == 0 && s[0].delivered == 6)
    })
    .await;
    hooks.shutdown().await;
    worker.await.unwrap();
}

/// f (PostgreSQL only: SQLite has one writer at a time): two transactions take sequence numbers
/// for one subject and commit in the opposite order; the newer event waits for the older.
async fn commits_out_of_order(db: &Database) {
    let node = "f-node";
    let st = RxState::new(&[("panel", b"f-secret")]);
    let rx = Receiver::start(0, &st).await;
    let hooks =
        Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", rx.url("panel"), b"f-secret", &EventKind::ALL)])
            .await
            .unwrap();
    let worker = hooks.spawn();
    let now = tunmeter::clock::unix_ms();
    let mut t1 = db.pool.begin().await.unwrap();
    let older = hooks.enqueue_in(&mut t1, &ev(EventKind::SessionOpened, "10.8.2.1", 1), now).await.unwrap();
    let mut t2 = db.pool.begin().await.unwrap();
    let newer = hooks.enqueue_in(&mut t2, &ev(EventKind::SessionClosed, "10.8.2.1", 2), now).await.unwrap();
    t2.commit().await.unwrap();
    hooks.wake();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(st.got().is_empty(), "the newer event went out before the older one committed: {:?}", st.got());
    t1.commit().await.unwrap();
    hooks.wake();
    wait_for("both events", Duration::from_secs(5), async || st.delivered("panel").len() >= 2).await;
    st.assert_no_bad();
    assert_eq!(first_arrivals(&st.delivered("panel"))["10.8.2.1"], vec![older, newer]);
    hooks.shutdown().await;
    worker.await.unwrap();
}

async fn all_scenarios(db: &Database) {
    receiver_up(db).await;
    receiver_down_and_restart(db).await;
    one_subject_fails(db).await;
    api(db).await;
    credentials_in_url(db).await;
}

fn rt() -> tokio::runtime::Runtime {
    // The daemon's logs, shown when a test fails (RUST_LOG overrides the level).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tunmeter=info")),
        )
        .with_test_writer()
        .try_init();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn sqlite_webhooks() {
    let dir = std::env::temp_dir().join(format!("tmtest-webhooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
    rt().block_on(async {
        let db = Database::open(&url).await.expect("open database");
        all_scenarios(&db).await;
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn postgres_webhooks() {
    if !support::require_root() || !support::postgres::require_postgres() {
        return;
    }
    let mut pg = support::postgres::Postgres::start_new();
    let url = pg.url();
    rt().block_on(async {
        let db = Database::open(&url).await.expect("open database");
        all_scenarios(&db).await;
        commits_out_of_order(&db).await;
        database_outage(&db, &mut pg).await;
    });
}

#[tokio::test]
async fn bad_endpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tmtest-webhooks-cfg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = Database::open(&format!("sqlite://{}?mode=rwc", dir.join("t.db").display())).await.unwrap();
    let ok = endpoint("panel", "http://127.0.0.1:9/hooks".into(), b"k", &EventKind::ALL);
    let cases: Vec<(Vec<Endpoint>, &str)> = vec![
        (vec![ok.clone(), ok.clone()], "two webhooks have this name"),
        (vec![Endpoint { url: "ftp://x/y".into(), ..ok.clone() }], "expected http:// or https://"),
        (vec![Endpoint { url: "not a url".into(), ..ok.clone() }], "url \"not a url\""),
        (vec![Endpoint { secret: vec![], ..ok.clone() }], "secret is empty"),
        (vec![Endpoint { events: vec![], ..ok.clone() }], "events is empty"),
        (vec![Endpoint { min_backoff: Duration::ZERO, ..ok.clone() }], "backoff"),
        (vec![Endpoint { max_backoff: Duration::from_millis(1), ..ok.clone() }], "backoff"),
        (vec![Endpoint { timeout: Duration::ZERO, ..ok.clone() }], "timeout"),
        (vec![Endpoint { name: String::new(), ..ok.clone() }], "name"),
    ];
    for (eps, want) in cases {
        let e = match Webhooks::new(db.clone(), "n".into(), eps.clone()).await {
            Ok(_) => panic!("{eps:?} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(want), "{e:?} should contain {want:?}");
        assert!(!format!("{eps:?}").contains("secret: [107]"), "Debug shows the secret");
    }
    // Backoff: min * 2^(n-1), capped.
    assert_eq!(ok.backoff(1), Duration::from_millis(50));
    assert_eq!(ok.backoff(2), Duration::from_millis(100));
    assert_eq!(ok.backoff(5), Duration::from_millis(800));
    assert_eq!(ok.backoff(6), Duration::from_secs(1));
    assert_eq!(ok.backoff(1000), Duration::from_secs(1));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn openapi_documents_the_routes() {
    use utoipa::OpenApi as _;
    let doc = tunmeter::api::webhooks::WebhookDoc::openapi();
    let json = doc.to_json().unwrap();
    for path in ["/api/v1/webhooks", "/api/v1/webhooks/events", "/api/v1/webhooks/deliveries"] {
        assert!(doc.paths.paths.contains_key(path), "{path} missing from the OpenAPI document");
    }
    for schema in ["EndpointStatus", "EventView", "DeliveryState", "AttemptView"] {
        assert!(json.contains(&format!("\"{schema}\"")), "schema {schema} missing");
    }
    assert!(!json.contains("\"secret\""), "the OpenAPI document has a secret field");
}
