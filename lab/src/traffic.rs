//! Bounded test traffic between the clients and the server's echo sinks: TCP, UDP and ping,
//! IPv4 and IPv6, with the byte counts each side expects.
//!
//! Every socket operation has a timeout of [`IO_TIMEOUT`]; every loop is bounded.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::{Client, Lab, in_netns, netns_exec};

/// TCP echo port of the server sink.
pub const TCP_PORT: u16 = 5001;
/// UDP echo port of the server sink.
pub const UDP_PORT: u16 = 5002;
/// Timeout of every single socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Deterministic payload byte `i` of a stream/datagram tagged `seed`.
fn pattern(seed: u64, i: usize) -> u8 {
    (i as u64).wrapping_mul(31).wrapping_add(seed.wrapping_mul(131)).wrapping_add(7) as u8
}

/// Connect from inside `ns` to `dst`:5001, send `bytes` bytes, read the echo until EOF (after
/// shutting down our write side) and verify it.
pub fn tcp_exchange(ns: &str, dst: IpAddr, bytes: usize) -> Result<()> {
    let ns_owned = ns.to_string();
    in_netns(ns, move || {
        let addr = SocketAddr::new(dst, TCP_PORT);
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("tcp connect {addr} from {ns_owned}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let seed = bytes as u64;
        // The writer runs concurrently, otherwise both sides could block on full buffers.
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> Result<()> {
            let mut buf = vec![0u8; 16 * 1024];
            let mut sent = 0;
            while sent < bytes {
                let n = (bytes - sent).min(buf.len());
                for (k, b) in buf[..n].iter_mut().enumerate() {
                    *b = pattern(seed, sent + k);
                }
                w.write_all(&buf[..n]).context("tcp write")?;
                sent += n;
            }
            w.shutdown(Shutdown::Write).context("tcp shutdown")?;
            Ok(())
        });
        let mut r = s;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        let read_res: Result<()> = loop {
            match r.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if got + n > bytes {
                        break Err(anyhow!("echo longer than sent ({} > {bytes})", got + n));
                    }
                    if let Some(k) = (0..n).find(|&k| buf[k] != pattern(seed, got + k)) {
                        break Err(anyhow!("echo mismatch at byte {}", got + k));
                    }
                    got += n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(anyhow!(e).context(format!("tcp read after {got} bytes"))),
            }
        };
        if read_res.is_err() {
            // Unblock the writer quickly.
            let _ = r.shutdown(Shutdown::Both);
        }
        let write_res = writer.join().map_err(|_| anyhow!("tcp writer panicked"))?;
        read_res?;
        write_res?;
        if got != bytes {
            bail!("echo too short: {got} of {bytes} bytes");
        }
        Ok(())
    })
    .with_context(|| format!("tcp_exchange {ns} -> {dst} ({bytes} B)"))
}

