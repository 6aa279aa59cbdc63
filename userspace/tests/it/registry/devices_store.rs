//! Devices on a store: create, update, delete, validation, and the monitor's status
//! transitions with their events.

use super::*;

pub(super) async fn devices_crud_and_monitor(db: &Database) {
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
