//! The dashboard: static files embedded in the binary, served at `/`.

/// Routes for the dashboard's static files (filled in by the dashboard work).
pub fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
}
