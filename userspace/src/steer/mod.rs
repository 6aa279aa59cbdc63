//! Steering: forward rules (DNAT of old) and redirect rules (REDIRECT/TPROXY of old), done by
//! the TC programs. `table` keeps the rules (parsed by `types::rules`) in the pinned maps,
//! `devices` the forward rules' device set, `hints` what the programs read beside the rules (skip hints, rule generations), `guard` checks rules before they go in, `host` sets
//! up what the host needs (policy route, reserved ports, bypass addresses). See docs/steering.md.

mod devices;
pub mod guard;
mod hints;
pub mod host;
pub mod table;

pub use host::HostError;
pub use table::{Origin, SteerError, SteerList, SteerMaps};
