//! SQL for the ledger: load at start-up and write one batch per transaction; reading,
//! rolling up and pruning history is in `history`.
//!
//! The same statements run on SQLite and PostgreSQL (`$N` placeholders, `ON CONFLICT` upserts,
//! `CASE` instead of the dialects' two-argument max).

use std::{fmt::Write as _, net::IpAddr};

use serde::Serialize;
use sqlx::{AnyConnection, Row as _, any::AnyRow};

mod history;

pub use history::{UsageRow, apply_retention, closed_sum, history, resets, roll_up};

use super::state::{ClientState, FlushBatch, Totals};
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