/// A UDP socket on an ephemeral port connected to `dst`, with [`IO_TIMEOUT`] both ways. Call
/// from inside the namespace.
pub(crate) fn udp_connected(dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(local)?;
    s.connect(dst)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Send `count` datagrams of `size` bytes (>= 1) to `dst`:5002 from inside `ns`, waiting for each
/// echo (no retries: a missing reply within [`IO_TIMEOUT`] is an error).
pub fn udp_exchange(ns: &str, dst: IpAddr, count: usize, size: usize) -> Result<()> {
    if size == 0 || size > 65000 {
        bail!("udp size must be 1..=65000");
    }
    in_netns(ns, move || {
        let s = udp_connected(SocketAddr::new(dst, UDP_PORT))?;
        let mut out = vec![0u8; size];
        let mut inp = vec![0u8; size + 1];
        for seq in 0..count {
            for (k, b) in out.iter_mut().enumerate() {
                *b = pattern(seq as u64 + 1000, k);
            }
            let tag = (seq as u32).to_be_bytes();
            let t = tag.len().min(size);
            out[..t].copy_from_slice(&tag[..t]);
            s.send(&out).with_context(|| format!("udp send #{seq}"))?;
            let n = s.recv(&mut inp).with_context(|| format!("udp reply #{seq} of {count}"))?;
            if inp[..n] != out[..] {
                bail!("udp echo #{seq} differs ({n} bytes back, {size} sent)");
            }
        }
        Ok(())
    })
    .with_context(|| format!("udp_exchange {ns} -> {dst} ({count} x {size} B)"))
}

/// `ip netns exec ns ping -c count -i 0.01 -W 2 dst`; succeeds if every request was sent and
/// at least one reply came. (Pings make ICMP traffic for the counters, which the oracle checks
/// whatever happened to it; on a loaded 2-core machine an occasional reply comes too late.)
pub fn ping(ns: &str, dst: IpAddr, count: u32) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let c = count.to_string();
    let d = dst.to_string();
    // Bounded without -w: count * 10 ms of sending plus at most 2 s waiting for the last reply.
    let out = netns_exec(ns, &["ping", "-n", "-q", "-c", &c, "-i", "0.01", "-W", "2", &d])
        .with_context(|| format!("ping {ns} -> {dst}"))?;
    let (sent, received) =
        parse_ping_summary(&out).ok_or_else(|| anyhow!("ping {ns} -> {dst}: cannot parse output: {out}"))?;
    if sent != count || received == 0 {
        bail!("ping {ns} -> {dst}: {sent} sent, {received} of {count} replies");
    }
    Ok(())
}

/// From "N packets transmitted, M received, ..." return (N, M).
fn parse_ping_summary(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut parts = line.split(',');
    let num = |p: Option<&str>| p?.split_whitespace().next()?.parse().ok();
    Some((num(parts.next())?, num(parts.next())?))
}

/// What the traffic generators talk to (a copy of a lab's addresses, so it can move to a thread).
#[derive(Debug, Clone)]
pub struct Targets {
    pub tun_clients: Vec<Client>,
    pub eth_clients: Vec<Client>,
    pub server_tun: (Ipv4Addr, Ipv6Addr),
    pub server_eth: (Ipv4Addr, Ipv6Addr),
}

impl Targets {
    /// Every client with its index over all clients (tun first) and the server addresses it
    /// talks to (tun clients: the server tun; Ethernet clients: the server eth0).
    pub fn pairs(&self) -> Vec<(usize, Client, [IpAddr; 2])> {
        let tun = self.tun_clients.iter().map(|c| (c.clone(), [self.server_tun.0.into(), self.server_tun.1.into()]));
        let eth = self.eth_clients.iter().map(|c| (c.clone(), [self.server_eth.0.into(), self.server_eth.1.into()]));
        tun.chain(eth).enumerate().map(|(k, (c, d))| (k, c, d)).collect()
    }
}

/// Extra TCP bytes for the client with overall index `k`, so clients' volumes differ.
pub fn client_extra_bytes(k: usize) -> usize {
    1000 * (k + 1) + 17 * k
}

/// Size of one round's traffic for each client.
#[derive(Debug, Clone, Copy)]
pub struct RoundSpec {
    /// TCP bytes per exchange = `tcp_base + client_extra_bytes(k)`.
    pub tcp_base: usize,
    pub udp_count: usize,
    /// UDP datagram size = `udp_size + 8 * k`.
    pub udp_size: usize,
    pub pings: u32,
}

impl RoundSpec {
    /// The spec [`mixed_round`] uses for a scale.
    pub fn scaled(scale: usize) -> RoundSpec {
        RoundSpec { tcp_base: scale * 10 * 1024, udp_count: 5, udp_size: 200, pings: 3 }
    }
}

