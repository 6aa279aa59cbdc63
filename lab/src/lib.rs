//! `tunmeter-lab`: a lab of network namespaces for tunmeter's integration tests and demo, with
//! real OpenVPN and wireguard-go labs, bounded traffic and an nftables oracle to check against.
//!
//! Topology for a prefix `P` (at most 8 chars of `[a-z0-9]`):
//!
//! ```text
//!  P-t1 .. P-tN                 P-srv                          P-lan            P-e1 .. P-eN
//!  tun0 10.8.0.(1+i) ──relay──▶ tun0 10.8.0.1/24, fd00:8::1/64
//!  (fds held by this process)   eth0 10.9.0.1/24 ── veth ──▶ srvport ─ br0 ─ e<i> ── veth ── eth0 10.9.0.(1+i)
//! ```
//!
//! The lab process holds every TUN fd; a relay thread copies packets from each client tun to the
//! server tun and back (routing by destination address), like an OpenVPN server without crypto.
//! Echo sinks (TCP 5001, UDP 5002) run on threads inside `P-srv`.
//!
//! The lab is in `lab`, the namespace helpers every lab uses in `netns`. Everything is removed on
//! [`Lab::down`] and on drop (also when a test panics). A lab left over by
//! a killed process is removed by the next [`Lab::up`] with the same prefix, or by
//! [`cleanup_prefix`] (`tunmeter-lab down --prefix P`).
//!
//! Two labs with real VPN software live in their own modules: [`openvpn::OvpnLab`] (two OpenVPN 2.6
//! server instances, UDP and TCP, with real clients, management ports, hooks and an nftables
//! oracle on `tun0`/`tun1`) and [`wireguard::WgLab`] (wireguard-go server and peers). Exact-size
//! asymmetric transfers for them are in [`transfer`].

pub mod certs;
mod lab;
mod netns;
pub mod openvpn;
pub mod oracle;
mod procs;
mod relay;
mod servers;
mod sinks;
pub mod sockets;
mod sys;
pub mod traffic;
pub mod transfer;
pub mod wireguard;

pub use lab::{Client, ETH_DEV, Lab, LabConfig, TUN_DEV};
pub use netns::{
    Namespaces, cleanup_prefix, in_netns, in_new_netns, is_root, list_prefix, loopback_up, netns_exec, validate_prefix,
};
pub use oracle::{LinkStats, link_stats};
pub use relay::RelayStats;

pub(crate) use netns::{cleanup_on_drop, finish_cleanup, ipn, run, run_stdin};
