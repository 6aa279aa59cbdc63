//! Sessions: one VPN connection of a client, from open to close, with the bytes the ledger
//! counted for the client meanwhile. The partial unique index `sessions_one_active` allows one
//! active session per (node, client); a second open is a `Conflict`, whoever races. This
//! module reads them; `write` opens, closes and replaces them with their webhook events.

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{AnyConnection, Row as _, any::AnyRow};
use tracing::error;

mod write;

pub use write::{ActiveFilter, Replaced, close, close_all_for, open, replace};

use super::{RegistryError, ip_column};
use crate::{
    db::{Database, from_db},
    ledger::state::Totals,
    types::{CloseReason, SessionProtocol, SessionSource},
};

/// A session row.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Session {
    pub id: String,
    #[schema(value_type = String)]
    pub client_ip: IpAddr,
    pub protocol: SessionProtocol,
    pub instance: String,
    pub common_name: String,
    pub username: String,
    pub real_address: String,
    pub source: SessionSource,
    pub opened_unix_ms: u64,
    pub closed_unix_ms: Option<u64>,
    pub close_reason: Option<CloseReason>,
    /// Ledger totals of the client when the session opened.
    pub start_up_bytes: u64,
    pub start_down_bytes: u64,
    /// Bytes of the session (final once closed).
    pub up_bytes: u64,
    pub down_bytes: u64,
}

impl Session {
    pub fn is_active(&self) -> bool {
        self.closed_unix_ms.is_none()
    }

    /// (up, down) bytes of the session if it ended with the client at `now` ledger totals.
    pub fn bytes_at(&self, now: &Totals) -> (u64, u64) {
        (now.up_bytes.saturating_sub(self.start_up_bytes), now.down_bytes.saturating_sub(self.start_down_bytes))
    }
}

/// What opening a session needs.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub client_ip: IpAddr,
    pub protocol: SessionProtocol,
    pub instance: String,
    pub common_name: String,
    pub username: String,
    pub real_address: String,
    pub source: SessionSource,
    /// The client's ledger totals now (the session's bytes are counted from here).
    pub start: Totals,
}

const COLUMNS: &str = "id, client_ip, protocol, instance, common_name, username, real_address, source, \
     opened_unix_ms, closed_unix_ms, close_reason, start_up_bytes, start_down_bytes, up_bytes, down_bytes";

fn from_row(row: &AnyRow) -> Result<Session, sqlx::Error> {
    Ok(Session {
        id: row.try_get("id")?,
        client_ip: ip_column(row, "client_ip")?,
        protocol: named(row, "protocol")?,
        instance: row.try_get("instance")?,
        common_name: row.try_get("common_name")?,
        username: row.try_get("username")?,
        real_address: row.try_get("real_address")?,
        source: named(row, "source")?,
        opened_unix_ms: from_db(row.try_get("opened_unix_ms")?),
        closed_unix_ms: row.try_get::<Option<i64>, _>("closed_unix_ms")?.map(from_db),
        close_reason: row
            .try_get::<Option<String>, _>("close_reason")?
            .map(|r| r.parse().map_err(|e: String| sqlx::Error::Decode(e.into())))
            .transpose()?,
        start_up_bytes: from_db(row.try_get("start_up_bytes")?),
        start_down_bytes: from_db(row.try_get("start_down_bytes")?),
        up_bytes: from_db(row.try_get("up_bytes")?),
        down_bytes: from_db(row.try_get("down_bytes")?),
    })
}

/// A column that holds one of an enum's wire names.
fn named<T: std::str::FromStr<Err = String>>(row: &AnyRow, col: &str) -> Result<T, sqlx::Error> {
    row.try_get::<String, _>(col)?.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
}

/// Check what opening `new` needs: short printable texts.
pub fn validate(new: &NewSession) -> Result<(), RegistryError> {
    for (what, v) in [
        ("instance", &new.instance),
        ("common_name", &new.common_name),
        ("username", &new.username),
        ("real_address", &new.real_address),
    ] {
        if v.chars().count() > 256 {
            return Err(RegistryError::Invalid(format!("{what} is longer than 256 characters")));
        }
        if v.chars().any(char::is_control) {
            return Err(RegistryError::Invalid(format!("{what} {v:?} contains control characters")));
        }
    }
    Ok(())
}

/// The active session of `ip`, read on `conn` (inside a transaction) or the pool.
async fn active_on<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    node: &str,
    ip: IpAddr,
) -> Result<Option<Session>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM sessions WHERE node_id = $1 AND client_ip = $2 AND closed_unix_ms IS NULL"
    ))
    .bind(node)
    .bind(ip.to_string())
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

async fn by_id<'e>(
    ex: impl sqlx::Executor<'e, Database = sqlx::Any>,
    node: &str,
    id: &str,
) -> Result<Option<Session>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM sessions WHERE node_id = $1 AND id = $2"))
        .bind(node)
        .bind(id)
        .fetch_optional(ex)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Log a database error with what was being done, and pass it on.
