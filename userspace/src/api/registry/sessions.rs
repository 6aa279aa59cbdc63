//! `/sessions`: list, read, open and close sessions through the API. An address opened here
//! must be inside the subnets the kernel counts.

use std::{net::IpAddr, sync::Arc};

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::StatusCode,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use tunmeter_common::{ClientKey, MAP_SUBNETS, SubnetKey};
use utoipa::{IntoParams, ToSchema};

use super::{changed, node};
use crate::{
    api::{
        App,
        auth::Caller,
        error::ApiError,
        error::ErrorBody,
        params::{ClientIp, ResourceId, body, parse_client},
    },
    bpf::loader::{LoadError, PinnedMaps},
    ledger::state::Totals,
    registry::{
        RegistryError,
        devices::{self},
        sessions::{self, ListFilter, NewSession, Session},
    },
    time::unix_ms,
    types::{CloseReason, SessionProtocol, SessionSource},
};

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
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    /// Only this client (VPN address).
    #[param(value_type = Option<ClientIp>)]
    pub client: Option<String>,
    /// true: only active sessions; false: only closed ones.
    pub active: Option<bool>,
    /// At most this many (default 100, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
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
    params(("id" = ResourceId, Path, description = "Session id (UUID)")),
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
    #[schema(value_type = ClientIp)]
    pub client_ip: String,
    pub username: Option<String>,
    pub common_name: Option<String>,
    /// The session's protocol (default: other).
    pub protocol: Option<SessionProtocol>,
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
        protocol: b.protocol.unwrap_or(SessionProtocol::Other),
        instance: String::new(),
        common_name: b.common_name.unwrap_or_default(),
        username: b.username.unwrap_or_default(),
        real_address: String::new(),
        source: SessionSource::Api,
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
    params(("id" = ResourceId, Path, description = "Session id (UUID)")),
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
    let s = sessions::close(&app.ledger.db, node(&app), &app.webhooks, &s.id, CloseReason::Api, end, unix_ms()).await?;
    tracing::info!(ip = %s.client_ip, session = s.id, by = caller.0.name, "session closed via API");
    changed(&app);
    Ok(Json(session_view(&app, s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_map_entries_decode() {
        let key = |net: &str| {
            let k = crate::bpf::loader::subnet_key(7, &net.parse().unwrap());
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
}
