//! Section 5, continued: the redirect path under real traffic, by the BPF run-time statistics
//! of the server's tun0 ingress program while a tun client uploads through a redirect rule to a
//! transparent proxy, then to the server itself (bypassed), then with no redirect rule at all.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use tunmeter::{
    steer::{Origin, SteerMaps},
    types::RedirectSpec,
};

use super::*;
use crate::support::{
    env::LabEnv,
    ns_sh,
    proxies::{self, TransparentProxy},
};

const PROXY_PORT: u16 = 12345;
/// The lab's echo sink on the server.
const SINK_PORT: u16 = 5001;
const UPLOAD: usize = 8 << 20;
const ROUNDS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn redirect_real_traffic() {
    let started = Instant::now();
    let env = LabEnv::new("tmbrd", 1, 0);
    let srv = env.lab.server_ns();
    let client = env.lab.tun_clients()[0].clone();
    ns_sh(&client.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
    let daemon = env.start_daemon(&[]);
    let proxy = TransparentProxy::start(&srv, PROXY_PORT).expect("transparent proxy");
    let maps = SteerMaps::new(env.pins.path());
    let source: ipnet::IpNet = format!("{}/32", client.v4).parse().unwrap();
    let away: SocketAddr = "192.0.2.55:443".parse().unwrap();
    let own = SocketAddr::from((env.lab.server_tun_v4(), SINK_PORT));
    let stats = super::bpfstats::StatsOn::new();
    println!(
        "## Redirect under real traffic (a tun client's TCP upload, {ROUNDS} x {} MiB per row; BPF run-time statistics of the server's tun0 ingress program)",
        UPLOAD >> 20
    );
    println!(
        "The lab's tun clients reach the server through a userspace relay, which limits the throughput of all rows alike; \
         the figure compared is the program's time per run under this traffic (mostly segments of an established \
         connection, with the statistics' own two clock reads a run)."
    );
    println!();
    println!("| traffic | tun0 ingress runs | ns/run | upload Mbit/s (median) | check |");
    println!("|---|---:|---:|---:|---|");
    maps.add_redirect(&RedirectSpec::new(source, PROXY_PORT), Origin::Runtime).expect("redirect rule");
    for (what, dst, rule) in [
        ("redirected to the proxy: LPM hit, bypass miss, socket lookup, `bpf_sk_assign`", away, true),
        ("to this host's address, the rule in place: LPM hit, bypass hit", own, true),
        ("no redirect rule at all: counting only (`REDIRECT_EMPTY`)", own, false),
    ] {
        if !rule && maps.redirect_sources().expect("rules").contains_key(&source) {
            maps.del_redirect(source).expect("delete the redirect rule");
        }
        let seen0 = proxy.intercepted().len();
        let (mut tally, mut rates) = (super::bpfstats::Tally::default(), Vec::new());
        for _ in 0..ROUNDS {
            let before = super::bpfstats::counters();
            let t0 = Instant::now();
            let got = proxies::tcp_request(&client.ns, dst, vec![0x5a; UPLOAD], TIMEOUT)
                .unwrap_or_else(|e| panic!("upload to {dst}: {e:#}"));
            rates.push(UPLOAD as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e6);
            tally.window(&srv, &["tun0"], &before);
            let want = if dst == away { format!("ORIG {away}\n").into_bytes() } else { vec![0x5a; UPLOAD] };
            assert!(got == want, "{what}: the answer is not the {} one", if dst == away { "proxy's" } else { "echo" });
        }
        let check = if dst == away {
            // The proxy logs a connection when it has read it to the end, after the client is done.
            let t0 = Instant::now();
            while proxy.intercepted().len() < seen0 + ROUNDS && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let seen: Vec<_> = proxy.intercepted().into_iter().skip(seen0).collect();
            assert!(seen.len() == ROUNDS && seen.iter().all(|i| i.bytes == UPLOAD && i.orig == away), "{seen:?}");
            format!("the proxy received {ROUNDS} x {UPLOAD} bytes for {away}")
        } else {
            assert_eq!(proxy.intercepted().len(), seen0, "{what}: nothing may reach the proxy");
            "echoed by the server, the proxy saw none".to_string()
        };
        let (runs, ns) = tally.of("tun0", "ingress").expect("tun0 ingress ran");
        println!("| {what} | {runs} | {ns:.0} | {:.0} | {check} |", median(rates));
    }
    drop(stats);
    println!();
    println!("This section took {} s.", started.elapsed().as_secs());
    println!();
    drop((proxy, daemon));
}
