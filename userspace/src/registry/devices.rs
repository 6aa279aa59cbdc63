//! Devices: the backends behind the VPN, each at one VPN address, and the monitor that
//! announces when one goes offline (`device.offline`) or comes back (`device.recovered`).

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{Row as _, any::AnyRow};
use tracing::{error, info, warn};

use super::{
    RegistryError, begin_write, check_text, ip_column, is_foreign_key_violation, is_unique_violation, new_id, parse_id,
};
use crate::{
    db::{Database, from_db, to_db},
    webhook::{Event, EventKind, Webhooks},
};

/// Longest device name, in characters.
pub const MAX_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Device {
    pub id: String,
    pub name: String,
    #[schema(value_type = String)]
    pub vpn_ip: IpAddr,
    pub created_unix_ms: u64,
    /// unknown (never seen yet), online, offline: the last state stored.
    pub status: String,
    pub status_changed_unix_ms: Option<u64>,
}

const COLUMNS: &str = "id, name, vpn_ip, created_unix_ms, status, status_changed_unix_ms";

fn from_row(row: &AnyRow) -> Result<Device, sqlx::Error> {
    Ok(Device {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        vpn_ip: ip_column(row, "vpn_ip")?,
        created_unix_ms: from_db(row.try_get("created_unix_ms")?),
        status: row.try_get("status")?,
        status_changed_unix_ms: row.try_get::<Option<i64>, _>("status_changed_unix_ms")?.map(from_db),
    })
}

fn logged(what: &str, node: &str, e: sqlx::Error) -> sqlx::Error {
    error!(node, %e, "devices: {what} failed");
    e
}

/// A VPN address a device can have: unicast, and IPv4 written as IPv4.
pub fn check_vpn_ip(ip: IpAddr) -> Result<(), RegistryError> {
    check_vpn_address("vpn_ip", ip)
}

/// `check_vpn_ip` for any VPN address (a session's client too), errors naming the field `what`.
pub fn check_vpn_address(what: &str, ip: IpAddr) -> Result<(), RegistryError> {
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(RegistryError::Invalid(format!("{what} {ip} is IPv4-mapped: use {v4}")));
    }
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_loopback()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if bad {
        return Err(RegistryError::Invalid(format!(
            "{what} {ip} is not a unicast VPN address (not unspecified, loopback, broadcast or multicast)"
        )));
    }
    Ok(())
}

/// The device that already holds `name` or `vpn_ip`, as a Conflict.
async fn duplicate(
    db: &Database,
    node: &str,
    name: &str,
    vpn_ip: IpAddr,
) -> Result<Option<RegistryError>, sqlx::Error> {
    let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM devices WHERE node_id = $1 AND (name = $2 OR vpn_ip = $3)"))
        .bind(node)
        .bind(name)
        .bind(vpn_ip.to_string())
        .fetch_all(&db.pool)
        .await?;
    let found: Vec<Device> = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    if let Some(d) = found.iter().find(|d| d.name == name) {
        return Ok(Some(RegistryError::Conflict(format!("a device named {name:?} exists already ({})", d.id))));
    }
    Ok(found.first().map(|d| {
        RegistryError::Conflict(format!("device {:?} ({}) has the VPN address {vpn_ip} already", d.name, d.id))
    }))
}

pub async fn create(
    db: &Database,
    node: &str,
    name: &str,
    vpn_ip: IpAddr,
    now_ms: u64,
) -> Result<Device, RegistryError> {
    check_text("device name", name, MAX_NAME)?;
    check_vpn_ip(vpn_ip)?;
    if let Some(c) = duplicate(db, node, name, vpn_ip).await.map_err(|e| logged("checking for duplicates", node, e))? {
        return Err(c);
    }
    let d = Device {
        id: new_id(),
        name: name.to_string(),
        vpn_ip,
        created_unix_ms: now_ms,
        status: "unknown".into(),
        status_changed_unix_ms: None,
    };
    let r = sqlx::query(
        "INSERT INTO devices (id, node_id, name, vpn_ip, created_unix_ms, status) VALUES ($1, $2, $3, $4, $5, 'unknown')",
    )
    .bind(&d.id)
    .bind(node)
    .bind(&d.name)
    .bind(vpn_ip.to_string())
    .bind(to_db(now_ms))
    .execute(&db.pool)
    .await;
    match r {
        Ok(_) => {
            info!(node, device = d.id, name, %vpn_ip, "device created");
            Ok(d)
        }
        Err(e) if is_unique_violation(&e) => {
            let c = duplicate(db, node, name, vpn_ip).await.map_err(|e| logged("checking for duplicates", node, e))?;
            Err(c.unwrap_or_else(|| RegistryError::Conflict(format!("device {name:?} or {vpn_ip} exists already"))))
        }
        Err(e) if is_foreign_key_violation(&e) => Err(RegistryError::NotFound { what: "node", id: node.to_string() }),
        Err(e) => Err(RegistryError::Db(logged("creating a device", node, e))),
    }
}

