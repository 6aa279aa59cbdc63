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
//!
//! This module holds the lab's shape, its addresses and teardown; `build` makes the namespaces,
//! the PKI and the configs, `instances` starts and stops servers and clients, `status` talks to
//! the management interfaces, `transfers` has the oracle and the traffic helpers.

mod build;
mod instances;
mod status;
#[cfg(test)]
mod tests;
mod transfers;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::oracle::Counter;
use crate::procs::{LabProc, kill_leftovers};
use crate::sinks::Sinks;
use crate::transfer::TransferServer;
use crate::validate_prefix;

pub use instances::tun_addrs;
pub use status::{StatusClient, parse_status_clients};
pub use transfers::{RoundSizes, TrafficTarget, background, discover_targets, traffic_round};

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

    /// The instance's client subnets: 10.8.0.0/24 and fd00:8::/64 / 10.8.100.0/24 and
    /// fd00:8:100::/64.
    pub fn client_subnets(self) -> [String; 2] {
        [
            format!("{}/24", Ipv4Addr::new(10, 8, self.third_octet(), 0)),
            format!("{}/64", Ipv6Addr::new(0xfd00, 8, self.v6_group(), 0, 0, 0, 0, 0)),
        ]
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

/// The part of a tunmeter config file a daemon in `P-srv` needs: an `[[interface]]` per server
/// tun device with its client subnets and, with `management`, an `[[openvpn]]` per instance on
/// its management port.
pub fn daemon_config(management: bool) -> String {
    let mut c = String::new();
    for t in Transport::ALL {
        let [v4, v6] = t.client_subnets();
        c += &format!("[[interface]]\nname = \"{}\"\nlayer = \"l3\"\nsubnets = [\"{v4}\", \"{v6}\"]\n", t.server_dev());
    }
    for t in Transport::ALL.into_iter().filter(|_| management) {
        c += &format!(
            "[[openvpn]]\nname = \"{t}\"\nprotocol = \"{t}\"\nmanagement = \"127.0.0.1:{}\"\ninterface = \"{}\"\n",
            t.mgmt_port(),
            t.server_dev()
        );
    }
    c
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
    namespaces: crate::Namespaces,
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
        let prefix = self.cfg.prefix.clone();
        crate::finish_cleanup("OpenVPN lab", &mut self.namespaces, errors, || cleanup(&prefix))
    }
}

impl Drop for OvpnLab {
    fn drop(&mut self) {
        crate::cleanup_on_drop("OpenVPN lab", || self.cleanup());
    }
}
