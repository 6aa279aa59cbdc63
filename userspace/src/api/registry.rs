//! Sessions, devices and connections API: paths are relative to /api/v1. Reads take any
//! token; writes need an admin token (or the local control socket).

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
    routing::{get, post},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use tunmeter_common::{ClientKey, MAP_SUBNETS, SubnetKey};
use utoipa::{IntoParams, ToSchema};

use super::{App, auth::Caller, error::ApiError, error::ErrorBody, routes::parse_client};
use crate::{
    clock::unix_ms,
    ledger::state::Totals,
    loader::{LoadError, PinnedMaps},
    registry::{
        RegistryError,
        connections::{self, Connection, NewConnection},
        devices::{self, Device, Liveness},
        sessions::{self, ListFilter, NewSession, Session},
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

/// A JSON body, or 400 naming what is wrong with it.
fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t).map_err(|e| ApiError::bad_request(format!("bad request body: {}", e.body_text())))
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

// ---------------------------------------------------------------------------------------------
// Sessions

/// A session; for an active one, `up_bytes`/`down_bytes` are live (ledger now - start).
#[derive(Serialize, ToSchema)]
pub struct SessionView {
    #[serde(flatten)]
    pub session: Session,
    pub active: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    /// Newest first.
    pub sessions: Vec<SessionView>,
}

fn session_view(app: &App, mut s: Session) -> SessionView {
    let active = s.is_active();
    if active && let Some(c) = app.ledger.client(s.client_ip) {
        (s.up_bytes, s.down_bytes) = s.bytes_at(&c.total);
    }
    SessionView { session: s, active }
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    /// Only this client (VPN address).
    pub client: Option<String>,
    /// true: only active sessions; false: only closed ones.
    pub active: Option<bool>,
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/sessions", tag = "sessions", security(("bearer" = [])),
    params(SessionsQuery),
    responses((status = 200, body = SessionList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn list_sessions(
    _c: Caller,
    State(app): State<Arc<App>>,
    q: Result<Query<SessionsQuery>, QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    let Query(q) = q?;
    let client_ip = q.client.as_deref().map(parse_client).transpose()?;
    let limit = q.limit.unwrap_or(sessions::DEFAULT_LIMIT);
    if limit == 0 || limit > sessions::MAX_LIMIT {
        return Err(ApiError::bad_request(format!("limit {limit}: expected 1..={}", sessions::MAX_LIMIT)));
    }
    let rows = sessions::list(&app.ledger.db, node(&app), &ListFilter { client_ip, active: q.active, limit })
        .await
        .map_err(RegistryError::from)?;
    Ok(Json(SessionList { sessions: rows.into_iter().map(|s| session_view(&app, s)).collect() }))
}

#[utoipa::path(get, path = "/api/v1/sessions/{id}", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "Session id (UUID)")),
    responses((status = 200, body = SessionView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_session(
    _c: Caller,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    let s = sessions::get(&app.ledger.db, node(&app), &id).await?;
    Ok(Json(session_view(&app, s)))
}

/// POST /sessions body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSessionBody {
    /// VPN address of the client.
    pub client_ip: String,
    pub username: Option<String>,
    pub common_name: Option<String>,
    /// openvpn-udp, openvpn-tcp, openvpn (transport unknown), wireguard or other (default).
    pub protocol: Option<String>,
}

/// The subnet of an entry of the subnet map (interface index ignored): the LPM prefix covers
/// the 32 interface bits, then the address (IPv4 mapped into IPv6).
fn subnet_of(prefix_len: u32, key: &SubnetKey) -> Option<IpNet> {
    let bits = u8::try_from(prefix_len.checked_sub(32)?).ok().filter(|b| *b <= 128)?;
    let a = key.addr;
    let mapped = ClientKey { addr: a }.as_v4();
    match mapped {
        Some(v4) if bits >= 96 => Ipv4Net::new(v4.into(), bits - 96).ok().map(|n| IpNet::V4(n.trunc())),
        _ => Ipv6Net::new(a.into(), bits).ok().map(|n| IpNet::V6(n.trunc())),
    }
}

/// The subnets configured for counting (every interface), from the pinned subnet map.
fn counted_subnets(maps: &PinnedMaps) -> Result<Vec<IpNet>, LoadError> {
    let trie = maps.subnets()?;
    let mut nets = Vec::new();
    for k in trie.keys() {
        let k = k.map_err(|source| LoadError::Map { name: MAP_SUBNETS, source })?;
        if let Some(n) = subnet_of(k.prefix_len(), &k.data())
            && !nets.contains(&n)
        {
            nets.push(n);
        }
    }
    Ok(nets)
}

/// 400 unless `ip` can be a client: a unicast VPN address (`devices::check_vpn_address`) in a
/// subnet configured for counting. Without pinned maps (a bare API) only the first is checked.
fn check_client_ip(app: &App, ip: IpAddr) -> Result<(), ApiError> {
    devices::check_vpn_address("client_ip", ip)?;
    let Some(maps) = &app.maps else { return Ok(()) };
    let nets = counted_subnets(maps).map_err(|e| {
        tracing::error!(%e, "reading the client subnets failed");
        ApiError::unavailable(format!("cannot read the client subnets, nothing was changed: {e}"))
    })?;
    in_subnets(ip, &nets)
}

fn in_subnets(ip: IpAddr, nets: &[IpNet]) -> Result<(), ApiError> {
    if nets.iter().any(|n| n.contains(&ip)) {
        return Ok(());
    }
    let shown = if nets.is_empty() {
        "none".to_string()
    } else {
        nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
    Err(ApiError::bad_request(format!("client_ip {ip} is in no subnet configured for counting ({shown})")))
}

#[utoipa::path(post, path = "/api/v1/sessions", tag = "sessions", security(("bearer" = [])),
    request_body = NewSessionBody,
    responses((status = 201, body = SessionView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, description = "The client has an active session", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn open_session(
    caller: Caller,
    State(app): State<Arc<App>>,
    b: Result<Json<NewSessionBody>, JsonRejection>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    caller.require_admin()?;
    let b = body(b)?;
    let ip = parse_client(&b.client_ip)?;
    // Admitting makes a permanent ledger row: only addresses that can be clients.
    check_client_ip(&app, ip)?;
    let mut new = NewSession {
        client_ip: ip,
        protocol: b.protocol.unwrap_or_else(|| "other".into()),
        instance: String::new(),
        common_name: b.common_name.unwrap_or_default(),
        username: b.username.unwrap_or_default(),
        real_address: String::new(),
        source: "api",
        start: Totals::default(),
    };
    // Bad input and an active session are refused before the client is admitted.
    sessions::validate(&new)?;
    let db = &app.ledger.db;
    if let Some(a) = sessions::active_for(db, node(&app), ip).await.map_err(RegistryError::from)? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "client {ip} has an active session {} (opened at {} ms by {}): close it first",
                a.id, a.opened_unix_ms, a.source
            ),
        ));
    }
    new.start = app.ledger.admit(ip).await?;
    let s = sessions::open(db, node(&app), &app.webhooks, &new, unix_ms()).await?;
    tracing::info!(%ip, session = s.id, by = caller.0.name, "session opened via API");
    changed(&app);
    Ok((StatusCode::CREATED, Json(session_view(&app, s))))
}

#[utoipa::path(post, path = "/api/v1/sessions/{id}/close", tag = "sessions", security(("bearer" = [])),
    params(("id" = String, Path, description = "Session id (UUID)")),
    responses((status = 200, body = SessionView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "Already closed", body = ErrorBody)))]
pub async fn close_session(
    caller: Caller,
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, ApiError> {
    caller.require_admin()?;
    let s = sessions::get(&app.ledger.db, node(&app), &id).await?;
    let start = Totals { up_bytes: s.start_up_bytes, down_bytes: s.start_down_bytes, ..Totals::default() };
    let end = app.ledger.client(s.client_ip).map_or(start, |c| c.total);
    let s = sessions::close(&app.ledger.db, node(&app), &app.webhooks, &s.id, "api", end, unix_ms()).await?;
    tracing::info!(ip = %s.client_ip, session = s.id, by = caller.0.name, "session closed via API");
    changed(&app);
    Ok(Json(session_view(&app, s)))
}

// ---------------------------------------------------------------------------------------------
// Devices

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
        last_seen_ms: app.ledger.client(ip).and_then(|c| c.last_seen_ms),
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
    params(("id" = String, Path, description = "Device id (UUID)")),
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
    pub name: String,
    /// The device's VPN address, unique on this node.
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
    params(("id" = String, Path, description = "Device id (UUID)")),
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

// ---------------------------------------------------------------------------------------------
// Connections

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
            .filter(|f| f.proto == crate::steer::Proto::Tcp)
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
    params(("id" = String, Path, description = "Connection id (UUID)")),
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
        protocol = c.protocol,
        by = caller.0.name,
        "connection created via API"
    );
    changed(&app);
    Ok((StatusCode::CREATED, Json(connection_view(c, Some(&d), &forward_rules(&app)))))
}

#[utoipa::path(delete, path = "/api/v1/connections/{id}", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path, description = "Connection id (UUID)")),
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
    fn subnet_map_entries_decode() {
        let key = |net: &str| {
            let k = crate::loader::subnet_key(7, &net.parse().unwrap());
            (k.prefix_len(), k.data())
        };
        for net in ["10.8.0.0/24", "fd00:8::/64", "0.0.0.0/0", "::/0", "192.0.2.1/32", "fd00::1/128"] {
            let (p, d) = key(net);
            assert_eq!(subnet_of(p, &d), Some(net.parse().unwrap()), "{net}");
        }
        assert_eq!(subnet_of(10, &key("10.8.0.0/24").1), None);
        assert_eq!(subnet_of(200, &key("10.8.0.0/24").1), None);
    }

    #[test]
    fn session_addresses_must_be_counted_clients() {
        let nets: Vec<IpNet> = ["10.8.0.0/24", "fd00:8::/64"].iter().map(|n| n.parse().unwrap()).collect();
        for ok in ["10.8.0.2", "fd00:8::2"] {
            assert!(in_subnets(ok.parse().unwrap(), &nets).is_ok(), "{ok}");
        }
        for bad in ["10.9.0.2", "203.0.113.5", "fd00:9::2"] {
            let e = in_subnets(bad.parse().unwrap(), &nets).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert!(e.message.contains("10.8.0.0/24, fd00:8::/64"), "{bad}: {}", e.message);
        }
        assert!(in_subnets("10.8.0.2".parse().unwrap(), &[]).is_err());
    }

    #[test]
    fn registry_errors_map_to_statuses() {
        let s = |e: RegistryError| ApiError::from(e).status;
        assert_eq!(s(RegistryError::BadId("x".into())), StatusCode::BAD_REQUEST);
        assert_eq!(s(RegistryError::Invalid("x".into())), StatusCode::BAD_REQUEST);
        assert_eq!(s(RegistryError::NotFound { what: "device", id: "x".into() }), StatusCode::NOT_FOUND);
        assert_eq!(s(RegistryError::Conflict("x".into())), StatusCode::CONFLICT);
        assert_eq!(s(RegistryError::Db(sqlx::Error::PoolTimedOut)), StatusCode::SERVICE_UNAVAILABLE);
        let exists = SteerError::ForwardExists { proto: crate::steer::Proto::Tcp, port: 1 };
        assert_eq!(s(RegistryError::Steer(exists)), StatusCode::CONFLICT);
    }
}
