//! The SQL of the outbox (migrations/20261123000003_webhooks.sql): writing events, finding the
//! due head of each (endpoint, subject) queue, recording attempts, and the reads of the API.
//! Portable statements with `$N` placeholders (SQLite and PostgreSQL through sqlx `Any`).

use serde::Serialize;
use sqlx::{AnyConnection, Row as _, any::AnyRow};

use crate::db::{Database, from_db, to_db};

/// Highest sequence number of the node (0 if none).
pub(crate) async fn max_seq(db: &Database, node: &str) -> Result<i64, sqlx::Error> {
    let row = sqlx::query("SELECT CAST(COALESCE(MAX(seq), 0) AS BIGINT) AS m FROM webhook_events WHERE node_id = $1")
        .bind(node)
        .fetch_one(&db.pool)
        .await?;
    row.try_get("m")
}

/// One event to write.
pub(crate) struct NewEvent<'a> {
    pub seq: i64,
    pub id: &'a str,
    pub kind: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub created_ms: u64,
}

/// Insert the event and one pending outbox row per endpoint (due at once).
pub(crate) async fn insert_event(
    conn: &mut AnyConnection,
    node: &str,
    ev: &NewEvent<'_>,
    endpoints: &[&str],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO webhook_events (node_id, seq, id, kind, subject, body, created_unix_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(node)
    .bind(ev.seq)
    .bind(ev.id)
    .bind(ev.kind)
    .bind(ev.subject)
    .bind(ev.body)
    .bind(to_db(ev.created_ms))
    .execute(&mut *conn)
    .await?;
    for ep in endpoints {
        sqlx::query(
            "INSERT INTO webhook_outbox (node_id, seq, endpoint, subject, attempts, next_attempt_unix_ms) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(node)
        .bind(ev.seq)
        .bind(*ep)
        .bind(ev.subject)
        .bind(to_db(ev.created_ms))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// The head (oldest pending event) of one (endpoint, subject) queue.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub seq: i64,
    pub subject: String,
    pub attempts: u64,
    pub next_attempt_ms: u64,
    pub id: String,
    pub kind: String,
    pub body: String,
}

/// The heads of `endpoint`'s queues, earliest due first (at most `limit`). Only a head may be
/// attempted: an event never goes out while an older one of its subject is pending.
pub(crate) async fn heads(db: &Database, node: &str, endpoint: &str, limit: usize) -> Result<Vec<Head>, sqlx::Error> {
    // The heads first (one pass over the pending index), then their rows: filtering every
    // pending row with "no older pending sibling" in next-attempt order would walk the whole
    // backlog (non-head rows keep their enqueue time as next attempt, so they sort first).
    // CROSS JOIN: SQLite then keeps this join order (heads, then one primary-key lookup each);
    // the bundled SQLite otherwise walks the due index once per head (tens of ms per scan with
    // a few hundred pending rows). PostgreSQL plans it the same as JOIN ... ON.
    let rows = sqlx::query(
        "SELECT o.seq, o.subject, o.attempts, o.next_attempt_unix_ms, e.id, e.kind, e.body \
         FROM (SELECT subject, MIN(seq) AS seq FROM webhook_outbox \
               WHERE node_id = $1 AND endpoint = $2 AND delivered_unix_ms IS NULL GROUP BY subject) h \
         CROSS JOIN webhook_outbox o CROSS JOIN webhook_events e \
         WHERE o.node_id = $1 AND o.endpoint = $2 AND o.seq = h.seq \
           AND e.node_id = o.node_id AND e.seq = o.seq \
         ORDER BY o.next_attempt_unix_ms, o.seq LIMIT $3",
    )
    .bind(node)
    .bind(endpoint)
    .bind(to_db(limit as u64))
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Head {
                seq: r.try_get("seq")?,
                subject: r.try_get("subject")?,
                attempts: from_db(r.try_get("attempts")?),
                next_attempt_ms: from_db(r.try_get("next_attempt_unix_ms")?),
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                body: r.try_get("body")?,
            })
        })
        .collect()
}

/// Which of the sequence numbers in `lo..=hi` have committed events.
pub(crate) async fn visible_seqs(db: &Database, node: &str, lo: i64, hi: i64) -> Result<Vec<i64>, sqlx::Error> {
    let rows = sqlx::query("SELECT seq FROM webhook_events WHERE node_id = $1 AND seq >= $2 AND seq <= $3")
        .bind(node)
        .bind(lo)
        .bind(hi)
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(|r| r.try_get("seq")).collect()
}

/// The result of one attempt, to be recorded.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub endpoint: String,
    pub seq: i64,
    pub subject: String,
    pub event_id: String,
    /// 1 for the first attempt.
    pub attempt: u64,
    pub at_ms: u64,
    pub duration_ms: u64,
    pub status: Option<u16>,
    /// None: delivered.
    pub error: Option<String>,
    /// When to try again (ignored when delivered).
    pub next_attempt_ms: u64,
}

