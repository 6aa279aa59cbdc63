//! `tunmeter hook openvpn`: OpenVPN's client-connect / client-disconnect script. It reads the
//! environment OpenVPN passes, tells the daemon over the control socket (retrying once), and
//! exits 0 only when the daemon accepted (2xx): OpenVPN rejects the client otherwise.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use hyper::Method;

use crate::{
    config, control,
    identity::openvpn::hook::{ATTEMPT_TIMEOUT, HOOK_PATH, HookCall, HookKind, RETRY_AFTER, call_from_env},
};

#[derive(Subcommand)]
pub enum HookCmd {
    /// OpenVPN client-connect / client-disconnect script: tells the daemon over its control
    /// socket; exits 1 when the daemon did not accept (OpenVPN then rejects the client).
    Openvpn {
        /// State directory of the daemon (its control socket is STATE_DIR/control.sock).
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The daemon's hook socket (`[api] hook_socket`), for an OpenVPN that does not run as
        /// root; default: STATE_DIR/control.sock.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The temporary file OpenVPN passes to client-connect (ignored).
        #[arg(hide = true)]
        _file: Option<PathBuf>,
    },
}

pub fn hook(cmd: HookCmd) -> anyhow::Result<()> {
    let HookCmd::Openvpn { state_dir, socket, _file } = cmd;
    openvpn(&socket.unwrap_or_else(|| control::socket_path(&state_dir)))
}

/// One line on stderr and exit 1 on any failure (fail closed).
fn openvpn(socket: &Path) -> anyhow::Result<()> {
    let call = call_from_env(&|k| std::env::var(k).ok()).map_err(|e| anyhow::anyhow!("hook openvpn: {e}"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    rt.block_on(send(socket, &call)).map_err(|e| {
        anyhow::anyhow!(
            "hook openvpn: {} {} ({}): {e}",
            match call.kind {
                HookKind::ClientConnect => "client-connect",
                HookKind::ClientDisconnect => "client-disconnect",
            },
            call.common_name,
            call.real_address
        )
    })
}

/// The message of an API error body (`{"error": {"message"}}`), else the raw body.
fn error_text(status: u16, body: &str) -> String {
    let msg = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.trim().chars().take(500).collect());
    format!("the daemon answered HTTP {status}: {msg}")
}

/// Send `call` to the daemon's socket `socket`: attempt, on failure wait 1 s and attempt once
/// more; each attempt times out after 5 s. Ok(()) only on a 2xx. Err carries a message for
/// OpenVPN's log (stderr).
pub async fn send(socket: &Path, call: &HookCall) -> Result<(), String> {
    let body = serde_json::to_vec(call).map_err(|e| format!("encoding the hook call: {e}"))?;
    let mut first_error = None;
    for attempt in 1..=2 {
        let sent = control::client::request_json_at(socket, Method::POST, HOOK_PATH, body.clone(), ATTEMPT_TIMEOUT);
        let err = match sent.await {
            Ok((status, _)) if (200..300).contains(&status) => return Ok(()),
            Ok((status, text)) => error_text(status, &text),
            Err(e) => e.to_string(),
        };
        if attempt == 1 {
            first_error = Some(err);
            tokio::time::sleep(RETRY_AFTER).await;
        } else {
            let first = first_error.take().unwrap_or_default();
            return Err(if first == err {
                format!("{err} (2 attempts)")
            } else {
                format!("{err} (first attempt: {first})")
            });
        }
    }
    unreachable!("the loop returns on its second attempt")
}
