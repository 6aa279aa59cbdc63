//! A real OpenVPN lab: two OpenVPN 2.6 server instances (UDP and TCP) in one namespace, real
//! OpenVPN clients in their own namespaces, a "customer" namespace on the server's Ethernet side,
//! echo and transfer servers, and an nftables oracle on the server's tun devices.
//!
//! Topology for a prefix `P` (client `i` is the 0-based index into [`OvpnLabConfig::clients`]):
//!
//! ```text
//!  P-c{i+1}                                  P-srv                                  P-cust
//!  eth0 172.30.(i+1).2/30 ── veth ── c{i+1} 172.30.(i+1).1/30
//!  tun0 (OpenVPN client)                    tun0 UDP :1194 10.8.0.1/24   fd00:8::1/64
//!    UDP client: 10.8.0.(i+2), fd00:8::(i+2)  tun1 TCP :1194 10.8.100.1/24 fd00:8:100::1/64
//!    TCP client: 10.8.100.(i+2), fd00:8:100::(i+2)
//!                                           eth0 10.9.0.1/24 fd00:9::1/64 ── veth ── eth0 10.9.0.2/24
//!                                                                                    fd00:9::2/64
//! ```
//!
//! * Management: UDP instance `127.0.0.1:7505`, TCP instance `127.0.0.1:7506`, both inside
//!   `P-srv` (optional password file, [`OvpnLabConfig::mgmt_password`]).
//! * Clients authenticate with a certificate (CN = client name) and username/password; the
//!   servers accept any password (`auth-user-pass-verify /bin/true via-file`). Client addresses
//!   are fixed per client (`client-config-dir` with `ifconfig-push`), so the oracle knows them
//!   before anyone connects.
//! * The servers push routes to the customer network (10.9.0.0/24, fd00:9::/64); `P-srv`
//!   forwards, `P-cust` routes everything via 10.9.0.1 / fd00:9::1.
//! * Echo sinks (TCP 5001, UDP 5002, [`crate::traffic`]) and transfer servers (TCP 5003, UDP 5004,
//!   [`crate::transfer`]) run in `P-srv`, `P-cust` and every client namespace.
//! * Files (configs, PKI, logs, status files, pid files) live in
//!   `$TMPDIR/tunmeter-lab-P-ovpn/`, removed on [`OvpnLab::down`] / drop. A lab left over by a
//!   killed process is removed by the next [`OvpnLab::up`] with the same prefix or by
//!   [`cleanup`] (`tunmeter-lab openvpn down --prefix P`).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::certs::Pki;
use crate::oracle::{Counter, Direction, Oracle, OracleCounts, OracleDevice};
use crate::procs::{LabProc, kill_leftovers, tail, wait_for};
use crate::sinks::Sinks;
use crate::transfer::TransferServer;
use crate::{in_netns, init_ns, ipn, list_prefix, run, traffic, transfer, validate_prefix};

/// OpenVPN port of both instances (UDP and TCP).
pub const OVPN_PORT: u16 = 1194;
/// Most clients a lab can have.
pub const MAX_CLIENTS: usize = 200;
/// Server address on the customer link (`eth0` of `P-srv`).
pub const SERVER_ETH_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
/// IPv6 server address on the customer link.
pub const SERVER_ETH_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);
/// The customer's address (`eth0` of `P-cust`).
pub const CUST_V4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
/// The customer's IPv6 address.
pub const CUST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 2);
/// Names of the demo clients ([`OvpnLabConfig::demo`]); further clients are `client11`, ...
pub const DEMO_NAMES: [&str; 10] = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"];

/// How long a server instance may take to initialise.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(15);
/// SIGTERM grace period before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(8);

/// OpenVPN transport, i.e. which server instance a client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// `proto udp4`, server device `tun0`, 10.8.0.0/24, fd00:8::/64, management 127.0.0.1:7505.
    Udp,
    /// `proto tcp4-server`, server device `tun1`, 10.8.100.0/24, fd00:8:100::/64, management
    /// 127.0.0.1:7506.
    Tcp,
}

impl Transport {
    /// Both, UDP first.
    pub const ALL: [Transport; 2] = [Transport::Udp, Transport::Tcp];

    /// `"udp"` / `"tcp"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }

    /// The server instance's tun device in `P-srv`: `tun0` / `tun1`.
    pub fn server_dev(self) -> &'static str {
        match self {
            Transport::Udp => "tun0",
            Transport::Tcp => "tun1",
        }
    }

    /// Management port (on 127.0.0.1 in `P-srv`): 7505 / 7506.
    pub fn mgmt_port(self) -> u16 {
        match self {
            Transport::Udp => 7505,
            Transport::Tcp => 7506,
        }
    }

    /// The server's VPN address: 10.8.0.1 / 10.8.100.1.
    pub fn server_v4(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 8, self.third_octet(), 1)
    }

    /// The server's VPN IPv6 address: fd00:8::1 / fd00:8:100::1.
    pub fn server_v6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 8, self.v6_group(), 0, 0, 0, 0, 1)
    }

    fn third_octet(self) -> u8 {
        match self {
            Transport::Udp => 0,
            Transport::Tcp => 100,
        }
    }

    fn v6_group(self) -> u16 {
        match self {
            Transport::Udp => 0,
            Transport::Tcp => 0x100,
        }
    }

    fn index(self) -> usize {
        match self {
            Transport::Udp => 0,
            Transport::Tcp => 1,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Transport {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Transport> {
        match s {
            "udp" => Ok(Transport::Udp),
            "tcp" => Ok(Transport::Tcp),
            _ => bail!("bad transport {s:?}: need udp or tcp"),
        }
    }
}

/// One OpenVPN client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvpnClientSpec {
    /// Certificate common name: 1..=64 chars of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// `auth-user-pass` username: 1..=64 printable ASCII chars without spaces.
    pub username: String,
    /// `auth-user-pass` password: 1..=128 printable ASCII chars without spaces.
    pub password: String,
    pub transport: Transport,
}

/// Lab shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvpnLabConfig {
    /// Namespace name prefix, 1..=8 chars of `[a-z0-9]`.
    pub prefix: String,
    /// 0..=200 clients, unique names.
    pub clients: Vec<OvpnClientSpec>,
    /// A command line both servers run as `client-connect` and `client-disconnect` (absolute
    /// program path: OpenVPN runs scripts with a minimal environment). Must not contain `"`,
    /// `\` or a newline.
    pub hook: Option<String>,
    /// Management interface password (written to a file given to `management`); `None`: no
    /// password.
    pub mgmt_password: Option<String>,
}

