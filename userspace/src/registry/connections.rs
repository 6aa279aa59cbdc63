//! Connections: access sold on a device. http/socks5: customers reach the device's proxy
//! (vpn_ip:device_port) at public_port, through a forward rule (tcp/public_port -> device) that
//! lives as long as the connection. openvpn: the OpenVPN user `username` is redirected to the
//! local transparent proxy at proxy_port while connected (the identity service keeps that rule).

use std::net::{IpAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};
use sqlx::{Row as _, any::AnyRow};
use tracing::{error, info, warn};

use super::{RegistryError, devices, is_unique_violation, new_id, parse_id};
use crate::{
    db::{Database, from_db, to_db},
    steer::{Origin, SteerError, SteerMaps, host},
    types::{ConnectionProtocol, ForwardSpec, Proto},
};
/// Longest OpenVPN username, in characters.
pub const MAX_USERNAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Connection {
    pub id: String,
    pub device_id: String,
    pub protocol: ConnectionProtocol,
    pub public_port: Option<u16>,
    pub device_port: Option<u16>,
    pub username: Option<String>,
    pub proxy_port: Option<u16>,
    pub created_unix_ms: u64,
}

impl Connection {
    /// http and socks5 connections are served by a forward rule.
    pub fn is_forward(&self) -> bool {
        self.protocol != ConnectionProtocol::Openvpn
    }

    /// The forward rule this connection needs on a device at `vpn_ip` (http/socks5 only).
    pub fn forward_spec(&self, vpn_ip: IpAddr) -> Option<ForwardSpec> {
        let (IpAddr::V4(ip), Some(public_port), Some(device_port)) = (vpn_ip, self.public_port, self.device_port)
        else {
            return None;
        };
        self.is_forward().then(|| ForwardSpec {
            proto: Proto::Tcp,
            public_port,
            public_address: None,
            device: SocketAddrV4::new(ip, device_port),
        })
    }
}

/// POST body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConnection {
    /// The device's id (a UUID).
    #[schema(format = Uuid)]
    pub device_id: String,
    pub protocol: ConnectionProtocol,
    /// http, socks5: the public port forwarded to the device.
    #[schema(minimum = 1)]
    pub public_port: Option<u16>,
    /// http, socks5: the device's port.
    #[schema(minimum = 1)]
    pub device_port: Option<u16>,
    /// openvpn: the OpenVPN user whose traffic goes to the device's proxy.
    #[schema(pattern = "^[A-Za-z0-9._@-]{1,64}$")]
    pub username: Option<String>,
    /// openvpn: the device's proxy port.
    #[schema(minimum = 1)]
    pub proxy_port: Option<u16>,
}

const COLUMNS: &str = "id, device_id, protocol, public_port, device_port, username, proxy_port, created_unix_ms";

fn port_column(row: &AnyRow, col: &str) -> Result<Option<u16>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(col)?
        .map(|p| u16::try_from(p).map_err(|_| sqlx::Error::Decode(format!("{col} {p} is not a port").into())))
        .transpose()
}

fn from_row(row: &AnyRow) -> Result<Connection, sqlx::Error> {
    Ok(Connection {
        id: row.try_get("id")?,
        device_id: row.try_get("device_id")?,
        protocol: row.try_get::<String, _>("protocol")?.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))?,
        public_port: port_column(row, "public_port")?,
        device_port: port_column(row, "device_port")?,
        username: row.try_get("username")?,
        proxy_port: port_column(row, "proxy_port")?,
        created_unix_ms: from_db(row.try_get("created_unix_ms")?),
    })
}

fn logged(what: &str, node: &str, e: sqlx::Error) -> sqlx::Error {
    error!(node, %e, "connections: {what} failed");
    e
}

fn invalid(m: String) -> RegistryError {
    RegistryError::Invalid(m)
}

/// Check the shape of a new connection (not whether its device exists): the protocol, which
/// fields it needs and which it must not have, ports 1..=65535, the username's characters.
pub fn validate(new: &NewConnection) -> Result<(), RegistryError> {
    let p = new.protocol;
    let port = |what: &str, v: Option<u16>, wanted: bool| -> Result<(), RegistryError> {
        match (v, wanted) {
            (None, true) => Err(invalid(format!("a {p} connection needs {what}"))),
            (Some(_), false) => Err(invalid(format!("a {p} connection has no {what} (remove it)"))),
            (Some(0), true) => Err(invalid(format!("{what} 0 is not a port: expected 1..=65535"))),
            _ => Ok(()),
        }
    };
    let forward = p != ConnectionProtocol::Openvpn;
    port("public_port", new.public_port, forward)?;
    port("device_port", new.device_port, forward)?;
    port("proxy_port", new.proxy_port, !forward)?;
    match (&new.username, forward) {
        (Some(_), true) => return Err(invalid(format!("a {p} connection has no username (remove it)"))),
        (None, false) => return Err(invalid("an openvpn connection needs username".into())),
        (Some(u), false) => check_username(u)?,
        (None, true) => {}
    }
    Ok(())
}

