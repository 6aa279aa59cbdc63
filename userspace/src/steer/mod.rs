//! Steering: forward rules (DNAT of old) and redirect rules (REDIRECT/TPROXY of old), done by
//! the TC programs. `rules` parses what operators write, `table` keeps the rules in the pinned
//! maps, `host` sets up what the host needs (policy route, reserved ports, bypass addresses).
//! See docs/steering.md.

pub mod host;
pub mod rules;
pub mod table;

pub use host::{HostError, PolicyRoute};
pub use rules::{ForwardSpec, Proto, RedirectSpec, RuleError};
pub use table::{Origin, SteerError, SteerList, SteerMaps};
