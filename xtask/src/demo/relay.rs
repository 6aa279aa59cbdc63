//! The host's way to the dashboard: a TCP relay from the host's loopback into the server
//! namespace, each connection on a thread that joined that namespace.

use super::*;

/// Forwards connections to the host's loopback (127.0.0.1:DASHBOARD_PORT, or a free port) to
/// the daemon's API on the server namespace's loopback, so a browser on the host reaches the
/// dashboard while the API itself stays loopback-only and the host gets no new address.
pub(super) struct Relay {
    pub(super) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: JoinHandle<()>,
}

impl Relay {
    pub(super) fn start(ns: &str) -> Result<Relay> {
        let listener = match TcpListener::bind(("127.0.0.1", DASHBOARD_PORT)) {
            Ok(l) => l,
            Err(e) => {
                println!("demo: 127.0.0.1:{DASHBOARD_PORT} is not free ({e}); the dashboard gets another port");
                TcpListener::bind("127.0.0.1:0").context("binding a loopback port for the dashboard")?
            }
        };
        let addr = listener.local_addr()?;
        // Non-blocking, so the acceptor notices `stop`.
        listener.set_nonblocking(true)?;
        let netns = Arc::new(File::open(netns_path(ns)).with_context(|| format!("opening {}", netns_path(ns)))?);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let acceptor = thread::Builder::new()
            .name("dashboard-relay".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let netns = Arc::clone(&netns);
                            let _ =
                                thread::Builder::new().name("relay-conn".into()).spawn(move || relay(client, &netns));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(50))
                        }
                        Err(e) => {
                            eprintln!("demo: warning: dashboard relay: accept: {e}");
                            thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })
            .context("starting the dashboard relay")?;
        println!("demo: dashboard relay: {addr} (host) -> {API_LISTEN} in {ns}");
        Ok(Relay { addr, stop, acceptor })
    }

    /// Stop accepting. Open connections end when the daemon stops.
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.acceptor.join();
    }
}

/// One relayed connection: this thread joins the server namespace (only this thread: setns
/// on a thread changes its namespace alone), connects to the API there, and copies both ways.
fn relay(client: TcpStream, netns: &File) {
    let _ = client.set_nonblocking(false);
    if let Err(e) = setns(netns, CloneFlags::CLONE_NEWNET) {
        eprintln!("demo: warning: dashboard relay: entering the server namespace: {e}");
        return;
    }
    let Ok(upstream) = TcpStream::connect(API_LISTEN) else {
        // The daemon is not listening (yet, or any more): the browser sees a closed connection.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (Ok(client_w), Ok(upstream_r)) = (client.try_clone(), upstream.try_clone()) else { return };
    let back = thread::spawn(move || pump(upstream_r, client_w));
    pump(client, upstream);
    let _ = back.join();
}

/// Copy until EOF or error, then pass the EOF on.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
