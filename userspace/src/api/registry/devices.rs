//! `/devices`: the devices behind VPN addresses, with their online state (from the kernel's
//! last-seen time or the WireGuard handshake) and how many connections each carries.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use axum::{
    Json,
    extract::{Path, State, rejection::JsonRejection},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{changed, node};
use crate::{
    api::{
        App,
        auth::Caller,
        error::ApiError,
        error::ErrorBody,
        params::{ClientIp, ResourceId, body, parse_client},
    },
    registry::{
        RegistryError, connections,
        devices::{self, Device, Liveness},
    },
    time::unix_ms,
};

#[derive(Serialize, ToSchema)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    /// Live: a packet or a WireGuard handshake within `[identity] device_offline_after_secs`
    /// (the monitor's threshold).
    pub online: bool,
    pub last_seen_unix_ms: Option<u64>,
    pub latest_handshake_unix_ms: Option<u64>,
    /// Connections sold on this device.
    pub connections: usize,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
}

/// What is known now of the liveness of `ip`: the ledger's last packet and WireGuard's latest
/// handshake.
pub fn liveness(app: &App, ip: IpAddr) -> Liveness {
    Liveness {
        last_seen_ms: app.ledger.client(ip).and_then(|c| c.last_seen_ms()),
        latest_handshake_ms: app.identity.as_ref().and_then(|i| i.lookup(ip)).and_then(|i| i.latest_handshake_unix_ms),
    }
}

fn device_view(app: &App, d: Device, connections: usize, now_ms: u64) -> DeviceView {
    let l = liveness(app, d.vpn_ip);
    DeviceView {
        online: l.online(app.cfg.device_offline_after_ms, now_ms),
        last_seen_unix_ms: l.last_seen_ms,
        latest_handshake_unix_ms: l.latest_handshake_ms,
        connections,
        device: d,
    }
}

async fn connection_counts(app: &App) -> Result<HashMap<String, usize>, RegistryError> {
    let mut n = HashMap::new();
    for c in connections::list(&app.ledger.db, node(app)).await? {
        *n.entry(c.device_id).or_default() += 1;
    }
    Ok(n)
}

#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])),
    responses((status = 200, body = DeviceList), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_devices(_c: Caller, State(app): State<Arc<App>>) -> Result<Json<DeviceList>, ApiError> {
    let devs = devices::list(&app.ledger.db, node(&app)).await.map_err(RegistryError::from)?;
    let counts = connection_counts(&app).await?;
    let now = unix_ms();
    Ok(Json(DeviceList {
        devices: devs
            .into_iter()
            .map(|d| {
                let n = counts.get(&d.id).copied().unwrap_or(0);
                device_view(&app, d, n, now)
            })
            .collect(),
    }))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = ResourceId, Path, description = "Device id (UUID)")),
    responses((status = 200, body = DeviceView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_device(
    _c: Caller,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let d = devices::get(&app.ledger.db, node(&app), &id).await?;
    let n = connection_counts(&app).await?.get(&d.id).copied().unwrap_or(0);
    Ok(Json(device_view(&app, d, n, unix_ms())))
}

/// POST /devices body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeviceBody {
    /// 1 to 64 printable characters, unique on this node.
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
    /// The device's VPN address, unique on this node.
    #[schema(value_type = ClientIp)]
    pub vpn_ip: String,
}

#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", security(("bearer" = [])),
    request_body = NewDeviceBody,
    responses((status = 201, body = DeviceView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "Name or VPN address taken", body = ErrorBody)))]
pub async fn create_device(
    caller: Caller,
    State(app): State<Arc<App>>,
    b: Result<Json<NewDeviceBody>, JsonRejection>,
) -> Result<(StatusCode, Json<DeviceView>), ApiError> {
    caller.require_admin()?;
    let b = body(b)?;
    let ip = parse_client(&b.vpn_ip)?;
    let d = devices::create(&app.ledger.db, node(&app), &b.name, ip, unix_ms()).await?;
    tracing::info!(device = d.id, name = d.name, %ip, by = caller.0.name, "device created via API");
    changed(&app);
    Ok((StatusCode::CREATED, Json(device_view(&app, d, 0, unix_ms()))))
}

#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", security(("bearer" = [])),
    params(("id" = ResourceId, Path, description = "Device id (UUID)")),
    responses((status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "The device has connections", body = ErrorBody)))]
pub async fn delete_device(
    caller: Caller,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    devices::delete(&app.ledger.db, node(&app), &id).await?;
    tracing::info!(device = id, by = caller.0.name, "device deleted via API");
    changed(&app);
    Ok(StatusCode::NO_CONTENT)
}