impl OvpnLabConfig {
    /// `n` clients named alice, bob, carol, dave, ... (then `client11`..), username = name,
    /// password `pw-<name>`, transports alternating UDP (1st, 3rd, ..) and TCP (2nd, 4th, ..).
    pub fn demo(prefix: &str, n: usize) -> OvpnLabConfig {
        let clients = (0..n)
            .map(|i| {
                let name = DEMO_NAMES.get(i).map(|s| s.to_string()).unwrap_or_else(|| format!("client{}", i + 1));
                OvpnClientSpec {
                    username: name.clone(),
                    password: format!("pw-{name}"),
                    name,
                    transport: if i % 2 == 0 { Transport::Udp } else { Transport::Tcp },
                }
            })
            .collect();
        OvpnLabConfig { prefix: prefix.to_string(), clients, hook: None, mgmt_password: None }
    }

    fn validate(&self) -> Result<()> {
        validate_prefix(&self.prefix)?;
        if self.clients.len() > MAX_CLIENTS {
            bail!("at most {MAX_CLIENTS} OpenVPN clients");
        }
        let token = |what: &str, s: &str, max: usize| -> Result<()> {
            if s.is_empty() || s.len() > max || !s.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("bad {what} {s:?}: need 1..={max} printable ASCII chars without spaces");
            }
            Ok(())
        };
        for (i, c) in self.clients.iter().enumerate() {
            crate::certs::check_cn(&c.name)?;
            token("username", &c.username, 64)?;
            token("password", &c.password, 128)?;
            if self.clients[..i].iter().any(|o| o.name == c.name) {
                bail!("client name {:?} used twice", c.name);
            }
        }
        if let Some(h) = &self.hook
            && (h.trim().is_empty() || h.contains(['"', '\\', '\n', '\r']))
        {
            bail!("bad hook command {h:?}: must be non-empty without '\"', '\\' or newlines");
        }
        if let Some(p) = &self.mgmt_password {
            token("management password", p, 128)?;
        }
        Ok(())
    }
}

/// A connected client's VPN addresses (read from its tun device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddrs {
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// Upload (packets arriving on the server's tun from the client: hook ingress, source = client)
/// and download (packets leaving the server's tun to the client: hook egress, destination =
/// client), IPv4 and IPv6 summed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UpDown {
    pub upload: Counter,
    pub download: Counter,
}

/// One `CLIENT_LIST` row of `status 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusClient {
    pub common_name: String,
    pub real_address: String,
    pub virtual_v4: String,
    pub virtual_v6: String,
    pub username: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// Parse the `CLIENT_LIST` rows of `status 3` (tab separated) output, columns located by the
/// `HEADER CLIENT_LIST` row (fixed positions without it).
pub fn parse_status_clients(text: &str) -> Vec<StatusClient> {
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.trim_end_matches('\r').split('\t').collect()).collect();
    let header: Option<&Vec<&str>> = rows.iter().find(|r| r.len() > 2 && r[0] == "HEADER" && r[1] == "CLIENT_LIST");
    // Column of `name` in a CLIENT_LIST row (the header row has one extra leading field).
    let col = |name: &str, default: usize| -> usize {
        header.and_then(|h| h.iter().position(|f| *f == name)).map(|p| p - 1).unwrap_or(default)
    };
    let (cn, real, v4, v6, rx, tx, user) = (
        col("Common Name", 1),
        col("Real Address", 2),
        col("Virtual Address", 3),
        col("Virtual IPv6 Address", 4),
        col("Bytes Received", 5),
        col("Bytes Sent", 6),
        col("Username", 9),
    );
    rows.iter()
        .filter(|r| r.first() == Some(&"CLIENT_LIST"))
        .map(|r| {
            let f = |k: usize| r.get(k).map(|s| s.to_string()).unwrap_or_default();
            StatusClient {
                common_name: f(cn),
                real_address: f(real),
                virtual_v4: f(v4),
                virtual_v6: f(v6),
                username: f(user),
                bytes_received: f(rx).parse().unwrap_or(0),
                bytes_sent: f(tx).parse().unwrap_or(0),
            }
        })
        .collect()
}

/// Directory of the lab's files for `prefix`.
pub fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tunmeter-lab-{prefix}-ovpn"))
}

