//! What steering needs from the host besides the maps: the policy route that delivers
//! redirected packets locally, the reserved-ports sysctl that keeps forwarded public ports out
//! of the ephemeral range, this host's addresses (never redirected), and the host-wide steering lock file.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::{
    route::{RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use nix::fcntl::{Flock, FlockArg};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tracing::{debug, info};

use crate::types::PolicyRoute;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Netlink { what: String, source: rtnetlink::Error },
    #[error("the loopback device lo is missing")]
    NoLoopback,
    #[error("{path}: {source}")]
    Sysctl { path: &'static str, source: std::io::Error },
    #[error("listing this host's addresses: {0}")]
    Addresses(nix::Error),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> HostError {
    let what = what.into();
    move |source| HostError::Netlink { what, source }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

fn connect() -> Result<Handle, HostError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(HostError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

impl PolicyRoute {
    fn rule_message(&self, handle: &Handle, v6: bool) -> RuleMessage {
        let add = handle.rule().add().fw_mark(self.mark).table_id(self.table).priority(self.priority);
        let add = add.action(RuleAction::ToTable);
        let mut msg = if v6 { add.v6().message_mut().clone() } else { add.v4().message_mut().clone() };
        msg.header.action = RuleAction::ToTable;
        msg
    }

    async fn rule_exists(&self, handle: &Handle, v6: bool) -> Result<bool, HostError> {
        let version = if v6 { IpVersion::V6 } else { IpVersion::V4 };
        let mut rules = handle.rule().get(version).execute();
        while let Some(r) = rules.try_next().await.map_err(nl("listing policy rules"))? {
            let has = |want: &RuleAttribute| r.attributes.iter().any(|a| a == want);
            if has(&RuleAttribute::FwMark(self.mark))
                && has(&RuleAttribute::Priority(self.priority))
                && (has(&RuleAttribute::Table(self.table)) || r.header.table as u32 == self.table)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn local_route(&self, v6: bool, lo: u32) -> netlink_packet_route::route::RouteMessage {
        if v6 {
            RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(lo)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .build()
        }
    }

    /// `ip rule add fwmark M lookup T pref P` and `ip route replace local default dev lo table
    /// T`, for IPv4 and IPv6. Idempotent.
    pub async fn install(&self) -> Result<(), HostError> {
        let handle = connect()?;
        let lo = nix::net::if_::if_nametoindex("lo").map_err(|_| HostError::NoLoopback)?;
        for v6 in [false, true] {
            let fam = if v6 { "IPv6" } else { "IPv4" };
            handle
                .route()
                .add(self.local_route(v6, lo))
                .replace()
                .execute()
                .await
                .map_err(nl(format!("adding the {fam} local route to table {}", self.table)))?;
            if !self.rule_exists(&handle, v6).await? {
                let add = handle.rule().add().fw_mark(self.mark).table_id(self.table).priority(self.priority);
                let add = add.action(RuleAction::ToTable);
                let r = if v6 { add.v6().execute().await } else { add.v4().execute().await };
                match r {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) => return Err(nl(format!("adding the {fam} policy rule"))(e)),
                }
            }
        }
        info!(
            mark = format!("{:#x}", self.mark),
            table = self.table,
            priority = self.priority,
            "redirect policy route installed"
        );
        Ok(())
    }

    /// Remove the rule and the routes (missing ones are fine).
    pub async fn remove(&self) -> Result<(), HostError> {
        let handle = connect()?;
        for v6 in [false, true] {
            while self.rule_exists(&handle, v6).await? {
                match handle.rule().del(self.rule_message(&handle, v6)).execute().await {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::ENOENT) => break,
                    Err(e) => return Err(nl("removing the policy rule")(e)),
                }
            }
            if let Ok(lo) = nix::net::if_::if_nametoindex("lo") {
                match handle.route().del(self.local_route(v6, lo)).execute().await {
                    Ok(()) => {}
                    Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENOENT) => {}
                    Err(e) => return Err(nl("removing the local route")(e)),
                }
            }
        }
        debug!(table = self.table, "redirect policy route removed");
        Ok(())
    }
}

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Parse the sysctl's list ("8080,11000-11010").
pub fn parse_port_list(s: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for part in s.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u16>(), b.trim().parse::<u16>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(p) = part.parse() {
                    out.insert(p);
                }
            }
        }
    }
    out
}

