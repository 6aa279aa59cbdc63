//! Asymmetric transfers of exact sizes: a server (TCP 5003, UDP 5004, on threads inside a
//! namespace) and client functions that move a given number of payload bytes in each direction.
//!
//! Unlike the echo sinks (which send back what they receive), the upload and download amounts
//! differ, so a counter that swaps directions is caught.
//!
//! * TCP: the client sends exactly `upload` bytes (>= 16: the first 16 are the header, the
//!   upload and download sizes as big-endian u64), then shuts down its write side; the server
//!   reads them all, then sends exactly `download` bytes and closes.
//! * UDP: the client sends `count` datagrams of `up_size` bytes (>= 8: big-endian u32 reply size,
//!   u32 sequence number); the server answers each with one datagram of the requested size
//!   (>= 4, starting with the sequence number). The client waits for every reply (no retries).
//!
//! Every socket operation times out after [`IO_TIMEOUT`]; loops are bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::in_netns;
use crate::servers::Servers;
use crate::sys::StopSignal;
pub use crate::traffic::IO_TIMEOUT;

/// TCP port of the transfer server.
pub const TCP_PORT: u16 = 5003;
/// UDP port of the transfer server.
pub const UDP_PORT: u16 = 5004;
/// TCP header length (counted in the upload).
pub const TCP_HEADER: usize = 16;
/// Smallest UDP upload datagram.
pub const UDP_MIN_UP: usize = 8;
/// Smallest UDP reply datagram.
pub const UDP_MIN_DOWN: usize = 4;
/// Largest UDP datagram either way.
pub const UDP_MAX: usize = 65000;
/// Largest TCP transfer either way (1 GiB).
pub const TCP_MAX: u64 = 1 << 30;

fn fill(buf: &mut [u8], offset: u64) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = ((offset + k as u64).wrapping_mul(7) >> 2) as u8;
    }
}

/// The transfer server threads (stopped and joined on [`TransferServer::stop`] or drop).
pub struct TransferServer(Servers);

impl std::fmt::Debug for TransferServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferServer").finish_non_exhaustive()
    }
}

impl TransferServer {
    /// Listen on TCP 5003 and UDP 5004 (IPv4 and IPv6, all addresses) inside `ns`.
    pub fn start(ns: &str) -> Result<TransferServer> {
        let mut out = vec![0u8; UDP_MAX];
        let reply = move |u: &UdpSocket, d: &[u8], from: SocketAddr| {
            if d.len() < UDP_MIN_UP {
                return;
            }
            let size = u32::from_be_bytes(d[..4].try_into().expect("4 bytes")) as usize;
            if !(UDP_MIN_DOWN..=UDP_MAX).contains(&size) {
                return;
            }
            fill(&mut out[..size], 0);
            out[..4].copy_from_slice(&d[4..8]);
            let _ = u.send_to(&out[..size], from);
        };
        Ok(TransferServer(Servers::start(ns, "xfer", (TCP_PORT, serve_tcp), (UDP_PORT, reply))?))
    }

    /// Stop and join every thread.
    pub fn stop(&mut self) {
        self.0.stop();
    }
}

