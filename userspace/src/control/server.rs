//! Binding the local sockets and serving a router on them until a shutdown future completes:
//! the control socket (root-only: 0600, bound under umask 077 so that it is never open to
//! others, not even between bind and chmod) and the hook socket (0660 to a configured group, or
//! 0600). A socket whose mode or group cannot be set is an error, never a silent 0644.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use axum::Router;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot bind {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("cannot set the mode or group of {path}: {source}")]
    Mode { path: PathBuf, source: std::io::Error },
    #[error("hook socket group {0:?} does not exist (create it, or unset [api] hook_group)")]
    NoGroup(String),
}

/// Restores the process umask when dropped.
struct Umask(nix::sys::stat::Mode);

impl Umask {
    fn private() -> Umask {
        Umask(nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077)))
    }
}

impl Drop for Umask {
    fn drop(&mut self) {
        nix::sys::stat::umask(self.0);
    }
}

/// Bind `path` (replacing a stale socket of an earlier run) with `mode`, owned by `group` if
/// given (the hook socket's group; needs CAP_CHOWN or membership of the group).
pub fn bind_with(path: &Path, mode: u32, group: Option<&str>) -> Result<tokio::net::UnixListener, BindError> {
    let gid = match group {
        Some(g) => {
            Some(nix::unistd::Group::from_name(g).ok().flatten().ok_or_else(|| BindError::NoGroup(g.to_string()))?.gid)
        }
        None => None,
    };
    let _ = std::fs::remove_file(path);
    let listener = {
        let _umask = Umask::private();
        tokio::net::UnixListener::bind(path).map_err(|source| BindError::Bind { path: path.into(), source })?
    };
    let mode_err = |source| BindError::Mode { path: path.into(), source };
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(gid)).map_err(|e| mode_err(std::io::Error::from(e)))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(mode_err)?;
    Ok(listener)
}

/// The control socket: owner only.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, BindError> {
    bind_with(path, 0o600, None)
}

/// Serve `router` on `listener` until `shutdown` completes, then let open requests finish.
pub async fn serve(
    listener: tokio::net::UnixListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Remove the socket file (at shutdown).
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};

    use super::*;

    #[tokio::test]
    async fn sockets_get_their_mode_and_group_and_a_missing_group_is_an_error() {
        let read_umask = || {
            let m = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
            nix::sys::stat::umask(m);
            m.bits()
        };
        let orig = read_umask();
        let dir = std::env::temp_dir().join(format!("tm-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("control.sock");
        std::fs::write(&control, b"stale").unwrap();
        let _l = bind(&control).unwrap();
        let m = std::fs::metadata(&control).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert!(m.file_type().is_socket(), "the stale file was replaced by the socket");
        // Group 0 exists everywhere (root); 0660 to it.
        let root_group = nix::unistd::Group::from_gid(0.into()).unwrap().unwrap().name;
        let hook = dir.join("hook.sock");
        let _h = bind_with(&hook, 0o660, Some(&root_group)).unwrap();
        let m = std::fs::metadata(&hook).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 0));
        let e = bind_with(&dir.join("x.sock"), 0o660, Some("tm-no-such-group")).unwrap_err();
        assert!(matches!(e, BindError::NoGroup(_)), "{e}");
        assert_eq!(read_umask(), orig, "the umask is restored");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
