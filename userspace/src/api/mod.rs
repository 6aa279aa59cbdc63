//! The HTTP API (axum): REST under `/api/v1`, the live stream, `/metrics`, `/healthz`, and the
//! dashboard. Served on a TCP address (bearer tokens) and on the local control socket in the
//! state directory (root-only by file mode; acts as admin), which the CLI uses.

pub mod auth;
pub mod clients;
pub mod doc;
pub mod error;
pub mod hooks;
pub mod limit;
pub mod metrics;
pub mod params;
pub mod registry;
pub mod routes;
pub mod stream;
pub mod ticket;
pub mod views;
pub mod webhooks;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    routing::{get, post},
};
use tracing::info;

use crate::{
    bpf::{
        counters::OutcomeRow,
        loader::{LoadError, PinnedMaps},
    },
    control,
    ledger::Ledger,
    tasks::Tasks,
    tokens::TokenCache,
};

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: Option<SocketAddr>,
    pub offline_after_ms: u64,
    /// A device is offline after this long without a packet or handshake
    /// (`[identity] device_offline_after_secs`).
    pub device_offline_after_ms: u64,
    pub metrics_max_clients: usize,
    pub stream_interval: Duration,
    pub stall_timeout: Duration,
    /// TCP connections served at once (`limit::Limited`).
    pub max_connections: usize,
    pub max_stream_subscribers: usize,
    /// Group of the hook socket (mode 0660); None: 0600.
    pub hook_group: Option<String>,
    /// Path of the hook socket (only POST /api/v1/hooks/openvpn); None: none.
    pub hook_socket: Option<std::path::PathBuf>,
}

/// What handlers share.
pub struct App {
    pub cfg: ApiConfig,
    pub ledger: Arc<Ledger>,
    pub tokens: TokenCache,
    pub hub: stream::Hub,
    /// Single-use stream tickets (`POST /api/v1/stream/ticket`).
    pub tickets: ticket::Tickets,
    pub maps: Option<PinnedMaps>,
    /// The serialised client list of the latest poll.
    pub list_cache: std::sync::Mutex<Option<ListCache>>,
    pub webhooks: Arc<crate::webhook::Webhooks>,
    /// None in tests that serve the ledger alone.
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// The ledger's self-check (None in tests that serve the ledger alone).
    pub selfcheck: Option<Arc<crate::selfcheck::SelfCheck>>,
    /// Cancelled when the daemon stops: open live streams close (they would otherwise keep the
    /// server's graceful shutdown waiting).
    pub shutdown: tokio_util::sync::CancellationToken,
}

pub struct ListCache {
    pub polls: u64,
    pub at: std::time::Instant,
    pub body: axum::body::Bytes,
}

impl App {
    pub fn kernel_outcomes(&self) -> Result<Vec<OutcomeRow>, LoadError> {
        match &self.maps {
            Some(m) => crate::bpf::counters::read_stats(m),
            None => Ok(Vec::new()),
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/me", get(routes::me))
        .route("/clients", get(clients::list_clients))
        .route("/clients/{ip}", get(routes::get_client))
        .route("/clients/{ip}/usage", get(routes::usage))
        .route("/clients/{ip}/reset", post(routes::reset))
        .route("/clients/{ip}/resets", get(routes::resets))
        .route("/stats", get(routes::stats))
        .route("/stream", get(stream::stream))
        .route("/stream/ticket", post(stream::ticket))
        .route("/openapi.json", get(doc::openapi))
        .route("/hooks/openvpn", post(hooks::openvpn))
        .merge(registry::routes())
        .merge(webhooks::routes());
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/livez", get(routes::livez))
        .route("/metrics", get(routes::metrics))
        .nest("/api/v1", v1)
        .merge(crate::web::routes())
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(app)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source} (set api_listen, or stop what uses the port)")]
    Listen { addr: String, source: std::io::Error },
    #[error("control socket: {0}")]
    Control(#[source] control::server::BindError),
    #[error("hook socket ([api] hook_socket): {0}")]
    Hook(#[source] control::server::BindError),
}

/// A TCP connection that moves no byte for this long (or twice the stream interval, if longer)
/// is closed.
const IDLE_TIMEOUT_MIN: Duration = Duration::from_secs(30);

/// What the hook socket serves: the hook call alone, acting as admin (the socket's mode and
/// group decide who may call it).
fn hook_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/hooks/openvpn", post(hooks::openvpn))
        .fallback(routes::not_found)
        .with_state(app)
        .layer(Extension(auth::LocalControl))
}

/// Bind the TCP listener (if configured), the control socket and the hook socket (if
/// configured), then serve them (and the live-stream producer) as tasks of `tasks` until its
/// token is cancelled. A socket that cannot be bound with its mode is fatal.
pub async fn serve(app: Arc<App>, state_dir: &Path, tasks: &mut Tasks) -> Result<(), ServeError> {
    let tcp = match app.cfg.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr: addr.to_string(), source })?,
        ),
        None => None,
    };
    let unix = control::server::bind(&control::socket_path(state_dir)).map_err(ServeError::Control)?;
    let hook = match &app.cfg.hook_socket {
        Some(p) => {
            let mode = if app.cfg.hook_group.is_some() { 0o660 } else { 0o600 };
            let l = control::server::bind_with(p, mode, app.cfg.hook_group.as_deref()).map_err(ServeError::Hook)?;
            info!(path = %p.display(), group = app.cfg.hook_group.as_deref().unwrap_or("(root only)"), "hook socket bound");
            Some(l)
        }
        None => None,
    };
    let stop = tasks.token();
    tasks.spawn("stream producer", stream::produce(app.clone(), stop.clone()));
    let router = router(app.clone());
    let local = router.clone().layer(Extension(auth::LocalControl));
    let stopped = stop.clone();
    tasks.spawn("control socket", control::server::serve(unix, local, async move { stopped.cancelled().await }));
    if let Some(h) = hook {
        let stopped = stop.clone();
        let r = hook_router(app.clone());
        tasks.spawn("hook socket", control::server::serve(h, r, async move { stopped.cancelled().await }));
    }
    if let Some(l) = tcp {
        info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            max_connections = app.cfg.max_connections, "API listening");
        // Idle: longer than the slowest stream interval (a stream writes a frame each one).
        let idle = (app.cfg.stream_interval * 2).max(IDLE_TIMEOUT_MIN);
        let l = limit::Limited::new(l, app.cfg.max_connections, idle);
        tasks.spawn("api", async move { axum::serve(l, router).with_graceful_shutdown(stop.cancelled_owned()).await });
    }
    Ok(())
}
