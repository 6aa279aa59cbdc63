//! tunmeter's one integration-test binary (`cargo test -p tunmeter --test it`): one module per
//! area, `support` compiled once for all of them. Filter by module, e.g.
//! `cargo test -p tunmeter --test it -- steer_fixtures::`. The benchmark (`bench`) is
//! `#[ignore]`d: `cargo xtask bench` runs it with `-- bench:: --ignored`.

mod support;

mod api;
mod batch;
mod bench;
mod client_fill;
mod conformance;
mod dashboard;
mod deploy;
mod fixtures;
mod fuzz;
mod ledger_netns;
mod ledger_store;
mod netns;
mod openvpn_hook;
mod openvpn_mgmt;
mod openvpn_netns;
mod postgres_fixture;
mod registry;
mod selfcheck;
mod slots;
mod steer_fixtures;
mod steer_netns;
mod webhooks;
mod wireguard_netns;
mod wireguard_peers;
