//! Sessions on a store: open, close, list, replace atomically, and 16 concurrent opens of one
//! address (one wins, the rest 409).

use super::*;

pub(super) async fn sessions_open_close_list(db: &Database) {
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
    bad.username = "bob\u{7}".into();
    let e = sessions::open(db, n, &hooks, &bad, T0).await.unwrap_err();
    assert!(matches!(&e, RegistryError::Invalid(m) if m.contains("control characters")), "{e:?}");
    // An unknown protocol cannot even be named: it is refused where it is parsed.
    assert!("pptp".parse::<SessionProtocol>().unwrap_err().contains("pptp"));
    // A client the ledger does not know.
    let e = sessions::open(db, n, &hooks, &new_session("10.8.0.99", "x", Totals::default()), T0).await.unwrap_err();
    assert!(matches!(&e, RegistryError::NotFound { what: "ledger client", .. }), "{e:?}");

    // Close: bytes are end - start; a counter that went backwards gives 0, not a wrap.
    let closed = sessions::close(db, n, &hooks, &a.id, CloseReason::Disconnected, totals(1500, 4000), T0 + 60_000)
        .await
        .unwrap();
    assert_eq!(closed.closed_unix_ms, Some(T0 + 60_000));
    assert_eq!(closed.close_reason, Some(CloseReason::Disconnected));
    assert_eq!((closed.up_bytes, closed.down_bytes), (500, 0));
    // Twice: Conflict; unknown: NotFound; malformed: BadId.
    let e = sessions::close(db, n, &hooks, &a.id, CloseReason::Api, totals(2000, 9000), T0 + 61_000).await.unwrap_err();
    assert!(matches!(&e, RegistryError::Conflict(m) if m.contains("already closed")), "{e:?}");
    assert_eq!(sessions::get(db, n, &a.id).await.unwrap(), closed, "a refused close changes nothing");
    let unknown = uuid::Uuid::new_v4().to_string();
    let e = sessions::close(db, n, &hooks, &unknown, CloseReason::Api, Totals::default(), T0).await.unwrap_err();
    assert!(matches!(&e, RegistryError::NotFound { what: "session", .. }), "{e:?}");
    for bad in ["", "banana", "123", "6f9619ff-8b86-d011-b42d-00c04fc964f"] {
        let e = sessions::close(db, n, &hooks, bad, CloseReason::Api, Totals::default(), T0).await.unwrap_err();
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
    hook_only.protocol = SessionProtocol::Openvpn;
    let d = sessions::open(db, n, &hooks, &hook_only, T0 + 90_000).await.unwrap();
    assert_eq!((d.client_ip, d.protocol.as_str(), d.source.as_str()), (ip("fd00:8::2"), "openvpn", "hook"));
    assert_eq!(sessions::get(db, n, &d.id).await.unwrap().protocol, SessionProtocol::Openvpn);
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
    assert_eq!(ev[1].2["close_reason"], "disconnected");

    // Sessions of an instance that is gone: every active one except those kept.
    let mut e1 = new_session("10.8.0.2", "x", Totals::default());
    e1.instance = "other".into();
    let kept = [c.id.clone()];
    let end_of =
        |ip: IpAddr| if ip == "10.8.0.2".parse::<IpAddr>().unwrap() { totals(2500, 4000) } else { totals(7, 7) };
    let filter = ActiveFilter { instance: Some("udp1".into()), ..Default::default() };
    let gone = sessions::close_all_for(
        db,
        n,
        &hooks,
        &filter,
        &kept,
        &end_of,
        CloseReason::InstanceNotConfigured,
        T0 + 100_000,
    )
    .await
    .unwrap();
    let mut gone_ids = ids(gone.clone());
    gone_ids.sort();
    let mut want = vec![b.id.clone(), d.id.clone()];
    want.sort();
    assert_eq!(gone_ids, want);
    let b_closed = gone.iter().find(|s| s.id == b.id).unwrap();
    assert_eq!(
        (b_closed.up_bytes, b_closed.down_bytes, b_closed.close_reason),
        (1000, 0, Some(CloseReason::InstanceNotConfigured))
    );
    assert!(sessions::get(db, n, &c.id).await.unwrap().is_active(), "kept");
    assert_eq!(events(db, n).await.iter().filter(|e| e.0 == "session.closed").count(), 3);
    // Nothing left to close: an empty pass.
    let again = sessions::close_all_for(
        db,
        n,
        &hooks,
        &filter,
        &kept,
        &end_of,
        CloseReason::InstanceNotConfigured,
        T0 + 100_001,
    );
    assert!(again.await.unwrap().is_empty());
}

/// 16 opens for one client at once: exactly one wins; the others are Conflicts (never a raw
/// database error), whichever of the check and the unique index catches them.
pub(super) async fn concurrent_opens(db: &Database) {
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
    assert!(closed.iter().all(|s| s.close_reason == Some(CloseReason::Superseded)));
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
