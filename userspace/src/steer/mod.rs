//! Steering: forward rules (DNAT of old) and redirect rules (REDIRECT/TPROXY of old), done by
//! the TC programs. `table` keeps the rules (parsed by `types::rules`) in the pinned maps,
//! `host` sets up what the host needs (policy route, reserved ports, bypass addresses).
//! See docs/steering.md.

pub mod host;
pub mod table;

pub use host::HostError;
pub use table::{Origin, SteerError, SteerList, SteerMaps};
