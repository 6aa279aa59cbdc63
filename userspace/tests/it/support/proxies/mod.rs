//! Servers for the steering tests, each running inside one lab namespace: Debian's proxies,
//! a web server, a UDP echo and a transparent proxy that reports original destinations.
//!
//! The servers:
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
//!
//! This file: the shared timeouts, temp dirs and thread handling, and the re-exports; one file
//! per kind of server (`daemons`, `web`, `transparent`) and the clients (`client`).

mod client;
mod daemons;
mod transparent;
mod web;

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
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
use tunmeter_lab::{in_netns, sockets};

pub use client::{tcp_request, udp_request};
pub use daemons::Proxy;
pub use transparent::TransparentProxy;
pub use web::{BIG_LEN, SMALL_BODY, UdpEcho, WebServer, big_sha256, sha256_file};

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
