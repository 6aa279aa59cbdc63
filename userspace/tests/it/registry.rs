//! Sessions, devices and connections (`tunmeter::registry`) against real databases — a SQLite
//! file and a PostgreSQL server started by the test — and through the real daemon's API in a
//! namespace lab (forward rules of http connections in the pinned maps, a TCP connection
//! through one, roles, and the 400/404/409 answers).

use crate::support;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde_json::Value;
use sqlx::Row as _;
use tunmeter::{
    db::Database,
    ledger::{state::Totals, store},
    registry::{
        RegistryError,
        connections::{self, NewConnection},
        devices::{self, Liveness},
        sessions::{self, ActiveFilter, ListFilter, NewSession},
    },
    webhook::Webhooks,
};

// ---------------------------------------------------------------------------------------------
// Store level

const T0: u64 = 1_700_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn totals(up: u64, down: u64) -> Totals {
    Totals { up_bytes: up, up_packets: 1, down_bytes: down, down_packets: 1 }
}

/// A node with ledger rows for `clients`, and its webhooks (no endpoints: events are still
/// written to the outbox tables).
async fn node(db: &Database, node: &str, clients: &[&str]) -> Arc<Webhooks> {
    store::ensure_node(db, node, T0).await.unwrap();
    for c in clients {
        sqlx::query(
            "INSERT INTO clients (node_id, ip, first_seen_unix_ms, period_started_unix_ms, \
             cursor_up_bytes, cursor_up_packets, cursor_down_bytes, cursor_down_packets, \
             total_up_bytes, total_up_packets, total_down_bytes, total_down_packets, \
             base_up_bytes, base_up_packets, base_down_bytes, base_down_packets) \
             VALUES ($1, $2, $3, $3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)",
        )
        .bind(node)
        .bind(*c)
        .bind(T0 as i64)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    Webhooks::new(db.clone(), node.into(), Vec::new()).await.unwrap()
}

/// (kind, subject, data) of the node's events, in order.
async fn events(db: &Database, node: &str) -> Vec<(String, String, Value)> {
    sqlx::query("SELECT kind, subject, body FROM webhook_events WHERE node_id = $1 ORDER BY seq")
        .bind(node)
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let body: String = r.get("body");
            let v: Value = serde_json::from_str(&body).unwrap();
            (r.get("kind"), r.get("subject"), v["data"].clone())
        })
        .collect()
}

fn new_session(client: &str, username: &str, start: Totals) -> NewSession {
    NewSession {
        client_ip: ip(client),
        protocol: "openvpn-udp".into(),
        instance: "udp1".into(),
        common_name: format!("cn-{username}"),
        username: username.into(),
        real_address: "198.51.100.7:50000".into(),
        source: "hook",
        start,
    }
}

