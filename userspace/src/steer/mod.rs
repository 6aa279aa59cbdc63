//! Steering: forward rules (DNAT of old) and redirect rules (REDIRECT/TPROXY of old), done by
//! the TC programs. `table` keeps the rules (parsed by `types::rules`) in the pinned maps,
//! `devices` the forward rules' device set, `skip` the hints that let a packet no rule can match skip the lookups, `guard` checks rules before they go in, `host` sets
//! up what the host needs (policy route, reserved ports, bypass addresses). See docs/steering.md.

mod devices;
pub mod guard;
pub mod host;
mod skip;
pub mod table;

pub use host::HostError;
pub use table::{Origin, SteerError, SteerList, SteerMaps};