/// 1..=64 of `A-Z a-z 0-9 . _ @ -`.
pub fn check_username(u: &str) -> Result<(), RegistryError> {
    let n = u.chars().count();
    if n == 0 || n > MAX_USERNAME {
        return Err(invalid(format!("username must be 1 to {MAX_USERNAME} characters, got {n}")));
    }
    if let Some(c) = u.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))) {
        return Err(invalid(format!("username {u:?} has the character {c:?}: allowed are A-Z a-z 0-9 . _ @ -")));
    }
    Ok(())
}

/// The connection that already holds `new`'s public port or username, as a Conflict.
async fn duplicate(db: &Database, node: &str, new: &NewConnection) -> Result<Option<RegistryError>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM connections WHERE node_id = $1 AND (public_port = $2 OR username = $3)"
    ))
    .bind(node)
    .bind(new.public_port.map(i32::from))
    .bind(new.username.clone())
    .fetch_all(&db.pool)
    .await?;
    let found: Vec<Connection> = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    Ok(found.first().map(|c| match (new.public_port, &c.username) {
        (Some(p), _) if c.public_port == Some(p) => {
            RegistryError::Conflict(format!("public port {p} is used by connection {} already", c.id))
        }
        (_, Some(u)) => RegistryError::Conflict(format!("username {u:?} has connection {} already", c.id)),
        _ => RegistryError::Conflict(format!("connection {} holds this port or username already", c.id)),
    }))
}

/// Why a forward rule could not be added, for the caller.
fn forward_failed(steer: &SteerMaps, spec: &ForwardSpec, e: SteerError) -> RegistryError {
    match e {
        SteerError::ForwardExists { .. } => {
            let holder = steer.list().ok().and_then(|l| {
                l.forward.into_iter().find(|f| f.proto == spec.proto && f.public_port == spec.public_port)
            });
            RegistryError::Conflict(match holder {
                Some(f) => format!(
                    "public port tcp/{} is taken by forward rule {} (-> {}, {:?}): delete it first",
                    spec.public_port, f.id, f.device, f.origin
                ),
                None => format!("public port tcp/{} is taken by a forward rule: delete it first", spec.public_port),
            })
        }
        e @ SteerError::PortInUse { .. } => RegistryError::Conflict(e.to_string()),
        e => RegistryError::Steer(e),
    }
}

/// Reserve the public ports of every forward rule (so the host never uses them as ephemeral
/// source ports). A failure is logged: the rule works, only that protection is missing.
fn reserve(steer: &SteerMaps) {
    match steer.forward_ports() {
        Ok(ports) => {
            if let Err(e) = host::reserve_ports(&ports) {
                warn!(%e, "reserving the forwarded public ports failed");
            }
        }
        Err(e) => warn!(%e, "reading the forward rules' ports failed; public ports not reserved"),
    }
}

