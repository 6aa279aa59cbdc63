//! `[api]`: where the REST API, metrics and dashboard listen, the live stream's pace and
//! stall timeout, and how many clients get their own metric series.

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApi {
    listen: Option<String>,
    stream_interval_ms: Option<u64>,
    stream_stall_timeout_secs: Option<u64>,
    offline_after_secs: Option<u64>,
    metrics_max_clients: Option<u64>,
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
    })
}
