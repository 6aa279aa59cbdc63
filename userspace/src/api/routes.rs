//! The client routes (list, one client, usage history, reset), health, stats, metrics and the
//! JSON fallbacks for unknown routes and methods.

use std::{net::IpAddr, sync::Arc};

use axum::{
    Json,
    extract::{Path, Query, State, rejection::QueryRejection},
    http::header,
    response::IntoResponse,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{
    App,
    auth::Caller,
    error::ApiError,
    error::ErrorBody,
    params::{ClientIp, parse_client},
    views::*,
};
use crate::{
    ledger::{LedgerError, state::ClientState, store, store::Granularity},
    time::unix_ms,
};

/// A client address from the path that this node's ledger knows (400 if malformed, 404 if not).
fn known_client(app: &App, s: &str) -> Result<(IpAddr, ClientState), ApiError> {
    let ip = parse_client(s)?;
    let c = app.ledger.client(ip).ok_or(LedgerError::UnknownClient(ip))?;
    Ok((ip, c))
}

/// A poll older than this many poll intervals (and at least `POLL_STALE_MIN_MS`) means the
/// counters are not being read.
const POLL_STALE_INTERVALS: u64 = 3;
const POLL_STALE_MIN_MS: u64 = 5_000;

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Serving: database up, pins present, polls succeeding", body = Healthz),
        (status = 503, description = "Not serving; the body says which check failed", body = Healthz)))]
pub async fn healthz(State(app): State<Arc<App>>) -> (axum::http::StatusCode, Json<Healthz>) {
    let h = app.ledger.health();
    let now = unix_ms();
    let stale_ms = (app.ledger.cfg.poll_interval.as_millis() as u64 * POLL_STALE_INTERVALS).max(POLL_STALE_MIN_MS);
    let mut problems = Vec::new();
    if !h.database_up {
        // No error text here: /healthz needs no token (the details are in /api/v1/stats).
        problems.push("database down: ledger writes fail".to_string());
    }
    let pins = match &app.maps {
        None => "none",
        Some(m) => match m.clients_epoch() {
            Ok(_) => "ok",
            Err(_) => {
                problems.push("pinned maps unreadable (removed?)".to_string());
                "missing"
            }
        },
    };
    let poll_age = h.last_poll_ok_unix_ms.map(|t| now.saturating_sub(t));
    let poll = match poll_age {
        Some(a) if a <= stale_ms => "ok",
        Some(a) => {
            problems.push(format!("no successful poll for {a} ms"));
            "stale"
        }
        None if h.poll_errors > 0 => {
            problems.push("every poll has failed".into());
            "failing"
        }
        None => "starting",
    };
    let interfaces = app.selfcheck.as_ref().map(|s| {
        s.report().interfaces.iter().map(|i| HealthIface { name: i.interface.clone(), self_check: i.status }).collect()
    });
    let serving = problems.is_empty();
    let body = Healthz {
        status: if serving { "ok" } else { "unavailable" },
        node_id: app.ledger.cfg.node_id.clone(),
        database: if h.database_up { "ok" } else { "down" },
        pins,
        poll,
        last_poll_ok_unix_ms: h.last_poll_ok_unix_ms,
        last_flush_ok_unix_ms: h.last_flush_ok_unix_ms,
        attached: interfaces.unwrap_or_default(),
        problems,
    };
    let code = if serving { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body))
}

/// Liveness only: the process answers HTTP. Restarting a daemon because its database is down
/// would not help, so systemd watchdogs and load balancers that restart use this one.
#[utoipa::path(get, path = "/livez", tag = "health",
    responses((status = 200, description = "The daemon answers", body = Livez)))]
pub async fn livez(State(app): State<Arc<App>>) -> Json<Livez> {
    Json(Livez { status: "alive", node_id: app.ledger.cfg.node_id.clone() })
}

#[utoipa::path(get, path = "/api/v1/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
pub async fn me(caller: Caller) -> Json<Me> {
    Json(Me { role: caller.0.role, token_id: caller.0.id, name: caller.0.name })
}

