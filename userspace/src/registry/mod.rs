//! What the operator manages on top of the ledger: sessions (one VPN connection of a client),
//! devices (the backends behind the VPN) and connections (access sold on a device).
//!
//! - `sessions`: open/close with the database enforcing one active session per client;
//! - `devices`: CRUD and the online/offline monitor (device.offline / device.recovered);
//! - `connections`: CRUD; http/socks5 create forward rules, openvpn ones name a user whose
//!   traffic is redirected while connected.
//!
//! Every change that announces an event writes the event (`Webhooks::enqueue_in`) in the same
//! transaction as the change, and wakes the delivery worker after the commit. Writes on SQLite
//! take the write lock when their transaction begins (`BEGIN IMMEDIATE`), so concurrent writers
//! wait for each other (busy timeout) instead of failing on a stale read snapshot.

pub mod connections;
pub mod devices;
pub mod sessions;

use sqlx::{Any, Transaction};

use crate::db::{Backend, Database};

/// Parse a UUID from a path or body (400 when malformed).
pub fn parse_id(s: &str) -> Result<String, RegistryError> {
    uuid::Uuid::parse_str(s).map(|u| u.hyphenated().to_string()).map_err(|_| RegistryError::BadId(s.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0:?} is not a UUID")]
    BadId(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("steering: {0}")]
    Steer(#[from] crate::steer::SteerError),
}

/// Begin a write transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`):
/// a deferred transaction that reads first cannot upgrade to a writer once another writer
/// committed, and would fail with "database is locked" instead of waiting.
pub(crate) async fn begin_write(db: &Database) -> Result<Transaction<'static, Any>, sqlx::Error> {
    match db.backend {
        Backend::Sqlite => db.pool.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => db.pool.begin().await,
    }
}

/// A unique constraint (or unique index) said no.
pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

/// A foreign key said no.
pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_foreign_key_violation())
}

/// A text column that must hold an IP address.
pub(crate) fn ip_column(row: &sqlx::any::AnyRow, col: &str) -> Result<std::net::IpAddr, sqlx::Error> {
    use sqlx::Row as _;
    let s: String = row.try_get(col)?;
    s.parse().map_err(|e| sqlx::Error::Decode(format!("{col} {s:?} is not an IP address: {e}").into()))
}

/// A new random id.
pub(crate) fn new_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// Text an operator typed (names, usernames): 1..=`max` characters, no control characters, no
/// leading or trailing blanks.
pub(crate) fn check_text(what: &str, s: &str, max: usize) -> Result<(), RegistryError> {
    let n = s.chars().count();
    if n == 0 || n > max {
        return Err(RegistryError::Invalid(format!("{what} must be 1 to {max} characters, got {n}")));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(RegistryError::Invalid(format!("{what} {s:?} contains the control character {c:?}")));
    }
    if s.trim() != s {
        return Err(RegistryError::Invalid(format!("{what} {s:?} starts or ends with white space")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_canonical_uuids() {
        let id = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
        assert_eq!(parse_id(id).unwrap(), id.to_lowercase());
        assert!(matches!(parse_id("nope"), Err(RegistryError::BadId(s)) if s == "nope"));
    }

    #[test]
    fn operator_text_is_checked() {
        assert!(check_text("name", "phone 1", 64).is_ok());
        assert!(check_text("name", "", 64).unwrap_err().to_string().contains("1 to 64"));
        assert!(check_text("name", &"x".repeat(65), 64).unwrap_err().to_string().contains("got 65"));
        assert!(check_text("name", "a\nb", 64).unwrap_err().to_string().contains("control"));
        assert!(check_text("name", " a", 64).unwrap_err().to_string().contains("white space"));
    }
}
