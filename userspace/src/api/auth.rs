//! Who is calling: the bearer token of a TCP request (or the local control socket, which acts
//! as admin) checked as an axum extractor, with the role each route requires.

use std::sync::Arc;

use axum::{extract::FromRequestParts, http::request::Parts};

use super::{App, error::ApiError};
use crate::tokens::{Role, TokenInfo};

/// Marks requests that came in on the local control socket (root-only by file mode): they act
/// as admin without a token.
#[derive(Clone, Copy)]
pub struct LocalControl;

/// The caller, authenticated.
pub struct Caller(pub TokenInfo);

impl Caller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.0.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("token {:?} has role read; this needs an admin token", self.0.name)))
        }
    }
}

fn bearer(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string());
    }
    // Browsers cannot set headers on a WebSocket: the stream takes the token in the query.
    parts.uri.query()?.split('&').find_map(|kv| kv.strip_prefix("access_token=").map(str::to_string))
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        if parts.extensions.get::<LocalControl>().is_some() {
            return Ok(Caller(TokenInfo {
                id: "local".into(),
                name: "local control socket".into(),
                role: Role::Admin,
                created_unix_ms: 0,
                revoked_unix_ms: None,
            }));
        }
        let Some(secret) = bearer(parts) else {
            return Err(ApiError::unauthorized("missing bearer token (Authorization: Bearer tm_...)"));
        };
        match app.tokens.check(&secret).await {
            Ok(Some(info)) => Ok(Caller(info)),
            Ok(None) => Err(ApiError::unauthorized("unknown or revoked token")),
            Err(e) => Err(ApiError::unavailable(format!("cannot check the token, database unavailable: {e}"))),
        }
    }
}