/// Validate, insert, and for http/socks5 add the forward rule tcp/public_port ->
/// device vpn_ip:device_port (Origin::Runtime) in `steer` (if given). If the rule cannot be
/// added, the row is removed again and the error returned (Conflict when the port is taken).
pub async fn create(
    db: &Database,
    node: &str,
    steer: Option<&SteerMaps>,
    new: &NewConnection,
    now_ms: u64,
) -> Result<Connection, RegistryError> {
    validate(new)?;
    let device_id = parse_id(&new.device_id)?;
    let device = devices::get(db, node, &device_id).await?;
    let c = Connection {
        id: new_id(),
        device_id,
        protocol: new.protocol,
        public_port: new.public_port,
        device_port: new.device_port,
        username: new.username.clone(),
        proxy_port: new.proxy_port,
        created_unix_ms: now_ms,
    };
    let spec = c.forward_spec(device.vpn_ip);
    if c.is_forward() && spec.is_none() {
        return Err(invalid(format!(
            "device {:?} has the IPv6 address {}: forward rules are IPv4, so an {} connection needs an IPv4 device",
            device.name, device.vpn_ip, c.protocol
        )));
    }
    if let Some(conflict) = duplicate(db, node, new).await.map_err(|e| logged("checking for duplicates", node, e))? {
        return Err(conflict);
    }
    let r = sqlx::query(
        "INSERT INTO connections (id, node_id, device_id, protocol, public_port, device_port, username, proxy_port, \
         created_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&c.id)
    .bind(node)
    .bind(&c.device_id)
    .bind(c.protocol.as_str())
    .bind(c.public_port.map(i32::from))
    .bind(c.device_port.map(i32::from))
    .bind(c.username.clone())
    .bind(c.proxy_port.map(i32::from))
    .bind(to_db(now_ms))
    .execute(&db.pool)
    .await;
    match r {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => {
            let c = duplicate(db, node, new).await.map_err(|e| logged("checking for duplicates", node, e))?;
            return Err(c.unwrap_or_else(|| RegistryError::Conflict("the port or username is taken".into())));
        }
        Err(e) if super::is_foreign_key_violation(&e) => {
            return Err(RegistryError::NotFound { what: "device", id: c.device_id });
        }
        Err(e) => return Err(RegistryError::Db(logged("creating a connection", node, e))),
    }
    match (spec, steer) {
        (Some(spec), Some(steer)) => {
            // A public port this host serves (SSH, the API, OpenVPN) is refused.
            let added = crate::steer::guard::check_forward(&spec, None, false)
                .and_then(|()| steer.add_forward(&spec, Origin::Runtime));
            if let Err(e) = added {
                let err = forward_failed(steer, &spec, e);
                // Without its rule the connection would be a lie: take the row back.
                if let Err(e) = delete_row(db, node, &c.id).await {
                    error!(node, connection = c.id, %e, "removing a connection whose forward rule failed also failed");
                }
                return Err(err);
            }
            reserve(steer);
        }
        (Some(spec), None) => {
            warn!(
                node,
                connection = c.id,
                port = spec.public_port,
                "no steering maps: the forward rule is added at the next daemon start"
            );
        }
        (None, _) => {}
    }
    info!(node, connection = c.id, device = device.name, protocol = %c.protocol, public_port = ?c.public_port,
        device_port = ?c.device_port, username = ?c.username, proxy_port = ?c.proxy_port, "connection created");
    Ok(c)
}

async fn delete_row(db: &Database, node: &str, id: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM connections WHERE node_id = $1 AND id = $2")
        .bind(node)
        .bind(id)
        .execute(&db.pool)
        .await
        .map_err(|e| logged("deleting a connection", node, e))?
        .rows_affected())
}

pub async fn list(db: &Database, node: &str) -> Result<Vec<Connection>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE node_id = $1 ORDER BY created_unix_ms, id"))
        .bind(node)
        .fetch_all(&db.pool)
        .await
        .map_err(|e| logged("listing connections", node, e))?
        .iter()
        .map(from_row)
        .collect()
}

pub async fn get(db: &Database, node: &str, id: &str) -> Result<Connection, RegistryError> {
    let id = parse_id(id)?;
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE node_id = $1 AND id = $2"))
        .bind(node)
        .bind(&id)
        .fetch_optional(&db.pool)
        .await
        .map_err(|e| logged("reading a connection", node, e))?;
    match row {
        Some(r) => Ok(from_row(&r)?),
        None => Err(RegistryError::NotFound { what: "connection", id }),
    }
}

/// Delete the row and its forward rule.
pub async fn delete(db: &Database, node: &str, steer: Option<&SteerMaps>, id: &str) -> Result<(), RegistryError> {
    let c = get(db, node, id).await?;
    let device = devices::get(db, node, &c.device_id).await?;
    // The rule goes first: a rule without its row would forward traffic nobody sells.
    let mut removed = None;
    if let (Some(spec), Some(steer)) = (c.forward_spec(device.vpn_ip), steer) {
        let current =
            steer.list()?.forward.into_iter().find(|f| f.proto == spec.proto && f.public_port == spec.public_port);
        match current {
            Some(f) if f.device == spec.device && f.origin == Origin::Runtime => {
                steer.del_forward(spec.proto, spec.public_port)?;
                removed = Some(spec);
            }
            Some(f) => warn!(node, connection = c.id, rule = f.id, target = %f.device, origin = ?f.origin,
                "the forward rule on this public port is not the connection's; left in place"),
            None => warn!(
                node,
                connection = c.id,
                port = spec.public_port,
                "the connection's forward rule was already gone"
            ),
        }
    }
    match delete_row(db, node, &c.id).await {
        Ok(0) => Err(RegistryError::NotFound { what: "connection", id: c.id }),
        Ok(_) => {
            info!(node, connection = c.id, protocol = %c.protocol, "connection deleted");
            Ok(())
        }
        Err(e) => {
            if let (Some(spec), Some(steer)) = (removed, steer)
                && let Err(se) = steer.add_forward(&spec, Origin::Runtime)
            {
                error!(node, connection = c.id, %se, "restoring the forward rule after a failed delete failed");
            }
            Err(RegistryError::Db(e))
        }
    }
}