/// Remove the leftovers of an OpenVPN lab with this prefix: its processes (found by the pid
/// files in [`lab_dir`], killed only if their command line names that directory), every
/// namespace `P-*` and the directory.
pub fn cleanup(prefix: &str) -> Result<()> {
    validate_prefix(prefix)?;
    let dir = lab_dir(prefix);
    kill_leftovers(&dir, &dir.to_string_lossy())?;
    crate::cleanup_prefix(prefix)?;
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A running OpenVPN lab. Dropping it stops every process and removes namespaces and files.
pub struct OvpnLab {
    cfg: OvpnLabConfig,
    dir: PathBuf,
    namespaces: Vec<String>,
    servers: [Option<LabProc>; 2],
    clients: Vec<Option<LabProc>>,
    services: Vec<(Sinks, TransferServer)>,
    cleaned: bool,
}

impl std::fmt::Debug for OvpnLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OvpnLab").field("prefix", &self.cfg.prefix).field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl OvpnLab {
    /// Build the namespaces, generate the PKI, start both server instances (waiting until they
    /// are initialised) and the echo/transfer servers. Clients are not started: see
    /// [`OvpnLab::connect`] / [`OvpnLab::connect_all`]. Leftovers with the same prefix are removed
    /// first; on failure everything created so far is removed again.
    pub fn up(cfg: OvpnLabConfig) -> Result<OvpnLab> {
        cfg.validate()?;
        cleanup(&cfg.prefix).context("removing leftovers")?;
        let dir = lab_dir(&cfg.prefix);
        let n = cfg.clients.len();
        let mut lab = OvpnLab {
            cfg,
            dir,
            namespaces: Vec::new(),
            servers: [None, None],
            clients: (0..n).map(|_| None).collect(),
            services: Vec::new(),
            cleaned: false,
        };
        let prefix = lab.cfg.prefix.clone();
        lab.build().with_context(|| format!("building OpenVPN lab {prefix}"))?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        run("ip", &["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        init_ns(ns, false)
    }

    fn build(&mut self) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("tmp"))
            .with_context(|| format!("create {}", self.dir.join("tmp").display()))?;
        let srv = self.server_ns();
        let cust = self.cust_ns();
        self.add_ns(&srv)?;
        self.add_ns(&cust)?;
        in_netns(&srv, || {
            for p in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
                std::fs::write(p, "1").with_context(|| format!("write {p}"))?;
            }
            Ok(())
        })?;

        // Customer link.
        ipn(&srv, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &cust])?;
        for (ns, v4, v6) in [(&srv, SERVER_ETH_V4, SERVER_ETH_V6), (&cust, CUST_V4, CUST_V6)] {
            ipn(ns, &["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            ipn(ns, &["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            ipn(ns, &["link", "set", "eth0", "up"])?;
        }
        ipn(&cust, &["route", "add", "default", "via", &SERVER_ETH_V4.to_string()])?;
        ipn(&cust, &["-6", "route", "add", "default", "via", &SERVER_ETH_V6.to_string()])?;

        // Client links.
        for i in 0..self.cfg.clients.len() {
            let ns = self.client_ns(i);
            self.add_ns(&ns)?;
            let port = format!("c{}", i + 1);
            ipn(&srv, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ipn(&srv, &["addr", "add", &format!("{}/30", self.server_real_ip(i)), "dev", &port])?;
            ipn(&srv, &["link", "set", &port, "up"])?;
            ipn(&ns, &["addr", "add", &format!("{}/30", self.client_real_ip(i)), "dev", "eth0"])?;
            ipn(&ns, &["link", "set", "eth0", "up"])?;
        }

        // PKI and configuration files.
        let names: Vec<&str> = self.cfg.clients.iter().map(|c| c.name.as_str()).collect();
        let pki = Pki::generate(&self.dir.join("pki"), "server", &names)?;
        if let Some(pw) = &self.cfg.mgmt_password {
            write_private(&self.dir.join("mgmt.pw"), &format!("{pw}\n"))?;
        }
        for t in Transport::ALL {
            let ccd = self.dir.join(format!("ccd-{t}"));
            std::fs::create_dir_all(&ccd)?;
            for (i, c) in self.cfg.clients.iter().enumerate().filter(|(_, c)| c.transport == t) {
                let a = self.expected_addrs(i);
                let v6 = a.v6.expect("lab clients have IPv6");
                std::fs::write(
                    ccd.join(&c.name),
                    format!("ifconfig-push {} 255.255.255.0\nifconfig-ipv6-push {v6}/64 {}\n", a.v4, t.server_v6()),
                )?;
            }
            std::fs::write(self.server_conf(t), self.server_config(t, &pki))?;
        }
        for (i, c) in self.cfg.clients.iter().enumerate() {
            write_private(&self.client_auth(i), &format!("{}\n{}\n", c.username, c.password))?;
            std::fs::write(self.client_conf(i), self.client_config(i, &pki))?;
        }

        let mut service_ns = vec![srv.clone(), cust];
        service_ns.extend((0..self.cfg.clients.len()).map(|i| self.client_ns(i)));
        for ns in service_ns {
            self.services.push((Sinks::start(&ns)?, TransferServer::start(&ns)?));
        }
        for t in Transport::ALL {
            self.start_instance(t)?;
        }
        Ok(())
    }

    fn server_config(&self, t: Transport, pki: &Pki) -> String {
        let d = |name: &str| s(&self.dir.join(name));
        let mut c = String::new();
        let mut line = |l: String| {
            c += &l;
            c.push('\n');
        };
        line(format!("# tunmeter-lab OpenVPN {t} server instance"));
        line(format!("dev {}", t.server_dev()));
        line("dev-type tun".into());
        line("disable-dco".into());
        line(format!("proto {}", if t == Transport::Udp { "udp4" } else { "tcp4-server" }));
        line(format!("port {OVPN_PORT}"));
        line("topology subnet".into());
        line(format!("server {} 255.255.255.0", Ipv4Addr::new(10, 8, t.third_octet(), 0)));
        line(format!("server-ipv6 {}/64", Ipv6Addr::new(0xfd00, 8, t.v6_group(), 0, 0, 0, 0, 0)));
        line(format!("client-config-dir {}", d(&format!("ccd-{t}"))));
        line(format!("push \"route {} 255.255.255.0\"", Ipv4Addr::new(10, 9, 0, 0)));
        line("push \"route-ipv6 fd00:9::/64\"".into());
        line(format!("ca {}", s(&pki.ca_cert)));
        line(format!("cert {}", s(&pki.server.cert)));
        line(format!("key {}", s(&pki.server.key)));
        line("dh none".into());
        line("keepalive 2 10".into());
        if t == Transport::Udp {
            line("explicit-exit-notify 1".into());
        }
        match &self.cfg.mgmt_password {
            Some(_) => line(format!("management 127.0.0.1 {} {}", t.mgmt_port(), d("mgmt.pw"))),
            None => line(format!("management 127.0.0.1 {}", t.mgmt_port())),
        }
        line("script-security 2".into());
        line("auth-user-pass-verify /bin/true via-file".into());
        if let Some(h) = &self.cfg.hook {
            line(format!("client-connect \"{h}\""));
            line(format!("client-disconnect \"{h}\""));
        }
        line(format!("tmp-dir {}", d("tmp")));
        line(format!("status {} 1", s(&self.status_file(t))));
        line("status-version 3".into());
        line("verb 3".into());
        c
    }

    fn client_config(&self, i: usize, pki: &Pki) -> String {
        let spec = &self.cfg.clients[i];
        let mut c = String::new();
        let mut line = |l: String| {
            c += &l;
            c.push('\n');
        };
        line(format!("# tunmeter-lab OpenVPN client {} ({})", spec.name, spec.transport));
        line("client".into());
        line("dev tun0".into());
        line("dev-type tun".into());
        line("disable-dco".into());
        match spec.transport {
            Transport::Udp => {
                line("proto udp4".into());
                line("nobind".into());
                line("explicit-exit-notify 1".into());
            }
            Transport::Tcp => line("proto tcp4-client".into()),
        }
        line(format!("remote {} {OVPN_PORT}", self.server_real_ip(i)));
        line("connect-retry 1 2".into());
        line(format!("ca {}", s(&pki.ca_cert)));
        line(format!("cert {}", s(&pki.clients[i].cert)));
        line(format!("key {}", s(&pki.clients[i].key)));
        line("remote-cert-tls server".into());
        line(format!("auth-user-pass {}", s(&self.client_auth(i))));
        line("auth-nocache".into());
        line(format!("tmp-dir {}", s(&self.dir.join("tmp"))));
        line("verb 3".into());
        c
    }

    fn server_conf(&self, t: Transport) -> PathBuf {
        self.dir.join(format!("server-{t}.conf"))
    }

    fn client_conf(&self, i: usize) -> PathBuf {
        self.dir.join(format!("client-{}.conf", i + 1))
    }

    fn client_auth(&self, i: usize) -> PathBuf {
        self.dir.join(format!("client-{}.auth", i + 1))
    }

    fn check_index(&self, i: usize) -> Result<()> {
        if i >= self.cfg.clients.len() {
            bail!("no client #{i}: the lab has {} clients", self.cfg.clients.len());
        }
        Ok(())
    }

    /// The lab's prefix.
    pub fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// The configuration the lab was built with.
    pub fn config(&self) -> &OvpnLabConfig {
        &self.cfg
    }

    /// The client specs, index = client number used by every method.
    pub fn clients(&self) -> &[OvpnClientSpec] {
        &self.cfg.clients
    }

    /// Directory of configs, PKI, logs and status files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `P-srv`: both OpenVPN server instances, management ports, sinks, the oracle.
    pub fn server_ns(&self) -> String {
        format!("{}-srv", self.cfg.prefix)
    }

    /// `P-cust`: the customer namespace on the server's `eth0` (10.9.0.2, fd00:9::2).
    pub fn cust_ns(&self) -> String {
        format!("{}-cust", self.cfg.prefix)
    }

    /// `P-c{i+1}`: namespace of client `i`. Panics if there is no client `i`.
    pub fn client_ns(&self, i: usize) -> String {
        assert!(i < self.cfg.clients.len(), "no client #{i}: the lab has {} clients", self.cfg.clients.len());
        format!("{}-c{}", self.cfg.prefix, i + 1)
    }

    /// The server's address on client `i`'s link: 172.30.(i+1).1 (the client's `remote`).
    pub fn server_real_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, (i + 1) as u8, 1)
    }

    /// Client `i`'s own (pre-tunnel) address: 172.30.(i+1).2; OpenVPN's "real address".
    pub fn client_real_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, (i + 1) as u8, 2)
    }

    /// The VPN addresses the server pushes to client `i`: UDP clients 10.8.0.(i+2) and
    /// fd00:8::(i+2), TCP clients 10.8.100.(i+2) and fd00:8:100::(i+2).
    pub fn expected_addrs(&self, i: usize) -> ClientAddrs {
        let t = self.cfg.clients[i].transport;
        ClientAddrs {
            v4: Ipv4Addr::new(10, 8, t.third_octet(), (i + 2) as u8),
            v6: Some(Ipv6Addr::new(0xfd00, 8, t.v6_group(), 0, 0, 0, 0, (i + 2) as u16)),
        }
    }

    /// The server's VPN addresses as seen by client `i` (those of its instance).
    pub fn server_vpn_addrs(&self, i: usize) -> (Ipv4Addr, Ipv6Addr) {
        let t = self.cfg.clients[i].transport;
        (t.server_v4(), t.server_v6())
    }

    /// `"127.0.0.1:7505"` (UDP) / `"127.0.0.1:7506"` (TCP), reachable inside `P-srv`.
    pub fn mgmt_addr(&self, t: Transport) -> String {
        format!("127.0.0.1:{}", t.mgmt_port())
    }

    /// The management password file, if the lab has a password.
    pub fn mgmt_password_file(&self) -> Option<PathBuf> {
        self.cfg.mgmt_password.as_ref().map(|_| self.dir.join("mgmt.pw"))
    }

    /// Log (stdout and stderr, `verb 3`) of a server instance; truncated on every start.
    pub fn server_log(&self, t: Transport) -> PathBuf {
        self.dir.join(format!("server-{t}.log"))
    }

    /// Status file of a server instance (`status-version 3`, rewritten every second).
    pub fn status_file(&self, t: Transport) -> PathBuf {
        self.dir.join(format!("server-{t}.status"))
    }

    /// Log of client `i`; truncated on every [`OvpnLab::connect`].
    pub fn client_log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("client-{}.log", i + 1))
    }

    /// Start server instance `t` and wait (<= 15 s) until it is initialised. Errors if it is
    /// running already.
    pub fn start_instance(&mut self, t: Transport) -> Result<()> {
        if self.instance_running(t)? {
            bail!("OpenVPN {t} instance is running already");
        }
        let log = self.server_log(t);
        let conf = s(&self.server_conf(t));
        let proc = LabProc::spawn(
            &format!("openvpn {t} server"),
            &self.server_ns(),
            "openvpn",
            &["--config", &conf],
            &[],
            &log,
            &self.dir.join(format!("server-{t}.pid")),
        )?;
        let slot = &mut self.servers[t.index()];
        *slot = Some(proc);
        let proc = slot.as_mut().expect("just set");
        wait_for(SERVER_START_TIMEOUT, &format!("OpenVPN {t} server to initialise"), || {
            if let Some(st) = proc.exited()? {
                bail!("OpenVPN {t} server exited ({st}); log:\n{}", tail(&log, 30));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("Initialization Sequence Completed").then_some(()))
        })
        .with_context(|| format!("log tail:\n{}", tail(&log, 20)))
    }

    /// Stop server instance `t` (SIGTERM, wait for exit; SIGKILL after 8 s). Its tun device and
    /// management port go away; clients of that instance lose their tunnel and keep retrying.
    pub fn stop_instance(&mut self, t: Transport) -> Result<()> {
        let mut p = self.servers[t.index()].take().ok_or_else(|| anyhow!("OpenVPN {t} instance is not running"))?;
        p.terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Whether server instance `t`'s process is alive.
    pub fn instance_running(&mut self, t: Transport) -> Result<bool> {
        match &mut self.servers[t.index()] {
            Some(p) => Ok(p.exited()?.is_none()),
            None => Ok(false),
        }
    }

    /// Start client `i`'s OpenVPN process (returns at once; see [`OvpnLab::wait_connected`]).
    /// Errors if it is running already.
    pub fn connect(&mut self, i: usize) -> Result<()> {
        self.check_index(i)?;
        if let Some(p) = &mut self.clients[i]
            && p.exited()?.is_none()
        {
            bail!("client #{i} ({}) is running already", self.cfg.clients[i].name);
        }
        let conf = s(&self.client_conf(i));
        let proc = LabProc::spawn(
            &format!("openvpn client {}", self.cfg.clients[i].name),
            &self.client_ns(i),
            "openvpn",
            &["--config", &conf],
            &[],
            &self.client_log(i),
            &self.dir.join(format!("client-{}.pid", i + 1)),
        )?;
        self.clients[i] = Some(proc);
        Ok(())
    }

    /// Whether client `i`'s tunnel is up now: its process runs, its log's last
    /// "Initialization Sequence Completed" comes after its last restart, and its `tun0` has an
    /// IPv4 address. Returns the addresses then.
    pub fn connected_addrs(&mut self, i: usize) -> Result<Option<ClientAddrs>> {
        self.check_index(i)?;
        let name = self.cfg.clients[i].name.clone();
        let Some(p) = &mut self.clients[i] else { return Ok(None) };
        if let Some(st) = p.exited()? {
            bail!("client #{i} ({name}) exited ({st}); log:\n{}", tail(&self.client_log(i), 30));
        }
        let log = std::fs::read_to_string(self.client_log(i)).unwrap_or_default();
        let done = log.rfind("Initialization Sequence Completed");
        let restart = log.rfind("process restarting");
        if done.is_none() || restart > done {
            return Ok(None);
        }
        tun_addrs(&self.client_ns(i), "tun0")
    }

    /// Wait until client `i`'s tunnel is up ([`OvpnLab::connected_addrs`]), at most `timeout`.
    pub fn wait_connected(&mut self, i: usize, timeout: Duration) -> Result<ClientAddrs> {
        self.check_index(i)?;
        if self.clients[i].is_none() {
            bail!("client #{i} was never started: call connect first");
        }
        let log = self.client_log(i);
        let name = self.cfg.clients[i].name.clone();
        wait_for(timeout, &format!("client #{i} ({name}) to connect"), || self.connected_addrs(i))
            .with_context(|| format!("client log tail:\n{}", tail(&log, 20)))
    }

    /// Start every client, then wait for all of them (each within `timeout` of the start).
    pub fn connect_all(&mut self, timeout: Duration) -> Result<Vec<ClientAddrs>> {
        for i in 0..self.cfg.clients.len() {
            self.connect(i)?;
        }
        let deadline = Instant::now() + timeout;
        (0..self.cfg.clients.len())
            .map(|i| self.wait_connected(i, deadline.saturating_duration_since(Instant::now())))
            .collect()
    }

    /// Stop client `i` (SIGTERM: UDP clients send an explicit exit notification first; wait for
    /// the exit, SIGKILL after 8 s). Errors if it is not running.
    pub fn disconnect(&mut self, i: usize) -> Result<()> {
        self.check_index(i)?;
        let mut p = self.clients[i].take().ok_or_else(|| anyhow!("client #{i} is not running"))?;
        p.terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Whether client `i`'s OpenVPN process is alive (connected or not).
    pub fn client_running(&mut self, i: usize) -> Result<bool> {
        self.check_index(i)?;
        match &mut self.clients[i] {
            Some(p) => Ok(p.exited()?.is_none()),
            None => Ok(false),
        }
    }

    /// `status 3` of instance `t` through its management port (raw text, `\r` removed, up to
    /// and including the `END` line). Management admits one client at a time: while another
    /// client (e.g. the daemon) holds the port this times out after 5 s; read
    /// [`OvpnLab::status_file`] instead then.
    pub fn status(&self, t: Transport) -> Result<String> {
        let port = t.mgmt_port();
        let pw = self.cfg.mgmt_password.clone();
        in_netns(&self.server_ns(), move || mgmt_command(port, pw.as_deref(), "status 3"))
            .with_context(|| format!("status 3 via management 127.0.0.1:{port}"))
    }

    /// [`parse_status_clients`] of [`OvpnLab::status`].
    pub fn status_clients(&self, t: Transport) -> Result<Vec<StatusClient>> {
        Ok(parse_status_clients(&self.status(t)?))
    }

    /// Install the nftables oracle in `P-srv`: `tun0` (UDP clients' addresses), `tun1` (TCP
    /// clients' addresses) and `eth0` (the customer's addresses, Ethernet). Works before clients
    /// connect (addresses are fixed) and survives instance restarts (kernel 6.18 re-binds netdev
    /// chains to a re-created device by name; [`Oracle::rebind`] resets one device's counters).
    pub fn install_oracle(&self) -> Result<Oracle> {
        let mut devs = Vec::new();
        for t in Transport::ALL {
            let addrs = (0..self.cfg.clients.len())
                .filter(|&i| self.cfg.clients[i].transport == t)
                .flat_map(|i| {
                    let a = self.expected_addrs(i);
                    std::iter::once(IpAddr::V4(a.v4)).chain(a.v6.map(IpAddr::V6))
                })
                .collect();
            devs.push(OracleDevice::tun(t.server_dev(), addrs));
        }
        devs.push(OracleDevice::ethernet("eth0", vec![CUST_V4.into(), CUST_V6.into()]));
        Oracle::install_on(&self.server_ns(), devs)
    }

    /// Client `i`'s counters in an oracle reading: upload = ingress on its instance's tun with
    /// source = its v4 or v6 address, download = egress with that destination.
    pub fn client_counts(&self, counts: &OracleCounts, i: usize) -> UpDown {
        let dev = self.cfg.clients[i].transport.server_dev();
        let a = self.expected_addrs(i);
        let addrs: Vec<IpAddr> = std::iter::once(IpAddr::V4(a.v4)).chain(a.v6.map(IpAddr::V6)).collect();
        let sum = |dir| addrs.iter().fold(Counter::default(), |acc, ip| acc + counts.client(dev, *ip, dir));
        UpDown { upload: sum(Direction::Ingress), download: sum(Direction::Egress) }
    }

    fn server_addr(&self, i: usize, v6: bool) -> IpAddr {
        let (a4, a6) = self.server_vpn_addrs(i);
        if v6 { a6.into() } else { a4.into() }
    }

    /// Through client `i`'s tunnel: send exactly `upload` TCP payload bytes (>= 16) to the
    /// transfer server in `P-srv` (its instance's server address, IPv6 if `v6`) and receive
    /// exactly `download` bytes ([`transfer::tcp_transfer`]).
    pub fn tcp_transfer(&self, i: usize, v6: bool, upload: u64, download: u64) -> Result<()> {
        self.check_index(i)?;
        transfer::tcp_transfer(&self.client_ns(i), self.server_addr(i, v6), upload, download)
    }

    /// Through client `i`'s tunnel: `count` UDP datagrams of `up_size` bytes, each answered with
    /// `down_size` bytes ([`transfer::udp_transfer`]).
    pub fn udp_transfer(&self, i: usize, v6: bool, count: usize, up_size: usize, down_size: usize) -> Result<()> {
        self.check_index(i)?;
        transfer::udp_transfer(&self.client_ns(i), self.server_addr(i, v6), count, up_size, down_size)
    }

    /// Ping the server's VPN address from client `i` ([`traffic::ping`]).
    pub fn ping(&self, i: usize, v6: bool, count: u32) -> Result<()> {
        self.check_index(i)?;
        traffic::ping(&self.client_ns(i), self.server_addr(i, v6), count)
    }

    /// Traffic targets of every client (for [`traffic_round`] / [`background`]).
    pub fn traffic_targets(&self) -> Vec<TrafficTarget> {
        (0..self.cfg.clients.len())
            .map(|i| {
                let (server_v4, server_v6) = self.server_vpn_addrs(i);
                TrafficTarget { ns: self.client_ns(i), index: i, server_v4, server_v6: Some(server_v6) }
            })
            .collect()
    }

    /// Background traffic from every client (see [`background`]).
    pub fn background(&self, interval: Duration) -> Result<traffic::Background> {
        background(self.traffic_targets(), interval)
    }

    /// Stop everything and remove namespaces and files, reporting errors (drop does the same
    /// silently).
    pub fn down(mut self) -> Result<()> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let mut errors: Vec<String> = Vec::new();
        // SIGTERM to every process at once, then wait for each (the UDP ones take a moment to
        // send their exit notifications).
        let mut procs: Vec<LabProc> = self.clients.iter_mut().filter_map(Option::take).collect();
        procs.extend(self.servers.iter_mut().filter_map(Option::take));
        for p in &procs {
            // SAFETY: plain syscall on our own child's pid.
            unsafe {
                libc::kill(p.pid() as libc::pid_t, libc::SIGTERM);
            }
        }
        for mut p in procs {
            if let Err(e) = p.terminate(STOP_GRACE) {
                errors.push(format!("{e:#}"));
            }
        }
        self.services.clear();
        crate::delete_namespaces(&mut self.namespaces, &mut errors);
        if let Err(e) = cleanup(&self.cfg.prefix) {
            errors.push(format!("{e:#}"));
        }
        if errors.is_empty() { Ok(()) } else { Err(anyhow!("OpenVPN lab cleanup: {}", errors.join("; "))) }
    }
}

