//! The packet relay between the client TUN devices and the server TUN device
//! (an OpenVPN server without the crypto and the UDP transport).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::sys::{StopSignal, poll_readable, read_nb, write_packet};

/// Relay counters, cumulative over the lifetime of the lab (they survive
/// [`crate::Lab::recreate_server_tun`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Packets read from a client tun and written to the server tun.
    pub to_server_packets: u64,
    pub to_server_bytes: u64,
    /// Packets read from the server tun and written to the matching client tun.
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    /// Packets read from the server tun whose destination is no client (multicast, MLD,
    /// unknown addresses, garbage), or that could not be written.
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

#[derive(Default)]
pub(crate) struct AtomicStats {
    to_server_packets: AtomicU64,
    to_server_bytes: AtomicU64,
    to_client_packets: AtomicU64,
    to_client_bytes: AtomicU64,
    dropped_packets: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl AtomicStats {
    pub(crate) fn snapshot(&self) -> RelayStats {
        RelayStats {
            to_server_packets: self.to_server_packets.load(Ordering::Relaxed),
            to_server_bytes: self.to_server_bytes.load(Ordering::Relaxed),
            to_client_packets: self.to_client_packets.load(Ordering::Relaxed),
            to_client_bytes: self.to_client_bytes.load(Ordering::Relaxed),
            dropped_packets: self.dropped_packets.load(Ordering::Relaxed),
            dropped_bytes: self.dropped_bytes.load(Ordering::Relaxed),
        }
    }

    fn drop_pkt(&self, len: usize) {
        self.dropped_packets.fetch_add(1, Ordering::Relaxed);
        self.dropped_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }
}

/// The fds the relay thread works on; handed back when the thread stops.
pub(crate) struct RelayFds {
    pub(crate) server: OwnedFd,
    pub(crate) clients: Vec<(OwnedFd, Ipv4Addr, Ipv6Addr)>,
}

pub(crate) struct Relay {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<RelayFds>>,
}

/// Biggest packet a TUN read can return (no GSO on our tuns, but be generous).
const BUF_SIZE: usize = 65536;
/// Reads per fd per poll round, so one busy fd cannot starve the others.
const BURST: usize = 64;

impl Relay {
    pub(crate) fn start(fds: RelayFds, stats: Arc<AtomicStats>) -> Result<Relay> {
        let stop = Arc::new(StopSignal::new()?);
        let stop2 = stop.clone();
        let thread =
            std::thread::Builder::new().name("tun-relay".into()).spawn(move || relay_loop(fds, &stop2, &stats))?;
        Ok(Relay { stop, thread: Some(thread) })
    }

    /// Stop the thread and get the fds back (`Err` if the thread panicked; fds are then closed).
    pub(crate) fn stop(mut self) -> Result<RelayFds> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<RelayFds> {
        self.stop.trigger();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("relay thread panicked")),
            None => Err(anyhow!("relay already stopped")),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_inner();
        }
    }
}

fn dst_of(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 if pkt.len() >= 20 => {
            let b: [u8; 4] = pkt[16..20].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 if pkt.len() >= 40 => {
            let b: [u8; 16] = pkt[24..40].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Read up to [`BURST`] packets from `fd`, handing each to `on_packet`. Returns `false` if the
/// fd failed with something other than EAGAIN.
fn drain(fd: RawFd, buf: &mut [u8], mut on_packet: impl FnMut(&[u8])) -> bool {
    for _ in 0..BURST {
        match read_nb(fd, buf) {
            Ok(Some(n)) if n > 0 => on_packet(&buf[..n]),
            Ok(_) => return true,
            Err(_) => return false,
        }
    }
    true
}

fn relay_loop(fds: RelayFds, stop: &StopSignal, stats: &AtomicStats) -> RelayFds {
    let mut routes: HashMap<IpAddr, RawFd> = HashMap::new();
    for (fd, v4, v6) in &fds.clients {
        routes.insert(IpAddr::V4(*v4), fd.as_raw_fd());
        routes.insert(IpAddr::V6(*v6), fd.as_raw_fd());
    }
    let server = fds.server.as_raw_fd();
    // Index 0: stop eventfd, 1: server tun, 2..: client tuns.
    let mut poll_fds = vec![stop.fd(), server];
    poll_fds.extend(fds.clients.iter().map(|(fd, _, _)| fd.as_raw_fd()));
    let mut buf = vec![0u8; BUF_SIZE];

    while !stop.is_set() {
        let ready = match poll_readable(&poll_fds, Duration::from_millis(200)) {
            Ok(r) => r,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if ready[0] || stop.is_set() {
            break;
        }
        if ready[1]
            && !drain(server, &mut buf, |pkt| {
                let n = pkt.len();
                match dst_of(pkt).and_then(|d| routes.get(&d)) {
                    Some(&cfd) => match write_packet(cfd, pkt) {
                        Ok(()) => {
                            stats.to_client_packets.fetch_add(1, Ordering::Relaxed);
                            stats.to_client_bytes.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => stats.drop_pkt(n),
                    },
                    None => stats.drop_pkt(n),
                }
            })
        {
            poll_fds[1] = -1;
        }
        for i in 2..poll_fds.len() {
            if ready[i]
                && !drain(poll_fds[i], &mut buf, |pkt| match write_packet(server, pkt) {
                    Ok(()) => {
                        stats.to_server_packets.fetch_add(1, Ordering::Relaxed);
                        stats.to_server_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
                    }
                    Err(_) => stats.drop_pkt(pkt.len()),
                })
            {
                // The device is gone (e.g. its namespace was deleted under us): a negative fd
                // makes poll(2) ignore it instead of reporting an error forever.
                poll_fds[i] = -1;
            }
        }
    }
    fds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_destinations() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[16..20].copy_from_slice(&[10, 8, 0, 3]);
        assert_eq!(dst_of(&v4), Some("10.8.0.3".parse().unwrap()));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[24..40].copy_from_slice(&"fd00:8::4".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(dst_of(&v6), Some("fd00:8::4".parse().unwrap()));
        assert_eq!(dst_of(&v6[..39]), None);
        assert_eq!(dst_of(&[]), None);
        assert_eq!(dst_of(&[0x10; 60]), None);
    }
}
