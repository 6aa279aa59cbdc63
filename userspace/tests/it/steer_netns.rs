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

use crate::support;

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
use tunmeter::counters::{Count, read_clients};
use tunmeter_lab::{Client, netns_exec, oracle::Direction};

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

/// `curl` in `ns`, body to `out`; Err with curl's message on failure.
fn curl(ns: &str, args: &[&str], out: &Path, max_time: u32) -> Result<(), String> {
    let max = max_time.to_string();
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "--fail", "--max-time", &max, "-o"])
        .arg(out)
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("all_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("no_proxy")
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("curl {} ({}): {}", args.join(" "), o.status, String::from_utf8_lossy(&o.stderr).trim()))
    }
}

/// A scratch file for downloads, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let tag: String = tag.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        Scratch(PathBuf::from(format!("/tmp/tmtest-dl-{tag}-{}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Forward rules in front of the device `P-t1`: HTTP proxy, SOCKS5 server, UDP echo; a web
/// server in `P-e2`; the customer is `P-e1`.
/// Field order is drop order: servers and the daemon go before the lab.
struct Forward {
    tinyproxy: Proxy,
    danted: Proxy,
    echo: UdpEcho,
    web: WebServer,
    _daemon: Daemon,
    env: Env,
    device: Client,
    customer: Client,
    web_host: Client,
}

