//! History in the ledger's SQL: usage buckets read at any granularity (rolled-up rows where
//! they exist, minutes elsewhere), the hour and day roll-ups, resets, and retention.

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{AnyConnection, Row as _, any::AnyRow};

use super::{DAY_MS, Granularity, HOUR_MS, totals};
use crate::{
    db::{Database, from_db, to_db},
    ledger::state::{Bucket, ResetRecord, Totals},
};

/// One history bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    pub start_ms: u64,
    pub bucket: Bucket,
}

const SUMS: &str = "CAST(SUM(up_bytes) AS BIGINT) AS up_bytes, CAST(SUM(up_packets) AS BIGINT) AS up_packets, \
     CAST(SUM(down_bytes) AS BIGINT) AS down_bytes, CAST(SUM(down_packets) AS BIGINT) AS down_packets, \
     MAX(peak_up_rate) AS peak_up_rate, MAX(peak_down_rate) AS peak_down_rate";

/// (hours, days) rolled up so far: `nodes.*_rolled_until_ms`.
async fn watermarks<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    node: &str,
) -> Result<(u64, u64), sqlx::Error> {
    let row = sqlx::query("SELECT hours_rolled_until_ms, days_rolled_until_ms FROM nodes WHERE node_id = $1")
        .bind(node)
        .fetch_optional(ex)
        .await?;
    Ok(match row {
        Some(r) => (from_db(r.try_get("hours_rolled_until_ms")?), from_db(r.try_get("days_rolled_until_ms")?)),
        None => (0, 0),
    })
}

/// Rows of `source` for one client in `[from, to)`, summed into buckets of `len` ms.
async fn bucketed(
    db: &Database,
    node: &str,
    ip: IpAddr,
    source: Granularity,
    len: u64,
    from_ms: u64,
    to_ms: u64,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    if from_ms >= to_ms {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(&format!(
        "SELECT (start_unix_ms / {len}) * {len} AS start_unix_ms, {SUMS} FROM {} \
         WHERE node_id = $1 AND ip = $2 AND start_unix_ms >= $3 AND start_unix_ms < $4 \
         GROUP BY (start_unix_ms / {len}) * {len}",
        source.table()
    ))
    .bind(node)
    .bind(ip.to_string())
    .bind(to_db(from_ms))
    .bind(to_db(to_ms))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(usage_row).collect()
}

fn usage_row(row: &AnyRow) -> Result<UsageRow, sqlx::Error> {
    Ok(UsageRow {
        start_ms: from_db(row.try_get("start_unix_ms")?),
        bucket: Bucket {
            totals: totals(row, "")?,
            // Written from single precision: the conversion back is exact.
            peak_up_rate: row.try_get::<f64, _>("peak_up_rate")? as f32,
            peak_down_rate: row.try_get::<f64, _>("peak_down_rate")? as f32,
        },
    })
}

/// History buckets of one client starting in `[from, to)`: rolled-up rows where they exist,
/// summed from the finer table for the hours and days not rolled up yet.
pub async fn history(
    db: &Database,
    node: &str,
    ip: IpAddr,
    g: Granularity,
    from_ms: u64,
    to_ms: u64,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    let (hours_wm, days_wm) = watermarks(&db.pool, node).await?;
    // (table, start of its range, end of its range)
    let pieces: Vec<(Granularity, u64, u64)> = match g {
        Granularity::Minute => vec![(Granularity::Minute, from_ms, to_ms)],
        Granularity::Hour => {
            vec![(Granularity::Hour, from_ms, to_ms.min(hours_wm)), (Granularity::Minute, from_ms.max(hours_wm), to_ms)]
        }
        Granularity::Day => vec![
            (Granularity::Day, from_ms, to_ms.min(days_wm)),
            (Granularity::Hour, from_ms.max(days_wm), to_ms.min(hours_wm)),
            (Granularity::Minute, from_ms.max(days_wm).max(hours_wm), to_ms),
        ],
    };
    let mut merged: std::collections::BTreeMap<u64, Bucket> = Default::default();
    for (source, a, b) in pieces {
        for r in bucketed(db, node, ip, source, g.len_ms(), a, b).await? {
            merged.entry(r.start_ms).or_default().merge(&r.bucket);
        }
    }
    Ok(merged.into_iter().map(|(start_ms, bucket)| UsageRow { start_ms, bucket }).collect())
}

/// Roll finished hours up from minute rows and finished days from hour rows (recomputing
/// whatever a late batch touched). Idempotent; one transaction.
pub async fn roll_up(db: &Database, node: &str, now_ms: u64) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    let (hw, dw) = watermarks(&mut *tx, node).await?;
    let hw = roll_range(&mut tx, node, Granularity::Minute, Granularity::Hour, hw, now_ms - now_ms % HOUR_MS).await?;
    // Days are rolled from hour rows, so only up to the hours rolled so far.
    let day_end = (now_ms - now_ms % DAY_MS).min(hw - hw % DAY_MS);
    let dw = roll_range(&mut tx, node, Granularity::Hour, Granularity::Day, dw, day_end).await?;
    sqlx::query("UPDATE nodes SET hours_rolled_until_ms = $1, days_rolled_until_ms = $2 WHERE node_id = $3")
        .bind(to_db(hw))
        .bind(to_db(dw))
        .bind(node)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Roll `dst` buckets from `from` (0: from the oldest `src` row) up to `end`; returns the new
/// watermark.
async fn roll_range(
    conn: &mut AnyConnection,
    node: &str,
    src: Granularity,
    dst: Granularity,
    mut from: u64,
    end: u64,
) -> Result<u64, sqlx::Error> {
    let len = dst.len_ms();
    if from >= end {
        return Ok(from);
    }
    if from == 0 {
        let oldest: Option<i64> =
            sqlx::query(&format!("SELECT MIN(start_unix_ms) AS m FROM {} WHERE node_id = $1", src.table()))
                .bind(node)
                .fetch_one(&mut *conn)
                .await?
                .try_get("m")?;
        from = oldest.map_or(end, |m| from_db(m) - from_db(m) % len);
    }
    while from < end {
        roll_one(conn, node, src, dst, from, len).await?;
        from += len;
    }
    Ok(from)
}

/// Replace the `dst` rows of the bucket starting at `start` with sums of the `src` rows.
async fn roll_one(
    conn: &mut AnyConnection,
    node: &str,
    src: Granularity,
    dst: Granularity,
    start: u64,
    len: u64,
) -> Result<(), sqlx::Error> {
    let set = ["up_bytes", "up_packets", "down_bytes", "down_packets", "peak_up_rate", "peak_down_rate"]
        .map(|c| format!("{c} = excluded.{c}"))
        .join(", ");
    sqlx::query(&format!(
        "INSERT INTO {dst} (node_id, ip, start_unix_ms, up_bytes, up_packets, down_bytes, down_packets, \
         peak_up_rate, peak_down_rate) \
         SELECT node_id, ip, $2, {SUMS} FROM {src} \
         WHERE node_id = $1 AND start_unix_ms >= $2 AND start_unix_ms < $3 GROUP BY node_id, ip \
         ON CONFLICT (node_id, ip, start_unix_ms) DO UPDATE SET {set}",
        dst = dst.table(),
        src = src.table()
    ))
    .bind(node)
    .bind(to_db(start))
    .bind(to_db(start + len))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Resets of one client, newest first.
pub async fn resets(db: &Database, node: &str, ip: IpAddr, limit: u32) -> Result<Vec<ResetRecord>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, at_unix_ms, period_started_unix_ms, up_bytes, up_packets, down_bytes, down_packets \
         FROM resets WHERE node_id = $1 AND ip = $2 ORDER BY at_unix_ms DESC, id LIMIT $3",
    )
    .bind(node)
    .bind(ip.to_string())
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(ResetRecord {
                id: row.try_get("id")?,
                ip,
                at_ms: from_db(row.try_get("at_unix_ms")?),
                period_started_ms: from_db(row.try_get("period_started_unix_ms")?),
                closed: totals(row, "")?,
                new_base: Totals::default(),
            })
        })
        .collect()
}

