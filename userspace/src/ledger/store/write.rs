//! Writing one flush: one transaction, fed in chunks (`BatchWriter`). SQLite gets multi-row
//! upserts whose values are bound in place; PostgreSQL one `UNNEST` of a text array per column
//! (one small prepared statement for any number of rows). Buffers are reused for every chunk, so
//! a row costs no allocation of its own.

use std::{fmt::Write as _, net::IpAddr, sync::Arc};

use sqlx::{AnyConnection, Arguments as _, any::AnyArguments, query::Query};

use super::{DAY_MS, HOUR_MS};
use crate::{
    db::{Backend, Database, to_db},
    ledger::state::{ClientState, MinuteRow, ResetRecord, Totals},
};

/// Rows per multi-row statement (well under SQLite's 32766 parameters and PostgreSQL's 65535).
pub const ROWS_PER_STATEMENT: usize = 500;

type AnyQuery<'q> = Query<'q, sqlx::Any, AnyArguments<'q>>;

/// What one multi-row upsert writes: its head (`INSERT INTO t (cols)`), its column count, its
/// tail (`ON CONFLICT ...`), how one row binds its values (after the node id and address), and
/// for PostgreSQL the element type of each column after the node id and how a row appends its
/// values to the column arrays (after the address). `node_once`: the node id is not a column of
/// the rows but one parameter in the tail, bound after them (a text value fewer a row).
struct Upsert<T: 'static> {
    head: &'static str,
    cols: usize,
    tail: &'static str,
    node_once: bool,
    ip: fn(&T) -> IpAddr,
    bind: for<'q> fn(AnyQuery<'q>, &'q T) -> AnyQuery<'q>,
    pg_types: &'static [&'static str],
    pg_values: fn(&mut Arrays, &T),
}

/// One PostgreSQL array literal per column (`{v1,v2,...}`), written row by row: the values are
/// addresses, numbers, UUIDs and NULL, which need no quoting.
#[derive(Default)]
struct Arrays {
    cols: Vec<String>,
    at: usize,
}

impl Arrays {
    fn start(&mut self, cols: usize) {
        self.cols.resize_with(cols, String::new);
        for c in &mut self.cols {
            c.clear();
            c.push('{');
        }
    }

    /// The next column of this row.
    fn value(&mut self, v: impl std::fmt::Display) {
        let c = &mut self.cols[self.at];
        if c.len() > 1 {
            c.push(',');
        }
        let _ = write!(c, "{v}");
        self.at += 1;
    }

    fn int(&mut self, v: u64) {
        self.value(to_db(v));
    }

    fn null_or(&mut self, v: Option<u64>) {
        match v {
            Some(v) => self.int(v),
            None => self.value("NULL"),
        }
    }

    fn real(&mut self, v: f32) {
        self.value(if v.is_finite() { f64::from(v) } else { 0.0 });
    }

    fn counts(&mut self, t: &Totals) {
        for v in [t.up_bytes, t.up_packets, t.down_bytes, t.down_packets] {
            self.int(v);
        }
    }

    fn row(&mut self, ip: IpAddr) {
        self.at = 0;
        self.value(ip);
    }

    fn finish(&mut self) {
        for c in &mut self.cols {
            c.push('}');
        }
    }
}

const CLIENTS: Upsert<(IpAddr, ClientState)> = Upsert {
    head: "INSERT INTO clients (node_id, ip, first_seen_unix_ms, last_seen_unix_ms, period_started_unix_ms, \
           cursor_up_bytes, cursor_up_packets, cursor_down_bytes, cursor_down_packets, \
           total_up_bytes, total_up_packets, total_down_bytes, total_down_packets, \
           base_up_bytes, base_up_packets, base_down_bytes, base_down_packets)",
    cols: 17,
    tail: "ON CONFLICT (node_id, ip) DO UPDATE SET last_seen_unix_ms = excluded.last_seen_unix_ms, \
           period_started_unix_ms = excluded.period_started_unix_ms, \
           cursor_up_bytes = excluded.cursor_up_bytes, cursor_up_packets = excluded.cursor_up_packets, \
           cursor_down_bytes = excluded.cursor_down_bytes, cursor_down_packets = excluded.cursor_down_packets, \
           total_up_bytes = excluded.total_up_bytes, total_up_packets = excluded.total_up_packets, \
           total_down_bytes = excluded.total_down_bytes, total_down_packets = excluded.total_down_packets, \
           base_up_bytes = excluded.base_up_bytes, base_up_packets = excluded.base_up_packets, \
           base_down_bytes = excluded.base_down_bytes, base_down_packets = excluded.base_down_packets",
    node_once: false,
    ip: |(ip, _)| *ip,
    bind: bind_client,
    pg_types: &[
        "text", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint",
        "bigint", "bigint", "bigint", "bigint", "bigint",
    ],
    pg_values: |a, (_, c)| {
        a.int(c.first_seen_ms);
        a.null_or(c.last_seen_ms());
        a.int(c.period_started_ms);
        a.counts(&c.cursor);
        a.counts(&c.total);
        a.counts(&c.base);
    },
};

