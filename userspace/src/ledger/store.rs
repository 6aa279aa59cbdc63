//! SQL for the ledger: load at start-up, write one batch per transaction, read history.
//!
//! The same statements run on SQLite and PostgreSQL (`$N` placeholders, `ON CONFLICT` upserts,
//! `CASE` instead of the dialects' two-argument max).

use std::{collections::HashMap, fmt::Write as _, net::IpAddr};

use serde::Serialize;
use sqlx::{AnyConnection, Row as _, any::AnyRow};

use super::state::{Bucket, ClientState, FlushBatch, ResetRecord, Totals};
use crate::db::{Database, from_db, to_db};

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

/// `INSERT ... VALUES (...), (...) <tail>` in chunks.
async fn insert_rows(
    conn: &mut AnyConnection,
    head: &str,
    cols: usize,
    rows: &[Vec<V>],
    tail: &str,
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::with_capacity(head.len() + tail.len() + chunk.len() * cols * 6);
        sql.push_str(head);
        sql.push_str(" VALUES ");
        let mut n = 0;
        for (i, _) in chunk.iter().enumerate() {
            sql.push_str(if i == 0 { "(" } else { ", (" });
            for c in 0..cols {
                n += 1;
                let _ = write!(sql, "{}${n}", if c == 0 { "" } else { ", " });
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        let mut q = sqlx::query(&sql);
        for row in chunk {
            debug_assert_eq!(row.len(), cols);
            for v in row {
                q = match v {
                    V::I(x) => q.bind(*x),
                    V::F(x) => q.bind(*x),
                    V::T(x) => q.bind(x.as_str()),
                    V::N(x) => q.bind(*x),
                };
            }
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

fn totals(row: &AnyRow, prefix: &str) -> Result<Totals, sqlx::Error> {
    let g = |c: &str| row.try_get::<i64, _>(format!("{prefix}_{c}").as_str()).map(from_db);
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
                cursor: totals(&row, "cursor")?,
                total: totals(&row, "total")?,
                base: totals(&row, "base")?,
                up_rate: 0.0,
                down_rate: 0.0,
            },
        ));
    }
    Ok(out)
}

fn counts(t: &Totals) -> [V; 4] {
    [V::I(to_db(t.up_bytes)), V::I(to_db(t.up_packets)), V::I(to_db(t.down_bytes)), V::I(to_db(t.down_packets))]
}

/// Sum minute buckets into coarser ones (exact sums, peak = max of the peaks).
fn roll_up(buckets: &[((u64, IpAddr), Bucket)], len_ms: u64) -> Vec<((u64, IpAddr), Bucket)> {
    let mut m: HashMap<(u64, IpAddr), Bucket> = HashMap::new();
    for ((start, ip), b) in buckets {
        m.entry((start - start % len_ms, *ip)).or_default().merge(b);
    }
    m.into_iter().collect()
}

/// Write one batch in one transaction: the epoch, client rows (cursor, totals, base), usage
/// at three granularities, and the reset if there is one.
pub async fn write_batch(db: &Database, node: &str, b: &FlushBatch, now_ms: u64) -> Result<(), sqlx::Error> {
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
        let rows: Vec<Vec<V>> = b
            .clients
            .iter()
            .map(|(ip, c)| {
                let mut v = vec![
                    V::T(node.to_string()),
                    V::T(ip.to_string()),
                    V::I(to_db(c.first_seen_ms)),
                    V::N(c.last_seen_ms.map(to_db)),
                    V::I(to_db(c.period_started_ms)),
                ];
                v.extend(counts(&c.cursor));
                v.extend(counts(&c.total));
                v.extend(counts(&c.base));
                v
            })
            .collect();
        let set: Vec<String> = ["cursor", "total", "base"]
            .iter()
            .flat_map(|p| {
                ["up_bytes", "up_packets", "down_bytes", "down_packets"].map(|c| format!("{p}_{c} = excluded.{p}_{c}"))
            })
            .collect();
        insert_rows(
            &mut tx,
            "INSERT INTO clients (node_id, ip, first_seen_unix_ms, last_seen_unix_ms, period_started_unix_ms, \
             cursor_up_bytes, cursor_up_packets, cursor_down_bytes, cursor_down_packets, \
             total_up_bytes, total_up_packets, total_down_bytes, total_down_packets, \
             base_up_bytes, base_up_packets, base_down_bytes, base_down_packets)",
            17,
            &rows,
            &format!(
                "ON CONFLICT (node_id, ip) DO UPDATE SET last_seen_unix_ms = excluded.last_seen_unix_ms, \
                 period_started_unix_ms = excluded.period_started_unix_ms, {}",
                set.join(", ")
            ),
        )
        .await?;
    }
    if !b.buckets.is_empty() {
        for g in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
            let rolled;
            let buckets = if g == Granularity::Minute {
                &b.buckets
            } else {
                rolled = roll_up(&b.buckets, g.len_ms());
                &rolled
            };
            let rows: Vec<Vec<V>> = buckets
                .iter()
                .map(|((start, ip), bk)| {
                    let mut v = vec![V::T(node.to_string()), V::T(ip.to_string()), V::I(to_db(*start))];
                    v.extend(counts(&bk.totals));
                    v.extend([V::F(bk.peak_up_rate), V::F(bk.peak_down_rate)]);
                    v
                })
                .collect();
            let t = g.table();
            let add = |c: &str| format!("{c} = {t}.{c} + excluded.{c}");
            let max = |c: &str| format!("{c} = CASE WHEN excluded.{c} > {t}.{c} THEN excluded.{c} ELSE {t}.{c} END");
            insert_rows(
                &mut tx,
                &format!(
                    "INSERT INTO {t} (node_id, ip, start_unix_ms, up_bytes, up_packets, down_bytes, down_packets, \
                     peak_up_rate, peak_down_rate)"
                ),
                9,
                &rows,
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
        }
    }
    if let Some(r) = &b.reset {
        let mut row = vec![
            V::T(r.id.clone()),
            V::T(node.to_string()),
            V::T(r.ip.to_string()),
            V::I(to_db(r.at_ms)),
            V::I(to_db(r.period_started_ms)),
        ];
        row.extend(counts(&r.closed));
        insert_rows(
            &mut tx,
            "INSERT INTO resets (id, node_id, ip, at_unix_ms, period_started_unix_ms, up_bytes, up_packets, \
             down_bytes, down_packets)",
            9,
            &[row],
            "",
        )
        .await?;
    }
    tx.commit().await
}