/// Sum of every closed period of one client (for checks: closed periods + the current one
/// equal the client's total).
pub async fn closed_sum(db: &Database, node: &str, ip: IpAddr) -> Result<(u64, Totals), sqlx::Error> {
    let row = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(SUM(up_bytes), 0) AS BIGINT) AS up_bytes, \
         CAST(COALESCE(SUM(up_packets), 0) AS BIGINT) AS up_packets, \
         CAST(COALESCE(SUM(down_bytes), 0) AS BIGINT) AS down_bytes, \
         CAST(COALESCE(SUM(down_packets), 0) AS BIGINT) AS down_packets \
         FROM resets WHERE node_id = $1 AND ip = $2",
    )
    .bind(node)
    .bind(ip.to_string())
    .fetch_one(&db.pool)
    .await?;
    Ok((from_db(row.try_get("n")?), totals(&row, "")?))
}

/// Delete history older than each granularity's retention (0 = keep forever).
pub async fn apply_retention(
    db: &Database,
    node: &str,
    now_ms: u64,
    keep_days: [(Granularity, u32); 3],
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    let (hours_wm, days_wm) = watermarks(&db.pool, node).await?;
    for (g, days) in keep_days {
        if days == 0 {
            continue;
        }
        // Never delete rows that are not rolled up into the coarser table yet.
        let rolled = match g {
            Granularity::Minute => hours_wm,
            Granularity::Hour => days_wm,
            Granularity::Day => u64::MAX,
        };
        let cutoff = now_ms.saturating_sub(u64::from(days) * DAY_MS).min(rolled);
        deleted += sqlx::query(&format!("DELETE FROM {} WHERE node_id = $1 AND start_unix_ms < $2", g.table()))
            .bind(node)
            .bind(to_db(cutoff))
            .execute(&db.pool)
            .await?
            .rows_affected();
    }
    Ok(deleted)
}