/// SQLite: the columns of a stored client row that a flush moves (last seen, cursor, totals),
/// for rows known to be in the database; first seen, period start and base change only by an
/// insert or a reset, which write the whole row (`CLIENTS`). Never used for PostgreSQL.
const CLIENT_UPDATES: Upsert<(IpAddr, ClientState)> = Upsert {
    head: "UPDATE clients SET last_seen_unix_ms = v.column2, \
           cursor_up_bytes = v.column3, cursor_up_packets = v.column4, \
           cursor_down_bytes = v.column5, cursor_down_packets = v.column6, \
           total_up_bytes = v.column7, total_up_packets = v.column8, \
           total_down_bytes = v.column9, total_down_packets = v.column10 FROM (",
    cols: 10,
    tail: ") AS v WHERE clients.node_id = ? AND clients.ip = v.column1",
    node_once: true,
    ip: |(ip, _)| *ip,
    bind: |q, (_, c)| counts(counts(q.bind(c.last_seen_ms().map(to_db)), &c.cursor), &c.total),
    pg_types: &[],
    pg_values: |_, _| {},
};

const MINUTES: Upsert<MinuteRow> = Upsert {
    head: "INSERT INTO usage_minute (node_id, ip, start_unix_ms, up_bytes, up_packets, down_bytes, down_packets, \
           peak_up_rate, peak_down_rate)",
    cols: 9,
    tail: "ON CONFLICT (node_id, ip, start_unix_ms) DO UPDATE SET \
           up_bytes = usage_minute.up_bytes + excluded.up_bytes, \
           up_packets = usage_minute.up_packets + excluded.up_packets, \
           down_bytes = usage_minute.down_bytes + excluded.down_bytes, \
           down_packets = usage_minute.down_packets + excluded.down_packets, \
           peak_up_rate = CASE WHEN excluded.peak_up_rate > usage_minute.peak_up_rate \
           THEN excluded.peak_up_rate ELSE usage_minute.peak_up_rate END, \
           peak_down_rate = CASE WHEN excluded.peak_down_rate > usage_minute.peak_down_rate \
           THEN excluded.peak_down_rate ELSE usage_minute.peak_down_rate END",
    node_once: false,
    ip: |((_, ip), _)| *ip,
    bind: bind_minute,
    pg_types: &["text", "bigint", "bigint", "bigint", "bigint", "bigint", "double precision", "double precision"],
    pg_values: |a, ((start, _), b)| {
        a.int(*start);
        a.counts(&b.totals);
        a.real(b.peak_up_rate);
        a.real(b.peak_down_rate);
    },
};

const RESETS: Upsert<ResetRecord> = Upsert {
    head: "INSERT INTO resets (node_id, ip, id, at_unix_ms, period_started_unix_ms, up_bytes, up_packets, \
           down_bytes, down_packets)",
    cols: 9,
    tail: "",
    node_once: false,
    ip: |r| r.ip,
    bind: bind_reset,
    pg_types: &["text", "text", "bigint", "bigint", "bigint", "bigint", "bigint", "bigint"],
    pg_values: |a, r| {
        a.value(&r.id);
        a.int(r.at_ms);
        a.int(r.period_started_ms);
        a.counts(&r.closed);
    },
};

fn counts<'q>(q: AnyQuery<'q>, t: &Totals) -> AnyQuery<'q> {
    q.bind(to_db(t.up_bytes)).bind(to_db(t.up_packets)).bind(to_db(t.down_bytes)).bind(to_db(t.down_packets))
}

fn bind_client<'q>(q: AnyQuery<'q>, (_, c): &'q (IpAddr, ClientState)) -> AnyQuery<'q> {
    let q = q.bind(to_db(c.first_seen_ms)).bind(c.last_seen_ms().map(to_db)).bind(to_db(c.period_started_ms));
    counts(counts(counts(q, &c.cursor), &c.total), &c.base)
}

fn bind_minute<'q>(q: AnyQuery<'q>, ((start, _), b): &'q MinuteRow) -> AnyQuery<'q> {
    counts(q.bind(to_db(*start)), &b.totals).bind(f64::from(b.peak_up_rate)).bind(f64::from(b.peak_down_rate))
}

