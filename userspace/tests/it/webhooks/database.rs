//! Scenarios e and f (PostgreSQL only): the database stops while deliveries are pending and
//! comes back; two transactions commit events of one subject out of number order.

use super::*;

/// e (PostgreSQL): the database goes down while deliveries are pending: nothing is sent while
/// results cannot be recorded, nothing is lost, everything goes out in order once it is back.
pub(super) async fn database_outage(db: &Database, pg: &mut support::postgres::Postgres) {
    let node = "e-node";
    let st = RxState::new(&[("panel", b"e-secret")]);
    let mut rx = Receiver::start(0, &st).await;
    let port = rx.addr.port();
    let hooks =
        Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", rx.url("panel"), b"e-secret", EventKind::ALL)])
            .await
            .unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
}

/// f (PostgreSQL only: SQLite has one writer at a time): two transactions take sequence numbers
/// for one subject and commit in the opposite order; the newer event waits for the older.
pub(super) async fn commits_out_of_order(db: &Database) {
    let node = "f-node";
    let st = RxState::new(&[("panel", b"f-secret")]);
    let rx = Receiver::start(0, &st).await;
    let hooks =
        Webhooks::new(db.clone(), node.into(), vec![endpoint("panel", rx.url("panel"), b"f-secret", EventKind::ALL)])
            .await
            .unwrap();
    let mut worker = Tasks::new();
    hooks.spawn(&mut worker);
    let now = tunmeter::time::unix_ms();
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
    assert!(worker.shutdown(Duration::from_secs(10)).await.is_empty(), "the webhook worker stopped cleanly");
}