impl Forward {
    fn new(prefix: &str) -> Forward {
        let env = Env::new(prefix, 1, 2);
        let srv = env.lab.server_ns();
        let device = env.lab.tun_clients()[0].clone();
        let (customer, web_host) = (env.lab.eth_clients()[0].clone(), env.lab.eth_clients()[1].clone());
        // The daemon does not enable forwarding; the device reaches the web through the server.
        ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        ns_sh(&device.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
        ns_sh(&web_host.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
        let daemon = env.start_daemon(&[]);
        let web = WebServer::start(&web_host.ns, WEB_PORT);
        let tinyproxy = Proxy::tinyproxy(&device.ns, HTTP_PROXY_PORT);
        let danted = Proxy::danted(&device.ns, SOCKS_PORT, "tun0");
        let echo = UdpEcho::start(&device.ns, ECHO_PORT);
        let f = Forward { tinyproxy, danted, echo, web, _daemon: daemon, env, device, customer, web_host };
        let d = f.device.v4;
        for (proto, public, port) in
            [("tcp", PUB_HTTP, HTTP_PROXY_PORT), ("tcp", PUB_SOCKS, SOCKS_PORT), ("udp", PUB_UDP, ECHO_PORT)]
        {
            steer_ok(
                &f.env,
                &[
                    "add",
                    "forward",
                    "--proto",
                    proto,
                    "--public-port",
                    &public.to_string(),
                    "--device",
                    &format!("{d}:{port}"),
                ],
            );
        }
        let list = steer_list(&f.env);
        for (proto, public) in [("tcp", PUB_HTTP), ("tcp", PUB_SOCKS), ("udp", PUB_UDP)] {
            assert!(forward_rule(&list, proto, public).is_some(), "rule {proto}/{public} missing: {list}");
        }
        f
    }

    fn web_url(&self, path: &str) -> String {
        format!("http://{}:{WEB_PORT}{path}", self.web_host.v4)
    }

    fn http_proxy_args(&self) -> Vec<String> {
        vec!["-x".into(), format!("http://{}:{PUB_HTTP}", self.env.lab.server_eth_v4())]
    }

    fn socks_args(&self) -> Vec<String> {
        vec!["--socks5".into(), format!("{}:{PUB_SOCKS}", self.env.lab.server_eth_v4())]
    }

    /// The customer fetches `/big` through a public port; the file's SHA-256 must match.
    fn fetch_big(&self, via: &[String], what: &str) {
        let out = Scratch::new(&format!("{}-{what}", self.env.lab.prefix()));
        let mut args: Vec<&str> = via.iter().map(String::as_str).collect();
        let url = self.web_url("/big");
        args.push(&url);
        let t0 = Instant::now();
        if let Err(e) = curl(&self.customer.ns, &args, &out.0, 40) {
            panic!(
                "{what}: the customer could not fetch /big: {e}\n{}\n{}\n{}",
                steer_dump(&self.env),
                self.tinyproxy.log_text(),
                self.danted.log_text()
            );
        }
        let took = t0.elapsed();
        let len = std::fs::metadata(&out.0).map(|m| m.len()).unwrap_or(0);
        assert_eq!(len, proxies::BIG_LEN as u64, "{what}: length of /big as received");
        assert_eq!(proxies::sha256_file(&out.0).unwrap(), proxies::big_sha256(), "{what}: SHA-256 of /big");
        eprintln!("{what}: 50 MiB in {took:?}");
    }

    /// The customer fetches `/small` through a public port.
    fn fetch_small(&self, via: &[String], max_time: u32) -> Result<(), String> {
        let out = Scratch::new(&format!("{}-small", self.env.lab.prefix()));
        let mut args: Vec<&str> = via.iter().map(String::as_str).collect();
        let url = self.web_url("/small");
        args.push(&url);
        curl(&self.customer.ns, &args, &out.0, max_time)?;
        let body = std::fs::read_to_string(&out.0).unwrap_or_default();
        if body != proxies::SMALL_BODY {
            return Err(format!("unexpected body {body:?}"));
        }
        Ok(())
    }

    /// The customer sends datagrams of these sizes to the public UDP port; each must come back
    /// unchanged, from the public address and port.
    fn udp_roundtrips(&self, sizes: &[usize]) {
        let public = SocketAddr::from((self.env.lab.server_eth_v4(), PUB_UDP));
        for (k, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|i| (i * 7 + k * 13 + 1) as u8).collect();
            match proxies::udp_request(&self.customer.ns, public, payload.clone(), SHORT) {
                Ok(reply) => assert!(reply == payload, "UDP {n} bytes: the echo differs ({} bytes back)", reply.len()),
                Err(e) => panic!("UDP {n} bytes to {public}: {e:#}\n{}", steer_dump(&self.env)),
            }
        }
    }
}

// ---- tests ----

/// The test's own servers, without tunmeter: the customer uses the device's proxies and echo
/// directly (routed by the server), and the transparent proxy answers connections to its own
/// address. When a steering test fails, this one says whether the fixtures work.
#[test]
fn fixtures_work_without_steering() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsx", 1, 2);
    let srv = env.lab.server_ns();
    let device = env.lab.tun_clients()[0].clone();
    let (customer, web_host) = (env.lab.eth_clients()[0].clone(), env.lab.eth_clients()[1].clone());
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    ns_sh(&device.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
    ns_sh(&web_host.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
    ns_sh(&customer.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
    let web = WebServer::start(&web_host.ns, WEB_PORT);
    let tiny = Proxy::tinyproxy(&device.ns, HTTP_PROXY_PORT);
    let dante = Proxy::danted(&device.ns, SOCKS_PORT, "tun0");
    let echo = UdpEcho::start(&device.ns, ECHO_PORT);
    let tproxy = TransparentProxy::start(&srv, TPROXY_PORT).expect("transparent proxy");

    let out = Scratch::new("tmsx-big");
    let url = format!("http://{}:{WEB_PORT}/big", web_host.v4);
    for via in [format!("-x http://{}:{HTTP_PROXY_PORT}", device.v4), format!("--socks5 {}:{SOCKS_PORT}", device.v4)] {
        let mut args: Vec<&str> = via.split(' ').collect();
        args.push(&url);
        let t0 = Instant::now();
        curl(&customer.ns, &args, &out.0, 40)
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", tiny.log_text(), dante.log_text()));
        assert_eq!(proxies::sha256_file(&out.0).unwrap(), proxies::big_sha256(), "{via}");
        eprintln!("{via}: 50 MiB in {:?}", t0.elapsed());
    }
    assert!(web.requests().iter().all(|(p, _)| p.ip() == IpAddr::V4(device.v4)), "{:?}", web.requests());
    for n in [100, 3000, 8000] {
        let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let r = proxies::udp_request(&customer.ns, SocketAddr::from((device.v4, ECHO_PORT)), payload.clone(), SHORT)
            .expect("udp echo");
        assert!(r == payload, "udp echo of {n} bytes");
    }
    assert_eq!(echo.seen.lock().unwrap().len(), 3);

    // The transparent proxy, reached at its own (local) address: TCP and UDP, v4 and v6.
    for dst in [
        SocketAddr::from((env.lab.server_tun_v4(), TPROXY_PORT)),
        SocketAddr::from((env.lab.server_tun_v6(), TPROXY_PORT)),
    ] {
        let r = proxies::tcp_request(&device.ns, dst, vec![1; 5000], SHORT).expect("tcp to the transparent proxy");
        assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}\n"));
        let r = proxies::udp_request(&device.ns, dst, b"q".to_vec(), SHORT).expect("udp to the transparent proxy");
        assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}"));
    }
    let seen = tproxy.intercepted();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(seen.iter().filter(|i| i.proto == "tcp").all(|i| i.bytes == 5000), "{seen:?}");
    assert_no_nat(&lab_namespaces(&env));
}

#[test]
fn forward_rules_carry_http_proxy_socks5_and_fragmented_udp_without_nat() {
    if !require_root() {
        return;
    }
    let f = Forward::new("tmsf");
    let ns = lab_namespaces(&f.env);
    assert_no_nat(&ns);

    f.fetch_big(&f.http_proxy_args(), "http proxy (tinyproxy) via forward tcp/18080");
    f.fetch_big(&f.socks_args(), "socks5 (danted) via forward tcp/11080");
    // The proxies saw the customer's own address (no masquerading) ...
    let log = f.tinyproxy.log_text();
    assert!(log.contains(&format!("): {}", f.customer.v4)), "tinyproxy never saw {}:\n{log}", f.customer.v4);
    // ... and fetched from the web server under the device's VPN address.
    let reqs = f.web.requests();
    assert!(
        reqs.iter().filter(|(peer, t)| peer.ip() == IpAddr::V4(f.device.v4) && t.ends_with("/big")).count() >= 2,
        "web server requests: {reqs:?}"
    );

    // UDP, 3000 bytes fragmented on the way in (customer MTU 1500) and on the way back (device
    // tun MTU 1500).
    f.udp_roundtrips(&[64, 1400, 3000, 3000, 8000]);
    // The device saw the customer's own address: no masquerading.
    let seen = f.echo.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "datagrams at the device: {seen:?}");
    assert!(seen.iter().all(|(from, _)| from.ip() == IpAddr::V4(f.customer.v4)), "{seen:?}");
    assert_eq!(seen.iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![64, 1400, 3000, 3000, 8000]);