impl Outcome {
    pub fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// Log the attempt and update the outbox row, in one transaction.
pub(crate) async fn record(db: &Database, node: &str, o: &Outcome) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    // ON CONFLICT: a retried write of an outcome whose first write committed.
    sqlx::query(
        "INSERT INTO webhook_attempts (node_id, seq, endpoint, attempt, at_unix_ms, status, error, duration_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(node)
    .bind(o.seq)
    .bind(&o.endpoint)
    .bind(to_db(o.attempt))
    .bind(to_db(o.at_ms))
    .bind(o.status.map(i64::from))
    .bind(o.error.as_deref())
    .bind(to_db(o.duration_ms))
    .execute(&mut *tx)
    .await?;
    let delivered = o.delivered().then_some(to_db(o.at_ms + o.duration_ms));
    // attempts only grows (CASE: a late duplicate write must not lower it).
    sqlx::query(
        "UPDATE webhook_outbox SET \
            attempts = CASE WHEN attempts > $4 THEN attempts ELSE $4 END, \
            delivered_unix_ms = $5, next_attempt_unix_ms = $6, last_error = $7, last_status = $8 \
         WHERE node_id = $1 AND endpoint = $2 AND seq = $3 AND delivered_unix_ms IS NULL",
    )
    .bind(node)
    .bind(&o.endpoint)
    .bind(o.seq)
    .bind(to_db(o.attempt))
    .bind(delivered)
    .bind(to_db(o.next_attempt_ms))
    .bind(o.error.as_deref())
    .bind(o.status.map(i64::from))
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

// ---- reads for the API -------------------------------------------------------------------

/// Outbox counts of one endpoint name (configured or not).
#[derive(Debug, Clone, Default)]
pub struct EndpointCounts {
    pub endpoint: String,
    pub pending: u64,
    pub delivered: u64,
    pub failed_attempts: u64,
    /// Creation time of the oldest pending event.
    pub oldest_pending_unix_ms: Option<u64>,
}

/// Counts per endpoint name found in the outbox or the log, sorted by name.
pub async fn endpoint_counts(db: &Database, node: &str) -> Result<Vec<EndpointCounts>, sqlx::Error> {
    let mut out: std::collections::BTreeMap<String, EndpointCounts> = Default::default();
    let rows = sqlx::query(
        "SELECT o.endpoint, CAST(COUNT(*) AS BIGINT) AS n, CAST(COUNT(o.delivered_unix_ms) AS BIGINT) AS delivered, \
            MIN(CASE WHEN o.delivered_unix_ms IS NULL THEN e.created_unix_ms END) AS oldest \
         FROM webhook_outbox o JOIN webhook_events e ON e.node_id = o.node_id AND e.seq = o.seq \
         WHERE o.node_id = $1 GROUP BY o.endpoint",
    )
    .bind(node)
    .fetch_all(&db.pool)
    .await?;
    for r in &rows {
        let name: String = r.try_get("endpoint")?;
        let n = from_db(r.try_get("n")?);
        let delivered = from_db(r.try_get("delivered")?);
        let c = out.entry(name.clone()).or_insert_with(|| EndpointCounts { endpoint: name, ..Default::default() });
        c.pending = n.saturating_sub(delivered);
        c.delivered = delivered;
        c.oldest_pending_unix_ms = r.try_get::<Option<i64>, _>("oldest")?.map(from_db);
    }
    let rows = sqlx::query(
        "SELECT endpoint, CAST(COUNT(*) AS BIGINT) AS n FROM webhook_attempts \
         WHERE node_id = $1 AND error IS NOT NULL GROUP BY endpoint",
    )
    .bind(node)
    .fetch_all(&db.pool)
    .await?;
    for r in &rows {
        let name: String = r.try_get("endpoint")?;
        let c = out.entry(name.clone()).or_insert_with(|| EndpointCounts { endpoint: name, ..Default::default() });
        c.failed_attempts = from_db(r.try_get("n")?);
    }
    Ok(out.into_values().collect())
}

/// Where one event stands at one endpoint.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryState {
    pub endpoint: String,
    /// When a 2xx answer came (null: pending).
    pub delivered_unix_ms: Option<u64>,
    /// Attempts so far.
    pub attempts: u64,
    /// HTTP status of the last attempt (null: none yet, or no response).
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    /// When the next attempt is due (null once delivered). An event whose older sibling (same
    /// subject) is pending waits for it whatever this says.
    pub next_attempt_unix_ms: Option<u64>,
}

/// One event with its delivery state at each endpoint.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub id: String,
    pub seq: u64,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub created_unix_ms: u64,
    /// The event's `data`, as sent.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub deliveries: Vec<DeliveryState>,
}

fn event_view(r: &AnyRow) -> Result<EventView, sqlx::Error> {
    let body: String = r.try_get("body")?;
    let data = match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(mut v) => v.get_mut("data").map(serde_json::Value::take).unwrap_or_default(),
        Err(e) => {
            // Only the daemon writes this column; say so loudly rather than hide it.
            tracing::error!(%e, "stored webhook body is not JSON");
            serde_json::Value::Null
        }
    };
    Ok(EventView {
        id: r.try_get("id")?,
        seq: from_db(r.try_get("seq")?),
        kind: r.try_get("kind")?,
        subject: r.try_get("subject")?,
        created_unix_ms: from_db(r.try_get("created_unix_ms")?),
        data,
        deliveries: Vec::new(),
    })
}

