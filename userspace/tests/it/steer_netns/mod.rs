//! Steering in the namespace lab with real proxies: forward rules in front of tinyproxy, dante
//! and a UDP service, redirect rules to a transparent proxy, and never a netfilter NAT rule.
//!
//! Steering in the namespace lab with real proxies: forward rules (the DNAT of old) in front of
//! Debian's tinyproxy and dante running on a VPN device, a UDP service behind a forward rule
//! (fragmented datagrams both ways), per-rule counters against nftables counters on the forward
//! hook, rule removal, and redirect rules (the REDIRECT of old) to a transparent proxy. No
//! netfilter NAT rule exists at any time ([`assert_no_nat`]).
//!
//! Topology (see `tunmeter_lab`): the server `P-srv` routes between the VPN (tun0, 10.8.0.0/24)
//! and the LAN (eth0, 10.9.0.0/24); `P-t1` (10.8.0.2) is the device behind forward rules,
//! `P-t2` (10.8.0.3) the client behind a redirect rule, `P-e1` (10.9.0.2) the customer, `P-e2`
//! (10.9.0.3) a web server.
//!
//! This file: the lab's ports, the `tunmeter steer` CLI helpers and the no-NAT check;
//! `forward_lab` builds the forwarding lab, `forward` and `redirect` hold the tests.

mod checks;
mod evasion;
mod forward;
mod forward_lab;
mod redirect;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    daemon::Daemon,
    ns_sh,
    proxies::{self, Proxy, TransparentProxy, UdpEcho, WebServer},
    require_root,
};
use tunmeter::bpf::counters::{Count, read_clients};
use tunmeter_lab::{Client, netns_exec, oracle::Direction};

use crate::support;

type Env = support::env::LabEnv;

/// The web server in `P-e2`.
const WEB_PORT: u16 = 80;
/// On the device `P-t1`: tinyproxy, danted, UDP echo.
const HTTP_PROXY_PORT: u16 = 3128;
const SOCKS_PORT: u16 = 1080;
const ECHO_PORT: u16 = 7007;
/// Public ports on the server's eth0 (10.9.0.1).
const PUB_HTTP: u16 = 18080;
const PUB_SOCKS: u16 = 11080;
const PUB_UDP: u16 = 17007;
/// The transparent proxy in `P-srv`.
const TPROXY_PORT: u16 = 12345;
/// The lab's TCP echo sink in `P-srv`.
const SINK_PORT: u16 = 5001;
const SHORT: Duration = Duration::from_secs(5);

fn sock(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

// ---- the CLI ----

/// `tunmeter steer <args> --pin-dir <env's>` in the server namespace.
fn steer(env: &Env, args: &[&str]) -> Output {
    let pin = env.pins.path().display().to_string();
    let all = [&["steer"], args, &["--pin-dir", pin.as_str()]].concat();
    support::daemon::output(&env.lab.server_ns(), &all)
}

fn steer_ok(env: &Env, args: &[&str]) -> String {
    let out = steer(env, args);
    assert!(
        out.status.success(),
        "`tunmeter steer {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tunmeter steer list --json`.
fn steer_list(env: &Env) -> Value {
    let text = steer_ok(env, &["list", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("steer list --json is not JSON ({e}):\n{text}"))
}

/// The forward rule (proto, public port) of a `steer list --json`, if present.
fn forward_rule(list: &Value, proto: &str, port: u16) -> Option<Value> {
    list["forward"]
        .as_array()?
        .iter()
        .find(|r| r["proto"] == proto && r["public_port"].as_u64() == Some(port as u64))
        .cloned()
}

fn redirect_rule(list: &Value, source: &str) -> Option<Value> {
    list["redirect"].as_array()?.iter().find(|r| r["source"] == source).cloned()
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// For failure messages: the rules, their counters and the STEER_STATS events.
fn steer_dump(env: &Env) -> String {
    let out = steer(env, &["list", "--json"]);
    format!("steer list --json: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

// ---- the lab ----

/// No netfilter NAT anywhere: in every namespace, `nft list ruleset` has no nat table/chain and
/// no dnat/snat/masquerade/redirect statement, and `iptables-save`/`ip6tables-save` (if
/// installed; they only list tables that exist, unlike `iptables -t nat -S`, which would create
/// the nat table) show no NAT rule.
fn assert_no_nat(namespaces: &[String]) {
    assert!(!namespaces.is_empty());
    const WORDS: [&str; 5] = ["nat", "dnat", "snat", "masquerade", "redirect"];
    for ns in namespaces {
        let rs = ns_sh(ns, &["nft", "list", "ruleset"]);
        let bad: Vec<&str> = rs
            .lines()
            .filter(|l| {
                l.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .any(|w| WORDS.contains(&w.to_lowercase().as_str()))
            })
            .collect();
        assert!(bad.is_empty(), "{ns}: netfilter NAT in nft ruleset: {bad:?}\n{rs}");
        for tool in ["iptables-save", "ip6tables-save", "iptables-legacy-save", "ip6tables-legacy-save"] {
            if !Path::new("/usr/sbin").join(tool).exists() && !Path::new("/sbin").join(tool).exists() {
                continue;
            }
            let out = ns_sh(ns, &[tool]);
            let bad: Vec<&str> = out
                .lines()
                .filter(|l| {
                    l.starts_with("*nat")
                        || (l.starts_with("-A")
                            && ["DNAT", "SNAT", "MASQUERADE", "REDIRECT", "NETMAP"].iter().any(|t| l.contains(t)))
                })
                .collect();
            assert!(bad.is_empty(), "{ns}: {tool} shows NAT: {bad:?}\n{out}");
        }
    }
}

fn lab_namespaces(env: &Env) -> Vec<String> {
    tunmeter_lab::list_prefix(env.lab.prefix()).unwrap()
}
