//! Sessions, devices and connections (`tunmeter::registry`) against real databases — a SQLite
//! file and a PostgreSQL server started by the test — and through the real daemon's API in a
//! namespace lab (forward rules of http connections in the pinned maps, a TCP connection
//! through one, roles, and the 400/404/409 answers).
//!
//! This file: the shared rows and helpers and the entry points per database; `sessions_store`,
//! `devices_store` and `connections_store` run against either store, `lab` through the daemon's API.

mod connections_store;
mod devices_store;
mod lab;
mod sessions_store;

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
    types::{CloseReason, ConnectionProtocol, SessionProtocol, SessionSource},
    webhook::Webhooks,
};

use crate::support;

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
        protocol: SessionProtocol::OpenvpnUdp,
        instance: "udp1".into(),
        common_name: format!("cn-{username}"),
        username: username.into(),
        real_address: "198.51.100.7:50000".into(),
        source: SessionSource::Hook,
        start,
    }
}

async fn store_suite(url: &str) {
    let db = Database::open(url).await.expect("open database");
    sessions_store::sessions_open_close_list(&db).await;
    sessions_store::concurrent_opens(&db).await;
    devices_store::devices_crud_and_monitor(&db).await;
    connections_store::connections_crud(&db).await;
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap()
}

#[test]
fn registry_on_sqlite() {
    let db = support::sqlite::SqliteFile::new("registry");
    rt().block_on(store_suite(&db.url));
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

fn openvpn(device: &str, user: &str, proxy_port: u16) -> NewConnection {
    NewConnection {
        device_id: device.into(),
        protocol: ConnectionProtocol::Openvpn,
        public_port: None,
        device_port: None,
        username: Some(user.into()),
        proxy_port: Some(proxy_port),
    }
}

fn forward(device: &str, protocol: &str, public_port: u16, device_port: u16) -> NewConnection {
    NewConnection {
        device_id: device.into(),
        protocol: protocol.parse().expect("a connection protocol"),
        public_port: Some(public_port),
        device_port: Some(device_port),
        username: None,
        proxy_port: None,
    }
}
