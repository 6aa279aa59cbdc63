//! Opening, closing and replacing sessions, each in one transaction with its `session.*`
//! webhook event, so a session and its announcement are never apart.

use std::net::IpAddr;

use sqlx::{Any, AnyConnection, Transaction};
use tracing::{error, info};

use super::{NewSession, Session, active_on, active_on_filter, by_id, logged, validate};
use crate::{
    db::{Database, to_db},
    ledger::state::Totals,
    registry::{RegistryError, begin_write, is_foreign_key_violation, is_unique_violation, new_id},
    types::{CloseReason, SessionProtocol, SessionSource},
    webhook::{Event, EventKind, Webhooks},
};

fn event(kind: EventKind, s: &Session) -> Event {
    Event { kind, subject: s.client_ip.to_string(), data: serde_json::to_value(s).expect("a session serialises") }
}

fn conflict_active(ip: IpAddr, active: Option<&Session>) -> RegistryError {
    match active {
        Some(s) => RegistryError::Conflict(format!(
            "client {ip} has an active session {} (opened at {} ms by {}): close it first",
            s.id, s.opened_unix_ms, s.source
        )),
        None => RegistryError::Conflict(format!("client {ip} has an active session: close it first")),
    }
}

/// INSERT the session and enqueue `session.opened` on `conn` (a transaction).
async fn insert_on(
    conn: &mut AnyConnection,
    node: &str,
    hooks: &Webhooks,
    new: &NewSession,
    now_ms: u64,
) -> Result<Session, sqlx::Error> {
    let s = Session {
        id: new_id(),
        client_ip: new.client_ip,
        protocol: new.protocol,
        instance: new.instance.clone(),
        common_name: new.common_name.clone(),
        username: new.username.clone(),
        real_address: new.real_address.clone(),
        source: new.source,
        opened_unix_ms: now_ms,
        closed_unix_ms: None,
        close_reason: None,
        start_up_bytes: new.start.up_bytes,
        start_down_bytes: new.start.down_bytes,
        up_bytes: 0,
        down_bytes: 0,
    };
    sqlx::query(
        "INSERT INTO sessions (id, node_id, client_ip, protocol, instance, common_name, username, real_address, \
         source, opened_unix_ms, start_up_bytes, start_down_bytes, up_bytes, down_bytes) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, 0)",
    )
    .bind(&s.id)
    .bind(node)
    .bind(s.client_ip.to_string())
    .bind(s.protocol.as_str())
    .bind(&s.instance)
    .bind(&s.common_name)
    .bind(&s.username)
    .bind(&s.real_address)
    .bind(s.source.as_str())
    .bind(to_db(now_ms))
    .bind(to_db(s.start_up_bytes))
    .bind(to_db(s.start_down_bytes))
    .execute(&mut *conn)
    .await?;
    hooks.enqueue_in(conn, &event(EventKind::SessionOpened, &s), now_ms).await?;
    Ok(s)
}

/// Turn an INSERT failure into the error the caller should see (after the transaction is gone).
async fn insert_failed(db: &Database, node: &str, ip: IpAddr, e: sqlx::Error) -> RegistryError {
    if is_unique_violation(&e) {
        let active = active_on(&db.pool, node, ip).await.unwrap_or_else(|e| {
            error!(node, %ip, %e, "sessions: reading the active session after a conflict failed");
            None
        });
        return conflict_active(ip, active.as_ref());
    }
    if is_foreign_key_violation(&e) {
        return RegistryError::NotFound { what: "ledger client", id: ip.to_string() };
    }
    RegistryError::Db(logged("opening a session", node, e))
}

/// Insert `new` (with its `session.opened` event) in `tx` and commit; wakes the webhook worker.
async fn insert_and_commit(
    db: &Database,
    node: &str,
    hooks: &Webhooks,
    mut tx: Transaction<'static, Any>,
    new: &NewSession,
    now_ms: u64,
) -> Result<Session, RegistryError> {
    let s = match insert_on(&mut tx, node, hooks, new, now_ms).await {
        Ok(s) => s,
        Err(e) => {
            drop(tx);
            return Err(insert_failed(db, node, new.client_ip, e).await);
        }
    };
    if let Err(e) = tx.commit().await {
        return Err(insert_failed(db, node, new.client_ip, e).await);
    }
    hooks.wake();
    Ok(s)
}

/// Open a session and enqueue `session.opened`, in one transaction. The client must have a
/// row in `clients` (the caller admits it to the ledger first). A concurrent or existing
/// active session for the same client -> `RegistryError::Conflict` (the unique index decides).
pub async fn open(
    db: &Database,
    node: &str,
    hooks: &Webhooks,
    new: &NewSession,
    now_ms: u64,
) -> Result<Session, RegistryError> {
    validate(new)?;
    let ip = new.client_ip;
    // A clear message for the common case; the unique index decides races.
    if let Some(a) = active_on(&db.pool, node, ip).await.map_err(|e| logged("reading the active session", node, e))? {
        return Err(conflict_active(ip, Some(&a)));
    }
    let tx = begin_write(db).await.map_err(|e| logged("beginning a transaction", node, e))?;
    let s = insert_and_commit(db, node, hooks, tx, new, now_ms).await?;
    info!(node, session = s.id, %ip, source = %s.source, username = s.username, "session opened");
    Ok(s)
}

