//! Binding the local sockets and serving a router on them until a shutdown future completes:
//! the control socket (0600) and the hook socket (0660 to a configured group, or 0600), each
//! made in a private directory and renamed into place. A socket whose mode or group cannot be
//! set is an error, never a silent 0644.

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

/// Bind `path` with `mode`, owned by `group` if given (the hook socket's group; needs CAP_CHOWN
/// or membership of the group), replacing a stale socket of an earlier run.
///
/// The socket is bound, given its group and mode inside a fresh 0700 directory beside `path`,
/// then renamed into place. So nobody can connect before its mode is set, nobody can swap it
/// for a symlink to make chown or chmod hit another file (the directory of the hook socket may
/// be writable by the hook's group), and a symlink or stale socket at `path` is replaced, never
/// followed. The process umask is not touched (other threads create files meanwhile).
pub fn bind_with(path: &Path, mode: u32, group: Option<&str>) -> Result<tokio::net::UnixListener, BindError> {
    use std::os::unix::fs::DirBuilderExt as _;
    let gid = match group {
        Some(g) => {
            Some(nix::unistd::Group::from_name(g).ok().flatten().ok_or_else(|| BindError::NoGroup(g.to_string()))?.gid)
        }
        None => None,
    };
    let bind_err = |source| BindError::Bind { path: path.into(), source };
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "sock".into());
    let private = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut dir = std::fs::DirBuilder::new();
    dir.mode(0o700);
    if let Err(e) = dir.create(&private) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(bind_err(e));
        }
        // Left by a run that died here (or planted): removed without following links.
        let _ = std::fs::remove_dir_all(&private);
        dir.create(&private).map_err(bind_err)?;
    }
    let staged = private.join("s");
    let placed = (|| {
        let listener = tokio::net::UnixListener::bind(&staged).map_err(bind_err)?;
        let mode_err = |source| BindError::Mode { path: path.into(), source };
        if let Some(gid) = gid {
            nix::unistd::chown(&staged, None, Some(gid)).map_err(|e| mode_err(std::io::Error::from(e)))?;
        }
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(mode_err)?;
        std::fs::rename(&staged, path).map_err(bind_err)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    placed
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
    async fn sockets_get_their_mode_and_group_replace_links_and_a_missing_group_is_an_error() {
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
        // A symlink planted at the path is replaced, not followed: its target keeps its mode.
        let target = dir.join("target");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let planted = dir.join("planted.sock");
        std::os::unix::fs::symlink(&target, &planted).unwrap();
        let _p = bind_with(&planted, 0o660, Some(&root_group)).unwrap();
        assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_socket(), "the link was replaced");
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o644, "the link's target untouched");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
        assert!(!left.iter().any(|n| n.to_string_lossy().ends_with(".tmp")), "staging directory left: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