fn bind_reset<'q>(q: AnyQuery<'q>, r: &'q ResetRecord) -> AnyQuery<'q> {
    counts(q.bind(r.id.as_str()).bind(to_db(r.at_ms)).bind(to_db(r.period_started_ms)), &r.closed)
}

/// One flush's transaction.
pub struct BatchWriter<'c> {
    tx: sqlx::Transaction<'c, sqlx::Any>,
    backend: Backend,
    node: &'c str,
    /// The oldest minute written: its hour and day are rolled up again.
    oldest_minute: Option<u64>,
    /// The addresses of one chunk as text, and where each ends.
    ips: String,
    ends: Vec<usize>,
    /// Statement texts by (table head, rows), made once.
    texts: Vec<(&'static str, usize, Arc<str>)>,
    /// PostgreSQL: the column arrays of one chunk.
    arrays: Arrays,
}

impl<'c> BatchWriter<'c> {
    pub async fn begin(db: &'c Database, node: &'c str) -> Result<BatchWriter<'c>, sqlx::Error> {
        Ok(BatchWriter {
            tx: db.writer.begin().await?,
            backend: db.backend,
            node,
            oldest_minute: None,
            ips: String::new(),
            ends: Vec::new(),
            texts: Vec::new(),
            arrays: Arrays::default(),
        })
    }

    /// The transaction, for writes of other modules (a webhook event) that must commit with it.
    pub fn conn(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }

    /// A new kernel epoch: recorded, and every stored cursor of this node back to zero, as the
    /// poll did in memory (nothing of the new counters is in the ledger yet). After this commits,
    /// the clients' rows can follow in transactions of their own.
    pub async fn epoch(&mut self, epoch: &str, now_ms: u64) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE nodes SET kernel_epoch = $1, updated_unix_ms = $2 WHERE node_id = $3")
            .bind(epoch)
            .bind(to_db(now_ms))
            .bind(self.node)
            .execute(&mut *self.tx)
            .await?;
        sqlx::query(
            "UPDATE clients SET cursor_up_bytes = 0, cursor_up_packets = 0, cursor_down_bytes = 0, \
             cursor_down_packets = 0 WHERE node_id = $1",
        )
        .bind(self.node)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Client rows (cursor, totals, base), replacing the stored ones. On SQLite the rows known
    /// to be stored only get their moving columns updated (`CLIENT_UPDATES`: 10 values a row
    /// instead of 17, and no insert attempt); a statement that finds fewer rows than it was given
    /// (a row deleted behind the daemon's back) is upserted whole after all. `rows` is reordered
    /// (stored ones first, each part in its order).
    pub async fn clients(&mut self, rows: &mut [(IpAddr, ClientState)]) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            return self.upsert(&CLIENTS, rows).await;
        }
        // Nearly always every row is stored already: no sort (and no sort buffer) then.
        if !rows.is_sorted_by_key(|(_, c)| !c.stored) {
            rows.sort_by_key(|(_, c)| !c.stored);
        }
        let (stored, new) = rows.split_at(rows.partition_point(|(_, c)| c.stored));
        for chunk in stored.chunks(ROWS_PER_STATEMENT) {
            if self.statement(&CLIENT_UPDATES, chunk).await? < chunk.len() as u64 {
                self.upsert(&CLIENTS, chunk).await?;
            }
        }
        self.upsert(&CLIENTS, new).await
    }

    /// Minute usage, added to the stored minutes.
    pub async fn usage(&mut self, rows: &[MinuteRow]) -> Result<(), sqlx::Error> {
        if let Some(oldest) = rows.iter().map(|((start, _), _)| *start).min() {
            self.oldest_minute = Some(self.oldest_minute.map_or(oldest, |o| o.min(oldest)));
        }
        self.upsert(&MINUTES, rows).await
    }

    pub async fn reset(&mut self, r: &ResetRecord) -> Result<(), sqlx::Error> {
        self.upsert(&RESETS, std::slice::from_ref(r)).await
    }

    /// Lower the roll-up watermarks to the oldest minute written (those hours and days are
    /// rolled up again), then commit.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        if let Some(oldest) = self.oldest_minute {
            sqlx::query(
                "UPDATE nodes SET \
                 hours_rolled_until_ms = CASE WHEN hours_rolled_until_ms > $1 THEN $1 ELSE hours_rolled_until_ms END, \
                 days_rolled_until_ms = CASE WHEN days_rolled_until_ms > $2 THEN $2 ELSE days_rolled_until_ms END \
                 WHERE node_id = $3",
            )
            .bind(to_db(oldest - oldest % HOUR_MS))
            .bind(to_db(oldest - oldest % DAY_MS))
            .bind(self.node)
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await
    }

    /// `rows` in statements of up to ROWS_PER_STATEMENT rows.
    async fn upsert<T>(&mut self, u: &Upsert<T>, rows: &[T]) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            return self.upsert_arrays(u, rows).await;
        }
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            self.statement(u, chunk).await?;
        }
        Ok(())
    }

    /// SQLite: one statement of `u` for `chunk` (at most ROWS_PER_STATEMENT rows); the rows it
    /// changed.
    async fn statement<T>(&mut self, u: &Upsert<T>, chunk: &[T]) -> Result<u64, sqlx::Error> {
        self.ips.clear();
        self.ends.clear();
        for row in chunk {
            let _ = write!(self.ips, "{}", (u.ip)(row));
            self.ends.push(self.ips.len());
        }
        let text = self.text(u, chunk.len());
        // Only full chunks keep their prepared statement: the last chunk's size differs from
        // flush to flush, and each size kept would hold another large statement in the
        // writer connection's cache.
        // The arguments sized up front: grown by doubling, a 500-row statement's buffer
        // was reallocated a dozen times a statement (perf at 100,000 clients), the largest
        // transient allocation of a flush.
        let mut args = AnyArguments::default();
        args.reserve(chunk.len() * u.cols, 0);
        let mut q = sqlx::query_with(&text, args).persistent(chunk.len() == ROWS_PER_STATEMENT);
        let mut from = 0;
        for (row, end) in chunk.iter().zip(&self.ends) {
            if !u.node_once {
                q = q.bind(self.node);
            }
            q = (u.bind)(q.bind(&self.ips[from..*end]), row);
            from = *end;
        }
        if u.node_once {
            q = q.bind(self.node);
        }
        Ok(q.execute(&mut *self.tx).await?.rows_affected())
    }

    /// PostgreSQL: `rows` in statements of up to ROWS_PER_STATEMENT rows, each column one text
    /// array (`INSERT ... SELECT $1, u.* FROM UNNEST($2::text[], ...) AS u <tail>`): one
    /// statement text, prepared once, for every size; the server parses an array per column
    /// instead of a parameter per value.
    async fn upsert_arrays<T>(&mut self, u: &Upsert<T>, rows: &[T]) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            self.arrays.start(u.pg_types.len());
            for row in chunk {
                self.arrays.row((u.ip)(row));
                (u.pg_values)(&mut self.arrays, row);
            }
            self.arrays.finish();
            let text = self.text(u, 0);
            let mut q = sqlx::query(&text).bind(self.node);
            for col in &self.arrays.cols {
                q = q.bind(col.as_str());
            }
            q.execute(&mut *self.tx).await?;
        }
        Ok(())
    }

    /// SQLite: `INSERT ... VALUES (...), (...) <tail>` for `rows` rows, with anonymous `?`
    /// placeholders: SQLite resolves a numbered one by walking a list of every parameter name,
    /// which makes binding a statement with thousands of `$N` quadratic (measured: 100 µs a row
    /// at 500 rows a statement). One text per size, so the driver prepares each once.
    /// PostgreSQL: the arrays' form, one text for any number of rows (`rows` is 0).
    fn text<T>(&mut self, u: &Upsert<T>, rows: usize) -> Arc<str> {
        if let Some((_, _, t)) = self.texts.iter().find(|(h, n, _)| *h == u.head && *n == rows) {
            return t.clone();
        }
        let mut sql = String::with_capacity(u.head.len() + u.tail.len() + rows * u.cols * 3 + 300);
        sql.push_str(u.head);
        if self.backend == Backend::Postgres {
            sql.push_str(" SELECT $1, u.* FROM UNNEST(");
            for (i, ty) in u.pg_types.iter().enumerate() {
                let _ = write!(sql, "{}${}::{ty}[]", if i == 0 { "" } else { ", " }, i + 2);
            }
            sql.push_str(") AS u");
        } else {
            sql.push_str(" VALUES ");
            for i in 0..rows {
                sql.push_str(if i == 0 { "(" } else { ", (" });
                for c in 0..u.cols {
                    sql.push_str(if c == 0 { "?" } else { ", ?" });
                }
                sql.push(')');
            }
        }
        sql.push(' ');
        sql.push_str(u.tail);
        let sql: Arc<str> = sql.into();
        self.texts.push((u.head, rows, sql.clone()));
        sql
    }
}
