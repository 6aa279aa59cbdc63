//! `/connections`: what is sold on a device (http/socks5 forward rules, openvpn redirects),
//! with the forward rule's counters.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json,
    extract::{Path, State, rejection::JsonRejection},
    http::StatusCode,
};
use serde::Serialize;
use utoipa::ToSchema;

use super::{changed, node, steer};
use crate::{
    api::{
        App,
        auth::Caller,
        error::ApiError,
        error::ErrorBody,
        params::{ResourceId, body},
    },
    registry::{
        RegistryError,
        connections::{self, Connection, NewConnection},
        devices::{self, Device},
    },
    time::unix_ms,
};

#[derive(Serialize, ToSchema)]
pub struct ConnectionView {
    #[serde(flatten)]
    pub connection: Connection,
    pub device_name: String,
    pub device_vpn_ip: String,
    /// Id of the forward rule serving an http/socks5 connection (null: none, or openvpn).
    pub rule: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct ConnectionList {
    pub connections: Vec<ConnectionView>,
}

/// The forward rules present now, (port, target) -> id; empty without steering maps.
fn forward_rules(app: &App) -> HashMap<(u16, std::net::SocketAddrV4), u32> {
    let Some(s) = steer(app) else { return HashMap::new() };
    match s.list() {
        Ok(l) => l
            .forward
            .into_iter()
            .filter(|f| f.proto == crate::types::Proto::Tcp)
            .map(|f| ((f.public_port, f.device), f.id))
            .collect(),
        Err(e) => {
            tracing::warn!(%e, "reading the forward rules failed; connections show no rule");
            HashMap::new()
        }
    }
}

fn connection_view(
    c: Connection,
    d: Option<&Device>,
    rules: &HashMap<(u16, std::net::SocketAddrV4), u32>,
) -> ConnectionView {
    let rule = d.and_then(|d| c.forward_spec(d.vpn_ip)).and_then(|s| rules.get(&(s.public_port, s.device)).copied());
    ConnectionView {
        device_name: d.map(|d| d.name.clone()).unwrap_or_default(),
        device_vpn_ip: d.map(|d| d.vpn_ip.to_string()).unwrap_or_default(),
        rule,
        connection: c,
    }
}

#[utoipa::path(get, path = "/api/v1/connections", tag = "connections", security(("bearer" = [])),
    responses((status = 200, body = ConnectionList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_connections(_c: Caller, State(app): State<Arc<App>>) -> Result<Json<ConnectionList>, ApiError> {
    let db = &app.ledger.db;
    let conns = connections::list(db, node(&app)).await.map_err(RegistryError::from)?;
    let devs: HashMap<String, Device> = devices::list(db, node(&app))
        .await
        .map_err(RegistryError::from)?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let rules = forward_rules(&app);
    Ok(Json(ConnectionList {
        connections: conns
            .into_iter()
            .map(|c| {
                let d = devs.get(&c.device_id);
                connection_view(c, d, &rules)
            })
            .collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/connections/{id}", tag = "connections", security(("bearer" = [])),
    params(("id" = ResourceId, Path, description = "Connection id (UUID)")),
    responses((status = 200, body = ConnectionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_connection(
    _c: Caller,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<ConnectionView>, ApiError> {
    let c = connections::get(&app.ledger.db, node(&app), &id).await?;
    let d = devices::get(&app.ledger.db, node(&app), &c.device_id).await?;
    Ok(Json(connection_view(c, Some(&d), &forward_rules(&app))))
}

#[utoipa::path(post, path = "/api/v1/connections", tag = "connections", security(("bearer" = [])),
    request_body = NewConnection,
    responses((status = 201, body = ConnectionView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "Unknown device", body = ErrorBody),
        (status = 409, description = "Port or username taken (by a connection or a forward rule)", body = ErrorBody)))]
pub async fn create_connection(
    caller: Caller,
    State(app): State<Arc<App>>,
    b: Result<Json<NewConnection>, JsonRejection>,
) -> Result<(StatusCode, Json<ConnectionView>), ApiError> {
    caller.require_admin()?;
    let new = body(b)?;
    let steer = steer(&app);
    let c = connections::create(&app.ledger.db, node(&app), steer.as_ref(), &new, unix_ms()).await?;
    let d = devices::get(&app.ledger.db, node(&app), &c.device_id).await?;
    tracing::info!(
        connection = c.id,
        device = d.name,
        protocol = %c.protocol,
        by = caller.0.name,
        "connection created via API"
    );
    changed(&app);
    Ok((StatusCode::CREATED, Json(connection_view(c, Some(&d), &forward_rules(&app)))))
}

#[utoipa::path(delete, path = "/api/v1/connections/{id}", tag = "connections", security(("bearer" = [])),
    params(("id" = ResourceId, Path, description = "Connection id (UUID)")),
    responses((status = 204, description = "Deleted, with its forward rule"), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete_connection(
    caller: Caller,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let steer = steer(&app);
    connections::delete(&app.ledger.db, node(&app), steer.as_ref(), &id).await?;
    tracing::info!(connection = id, by = caller.0.name, "connection deleted via API");
    changed(&app);
    Ok(StatusCode::NO_CONTENT)
}
