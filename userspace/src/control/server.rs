//! Binding the control socket (root-only by file mode) and serving a router on it until a
//! shutdown future completes.

use std::path::Path;

use axum::Router;

/// Bind `path` (replacing a stale socket of an earlier run) and make it readable and writable
/// by its owner only.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(listener)
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
