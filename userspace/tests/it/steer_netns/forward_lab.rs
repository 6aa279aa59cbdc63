//! The forwarding lab: a device behind the VPN running tinyproxy, dante and a UDP echo, a web
//! server and a customer on the Ethernet side, and the daemon; fetches through each proxy and
//! UDP round trips with SHA-256 checks.

use super::*;

/// `curl` in `ns`, body to `out`; Err with curl's message on failure.
pub(super) fn curl(ns: &str, args: &[&str], out: &Path, max_time: u32) -> Result<(), String> {
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
pub(super) struct Scratch(pub(super) PathBuf);

impl Scratch {
    pub(super) fn new(tag: &str) -> Scratch {
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
pub(super) struct Forward {
    pub(super) tinyproxy: Proxy,
    pub(super) danted: Proxy,
    pub(super) echo: UdpEcho,
    pub(super) web: WebServer,
    pub(super) _daemon: Daemon,
    pub(super) env: Env,
    pub(super) device: Client,
    pub(super) customer: Client,
    pub(super) web_host: Client,
}

/// The lab of the forwarding tests (one device behind the VPN, a customer and a web host on
/// the Ethernet side) with its routes: the daemon does not enable forwarding, and the device
/// reaches the web through the server. Returns (server namespace, device, customer, web host).
pub(super) fn lab_routes(env: &Env) -> (String, Client, Client, Client) {
    let srv = env.lab.server_ns();
    let device = env.lab.tun_clients()[0].clone();
    let (customer, web_host) = (env.lab.eth_clients()[0].clone(), env.lab.eth_clients()[1].clone());
    ns_sh(&srv, &["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    ns_sh(&device.ns, &["ip", "route", "add", "default", "dev", "tun0"]);
    ns_sh(&web_host.ns, &["ip", "route", "add", "10.8.0.0/24", "via", "10.9.0.1"]);
    (srv, device, customer, web_host)
}

impl Forward {
    pub(super) fn new(prefix: &str) -> Forward {
        let env = Env::new(prefix, 1, 2);
        let (_, device, customer, web_host) = lab_routes(&env);
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

    pub(super) fn web_url(&self, path: &str) -> String {
        format!("http://{}:{WEB_PORT}{path}", self.web_host.v4)
    }

    pub(super) fn http_proxy_args(&self) -> Vec<String> {
        vec!["-x".into(), format!("http://{}:{PUB_HTTP}", self.env.lab.server_eth_v4())]
    }

    pub(super) fn socks_args(&self) -> Vec<String> {
        vec!["--socks5".into(), format!("{}:{PUB_SOCKS}", self.env.lab.server_eth_v4())]
    }

    /// The customer fetches `/big` through a public port; the file's SHA-256 must match.
    pub(super) fn fetch_big(&self, via: &[String], what: &str) {
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
    pub(super) fn fetch_small(&self, via: &[String], max_time: u32) -> Result<(), String> {
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
    pub(super) fn udp_roundtrips(&self, sizes: &[usize]) {
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
