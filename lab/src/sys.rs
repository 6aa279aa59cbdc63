//! Thin, safe wrappers over the few raw syscalls the lab needs (setns, unshare, link up, TUN,
//! eventfd, poll). Sockets are in `sockets`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Path of the bind mount `ip netns add` creates for a named namespace.
pub(crate) fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// Move the *calling thread* into the named network namespace.
///
/// Only the network namespace of this one thread changes; the rest of the process is unaffected.
pub(crate) fn enter_netns(ns: &str) -> Result<()> {
    let f = File::open(netns_path(ns)).with_context(|| format!("open netns {ns}"))?;
    // SAFETY: plain syscall on a valid fd.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({ns})"));
    }
    Ok(())
}

/// Move the *calling thread* into a new, empty network namespace.
pub(crate) fn unshare_netns() -> Result<()> {
    // SAFETY: plain syscall; it affects only the calling thread's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    Ok(())
}

/// Bring the device `name` of the calling thread's namespace up (SIOCGIFFLAGS, SIOCSIFFLAGS).
pub(crate) fn link_up(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("bad interface name {name:?}");
    }
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: both ioctls take a pointer to a struct ifreq that lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr as *mut libc::ifreq) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("SIOCGIFFLAGS {name}"));
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above: `ifr` lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr as *const libc::ifreq) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("SIOCSIFFLAGS {name}"));
    }
    Ok(())
}

/// Create (or attach to) a TUN device `name` in the current thread's network namespace.
///
/// The fd is opened with `O_NONBLOCK | O_CLOEXEC`: child processes (`ip`, `nft`, `ping`) must
/// never inherit it, otherwise closing our fd would not remove the device.
pub(crate) fn open_tun(name: &str) -> Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("bad interface name {name:?}");
    }
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: valid C string, flags are constants.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("open /dev/net/tun");
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF takes a pointer to a struct ifreq that lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(fd)
}

/// ifindex of `name` in the calling thread's namespace, 0 if it does not exist.
pub(crate) fn ifindex(name: &str) -> u32 {
    let Ok(c) = CString::new(name) else { return 0 };
    // SAFETY: valid C string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// A stop flag that can also wake a thread blocked in `poll(2)` (via an eventfd).
pub(crate) struct StopSignal {
    flag: AtomicBool,
    efd: OwnedFd,
}

impl StopSignal {
    pub(crate) fn new() -> Result<StopSignal> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("eventfd");
        }
        Ok(StopSignal {
            flag: AtomicBool::new(false),
            // SAFETY: fresh fd owned by nobody else.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub(crate) fn trigger(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. Errors (counter overflow)
        // are irrelevant: the eventfd is then readable anyway.
        unsafe {
            libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8);
        }
    }

    pub(crate) fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }
}

/// `poll(2)` for readability on `fds`; returns one `bool` per fd (readable / error / hangup).
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Duration) -> Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: pfds is a valid array of pollfd of the given length.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e).context("poll");
    }
    Ok(pfds.iter().map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0).collect())
}

/// Non-blocking read; `Ok(None)` on EAGAIN.
pub(crate) fn read_nb(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// Write one whole packet; a TUN write either takes the full packet or fails.
pub(crate) fn write_packet(fd: RawFd, pkt: &[u8]) -> io::Result<()> {
    // SAFETY: pkt is valid for reads of pkt.len() bytes.
    let n = unsafe { libc::write(fd, pkt.as_ptr() as *const libc::c_void, pkt.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != pkt.len() {
        return Err(io::Error::other("short write to tun"));
    }
    Ok(())
}