async fn sessions_open_close_list(db: &Database) {
    let n = "rg-sessions";
    let hooks = node(db, n, &["10.8.0.2", "10.8.0.3", "fd00:8::2"]).await;
    let a = sessions::open(db, n, &hooks, &new_session("10.8.0.2", "alice", totals(1000, 5000)), T0).await.unwrap();
    assert!(a.is_active());
    assert_eq!((a.start_up_bytes, a.start_down_bytes, a.up_bytes), (1000, 5000, 0));
    assert_eq!(sessions::get(db, n, &a.id).await.unwrap(), a);
    // The same id in capitals is the same session.
    assert_eq!(sessions::get(db, n, &a.id.to_uppercase()).await.unwrap().id, a.id);

    // A second open for the same client: Conflict naming the active session.
    let e = sessions::open(db, n, &hooks, &new_session("10.8.0.2", "mallory", Totals::default()), T0 + 1)
        .await
        .unwrap_err();
    assert!(matches!(&e, RegistryError::Conflict(m) if m.contains(&a.id)), "{e:?}");

    // Bad input.
    let mut bad = new_session("10.8.0.3", "bob", Totals::default());
    bad.protocol = "pptp".into();
    let e = sessions::open(db, n, &hooks, &bad, T0).await.unwrap_err();
    assert!(matches!(&e, RegistryError::Invalid(m) if m.contains("pptp")), "{e:?}");
    // A client the ledger does not know.
    let e = sessions::open(db, n, &hooks, &new_session("10.8.0.99", "x", Totals::default()), T0).await.unwrap_err();
    assert!(matches!(&e, RegistryError::NotFound { what: "ledger client", .. }), "{e:?}");

    // Close: bytes are end - start; a counter that went backwards gives 0, not a wrap.
    let closed = sessions::close(db, n, &hooks, &a.id, "disconnect", totals(1500, 4000), T0 + 60_000).await.unwrap();
    assert_eq!(closed.closed_unix_ms, Some(T0 + 60_000));
    assert_eq!(closed.close_reason.as_deref(), Some("disconnect"));
    assert_eq!((closed.up_bytes, closed.down_bytes), (500, 0));
    // Twice: Conflict; unknown: NotFound; malformed: BadId.
    let e = sessions::close(db, n, &hooks, &a.id, "again", totals(2000, 9000), T0 + 61_000).await.unwrap_err();
    assert!(matches!(&e, RegistryError::Conflict(m) if m.contains("already closed")), "{e:?}");
    assert_eq!(sessions::get(db, n, &a.id).await.unwrap(), closed, "a refused close changes nothing");
    let unknown = uuid::Uuid::new_v4().to_string();
    let e = sessions::close(db, n, &hooks, &unknown, "x", Totals::default(), T0).await.unwrap_err();
    assert!(matches!(&e, RegistryError::NotFound { what: "session", .. }), "{e:?}");
    for bad in ["", "banana", "123", "6f9619ff-8b86-d011-b42d-00c04fc964f"] {
        let e = sessions::close(db, n, &hooks, bad, "x", Totals::default(), T0).await.unwrap_err();
        assert!(matches!(&e, RegistryError::BadId(s) if s == bad), "{bad}: {e:?}");
        assert!(matches!(sessions::get(db, n, bad).await, Err(RegistryError::BadId(_))));
    }
    let e = sessions::get(db, n, &unknown).await.unwrap_err();
    assert_eq!(e.to_string(), format!("session {unknown} not found"));

    // Open again after the close; a second client; IPv6.
    let b = sessions::open(db, n, &hooks, &new_session("10.8.0.2", "alice", totals(1500, 4000)), T0 + 70_000)
        .await
        .unwrap();
    let c =
        sessions::open(db, n, &hooks, &new_session("10.8.0.3", "carol", Totals::default()), T0 + 80_000).await.unwrap();
    // An OpenVPN client whose transport is unknown (the hook's dev maps to no management
    // instance, e.g. a hook-only setup): protocol "openvpn".
    let mut hook_only = new_session("fd00:8::2", "dave", Totals::default());
    hook_only.protocol = "openvpn".into();
    let d = sessions::open(db, n, &hooks, &hook_only, T0 + 90_000).await.unwrap();
    assert_eq!((d.client_ip, d.protocol.as_str(), d.source.as_str()), (ip("fd00:8::2"), "openvpn", "hook"));
    assert_eq!(sessions::get(db, n, &d.id).await.unwrap().protocol, "openvpn");
    let ids = |v: Vec<sessions::Session>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let all = sessions::list(db, n, &ListFilter::default()).await.unwrap();
    assert_eq!(ids(all), vec![d.id.clone(), c.id.clone(), b.id.clone(), a.id.clone()], "newest first");
    let of_a = sessions::list(db, n, &ListFilter { client_ip: Some(ip("10.8.0.2")), ..Default::default() }).await;
    assert_eq!(ids(of_a.unwrap()), vec![b.id.clone(), a.id.clone()]);
    let active = sessions::list(db, n, &ListFilter { active: Some(true), ..Default::default() }).await.unwrap();
    assert_eq!(ids(active), vec![d.id.clone(), c.id.clone(), b.id.clone()]);
    let done = sessions::list(db, n, &ListFilter { active: Some(false), ..Default::default() }).await.unwrap();
    assert_eq!(ids(done), vec![a.id.clone()]);
    let two = sessions::list(db, n, &ListFilter { limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(ids(two), vec![d.id.clone(), c.id.clone()]);
    let mut act = ids(sessions::active(db, n).await.unwrap());
    act.sort();
    let mut want = vec![b.id.clone(), c.id.clone(), d.id.clone()];
    want.sort();
    assert_eq!(act, want);
    assert_eq!(sessions::active_for(db, n, ip("10.8.0.3")).await.unwrap().map(|s| s.id), Some(c.id.clone()));
    assert_eq!(sessions::active_for(db, n, ip("10.8.0.99")).await.unwrap(), None);

    // Every open and close is an event, in order, with the session as data.
    let ev = events(db, n).await;
    let kinds: Vec<(&str, &str)> = ev.iter().map(|(k, s, _)| (k.as_str(), s.as_str())).collect();
    assert_eq!(
        kinds,
        vec![
            ("session.opened", "10.8.0.2"),
            ("session.closed", "10.8.0.2"),
            ("session.opened", "10.8.0.2"),
            ("session.opened", "10.8.0.3"),
            ("session.opened", "fd00:8::2"),
        ],
        "refused opens and closes leave no event"
    );
    assert_eq!(ev[0].2["id"], a.id.as_str());
    assert_eq!(ev[0].2["username"], "alice");
    assert_eq!(ev[1].2["up_bytes"], 500);
    assert_eq!(ev[1].2["close_reason"], "disconnect");

    // Sessions of an instance that is gone: every active one except those kept.
    let mut e1 = new_session("10.8.0.2", "x", Totals::default());
    e1.instance = "other".into();
    let kept = [c.id.clone()];
    let end_of =
        |ip: IpAddr| if ip == "10.8.0.2".parse::<IpAddr>().unwrap() { totals(2500, 4000) } else { totals(7, 7) };
    let filter = ActiveFilter { instance: Some("udp1".into()), ..Default::default() };
    let gone =
        sessions::close_all_for(db, n, &hooks, &filter, &kept, &end_of, "instance gone", T0 + 100_000).await.unwrap();
    let mut gone_ids = ids(gone.clone());
    gone_ids.sort();
    let mut want = vec![b.id.clone(), d.id.clone()];
    want.sort();
    assert_eq!(gone_ids, want);
    let b_closed = gone.iter().find(|s| s.id == b.id).unwrap();
    assert_eq!(
        (b_closed.up_bytes, b_closed.down_bytes, b_closed.close_reason.as_deref()),
        (1000, 0, Some("instance gone"))
    );
    assert!(sessions::get(db, n, &c.id).await.unwrap().is_active(), "kept");
    assert_eq!(events(db, n).await.iter().filter(|e| e.0 == "session.closed").count(), 3);
    // Nothing left to close: an empty pass.
    let again = sessions::close_all_for(db, n, &hooks, &filter, &kept, &end_of, "instance gone", T0 + 100_001);
    assert!(again.await.unwrap().is_empty());
}

/// 16 opens for one client at once: exactly one wins; the others are Conflicts (never a raw
/// database error), whichever of the check and the unique index catches them.
async fn concurrent_opens(db: &Database) {
    let n = "rg-race";
    let hooks = node(db, n, &["10.8.0.2"]).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (db, hooks) = (db.clone(), hooks.clone());
        tasks.push(tokio::spawn(async move {
            let s = new_session("10.8.0.2", &format!("u{i}"), Totals::default());
            sessions::open(&db, n, &hooks, &s, T0 + i).await
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => ok.push(s),
            Err(RegistryError::Conflict(m)) => assert!(m.contains("10.8.0.2 has an active session"), "{m}"),
            Err(e) => panic!("a concurrent open failed with something other than Conflict: {e:?}"),
        }
    }
    assert_eq!(ok.len(), 1, "exactly one open wins");
    let rows = sessions::list(db, n, &ListFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, ok[0].id);
    assert_eq!(events(db, n).await.len(), 1, "one session.opened");

    // Replace, 8 at once: each success closes exactly the session before it ("superseded") and
    // opens its own in one transaction; a loser changes nothing.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (db, hooks) = (db.clone(), hooks.clone());
        tasks.push(tokio::spawn(async move {
            let s = new_session("10.8.0.2", &format!("r{i}"), totals(100 * (i + 1), 0));
            sessions::replace(&db, n, &hooks, &s, T0 + 1000 + i).await
        }));
    }
    let mut replaced = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => replaced.push(r),
            Err(RegistryError::Conflict(_)) => {}
            Err(e) => panic!("a concurrent replace failed with something other than Conflict: {e:?}"),
        }
    }
    assert!(!replaced.is_empty());
    eprintln!("{:?}: {} of 8 concurrent replaces won", db.backend, replaced.len());
    let rows = sessions::list(db, n, &ListFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1 + replaced.len(), "one session per successful replace, none for a loser");
    assert_eq!(rows.iter().filter(|s| s.is_active()).count(), 1, "exactly one active");
    let closed: Vec<_> = rows.iter().filter(|s| !s.is_active()).collect();
    assert_eq!(closed.len(), replaced.len());
    assert!(closed.iter().all(|s| s.close_reason.as_deref() == Some("superseded")));
    // The closed sessions are exactly the ones the replaces report, each once.
    let mut reported: Vec<String> =
        replaced.iter().map(|r| r.closed.as_ref().expect("closed one").id.clone()).collect();
    reported.sort();
    let mut stored: Vec<String> = closed.iter().map(|s| s.id.clone()).collect();
    stored.sort();
    assert_eq!(reported, stored);
    // A superseded session ends where its successor starts.
    for r in &replaced {
        let c = r.closed.as_ref().unwrap();
        assert_eq!(c.up_bytes, r.opened.start_up_bytes.saturating_sub(c.start_up_bytes));
    }
    let ev = events(db, n).await;
    assert_eq!(ev.iter().filter(|e| e.0 == "session.opened").count(), 1 + replaced.len());
    assert_eq!(ev.iter().filter(|e| e.0 == "session.closed").count(), replaced.len());
    // Replace without an active session just opens.
    let hooks2 = node(db, "rg-race2", &["10.8.0.5"]).await;
    let r = sessions::replace(db, "rg-race2", &hooks2, &new_session("10.8.0.5", "e", Totals::default()), T0).await;
    let r = r.unwrap();
    assert!(r.closed.is_none() && r.opened.is_active());
}

