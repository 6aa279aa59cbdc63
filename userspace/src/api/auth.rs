//! Who is calling: the bearer token of a TCP request (or the local control socket, which acts
//! as admin) checked as an axum extractor, with the role each route requires. Tokens come from
//! the `Authorization` header only, never from a URL (the stream takes tickets: `ticket`).

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

/// The secret of `Authorization: Bearer ...`, if the header is there.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<String> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
}

pub fn local_admin() -> TokenInfo {
    TokenInfo {
        id: "local".into(),
        name: "local control socket".into(),
        role: Role::Admin,
        created_unix_ms: 0,
        revoked_unix_ms: None,
    }
}

/// The valid token with this SHA-256: 401 if unknown or revoked, 503 if it cannot be checked.
pub async fn by_hash(app: &App, token_sha256: &str) -> Result<TokenInfo, ApiError> {
    match app.tokens.check_hash(token_sha256).await {
        Ok(Some(info)) => Ok(info),
        Ok(None) => Err(ApiError::unauthorized("unknown or revoked token")),
        Err(e) => Err(ApiError::unavailable(format!("cannot check the token: {e}"))),
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        if parts.extensions.get::<LocalControl>().is_some() {
            return Ok(Caller(local_admin()));
        }
        let Some(secret) = bearer(&parts.headers) else {
            return Err(ApiError::unauthorized("missing bearer token (Authorization: Bearer tm_...)"));
        };
        by_hash(app, &crate::tokens::hash(&secret)).await.map(Caller)
    }
}
