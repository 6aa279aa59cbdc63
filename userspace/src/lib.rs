//! tunmeter: per-VPN-client traffic accounting with eBPF.
//!
//! One module per job: `config` (file + flags), `clock` (kernel time for last-seen), `loader`
//! (the eBPF object and its pinned maps), `attach` (TCX/netlink attachment and link pins),
//! `links` (rtnetlink devices and events), `daemon` (the run loop), `counters` (reading maps
//! into rows), `delta` (kernel counters into lossless deltas for the ledger), `report` (tables
//! and JSON), `system` (host checks that name the fix).

pub mod attach;
pub mod batch;
pub mod clock;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod delta;
pub mod links;
pub mod loader;
pub mod report;
pub mod system;
pub mod web;
