//! Steering (forward rules, the DNAT of old; redirect rules, REDIRECT/TPROXY) by the TC programs:
//! `table` keeps the rules in the pinned maps, `devices` the forward rules' device set, `hints`
//! the skip hints and rule generations, `guard` checks rules before they go in, `host` sets up
//! the host (policy route, reserved ports, bypass addresses). See docs/steering.md.

mod devices;
pub mod guard;
mod hints;
pub mod host;
pub mod table;

pub use host::HostError;
pub use table::{Origin, SteerError, SteerList, SteerMaps};