impl Drop for OvpnLab {
    fn drop(&mut self) {
        crate::cleanup_on_drop("OpenVPN lab", || self.cleanup());
    }
}

fn write_private(path: &Path, content: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

/// Global (non-link-local) addresses of `dev` in `ns`: `Ok(None)` if the device does not exist
/// or has no IPv4 address yet.
pub fn tun_addrs(ns: &str, dev: &str) -> Result<Option<ClientAddrs>> {
    let Ok(out) = run("ip", &["-n", ns, "-j", "addr", "show", "dev", dev]) else { return Ok(None) };
    let v: Value = serde_json::from_str(&out).context("parsing ip -j addr output")?;
    let mut v4 = None;
    let mut v6 = None;
    for a in v.as_array().into_iter().flatten().filter_map(|l| l.get("addr_info")).filter_map(Value::as_array).flatten()
    {
        let local = a.get("local").and_then(Value::as_str).unwrap_or_default();
        match a.get("family").and_then(Value::as_str) {
            Some("inet") => v4 = v4.or_else(|| local.parse::<Ipv4Addr>().ok()),
            Some("inet6") if a.get("scope").and_then(Value::as_str) == Some("global") => {
                v6 = v6.or_else(|| local.parse::<Ipv6Addr>().ok())
            }
            _ => {}
        }
    }
    Ok(v4.map(|v4| ClientAddrs { v4, v6 }))
}

/// Run one management command on 127.0.0.1:`port` (from the calling thread's namespace) and
/// return its output up to and including `END` (`\r` removed, `>` notifications dropped).
fn mgmt_command(port: u16, password: Option<&str>, cmd: &str) -> Result<String> {
    let timeout = Duration::from_secs(5);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut sock = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut buf = String::new();
    let deadline = Instant::now() + timeout;
    // Read until `done(buf)` holds, bounded by the deadline.
    let read_until = |sock: &mut TcpStream, buf: &mut String, what: &str, done: &dyn Fn(&str) -> bool| {
        let mut chunk = [0u8; 4096];
        while !done(buf) {
            if Instant::now() > deadline {
                bail!("management: no {what} within {timeout:?} (port busy with another client?); got {buf:?}");
            }
            match sock.read(&mut chunk) {
                Ok(0) => bail!("management closed the connection; got {buf:?}"),
                Ok(n) => buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(anyhow!(e).context("management read")),
            }
        }
        Ok(())
    };
    if let Some(pw) = password {
        read_until(&mut sock, &mut buf, "password prompt", &|b| b.contains("ENTER PASSWORD:"))?;
        sock.write_all(format!("{pw}\n").as_bytes())?;
        read_until(&mut sock, &mut buf, "password reply", &|b| b.contains("SUCCESS:") || b.contains("ERROR:"))?;
        if !buf.contains("SUCCESS:") {
            bail!("management password rejected: {buf:?}");
        }
    }
    read_until(&mut sock, &mut buf, "banner", &|b| {
        b.contains(">INFO:") && b[b.find(">INFO:").unwrap_or(0)..].contains('\n')
    })?;
    buf.clear();
    sock.write_all(format!("{cmd}\n").as_bytes())?;
    read_until(&mut sock, &mut buf, "END", &|b| b.lines().any(|l| l.trim_end() == "END"))?;
    let _ = sock.write_all(b"quit\n");
    let mut out = String::new();
    for l in buf.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.starts_with('>')) {
        out.push_str(l);
        out.push('\n');
        if l == "END" {
            break;
        }
    }
    Ok(out)
}

