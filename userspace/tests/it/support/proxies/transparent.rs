//! What a transparent proxy behind a redirect rule sees: TCP connections accepted on the
//! wildcard address and UDP datagrams, each answered with its original destination.

use super::*;

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
            let l = in_netns(ns, move || sockets::transparent_tcp_listener(any)).context("transparent TCP listener")?;
            let (st, cn, lg) = (stop.clone(), conns.clone(), log.clone());
            p.threads.push(std::thread::Builder::new().name("tproxy-tcp".into()).spawn(move || {
                accept_loop(&l, &st, &cn, move |s, stop| {
                    let _ = tproxy_tcp(s, stop, &lg);
                })
            })?);
            let u = in_netns(ns, move || sockets::transparent_udp(any)).context("transparent UDP socket")?;
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
        let (n, peer, orig) = match sockets::recv_orig(u, &mut buf) {
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
        match sockets::transparent_udp_at(orig) {
            Ok(r) => {
                if let Err(e) = r.send_to(format!("ORIG {orig}").as_bytes(), peer) {
                    eprintln!("transparent proxy: reply from {orig} to {peer}: {e}");
                }
            }
            Err(e) => eprintln!("transparent proxy: reply socket on {orig}: {e:#}"),
        }
    }
}