/// Format ports as the sysctl wants them, ranges folded.
pub fn format_port_list(ports: &BTreeSet<u16>) -> String {
    let mut parts = Vec::new();
    let mut it = ports.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end.wrapping_add(1))) && end != u16::MAX {
            end = it.next().expect("peeked");
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    }
    parts.join(",")
}

/// Add `ports` to `net.ipv4.ip_local_reserved_ports` (it covers IPv6 too): the kernel then never
/// picks them as ephemeral source ports, so a reply to one of this host's own connections can
/// never be mistaken for traffic to a forwarded port. Ports already reserved stay; none is
/// removed (a reserved port only means "not chosen automatically").
pub fn reserve_ports(ports: &BTreeSet<u16>) -> Result<bool, HostError> {
    let now =
        std::fs::read_to_string(RESERVED_PORTS).map_err(|source| HostError::Sysctl { path: RESERVED_PORTS, source })?;
    let mut all = parse_port_list(&now);
    let before = all.len();
    all.extend(ports);
    if all.len() == before {
        return Ok(false);
    }
    std::fs::write(RESERVED_PORTS, format_port_list(&all))
        .map_err(|source| HostError::Sysctl { path: RESERVED_PORTS, source })?;
    info!(ports = ?ports, "forwarded public ports reserved (net.ipv4.ip_local_reserved_ports)");
    Ok(true)
}

/// True if IPv4 forwarding is on (forward rules need it).
pub fn ipv4_forwarding() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|s| s.trim() == "1")
}

/// Destinations never redirected, whatever the config says: loopback, multicast, broadcast,
/// link-local.
pub const ALWAYS_BYPASS: [&str; 6] =
    ["127.0.0.0/8", "224.0.0.0/4", "255.255.255.255/32", "::1/128", "ff00::/8", "fe80::/10"];

/// Every address configured on this host (all devices), as host subnets.
pub fn local_addresses() -> Result<BTreeSet<IpNet>, HostError> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(HostError::Addresses)? {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.insert(IpNet::from(std::net::IpAddr::V4(v4.ip())));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.insert(IpNet::from(std::net::IpAddr::V6(v6.ip())));
        }
    }
    Ok(out)
}

/// Takes the host-wide steering lock at `path` (created 0600, never through a symlink), waiting
/// at most `wait`. The file lives in a world-writable directory, so: a non-root caller refuses a
/// file owned by anyone but itself or root (another user could have created it to hold the lock
/// forever), a file of ours with a wider mode is tightened, and a lock held for longer than
/// `wait` is an error that names the file's owner instead of a hang.
pub(super) fn lock_private(path: &std::path::Path, wait: std::time::Duration) -> std::io::Result<Flock<std::fs::File>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let meta = f.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 && meta.uid() != me && meta.uid() != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("owned by uid {}, not this user ({me}) or root: remove it (rm {})", meta.uid(), path.display()),
        ));
    }
    if meta.uid() == me && meta.mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) if std::time::Instant::now() < deadline => {
                f = back;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!("held by another process for {wait:?} (file owner uid {})", meta.uid()),
                ));
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_port_lists_round_trip() {
        let p = parse_port_list("8080, 11000-11002,53\n");
        assert_eq!(p.iter().copied().collect::<Vec<_>>(), vec![53, 8080, 11000, 11001, 11002]);
        assert_eq!(format_port_list(&p), "53,8080,11000-11002");
        assert_eq!(format_port_list(&BTreeSet::new()), "");
        assert_eq!(format_port_list(&[65534, 65535].into_iter().collect()), "65534-65535");
        assert!(parse_port_list("x,1-").is_empty());
    }

    #[test]
    fn the_steering_lock_is_private_refuses_symlinks_and_does_not_hang() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tm-steer-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tunmeter-steer.lock");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let wait = std::time::Duration::from_millis(200);

        let held = lock_private(&path, wait).expect("fresh lock");
        assert_eq!(mode(&path), 0o600, "created private");
        let e = lock_private(&path, wait).expect_err("a held lock is an error after the wait, not a hang");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("held by another process"), "{e}");
        drop(held);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(lock_private(&path, wait).expect("our own 0644 file"));
        assert_eq!(mode(&path), 0o600, "an old 0644 lock is tightened");

        let link = dir.join("link.lock");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(lock_private(&link, wait).is_err(), "a symlink planted in /run/lock is not followed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
