//! A real WireGuard lab with the userspace implementation (`wireguard-go`, Debian package) and
//! `wg` (wireguard-tools): no kernel module needed.
//!
//! Topology for a prefix `P` (peer `i` is 0-based):
//!
//! ```text
//!  P-p{i+1}                                         P-srv
//!  eth0 172.31.(i+1).2/30 ──────── veth ──────── p{i+1} 172.31.(i+1).1/30
//!  wg<P>p{i+1} 10.7.0.(i+2)/24, fd00:7::(i+2)/64    wg<P>s 10.7.0.1/24, fd00:7::1/64, UDP 51820
//! ```
//!
//! Interface names embed the prefix (`wg<P>s`, `wg<P>p<n>`, at most 14 chars) because
//! wireguard-go's control socket `/var/run/wireguard/<iface>.sock` lives on the shared file
//! system, not in the namespace. `wg` finds a userspace interface through that socket, so `wg`
//! commands work from any namespace; [`WgLab::dump`] runs `wg show <iface> dump` inside `P-srv`.
//!
//! Keys come from `wg genkey` / `wg pubkey`. The server has one `[Peer]` per peer with
//! `allowed-ips 10.7.0.(i+2)/32, fd00:7::(i+2)/128`; each peer has the server as its only peer
//! with endpoint 172.31.(i+1).1:51820 and `allowed-ips 10.7.0.0/24, fd00:7::/64`. No
//! persistent keepalive: a handshake happens when a peer sends (see [`WgLab::handshake`]).
//!
//! Processes, namespaces, sockets and `$TMPDIR/tunmeter-lab-P-wg/` are removed on
//! [`WgLab::down`] and on drop; leftovers of a killed lab by the next [`WgLab::up`] with the
//! same prefix or [`cleanup`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::procs::{LabProc, kill_leftovers, tail, wait_for};
use crate::{ipn, netns_exec, run, run_stdin, sys, traffic, validate_prefix};

/// Server listen port.
pub const WG_PORT: u16 = 51820;
/// Most peers a lab can have.
pub const MAX_PEERS: usize = 200;
/// The server's tunnel address.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 7, 0, 1);
/// The server's tunnel IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 7, 0, 0, 0, 0, 0, 1);
/// Where wireguard-go puts its control sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Directory of the lab's files for `prefix`.
pub fn lab_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tunmeter-lab-{prefix}-wg"))
}

/// Server interface name for a prefix: `wg<P>s`.
pub fn server_iface_name(prefix: &str) -> String {
    format!("wg{prefix}s")
}

/// Interface name of peer `i` (0-based): `wg<P>p<i+1>`.
pub fn peer_iface_name(prefix: &str, i: usize) -> String {
    format!("wg{prefix}p{}", i + 1)
}

