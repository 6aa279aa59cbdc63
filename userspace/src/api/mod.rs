//! The HTTP API (axum): REST under `/api/v1`, the live stream, `/metrics`, `/healthz`, and the
//! dashboard. Served on a TCP address (bearer tokens) and on a local control socket in the
//! state directory (root-only by file mode; acts as admin), which the CLI uses.

pub mod auth;
pub mod error;
pub mod hooks;
pub mod registry;
pub mod routes;
pub mod stream;
pub mod views;
pub mod webhooks;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{
    Extension, Router,
    routing::{get, post},
};
use tracing::info;
use utoipa::OpenApi;

use crate::{
    counters::OutcomeRow,
    ledger::Ledger,
    loader::{LoadError, PinnedMaps},
    metrics::Metrics,
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
}

/// What handlers share.
pub struct App {
    pub cfg: ApiConfig,
    pub ledger: Arc<Ledger>,
    pub tokens: TokenCache,
    pub metrics: Arc<Metrics>,
    pub hub: stream::Hub,
    pub maps: Option<PinnedMaps>,
    /// The serialised client list of the latest poll.
    pub list_cache: std::sync::Mutex<Option<ListCache>>,
    pub webhooks: Arc<crate::webhook::Webhooks>,
    /// None in tests that serve the ledger alone.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

pub struct ListCache {
    pub polls: u64,
    pub at: std::time::Instant,
    pub body: axum::body::Bytes,
}

impl App {
    pub fn kernel_outcomes(&self) -> Result<Vec<OutcomeRow>, LoadError> {
        match &self.maps {
            Some(m) => crate::counters::read_stats(m),
            None => Ok(Vec::new()),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tunmeter", description = "Per-VPN-client usage ledger, resets and live rates"),
    paths(
        routes::healthz, routes::me, routes::list_clients, routes::get_client, routes::usage, routes::reset,
        routes::resets, routes::stats, routes::metrics, stream::stream, hooks::openvpn
    ),
    modifiers(&BearerScheme)
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        api.components.get_or_insert_with(Default::default).add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/me", get(routes::me))
        .route("/clients", get(routes::list_clients))
        .route("/clients/{ip}", get(routes::get_client))
        .route("/clients/{ip}/usage", get(routes::usage))
        .route("/clients/{ip}/reset", post(routes::reset))
        .route("/clients/{ip}/resets", get(routes::resets))
        .route("/stats", get(routes::stats))
        .route("/stream", get(stream::stream))
        .route("/openapi.json", get(routes::openapi))
        .route("/hooks/openvpn", post(hooks::openvpn))
        .merge(registry::routes())
        .merge(webhooks::routes());
    Router::new()
        .route("/healthz", get(routes::healthz))
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
}

/// Path of the local control socket.
pub fn control_socket(state_dir: &Path) -> std::path::PathBuf {
    state_dir.join("control.sock")
}

/// Bind the TCP listener (if configured) and the control socket; serve until `shutdown`.
pub async fn serve(
    app: Arc<App>,
    state_dir: &Path,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let tcp = match app.cfg.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { addr: addr.to_string(), source })?,
        ),
        None => None,
    };
    let sock = control_socket(state_dir);
    let _ = std::fs::remove_file(&sock);
    let unix = tokio::net::UnixListener::bind(&sock)
        .map_err(|source| ServeError::Listen { addr: sock.display().to_string(), source })?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600));
    }
    stream::spawn_producer(app.clone());
    let router = router(app.clone());
    let local = router.clone().layer(Extension(auth::LocalControl));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    if let Some(l) = &tcp {
        info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "API listening");
    }
    let rx2 = stop_rx.clone();
    Ok(tokio::spawn(async move {
        let unix_srv = axum::serve(unix, local).with_graceful_shutdown(wait(rx2));
        match tcp {
            Some(l) => {
                let tcp_srv = axum::serve(l, router).with_graceful_shutdown(wait(stop_rx));
                let _ = tokio::join!(unix_srv, tcp_srv);
            }
            None => {
                let _ = unix_srv.await;
            }
        }
    }))
}
