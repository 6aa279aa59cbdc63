//! SQL for the ledger: load at start-up and write one batch per transaction; reading,
//! rolling up and pruning history is in `history`.
//!
//! The same statements run on SQLite and PostgreSQL (`$N` placeholders, `ON CONFLICT` upserts,
//! `CASE` instead of the dialects' two-argument max).

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{Row as _, any::AnyRow};

mod history;
mod write;

pub use history::{UsageRow, apply_retention, closed_sum, history, resets, roll_up};
pub use write::{BatchWriter, ROWS_PER_STATEMENT};

use super::state::{ClientState, Totals};
use crate::db::{Database, from_db, to_db};

pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    fn table(self) -> &'static str {
        match self {
            Granularity::Minute => "usage_minute",
            Granularity::Hour => "usage_hour",
            Granularity::Day => "usage_day",
        }
    }

    pub fn len_ms(self) -> u64 {
        match self {
            Granularity::Minute => super::state::MINUTE_MS,
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }
}

/// Create the node's row if new; return the kernel epoch its cursors refer to.
pub async fn ensure_node(db: &Database, node: &str, now_ms: u64) -> Result<String, sqlx::Error> {
    sqlx::query(
        "INSERT INTO nodes (node_id, kernel_epoch, created_unix_ms, updated_unix_ms) VALUES ($1, '', $2, $2) \
         ON CONFLICT (node_id) DO NOTHING",
    )
    .bind(node)
    .bind(to_db(now_ms))
    .execute(&db.pool)
    .await?;
    let row = sqlx::query("SELECT kernel_epoch FROM nodes WHERE node_id = $1").bind(node).fetch_one(&db.pool).await?;
    row.try_get("kernel_epoch")
}

/// The four counter columns `up_bytes` .. `down_packets`, after `prefix` (e.g. "cursor_") if any.
fn totals(row: &AnyRow, prefix: &str) -> Result<Totals, sqlx::Error> {
    let g = |c: &str| row.try_get::<i64, _>(format!("{prefix}{c}").as_str()).map(from_db);
    Ok(Totals {
        up_bytes: g("up_bytes")?,
        up_packets: g("up_packets")?,
        down_bytes: g("down_bytes")?,
        down_packets: g("down_packets")?,
    })
}

/// Every client row of the node.
pub async fn load_clients(db: &Database, node: &str) -> Result<Vec<(IpAddr, ClientState)>, sqlx::Error> {
    let rows = sqlx::query("SELECT * FROM clients WHERE node_id = $1").bind(node).fetch_all(&db.pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let ip: String = row.try_get("ip")?;
        let ip: IpAddr = ip.parse().map_err(|e| sqlx::Error::Decode(format!("client address {ip:?}: {e}").into()))?;
        let mut c = ClientState {
            first_seen_ms: from_db(row.try_get("first_seen_unix_ms")?),
            period_started_ms: from_db(row.try_get("period_started_unix_ms")?),
            cursor: totals(&row, "cursor_")?,
            total: totals(&row, "total_")?,
            base: totals(&row, "base_")?,
            stored: true,
            ..ClientState::default()
        };
        c.set_last_seen_ms(row.try_get::<Option<i64>, _>("last_seen_unix_ms")?.map(from_db));
        out.push((ip, c));
    }
    Ok(out)
}