/// UPDATE the session closed (bytes = end - start, saturating) and enqueue `session.closed`
/// on `conn`. None when it was not active.
async fn close_on(
    conn: &mut AnyConnection,
    node: &str,
    hooks: &Webhooks,
    id: &str,
    reason: CloseReason,
    end: &Totals,
    now_ms: u64,
) -> Result<Option<Session>, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE sessions SET closed_unix_ms = $1, close_reason = $2, \
         up_bytes = CASE WHEN $3 > start_up_bytes THEN $3 - start_up_bytes ELSE 0 END, \
         down_bytes = CASE WHEN $4 > start_down_bytes THEN $4 - start_down_bytes ELSE 0 END \
         WHERE node_id = $5 AND id = $6 AND closed_unix_ms IS NULL",
    )
    .bind(to_db(now_ms))
    .bind(reason.as_str())
    .bind(to_db(end.up_bytes))
    .bind(to_db(end.down_bytes))
    .bind(node)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    let s = by_id(&mut *conn, node, id).await?.ok_or_else(|| sqlx::Error::RowNotFound)?;
    hooks.enqueue_in(conn, &event(EventKind::SessionClosed, &s), now_ms).await?;
    Ok(Some(s))
}

/// Close session `id` with `reason`; `end` is the client's ledger totals now. Enqueues
/// `session.closed` in the same transaction. Already closed -> Conflict; unknown -> NotFound.
pub async fn close(
    db: &Database,
    node: &str,
    hooks: &Webhooks,
    id: &str,
    reason: CloseReason,
    end: Totals,
    now_ms: u64,
) -> Result<Session, RegistryError> {
    let id = crate::registry::parse_id(id)?;
    let mut tx = begin_write(db).await.map_err(|e| logged("beginning a transaction", node, e))?;
    let closed = close_on(&mut tx, node, hooks, &id, reason, &end, now_ms)
        .await
        .map_err(|e| logged("closing a session", node, e))?;
    let Some(s) = closed else {
        let existing = by_id(&mut *tx, node, &id).await.map_err(|e| logged("reading a session", node, e))?;
        drop(tx);
        return Err(match existing {
            None => RegistryError::NotFound { what: "session", id },
            Some(s) => RegistryError::Conflict(format!(
                "session {id} is already closed (at {} ms, reason {})",
                s.closed_unix_ms.unwrap_or(0),
                s.close_reason.map_or("none", CloseReason::as_str)
            )),
        });
    };
    tx.commit().await.map_err(|e| logged("committing a session close", node, e))?;
    hooks.wake();
    info!(node, session = s.id, ip = %s.client_ip, %reason, up = s.up_bytes, down = s.down_bytes, "session closed");
    Ok(s)
}

/// What `replace` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Replaced {
    /// The session of the same client that was active before (closed as "superseded").
    pub closed: Option<Session>,
    pub opened: Session,
}

/// Close the active session of `new.client_ip` (if any) with reason "superseded", its bytes
/// counted up to `new.start`, and open `new`: one transaction, both events in it. A session
/// opened concurrently by someone else -> Conflict, and nothing changed.
pub async fn replace(
    db: &Database,
    node: &str,
    hooks: &Webhooks,
    new: &NewSession,
    now_ms: u64,
) -> Result<Replaced, RegistryError> {
    validate(new)?;
    let ip = new.client_ip;
    let mut tx = begin_write(db).await.map_err(|e| logged("beginning a transaction", node, e))?;
    let closed = async {
        match active_on(&mut *tx, node, ip).await? {
            Some(old) => close_on(&mut tx, node, hooks, &old.id, CloseReason::Superseded, &new.start, now_ms).await,
            None => Ok(None),
        }
    }
    .await
    .map_err(|e| logged("closing the superseded session", node, e))?;
    let opened = insert_and_commit(db, node, hooks, tx, new, now_ms).await?;
    if let Some(c) = &closed {
        info!(node, old = c.id, new = opened.id, %ip, "session superseded");
    }
    info!(node, session = opened.id, %ip, source = %opened.source, username = opened.username, "session opened");
    Ok(Replaced { closed, opened })
}

/// Which active sessions `close_all_for` looks at (None: any).
#[derive(Debug, Clone, Default)]
pub struct ActiveFilter {
    pub protocol: Option<SessionProtocol>,
    pub instance: Option<String>,
    pub source: Option<SessionSource>,
}

/// Close every active session matching `filter` whose id is not in `keep` (e.g. the sessions
/// of an OpenVPN instance that are no longer in its status), each with `end_of(client ip)` as
/// the client's totals, `reason`, and its `session.closed` event; one transaction. Returns the
/// sessions closed.
#[allow(clippy::too_many_arguments)]
pub async fn close_all_for(
    db: &Database,
    node: &str,
    hooks: &Webhooks,
    filter: &ActiveFilter,
    keep: &[String],
    end_of: &(dyn Fn(IpAddr) -> Totals + Send + Sync),
    reason: CloseReason,
    now_ms: u64,
) -> Result<Vec<Session>, RegistryError> {
    let mut tx = begin_write(db).await.map_err(|e| logged("beginning a transaction", node, e))?;
    let work = async {
        let candidates = active_on_filter(&mut tx, node, filter).await?;
        let mut out = Vec::new();
        for s in candidates.into_iter().filter(|s| !keep.contains(&s.id)) {
            let end = end_of(s.client_ip);
            if let Some(c) = close_on(&mut tx, node, hooks, &s.id, reason, &end, now_ms).await? {
                out.push(c);
            }
        }
        Ok::<_, sqlx::Error>(out)
    };
    let out = work.await.map_err(|e| logged("closing sessions", node, e))?;
    tx.commit().await.map_err(|e| logged("committing session closes", node, e))?;
    if !out.is_empty() {
        hooks.wake();
        info!(node, closed = out.len(), %reason, ?filter, "sessions closed");
    }
    Ok(out)
}
