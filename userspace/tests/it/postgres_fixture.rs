//! The throwaway PostgreSQL fixture (support/postgres.rs): a real server that tests connect to
//! with sqlx, stop (the database goes down) and start again.

use crate::support;

use std::time::{Duration, Instant};

use sqlx::{Connection as _, PgConnection, postgres::PgPoolOptions};
use support::postgres::{Postgres, require_postgres};

#[tokio::test]
async fn server_starts_stops_and_starts_again() {
    if !require_postgres() {
        return;
    }
    let t0 = Instant::now();
    let mut pg = Postgres::start_new();
    let started = t0.elapsed();
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"), "{}", pg.url());
    assert_ne!(pg.port(), 5432, "must not be the distro's cluster");

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&pg.url())
        .await
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
    assert_eq!(one, 1);

    let url = pg.create_database("ledger_fixture");
    assert_eq!(url, format!("postgres://postgres@127.0.0.1:{}/ledger_fixture", pg.port()));
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let db: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&mut conn).await.unwrap();
    assert_eq!(db, "ledger_fixture");
    sqlx::query("CREATE TABLE t (v BIGINT NOT NULL)").execute(&mut conn).await.unwrap();
    sqlx::query("INSERT INTO t VALUES (42)").execute(&mut conn).await.unwrap();

    // The database goes down: the open connection breaks, new ones are refused, and the pool
    // gives up within its acquire timeout instead of hanging.
    pg.stop();
    assert!(!pg.is_running());
    assert!(sqlx::query("SELECT 1").execute(&mut conn).await.is_err(), "a connection survived pg_ctl stop");
    let refused = PgConnection::connect(&pg.url()).await;
    assert!(refused.is_err(), "connected while the server is stopped");
    let pooled = tokio::time::timeout(Duration::from_secs(15), sqlx::query("SELECT 1").execute(&pool))
        .await
        .expect("pool query while stopped hung past its acquire timeout");
    assert!(pooled.is_err(), "pool query succeeded while the server is stopped");

    // Back up on the same port with the same data: the same URLs work, and the old pool
    // recovers by itself.
    pg.start();
    assert!(pg.is_running());
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let v: i64 = sqlx::query_scalar("SELECT v FROM t").fetch_one(&mut conn).await.unwrap();
    assert_eq!(v, 42, "data kept across stop and start");
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();
    pool.close().await;
    eprintln!("postgres fixture: started in {started:?}, whole test {:?}", t0.elapsed());
}

/// Several servers at once, as when tests of one binary run in parallel: each gets its own
/// directory and port, and each is removed on drop.
#[tokio::test]
async fn servers_run_in_parallel() {
    if !require_postgres() {
        return;
    }
    let starts: Vec<_> = (0..3).map(|_| tokio::task::spawn_blocking(Postgres::start_new)).collect();
    let mut servers = Vec::new();
    for s in starts {
        servers.push(s.await.unwrap());
    }
    let mut ports: Vec<u16> = servers.iter().map(Postgres::port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), servers.len(), "two servers share a port: {ports:?}");
    for (i, pg) in servers.iter().enumerate() {
        let mut conn = PgConnection::connect(&pg.url()).await.unwrap();
        let port: String = sqlx::query_scalar("SHOW port").fetch_one(&mut conn).await.unwrap();
        assert_eq!(port, pg.port().to_string(), "server {i}");
        conn.close().await.unwrap();
    }
    let logs: Vec<_> = servers.iter().map(Postgres::log_path).collect();
    drop(servers);
    for log in logs {
        assert!(!log.exists(), "{} left behind", log.display());
    }
}
