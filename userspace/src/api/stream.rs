//! The live stream: per-client rates and totals pushed over a WebSocket, one frame per stream
//! interval, with slow subscribers skipping frames instead of holding anyone up.
//!
//! One producer builds a frame every `stream_interval` (only while someone listens) and puts it
//! in a `watch` channel, which holds just the newest frame: publishing never waits for anyone.
//! Each subscriber sends the newest frame when it can; a slow one skips frames, and one whose
//! send does not complete within `stall_timeout` is disconnected.

use std::sync::Arc;

use axum::{
    extract::{
        State, WebSocketUpgrade,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, close_code},
    },
    response::Response,
};
use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{App, auth::Caller, views::is_online};
use crate::time::unix_ms;

pub struct Hub {
    tx: watch::Sender<Utf8Bytes>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub { tx: watch::Sender::new(Utf8Bytes::from_static("")) }
    }
}

impl Hub {
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
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
                        c.last_seen_ms,
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

#[utoipa::path(get, path = "/api/v1/stream", tag = "stream", security(("bearer" = [])),
    params(("access_token" = Option<String>, Query, description = "The token, for clients that cannot set headers")),
    responses((status = 101, description = "WebSocket: one JSON text frame per stream interval")))]
pub async fn stream(_c: Caller, State(app): State<Arc<App>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve(socket, app))
}

async fn serve(socket: WebSocket, app: Arc<App>) {
    let mut rx = app.hub.tx.subscribe();
    let stall = app.cfg.stall_timeout;
    let (mut sink, mut incoming) = socket.split();
    let first = Utf8Bytes::from(frame(&app));
    let mut next = Some(first);
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
            _ = app.shutdown.cancelled() => {
                // 1001 "going away": the dashboard reconnects to the next daemon.
                let bye = CloseFrame { code: close_code::AWAY, reason: Utf8Bytes::from_static("daemon stopping") };
                let _ = tokio::time::timeout(stall, sink.send(Message::Close(Some(bye)))).await;
                break;
            }
        }
    }
}
