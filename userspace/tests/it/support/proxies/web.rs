//! A static HTTP/1.1 server (threads) with a generated 50 MiB body and small pages, and a UDP
//! echo; the SHA-256 helpers that check what went through.

use super::*;

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
            let listener = in_netns(ns, move || sockets::tcp_listener(any)).expect("web server listener");
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