/// Run one round for all clients in parallel; returns all errors joined into one.
pub fn round_with(targets: &Targets, spec: RoundSpec) -> Result<()> {
    let handles: Vec<(String, JoinHandle<Result<()>>)> = targets
        .pairs()
        .into_iter()
        .map(|(k, c, dsts)| {
            let ns = c.ns.clone();
            let h = std::thread::spawn(move || -> Result<()> {
                for dst in dsts {
                    tcp_exchange(&c.ns, dst, spec.tcp_base + client_extra_bytes(k))?;
                    udp_exchange(&c.ns, dst, spec.udp_count, spec.udp_size + 8 * k)?;
                    ping(&c.ns, dst, spec.pings)?;
                }
                Ok(())
            });
            (ns, h)
        })
        .collect();
    let mut errors = Vec::new();
    for (ns, h) in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push(format!("{ns}: traffic thread panicked")),
        }
    }
    if errors.is_empty() { Ok(()) } else { Err(anyhow!("{}", errors.join("\n"))) }
}

/// For every client (tun and eth), v4 and v6: a TCP exchange of `scale * 10 KiB` plus a
/// client-specific amount ([`client_extra_bytes`]), a UDP exchange (5 datagrams of
/// `200 + 8*k` bytes) and 3 pings. Clients run in parallel threads.
pub fn mixed_round(lab: &Lab, scale: usize) -> Result<()> {
    round_with(&lab.targets(), RoundSpec::scaled(scale))
}

/// Counters of a [`Background`] generator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackgroundStats {
    pub rounds: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Small traffic rounds on a thread until stopped (also stopped and joined on drop).
pub struct Background {
    stop: Arc<crate::sys::StopSignal>,
    rounds: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

/// Start background traffic: small rounds (4 KiB TCP + per-client extra, 3 UDP, 2 pings per
/// client and family) every `interval` until [`Background::stop`].
pub fn background(lab: &Lab, interval: Duration) -> Result<Background> {
    let spec = RoundSpec { tcp_base: 4 * 1024, udp_count: 3, udp_size: 100, pings: 2 };
    background_with(lab.targets(), spec, interval)
}

/// [`background`] with an explicit round spec.
pub fn background_with(targets: Targets, spec: RoundSpec, interval: Duration) -> Result<Background> {
    background_fn(move || round_with(&targets, spec), interval)
}

/// Run `round` on a thread every `interval` until [`Background::stop`], counting successful and
/// failed rounds. `round` must itself be bounded in time (it is never interrupted).
pub fn background_fn(round: impl Fn() -> Result<()> + Send + 'static, interval: Duration) -> Result<Background> {
    let stop = Arc::new(crate::sys::StopSignal::new()?);
    let rounds = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let last_error = Arc::new(Mutex::new(None));
    let thread = {
        let (stop, rounds, errors, last_error) = (stop.clone(), rounds.clone(), errors.clone(), last_error.clone());
        std::thread::Builder::new().name("lab-traffic".into()).spawn(move || {
            while !stop.is_set() {
                match round() {
                    Ok(()) => {
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::SeqCst);
                        *last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
                    }
                }
                // Sleep `interval`, waking early on stop.
                let until = Instant::now() + interval;
                while !stop.is_set() && Instant::now() < until {
                    let left = until.saturating_duration_since(Instant::now());
                    let _ = crate::sys::poll_readable(&[stop.fd()], left.min(Duration::from_millis(100)));
                }
            }
        })?
    };
    Ok(Background { stop, rounds, errors, last_error, thread: Some(thread) })
}

impl Background {
    /// Successful rounds so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Failed rounds so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::SeqCst)
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> BackgroundStats {
        BackgroundStats {
            rounds: self.rounds(),
            errors: self.errors(),
            last_error: self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Stop after the current round (bounded by the I/O timeouts) and join the thread.
    pub fn stop(mut self) -> BackgroundStats {
        self.stop_inner();
        self.stats()
    }

    fn stop_inner(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out = "PING 10.8.0.1 (10.8.0.1) 56(84) bytes of data.\n\n--- 10.8.0.1 ping statistics ---\n3 packets transmitted, 2 received, 33.3333% packet loss, time 21ms\n";
        assert_eq!(parse_ping_summary(out), Some((3, 2)));
        assert_eq!(parse_ping_summary("nothing"), None);
    }
}
