//! `[api]`: where the REST API, metrics and dashboard listen, the live stream's pace and
//! stall timeout, how many clients get their own metric series, the connection and subscriber
//! limits, and the group of the hook socket.

use serde::Deserialize;

use super::{ConfigError, Overrides, ranged};

pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:9107";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSettings {
    /// TCP address of the API; None: only the local control socket.
    pub listen: Option<std::net::SocketAddr>,
    pub stream_interval_ms: u64,
    pub stream_stall_timeout_secs: u64,
    pub offline_after_secs: u64,
    pub metrics_max_clients: usize,
    /// Open TCP connections the API serves at once (more wait in the listen backlog).
    pub max_connections: usize,
    /// Live-stream subscribers at once (more get 503).
    pub max_stream_subscribers: usize,
    /// Group that may use the hook socket (`hook_socket`, mode 0660), so that OpenVPN
    /// need not run as root; None: the hook socket is root-only (0600).
    pub hook_group: Option<String>,
    /// Where the hook socket is bound (its directory must let the group in; the state directory,
    /// 0700, does not). None: no hook socket (the hook uses the root-only control socket).
    pub hook_socket: Option<std::path::PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApi {
    listen: Option<String>,
    stream_interval_ms: Option<u64>,
    stream_stall_timeout_secs: Option<u64>,
    offline_after_secs: Option<u64>,
    metrics_max_clients: Option<u64>,
    max_connections: Option<u64>,
    max_stream_subscribers: Option<u64>,
    hook_group: Option<String>,
    hook_socket: Option<std::path::PathBuf>,
}

pub(super) fn build(a: FileApi, ov: &Overrides) -> Result<ApiSettings, ConfigError> {
    let listen_text = ov.api_listen.clone().or(a.listen).unwrap_or_else(|| DEFAULT_API_LISTEN.into());
    let listen = match listen_text.trim() {
        "" => None,
        t => Some(t.parse().map_err(|_| ConfigError::BadListen(listen_text.clone()))?),
    };
    Ok(ApiSettings {
        listen,
        stream_interval_ms: ranged(
            "[api] stream_interval_ms",
            ov.stream_interval_ms.or(a.stream_interval_ms).unwrap_or(1000),
            250,
            60_000,
        )?,
        stream_stall_timeout_secs: ranged(
            "[api] stream_stall_timeout_secs",
            a.stream_stall_timeout_secs.unwrap_or(10),
            1,
            3600,
        )?,
        offline_after_secs: ranged("[api] offline_after_secs", a.offline_after_secs.unwrap_or(120), 1, 30 * 86_400)?,
        metrics_max_clients: ranged("[api] metrics_max_clients", a.metrics_max_clients.unwrap_or(1000), 0, 1_000_000)?
            as usize,
        max_connections: ranged("[api] max_connections", a.max_connections.unwrap_or(1024), 1, 65_536)? as usize,
        max_stream_subscribers: ranged("[api] max_stream_subscribers", a.max_stream_subscribers.unwrap_or(64), 1, 4096)?
            as usize,
        hook_group: match a.hook_group.map(|g| g.trim().to_string()) {
            Some(g) if g.is_empty() || !g.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) => {
                return Err(ConfigError::Invalid(format!(
                    "[api] hook_group {g:?}: expected a group name (letters, digits, . _ -)"
                )));
            }
            g => g,
        },
        hook_socket: match a.hook_socket {
            Some(p) if !p.is_absolute() => {
                return Err(ConfigError::Invalid(format!(
                    "[api] hook_socket {}: expected an absolute path",
                    p.display()
                )));
            }
            p => p,
        },
    })
}