/// Read with a short timeout so `stop` is noticed; fails after [`IO_TIMEOUT`] without progress.
fn read_some(s: &mut TcpStream, buf: &mut [u8], stop: &StopSignal, last: &mut Instant) -> Result<usize> {
    loop {
        if stop.is_set() {
            bail!("stopped");
        }
        match s.read(buf) {
            Ok(n) => {
                *last = Instant::now();
                return Ok(n);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                if last.elapsed() > IO_TIMEOUT {
                    bail!("idle timeout");
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn serve_tcp(mut s: TcpStream, stop: &StopSignal) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut last = Instant::now();
    let mut header = [0u8; TCP_HEADER];
    let mut got = 0;
    while got < TCP_HEADER {
        let n = read_some(&mut s, &mut header[got..], stop, &mut last)?;
        if n == 0 {
            bail!("eof in header");
        }
        got += n;
    }
    let upload = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
    let download = u64::from_be_bytes(header[8..].try_into().expect("8 bytes"));
    if upload < TCP_HEADER as u64 || upload > TCP_MAX || download > TCP_MAX {
        bail!("bad header: upload {upload}, download {download}");
    }
    let mut left = upload - TCP_HEADER as u64;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = read_some(&mut s, &mut buf[..want], stop, &mut last)?;
        if n == 0 {
            bail!("eof with {left} upload bytes missing");
        }
        left -= n as u64;
    }
    let mut sent = 0u64;
    while sent < download {
        if stop.is_set() {
            bail!("stopped");
        }
        let n = ((download - sent) as usize).min(buf.len());
        fill(&mut buf[..n], sent);
        s.write_all(&buf[..n]).context("write")?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    // Wait for the client's close (EOF), so our FIN is not followed by a RST.
    let _ = read_some(&mut s, &mut buf, stop, &mut last);
    Ok(())
}

/// From inside `ns`, connect to `dst`:5003, send exactly `upload` TCP payload bytes (>= 16) and
/// receive exactly `download` bytes. Returns when the server has closed the connection.
pub fn tcp_transfer(ns: &str, dst: IpAddr, upload: u64, download: u64) -> Result<()> {
    if upload < TCP_HEADER as u64 || upload > TCP_MAX || download > TCP_MAX {
        bail!("tcp_transfer: upload must be {TCP_HEADER}..={TCP_MAX} bytes, download 0..={TCP_MAX}");
    }
    let ns_owned = ns.to_string();
    in_netns(ns, move || {
        let addr = SocketAddr::new(dst, TCP_PORT);
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("tcp connect {addr} from {ns_owned}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut buf = vec![0u8; 64 * 1024];
        buf[..8].copy_from_slice(&upload.to_be_bytes());
        buf[8..16].copy_from_slice(&download.to_be_bytes());
        let mut sent = 0u64;
        let mut first = true;
        while sent < upload {
            let n = ((upload - sent) as usize).min(buf.len());
            let start = if first { TCP_HEADER } else { 0 };
            fill(&mut buf[start..n], sent);
            first = false;
            s.write_all(&buf[..n]).with_context(|| format!("tcp write after {sent} bytes"))?;
            sent += n as u64;
        }
        s.shutdown(Shutdown::Write).context("tcp shutdown")?;
        let mut got = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    got += n as u64;
                    if got > download {
                        bail!("received {got} bytes, more than the {download} requested");
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow!(e).context(format!("tcp read after {got} of {download} bytes"))),
            }
        }
        if got != download {
            bail!("received {got} of {download} bytes");
        }
        Ok(())
    })
    .with_context(|| format!("tcp_transfer {ns} -> {dst} (up {upload} B, down {download} B)"))
}

/// From inside `ns`, send `count` datagrams of `up_size` bytes to `dst`:5004, each answered by
/// one datagram of `down_size` bytes (waiting for every reply: a loss is an error).
pub fn udp_transfer(ns: &str, dst: IpAddr, count: usize, up_size: usize, down_size: usize) -> Result<()> {
    if !(UDP_MIN_UP..=UDP_MAX).contains(&up_size) || !(UDP_MIN_DOWN..=UDP_MAX).contains(&down_size) {
        bail!("udp_transfer: up_size must be {UDP_MIN_UP}..={UDP_MAX}, down_size {UDP_MIN_DOWN}..={UDP_MAX}");
    }
    in_netns(ns, move || {
        let s = crate::traffic::udp_connected(SocketAddr::new(dst, UDP_PORT))?;
        let mut out = vec![0u8; up_size];
        fill(&mut out, 1);
        let mut inp = vec![0u8; down_size + 1];
        for seq in 0..count as u32 {
            out[..4].copy_from_slice(&(down_size as u32).to_be_bytes());
            out[4..8].copy_from_slice(&seq.to_be_bytes());
            s.send(&out).with_context(|| format!("udp send #{seq}"))?;
            let n = s.recv(&mut inp).with_context(|| format!("udp reply #{seq} of {count}"))?;
            if n != down_size || inp[..4] != seq.to_be_bytes() {
                bail!("udp reply #{seq}: {n} bytes (want {down_size}) or wrong sequence number");
            }
        }
        Ok(())
    })
    .with_context(|| format!("udp_transfer {ns} -> {dst} ({count} x up {up_size} B / down {down_size} B)"))
}