    let list = steer_list(&f.env);
    let udp = forward_rule(&list, "udp", PUB_UDP).unwrap();
    assert_eq!(u(&udp, "to_target_packets"), 1 + 1 + 3 + 3 + 6, "udp rule: fragments to the device: {udp}");
    assert_eq!(u(&udp, "from_target_packets"), 1 + 1 + 3 + 3 + 6, "udp rule: fragments from the device: {udp}");
    eprintln!("{}", serde_json::to_string_pretty(&list).unwrap());
    for bad in ["rewrite_failed", "fragment_unknown", "flow_table_error"] {
        assert_eq!(u(&list["events"][bad], "packets"), 0, "steering event {bad}: {}", list["events"]);
    }
    assert_no_nat(&ns);
}

/// (packets, bytes) of the nft counter with this comment in `table inet tmsteer`.
fn nft_counter(ns: &str, comment: &str) -> (u64, u64) {
    let v: Value = serde_json::from_str(&ns_sh(ns, &["nft", "-j", "list", "table", "inet", "tmsteer"])).unwrap();
    for item in v["nftables"].as_array().unwrap() {
        let r = &item["rule"];
        if r["comment"] == comment {
            let c = r["expr"].as_array().unwrap().iter().find_map(|e| e.get("counter")).unwrap();
            return (c["packets"].as_u64().unwrap(), c["bytes"].as_u64().unwrap());
        }
    }
    panic!("no nft rule {comment:?}: {v}");
}

