//! Sessions, devices and connections API: paths are relative to /api/v1. Reads take any
//! token; writes need an admin token (or the local control socket). One submodule per resource;
//! this module holds the routes, the OpenAPI part and what the three share.

mod connections;
mod devices;
mod sessions;

use connections::*;
use devices::*;
use sessions::*;

use std::sync::Arc;

use axum::{
    Router,
    http::StatusCode,
    routing::{get, post},
};

use super::{App, error::ApiError};
use crate::{
    registry::{
        RegistryError,
        connections::{Connection, NewConnection},
        devices::Device,
        sessions::Session,
    },
    steer::{SteerError, SteerMaps},
};

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/sessions", get(list_sessions).post(open_session))
        .route("/sessions/{id}", get(get_session))
        .route("/sessions/{id}/close", post(close_session))
        .route("/devices", get(list_devices).post(create_device))
        .route("/devices/{id}", get(get_device).delete(delete_device))
        .route("/connections", get(list_connections).post(create_connection))
        .route("/connections/{id}", get(get_connection).delete(delete_connection))
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        list_sessions,
        get_session,
        open_session,
        close_session,
        list_devices,
        get_device,
        create_device,
        delete_device,
        list_connections,
        get_connection,
        create_connection,
        delete_connection
    ),
    components(schemas(
        SessionView,
        SessionList,
        NewSessionBody,
        Session,
        DeviceView,
        DeviceList,
        NewDeviceBody,
        Device,
        ConnectionView,
        ConnectionList,
        NewConnection,
        Connection
    ))
)]
pub struct RegistryDoc;

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match &e {
            RegistryError::BadId(_) | RegistryError::Invalid(_) => ApiError::bad_request(e.to_string()),
            RegistryError::NotFound { .. } => ApiError::not_found(e.to_string()),
            RegistryError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            RegistryError::Db(inner) => {
                tracing::error!(e = %inner, "registry API: database error");
                ApiError::unavailable(format!("database unavailable, nothing was changed: {inner}"))
            }
            RegistryError::Steer(SteerError::ForwardExists { .. } | SteerError::RedirectExists(_)) => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            RegistryError::Steer(SteerError::NoMaps(_)) => ApiError::unavailable(e.to_string()),
            RegistryError::Steer(inner) => {
                tracing::error!(e = %inner, "registry API: steering error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        }
    }
}

/// Tell the identity service that the database changed behind its back.
fn changed(app: &App) {
    if let Some(i) = &app.identity {
        i.changed();
    }
}

fn node(app: &App) -> &str {
    &app.ledger.cfg.node_id
}

fn steer(app: &App) -> Option<SteerMaps> {
    app.maps.as_ref().map(|m| SteerMaps::new(&m.dir))
}

#[cfg(test)]
mod tests {
    use utoipa::OpenApi as _;

    use super::*;

    #[test]
    fn openapi_describes_every_registry_route() {
        let doc = RegistryDoc::openapi();
        for p in [
            "/api/v1/sessions",
            "/api/v1/sessions/{id}",
            "/api/v1/sessions/{id}/close",
            "/api/v1/devices",
            "/api/v1/devices/{id}",
            "/api/v1/connections",
            "/api/v1/connections/{id}",
        ] {
            assert!(doc.paths.paths.contains_key(p), "{p} missing");
        }
        let json = doc.to_json().unwrap();
        for s in ["SessionView", "DeviceView", "ConnectionView", "NewConnection", "NewSessionBody"] {
            assert!(json.contains(&format!("\"{s}\"")), "schema {s} missing");
        }
    }

    #[test]
    fn registry_errors_map_to_statuses() {
        let s = |e: RegistryError| ApiError::from(e).status;
        assert_eq!(s(RegistryError::BadId("x".into())), StatusCode::BAD_REQUEST);
        assert_eq!(s(RegistryError::Invalid("x".into())), StatusCode::BAD_REQUEST);
        assert_eq!(s(RegistryError::NotFound { what: "device", id: "x".into() }), StatusCode::NOT_FOUND);
        assert_eq!(s(RegistryError::Conflict("x".into())), StatusCode::CONFLICT);
        assert_eq!(s(RegistryError::Db(sqlx::Error::PoolTimedOut)), StatusCode::SERVICE_UNAVAILABLE);
        let exists = SteerError::ForwardExists { proto: crate::types::Proto::Tcp, port: 1 };
        assert_eq!(s(RegistryError::Steer(exists)), StatusCode::CONFLICT);
    }
}
