//! Webhook API: endpoints (without secrets), events and the delivery log. Paths are relative
//! to /api/v1; any token may read them.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    routing::get,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{App, auth::Caller, error::ApiError, error::ErrorBody};
use crate::webhook::{
    EndpointStatus,
    outbox::{self, AttemptView, DeliveryState, EventView},
};

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/webhooks", get(list_endpoints))
        .route("/webhooks/events", get(list_events))
        .route("/webhooks/deliveries", get(list_deliveries))
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_endpoints, list_events, list_deliveries),
    components(schemas(EndpointList, EndpointStatus, EventList, EventView, DeliveryState, DeliveryList, AttemptView))
)]
pub struct WebhookDoc;

/// Default and largest `limit`.
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
/// Longest `subject` or `endpoint` accepted in a query.
const MAX_NAME: usize = 256;

#[derive(Serialize, ToSchema)]
pub struct EndpointList {
    pub node_id: String,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Serialize, ToSchema)]
pub struct EventList {
    pub node_id: String,
    /// Newest first.
    pub events: Vec<EventView>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    pub node_id: String,
    /// Newest first.
    pub deliveries: Vec<AttemptView>,
}

fn db_error(what: &str, e: sqlx::Error) -> ApiError {
    tracing::error!(%e, "reading {what} failed");
    ApiError::from(e)
}

fn limit(v: Option<u32>) -> Result<u32, ApiError> {
    match v {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad_request(format!("limit {n}: expected 1 to {MAX_LIMIT}"))),
    }
}

fn name(field: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    match v {
        // Characters as the OpenAPI `maxLength` counts them (code points), not bytes.
        Some(s) if s.is_empty() || s.chars().count() > MAX_NAME => {
            Err(ApiError::bad_request(format!("{field}: expected 1 to {MAX_NAME} characters")))
        }
        v => Ok(v),
    }
}

#[utoipa::path(get, path = "/api/v1/webhooks", tag = "webhooks", security(("bearer" = [])),
    responses((status = 200, description = "Configured endpoints (never their secrets) with outbox counts; \
        endpoints no longer configured that still have rows follow with configured = false", body = EndpointList),
        (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_endpoints(_c: Caller, State(app): State<Arc<App>>) -> Result<Json<EndpointList>, ApiError> {
    let endpoints = app.webhooks.status().await.map_err(|e| db_error("webhook endpoints", e))?;
    Ok(Json(EndpointList { node_id: app.webhooks.node_id().to_string(), endpoints }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// At most this many events (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only events of this subject (device id, or client IP).
    #[param(min_length = 1, max_length = 256)]
    pub subject: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/webhooks/events", tag = "webhooks", security(("bearer" = [])),
    params(EventsQuery),
    responses((status = 200, description = "Events, newest first, with their state at each endpoint", body = EventList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_events(
    _c: Caller,
    State(app): State<Arc<App>>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<EventList>, ApiError> {
    let Query(q) = q?;
    let limit = limit(q.limit)?;
    let subject = name("subject", q.subject)?;
    let hooks = &app.webhooks;
    let events = outbox::events(hooks.db(), hooks.node_id(), limit, subject.as_deref())
        .await
        .map_err(|e| db_error("webhook events", e))?;
    Ok(Json(EventList { node_id: hooks.node_id().to_string(), events }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// Only attempts of this event (its id, a UUID).
    #[param(format = Uuid)]
    pub event: Option<String>,
    /// Only attempts at this endpoint (its name).
    #[param(min_length = 1, max_length = 256)]
    pub endpoint: Option<String>,
    /// At most this many attempts (1 to 1000, default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/webhooks/deliveries", tag = "webhooks", security(("bearer" = [])),
    params(DeliveriesQuery),
    responses((status = 200, description = "The delivery log: one row per attempt, newest first", body = DeliveryList),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, description = "No event with this id", body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_deliveries(
    _c: Caller,
    State(app): State<Arc<App>>,
    q: Result<Query<DeliveriesQuery>, QueryRejection>,
) -> Result<Json<DeliveryList>, ApiError> {
    let Query(q) = q?;
    let limit = limit(q.limit)?;
    let endpoint = name("endpoint", q.endpoint)?;
    let event = match q.event {
        Some(s) => Some(
            uuid::Uuid::parse_str(&s)
                .map_err(|_| ApiError::bad_request(format!("event {s:?} is not an event id (a UUID)")))?
                .hyphenated()
                .to_string(),
        ),
        None => None,
    };
    let hooks = &app.webhooks;
    if let Some(id) = &event
        && !outbox::event_exists(hooks.db(), hooks.node_id(), id).await.map_err(|e| db_error("webhook events", e))?
    {
        return Err(ApiError::not_found(format!("no webhook event {id}")));
    }
    let deliveries = outbox::attempts(hooks.db(), hooks.node_id(), event.as_deref(), endpoint.as_deref(), limit)
        .await
        .map_err(|e| db_error("webhook deliveries", e))?;
    Ok(Json(DeliveryList { node_id: hooks.node_id().to_string(), deliveries }))
}
