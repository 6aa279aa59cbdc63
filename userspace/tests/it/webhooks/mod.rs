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
//!
//! This file: the shared setup and the entry points per database; the receiver is in
//! `receiver`, scenarios a-c in `delivery`, d and g in `api`, e and f in `database`.

mod api;
mod database;
mod delivery;
mod receiver;

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
use serde_json::{Value, json};
use tunmeter::{
    api::{ApiConfig, App},
    bpf::loader::LoadError,
    db::Database,
    ledger::{Ledger, source::Source, state::Reading},
    tasks::Tasks,
    tokens::{self, Role, TokenCache},
    webhook::{Endpoint, Event, EventKind, Webhooks, outbox},
};

use crate::support;
use receiver::{Got, Receiver, RxState};

fn endpoint(name: &str, url: String, secret: &[u8], events: &[EventKind]) -> Endpoint {
    Endpoint {
        name: name.into(),
        url,
        secret: secret.to_vec(),
        events: events.to_vec(),
        timeout: Duration::from_secs(2),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_secs(1),
        // The receiver is on 127.0.0.1, refused by default.
        allow_private: true,
    }
}

fn ev(kind: EventKind, subject: &str, n: u64) -> Event {
    Event { kind, subject: subject.into(), data: json!({ "n": n, "subject": subject, "nested": { "k": [1, 2, 3] } }) }
}

async fn all_scenarios(db: &Database) {
    delivery::receiver_up(db).await;
    delivery::receiver_down_and_restart(db).await;
    delivery::one_subject_fails(db).await;
    api::api(db).await;
    api::credentials_in_url(db).await;
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
    let file = support::sqlite::SqliteFile::new("webhooks");
    rt().block_on(async {
        let db = Database::open(&file.url).await.expect("open database");
        all_scenarios(&db).await;
    });
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
        database::commits_out_of_order(&db).await;
        database::database_outage(&db, &mut pg).await;
    });
}

#[tokio::test]
async fn bad_endpoints_are_clear_errors() {
    let file = support::sqlite::SqliteFile::new("webhooks-cfg");
    let db = Database::open(&file.url).await.unwrap();
    let ok = endpoint("panel", "http://127.0.0.1:9/hooks".into(), b"k", EventKind::ALL);
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

// ---- helpers -------------------------------------------------------------------------------

/// Poll `f` every 20 ms until it is true; panic after `limit` with `what`.
async fn wait_for(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