async fn devices_crud_and_monitor(db: &Database) {
    let n = "rg-devices";
    let hooks = node(db, n, &[]).await;
    let phone = devices::create(db, n, "phone 1", ip("10.8.0.2"), T0).await.unwrap();
    assert_eq!((phone.status.as_str(), phone.status_changed_unix_ms), ("unknown", None));
    assert_eq!(devices::get(db, n, &phone.id).await.unwrap(), phone);
    let router = devices::create(db, n, "router", ip("fd00:8::5"), T0).await.unwrap();
    assert_eq!(devices::list(db, n).await.unwrap(), vec![phone.clone(), router.clone()]);
    assert_eq!(devices::by_vpn_ip(db, n, ip("fd00:8::5")).await.unwrap(), Some(router.clone()));

    for (name, addr, want) in [
        ("phone 1", "10.8.0.9", "a device named \"phone 1\" exists already"),
        ("other", "10.8.0.2", "has the VPN address 10.8.0.2 already"),
        ("", "10.8.0.9", "1 to 64 characters"),
        (&"x".repeat(65), "10.8.0.9", "got 65"),
        ("tab\there", "10.8.0.9", "control character"),
        ("ok", "0.0.0.0", "not a unicast"),
        ("ok", "::ffff:10.8.0.9", "IPv4-mapped"),
    ] {
        let e = devices::create(db, n, name, ip(addr), T0).await.unwrap_err();
        assert!(e.to_string().contains(want), "{name:?} {addr}: {e}");
        let conflict = want.contains("exists") || want.contains("already");
        assert_eq!(matches!(e, RegistryError::Conflict(_)), conflict, "{e:?}");
    }
    assert!(matches!(devices::get(db, n, "nope").await, Err(RegistryError::BadId(_))));
    let unknown = uuid::Uuid::new_v4().to_string();
    assert!(matches!(devices::get(db, n, &unknown).await, Err(RegistryError::NotFound { what: "device", .. })));
    // Names are per node.
    let hooks_b = node(db, "rg-devices-b", &[]).await;
    drop(hooks_b);
    devices::create(db, "rg-devices-b", "phone 1", ip("10.8.0.2"), T0).await.unwrap();

    // The monitor, driven by a liveness the test sets.
    let live: Arc<Mutex<std::collections::HashMap<IpAddr, Liveness>>> = Default::default();
    let set = |a: &str, l: Liveness| {
        live.lock().unwrap().insert(ip(a), l);
    };
    let look = {
        let live = live.clone();
        move |a: IpAddr| live.lock().unwrap().get(&a).copied().unwrap_or_default()
    };
    let off_after = 120_000;
    let pass = |now: u64| {
        let (hooks, look) = (hooks.clone(), look.clone());
        async move {
            let mut v: Vec<(String, String)> = devices::monitor_pass(db, n, &hooks, &look, off_after, now)
                .await
                .unwrap()
                .into_iter()
                .map(|d| (d.name, d.status))
                .collect();
            v.sort();
            v
        }
    };
    let t = T0 + 1_000_000;
    // A device seen once, long ago (before offline_after): unknown -> offline, no event.
    let sensor = devices::create(db, n, "sensor", ip("10.8.0.4"), T0).await.unwrap();
    set("10.8.0.4", Liveness { last_seen_ms: Some(T0), latest_handshake_ms: None });
    // phone: a packet 10 s ago: unknown -> online, no event. router: nothing ever: stays unknown.
    set("10.8.0.2", Liveness { last_seen_ms: Some(t - 10_000), latest_handshake_ms: None });
    assert_eq!(pass(t).await, vec![("phone 1".into(), "online".into()), ("sensor".into(), "offline".into())]);
    assert!(events(db, n).await.is_empty(), "first states are stored without an event");
    let r = devices::get(db, n, &router.id).await.unwrap();
    assert_eq!((r.status.as_str(), r.status_changed_unix_ms), ("unknown", None), "never seen: unknown");
    assert_eq!(pass(t + 1000).await, vec![], "nothing changed");
    // phone goes quiet for longer than offline_after: device.offline. router: still unknown.
    assert_eq!(pass(t + 200_000).await, vec![("phone 1".into(), "offline".into())]);
    assert_eq!(devices::get(db, n, &router.id).await.unwrap().status, "unknown");
    // router: its first contact (a WireGuard handshake counts as alive): unknown -> online,
    // no event (it never went offline).
    set("fd00:8::5", Liveness { last_seen_ms: None, latest_handshake_ms: Some(t + 250_000) });
    // phone: a packet again: device.recovered.
    set("10.8.0.2", Liveness { last_seen_ms: Some(t + 299_000), latest_handshake_ms: None });
    assert_eq!(pass(t + 300_000).await, vec![("phone 1".into(), "online".into()), ("router".into(), "online".into())]);
    let ev = events(db, n).await;
    let kinds: Vec<(&str, &str)> = ev.iter().map(|(k, s, _)| (k.as_str(), s.as_str())).collect();
    assert_eq!(
        kinds,
        vec![("device.offline", phone.id.as_str()), ("device.recovered", phone.id.as_str())],
        "no device.recovered at a first contact"
    );
    // router, seen once, goes silent: device.offline (phone keeps sending).
    set("10.8.0.2", Liveness { last_seen_ms: Some(t + 499_000), latest_handshake_ms: None });
    assert_eq!(pass(t + 500_000).await, vec![("router".into(), "offline".into())]);
    let ev = events(db, n).await;
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert_eq!((ev[2].0.as_str(), ev[2].1.as_str()), ("device.offline", router.id.as_str()));
    assert_eq!(ev[2].2["latest_handshake_unix_ms"], t + 250_000);
    // sensor comes back: offline -> online is device.recovered.
    set("10.8.0.4", Liveness { last_seen_ms: Some(t + 599_000), latest_handshake_ms: None });
    set("10.8.0.2", Liveness { last_seen_ms: Some(t + 599_000), latest_handshake_ms: None });
    assert_eq!(pass(t + 600_000).await, vec![("sensor".into(), "online".into())]);
    let ev = events(db, n).await;
    assert_eq!((ev[3].0.as_str(), ev[3].1.as_str()), ("device.recovered", sensor.id.as_str()));
    devices::delete(db, n, &sensor.id).await.unwrap();
    let offline = &ev[0].2;
    assert_eq!(offline["device"]["name"], "phone 1");
    assert_eq!(offline["device"]["status"], "offline");
    assert_eq!(offline["last_seen_unix_ms"], t - 10_000);
    assert_eq!(offline["latest_handshake_unix_ms"], Value::Null);
    let stored = devices::get(db, n, &phone.id).await.unwrap();
    assert_eq!((stored.status.as_str(), stored.status_changed_unix_ms), ("online", Some(t + 300_000)));
    let stored = devices::get(db, n, &router.id).await.unwrap();
    assert_eq!((stored.status.as_str(), stored.status_changed_unix_ms), ("offline", Some(t + 500_000)));

    // Delete: a device with connections cannot go.
    let c = connections::create(db, n, None, &openvpn(&phone.id, "alice", 12345), T0).await.unwrap();
    let e = devices::delete(db, n, &phone.id).await.unwrap_err();
    assert!(matches!(&e, RegistryError::Conflict(m) if m.contains("1 connection")), "{e:?}");
    connections::delete(db, n, None, &c.id).await.unwrap();
    devices::delete(db, n, &phone.id).await.unwrap();
    assert!(matches!(devices::delete(db, n, &phone.id).await, Err(RegistryError::NotFound { .. })));
    assert!(matches!(devices::delete(db, n, "x").await, Err(RegistryError::BadId(_))));
    assert_eq!(devices::list(db, n).await.unwrap(), vec![devices::get(db, n, &router.id).await.unwrap()]);
}

