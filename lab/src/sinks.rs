//! Server-side echo sinks (TCP 5001, UDP 5002), running on threads that live in the server
//! namespace. All of them stop (and are joined) when [`Sinks`] is stopped or dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::sockets::{dual_stack, tcp_listener, udp_socket};
use crate::sys::{StopSignal, poll_readable};
use crate::traffic::{IO_TIMEOUT, TCP_PORT, UDP_PORT};

pub(crate) struct Sinks {
    stop: Arc<StopSignal>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Sinks {
    pub(crate) fn start(ns: &str) -> Result<Sinks> {
        let stop = Arc::new(StopSignal::new()?);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut sinks = Sinks { stop: stop.clone(), threads: Vec::new(), conns: conns.clone() };
        let (tx, rx) = mpsc::channel::<Result<()>>();
        {
            let (ns, stop, tx) = (ns.to_string(), stop.clone(), tx.clone());
            sinks.threads.push(
                std::thread::Builder::new().name("sink-tcp".into()).spawn(move || tcp_sink(&ns, &stop, &conns, tx))?,
            );
        }
        {
            let (ns, stop) = (ns.to_string(), stop.clone());
            sinks
                .threads
                .push(std::thread::Builder::new().name("sink-udp".into()).spawn(move || udp_sink(&ns, &stop, tx))?);
        }
        for _ in 0..2 {
            rx.recv_timeout(IO_TIMEOUT).map_err(|_| anyhow!("sink thread did not start in time"))??;
        }
        Ok(sinks)
    }

    pub(crate) fn stop(&mut self) {
        self.stop.trigger();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let conns: Vec<_> = match self.conns.lock() {
            Ok(mut g) => g.drain(..).collect(),
            Err(p) => p.into_inner().drain(..).collect(),
        };
        for t in conns {
            let _ = t.join();
        }
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tcp_sink(
    ns: &str,
    stop: &Arc<StopSignal>,
    conns: &Arc<Mutex<Vec<JoinHandle<()>>>>,
    ready: mpsc::Sender<Result<()>>,
) {
    let (l4, l6): (TcpListener, TcpListener) = match dual_stack(ns, tcp_listener, TCP_PORT) {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(e.context("tcp sink")));
            return;
        }
    };
    let fds = [stop.fd(), l4.as_raw_fd(), l6.as_raw_fd()];
    while !stop.is_set() {
        let Ok(ready) = poll_readable(&fds, Duration::from_millis(200)) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        for (i, l) in [(1, &l4), (2, &l6)] {
            if !ready[i] {
                continue;
            }
            // Bounded: at most 64 accepts per wakeup.
            for _ in 0..64 {
                match l.accept() {
                    Ok((s, _)) => {
                        let stop = stop.clone();
                        if let Ok(h) = std::thread::Builder::new().name("sink-tcp-conn".into()).spawn(move || {
                            let _ = tcp_echo(s, &stop);
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
                    Err(_) => break,
                }
            }
        }
    }
}

/// Echo until EOF, then close. Gives up after [`IO_TIMEOUT`] without progress or on stop.
fn tcp_echo(mut s: TcpStream, stop: &StopSignal) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last = Instant::now();
    loop {
        if stop.is_set() {
            return Ok(());
        }
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                s.write_all(&buf[..n]).context("echo write")?;
                last = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if last.elapsed() > IO_TIMEOUT {
                    return Err(anyhow!("tcp echo: idle timeout"));
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn udp_sink(ns: &str, stop: &StopSignal, ready: mpsc::Sender<Result<()>>) {
    let (u4, u6): (UdpSocket, UdpSocket) = match dual_stack(ns, udp_socket, UDP_PORT) {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(e.context("udp sink")));
            return;
        }
    };
    let fds = [stop.fd(), u4.as_raw_fd(), u6.as_raw_fd()];
    let mut buf = vec![0u8; 65536];
    while !stop.is_set() {
        let Ok(ready) = poll_readable(&fds, Duration::from_millis(200)) else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        for (i, u) in [(1, &u4), (2, &u6)] {
            if !ready[i] {
                continue;
            }
            for _ in 0..256 {
                match u.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        let _ = u.send_to(&buf[..n], from);
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
