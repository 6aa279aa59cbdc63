//! POST /api/v1/hooks/openvpn: OpenVPN's client-connect / client-disconnect, sent by
//! `tunmeter hook openvpn` over the control socket.

use std::sync::Arc;

use axum::{Json, extract::State, extract::rejection::JsonRejection};

use super::{App, auth::Caller, error::ApiError, error::ErrorBody};
use crate::identity::{IdentityError, openvpn::hook::HookCall, service::HookReply};

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> ApiError {
        match e {
            IdentityError::BadRequest(m) => ApiError::bad_request(m),
            IdentityError::Conflict(m) => ApiError::new(axum::http::StatusCode::CONFLICT, m),
            IdentityError::Unavailable(m) => ApiError::unavailable(m),
        }
    }
}

/// The client is admitted only when this answers 200: the session is durable by then (and the
/// redirect rule of an openvpn connection is in place).
#[utoipa::path(post, path = "/api/v1/hooks/openvpn", tag = "identity", security(("bearer" = [])),
    request_body = HookCall,
    responses((status = 200, body = HookReply), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn openvpn(
    caller: Caller,
    State(app): State<Arc<App>>,
    body: Result<Json<HookCall>, JsonRejection>,
) -> Result<Json<HookReply>, ApiError> {
    caller.require_admin()?;
    let Json(call) = body.map_err(|e| ApiError::bad_request(format!("hook call: {}", e.body_text())))?;
    let identity = app.identity.as_ref().ok_or_else(|| ApiError::unavailable("the identity service is not running"))?;
    Ok(Json(identity.hook(call).await?))
}
