//! The live stream: per-client rates and totals pushed over a WebSocket, one frame per stream
//! interval, with slow subscribers skipping frames instead of holding anyone up.
//!
//! One producer builds a frame every `stream_interval` (only while someone listens) and puts it
//! in a `watch` channel, which holds just the newest frame: publishing never waits for anyone.
//! Each subscriber sends the newest frame when it can; a slow one skips frames, and one whose
//! send does not complete within `stall_timeout` is disconnected. An open stream re-checks its
//! token every `RECHECK_EVERY` and closes when it is revoked (or cannot be checked).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    extract::{
        State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code, rejection::WebSocketUpgradeRejection},
    },
    response::Response,
};
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    App,
    auth::{Caller, LocalControl, bearer},
    error::{ApiError, ErrorBody},
    ticket::{StreamCaller, TICKET_TTL},
    views::is_online,
};
use crate::time::unix_ms;

pub struct Hub {
    tx: watch::Sender<Utf8Bytes>,
    /// Streams open or opening (`slot`).
    open: Arc<AtomicUsize>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { tx: watch::Sender::new(Utf8Bytes::from_static("")), open: Default::default() }
    }
}

/// A stream's place among `max_stream_subscribers`; given back when dropped.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hub {
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// A slot if fewer than `max` streams are open or opening.
    pub fn slot(&self, max: usize) -> Option<Slot> {
        self.open.try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(self.open.clone()))
    }
}

/// One frame: every client's rates and current-period totals.
pub fn frame(app: &App) -> String {
    let now = unix_ms();
    let off = app.cfg.offline_after_ms;
    let mut rows = app.ledger.with_clients(|m| {
        m.iter()
            .map(|(ip, c)| {
                let p = c.period();
                (
                    *ip,
                    (
                        ip.to_string(),
                        c.up_rate,
                        c.down_rate,
                        p.up_bytes,
                        p.down_bytes,
                        p.up_packets,
                        p.down_packets,
                        c.last_seen_ms(),
                        is_online(c, now, off),
                    ),
                )
            })
            .collect::<Vec<_>>()
    });
    rows.sort_unstable_by_key(|(ip, _)| *ip);
    let rows: Vec<_> = rows.into_iter().map(|(_, r)| r).collect();
    serde_json::json!({
        "type": "clients",
        "node_id": app.ledger.cfg.node_id,
        "taken_unix_ms": now,
        "interval_ms": app.cfg.stream_interval.as_millis() as u64,
        "columns": ["ip", "up_rate", "down_rate", "up_bytes", "down_bytes", "up_packets", "down_packets",
                    "last_seen_unix_ms", "online"],
        "rows": rows,
    })
    .to_string()
}

/// Publish frames while there are subscribers, until `stop` is cancelled.
pub async fn produce(app: Arc<App>, stop: CancellationToken) -> Result<(), std::convert::Infallible> {
    let mut tick = tokio::time::interval(app.cfg.stream_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        if app.hub.subscribers() > 0 {
            let f = frame(&app);
            app.hub.tx.send_replace(Utf8Bytes::from(f));
        }
    }
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct StreamTicket {
    /// Open the stream with `?ticket=` within `expires_in_ms`; it works once.
    pub ticket: String,
    pub expires_in_ms: u64,
}

#[utoipa::path(post, path = "/api/v1/stream/ticket", tag = "stream", security(("bearer" = [])),
    responses((status = 201, description = "A single-use ticket for the stream (any role)", body = StreamTicket)))]
pub async fn ticket(
    caller: Caller,
    State(app): State<Arc<App>>,
    local: Option<axum::Extension<LocalControl>>,
    headers: axum::http::HeaderMap,
) -> Result<(axum::http::StatusCode, axum::Json<StreamTicket>), ApiError> {
    // The token the caller authenticated with (the control socket has none), hashed exactly as
    // the token cache keys it, so that the stream re-checks that token.
    let token_sha256 = match local {
        Some(_) => None,
        None => bearer(&headers).map(|t| crate::tokens::hash(&t)),
    };
    let ticket = app.tickets.issue(caller.0, token_sha256)?;
    let body = StreamTicket { ticket, expires_in_ms: TICKET_TTL.as_millis() as u64 };
    Ok((axum::http::StatusCode::CREATED, axum::Json(body)))
}