#[test]
fn forward_rule_counters_equal_nftables_forward_hook_counters() {
    if !require_root() {
        return;
    }
    let f = Forward::new("tmsc");
    let srv = f.env.lab.server_ns();
    let (d, p) = (f.device.v4, HTTP_PROXY_PORT);
    // The forward hook sees every forwarded skb the TC hooks see (after the ingress rewrite,
    // before the egress one); its counters add skb->len = L3 bytes, as the rule counters do.
    let script = format!(
        "add table inet tmsteer\n\
         add chain inet tmsteer tmfwd {{ type filter hook forward priority 0; policy accept; }}\n\
         add rule inet tmsteer tmfwd ip daddr {d} tcp dport {p} counter comment \"to_device\"\n\
         add rule inet tmsteer tmfwd ip saddr {d} tcp sport {p} counter comment \"from_device\"\n"
    );
    let path = format!("/tmp/tmtest-nft-{}-{}.nft", f.env.lab.prefix(), std::process::id());
    std::fs::write(&path, script).unwrap();
    let r = netns_exec(&srv, &["nft", "-f", &path]);
    let _ = std::fs::remove_file(&path);
    r.expect("nft counters on the forward hook");

    let read = |f: &Forward| {
        let r = forward_rule(&steer_list(&f.env), "tcp", PUB_HTTP).expect("the http forward rule");
        let tm = [
            u(&r, "to_target_packets"),
            u(&r, "to_target_bytes"),
            u(&r, "from_target_packets"),
            u(&r, "from_target_bytes"),
        ];
        let (tp, tb) = nft_counter(&srv, "to_device");
        let (fp, fb) = nft_counter(&srv, "from_device");
        (tm, [tp, tb, fp, fb])
    };
    let before = read(&f);
    assert_eq!(before.0, [0; 4], "a new rule starts at zero");
    f.fetch_big(&f.http_proxy_args(), "http proxy");
    for _ in 0..5 {
        f.fetch_small(&f.http_proxy_args(), 10).expect("small page via the http proxy");
    }
    // Read while nothing moves any more (two equal readings in a row, bounded).
    let mut prev = read(&f);
    let t0 = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = read(&f);
        if now == prev {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "traffic never went quiet: {now:?}");
        prev = now;
    }
    let (tm, nft) = prev;
    eprintln!("rule counters [to p, to B, from p, from B]: tunmeter {tm:?}, nftables {nft:?}");
    assert!(nft[0] > 0 && nft[2] > 0 && nft[3] > proxies::BIG_LEN as u64, "no traffic counted by nftables: {nft:?}");
    assert_eq!(tm, nft, "forward rule counters vs nftables on the forward hook\n{}", steer_dump(&f.env));
    // The other rules moved nothing.
    let list = steer_list(&f.env);
    let socks = forward_rule(&list, "tcp", PUB_SOCKS).unwrap();
    assert_eq!(u(&socks, "to_target_packets") + u(&socks, "from_target_packets"), 0, "{socks}");
}

#[test]
fn deleted_forward_rule_refuses_new_connections_and_others_keep_working() {
    if !require_root() {
        return;
    }
    let f = Forward::new("tmsd");
    f.fetch_small(&f.http_proxy_args(), 10).expect("http proxy before the delete");
    f.fetch_small(&f.socks_args(), 10).expect("socks before the delete");

    steer_ok(&f.env, &["del", "forward", "--proto", "tcp", "--public-port", &PUB_HTTP.to_string()]);
    let list = steer_list(&f.env);
    assert!(forward_rule(&list, "tcp", PUB_HTTP).is_none(), "deleted rule still listed: {list}");
    assert!(forward_rule(&list, "tcp", PUB_SOCKS).is_some(), "{list}");

    let t0 = Instant::now();
    let r = f.fetch_small(&f.http_proxy_args(), 4);
    assert!(r.is_err(), "a new connection to the deleted public port still reached the proxy");
    eprintln!("after the delete: {} ({:?})", r.unwrap_err(), t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(6));

    f.fetch_big(&f.socks_args(), "socks5 after deleting the http rule");
    f.udp_roundtrips(&[100, 3000]);
    // Deleting again is an error (nothing to delete).
    let again = steer(&f.env, &["del", "forward", "--proto", "tcp", "--public-port", &PUB_HTTP.to_string()]);
    assert!(!again.status.success(), "deleting a missing rule succeeded");
    assert_no_nat(&lab_namespaces(&f.env));
}