fn status(v: Option<i64>) -> Option<u16> {
    v.and_then(|s| u16::try_from(s).ok())
}

/// The newest `limit` events (of `subject` if given), newest first.
pub async fn events(
    db: &Database,
    node: &str,
    limit: u32,
    subject: Option<&str>,
) -> Result<Vec<EventView>, sqlx::Error> {
    let sql = if subject.is_some() {
        "SELECT seq, id, kind, subject, body, created_unix_ms FROM webhook_events \
         WHERE node_id = $1 AND subject = $3 ORDER BY seq DESC LIMIT $2"
    } else {
        "SELECT seq, id, kind, subject, body, created_unix_ms FROM webhook_events \
         WHERE node_id = $1 ORDER BY seq DESC LIMIT $2"
    };
    let mut q = sqlx::query(sql).bind(node).bind(i64::from(limit));
    if let Some(s) = subject {
        q = q.bind(s);
    }
    let mut evs = q.fetch_all(&db.pool).await?.iter().map(event_view).collect::<Result<Vec<_>, _>>()?;
    let (Some(hi), Some(lo)) = (evs.first().map(|e| e.seq), evs.last().map(|e| e.seq)) else {
        return Ok(evs);
    };
    let rows = sqlx::query(
        "SELECT seq, endpoint, attempts, next_attempt_unix_ms, delivered_unix_ms, last_error, last_status \
         FROM webhook_outbox WHERE node_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq, endpoint",
    )
    .bind(node)
    .bind(to_db(lo))
    .bind(to_db(hi))
    .fetch_all(&db.pool)
    .await?;
    let index: std::collections::HashMap<u64, usize> = evs.iter().enumerate().map(|(i, e)| (e.seq, i)).collect();
    for r in &rows {
        let seq = from_db(r.try_get("seq")?);
        let Some(&i) = index.get(&seq) else { continue };
        let delivered = r.try_get::<Option<i64>, _>("delivered_unix_ms")?.map(from_db);
        evs[i].deliveries.push(DeliveryState {
            endpoint: r.try_get("endpoint")?,
            delivered_unix_ms: delivered,
            attempts: from_db(r.try_get("attempts")?),
            last_status: status(r.try_get("last_status")?),
            last_error: r.try_get("last_error")?,
            next_attempt_unix_ms: if delivered.is_some() {
                None
            } else {
                Some(from_db(r.try_get("next_attempt_unix_ms")?))
            },
        });
    }
    Ok(evs)
}

/// True if the node has an event with this id.
pub async fn event_exists(db: &Database, node: &str, id: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("SELECT 1 AS one FROM webhook_events WHERE node_id = $1 AND id = $2")
        .bind(node)
        .bind(id)
        .fetch_optional(&db.pool)
        .await?
        .is_some())
}

/// One row of the delivery log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub subject: String,
    pub endpoint: String,
    /// 1 for the first attempt of this event at this endpoint.
    pub attempt: u64,
    pub at_unix_ms: u64,
    /// HTTP status (null: no response: refused, timeout, ...).
    pub status: Option<u16>,
    /// Why it failed (null: delivered).
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// The delivery log, newest first, optionally of one event and/or one endpoint.
pub async fn attempts(
    db: &Database,
    node: &str,
    event: Option<&str>,
    endpoint: Option<&str>,
    limit: u32,
) -> Result<Vec<AttemptView>, sqlx::Error> {
    let mut sql = String::from(
        "SELECT a.endpoint, a.attempt, a.at_unix_ms, a.status, a.error, a.duration_ms, e.id, e.kind, e.subject \
         FROM webhook_attempts a JOIN webhook_events e ON e.node_id = a.node_id AND e.seq = a.seq \
         WHERE a.node_id = $1",
    );
    let mut n = 2;
    if event.is_some() {
        sql.push_str(&format!(" AND e.id = ${n}"));
        n += 1;
    }
    if endpoint.is_some() {
        sql.push_str(&format!(" AND a.endpoint = ${n}"));
        n += 1;
    }
    sql.push_str(&format!(" ORDER BY a.at_unix_ms DESC, a.seq DESC, a.attempt DESC LIMIT ${n}"));
    let mut q = sqlx::query(&sql).bind(node);
    if let Some(e) = event {
        q = q.bind(e);
    }
    if let Some(e) = endpoint {
        q = q.bind(e);
    }
    q = q.bind(i64::from(limit));
    q.fetch_all(&db.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(AttemptView {
                event_id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                subject: r.try_get("subject")?,
                endpoint: r.try_get("endpoint")?,
                attempt: from_db(r.try_get("attempt")?),
                at_unix_ms: from_db(r.try_get("at_unix_ms")?),
                status: status(r.try_get("status")?),
                error: r.try_get("error")?,
                duration_ms: from_db(r.try_get("duration_ms")?),
            })
        })
        .collect()
}
