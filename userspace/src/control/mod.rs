//! The daemon's local control socket (`<state_dir>/control.sock`): the server side binds it and
//! serves whatever router it is given (the API, acting as admin), the client side is what the
//! CLI and the OpenVPN hook use to talk to a running daemon. Knows nothing about the routes.

pub mod client;
pub mod server;

use std::path::{Path, PathBuf};

pub use client::{ControlError, request, request_json};

/// Path of the local control socket.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}