/// Upload of `ip` (tunmeter) and tun0 ingress from `ip` (the oracle), read while nothing moves.
fn quiet_upload(env: &Env, ip: IpAddr) -> (Count, Count) {
    let read = || {
        let tm = read_clients(&env.maps(), None).unwrap();
        let up = tm.clients.iter().find(|c| c.ip == ip).map(|c| c.upload).unwrap_or_default();
        let o = env.oracle.read().unwrap().client("tun0", ip, Direction::Ingress);
        (up, Count { bytes: o.bytes, packets: o.packets })
    };
    let mut prev = read();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(300));
        let now = read();
        if now == prev {
            return now;
        }
        prev = now;
    }
    panic!("traffic never went quiet");
}

fn minus(a: Count, b: Count) -> Count {
    a.saturating_sub(b)
}

#[test]
fn redirect_rule_hands_connections_to_a_transparent_proxy_with_their_original_destination() {
    if !require_root() {
        return;
    }
    let env = Env::new("tmsr", 2, 2);
    let srv = env.lab.server_ns();
    let (t1, t2) = (env.lab.tun_clients()[0].clone(), env.lab.tun_clients()[1].clone());
    let web_host = env.lab.eth_clients()[1].clone();
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    for c in [&t1, &t2] {
        ns_sh(&c.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
        ns_sh(&c.ns, &["ip", "-6", "route", "add", "default", "dev", "tun0"]);
    }
    ns_sh(&web_host.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
    let daemon = env.start_daemon(&[]);
    let web = WebServer::start(&web_host.ns, WEB_PORT);
    let tproxy = TransparentProxy::start(&srv, TPROXY_PORT).expect("transparent proxy");
    let web_addr = SocketAddr::from((web_host.v4, WEB_PORT));
    let get_small = b"GET /small HTTP/1.0\r\nHost: web\r\n\r\n".to_vec();

    // Before any rule: P-t2 reaches the real web server.
    let r = proxies::tcp_request(&t2.ns, web_addr, get_small.clone(), SHORT).expect("P-t2 to the web before the rule");
    assert!(String::from_utf8_lossy(&r).ends_with(proxies::SMALL_BODY), "{}", String::from_utf8_lossy(&r));

    let src4 = format!("{}/32", t2.v4);
    let src6 = format!("{}/128", t2.v6);
    for src in [&src4, &src6] {
        steer_ok(&env, &["add", "redirect", "--source", src, "--proxy-port", &TPROXY_PORT.to_string()]);
    }
    let list = steer_list(&env);
    assert!(redirect_rule(&list, &src4).is_some() && redirect_rule(&list, &src6).is_some(), "{list}");
    assert_no_nat(&lab_namespaces(&env));
    let (up0, oracle0) = quiet_upload(&env, IpAddr::V4(t2.v4));

    // TCP to arbitrary destinations: each reaches the proxy, which sees the original one.
    let bulk = 300_000;
    let mut sent = 0;
    for (k, dst) in
        ["10.9.0.3:80", "192.0.2.55:443", "198.51.100.7:22", "[2001:db8::5]:80"].into_iter().map(sock).enumerate()
    {
        let payload = if k == 0 { vec![0x5a; bulk] } else { format!("hello {dst}").into_bytes() };
        sent += payload.len();
        match proxies::tcp_request(&t2.ns, dst, payload, SHORT) {
            Ok(r) => assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}\n"), "TCP from P-t2 to {dst}"),
            Err(e) => panic!("TCP from P-t2 to {dst}: {e:#}\n{}", steer_dump(&env)),
        }
    }
    // UDP, IPv4 and IPv6.
    for dst in ["192.0.2.55:53", "[2001:db8::5]:53"].map(sock) {
        let payload = format!("query for {dst}").into_bytes();
        sent += payload.len();
        match proxies::udp_request(&t2.ns, dst, payload, SHORT) {
            Ok(r) => assert_eq!(String::from_utf8_lossy(&r), format!("ORIG {dst}"), "UDP from P-t2 to {dst}"),
            Err(e) => panic!("UDP from P-t2 to {dst}: {e:#}\n{}", steer_dump(&env)),
        }
    }
    let seen = tproxy.intercepted();
    eprintln!("intercepted: {seen:#?}");
    let big = seen.iter().find(|i| i.proto == "tcp" && i.orig == web_addr).expect("the bulk connection");
    assert_eq!(big.bytes, bulk, "bytes the proxy received on the bulk connection");
    assert!(
        seen.iter().all(|i| i.peer.ip() == IpAddr::V4(t2.v4) || i.peer.ip() == IpAddr::V6(t2.v6)),
        "the proxy saw the client's own address: {seen:?}"
    );

    // Bypass: the server's own address is not redirected (the lab's echo sink answers).
    let echo =
        proxies::tcp_request(&t2.ns, SocketAddr::from((env.lab.server_tun_v4(), SINK_PORT)), vec![7; 1000], SHORT)
            .expect("P-t2 to the server's echo sink");
    assert_eq!(echo, vec![7; 1000], "the server's echo sink (bypass), not the proxy");
    // A client without a rule reaches the real web server.
    let r = proxies::tcp_request(&t1.ns, web_addr, get_small.clone(), SHORT).expect("P-t1 to the web server");
    assert!(String::from_utf8_lossy(&r).ends_with(proxies::SMALL_BODY), "P-t1 got {}", String::from_utf8_lossy(&r));
    assert!(web.requests().iter().any(|(p, _)| p.ip() == IpAddr::V4(t1.v4)), "{:?}", web.requests());
    assert_eq!(tproxy.intercepted().len(), seen.len(), "bypass and P-t1 traffic must not reach the proxy");

    // The client's bytes are still its own: upload grew by at least what it sent, and equals
    // the nftables count of tun0 ingress from its address.
    let (up1, oracle1) = quiet_upload(&env, IpAddr::V4(t2.v4));
    let (tm, o) = (minus(up1, up0), minus(oracle1, oracle0));
    eprintln!("upload of {}: tunmeter {tm:?}, nftables {o:?}, payload {sent}", t2.v4);
    assert!(tm.bytes >= (sent - 2 * 20) as u64, "upload of {} grew by {tm:?}, sent {sent}", t2.v4);
    assert_eq!(tm, o, "upload of {} vs nftables on tun0 ingress", t2.v4);
    let list = steer_list(&env);
    let r4 = redirect_rule(&list, &src4).unwrap();
    assert!(u(&r4, "to_target_packets") > 0 && u(&r4, "to_target_bytes") >= bulk as u64, "{r4}");

    // After the delete nothing is redirected any more.
    for src in [&src4, &src6] {
        steer_ok(&env, &["del", "redirect", "--source", src]);
    }
    let list = steer_list(&env);
    assert!(redirect_rule(&list, &src4).is_none() && redirect_rule(&list, &src6).is_none(), "{list}");
    let r = proxies::tcp_request(&t2.ns, web_addr, get_small, SHORT).expect("P-t2 to the web after the delete");
    assert!(
        String::from_utf8_lossy(&r).ends_with(proxies::SMALL_BODY),
        "P-t2 after the delete got {}",
        String::from_utf8_lossy(&r)
    );
    let r = proxies::tcp_request(&t2.ns, sock("192.0.2.55:443"), b"x".to_vec(), Duration::from_secs(3));
    assert!(r.as_ref().map_or(true, |b| !b.starts_with(b"ORIG")), "still redirected after the delete: {r:?}");
    let r = proxies::udp_request(&t2.ns, sock("192.0.2.55:53"), b"q".to_vec(), Duration::from_secs(2));
    assert!(r.is_err(), "UDP still answered after the delete: {r:?}");
    assert_eq!(tproxy.intercepted().len(), seen.len(), "the proxy got connections after the delete");
    assert_no_nat(&lab_namespaces(&env));
    // (Drop order: proxy, web server, daemon, then the lab.)
    let _ = (&daemon, &tproxy, &web);
}