/// One history bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    pub start_ms: u64,
    pub bucket: Bucket,
}

/// History buckets of one client starting in `[from, to)`.
pub async fn history(
    db: &Database,
    node: &str,
    ip: IpAddr,
    g: Granularity,
    from_ms: u64,
    to_ms: u64,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT start_unix_ms, up_bytes, up_packets, down_bytes, down_packets, peak_up_rate, peak_down_rate \
         FROM {} WHERE node_id = $1 AND ip = $2 AND start_unix_ms >= $3 AND start_unix_ms < $4 \
         ORDER BY start_unix_ms",
        g.table()
    ))
    .bind(node)
    .bind(ip.to_string())
    .bind(to_db(from_ms))
    .bind(to_db(to_ms))
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            let g = |c: &str| row.try_get::<i64, _>(c).map(from_db);
            Ok(UsageRow {
                start_ms: g("start_unix_ms")?,
                bucket: Bucket {
                    totals: Totals {
                        up_bytes: g("up_bytes")?,
                        up_packets: g("up_packets")?,
                        down_bytes: g("down_bytes")?,
                        down_packets: g("down_packets")?,
                    },
                    peak_up_rate: row.try_get("peak_up_rate")?,
                    peak_down_rate: row.try_get("peak_down_rate")?,
                },
            })
        })
        .collect()
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
            let g = |c: &str| row.try_get::<i64, _>(c).map(from_db);
            let closed = Totals {
                up_bytes: g("up_bytes")?,
                up_packets: g("up_packets")?,
                down_bytes: g("down_bytes")?,
                down_packets: g("down_packets")?,
            };
            Ok(ResetRecord {
                id: row.try_get("id")?,
                ip,
                at_ms: g("at_unix_ms")?,
                period_started_ms: g("period_started_unix_ms")?,
                closed,
                new_base: Totals::default(),
            })
        })
        .collect()
}

/// Sum of every closed period of one client (for checks: closed periods + the current one
/// equal the client's total).
pub async fn closed_sum(db: &Database, node: &str, ip: IpAddr) -> Result<(u64, Totals), sqlx::Error> {
    let row = sqlx::query(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(SUM(up_bytes), 0) AS BIGINT) AS ub, \
         CAST(COALESCE(SUM(up_packets), 0) AS BIGINT) AS up, CAST(COALESCE(SUM(down_bytes), 0) AS BIGINT) AS db, \
         CAST(COALESCE(SUM(down_packets), 0) AS BIGINT) AS dp \
         FROM resets WHERE node_id = $1 AND ip = $2",
    )
    .bind(node)
    .bind(ip.to_string())
    .fetch_one(&db.pool)
    .await?;
    let g = |c: &str| row.try_get::<i64, _>(c).map(from_db);
    Ok((g("n")?, Totals { up_bytes: g("ub")?, up_packets: g("up")?, down_bytes: g("db")?, down_packets: g("dp")? }))
}

/// Delete history older than each granularity's retention (0 = keep forever).
pub async fn apply_retention(
    db: &Database,
    node: &str,
    now_ms: u64,
    keep_days: [(Granularity, u32); 3],
) -> Result<u64, sqlx::Error> {
    let mut deleted = 0;
    for (g, days) in keep_days {
        if days == 0 {
            continue;
        }
        let cutoff = now_ms.saturating_sub(u64::from(days) * DAY_MS);
        deleted += sqlx::query(&format!("DELETE FROM {} WHERE node_id = $1 AND start_unix_ms < $2", g.table()))
            .bind(node)
            .bind(to_db(cutoff))
            .execute(&db.pool)
            .await?
            .rows_affected();
    }
    Ok(deleted)
}