/// A client namespace and the server addresses it sends traffic to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficTarget {
    pub ns: String,
    /// Client index (makes the per-client volumes differ).
    pub index: usize,
    pub server_v4: Ipv4Addr,
    pub server_v6: Option<Ipv6Addr>,
}

/// Find the clients of a running OpenVPN lab with this prefix (e.g. one started by another
/// process with `tunmeter-lab openvpn up`): every namespace `P-c<n>` whose `tun0` has an address;
/// the server address is `.1` of the client's /24 (and `::1` of its /64).
pub fn discover_targets(prefix: &str) -> Result<Vec<TrafficTarget>> {
    validate_prefix(prefix)?;
    let start = format!("{prefix}-c");
    let mut out = Vec::new();
    for ns in list_prefix(prefix)? {
        let Some(n) = ns.strip_prefix(&start).and_then(|n| n.parse::<usize>().ok()) else { continue };
        let Some(a) = tun_addrs(&ns, "tun0")? else { continue };
        let o = a.v4.octets();
        let server_v6 = a.v6.map(|v6| {
            let mut seg = v6.segments();
            seg[4..].copy_from_slice(&[0, 0, 0, 1]);
            Ipv6Addr::from(seg)
        });
        out.push(TrafficTarget {
            ns,
            index: n.saturating_sub(1),
            server_v4: Ipv4Addr::new(o[0], o[1], o[2], 1),
            server_v6,
        });
    }
    out.sort_by_key(|t| t.index);
    Ok(out)
}

