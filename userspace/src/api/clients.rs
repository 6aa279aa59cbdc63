//! `GET /api/v1/clients`: the whole list, serialised once per poll and shared, or one page of
//! it (`?limit=N&after=IP`, in address order), which costs one pass over the clients.

use std::{net::IpAddr, sync::Arc};

use axum::{
    extract::{Query, State, rejection::QueryRejection},
    http::header,
    response::IntoResponse,
};
use serde::Deserialize;
use utoipa::IntoParams;

use super::{
    App, ListCache,
    auth::Caller,
    error::{ApiError, ErrorBody},
    params::{ClientIp, parse_client},
    views::{ClientList, ClientView},
};
use crate::time::unix_ms;

/// Largest page.
pub const MAX_PAGE: u32 = 10_000;

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// At most this many clients (1 to 10000); without `limit` and `after`, every client.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
    /// Only clients after this address (the previous page's `next_after`), in address order:
    /// IPv4 before IPv6.
    #[param(value_type = Option<ClientIp>)]
    pub after: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/clients", tag = "clients", security(("bearer" = [])),
    params(ListQuery),
    responses((status = 200, description = "Clients in address order; `next_after` is set when a page is not the last",
        body = ClientList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_clients(
    _c: Caller,
    State(app): State<Arc<App>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = q?;
    let body = match (q.limit, q.after) {
        (None, None) => whole(&app),
        (limit, after) => {
            let after = after.as_deref().map(parse_client).transpose()?;
            let limit = limit.unwrap_or(MAX_PAGE);
            if limit == 0 || limit > MAX_PAGE {
                return Err(ApiError::bad_request(format!("limit {limit}: expected 1 to {MAX_PAGE}")));
            }
            page(&app, after, limit as usize)
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}

fn view(app: &App, ip: IpAddr, c: &crate::ledger::state::ClientState, now: u64) -> ClientView {
    ClientView::new(ip, c, now, app.cfg.offline_after_ms, app.identity.as_ref().and_then(|i| i.lookup(ip)))
}

fn list(app: &App, now: u64, clients: Vec<ClientView>, next_after: Option<String>) -> axum::body::Bytes {
    let list = ClientList {
        node_id: app.ledger.cfg.node_id.clone(),
        taken_unix_ms: now,
        interval_ms: app.ledger.cfg.poll_interval.as_millis() as u64,
        clients,
        next_after,
    };
    axum::body::Bytes::from(serde_json::to_vec(&list).expect("plain data serialises"))
}

/// Every client. The list changes once per poll: it is serialised once per poll (at most once
/// a second) and shared by every request until then.
fn whole(app: &App) -> axum::body::Bytes {
    let polls = app.ledger.health().polls;
    let cached = {
        let c = app.list_cache.lock().unwrap_or_else(|p| p.into_inner());
        c.as_ref()
            .filter(|c| c.polls == polls && c.at.elapsed() < std::time::Duration::from_secs(1))
            .map(|c| c.body.clone())
    };
    if let Some(b) = cached {
        return b;
    }
    let now = unix_ms();
    // Copied out first: the views' identity lookups read the ledger too (its lock is not
    // re-entrant).
    let mut clients = app.ledger.with_clients(|m| m.iter().map(|(ip, c)| (*ip, c.clone())).collect::<Vec<_>>());
    clients.sort_unstable_by_key(|(ip, _)| *ip);
    let body = list(app, now, clients.iter().map(|(ip, c)| view(app, *ip, c, now)).collect(), None);
    *app.list_cache.lock().unwrap_or_else(|p| p.into_inner()) =
        Some(ListCache { polls, at: std::time::Instant::now(), body: body.clone() });
    body
}

/// Up to `limit` clients after `after`, in address order: the addresses past `after` are
/// collected, the `limit` lowest selected (linear) and sorted; only those are copied out and
/// become views.
fn page(app: &App, after: Option<IpAddr>, limit: usize) -> axum::body::Bytes {
    let now = unix_ms();
    let (states, more) = app.ledger.with_clients(|m| {
        let mut ips: Vec<IpAddr> = m.keys().copied().filter(|ip| after.is_none_or(|a| *ip > a)).collect();
        let more = ips.len() > limit;
        if more {
            ips.select_nth_unstable(limit);
            ips.truncate(limit);
        }
        ips.sort_unstable();
        (ips.iter().filter_map(|ip| m.get(ip).map(|c| (*ip, c.clone()))).collect::<Vec<_>>(), more)
    });
    // Outside the ledger's lock: identity lookups take it again.
    let clients: Vec<ClientView> = states.iter().map(|(ip, c)| view(app, *ip, c, now)).collect();
    let next_after = more.then(|| clients.last().map(|c| c.ip.clone())).flatten();
    list(app, now, clients, next_after)
}