pub async fn list(db: &Database, node: &str) -> Result<Vec<Device>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM devices WHERE node_id = $1 ORDER BY name, id"))
        .bind(node)
        .fetch_all(&db.pool)
        .await
        .map_err(|e| logged("listing devices", node, e))?
        .iter()
        .map(from_row)
        .collect()
}

pub async fn get(db: &Database, node: &str, id: &str) -> Result<Device, RegistryError> {
    let id = parse_id(id)?;
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM devices WHERE node_id = $1 AND id = $2"))
        .bind(node)
        .bind(&id)
        .fetch_optional(&db.pool)
        .await
        .map_err(|e| logged("reading a device", node, e))?;
    match row {
        Some(r) => Ok(from_row(&r)?),
        None => Err(RegistryError::NotFound { what: "device", id }),
    }
}

/// The device at a VPN address, if any.
pub async fn by_vpn_ip(db: &Database, node: &str, ip: IpAddr) -> Result<Option<Device>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM devices WHERE node_id = $1 AND vpn_ip = $2"))
        .bind(node)
        .bind(ip.to_string())
        .fetch_optional(&db.pool)
        .await
        .map_err(|e| logged("reading a device", node, e))?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// Delete; a device with connections -> Conflict.
pub async fn delete(db: &Database, node: &str, id: &str) -> Result<(), RegistryError> {
    let id = parse_id(id)?;
    let mut tx = begin_write(db).await.map_err(|e| logged("beginning a transaction", node, e))?;
    let n: i64 =
        sqlx::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM connections WHERE node_id = $1 AND device_id = $2")
            .bind(node)
            .bind(&id)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| logged("counting a device's connections", node, e))?
            .try_get("n")?;
    if n > 0 {
        return Err(RegistryError::Conflict(format!(
            "device {id} has {n} connection(s): delete them first (DELETE /api/v1/connections/{{id}})"
        )));
    }
    let r =
        sqlx::query("DELETE FROM devices WHERE node_id = $1 AND id = $2").bind(node).bind(&id).execute(&mut *tx).await;
    let done = match r {
        Ok(d) => d,
        Err(e) if is_foreign_key_violation(&e) => {
            return Err(RegistryError::Conflict(format!("device {id} has connections: delete them first")));
        }
        Err(e) => return Err(RegistryError::Db(logged("deleting a device", node, e))),
    };
    if done.rows_affected() == 0 {
        return Err(RegistryError::NotFound { what: "device", id });
    }
    match tx.commit().await {
        Ok(()) => {
            info!(node, device = id, "device deleted");
            Ok(())
        }
        Err(e) if is_foreign_key_violation(&e) => {
            Err(RegistryError::Conflict(format!("device {id} has connections: delete them first")))
        }
        Err(e) => Err(RegistryError::Db(logged("committing a device delete", node, e))),
    }
}

/// What the monitor knows of a device's liveness.
#[derive(Debug, Clone, Copy, Default)]
pub struct Liveness {
    /// Last packet seen by the kernel (ledger last_seen).
    pub last_seen_ms: Option<u64>,
    /// WireGuard latest handshake.
    pub latest_handshake_ms: Option<u64>,
}

impl Liveness {
    /// A packet or a handshake within `offline_after_ms` of `now_ms`.
    pub fn online(&self, offline_after_ms: u64, now_ms: u64) -> bool {
        [self.last_seen_ms, self.latest_handshake_ms]
            .into_iter()
            .flatten()
            .any(|t| now_ms.saturating_sub(t) <= offline_after_ms)
    }

    /// Any sign of life at all, however old: a packet or a handshake.
    pub fn ever_seen(&self) -> bool {
        self.last_seen_ms.is_some() || self.latest_handshake_ms.is_some()
    }
}

/// The event a status change announces, if any.
fn transition_event(from: &str, to: &str) -> Option<EventKind> {
    match (from, to) {
        ("online", "offline") => Some(EventKind::DeviceOffline),
        ("offline", "online") => Some(EventKind::DeviceRecovered),
        _ => None,
    }
}

/// The status a device in `status` should have now, None to leave it as it is. A device never
/// seen (no packet and no handshake at all) stays unknown; otherwise it is online when its last
/// packet or handshake is within `offline_after_ms`, offline else.
fn wanted_status(status: &str, live: &Liveness, offline_after_ms: u64, now_ms: u64) -> Option<&'static str> {
    if status == "unknown" && !live.ever_seen() {
        return None;
    }
    let want = if live.online(offline_after_ms, now_ms) { "online" } else { "offline" };
    (status != want).then_some(want)
}