/// Re-apply the forward rules of every http/socks5 connection (daemon start: pins may be new).
/// A rule already there with the same target is fine; a port held by another target is left
/// alone and logged. Returns the number of rules added.
pub async fn sync_forward_rules(db: &Database, node: &str, steer: &SteerMaps) -> Result<usize, RegistryError> {
    let conns = list(db, node).await?;
    let devs: std::collections::HashMap<String, devices::Device> =
        devices::list(db, node).await?.into_iter().map(|d| (d.id.clone(), d)).collect();
    let present = steer.list()?.forward;
    let mut added = 0;
    for c in conns.iter().filter(|c| c.is_forward()) {
        let Some(d) = devs.get(&c.device_id) else {
            error!(node, connection = c.id, device = c.device_id, "connection without its device; not forwarded");
            continue;
        };
        let Some(spec) = c.forward_spec(d.vpn_ip) else {
            error!(node, connection = c.id, vpn_ip = %d.vpn_ip, "connection on a device without an IPv4 address; not forwarded");
            continue;
        };
        match present.iter().find(|f| f.proto == spec.proto && f.public_port == spec.public_port) {
            Some(f) if f.device == spec.device => {}
            Some(f) => warn!(node, connection = c.id, port = spec.public_port, rule = f.id, target = %f.device,
                origin = ?f.origin, "the connection's public port is held by another forward rule; not forwarded"),
            None => match steer.add_forward(&spec, Origin::Runtime) {
                Ok(id) => {
                    added += 1;
                    info!(node, connection = c.id, rule = id, port = spec.public_port, device = %spec.device, "forward rule restored");
                }
                Err(e) => error!(node, connection = c.id, %e, "restoring a connection's forward rule failed"),
            },
        }
    }
    if conns.iter().any(Connection::is_forward) {
        reserve(steer);
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nc(
        protocol: &str,
        public: Option<u16>,
        device: Option<u16>,
        user: Option<&str>,
        proxy: Option<u16>,
    ) -> NewConnection {
        NewConnection {
            device_id: "00000000-0000-0000-0000-000000000000".into(),
            protocol: protocol.parse().unwrap(),
            public_port: public,
            device_port: device,
            username: user.map(str::to_string),
            proxy_port: proxy,
        }
    }

    #[test]
    fn shapes_are_checked_and_errors_name_the_problem() {
        assert!(validate(&nc("http", Some(8080), Some(3128), None, None)).is_ok());
        assert!(validate(&nc("socks5", Some(1080), Some(1080), None, None)).is_ok());
        assert!(validate(&nc("openvpn", None, None, Some("bob@x.y-z_1"), Some(12345))).is_ok());
        assert_eq!(
            serde_json::from_str::<ConnectionProtocol>("\"ftp\"").unwrap_err().to_string(),
            "bad protocol \"ftp\": expected one of http, socks5, openvpn"
        );
        let cases: [(NewConnection, &str); 9] = [
            (nc("http", None, Some(1), None, None), "needs public_port"),
            (nc("http", Some(1), None, None, None), "needs device_port"),
            (nc("http", Some(0), Some(1), None, None), "public_port 0 is not a port"),
            (nc("socks5", Some(1), Some(1), Some("bob"), None), "has no username"),
            (nc("socks5", Some(1), Some(1), None, Some(5)), "has no proxy_port"),
            (nc("openvpn", None, None, None, Some(5)), "needs username"),
            (nc("openvpn", None, None, Some("bob"), None), "needs proxy_port"),
            (nc("openvpn", Some(1), None, Some("bob"), Some(5)), "has no public_port"),
            (nc("openvpn", None, None, Some("bo b"), Some(5)), "has the character ' '"),
        ];
        for (c, want) in cases {
            let e = validate(&c).unwrap_err().to_string();
            assert!(e.contains(want), "{c:?}: {e:?} lacks {want:?}");
        }
        assert!(check_username("").unwrap_err().to_string().contains("1 to 64"));
        assert!(check_username(&"a".repeat(65)).unwrap_err().to_string().contains("got 65"));
        assert!(check_username(&"a".repeat(64)).is_ok());
    }
}