/// Whether `file` is the control socket of one of this prefix's interfaces.
fn is_our_socket(prefix: &str, file: &str) -> bool {
    let Some(rest) = file.strip_prefix(&format!("wg{prefix}")).and_then(|r| r.strip_suffix(".sock")) else {
        return false;
    };
    rest == "s" || rest.strip_prefix('p').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove the leftovers of a WireGuard lab with this prefix: its wireguard-go processes (pid
/// files in [`lab_dir`], killed only if their command line names one of its interfaces), stale
/// control sockets, namespaces `P-*` and the directory.
pub fn cleanup(prefix: &str) -> Result<()> {
    validate_prefix(prefix)?;
    let dir = lab_dir(prefix);
    kill_leftovers(&dir, &format!("-f wg{prefix}"))?;
    if let Ok(rd) = std::fs::read_dir(SOCKET_DIR) {
        for e in rd.filter_map(|e| e.ok()) {
            if is_our_socket(prefix, &e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    crate::cleanup_prefix(prefix)?;
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A key pair from `wg genkey` / `wg pubkey`.
#[derive(Debug, Clone)]
struct KeyPair {
    private_file: PathBuf,
    public: String,
}

fn keypair(dir: &Path, name: &str) -> Result<KeyPair> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let private = run("wg", &["genkey"])?.trim().to_string();
    let public = run_stdin("wg", &["pubkey"], Some(&format!("{private}\n")))?.trim().to_string();
    if public.len() != 44 {
        bail!("wg pubkey returned {public:?}");
    }
    let private_file = dir.join(format!("{name}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&private_file)
        .with_context(|| format!("create {}", private_file.display()))?;
    f.write_all(format!("{private}\n").as_bytes())?;
    Ok(KeyPair { private_file, public })
}

/// A running WireGuard lab. Dropping it stops wireguard-go and removes everything.
pub struct WgLab {
    prefix: String,
    dir: PathBuf,
    namespaces: crate::Namespaces,
    procs: Vec<LabProc>,
    server_key: Option<KeyPair>,
    peer_keys: Vec<KeyPair>,
    peers: usize,
    cleaned: bool,
}

impl std::fmt::Debug for WgLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgLab").field("prefix", &self.prefix).field("peers", &self.peers).finish_non_exhaustive()
    }
}

impl WgLab {
    /// Build the lab with `peers` (0..=200) peers and configure every interface. No handshake
    /// has happened yet when this returns.
    pub fn up(prefix: &str, peers: usize) -> Result<WgLab> {
        validate_prefix(prefix)?;
        if peers > MAX_PEERS {
            bail!("at most {MAX_PEERS} WireGuard peers");
        }
        cleanup(prefix).context("removing leftovers")?;
        let mut lab = WgLab {
            prefix: prefix.to_string(),
            dir: lab_dir(prefix),
            namespaces: crate::Namespaces::new(),
            procs: Vec::new(),
            server_key: None,
            peer_keys: Vec::new(),
            peers,
            cleaned: false,
        };
        lab.build().with_context(|| format!("building WireGuard lab {prefix}"))?;
        Ok(lab)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        self.namespaces.add(ns, false)
    }

    /// Start `wireguard-go -f iface` in `ns` and wait for its device and control socket.
    fn start_wg(&mut self, ns: &str, iface: &str) -> Result<()> {
        let log = self.dir.join(format!("{iface}.log"));
        let p = LabProc::spawn(
            &format!("wireguard-go {iface}"),
            ns,
            "wireguard-go",
            &["-f", iface],
            &[("LOG_LEVEL", "verbose"), ("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
            &log,
            &self.dir.join(format!("{iface}.pid")),
        )?;
        self.procs.push(p);
        let p = self.procs.last_mut().expect("just pushed");
        let sock = PathBuf::from(format!("{SOCKET_DIR}/{iface}.sock"));
        let ns_owned = ns.to_string();
        let iface_owned = iface.to_string();
        wait_for(START_TIMEOUT, &format!("wireguard-go {iface} to start"), || {
            if let Some(st) = p.exited()? {
                bail!("wireguard-go {iface} exited ({st}); log:\n{}", tail(&log, 20));
            }
            let (n, i) = (ns_owned.clone(), iface_owned.clone());
            let dev = crate::in_netns(&n, move || Ok(sys::ifindex(&i) != 0))?;
            Ok((dev && sock.exists()).then_some(()))
        })
    }

    fn build(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        let srv = self.server_ns();
        self.add_ns(&srv)?;
        for i in 0..self.peers {
            let ns = self.peer_ns(i);
            self.add_ns(&ns)?;
            let port = format!("p{}", i + 1);
            ipn(&srv, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ipn(&srv, &["addr", "add", &format!("{}/30", self.server_real_ip(i)), "dev", &port])?;
            ipn(&srv, &["link", "set", &port, "up"])?;
            ipn(&ns, &["addr", "add", &format!("{}/30", Ipv4Addr::new(172, 31, (i + 1) as u8, 2)), "dev", "eth0"])?;
            ipn(&ns, &["link", "set", "eth0", "up"])?;
        }

        let server_key = keypair(&self.dir, "server")?;
        self.peer_keys =
            (0..self.peers).map(|i| keypair(&self.dir, &format!("peer{}", i + 1))).collect::<Result<_>>()?;

        let siface = self.server_iface();
        self.start_wg(&srv, &siface)?;
        let pk = server_key.private_file.to_string_lossy().into_owned();
        let port = WG_PORT.to_string();
        let mut args: Vec<String> =
            ["set", &siface, "listen-port", &port, "private-key", &pk].iter().map(|s| s.to_string()).collect();
        for i in 0..self.peers {
            args.extend([
                "peer".into(),
                self.peer_keys[i].public.clone(),
                "allowed-ips".into(),
                format!("{}/32,{}/128", self.peer_addr(i), self.peer_addr6(i)),
            ]);
        }
        run("wg", &args.iter().map(String::as_str).collect::<Vec<_>>()).context("configuring the server")?;
        wg_addr_up(&srv, &siface, SERVER_V4, SERVER_V6)?;

        for i in 0..self.peers {
            let (ns, iface) = (self.peer_ns(i), self.peer_iface(i));
            self.start_wg(&ns, &iface)?;
            let pk = self.peer_keys[i].private_file.to_string_lossy().into_owned();
            let endpoint = format!("{}:{WG_PORT}", self.server_real_ip(i));
            run(
                "wg",
                &[
                    "set",
                    &iface,
                    "private-key",
                    &pk,
                    "peer",
                    &server_key.public,
                    "endpoint",
                    &endpoint,
                    "allowed-ips",
                    "10.7.0.0/24,fd00:7::/64",
                ],
            )
            .with_context(|| format!("configuring peer {}", i + 1))?;
            wg_addr_up(&ns, &iface, self.peer_addr(i), self.peer_addr6(i))?;
        }
        self.server_key = Some(server_key);
        Ok(())
    }

    /// The lab's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of peers.
    pub fn peers(&self) -> usize {
        self.peers
    }

    /// `P-srv`.
    pub fn server_ns(&self) -> String {
        format!("{}-srv", self.prefix)
    }

    /// `P-p{i+1}`: namespace of peer `i`.
    pub fn peer_ns(&self, i: usize) -> String {
        format!("{}-p{}", self.prefix, i + 1)
    }

    /// The server's WireGuard interface in `P-srv` (`wg<P>s`).
    pub fn server_iface(&self) -> String {
        server_iface_name(&self.prefix)
    }

    /// Peer `i`'s WireGuard interface (`wg<P>p<i+1>`).
    pub fn peer_iface(&self, i: usize) -> String {
        peer_iface_name(&self.prefix, i)
    }

    /// The server's public key (base64).
    pub fn server_public_key(&self) -> &str {
        self.server_key.as_ref().map(|k| k.public.as_str()).unwrap_or_default()
    }

    /// Peer `i`'s public key (base64). Panics if there is no peer `i`.
    pub fn peer_public_key(&self, i: usize) -> &str {
        assert!(i < self.peers, "no peer #{i}: the lab has {} peers", self.peers);
        &self.peer_keys[i].public
    }

    /// Peer `i`'s tunnel address: 10.7.0.(i+2).
    pub fn peer_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 7, 0, (i + 2) as u8)
    }

    /// Peer `i`'s tunnel IPv6 address: fd00:7::(i+2).
    pub fn peer_addr6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 7, 0, 0, 0, 0, 0, (i + 2) as u16)
    }

    /// The server's tunnel address 10.7.0.1.
    pub fn server_addr(&self) -> Ipv4Addr {
        SERVER_V4
    }

    /// The server's address on peer `i`'s link (peer `i`'s endpoint): 172.31.(i+1).1.
    pub fn server_real_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, (i + 1) as u8, 1)
    }

    /// `wg show <server iface> dump`, run inside `P-srv`.
    pub fn dump(&self) -> Result<String> {
        netns_exec(&self.server_ns(), &["wg", "show", &self.server_iface(), "dump"])
    }

    /// Latest handshake (unix seconds, 0 = never) of every peer, by public key, from
    /// [`WgLab::dump`].
    pub fn latest_handshakes(&self) -> Result<BTreeMap<String, u64>> {
        parse_handshakes(&self.dump()?)
    }

    /// Make peer `i` handshake with the server (ping 10.7.0.1 from its namespace) and wait
    /// (<= 10 s) until the server reports a handshake for it. Returns its time (unix seconds).
    pub fn handshake(&self, i: usize) -> Result<u64> {
        if i >= self.peers {
            bail!("no peer #{i}: the lab has {} peers", self.peers);
        }
        let key = self.peer_public_key(i).to_string();
        let ns = self.peer_ns(i);
        let mut last_ping = std::time::Instant::now() - Duration::from_secs(10);
        wait_for(Duration::from_secs(10), &format!("a handshake of peer {}", i + 1), || {
            if last_ping.elapsed() > Duration::from_secs(1) {
                // The first ping may be lost while the handshake is under way: only the
                // server's view counts.
                let _ = traffic::ping(&ns, SERVER_V4.into(), 1);
                last_ping = std::time::Instant::now();
            }
            let hs = self.latest_handshakes()?;
            let t = *hs.get(&key).ok_or_else(|| anyhow!("peer {key} missing from the server's dump"))?;
            Ok((t != 0).then_some(t))
        })
    }

    /// Stop everything and remove namespaces, sockets and files, reporting errors.
    pub fn down(mut self) -> Result<()> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> Result<()> {
        if self.cleaned {
            return Ok(());
        }
        self.cleaned = true;
        let mut errors = Vec::new();
        for mut p in self.procs.drain(..) {
            if let Err(e) = p.terminate(Duration::from_secs(3)) {
                errors.push(format!("{e:#}"));
            }
        }
        let prefix = self.prefix.clone();
        crate::finish_cleanup("WireGuard lab", &mut self.namespaces, errors, || cleanup(&prefix))
    }
}

impl Drop for WgLab {
    fn drop(&mut self) {
        crate::cleanup_on_drop("WireGuard lab", || self.cleanup());
    }
}

fn wg_addr_up(ns: &str, iface: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    ipn(ns, &["addr", "add", &format!("{v4}/24"), "dev", iface])?;
    ipn(ns, &["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
    ipn(ns, &["link", "set", iface, "up"])?;
    Ok(())
}

/// Peers' latest handshakes from `wg show IFACE dump` output: the first line is the interface
/// (4 fields), each further line a peer: public key, preshared key, endpoint, allowed ips,
/// latest handshake, rx bytes, tx bytes, persistent keepalive.
pub fn parse_handshakes(dump: &str) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for line in dump.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 8 {
            bail!("unexpected wg dump line {line:?}");
        }
        let t: u64 = f[4].parse().with_context(|| format!("latest handshake in {line:?}"))?;
        out.insert(f[0].to_string(), t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_sockets_match_only_ours() {
        assert_eq!(server_iface_name("abcdefgh"), "wgabcdefghs");
        assert!(peer_iface_name("abcdefgh", 199).len() <= 15);
        assert!(is_our_socket("hw", "wghws.sock"));
        assert!(is_our_socket("hw", "wghwp12.sock"));
        assert!(!is_our_socket("hw", "wghwp1s.sock"));
        assert!(!is_our_socket("hw", "wghwp1p1.sock"));
        assert!(!is_our_socket("hw", "wghwp.sock"));
        assert!(!is_our_socket("hw", "wg0.sock"));
    }

    #[test]
    fn parses_dump() {
        let d = "priv\tpub\t51820\toff\nPEERKEY=\t(none)\t172.31.1.2:4000\t10.7.0.2/32\t1767225600\t100\t200\toff\nOTHER=\t(none)\t(none)\t10.7.0.3/32\t0\t0\t0\toff\n";
        let h = parse_handshakes(d).unwrap();
        assert_eq!(h["PEERKEY="], 1767225600);
        assert_eq!(h["OTHER="], 0);
        assert!(parse_handshakes("iface\nbad line").is_err());
    }
}
