//! SQL for the ledger: load at start-up, write one batch per transaction, read history.
//!
//! The same statements run on SQLite and PostgreSQL (`$N` placeholders, `ON CONFLICT` upserts,
//! `CASE` instead of the dialects' two-argument max).

use std::{fmt::Write as _, net::IpAddr};

use serde::Serialize;
use sqlx::{AnyConnection, Row as _, any::AnyRow};

use super::state::{Bucket, ClientState, FlushBatch, ResetRecord, Totals};
use crate::db::{Backend, Database, from_db, to_db};

pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 86_400_000;

/// Rows per multi-row statement (well under SQLite's 32766 parameters).
const ROWS_PER_STATEMENT: usize = 500;

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

enum V {
    I(i64),
    F(f64),
    T(String),
    N(Option<i64>),
}

/// `INSERT ... VALUES (...), (...) <tail>` in chunks of `ROWS_PER_STATEMENT`, each row's `cols`
/// values made by `row` only when its chunk is sent (memory stays bounded by one chunk).
///
/// SQLite gets anonymous `?` placeholders: it resolves a numbered one by walking a list of every
/// parameter name, which makes binding a statement with thousands of `$N` quadratic (measured:
/// 100 µs a row at 500 rows a statement).
async fn insert_rows<T>(
    conn: &mut AnyConnection,
    backend: Backend,
    head: &str,
    cols: usize,
    items: &[T],
    row: impl Fn(&T, &mut Vec<V>),
    tail: &str,
) -> Result<(), sqlx::Error> {
    let statement = |rows: usize| {
        let mut sql = String::with_capacity(head.len() + tail.len() + rows * cols * 6);
        sql.push_str(head);
        sql.push_str(" VALUES ");
        let mut n = 0;
        for i in 0..rows {
            sql.push_str(if i == 0 { "(" } else { ", (" });
            for c in 0..cols {
                n += 1;
                sql.push_str(if c == 0 { "" } else { ", " });
                match backend {
                    Backend::Sqlite => sql.push('?'),
                    Backend::Postgres => {
                        let _ = write!(sql, "${n}");
                    }
                }
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        sql
    };
    // Full chunks share one statement text, so the driver prepares it once.
    let full = statement(ROWS_PER_STATEMENT.min(items.len()));
    let mut values = Vec::with_capacity(ROWS_PER_STATEMENT.min(items.len()) * cols);
    for chunk in items.chunks(ROWS_PER_STATEMENT) {
        let partial;
        let sql = if chunk.len() == ROWS_PER_STATEMENT.min(items.len()) {
            &full
        } else {
            partial = statement(chunk.len());
            &partial
        };
        values.clear();
        for item in chunk {
            row(item, &mut values);
        }
        debug_assert_eq!(values.len(), chunk.len() * cols);
        let mut q = sqlx::query(sql);
        for v in values.drain(..) {
            q = match v {
                V::I(x) => q.bind(x),
                V::F(x) => q.bind(x),
                V::T(x) => q.bind(x),
                V::N(x) => q.bind(x),
            };
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
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
        out.push((
            ip,
            ClientState {
                first_seen_ms: from_db(row.try_get("first_seen_unix_ms")?),
                last_seen_ms: row.try_get::<Option<i64>, _>("last_seen_unix_ms")?.map(from_db),
                period_started_ms: from_db(row.try_get("period_started_unix_ms")?),
                cursor: totals(&row, "cursor_")?,
                total: totals(&row, "total_")?,
                base: totals(&row, "base_")?,
                up_rate: 0.0,
                down_rate: 0.0,
                poll_gen: 0,
            },
        ));
    }
    Ok(out)
}

fn counts(t: &Totals) -> [V; 4] {
    [V::I(to_db(t.up_bytes)), V::I(to_db(t.up_packets)), V::I(to_db(t.down_bytes)), V::I(to_db(t.down_packets))]
}

/// Write one batch in one transaction: the epoch, client rows (cursor, totals, base), minute
/// usage, and the reset if there is one.
/// `event`: a webhook event written in the same transaction (the reset's), so it exists exactly
/// when the reset does.
pub async fn write_batch(
    db: &Database,
    node: &str,
    b: &FlushBatch,
    now_ms: u64,
    event: Option<(&crate::webhook::Webhooks, &crate::webhook::Event)>,
) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    if let Some(epoch) = &b.epoch {
        sqlx::query("UPDATE nodes SET kernel_epoch = $1, updated_unix_ms = $2 WHERE node_id = $3")
            .bind(epoch.as_str())
            .bind(to_db(now_ms))
            .bind(node)
            .execute(&mut *tx)
            .await?;
    }
    if !b.clients.is_empty() {
        let set: Vec<String> = ["cursor", "total", "base"]
            .iter()
            .flat_map(|p| {
                ["up_bytes", "up_packets", "down_bytes", "down_packets"].map(|c| format!("{p}_{c} = excluded.{p}_{c}"))
            })
            .collect();
        insert_rows(
            &mut tx,
            db.backend,
            "INSERT INTO clients (node_id, ip, first_seen_unix_ms, last_seen_unix_ms, period_started_unix_ms, \
             cursor_up_bytes, cursor_up_packets, cursor_down_bytes, cursor_down_packets, \
             total_up_bytes, total_up_packets, total_down_bytes, total_down_packets, \
             base_up_bytes, base_up_packets, base_down_bytes, base_down_packets)",
            17,
            &b.clients,
            |(ip, c), v| {
                v.extend([
                    V::T(node.to_string()),
                    V::T(ip.to_string()),
                    V::I(to_db(c.first_seen_ms)),
                    V::N(c.last_seen_ms.map(to_db)),
                    V::I(to_db(c.period_started_ms)),
                ]);
                v.extend(counts(&c.cursor));
                v.extend(counts(&c.total));
                v.extend(counts(&c.base));
            },
            &format!(
                "ON CONFLICT (node_id, ip) DO UPDATE SET last_seen_unix_ms = excluded.last_seen_unix_ms, \
                 period_started_unix_ms = excluded.period_started_unix_ms, {}",
                set.join(", ")
            ),
        )
        .await?;
    }
    if !b.buckets.is_empty() {
        let t = Granularity::Minute.table();
        let add = |c: &str| format!("{c} = {t}.{c} + excluded.{c}");
        let max = |c: &str| format!("{c} = CASE WHEN excluded.{c} > {t}.{c} THEN excluded.{c} ELSE {t}.{c} END");
        insert_rows(
            &mut tx,
            db.backend,
            &format!(
                "INSERT INTO {t} (node_id, ip, start_unix_ms, up_bytes, up_packets, down_bytes, down_packets, \
                 peak_up_rate, peak_down_rate)"
            ),
            9,
            &b.buckets,
            |((start, ip), bk), v| {
                v.extend([V::T(node.to_string()), V::T(ip.to_string()), V::I(to_db(*start))]);
                v.extend(counts(&bk.totals));
                v.extend([V::F(bk.peak_up_rate), V::F(bk.peak_down_rate)]);
            },
            &format!(
                "ON CONFLICT (node_id, ip, start_unix_ms) DO UPDATE SET {}, {}, {}, {}, {}, {}",
                add("up_bytes"),
                add("up_packets"),
                add("down_bytes"),
                add("down_packets"),
                max("peak_up_rate"),
                max("peak_down_rate")
            ),
        )
        .await?;
        // Minutes of hours (days) already rolled up: roll those hours (days) up again.
        let oldest = b.buckets.iter().map(|((start, _), _)| *start).min().unwrap_or(0);
        sqlx::query(
            "UPDATE nodes SET \
             hours_rolled_until_ms = CASE WHEN hours_rolled_until_ms > $1 THEN $1 ELSE hours_rolled_until_ms END, \
             days_rolled_until_ms = CASE WHEN days_rolled_until_ms > $2 THEN $2 ELSE days_rolled_until_ms END \
             WHERE node_id = $3",
        )
        .bind(to_db(oldest - oldest % HOUR_MS))
        .bind(to_db(oldest - oldest % DAY_MS))
        .bind(node)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(r) = &b.reset {
        insert_rows(
            &mut tx,
            db.backend,
            "INSERT INTO resets (id, node_id, ip, at_unix_ms, period_started_unix_ms, up_bytes, up_packets, \
             down_bytes, down_packets)",
            9,
            std::slice::from_ref(r),
            |r, v| {
                v.extend([
                    V::T(r.id.clone()),
                    V::T(node.to_string()),
                    V::T(r.ip.to_string()),
                    V::I(to_db(r.at_ms)),
                    V::I(to_db(r.period_started_ms)),
                ]);
                v.extend(counts(&r.closed));
            },
            "",
        )
        .await?;
    }
    if let Some((hooks, ev)) = event {
        hooks.enqueue_in(&mut tx, ev, now_ms).await?;
    }
    tx.commit().await
}

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
            peak_up_rate: row.try_get("peak_up_rate")?,
            peak_down_rate: row.try_get("peak_down_rate")?,
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
