//! Scenarios a-c: deliveries with the receiver up (signatures, bodies, filters, rolled-back
//! events), down across a daemon restart (order per subject, growing backoff), and one failing
//! subject that holds only its own events.

use super::*;

// ---- scenarios -----------------------------------------------------------------------------

/// a: receiver up; body and headers; the event filter; the caller's transaction.
pub(super) async fn receiver_up(db: &Database) {
    let node = "a-node";
    let st = RxState::new(&[("panel", b"panel-secret"), ("opens", b"another secret")]);
    let rx = Receiver::start(0, &st).await;
    let hooks = Webhooks::new(
        db.clone(),
        node.into(),
        vec![
            endpoint("panel", rx.url("panel"), b"panel-secret", EventKind::ALL),
            endpoint("opens", rx.url("opens"), b"another secret", &[EventKind::SessionOpened]),
        ],
    )
    .await
    .unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
    let before = tunmeter::time::unix_ms();
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
        let id = hooks.enqueue_in(&mut tx, &e, tunmeter::time::unix_ms()).await.unwrap();
        tx.commit().await.unwrap();
        hooks.wake();
        sent.push((id, e));
    }
    let after = tunmeter::time::unix_ms();
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
}

/// b: receiver down, restart of the daemon, receiver back on the same port.
pub(super) async fn receiver_down_and_restart(db: &Database) {
    let node = "b-node";
    let st = RxState::new(&[("panel", b"s3cret-b")]);
    let mut rx = Receiver::start(0, &st).await;
    let port = rx.addr.port();
    let url = rx.url("panel");
    rx.kill().await;
    let ep = endpoint("panel", url, b"s3cret-b", EventKind::ALL);

    let hooks = Webhooks::new(db.clone(), node.into(), vec![ep.clone()]).await.unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
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
    worker.shutdown(Duration::from_secs(5)).await;
    drop(hooks);
    let hooks = Webhooks::new(db.clone(), node.into(), vec![ep.clone()]).await.unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
}

/// c: one subject fails; the others are not held up; its later events wait behind its head.
pub(super) async fn one_subject_fails(db: &Database) {
    let node = "c-node";
    let st = RxState::new(&[("panel", b"c-secret")]);
    st.fail.lock().unwrap().insert("10.8.0.66".into());
    let _rx = Receiver::start(0, &st).await;
    let hooks =
        Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", _rx.url("panel"), b"c-secret", EventKind::ALL)])
            .await
            .unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
}