fn logged(what: &str, node: &str, e: sqlx::Error) -> sqlx::Error {
    error!(node, %e, "sessions: {what} failed");
    e
}

async fn active_on_filter(conn: &mut AnyConnection, node: &str, f: &ActiveFilter) -> Result<Vec<Session>, sqlx::Error> {
    let mut sql = format!("SELECT {COLUMNS} FROM sessions WHERE node_id = $1 AND closed_unix_ms IS NULL");
    let mut binds: Vec<&str> = vec![node];
    for (col, v) in [
        ("protocol", f.protocol.map(SessionProtocol::as_str)),
        ("instance", f.instance.as_deref()),
        ("source", f.source.map(SessionSource::as_str)),
    ] {
        if let Some(v) = v {
            binds.push(v);
            sql.push_str(&format!(" AND {col} = ${}", binds.len()));
        }
    }
    sql.push_str(" ORDER BY opened_unix_ms, id");
    let mut q = sqlx::query(&sql);
    for b in binds {
        q = q.bind(b);
    }
    q.fetch_all(&mut *conn).await?.iter().map(from_row).collect()
}

/// Every active session of this node.
pub async fn active(db: &Database, node: &str) -> Result<Vec<Session>, sqlx::Error> {
    let mut conn = db.pool.acquire().await.map_err(|e| logged("acquiring a connection", node, e))?;
    active_on_filter(&mut conn, node, &ActiveFilter::default())
        .await
        .map_err(|e| logged("listing active sessions", node, e))
}

/// The active session of one client, if any.
pub async fn active_for(db: &Database, node: &str, ip: IpAddr) -> Result<Option<Session>, sqlx::Error> {
    active_on(&db.pool, node, ip).await.map_err(|e| logged("reading the active session", node, e))
}

pub async fn get(db: &Database, node: &str, id: &str) -> Result<Session, RegistryError> {
    let id = super::parse_id(id)?;
    match by_id(&db.pool, node, &id).await.map_err(|e| logged("reading a session", node, e))? {
        Some(s) => Ok(s),
        None => Err(RegistryError::NotFound { what: "session", id }),
    }
}

/// Filter for `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub client_ip: Option<IpAddr>,
    /// Some(true): only active; Some(false): only closed.
    pub active: Option<bool>,
    pub limit: u32,
}

/// Default and largest `limit` of `list` (0 means the default).
pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 10_000;

/// Newest first.
pub async fn list(db: &Database, node: &str, f: &ListFilter) -> Result<Vec<Session>, sqlx::Error> {
    let mut sql = format!("SELECT {COLUMNS} FROM sessions WHERE node_id = $1");
    let ip = f.client_ip.map(|ip| ip.to_string());
    if ip.is_some() {
        sql.push_str(" AND client_ip = $2");
    }
    match f.active {
        Some(true) => sql.push_str(" AND closed_unix_ms IS NULL"),
        Some(false) => sql.push_str(" AND closed_unix_ms IS NOT NULL"),
        None => {}
    }
    let limit = if f.limit == 0 { DEFAULT_LIMIT } else { f.limit.min(MAX_LIMIT) };
    // Within one millisecond, an active session is newer than one closed then (replace).
    sql.push_str(&format!(
        " ORDER BY opened_unix_ms DESC, CASE WHEN closed_unix_ms IS NULL THEN 0 ELSE 1 END, id LIMIT {limit}"
    ));
    let mut q = sqlx::query(&sql).bind(node);
    if let Some(ip) = ip {
        q = q.bind(ip);
    }
    q.fetch_all(&db.pool).await.map_err(|e| logged("listing sessions", node, e))?.iter().map(from_row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new() -> NewSession {
        NewSession {
            client_ip: "10.8.0.2".parse().unwrap(),
            protocol: SessionProtocol::Openvpn,
            instance: "tun0".into(),
            common_name: "alice".into(),
            username: "alice".into(),
            real_address: "198.51.100.7:50000".into(),
            source: SessionSource::Hook,
            start: Totals::default(),
        }
    }

    #[test]
    fn validate_checks_the_texts() {
        assert!(validate(&new()).is_ok());
        let mut ctl = new();
        ctl.username = "a\nb".into();
        assert!(validate(&ctl).is_err());
        let mut long = new();
        long.common_name = "x".repeat(257);
        assert!(validate(&long).is_err());
    }

    #[test]
    fn protocols_and_sources_parse_only_their_names() {
        for p in SessionProtocol::ALL {
            assert_eq!(p.as_str().parse::<SessionProtocol>(), Ok(*p));
        }
        for bad in ["pptp", "", "OpenVPN", "openvpn-sctp"] {
            let e = bad.parse::<SessionProtocol>().unwrap_err();
            assert!(e.contains("bad protocol"), "{bad}: {e}");
        }
        assert!("cron".parse::<SessionSource>().is_err());
    }
}
