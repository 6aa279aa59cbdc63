//! Stream tickets: the dashboard trades its bearer token for a random, single-use ticket
//! valid `TICKET_TTL` (`POST /api/v1/stream/ticket`) and opens the WebSocket with `?ticket=`,
//! so that no token is ever in a URL. The ticket carries its token, which the stream re-checks.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRequestParts, Query},
    http::request::Parts,
};
use serde::Deserialize;

use super::{
    App,
    auth::{LocalControl, bearer, by_hash, local_admin},
    error::ApiError,
};
use crate::tokens::{TokenInfo, hash};

pub const TICKET_TTL: Duration = Duration::from_secs(30);
/// Outstanding tickets at most (expired ones are purged first; then 503).
pub const MAX_TICKETS: usize = 10_000;
/// Outstanding tickets of one token at most (then 503), so one token cannot take them all.
pub const MAX_TICKETS_PER_TOKEN: usize = 32;

struct Pending {
    info: TokenInfo,
    token_sha256: Option<String>,
    expires: Instant,
}

#[derive(Default)]
struct Store {
    /// By the ticket's SHA-256.
    pending: HashMap<String, Pending>,
    /// Outstanding tickets per token id.
    per_token: HashMap<String, usize>,
}

impl Store {
    fn purge(&mut self, now: Instant) {
        self.pending.retain(|_, p| p.expires > now);
        self.per_token.clear();
        for p in self.pending.values() {
            *self.per_token.entry(p.info.id.clone()).or_default() += 1;
        }
    }

    fn take(&mut self, key: &str) -> Option<Pending> {
        let p = self.pending.remove(key)?;
        if let Some(n) = self.per_token.get_mut(&p.info.id) {
            *n = n.saturating_sub(1);
        }
        Some(p)
    }
}

#[derive(Default)]
pub struct Tickets {
    inner: Mutex<Store>,
}

impl Tickets {
    /// A new ticket for `info` (issued to the token with hash `token_sha256`; None: the local
    /// control socket).
    pub fn issue(&self, info: TokenInfo, token_sha256: Option<String>) -> Result<String, ApiError> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).expect("the kernel's random source");
        let ticket = format!("tmt_{}", hex::encode(b));
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mine = |g: &Store| g.per_token.get(&info.id).copied().unwrap_or(0);
        if g.pending.len() >= MAX_TICKETS || mine(&g) >= MAX_TICKETS_PER_TOKEN {
            g.purge(Instant::now());
        }
        if g.pending.len() >= MAX_TICKETS {
            return Err(ApiError::unavailable(format!("{MAX_TICKETS} stream tickets outstanding; retry later")));
        }
        if mine(&g) >= MAX_TICKETS_PER_TOKEN {
            return Err(ApiError::unavailable(format!(
                "this token has {MAX_TICKETS_PER_TOKEN} unused stream tickets; use one, or retry in {} s",
                TICKET_TTL.as_secs()
            )));
        }
        *g.per_token.entry(info.id.clone()).or_default() += 1;
        g.pending.insert(hash(&ticket), Pending { info, token_sha256, expires: Instant::now() + TICKET_TTL });
        Ok(ticket)
    }

    /// Take a ticket (it works once).
    fn redeem(&self, ticket: &str) -> Option<(TokenInfo, Option<String>)> {
        let p = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take(&hash(ticket))?;
        (p.expires > Instant::now()).then_some((p.info, p.token_sha256))
    }
}

#[derive(Deserialize)]
struct StreamQuery {
    ticket: Option<String>,
}

/// Who opened a stream, and the hash of the token to re-check while it is open (None: the
/// local control socket, which has no token).
pub struct StreamCaller {
    pub info: TokenInfo,
    pub token_sha256: Option<String>,
}

impl FromRequestParts<Arc<App>> for StreamCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Self::Rejection> {
        if parts.extensions.get::<LocalControl>().is_some() {
            return Ok(StreamCaller { info: local_admin(), token_sha256: None });
        }
        if let Some(secret) = bearer(&parts.headers) {
            let h = hash(&secret);
            return Ok(StreamCaller { info: by_hash(app, &h).await?, token_sha256: Some(h) });
        }
        let q = Query::<StreamQuery>::try_from_uri(&parts.uri).map(|q| q.0.ticket).unwrap_or(None);
        let Some(t) = q else {
            return Err(ApiError::unauthorized(
                "missing credentials: Authorization: Bearer tm_..., or ?ticket= from POST /api/v1/stream/ticket",
            ));
        };
        let (info, token_sha256) =
            app.tickets.redeem(&t).ok_or_else(|| ApiError::unauthorized("unknown, used or expired stream ticket"))?;
        // The token may have been revoked since the ticket was issued.
        if let Some(h) = &token_sha256 {
            by_hash(app, h).await?;
        }
        Ok(StreamCaller { info, token_sha256 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Role;

    fn info() -> TokenInfo {
        token("t")
    }

    fn token(id: &str) -> TokenInfo {
        TokenInfo { id: id.into(), name: "t".into(), role: Role::Read, created_unix_ms: 0, revoked_unix_ms: None }
    }

    fn expire_all(t: &Tickets) {
        let past = Instant::now() - Duration::from_secs(1);
        t.inner.lock().unwrap().pending.values_mut().for_each(|p| p.expires = past);
    }

    #[test]
    fn a_ticket_works_once_and_only_its_own_text() {
        let t = Tickets::default();
        let ticket = t.issue(info(), Some("h".into())).unwrap();
        assert!(ticket.starts_with("tmt_") && ticket.len() == 68, "{ticket}");
        assert!(t.redeem("tmt_00").is_none());
        let (i, h) = t.redeem(&ticket).expect("first use");
        assert_eq!((i.id.as_str(), h.as_deref()), ("t", Some("h")));
        assert!(t.redeem(&ticket).is_none(), "second use");
    }

    #[test]
    fn an_expired_ticket_is_refused_and_the_store_is_bounded() {
        let t = Tickets::default();
        let ticket = t.issue(info(), None).unwrap();
        expire_all(&t);
        assert!(t.redeem(&ticket).is_none());
        // One token: at most MAX_TICKETS_PER_TOKEN outstanding; using one makes room.
        let mine: Vec<_> = (0..MAX_TICKETS_PER_TOKEN).map(|_| t.issue(info(), None).unwrap()).collect();
        assert!(t.issue(info(), None).is_err(), "one token took more than its share");
        assert!(t.redeem(&mine[0]).is_some());
        t.issue(info(), None).expect("a used ticket makes room");
        expire_all(&t);
        for i in 0..MAX_TICKETS {
            t.issue(token(&format!("t{}", i % 1000)), None).unwrap();
        }
        assert_eq!(t.issue(token("other"), None).unwrap_err().status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
        expire_all(&t);
        t.issue(token("other"), None).expect("expired tickets make room");
    }
}