/// One monitor pass. A device never seen (no packet, no handshake) stays unknown: no change,
/// no event. Otherwise a device is online when its last packet or handshake is within
/// `offline_after_ms`. Transitions online->offline enqueue device.offline, offline->online
/// device.recovered; unknown->online/offline (first contact) is stored without an event. Each
/// change is one transaction with its event. Returns the devices whose status changed.
pub async fn monitor_pass(
    db: &Database,
    node: &str,
    hooks: &Webhooks,
    liveness: &(dyn Fn(IpAddr) -> Liveness + Send + Sync),
    offline_after_ms: u64,
    now_ms: u64,
) -> Result<Vec<Device>, sqlx::Error> {
    let mut changed = Vec::new();
    for d in list(db, node).await? {
        let live = liveness(d.vpn_ip);
        let Some(want) = wanted_status(&d.status, &live, offline_after_ms, now_ms) else {
            continue;
        };
        let mut tx = begin_write(db).await.map_err(|e| logged("beginning a transaction", node, e))?;
        // Compare and set: a concurrent pass that changed it first wins, and announced it.
        let done = sqlx::query(
            "UPDATE devices SET status = $1, status_changed_unix_ms = $2 WHERE node_id = $3 AND id = $4 AND status = $5",
        )
        .bind(want)
        .bind(to_db(now_ms))
        .bind(node)
        .bind(&d.id)
        .bind(&d.status)
        .execute(&mut *tx)
        .await
        .map_err(|e| logged("storing a device status", node, e))?;
        if done.rows_affected() == 0 {
            warn!(node, device = d.id, "device status changed concurrently; skipped");
            continue;
        }
        let now = Device { status: want.to_string(), status_changed_unix_ms: Some(now_ms), ..d.clone() };
        let kind = transition_event(&d.status, want);
        if let Some(kind) = kind {
            let ev = Event {
                kind,
                subject: now.id.clone(),
                data: serde_json::json!({
                    "device": now,
                    "last_seen_unix_ms": live.last_seen_ms,
                    "latest_handshake_unix_ms": live.latest_handshake_ms,
                }),
            };
            hooks.enqueue_in(&mut tx, &ev, now_ms).await.map_err(|e| logged("enqueueing a device event", node, e))?;
        }
        tx.commit().await.map_err(|e| logged("committing a device status", node, e))?;
        match kind {
            Some(k) => info!(
                node,
                device = now.id,
                name = now.name,
                from = d.status,
                to = want,
                event = k.as_str(),
                "device status"
            ),
            None => info!(node, device = now.id, name = now.name, from = d.status, to = want, "device status"),
        }
        changed.push(now);
    }
    if !changed.is_empty() {
        hooks.wake();
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_uses_the_newest_sign() {
        let l = Liveness { last_seen_ms: Some(1_000), latest_handshake_ms: Some(50_000) };
        assert!(l.online(10_000, 55_000));
        assert!(!l.online(10_000, 70_000));
        assert!(!Liveness::default().online(u64::MAX, 1));
        assert_eq!(transition_event("online", "offline"), Some(EventKind::DeviceOffline));
        assert_eq!(transition_event("offline", "online"), Some(EventKind::DeviceRecovered));
        assert_eq!(transition_event("unknown", "online"), None);
        assert_eq!(transition_event("unknown", "offline"), None);
    }

    #[test]
    fn never_seen_devices_stay_unknown() {
        let (off, now) = (10_000, 100_000);
        let never = Liveness::default();
        let fresh = Liveness { last_seen_ms: Some(now - 1_000), latest_handshake_ms: None };
        let stale = Liveness { last_seen_ms: None, latest_handshake_ms: Some(now - 50_000) };
        assert!(!never.ever_seen() && fresh.ever_seen() && stale.ever_seen());
        // Never seen: unknown stays unknown (no device.recovered at its first contact later).
        assert_eq!(wanted_status("unknown", &never, off, now), None);
        // First contact: unknown -> online; seen once long ago: unknown -> offline.
        assert_eq!(wanted_status("unknown", &fresh, off, now), Some("online"));
        assert_eq!(wanted_status("unknown", &stale, off, now), Some("offline"));
        // Seen once, then silent (or its signs gone): online -> offline.
        assert_eq!(wanted_status("online", &stale, off, now), Some("offline"));
        assert_eq!(wanted_status("online", &never, off, now), Some("offline"));
        assert_eq!(wanted_status("offline", &fresh, off, now), Some("online"));
        assert_eq!(wanted_status("online", &fresh, off, now), None);
        assert_eq!(wanted_status("offline", &never, off, now), None);
    }

    #[test]
    fn vpn_addresses_must_be_unicast() {
        assert!(check_vpn_ip("10.8.0.2".parse().unwrap()).is_ok());
        assert!(check_vpn_ip("fd00:8::2".parse().unwrap()).is_ok());
        for bad in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1", "::", "::ffff:10.8.0.2"] {
            assert!(check_vpn_ip(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }
}
