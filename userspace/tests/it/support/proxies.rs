//! Servers for the steering tests, each running inside one lab namespace:
//!
//! * [`Proxy::tinyproxy`] and [`Proxy::danted`]: Debian's HTTP proxy (tinyproxy) and SOCKS5
//!   server (dante) as child processes (`ip netns exec`), in the foreground, with a minimal
//!   config, pid file and log of their own in a temp dir (the distro's services and configs are
//!   not used);
//! * [`WebServer`]: a static HTTP/1.1 server (threads) serving a generated 50 MiB file at `/big`
//!   and small pages;
//! * [`UdpEcho`]: a UDP echo (a thread);
//! * [`TransparentProxy`]: what a transparent proxy behind a redirect rule sees (threads): every
//!   TCP connection accepted on the wildcard address gets its original destination back as a
//!   line `ORIG <addr>\n`; every UDP datagram gets `ORIG <addr>` sent from that original
//!   destination.
//!
//! Everything is stopped (processes killed, threads joined) on drop; every socket operation has
//! a timeout and every loop is bounded by it or by the stop flag.

use std::{
    io::{ErrorKind, Read, Write},
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use tunmeter_lab::in_netns;

/// Timeout of one socket operation of the servers here.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh temp dir `/tmp/tmtest-<tag>-<pid>-<n>`.
fn temp_dir(tag: &str) -> PathBuf {
    let p = PathBuf::from(format!("/tmp/tmtest-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    p
}

/// Wait until something accepts TCP connections on 127.0.0.1:`port` inside `ns`.
pub fn wait_tcp_listening(ns: &str, port: u16, timeout: Duration) -> Result<()> {
    in_netns(ns, move || {
        let t0 = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(_) => return Ok(()),
                Err(e) if t0.elapsed() > timeout => bail!("nothing listens on {addr} after {timeout:?}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
}

/// A proxy server process in a namespace; killed (with its children) on drop.
pub struct Proxy {
    pub name: &'static str,
    pub ns: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proxy {
    /// tinyproxy (HTTP proxy, also CONNECT) on every address of `ns`, port `port`. No `Allow`
    /// line: every client is allowed.
    pub fn tinyproxy(ns: &str, port: u16) -> Proxy {
        let dir = temp_dir("tinyproxy");
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        let text = format!(
            "Port {port}\nTimeout 30\nLogFile \"{log}\"\nLogLevel Info\nPidFile \"{pid}\"\nMaxClients 64\n\
             DisableViaHeader Yes\n",
            log = log.display(),
            pid = dir.join("tinyproxy.pid").display()
        );
        std::fs::write(&conf, text).unwrap();
        let conf_s = conf.display().to_string();
        // -d: foreground (it writes to its LogFile and, in the foreground, to stderr too).
        Proxy::spawn("tinyproxy", ns, port, dir, log, &["tinyproxy", "-d", "-c", &conf_s])
    }

    /// dante's `danted` (SOCKS5, no authentication, every client and destination allowed) on
    /// 0.0.0.0:`port` of `ns`, connecting out through `external` (an interface name of `ns`).
    pub fn danted(ns: &str, port: u16, external: &str) -> Proxy {
        let dir = temp_dir("danted");
        let log = dir.join("danted.log");
        let conf = dir.join("danted.conf");
        let text = format!(
            "logoutput: {log}\n\
             internal: 0.0.0.0 port = {port}\n\
             external: {external}\n\
             socksmethod: none\n\
             clientmethod: none\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}}\n\
             socks pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n}}\n",
            log = log.display()
        );
        std::fs::write(&conf, text).unwrap();
        let (conf_s, pid_s) = (conf.display().to_string(), dir.join("danted.pid").display().to_string());
        // Without -D danted stays in the foreground; -N 1: one main process.
        Proxy::spawn("danted", ns, port, dir, log, &["danted", "-f", &conf_s, "-p", &pid_s, "-N", "1"])
    }

    fn spawn(name: &'static str, ns: &str, port: u16, dir: PathBuf, log: PathBuf, argv: &[&str]) -> Proxy {
        let out = std::fs::File::create(dir.join("stdout-stderr.txt")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            // Own process group: drop kills the proxy's children too.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} in {ns} (is it installed? `cargo xtask setup`): {e}"));
        let mut p = Proxy { name, ns: ns.to_string(), dir, log, child: Some(child) };
        if let Err(e) = wait_tcp_listening(ns, port, Duration::from_secs(10)) {
            let exited = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!("{name} in {ns} does not listen on port {port} ({e:#}; exited: {exited:?}):\n{}", p.log_text());
        }
        p
    }

    /// Its log file and its stdout/stderr.
    pub fn log_text(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- {}:\n{}--- stdout/stderr:\n{}",
            self.log.display(),
            read(&self.log),
            read(&self.dir.join("stdout-stderr.txt"))
        )
    }

    /// SIGTERM to the process group, SIGKILL after 3 s; wait for the main process.
    pub fn stop(&mut self) {
        use nix::{
            sys::signal::{Signal, killpg},
            unistd::Pid,
        };
        let Some(mut c) = self.child.take() else { return };
        let pgid = Pid::from_raw(c.id() as i32);
        let _ = killpg(pgid, Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Children left behind (danted's) and a main process that did not stop.
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = c.wait();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "{} in {} (last lines):\n{}",
                self.name,
                self.ns,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Length of the generated file at `/big`.
pub const BIG_LEN: usize = 50 << 20;

/// The `/big` file: 50 MiB of deterministic pseudo-random bytes (generated once per process).
pub fn big_body() -> Arc<Vec<u8>> {
    static BODY: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    BODY.get_or_init(|| {
        let mut v = Vec::with_capacity(BIG_LEN);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        while v.len() < BIG_LEN {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        v.truncate(BIG_LEN);
        Arc::new(v)
    })
    .clone()
}

/// Hex SHA-256 of `/big`.
pub fn big_sha256() -> String {
    static SUM: OnceLock<String> = OnceLock::new();
    SUM.get_or_init(|| sha256_hex(&big_body())).clone()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The body of `/small`.
pub const SMALL_BODY: &str = "small page from the tunmeter test web server\n";

/// One request the web server answered: (peer, request target as sent).
pub type Request = (SocketAddr, String);

/// A static HTTP server on 0.0.0.0:`port` (and [::]:`port`) in a namespace: `/big` (the
/// [`big_body`]), `/small` ([`SMALL_BODY`]), anything else `hello\n`. One response per
/// connection (`Connection: close`).
pub struct WebServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl WebServer {
    pub fn start(ns: &str, port: u16) -> WebServer {
        let body = big_body();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let mut threads = Vec::new();
        for any in [SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))] {
            let listener = in_netns(ns, move || tcp_listener(any, false)).expect("web server listener");
            let (stop, conns, requests, body) = (stop.clone(), conns.clone(), requests.clone(), body.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("web-accept".into())
                    .spawn(move || {
                        accept_loop(&listener, &stop, &conns, move |s, stop| {
                            let _ = serve_http(s, stop, &body, &requests);
                        })
                    })
                    .unwrap(),
            );
        }
        WebServer { stop, threads, conns, requests }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        stop_all(&self.stop, &mut self.threads, &self.conns);
    }
}

fn stop_all(stop: &AtomicBool, threads: &mut Vec<JoinHandle<()>>, conns: &Mutex<Vec<JoinHandle<()>>>) {
    stop.store(true, Ordering::SeqCst);
    for t in threads.drain(..) {
        let _ = t.join();
    }
    let conns: Vec<_> = conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
    for t in conns {
        let _ = t.join();
    }
}

/// Accept (non-blocking listener, polled) until `stop`; one thread per connection.
fn accept_loop(
    l: &TcpListener,
    stop: &Arc<AtomicBool>,
    conns: &Arc<Mutex<Vec<JoinHandle<()>>>>,
    handle: impl Fn(TcpStream, &AtomicBool) + Send + Sync + Clone + 'static,
) {
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((s, _)) => {
                let (stop, handle) = (stop.clone(), handle.clone());
                let h = std::thread::Builder::new().name("conn".into()).spawn(move || handle(s, &stop));
                if let Ok(h) = h {
                    let mut g = conns.lock().unwrap_or_else(|p| p.into_inner());
                    let (done, live): (Vec<_>, Vec<_>) = g.drain(..).partition(|h| h.is_finished());
                    for d in done {
                        let _ = d.join();
                    }
                    *g = live;
                    g.push(h);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve_http(mut s: TcpStream, stop: &AtomicBool, big: &[u8], log: &Mutex<Vec<Request>>) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = s.peer_addr()?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        if req.len() > 64 * 1024 {
            bail!("request header too long");
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("EOF before the end of the request header");
        }
        req.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&req);
    let target = text.lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("/").to_string();
    log.lock().unwrap().push((peer, target.clone()));
    // A proxy may send the absolute form (http://host:port/path).
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_else(|| "/".into()),
        None => target,
    };
    let body: &[u8] = match path.as_str() {
        "/big" => big,
        "/small" => SMALL_BODY.as_bytes(),
        _ => b"hello\n",
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    for chunk in body.chunks(256 * 1024) {
        if stop.load(Ordering::SeqCst) {
            bail!("stopped");
        }
        s.write_all(chunk)?;
    }
    s.shutdown(Shutdown::Write)?;
    // Drain until the client closes (bounded by the read timeout).
    let _ = s.read(&mut buf);
    Ok(())
}

/// A UDP echo on 0.0.0.0:`port` in a namespace: every datagram goes back to its sender.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Datagrams echoed so far: (from, length).
    pub seen: Arc<Mutex<Vec<(SocketAddr, usize)>>>,
}

impl UdpEcho {
    pub fn start(ns: &str, port: u16) -> UdpEcho {
        let sock = in_netns(ns, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).context("udp echo bind")?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok(s)
        })
        .expect("udp echo");
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Vec<(SocketAddr, usize)>>> = Arc::default();
        let (st, sn) = (stop.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name("udp-echo".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        sn.lock().unwrap().push((from, n));
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
            .unwrap();
        UdpEcho { stop, thread: Some(thread), seen }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the transparent proxy saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intercepted {
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub peer: SocketAddr,
    /// The original destination (TCP: getsockname of the accepted socket; UDP: the
    /// IP_ORIGDSTADDR / IPV6_ORIGDSTADDR control message).
    pub orig: SocketAddr,
    /// Bytes the peer sent (TCP: until EOF; UDP: the datagram).
    pub bytes: usize,
}

/// A transparent proxy on 0.0.0.0:`port` and [::]:`port` (v6-only) for TCP and UDP, with
/// IP_TRANSPARENT / IPV6_TRANSPARENT.
///
/// TCP: writes `ORIG <original destination>\n`, shuts down its write side, reads what the client
/// sends until EOF (recorded in [`Intercepted::bytes`]), closes. UDP: replies `ORIG <original
/// destination>` from a transparent socket bound to the original destination.
pub struct TransparentProxy {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    log: Arc<Mutex<Vec<Intercepted>>>,
}

impl TransparentProxy {
    pub fn start(ns: &str, port: u16) -> Result<TransparentProxy> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let log: Arc<Mutex<Vec<Intercepted>>> = Arc::default();
        let mut p =
            TransparentProxy { stop: stop.clone(), threads: Vec::new(), conns: conns.clone(), log: log.clone() };
        for any in [SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))] {
            let l = in_netns(ns, move || tcp_listener(any, true)).context("transparent TCP listener")?;
            let (st, cn, lg) = (stop.clone(), conns.clone(), log.clone());
            p.threads.push(std::thread::Builder::new().name("tproxy-tcp".into()).spawn(move || {
                accept_loop(&l, &st, &cn, move |s, stop| {
                    let _ = tproxy_tcp(s, stop, &lg);
                })
            })?);
            let u = in_netns(ns, move || transparent_udp(any)).context("transparent UDP socket")?;
            let (st, lg, ns) = (stop.clone(), log.clone(), ns.to_string());
            p.threads.push(std::thread::Builder::new().name("tproxy-udp".into()).spawn(move || {
                // Reply sockets are created in the namespace too: this thread enters it.
                if let Err(e) = in_netns(&ns, move || {
                    tproxy_udp(&u, &st, &lg);
                    Ok(())
                }) {
                    eprintln!("transparent proxy UDP: {e:#}");
                }
            })?);
        }
        Ok(p)
    }

    /// Everything intercepted so far.
    pub fn intercepted(&self) -> Vec<Intercepted> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TransparentProxy {
    fn drop(&mut self) {
        stop_all(&self.stop, &mut self.threads, &self.conns);
    }
}

fn tproxy_tcp(mut s: TcpStream, stop: &AtomicBool, log: &Mutex<Vec<Intercepted>>) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = s.peer_addr()?;
    let orig = s.local_addr()?;
    s.write_all(format!("ORIG {orig}\n").as_bytes())?;
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0;
    let t0 = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                if stop.load(Ordering::SeqCst) || t0.elapsed() > IO_TIMEOUT {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    log.lock().unwrap().push(Intercepted { proto: "tcp", peer, orig, bytes });
    Ok(())
}

fn tproxy_udp(u: &UdpSocket, stop: &AtomicBool, log: &Mutex<Vec<Intercepted>>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let (n, peer, orig) = match recv_orig(u.as_raw_fd(), &mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(e) => {
                eprintln!("transparent proxy: recvmsg: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(orig) = orig else {
            eprintln!("transparent proxy: datagram from {peer} without an original destination");
            continue;
        };
        log.lock().unwrap().push(Intercepted { proto: "udp", peer, orig, bytes: n });
        match transparent_reply_socket(orig) {
            Ok(r) => {
                if let Err(e) = r.send_to(format!("ORIG {orig}").as_bytes(), peer) {
                    eprintln!("transparent proxy: reply from {orig} to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("transparent proxy: reply socket on {orig}: {e:#}"),
        }
    }
}

// ---- sockets with raw options (libc) ----

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> std::io::Result<()> {
    // SAFETY: the option value is a live c_int of the given size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &val as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: all-zero sockaddr_in is valid.
            let mut sin: libc::sockaddr_in = unsafe { zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero sockaddr_in6 is valid.
            let mut sin6: libc::sockaddr_in6 = unsafe { zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr_in(sin: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()), u16::from_be(sin.sin_port)))
}

fn from_sockaddr_in6(sin6: &libc::sockaddr_in6) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        sin6.sin6_flowinfo,
        sin6.sin6_scope_id,
    ))
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        // SAFETY: the family says which struct the storage holds.
        libc::AF_INET => Some(from_sockaddr_in(unsafe { &*(s as *const _ as *const libc::sockaddr_in) })),
        // SAFETY: as above.
        libc::AF_INET6 => Some(from_sockaddr_in6(unsafe { &*(s as *const _ as *const libc::sockaddr_in6) })),
        _ => None,
    }
}

/// A socket of `addr`'s family with SO_REUSEADDR, IPV6_V6ONLY for v6, IP(V6)_TRANSPARENT if
/// `transparent`, bound to `addr`.
fn bound_socket(addr: SocketAddr, ty: libc::c_int, transparent: bool) -> Result<OwnedFd> {
    let v6 = addr.is_ipv6();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) }).context("socket")?;
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).context("SO_REUSEADDR")?;
    if v6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).context("IPV6_V6ONLY")?;
    }
    if transparent {
        if v6 {
            setsockopt_int(raw, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1).context("IPV6_TRANSPARENT")?;
        } else {
            setsockopt_int(raw, libc::SOL_IP, libc::IP_TRANSPARENT, 1).context("IP_TRANSPARENT")?;
        }
    }
    let (st, len) = sockaddr_of(&addr);
    // SAFETY: st holds a valid sockaddr of length len.
    check(unsafe { libc::bind(raw, &st as *const _ as *const libc::sockaddr, len) })
        .with_context(|| format!("bind {addr}"))?;
    Ok(fd)
}

/// A non-blocking TCP listener on `addr` (transparent or not).
fn tcp_listener(addr: SocketAddr, transparent: bool) -> Result<TcpListener> {
    let fd = bound_socket(addr, libc::SOCK_STREAM, transparent)?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) }).context("listen")?;
    let l = TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The transparent proxy's UDP socket: IP(V6)_TRANSPARENT and IP(V6)_RECVORIGDSTADDR, with a
/// 100 ms receive timeout.
fn transparent_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let fd = bound_socket(addr, libc::SOCK_DGRAM, true)?;
    if addr.is_ipv6() {
        setsockopt_int(fd.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)
            .context("IPV6_RECVORIGDSTADDR")?;
    } else {
        setsockopt_int(fd.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1).context("IP_RECVORIGDSTADDR")?;
    }
    let u = UdpSocket::from(fd);
    u.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(u)
}

/// A UDP socket bound (transparently) to a non-local `orig`, to reply from it.
fn transparent_reply_socket(orig: SocketAddr) -> Result<UdpSocket> {
    Ok(UdpSocket::from(bound_socket(orig, libc::SOCK_DGRAM, true)?))
}

/// recvmsg: (length, sender, original destination from the control message).
fn recv_orig(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    // SAFETY: all-zero sockaddr_storage / msghdr are valid.
    let mut peer: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // u64 for alignment of cmsghdr.
    let mut control = [0u64; 32];
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = &mut peer as *mut _ as *mut libc::c_void;
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of::<[u64; 32]>();
    // SAFETY: msg points to live buffers of the given sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let peer = from_storage(&peer).ok_or_else(|| std::io::Error::other("recvmsg: sender of unknown family"))?;
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_IP, libc::IP_ORIGDSTADDR) => {
                    orig = Some(from_sockaddr_in(&std::ptr::read_unaligned(data as *const libc::sockaddr_in)))
                }
                (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    orig = Some(from_sockaddr_in6(&std::ptr::read_unaligned(data as *const libc::sockaddr_in6)))
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, peer, orig))
}

// ---- clients, run from inside a namespace ----

/// From `ns`: connect to `dst` (timeout `timeout`), send `payload`, shut down the write side,
/// read everything until EOF. Returns what was read.
pub fn tcp_request(ns: &str, dst: SocketAddr, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
    let ns_s = ns.to_string();
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&dst, timeout).with_context(|| format!("connect {dst} from {ns_s}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> Result<()> {
            w.write_all(&payload).context("write")?;
            w.shutdown(Shutdown::Write).context("shutdown")?;
            Ok(())
        });
        let mut r = s;
        let mut got = Vec::new();
        let res = r.read_to_end(&mut got).with_context(|| format!("read from {dst} after {} bytes", got.len()));
        let w = writer.join().map_err(|_| anyhow!("writer panicked"))?;
        res?;
        w?;
        Ok(got)
    })
}

/// From `ns`: a UDP socket connected to `dst` sends `payload` and waits for one reply (which
/// must come from `dst`, being connected). Returns the reply.
pub fn udp_request(ns: &str, dst: SocketAddr, payload: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
    in_netns(ns, move || {
        let any: SocketAddr =
            if dst.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        let u = UdpSocket::bind(any)?;
        u.connect(dst)?;
        u.set_read_timeout(Some(timeout))?;
        u.send(&payload).with_context(|| format!("send {} bytes to {dst}", payload.len()))?;
        let mut buf = vec![0u8; 65536];
        let n = u.recv(&mut buf).with_context(|| format!("no reply from {dst} within {timeout:?}"))?;
        buf.truncate(n);
        Ok(buf)
    })
}
