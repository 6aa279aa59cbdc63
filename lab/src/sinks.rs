//! Server-side echo sinks (TCP 5001, UDP 5002), running on threads that live in the server
//! namespace. All of them stop (and are joined) when [`Sinks`] is stopped or dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::servers::Servers;
use crate::sys::StopSignal;
use crate::traffic::{IO_TIMEOUT, TCP_PORT, UDP_PORT};

/// The echo sinks of one namespace: TCP echoes until EOF, UDP sends each datagram back.
pub(crate) struct Sinks(Servers);

impl Sinks {
    pub(crate) fn start(ns: &str) -> Result<Sinks> {
        let echo = |u: &UdpSocket, d: &[u8], from: SocketAddr| {
            let _ = u.send_to(d, from);
        };
        Ok(Sinks(Servers::start(ns, "sink", (TCP_PORT, tcp_echo), (UDP_PORT, echo))?))
    }

    pub(crate) fn stop(&mut self) {
        self.0.stop();
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