fn openvpn(device: &str, user: &str, proxy_port: u16) -> NewConnection {
    NewConnection {
        device_id: device.into(),
        protocol: "openvpn".into(),
        public_port: None,
        device_port: None,
        username: Some(user.into()),
        proxy_port: Some(proxy_port),
    }
}

fn forward(device: &str, protocol: &str, public_port: u16, device_port: u16) -> NewConnection {
    NewConnection {
        device_id: device.into(),
        protocol: protocol.into(),
        public_port: Some(public_port),
        device_port: Some(device_port),
        username: None,
        proxy_port: None,
    }
}

async fn connections_crud(db: &Database) {
    let n = "rg-conns";
    let _hooks = node(db, n, &[]).await;
    let d4 = devices::create(db, n, "phone", ip("10.8.0.2"), T0).await.unwrap();
    let d6 = devices::create(db, n, "v6 only", ip("fd00:8::2"), T0).await.unwrap();
    let http = connections::create(db, n, None, &forward(&d4.id, "http", 18080, 3128), T0).await.unwrap();
    assert_eq!((http.public_port, http.device_port, http.username.as_deref()), (Some(18080), Some(3128), None));
    assert_eq!(
        http.forward_spec(d4.vpn_ip).map(|s| (s.public_port, s.device.to_string())),
        Some((18080, "10.8.0.2:3128".to_string()))
    );
    let socks = connections::create(db, n, None, &forward(&d4.id, "socks5", 11080, 1080), T0 + 1).await.unwrap();
    let ovpn = connections::create(db, n, None, &openvpn(&d6.id, "bob@example.org", 12345), T0 + 2).await.unwrap();
    assert_eq!((ovpn.proxy_port, ovpn.public_port), (Some(12345), None));
    assert_eq!(connections::list(db, n).await.unwrap(), vec![http.clone(), socks.clone(), ovpn.clone()]);
    assert_eq!(connections::get(db, n, &ovpn.id).await.unwrap(), ovpn);

    // Each refusal names its problem.
    let unknown = uuid::Uuid::new_v4().to_string();
    let mut cases: Vec<(NewConnection, &str)> = vec![
        (forward(&d4.id, "http", 18080, 8080), "public port 18080 is used by connection"),
        (openvpn(&d4.id, "bob@example.org", 1), "username \"bob@example.org\" has connection"),
        (forward(&d6.id, "http", 18081, 3128), "forward rules are IPv4"),
        (forward(&unknown, "http", 18082, 3128), "not found"),
        (forward("not-a-uuid", "http", 18082, 3128), "is not a UUID"),
        (forward(&d4.id, "https", 18082, 3128), "bad protocol \"https\""),
        (forward(&d4.id, "http", 0, 3128), "public_port 0 is not a port"),
        (forward(&d4.id, "http", 18082, 0), "device_port 0 is not a port"),
        (openvpn(&d4.id, "", 1), "username must be 1 to 64"),
        (openvpn(&d4.id, &"u".repeat(65), 1), "got 65"),
        (openvpn(&d4.id, "bad/name", 1), "has the character '/'"),
        (openvpn(&d4.id, "carol", 0), "proxy_port 0 is not a port"),
    ];
    let mut no_port = forward(&d4.id, "http", 1, 1);
    no_port.public_port = None;
    cases.push((no_port, "needs public_port"));
    let mut extra = openvpn(&d4.id, "dave", 5);
    extra.device_port = Some(80);
    cases.push((extra, "has no device_port"));
    let mut user_on_http = forward(&d4.id, "socks5", 2, 2);
    user_on_http.username = Some("erin".into());
    cases.push((user_on_http, "has no username"));
    for (c, want) in cases {
        let e = connections::create(db, n, None, &c, T0).await.unwrap_err();
        assert!(e.to_string().contains(want), "{c:?}: {e} (wanted {want:?})");
        let kind_ok = match &e {
            RegistryError::Conflict(_) => want.contains("used by") || want.contains("has connection"),
            RegistryError::NotFound { what: "device", .. } => want == "not found",
            RegistryError::BadId(_) => want.contains("UUID"),
            RegistryError::Invalid(_) => true,
            _ => false,
        };
        assert!(kind_ok, "{e:?}");
    }
    assert_eq!(connections::list(db, n).await.unwrap().len(), 3, "no refused connection was stored");

    // Delete; then the port is free again.
    connections::delete(db, n, None, &http.id).await.unwrap();
    assert!(matches!(connections::get(db, n, &http.id).await, Err(RegistryError::NotFound { .. })));
    assert!(matches!(connections::delete(db, n, None, &http.id).await, Err(RegistryError::NotFound { .. })));
    assert!(matches!(connections::delete(db, n, None, "zz").await, Err(RegistryError::BadId(_))));
    connections::create(db, n, None, &forward(&d4.id, "http", 18080, 3129), T0 + 3).await.unwrap();
    // Ports and usernames are per node.
    let _h = node(db, "rg-conns-b", &[]).await;
    let other = devices::create(db, "rg-conns-b", "phone", ip("10.8.0.2"), T0).await.unwrap();
    connections::create(db, "rg-conns-b", None, &forward(&other.id, "http", 18080, 3128), T0).await.unwrap();
    connections::create(db, "rg-conns-b", None, &openvpn(&other.id, "bob@example.org", 1), T0).await.unwrap();
    // A device of another node is unknown here.
    let e = connections::create(db, n, None, &forward(&other.id, "http", 18090, 1), T0).await.unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { what: "device", .. }), "{e:?}");
}

