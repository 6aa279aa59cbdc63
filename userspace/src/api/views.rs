//! The JSON shapes of the API (the OpenAPI schemas come from these), built from the ledger's
//! state with addresses and times converted for people at this edge only.

use std::net::IpAddr;

use serde::Serialize;
use utoipa::ToSchema;

use crate::ledger::{
    state::{ClientState, ResetRecord, Totals},
    store::{Granularity, UsageRow},
};

/// One direction of a client's current period.
#[derive(Serialize, ToSchema)]
pub struct Flow {
    pub bytes: u64,
    pub packets: u64,
    /// Bytes per second over the last poll interval.
    pub rate: f64,
}

#[derive(Serialize, ToSchema)]
pub struct Count {
    pub bytes: u64,
    pub packets: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Pair {
    pub upload: Count,
    pub download: Count,
}

impl From<&Totals> for Pair {
    fn from(t: &Totals) -> Pair {
        Pair {
            upload: Count { bytes: t.up_bytes, packets: t.up_packets },
            download: Count { bytes: t.down_bytes, packets: t.down_packets },
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ClientView {
    /// VPN address, canonical text.
    pub ip: String,
    /// Usage since the last reset.
    pub upload: Flow,
    pub download: Flow,
    pub period_started_unix_ms: u64,
    pub last_seen_unix_ms: Option<u64>,
    /// A packet within `offline_after_secs`.
    pub online: bool,
    /// Everything the ledger ever counted for this client.
    pub lifetime: Pair,
    /// Who it is: username, protocol, session, device (null when nothing is known).
    pub identity: Option<crate::identity::ClientIdentity>,
}

impl ClientView {
    pub fn new(
        ip: IpAddr,
        c: &ClientState,
        now_ms: u64,
        offline_after_ms: u64,
        identity: Option<crate::identity::ClientIdentity>,
    ) -> ClientView {
        let p = c.period();
        ClientView {
            ip: ip.to_string(),
            upload: Flow { bytes: p.up_bytes, packets: p.up_packets, rate: f64::from(c.up_rate) },
            download: Flow { bytes: p.down_bytes, packets: p.down_packets, rate: f64::from(c.down_rate) },
            period_started_unix_ms: c.period_started_ms,
            last_seen_unix_ms: c.last_seen_ms(),
            online: is_online(c, now_ms, offline_after_ms),
            lifetime: Pair::from(&c.total),
            identity,
        }
    }
}

pub fn is_online(c: &ClientState, now_ms: u64, offline_after_ms: u64) -> bool {
    c.last_seen_ms().is_some_and(|t| now_ms.saturating_sub(t) <= offline_after_ms)
}

#[derive(Serialize, ToSchema)]
pub struct ClientList {
    pub node_id: String,
    pub taken_unix_ms: u64,
    pub interval_ms: u64,
    pub clients: Vec<ClientView>,
    /// Set on a page (`limit`/`after`) that is not the last: pass it as `after` for the next.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct UsageFlow {
    pub bytes: u64,
    pub packets: u64,
    /// Bytes over the bucket's length (time-weighted).
    pub avg_rate: f64,
    /// Highest single poll-interval rate inside the bucket.
    pub peak_rate: f64,
}

#[derive(Serialize, ToSchema)]
pub struct UsagePoint {
    pub start_unix_ms: u64,
    pub upload: UsageFlow,
    pub download: UsageFlow,
}

impl UsagePoint {
    /// `now_ms` shortens the bucket still in progress, so its average is over the time elapsed.
    pub fn new(r: &UsageRow, g: Granularity, now_ms: u64) -> UsagePoint {
        let end = (r.start_ms + g.len_ms()).min(now_ms.max(r.start_ms + 1000));
        let secs = (end - r.start_ms) as f64 / 1000.0;
        let t = &r.bucket.totals;
        UsagePoint {
            start_unix_ms: r.start_ms,
            upload: UsageFlow {
                bytes: t.up_bytes,
                packets: t.up_packets,
                avg_rate: t.up_bytes as f64 / secs,
                peak_rate: f64::from(r.bucket.peak_up_rate),
            },
            download: UsageFlow {
                bytes: t.down_bytes,
                packets: t.down_packets,
                avg_rate: t.down_bytes as f64 / secs,
                peak_rate: f64::from(r.bucket.peak_down_rate),
            },
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Usage {
    pub ip: String,
    pub granularity: Granularity,
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
    pub points: Vec<UsagePoint>,
}

#[derive(Serialize, ToSchema)]
pub struct ResetView {
    pub id: String,
    pub ip: String,
    pub at_unix_ms: u64,
    pub period_started_unix_ms: u64,
    /// Usage of the period this reset closed.
    pub closed: Pair,
}

impl From<&ResetRecord> for ResetView {
    fn from(r: &ResetRecord) -> ResetView {
        ResetView {
            id: r.id.clone(),
            ip: r.ip.to_string(),
            at_unix_ms: r.at_ms,
            period_started_unix_ms: r.period_started_ms,
            closed: Pair::from(&r.closed),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ResetList {
    pub ip: String,
    pub resets: Vec<ResetView>,
}

#[derive(Serialize, ToSchema)]
pub struct Me {
    pub role: crate::tokens::Role,
    pub token_id: String,
    pub name: String,
}

#[derive(Serialize, ToSchema)]
pub struct Healthz {
    /// "ok" (200), or "unavailable" (503: see `problems`).
    pub status: &'static str,
    pub node_id: String,
    /// "ok", or "down" while writes fail (counting goes on; pending usage is written later).
    pub database: &'static str,
    /// The pinned maps: "ok", "missing" (removed behind the daemon's back), or "none" (served
    /// without maps).
    pub pins: &'static str,
    /// The kernel counters' reading: "ok", "stale" (no successful poll lately), "failing" or
    /// "starting".
    pub poll: &'static str,
    pub last_poll_ok_unix_ms: Option<u64>,
    pub last_flush_ok_unix_ms: Option<u64>,
    /// The devices the programs are attached to, with their self-check status.
    pub attached: Vec<HealthIface>,
    /// Why the daemon is not serving (empty when it is).
    pub problems: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct HealthIface {
    pub name: String,
    /// ok, drift, starting or unchecked (see /api/v1/stats).
    pub self_check: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Livez {
    pub status: &'static str,
    pub node_id: String,
}

/// The `reset` webhook event of a reset (its data is the API's reset object).
pub fn reset_event(rec: &crate::ledger::state::ResetRecord) -> crate::webhook::Event {
    crate::webhook::Event {
        kind: crate::types::EventKind::Reset,
        subject: rec.ip.to_string(),
        data: serde_json::to_value(ResetView::from(rec)).expect("plain data"),
    }
}
