//! Host checks with errors that name the fix (kernel version, bpffs, privileges) and the locks
//! that keep one daemon per state directory and per pin directory (both directories 0700, the
//! lock files unreachable by other local users).

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::util::KernelVersion;
use nix::fcntl::{Flock, FlockArg};

/// Oldest kernel the programs can load on: `bpf_jiffies64` arrived in 5.5 (tested: 6.x).
pub const MIN_KERNEL: (u8, u8, u16) = (5, 5, 0);
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
/// Testing knob: pretend the kernel has this version (e.g. "4.19.0").
pub const KERNEL_OVERRIDE_ENV: &str = "TUNMETER_KERNEL_VERSION_OVERRIDE";

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("kernel {found} is too old: tunmeter needs Linux >= {}.{} (bpf_jiffies64, global data); 6.6+ for TCX links", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld { found: String },
    #[error("cannot determine the kernel version: {0}")]
    KernelUnknown(String),
    #[error(
        "{path} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` (or choose a pin_dir under a bpffs mount)"
    )]
    NotBpffs { path: PathBuf },
    #[error(
        "permission denied on {path}: tunmeter must run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and write access to the pin directory)"
    )]
    Permission { path: PathBuf },
    #[error("another tunmeter daemon is running with state directory {0} (its lock is held)")]
    AlreadyRunning(PathBuf),
    #[error("another tunmeter daemon is using the pin directory {0}")]
    PinsInUse(PathBuf),
    #[error(
        "{path} belongs to uid {owner}, not to this daemon (uid {me}): remove it, or hand it over with `chown -R {me} {path}`"
    )]
    NotOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

pub fn parse_version(s: &str) -> Option<(u8, u8, u16)> {
    let mut it = s.trim().split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next().and_then(|p| p.parse().ok()).unwrap_or(0)))
}

pub fn require_kernel(found: (u8, u8, u16)) -> Result<(), SystemError> {
    if found < MIN_KERNEL {
        return Err(SystemError::KernelTooOld { found: format!("{}.{}.{}", found.0, found.1, found.2) });
    }
    Ok(())
}

pub fn check_kernel() -> Result<(), SystemError> {
    let found = match std::env::var(KERNEL_OVERRIDE_ENV) {
        Ok(v) => {
            parse_version(&v).ok_or_else(|| SystemError::KernelUnknown(format!("bad {KERNEL_OVERRIDE_ENV}={v}")))?
        }
        Err(_) => {
            let v = KernelVersion::current().map_err(|e| SystemError::KernelUnknown(e.to_string()))?;
            parse_version(&v.to_string()).ok_or_else(|| SystemError::KernelUnknown(v.to_string()))?
        }
    };
    require_kernel(found)
}

/// The pin directory (or its nearest existing ancestor) must be on a bpffs.
pub fn check_bpffs(pin_dir: &Path) -> Result<(), SystemError> {
    let mut p = pin_dir;
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let st = nix::sys::statfs::statfs(p).map_err(|e| SystemError::Io { path: p.into(), source: e.into() })?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(SystemError::NotBpffs { path: pin_dir.into() });
    }
    Ok(())
}

pub fn io_err(path: &Path, source: std::io::Error) -> SystemError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        SystemError::Permission { path: path.into() }
    } else {
        SystemError::Io { path: path.into(), source }
    }
}

/// Hold this for the daemon's lifetime: one daemon per state directory.
pub struct DaemonLock(#[allow(dead_code)] Flock<File>);

/// Create `dir` (and missing parents) with mode 0700, or take an existing one down to 0700:
/// the state directory holds the database (usernames, real addresses, token hashes) and the
/// lock, which no other local user may read or hold.
pub fn private_dir(dir: &Path) -> Result<(), SystemError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| io_err(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))
}

pub fn lock_state_dir(state_dir: &Path) -> Result<DaemonLock, SystemError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    private_dir(state_dir)?;
    let path = state_dir.join("tunmeter.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    // A lock file left 0644 by an older version: anyone could open and flock it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| io_err(&path, e))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock)
        .map(DaemonLock)
        .map_err(|_| SystemError::AlreadyRunning(state_dir.into()))
}

/// An exclusive lock on a directory (the pin directory), held for the daemon's lifetime.
pub struct DirLock(#[allow(dead_code)] Flock<File>);

/// Locks the pin directory after making it 0700 and checking it is ours: bpffs is often mode
/// 1777, and a directory another user created there (or could open) would let that user hold
/// the lock and keep the daemon from starting.
pub fn lock_dir(dir: &Path) -> Result<DirLock, SystemError> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(dir).map_err(|e| io_err(dir, e))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(SystemError::NotOwner { path: dir.into(), owner: meta.uid(), me });
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io_err(dir, e))?;
    let f = File::open(dir).map_err(|e| io_err(dir, e))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map(DirLock).map_err(|_| SystemError::PinsInUse(dir.into()))
}

/// True if a daemon holds the lock of this directory.
pub fn dir_locked(dir: &Path) -> bool {
    let Ok(f) = File::open(dir) else { return false };
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
}

/// True if a daemon currently holds the lock of `state_dir`.
pub fn daemon_running(state_dir: &Path) -> bool {
    let path = state_dir.join("tunmeter.lock");
    let Ok(f) = File::options().write(true).open(&path) else { return false };
    Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("6.18.44-fc-v782"), Some((6, 18, 44)));
        assert_eq!(parse_version("5.10"), Some((5, 10, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(require_kernel((6, 1, 0)).is_ok());
        assert!(require_kernel((5, 5, 0)).is_ok());
        let e = require_kernel((4, 19, 200)).unwrap_err().to_string();
        assert!(e.contains("4.19.200") && e.contains(">= 5.5"), "{e}");
    }

    #[test]
    fn tmpfs_is_not_bpffs() {
        let e = check_bpffs(Path::new("/tmp/surely/missing/dir")).unwrap_err();
        assert!(matches!(e, SystemError::NotBpffs { .. }), "{e}");
    }
}