async fn store_suite(url: &str) {
    let db = Database::open(url).await.expect("open database");
    sessions_open_close_list(&db).await;
    concurrent_opens(&db).await;
    devices_crud_and_monitor(&db).await;
    connections_crud(&db).await;
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

#[test]
fn registry_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("tmtest-registry-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
    rt().block_on(store_suite(&url));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn registry_on_postgres() {
    if !support::postgres::require_postgres() {
        return;
    }
    let pg = support::postgres::Postgres::start_new();
    let url = pg.create_database("registry");
    rt().block_on(store_suite(&url));
}

// ---------------------------------------------------------------------------------------------
// Through the daemon's API, in a namespace lab

mod lab {
    use std::{net::SocketAddr, time::Duration};

    use serde_json::{Value, json};
    use tunmeter_lab::in_netns;

    use super::support::{self, env::LabEnv, ns_sh, proxies};

    const PORT: u16 = 9107;
    /// The device's web server (on 10.8.0.2), and the public ports on the server.
    const DEVICE_WEB: u16 = 8000;
    const PUB: u16 = 18080;
    const PUB_TAKEN: u16 = 18081;

    struct Env(LabEnv);

    impl Drop for Env {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0.state);
            let _ = std::fs::remove_file(&self.0.log);
        }
    }

    /// One request from inside the server namespace: (status, body as JSON or Null).
    fn call(ns: &str, method: &str, path: &str, token: &str, body: Option<String>) -> (u16, Value) {
        let shown = format!("{method} {path}");
        let (method, path, token) = (method.to_string(), path.to_string(), token.to_string());
        in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let mut req = reqwest::Client::new()
                    .request(reqwest::Method::from_bytes(method.as_bytes())?, format!("http://127.0.0.1:{PORT}{path}"))
                    .bearer_auth(token)
                    .timeout(Duration::from_secs(20));
                if let Some(b) = body {
                    req = req.header("content-type", "application/json").body(b);
                }
                let resp = req.send().await?;
                let status = resp.status().as_u16();
                let text = resp.text().await?;
                let v = if text.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
                };
                Ok((status, v))
            })
        })
        .unwrap_or_else(|e| panic!("{shown}: {e:#}"))
    }

    fn token(env: &LabEnv, role: &str) -> String {
        let (_, state) = env.path_args();
        let out = std::process::Command::new(support::daemon::BIN)
            .args(["token", "create", "--role", role, "--name", role, "--state-dir", &state, "--node-id", &env.node])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().lines().last().unwrap().to_string()
    }

    fn steer(env: &LabEnv, args: &[&str]) -> std::process::Output {
        let pin = env.pins.path().display().to_string();
        let all = [&["steer"], args, &["--pin-dir", pin.as_str()]].concat();
        support::daemon::output(&env.lab.server_ns(), &all)
    }

    /// The tcp forward rule on `port` in `tunmeter steer list --json`, if any.
    fn forward_rule(env: &LabEnv, port: u16) -> Option<Value> {
        let out = steer(env, &["list", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["forward"].as_array()?.iter().find(|r| r["proto"] == "tcp" && r["public_port"] == port).cloned()
    }

    fn message(v: &Value) -> &str {
        v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error body: {v}"))
    }

    #[test]
    fn registry_api_with_forward_rules_sessions_and_errors() {
        if !support::require_root() {
            return;
        }
        let env = Env(LabEnv::new("rg", 1, 1));
        let e = &env.0;
        let srv = e.lab.server_ns();
        let device = e.lab.tun_clients()[0].clone();
        let customer = e.lab.eth_clients()[0].clone();
        ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        ns_sh(&device.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
        let _daemon = e.start_daemon(&[]);
        let web = proxies::WebServer::start(&device.ns, DEVICE_WEB);
        let (admin, read) = (token(e, "admin"), token(e, "read"));
        let api = |m: &str, p: &str, t: &str, b: Option<Value>| call(&srv, m, p, t, b.map(|b| b.to_string()));

        // Devices.
        let (s, d) =
            api("POST", "/api/v1/devices", &admin, Some(json!({"name": "phone", "vpn_ip": device.v4.to_string()})));
        assert_eq!(s, 201, "{d}");
        let dev_id = d["id"].as_str().unwrap().to_string();
        assert_eq!((d["status"].as_str(), d["connections"].as_u64()), (Some("unknown"), Some(0)));
        assert!(d["online"].is_boolean() && d.get("last_seen_unix_ms").is_some(), "{d}");
        let (s, b) = api("POST", "/api/v1/devices", &admin, Some(json!({"name": "phone", "vpn_ip": "10.8.0.9"})));
        assert_eq!((s, b["error"]["code"].as_str()), (409, Some("conflict")), "{b}");
        let (s, b) =
            api("POST", "/api/v1/devices", &admin, Some(json!({"name": "p2", "vpn_ip": device.v4.to_string()})));
        assert_eq!(s, 409, "{b}");
        let (s, b) = api("POST", "/api/v1/devices", &read, Some(json!({"name": "p3", "vpn_ip": "10.8.0.10"})));
        assert_eq!((s, b["error"]["code"].as_str()), (403, Some("forbidden")), "{b}");
        let (s, doc) = api("GET", "/api/v1/openapi.json", &read, None);
        assert_eq!(s, 200);
        for p in ["/api/v1/sessions", "/api/v1/devices/{id}", "/api/v1/connections/{id}", "/api/v1/sessions/{id}/close"]
        {
            assert!(doc["paths"][p].is_object(), "{p} missing from OpenAPI");
        }
        let (s, b) = api("GET", "/api/v1/devices", &read, None);
        assert_eq!(s, 200);
        assert_eq!(b["devices"].as_array().unwrap().len(), 1, "{b}");

        // An http connection: a forward rule tcp/PUB -> device:DEVICE_WEB in the pinned maps,
        // its public port reserved, and a real TCP connection through it.
        let new = json!({"device_id": dev_id, "protocol": "http", "public_port": PUB, "device_port": DEVICE_WEB});
        let (s, c) = api("POST", "/api/v1/connections", &admin, Some(new.clone()));
        assert_eq!(s, 201, "{c}");
        let conn_id = c["id"].as_str().unwrap().to_string();
        let rule = forward_rule(e, PUB).expect("forward rule in the pinned maps");
        assert_eq!(rule["device"], format!("{}:{DEVICE_WEB}", device.v4));
        assert_eq!(rule["origin"], "runtime");
        assert_eq!(c["rule"], rule["id"], "{c}");
        assert_eq!((c["device_name"].as_str(), c["device_vpn_ip"].as_str()), (Some("phone"), Some("10.8.0.2")));
        let reserved = ns_sh(&srv, &["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]);
        assert!(tunmeter::steer::host::parse_port_list(&reserved).contains(&PUB), "reserved: {reserved}");
        let public = SocketAddr::from((e.lab.server_eth_v4(), PUB));
        let got = proxies::tcp_request(
            &customer.ns,
            public,
            b"GET /small HTTP/1.0\r\n\r\n".to_vec(),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|err| panic!("TCP through the forward rule: {err:#}"));
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.") && got.ends_with(proxies::SMALL_BODY), "{got}");
        assert!(web.requests().iter().any(|(peer, _)| peer.ip() == customer.v4), "the device saw the customer");
        let (s, b) = api("GET", &format!("/api/v1/connections/{conn_id}"), &read, None);
        assert_eq!((s, &b["rule"]), (200, &rule["id"]), "{b}");
        let (s, b) = api("GET", &format!("/api/v1/devices/{dev_id}"), &read, None);
        assert_eq!((s, b["connections"].as_u64()), (200, Some(1)), "{b}");

        // Conflicts: the same port again; a port a forward rule holds (nothing stored then); a
        // device with connections.
        let (s, b) = api("POST", "/api/v1/connections", &admin, Some(new));
        assert_eq!(s, 409, "{b}");
        let out = steer(
            e,
            &["add", "forward", "--proto", "tcp", "--public-port", &PUB_TAKEN.to_string(), "--device", "10.8.0.2:9"],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let taken = json!({"device_id": dev_id, "protocol": "socks5", "public_port": PUB_TAKEN, "device_port": 1080});
        let (s, b) = api("POST", "/api/v1/connections", &admin, Some(taken));
        assert_eq!(s, 409, "{b}");
        assert!(message(&b).contains("taken by forward rule"), "{b}");
        let (_, b) = api("GET", "/api/v1/connections", &read, None);
        assert_eq!(b["connections"].as_array().unwrap().len(), 1, "the refused connection is not stored: {b}");
        assert_eq!(forward_rule(e, PUB_TAKEN).unwrap()["device"], "10.8.0.2:9", "the other rule is untouched");
        let (s, b) = api("DELETE", &format!("/api/v1/devices/{dev_id}"), &admin, None);
        assert_eq!(s, 409, "{b}");

        // An openvpn connection: no rule.
        let ov = json!({"device_id": dev_id, "protocol": "openvpn", "username": "alice", "proxy_port": 12345});
        let (s, b) = api("POST", "/api/v1/connections", &admin, Some(ov));
        assert_eq!((s, &b["rule"]), (201, &Value::Null), "{b}");
        let ov_id = b["id"].as_str().unwrap().to_string();

        // Bad input: 400 naming the problem; unknown ids: 404.
        let missing = uuid::Uuid::new_v4().to_string();
        for (m, p, body, want, needle) in [
            ("GET", "/api/v1/sessions/not-a-uuid".to_string(), None, 400, "not a UUID"),
            ("POST", "/api/v1/sessions/not-a-uuid/close".to_string(), None, 400, "not a UUID"),
            ("GET", "/api/v1/devices/42".to_string(), None, 400, "not a UUID"),
            ("DELETE", "/api/v1/connections/xyz".to_string(), None, 400, "not a UUID"),
            ("GET", "/api/v1/sessions?limit=0".to_string(), None, 400, "limit"),
            ("GET", "/api/v1/sessions?client=banana".to_string(), None, 400, "not an IP address"),
            ("GET", "/api/v1/sessions?bogus=1".to_string(), None, 400, "bogus"),
            ("POST", "/api/v1/devices".to_string(), Some("{\"name\": \"x\"".to_string()), 400, "bad request body"),
            (
                "POST",
                "/api/v1/devices".to_string(),
                Some(json!({"name": "x", "vpn_ip": "10.8.0.300"}).to_string()),
                400,
                "not an IP address",
            ),
            (
                "POST",
                "/api/v1/devices".to_string(),
                Some(json!({"name": "x", "vpn_ip": "10.8.0.30", "extra": 1}).to_string()),
                400,
                "unknown field",
            ),
            (
                "POST",
                "/api/v1/connections".to_string(),
                Some(json!({"device_id": dev_id, "protocol": "http", "public_port": 0, "device_port": 1}).to_string()),
                400,
                "public_port 0",
            ),
            (
                "POST",
                "/api/v1/connections".to_string(),
                Some(
                    json!({"device_id": dev_id, "protocol": "http", "public_port": 70000, "device_port": 1})
                        .to_string(),
                ),
                400,
                "bad request body",
            ),
            (
                "POST",
                "/api/v1/connections".to_string(),
                Some(
                    json!({"device_id": dev_id, "protocol": "openvpn", "username": "a b", "proxy_port": 1}).to_string(),
                ),
                400,
                "username",
            ),
            (
                "POST",
                "/api/v1/connections".to_string(),
                Some(
                    json!({"device_id": missing, "protocol": "openvpn", "username": "zed", "proxy_port": 1})
                        .to_string(),
                ),
                404,
                "not found",
            ),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "banana"}).to_string()),
                400,
                "not an IP address",
            ),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "10.8.0.2", "protocol": "pptp"}).to_string()),
                400,
                "pptp",
            ),
            // Only addresses that can be clients are admitted (a ledger row is permanent).
            ("POST", "/api/v1/sessions".to_string(), Some(json!({"client_ip": "0.0.0.0"}).to_string()), 400, "unicast"),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "224.0.0.1"}).to_string()),
                400,
                "unicast",
            ),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "255.255.255.255"}).to_string()),
                400,
                "unicast",
            ),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "127.0.0.1"}).to_string()),
                400,
                "unicast",
            ),
            ("POST", "/api/v1/sessions".to_string(), Some(json!({"client_ip": "::1"}).to_string()), 400, "unicast"),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "203.0.113.5"}).to_string()),
                400,
                "no subnet configured for counting",
            ),
            (
                "POST",
                "/api/v1/sessions".to_string(),
                Some(json!({"client_ip": "fd00:7::2"}).to_string()),
                400,
                "no subnet configured for counting",
            ),
            ("GET", format!("/api/v1/sessions/{missing}"), None, 404, "not found"),
            ("GET", format!("/api/v1/devices/{missing}"), None, 404, "not found"),
            ("DELETE", format!("/api/v1/connections/{missing}"), None, 404, "not found"),
        ] {
            let (s, b) = call(&srv, m, &p, &admin, body);
            assert_eq!(s, want, "{m} {p}: {b}");
            assert!(message(&b).contains(needle), "{m} {p}: {b} lacks {needle:?}");
        }

        for refused in ["0.0.0.0", "203.0.113.5", "fd00:7::2"] {
            let (s, b) = api("GET", &format!("/api/v1/clients/{refused}"), &read, None);
            assert_eq!(s, 404, "a refused session admitted {refused}: {b}");
        }

        // Sessions: open, a second open is 409, close, a second close is 409; read tokens read.
        let open = json!({"client_ip": "10.8.0.2", "username": "alice", "protocol": "openvpn-udp"});
        let (s, b) = api("POST", "/api/v1/sessions", &read, Some(open.clone()));
        assert_eq!(s, 403, "{b}");
        let (s, sess) = api("POST", "/api/v1/sessions", &admin, Some(open.clone()));
        assert_eq!(s, 201, "{sess}");
        assert_eq!(
            (sess["active"].as_bool(), sess["source"].as_str(), sess["username"].as_str()),
            (Some(true), Some("api"), Some("alice"))
        );
        let sid = sess["id"].as_str().unwrap().to_string();
        let (s, b) = api("POST", "/api/v1/sessions", &admin, Some(open));
        assert_eq!(s, 409, "{b}");
        assert!(message(&b).contains(&sid), "the conflict names the active session: {b}");
        let (s, b) = api("GET", "/api/v1/sessions?client=10.8.0.2&active=true", &read, None);
        assert_eq!(s, 200);
        assert_eq!(b["sessions"].as_array().unwrap().len(), 1, "{b}");
        // Traffic of the client counts towards its active session, live.
        tunmeter_lab::traffic::tcp_exchange(&device.ns, e.lab.server_tun_v4().into(), 200_000).expect("upload");
        let t0 = std::time::Instant::now();
        loop {
            let (_, b) = api("GET", &format!("/api/v1/sessions/{sid}"), &read, None);
            if b["up_bytes"].as_u64().unwrap_or(0) >= 200_000 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the session never counted the upload: {b}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (s, b) = api("POST", &format!("/api/v1/sessions/{sid}/close"), &read, None);
        assert_eq!(s, 403, "{b}");
        let (s, closed) = api("POST", &format!("/api/v1/sessions/{sid}/close"), &admin, None);
        assert_eq!(s, 200, "{closed}");
        assert_eq!((closed["active"].as_bool(), closed["close_reason"].as_str()), (Some(false), Some("api")));
        assert!(closed["up_bytes"].as_u64().unwrap() >= 200_000, "{closed}");
        let (s, b) = api("POST", &format!("/api/v1/sessions/{sid}/close"), &admin, None);
        assert_eq!(s, 409, "{b}");
        // A client the ledger has not seen yet is admitted.
        let (s, b) = api("POST", "/api/v1/sessions", &admin, Some(json!({"client_ip": "10.8.0.77"})));
        assert_eq!((s, b["protocol"].as_str()), (201, Some("other")), "{b}");
        let (s, b) = api("GET", "/api/v1/clients/10.8.0.77", &read, None);
        assert_eq!(s, 200, "{b}");

        // Delete: the forward rule goes with the connection; then the device can go.
        let (s, b) = api("DELETE", &format!("/api/v1/connections/{conn_id}"), &read, None);
        assert_eq!(s, 403, "{b}");
        assert!(forward_rule(e, PUB).is_some());
        let (s, _) = api("DELETE", &format!("/api/v1/connections/{conn_id}"), &admin, None);
        assert_eq!(s, 204);
        assert!(forward_rule(e, PUB).is_none(), "the rule is gone with its connection");
        let r =
            proxies::tcp_request(&customer.ns, public, b"GET /small HTTP/1.0\r\n\r\n".to_vec(), Duration::from_secs(3));
        assert!(r.is_err() || r.as_ref().is_ok_and(|b| b.is_empty()), "the public port still answers: {r:?}");
        let (s, _) = api("DELETE", &format!("/api/v1/connections/{ov_id}"), &admin, None);
        assert_eq!(s, 204);
        let (s, _) = api("DELETE", &format!("/api/v1/devices/{dev_id}"), &admin, None);
        assert_eq!(s, 204);
        let (s, b) = api("GET", "/api/v1/devices", &read, None);
        assert_eq!((s, b["devices"].as_array().unwrap().len()), (200, 0));
        let out = steer(e, &["del", "forward", "--proto", "tcp", "--public-port", &PUB_TAKEN.to_string()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
