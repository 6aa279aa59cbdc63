//! Checks before a rule goes into the maps: a forward rule's public port must not be one this
//! host listens on (`/proc/net/{tcp,tcp6,udp,udp6}` of the namespace the caller runs in), its
//! device must be a client (the subnets come from the config, or from the pinned subnet map for
//! the CLI), and a redirect source must not be everything. `force` skips them.

use std::{
    fmt, fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{LpmTrie, Map, MapData};
use ipnet::IpNet;
use tunmeter_common::{ClientKey, MAP_SUBNETS, SubnetKey, SubnetValue};

use super::table::{SteerError, map_err};
use crate::types::{ForwardSpec, Proto, RedirectSpec};

/// A socket of this host bound to a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub proto: Proto,
    pub local: SocketAddr,
    pub inode: u64,
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.proto == Proto::Tcp { "listening on" } else { "bound to" };
        write!(f, "{verb} {}", self.local)?;
        match owner(self.inode) {
            Some((pid, comm)) => write!(f, " by {comm} (pid {pid})"),
            None => Ok(()),
        }
    }
}

/// Refuse a forward rule that is not forced if its device is not a client (loopback, outside
/// `subnets`) or the host itself serves its public port.
pub fn check_forward(spec: &ForwardSpec, subnets: Option<&[IpNet]>, force: bool) -> Result<(), SteerError> {
    spec.check_device(subnets, force)?;
    if force {
        return Ok(());
    }
    match listeners(spec.proto, spec.public_port, spec.public_address.map(IpAddr::V4)).first() {
        Some(l) => Err(SteerError::PortInUse { proto: spec.proto, port: spec.public_port, listener: l.to_string() }),
        None => Ok(()),
    }
}

/// Refuse a redirect rule of every address unless forced.
pub fn check_redirect(spec: &RedirectSpec, force: bool) -> Result<(), SteerError> {
    Ok(spec.check_source(force)?)
}

/// The sockets of this network namespace that would receive `proto` packets to `port` arriving
/// from outside: TCP listeners and bound UDP sockets, on the wildcard address, on `addr` (if
/// given) or on any address (if not); loopback-bound ones cannot be reached from outside.
pub fn listeners(proto: Proto, port: u16, addr: Option<IpAddr>) -> Vec<Listener> {
    let (files, state) = match proto {
        Proto::Tcp => (["/proc/net/tcp", "/proc/net/tcp6"], "0A"),
        Proto::Udp => (["/proc/net/udp", "/proc/net/udp6"], "07"),
    };
    let mut out = Vec::new();
    for file in files {
        let Ok(text) = fs::read_to_string(file) else { continue };
        out.extend(parse_sockets(&text, proto, state).into_iter().filter(|l| {
            let ip = l.local.ip();
            l.local.port() == port
                && !ip.is_loopback()
                && !ipv4_mapped(ip).is_some_and(|v4| v4.is_loopback())
                && (ip.is_unspecified() || addr.is_none_or(|a| a == ip || ipv4_mapped(ip) == Some(a)))
        }));
    }
    out
}

fn ipv4_mapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}

/// The sockets of one `/proc/net/{tcp,udp}[6]` table in state `state` (hex, as printed).
fn parse_sockets(text: &str, proto: Proto, state: &str) -> Vec<Listener> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != state {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            Some(Listener { proto, local: SocketAddr::new(parse_addr(addr)?, port), inode: f[9].parse().ok()? })
        })
        .collect()
}

/// An address as the kernel prints it there: 32-bit words in host byte order, in hex.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| hex.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok());
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?.to_ne_bytes()))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The process holding socket `inode`, for the error message (best effort, bounded).
fn owner(inode: u64) -> Option<(u32, String)> {
    let target = format!("socket:[{inode}]");
    for proc in fs::read_dir("/proc").ok()?.filter_map(Result::ok).take(100_000) {
        let Some(pid) = proc.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = fs::read_dir(proc.path().join("fd")) else { continue };
        if fds
            .filter_map(Result::ok)
            .take(100_000)
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()))
        {
            let comm = fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

/// The client subnets in the pinned subnet map (all interfaces): what the CLI, which has no
/// config, checks device addresses against.
pub fn pinned_subnets(pin_dir: &Path) -> Result<Vec<IpNet>, SteerError> {
    let path = pin_dir.join(MAP_SUBNETS);
    if !path.exists() {
        return Err(SteerError::NoMaps(pin_dir.to_owned()));
    }
    let data = MapData::from_pin(&path).map_err(map_err(MAP_SUBNETS))?;
    let trie: LpmTrie<MapData, SubnetKey, SubnetValue> =
        LpmTrie::try_from(Map::LpmTrie(data)).map_err(map_err(MAP_SUBNETS))?;
    let mut nets: Vec<IpNet> = trie
        .keys()
        .filter_map(Result::ok)
        .filter_map(|k| {
            let bits = k.prefix_len().checked_sub(32)?;
            let addr = k.data().addr;
            match ClientKey::v6(addr).as_v4() {
                Some(v4) if bits >= 96 => IpNet::new(IpAddr::V4(Ipv4Addr::from(v4)), (bits - 96) as u8).ok(),
                _ => IpNet::new(IpAddr::V6(Ipv6Addr::from(addr)), bits.min(128) as u8).ok(),
            }
        })
        .collect();
    nets.sort();
    nets.dedup();
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tables_parse() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0 100 0 0 10 0\n\
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1235 1 0 100 0 0 10 0\n\
   2: 0100000A:9C40 0200000A:0016 01 00000000:00000000 00:00000000 00000000     0        0 1236 1 0 100 0 0 10 0\n";
        let l = parse_sockets(tcp, Proto::Tcp, "0A");
        assert_eq!(l.len(), 2, "{l:?}");
        if cfg!(target_endian = "little") {
            assert_eq!(l[0].local, "0.0.0.0:22".parse().unwrap());
            assert_eq!(l[1].local, "127.0.0.1:3306".parse().unwrap());
        }
        assert_eq!(l[0].inode, 1234);
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1\n";
        let l = parse_sockets(tcp6, Proto::Tcp, "0A");
        if cfg!(target_endian = "little") {
            assert_eq!(l[0].local, "[::1]:8080".parse().unwrap());
        }
    }
}
