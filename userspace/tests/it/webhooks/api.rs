//! Scenarios d and g: the webhook routes through the real router on TCP with a real token
//! (counts, events, delivery log, 400/401/404, a removed endpoint), and credentials in an
//! endpoint URL kept out of stored errors and the API.

use super::*;

struct NoCounters;

impl Source for NoCounters {
    fn epoch(&self) -> Result<String, LoadError> {
        Ok("webhook-test".into())
    }
    fn read_all(&self, _: &mut dyn FnMut(Reading)) -> Result<(), LoadError> {
        Ok(())
    }
    fn read_one(&self, _: IpAddr) -> Result<Option<Reading>, LoadError> {
        Ok(None)
    }
}

/// The real API router for `hooks` on 127.0.0.1 (any port), with a read token: (base URL of
/// /api/v1, token, server task).
async fn serve_api(db: &Database, node: &str, hooks: &Arc<Webhooks>) -> (String, String, tokio::task::JoinHandle<()>) {
    let ledger =
        Ledger::open(crate::support::hand_polled_ledger(node), db.clone(), Arc::new(NoCounters)).await.unwrap();
    let (_, token) = tokens::create(db, node, Role::Read, "webhook test").await.unwrap();
    let app = Arc::new(App {
        cfg: ApiConfig {
            listen: None,
            offline_after_ms: 120_000,
            device_offline_after_ms: 120_000,
            metrics_max_clients: 100,
            stream_interval: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(10),
            max_connections: 64,
            max_stream_subscribers: 4,
            hook_group: None,
            hook_socket: None,
        },
        ledger,
        tokens: TokenCache::new(db.clone(), node.into()),
        hub: Default::default(),
        tickets: Default::default(),
        maps: None,
        list_cache: Default::default(),
        webhooks: hooks.clone(),
        identity: None,
        selfcheck: None,
        shutdown: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/api/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, tunmeter::api::router(app)).await.unwrap();
    });
    (base, token, server)
}

/// d: the API, through the real router on TCP with a real token.
pub(super) async fn api(db: &Database) {
    let node = "d-node";
    let st = RxState::new(&[("panel", b"d-secret-XYZ"), ("gone", b"gone-secret-XYZ")]);
    // A port for the receiver, not listening yet.
    let mut rx = Receiver::start(0, &st).await;
    let port = rx.addr.port();
    let (panel_url, gone_url) = (rx.url("panel"), rx.url("gone"));
    rx.kill().await;
    let panel = endpoint("panel", panel_url, b"d-secret-XYZ", EventKind::ALL);
    // Events written while "gone" was configured; then it is removed from the configuration.
    {
        let old = Webhooks::new(
            db.clone(),
            node.into(),
            vec![panel.clone(), endpoint("gone", gone_url, b"gone-secret-XYZ", EventKind::ALL)],
        )
        .await
        .unwrap();
        old.enqueue(&ev(EventKind::DeviceRecovered, "dev-1", 0)).await.unwrap();
    }
    let hooks = Webhooks::new(db.clone(), node.into(), vec![panel.clone()]).await.unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
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
    assert_eq!(p["events"].as_array().unwrap().len(), tunmeter::types::EventKind::ALL.len(), "every kind by default");
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
    server.abort();
}

/// g: an endpoint URL with credentials (userinfo and a token in the query) at a closed port: the
/// stored errors and every API answer show neither the password nor the query value.
pub(super) async fn credentials_in_url(db: &Database) {
    let node = "g-node";
    let port = {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let (user, password, token_value) = ("hookuser", "pa55-Wd-in-url", "tok-QQQ-in-query");
    let url = format!("http://{user}:{password}@127.0.0.1:{port}/hooks/panel?token={token_value}&x=1");
    let hooks = Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", url, b"g-secret", EventKind::ALL)])
        .await
        .unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
    server.abort();
}
