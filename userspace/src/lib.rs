//! tunmeter: per-VPN-client traffic accounting with eBPF.
//!
//! One module per job:
//! - dataplane: `config` (file + flags), `loader` (the eBPF object and its pinned maps),
//!   `attach` (TCX/netlink attachment and link pins), `links` (rtnetlink devices and events),
//!   `clock` (kernel time for last-seen), `counters` and `batch` (reading maps into rows),
//!   `system` (host checks that name the fix), `daemon` (the run loop);
//! - ledger: `db` (SQLite/PostgreSQL and migrations), `ledger` (polling, lossless deltas,
//!   resets, history), `tokens` (API tokens);
//! - serving: `api` (REST, live stream), `metrics` (Prometheus), `web` (the dashboard);
//! - `report` (CLI tables).

pub mod api;
pub mod attach;
pub mod batch;
pub mod clock;
pub mod config;
pub mod control;
pub mod counters;
pub mod daemon;
pub mod db;
pub mod identity;
pub mod ledger;
pub mod links;
pub mod loader;
pub mod metrics;
pub mod registry;
pub mod report;
pub mod steer;
pub mod system;
pub mod tokens;
pub mod web;
pub mod webhook;