#[utoipa::path(get, path = "/api/v1/clients/{ip}", tag = "clients", security(("bearer" = [])),
    params(("ip" = ClientIp, Path, description = "VPN address")),
    responses((status = 200, body = ClientView), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_client(
    _c: Caller,
    State(app): State<Arc<App>>,
    Path(ip): Path<String>,
) -> Result<Json<ClientView>, ApiError> {
    let (ip, c) = known_client(&app, &ip)?;
    let identity = app.identity.as_ref().and_then(|i| i.lookup(ip));
    Ok(Json(ClientView::new(ip, &c, unix_ms(), app.cfg.offline_after_ms, identity)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// minute (default), hour or day
    pub granularity: Option<Granularity>,
    /// Start of the range, ms since the Unix epoch (default: 1 h, 48 h or 60 d before `to`).
    pub from: Option<u64>,
    /// End of the range, exclusive (default: now).
    pub to: Option<u64>,
}

/// At most this many buckets per request.
const MAX_POINTS: u64 = 20_000;

#[utoipa::path(get, path = "/api/v1/clients/{ip}/usage", tag = "clients", security(("bearer" = [])),
    params(("ip" = ClientIp, Path, description = "VPN address"), UsageQuery),
    responses((status = 200, body = Usage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn usage(
    _c: Caller,
    State(app): State<Arc<App>>,
    Path(ip): Path<String>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Usage>, ApiError> {
    let (ip, _) = known_client(&app, &ip)?;
    let Query(q) = q?;
    let g = q.granularity.unwrap_or(Granularity::Minute);
    let now = unix_ms();
    let to = q.to.unwrap_or(now + 1);
    let default_span = match g {
        Granularity::Minute => 3_600_000,
        Granularity::Hour => 48 * 3_600_000,
        Granularity::Day => 60 * 86_400_000,
    };
    let from = q.from.unwrap_or(to.saturating_sub(default_span));
    if from >= to {
        return Err(ApiError::bad_request(format!("from ({from}) must be before to ({to})")));
    }
    if (to - from) / g.len_ms() > MAX_POINTS {
        return Err(ApiError::bad_request(format!(
            "range too wide for {g:?} buckets: at most {MAX_POINTS} per request (use a coarser granularity)"
        )));
    }
    let rows = store::history(&app.ledger.db, &app.ledger.cfg.node_id, ip, g, from, to).await?;
    Ok(Json(Usage {
        ip: ip.to_string(),
        granularity: g,
        from_unix_ms: from,
        to_unix_ms: to,
        points: rows.iter().map(|r| UsagePoint::new(r, g, now)).collect(),
    }))
}

#[utoipa::path(post, path = "/api/v1/clients/{ip}/reset", tag = "clients", security(("bearer" = [])),
    params(("ip" = ClientIp, Path, description = "VPN address")),
    responses((status = 200, body = ResetView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn reset(
    caller: Caller,
    State(app): State<Arc<App>>,
    Path(ip): Path<String>,
) -> Result<Json<ResetView>, ApiError> {
    let ip = parse_client(&ip)?;
    caller.require_admin()?;
    let rec = app.ledger.reset(ip).await?;
    tracing::info!(%ip, by = caller.0.name, reset = rec.id, "reset via API");
    let view = ResetView::from(&rec);
    Ok(Json(view))
}

#[utoipa::path(get, path = "/api/v1/clients/{ip}/resets", tag = "clients", security(("bearer" = [])),
    params(("ip" = ClientIp, Path, description = "VPN address")),
    responses((status = 200, body = ResetList), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn resets(
    _c: Caller,
    State(app): State<Arc<App>>,
    Path(ip): Path<String>,
) -> Result<Json<ResetList>, ApiError> {
    let (ip, _) = known_client(&app, &ip)?;
    let rows = store::resets(&app.ledger.db, &app.ledger.cfg.node_id, ip, 1000).await?;
    Ok(Json(ResetList { ip: ip.to_string(), resets: rows.iter().map(ResetView::from).collect() }))
}

#[utoipa::path(get, path = "/api/v1/stats", tag = "stats", security(("bearer" = [])),
    responses((status = 200, description = "Ledger health, kernel outcome counters and the self-check", body = Object)))]
pub async fn stats(_c: Caller, State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let h = app.ledger.health();
    let kernel = match app.kernel_outcomes() {
        Ok(rows) => serde_json::json!({ "outcomes": rows }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    Json(serde_json::json!({
        "node_id": app.ledger.cfg.node_id,
        "ledger": {
            "database": if h.database_up { "ok" } else { "down" },
            "pending_rows": app.ledger.pending_rows(),
            "pending_folded_rows": app.ledger.folded_rows(),
            "clients": app.ledger.with_clients(|c| c.len()),
            "last_poll_ms": h.last_poll_ms,
            "last_flush_ms": h.last_flush_ms,
            "last_flush_unix_ms": h.last_flush_unix_ms,
            "last_error": h.last_error,
            "polls": h.polls, "poll_errors": h.poll_errors,
            "flushes": h.flushes, "flush_errors": h.flush_errors, "flush_cycles": h.flush_cycles,
        },
        "stream_subscribers": app.hub.subscribers(),
        "kernel": kernel,
        "self_check": app.selfcheck.as_ref().map(|s| s.report()),
    }))
}

#[utoipa::path(get, path = "/metrics", tag = "stats", security(("bearer" = [])),
    responses((status = 200, description = "OpenMetrics 1.0 text exposition",
        content_type = "application/openmetrics-text")))]
pub async fn metrics(_c: Caller, State(app): State<Arc<App>>) -> impl IntoResponse {
    let outcomes = app.kernel_outcomes().unwrap_or_default();
    let steer = app.maps.as_ref().and_then(|m| crate::steer::SteerMaps::new(&m.dir).list().ok());
    let body = super::metrics::render(
        &app.ledger,
        app.hub.subscribers(),
        &outcomes,
        steer.as_ref(),
        app.selfcheck.as_ref().map(|s| s.report()).as_ref(),
        app.cfg.metrics_max_clients,
    );
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(axum::http::StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not allowed on {}", uri.path()))
}
