//! tunmeter: per-VPN-client traffic accounting and steering with eBPF. The daemon, the CLI and
//! everything they share, in layers that only point down.
//!
//! Layers, each using only the layers above it in this list (checked by `cargo xtask check`;
//! see ARCHITECTURE.md):
//! 1. foundation: `types` (shared vocabulary), `time`, `config` (file + flags), `db`
//!    (SQLite/PostgreSQL and migrations), `tasks` (background tasks that stop together);
//! 2. kernel: `bpf` (loading, attaching, devices, the kernel clock, reading the maps);
//! 3. domain: `webhook` (durable outbox), `ledger` (lossless usage), `selfcheck` (devices'
//!    counters against the programs'), `tokens` (API tokens),
//!    `steer` (forward and redirect rules), `registry` (sessions, devices, connections),
//!    `identity` (who is behind each address);
//! 4. serving: `control` (the local control socket), `web` (the dashboard's files), `api`
//!    (REST, live stream, metrics);
//! 5. top: `daemon` (`tunmeter run`) and `cli` (every subcommand).

pub mod config;
pub mod db;
pub mod tasks;
pub mod time;
pub mod types;

pub mod bpf;

pub mod identity;
pub mod ledger;
pub mod registry;
pub mod selfcheck;
pub mod steer;
pub mod tokens;
pub mod webhook;

pub mod api;
pub mod control;
pub mod web;

pub mod cli;
pub mod daemon;
