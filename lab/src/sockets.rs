//! Sockets the labs and the tests bind, all with SO_REUSEADDR (and IPV6_V6ONLY for IPv6, so
//! both families can bind one port): plain or IP(V6)_TRANSPARENT listeners and UDP sockets, the
//! UDP socket of a transparent proxy with the original destination of every datagram, and a
//! pair of them on both wildcard addresses inside a namespace.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::sys::enter_netns;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the given size.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &val as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: all-zero sockaddr_in is valid.
            let mut sin: libc::sockaddr_in = unsafe { zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) };
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero sockaddr_in6 is valid.
            let mut sin6: libc::sockaddr_in6 = unsafe { zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr_in(sin: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()), u16::from_be(sin.sin_port)))
}

fn from_sockaddr_in6(sin6: &libc::sockaddr_in6) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        sin6.sin6_flowinfo,
        sin6.sin6_scope_id,
    ))
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        // SAFETY: the family says which struct the storage holds.
        libc::AF_INET => Some(from_sockaddr_in(unsafe { &*(s as *const _ as *const libc::sockaddr_in) })),
        // SAFETY: as above.
        libc::AF_INET6 => Some(from_sockaddr_in6(unsafe { &*(s as *const _ as *const libc::sockaddr_in6) })),
        _ => None,
    }
}

/// A socket of `addr`'s family with SO_REUSEADDR, IPV6_V6ONLY for v6, IP(V6)_TRANSPARENT if
/// `transparent`, bound to `addr`.
fn bound_socket(addr: SocketAddr, ty: libc::c_int, transparent: bool) -> Result<OwnedFd> {
    let v6 = addr.is_ipv6();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain syscall.
    let fd = check(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) }).context("socket")?;
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).context("SO_REUSEADDR")?;
    if v6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1).context("IPV6_V6ONLY")?;
    }
    if transparent {
        if v6 {
            setsockopt_int(raw, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1).context("IPV6_TRANSPARENT")?;
        } else {
            setsockopt_int(raw, libc::SOL_IP, libc::IP_TRANSPARENT, 1).context("IP_TRANSPARENT")?;
        }
    }
    let (st, len) = sockaddr_of(&addr);
    // SAFETY: st holds a valid sockaddr of length len.
    check(unsafe { libc::bind(raw, &st as *const _ as *const libc::sockaddr, len) })
        .with_context(|| format!("bind {addr}"))?;
    Ok(fd)
}

fn listener(addr: SocketAddr, transparent: bool) -> Result<TcpListener> {
    let fd = bound_socket(addr, libc::SOCK_STREAM, transparent)?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) }).context("listen")?;
    let l = TcpListener::from(fd);
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A non-blocking TCP listener on `addr`.
pub fn tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    listener(addr, false)
}

/// A non-blocking TCP listener on `addr` with IP(V6)_TRANSPARENT: a transparent proxy's, which
/// accepts connections to any address steered to it.
pub fn transparent_tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    listener(addr, true)
}

/// A non-blocking UDP socket bound to `addr`.
pub fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let s = UdpSocket::from(bound_socket(addr, libc::SOCK_DGRAM, false)?);
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A transparent proxy's UDP socket on `addr`: IP(V6)_TRANSPARENT and IP(V6)_RECVORIGDSTADDR
/// (see [`recv_orig`]), with a 100 ms receive timeout.
pub fn transparent_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let fd = bound_socket(addr, libc::SOCK_DGRAM, true)?;
    if addr.is_ipv6() {
        setsockopt_int(fd.as_raw_fd(), libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1)
            .context("IPV6_RECVORIGDSTADDR")?;
    } else {
        setsockopt_int(fd.as_raw_fd(), libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1).context("IP_RECVORIGDSTADDR")?;
    }
    let u = UdpSocket::from(fd);
    u.set_read_timeout(Some(Duration::from_millis(100)))?;
    Ok(u)
}

/// A UDP socket bound with IP(V6)_TRANSPARENT to `orig`, which may be non-local: to reply from
/// the original destination of a steered datagram.
pub fn transparent_udp_at(orig: SocketAddr) -> Result<UdpSocket> {
    Ok(UdpSocket::from(bound_socket(orig, libc::SOCK_DGRAM, true)?))
}

/// One datagram from a [`transparent_udp`] socket: (length, sender, original destination).
pub fn recv_orig(u: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    // SAFETY: all-zero sockaddr_storage / msghdr are valid.
    let mut peer: libc::sockaddr_storage = unsafe { zeroed() };
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // u64 for alignment of cmsghdr.
    let mut control = [0u64; 32];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = &mut peer as *mut _ as *mut libc::c_void;
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = size_of::<[u64; 32]>();
    // SAFETY: msg points to live buffers of the given sizes.
    let n = unsafe { libc::recvmsg(u.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let peer = from_storage(&peer).ok_or_else(|| io::Error::other("recvmsg: sender of unknown family"))?;
    let mut orig = None;
    // SAFETY: walking the control buffer the kernel filled, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_IP, libc::IP_ORIGDSTADDR) => {
                    orig = Some(from_sockaddr_in(&std::ptr::read_unaligned(data as *const libc::sockaddr_in)))
                }
                (libc::SOL_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    orig = Some(from_sockaddr_in6(&std::ptr::read_unaligned(data as *const libc::sockaddr_in6)))
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, peer, orig))
}

/// `f` on 0.0.0.0:`port` and [::]:`port`, from the calling thread after it entered `ns`.
pub(crate) fn dual_stack<T>(ns: &str, f: impl Fn(SocketAddr) -> Result<T>, port: u16) -> Result<(T, T)> {
    enter_netns(ns)?;
    Ok((f(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?, f(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?))
}