/// Sizes of one traffic round per client `k` (its index): a TCP transfer of
/// `tcp_up + 1000*k` up / `tcp_down + 3000*k` down, `udp_count` UDP datagrams of 200 up / 600
/// down bytes, 2 pings, over IPv4 and (where the client has it) IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundSizes {
    pub tcp_up: u64,
    pub tcp_down: u64,
    pub udp_count: usize,
}

impl Default for RoundSizes {
    fn default() -> Self {
        RoundSizes { tcp_up: 4096, tcp_down: 16 * 1024, udp_count: 3 }
    }
}

/// One traffic round for every target, in parallel; all errors joined into one.
pub fn traffic_round(targets: &[TrafficTarget], sizes: RoundSizes) -> Result<()> {
    let handles: Vec<_> = targets
        .iter()
        .cloned()
        .map(|t| {
            std::thread::spawn(move || -> Result<()> {
                let k = t.index as u64;
                let dsts: Vec<IpAddr> =
                    std::iter::once(IpAddr::V4(t.server_v4)).chain(t.server_v6.map(IpAddr::V6)).collect();
                for dst in dsts {
                    transfer::tcp_transfer(&t.ns, dst, sizes.tcp_up + 1000 * k, sizes.tcp_down + 3000 * k)?;
                    transfer::udp_transfer(&t.ns, dst, sizes.udp_count, 200, 600)?;
                    traffic::ping(&t.ns, dst, 2)?;
                }
                Ok(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push("traffic thread panicked".into()),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(anyhow!("{}", errors.join("\n"))) }
}

/// [`traffic_round`] with default sizes every `interval` on a thread until stopped. Rounds of
/// disconnected clients fail and are counted as errors.
pub fn background(targets: Vec<TrafficTarget>, interval: Duration) -> Result<traffic::Background> {
    traffic::background_fn(move || traffic_round(&targets, RoundSizes::default()), interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_alternates_transports() {
        let c = OvpnLabConfig::demo("x", 12);
        assert_eq!(c.clients[0].name, "alice");
        assert_eq!(c.clients[0].transport, Transport::Udp);
        assert_eq!(c.clients[1].transport, Transport::Tcp);
        assert_eq!(c.clients[3].username, "dave");
        assert_eq!(c.clients[10].name, "client11");
        c.validate().unwrap();
    }

    #[test]
    fn rejects_bad_configs() {
        let mut c = OvpnLabConfig::demo("x", 2);
        c.clients[1].name = "alice".into();
        assert!(c.validate().is_err());
        let mut c = OvpnLabConfig::demo("x", 2);
        c.clients[0].password = "has space".into();
        assert!(c.validate().is_err());
        let mut c = OvpnLabConfig::demo("x", 1);
        c.hook = Some("/bin/echo \"x\"".into());
        assert!(c.validate().is_err());
        assert!(OvpnLabConfig::demo("BAD", 1).validate().is_err());
        assert!(OvpnLabConfig::demo("x", MAX_CLIENTS + 1).validate().is_err());
        assert!("quic".parse::<Transport>().is_err());
        assert_eq!("tcp".parse::<Transport>().unwrap(), Transport::Tcp);
    }

    #[test]
    fn parses_status_3() {
        let text = "TITLE\tOpenVPN 2.6.14\nTIME\t2026-01-01 00:00:00\t1767225600\n\
HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher\n\
CLIENT_LIST\talice\t172.30.1.2:40000\t10.8.0.2\tfd00:8::2\t3000\t4000\t2026-01-01 00:00:00\t1767225600\talice-user\t0\t0\tAES-256-GCM\n\
HEADER\tROUTING_TABLE\tVirtual Address\tCommon Name\tReal Address\tLast Ref\tLast Ref (time_t)\n\
ROUTING_TABLE\t10.8.0.2\talice\t172.30.1.2:40000\t2026-01-01 00:00:00\t1767225600\nEND\n";
        let c = parse_status_clients(text);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].common_name, "alice");
        assert_eq!(c[0].username, "alice-user");
        assert_eq!(c[0].virtual_v4, "10.8.0.2");
        assert_eq!(c[0].virtual_v6, "fd00:8::2");
        assert_eq!((c[0].bytes_received, c[0].bytes_sent), (3000, 4000));
    }

    #[test]
    fn transports_have_distinct_resources() {
        assert_eq!(Transport::Udp.server_dev(), "tun0");
        assert_eq!(Transport::Tcp.server_dev(), "tun1");
        assert_eq!(Transport::Tcp.server_v4(), Ipv4Addr::new(10, 8, 100, 1));
        assert_eq!(Transport::Tcp.server_v6().to_string(), "fd00:8:100::1");
        assert_eq!(Transport::Udp.server_v6().to_string(), "fd00:8::1");
    }
}
