//! Threads that serve TCP and UDP on both wildcard addresses of a namespace until stopped: an
//! accept loop that gives each connection a thread of its own, and a datagram loop. The echo
//! sinks and the transfer server are two sets of handlers on it.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::sockets::{dual_stack, tcp_listener, udp_socket};
use crate::sys::{StopSignal, poll_readable};
use crate::traffic::IO_TIMEOUT;

/// Serves one TCP connection (until EOF, an error, or `stop`).
pub(crate) type TcpHandler = fn(TcpStream, &StopSignal) -> Result<()>;

/// A TCP and a UDP server (stopped and joined on [`Servers::stop`] or drop).
pub(crate) struct Servers {
    stop: Arc<StopSignal>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Servers {
    /// Serve TCP `tcp_port` with `tcp` (a thread per connection) and UDP `udp_port` with `udp`
    /// (each datagram and its sender), IPv4 and IPv6, inside `ns`; returns once both listen.
    /// Threads are named after `name`.
    pub(crate) fn start(
        ns: &str,
        name: &'static str,
        (tcp_port, tcp): (u16, TcpHandler),
        (udp_port, udp): (u16, impl FnMut(&UdpSocket, &[u8], SocketAddr) + Send + 'static),
    ) -> Result<Servers> {
        let stop = Arc::new(StopSignal::new()?);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut srv = Servers { stop: stop.clone(), threads: Vec::new(), conns: conns.clone() };
        let (tx, rx) = mpsc::channel::<Result<()>>();
        {
            let (ns, stop, tx) = (ns.to_string(), stop.clone(), tx.clone());
            srv.threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-tcp"))
                    .spawn(move || tcp_server(&ns, name, tcp_port, tcp, &stop, &conns, tx))?,
            );
        }
        {
            let (ns, stop) = (ns.to_string(), stop.clone());
            srv.threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-udp"))
                    .spawn(move || udp_server(&ns, name, udp_port, udp, &stop, tx))?,
            );
        }
        for _ in 0..2 {
            rx.recv_timeout(IO_TIMEOUT).map_err(|_| anyhow!("{name} server thread did not start in time"))??;
        }
        Ok(srv)
    }

    /// Stop and join every thread.
    pub(crate) fn stop(&mut self) {
        self.stop.trigger();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<_> = self.conns.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for t in conns {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Errors of server threads go to stderr only with `TUNMETER_LAB_DEBUG` set (a client that gives
/// up makes the server side fail too, and the client reports that already).
fn tracing_like(msg: &str) {
    if std::env::var_os("TUNMETER_LAB_DEBUG").is_some() {
        eprintln!("tunmeter-lab: {msg}");
    }
}

fn tcp_server(
    ns: &str,
    name: &'static str,
    port: u16,
    handler: TcpHandler,
    stop: &Arc<StopSignal>,
    conns: &Arc<Mutex<Vec<JoinHandle<()>>>>,
    ready: mpsc::Sender<Result<()>>,
) {
    let (l4, l6): (TcpListener, TcpListener) = match dual_stack(ns, tcp_listener, port) {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(e.context(format!("{name} tcp server"))));
            return;
        }
    };
    let fds = [stop.fd(), l4.as_raw_fd(), l6.as_raw_fd()];
    while !stop.is_set() {
        let Ok(r) = poll_readable(&fds, Duration::from_millis(200)) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        for (i, l) in [(1, &l4), (2, &l6)] {
            if !r[i] {
                continue;
            }
            // Bounded: at most 64 accepts per wakeup.
            for _ in 0..64 {
                let Ok((s, _)) = l.accept() else { break };
                let stop = stop.clone();
                if let Ok(h) = std::thread::Builder::new().name(format!("{name}-tcp-conn")).spawn(move || {
                    if let Err(e) = handler(s, &stop) {
                        tracing_like(&format!("{name} tcp: {e:#}"));
                    }
                }) {
                    let mut g = conns.lock().unwrap_or_else(|p| p.into_inner());
                    // Reap finished connection threads so the list stays small.
                    let (done, live): (Vec<_>, Vec<_>) = g.drain(..).partition(|h| h.is_finished());
                    for d in done {
                        let _ = d.join();
                    }
                    *g = live;
                    g.push(h);
                }
            }
        }
    }
}

fn udp_server(
    ns: &str,
    name: &'static str,
    port: u16,
    mut handler: impl FnMut(&UdpSocket, &[u8], SocketAddr),
    stop: &StopSignal,
    ready: mpsc::Sender<Result<()>>,
) {
    let (u4, u6): (UdpSocket, UdpSocket) = match dual_stack(ns, udp_socket, port) {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(e.context(format!("{name} udp server"))));
            return;
        }
    };
    let fds = [stop.fd(), u4.as_raw_fd(), u6.as_raw_fd()];
    let mut buf = vec![0u8; 65536];
    while !stop.is_set() {
        let Ok(r) = poll_readable(&fds, Duration::from_millis(200)) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        for (i, u) in [(1, &u4), (2, &u6)] {
            if !r[i] {
                continue;
            }
            for _ in 0..256 {
                let Ok((n, from)) = u.recv_from(&mut buf) else { break };
                handler(u, &buf[..n], from);
            }
        }
    }
}