/// Longest frame a subscriber may send (it has nothing to say: pings and close frames).
const MAX_INBOUND_MESSAGE: usize = 4096;
/// How often an open stream re-checks its token (a revoked token's stream closes then).
pub const RECHECK_EVERY: Duration = Duration::from_secs(5);

#[utoipa::path(get, path = "/api/v1/stream", tag = "stream", security(("bearer" = [])),
    params(("ticket" = Option<String>, Query,
        description = "A single-use ticket from POST /api/v1/stream/ticket, for clients that cannot set headers")),
    responses((status = 101, description = "WebSocket: one JSON text frame per stream interval"),
        (status = 400, description = "Not a WebSocket upgrade request", body = ErrorBody),
        (status = 503, description = "Too many subscribers, or the token cannot be checked", body = ErrorBody)))]
pub async fn stream(
    caller: StreamCaller,
    State(app): State<Arc<App>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|e| ApiError::bad_request(format!("not a WebSocket upgrade: {}", e.body_text())))?;
    // A slot is taken before the upgrade and held until the stream ends, so that upgrades
    // under way count too.
    let slot = app.hub.slot(app.cfg.max_stream_subscribers).ok_or_else(|| {
        ApiError::unavailable(format!(
            "{} stream subscribers already ([api] max_stream_subscribers)",
            app.cfg.max_stream_subscribers
        ))
    })?;
    debug!(token = caller.info.name, "stream opened");
    Ok(ws.max_message_size(MAX_INBOUND_MESSAGE).max_frame_size(MAX_INBOUND_MESSAGE).on_upgrade(
        move |socket| async move {
            // Held by the stream's task until it ends.
            let _slot = slot;
            serve(socket, app, caller.token_sha256).await
        },
    ))
}

async fn close(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    stall: Duration,
    code: u16,
    reason: &'static str,
) {
    let bye = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
    let _ = tokio::time::timeout(stall, sink.send(Message::Close(Some(bye)))).await;
}

async fn serve(socket: WebSocket, app: Arc<App>, token_sha256: Option<String>) {
    let mut rx = app.hub.tx.subscribe();
    let stall = app.cfg.stall_timeout;
    let (mut sink, mut incoming) = socket.split();
    let first = Utf8Bytes::from(frame(&app));
    let mut next = Some(first);
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + RECHECK_EVERY, RECHECK_EVERY);
    loop {
        if let Some(f) = next.take() {
            match tokio::time::timeout(stall, sink.send(Message::Text(f))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(%e, "stream subscriber went away");
                    break;
                }
                Err(_) => {
                    info!(stall_secs = stall.as_secs_f64(), "stream subscriber stalled; disconnected");
                    break;
                }
            }
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                next = Some(rx.borrow_and_update().clone());
            }
            msg = incoming.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(_)) => {}
            },
            _ = recheck.tick(), if token_sha256.is_some() => {
                match app.tokens.check_hash(token_sha256.as_deref().unwrap_or_default()).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        info!("stream closed: its token was revoked");
                        close(&mut sink, stall, close_code::POLICY, "token revoked").await;
                        break;
                    }
                    Err(e) => {
                        warn!(%e, "stream closed: its token cannot be checked");
                        close(&mut sink, stall, close_code::AGAIN, "token cannot be checked").await;
                        break;
                    }
                }
            }
            _ = app.shutdown.cancelled() => {
                // 1001 "going away": the dashboard reconnects to the next daemon.
                close(&mut sink, stall, close_code::AWAY, "daemon stopping").await;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_streams_before_they_open_and_come_back_when_dropped() {
        let hub = Hub::default();
        let (a, b) = (hub.slot(2).expect("first"), hub.slot(2).expect("second"));
        assert!(hub.slot(2).is_none(), "a third past the cap");
        drop(a);
        let c = hub.slot(2).expect("a freed slot");
        drop((b, c));
        assert_eq!(hub.open.load(Ordering::Acquire), 0);
    }
}
