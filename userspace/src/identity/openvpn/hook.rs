//! What OpenVPN's client-connect / client-disconnect script tells the daemon: the `HookCall`
//! built from the environment OpenVPN passes, and the timeouts of its delivery.
//!
//! `tunmeter hook openvpn` (`cli::hook`) POSTs it to /api/v1/hooks/openvpn over the control
//! socket, retrying once after 1 s, 5 s timeout per attempt. Exit status 0 only when the daemon
//! accepted (2xx): OpenVPN rejects the client otherwise (fail closed).
//!
//! The daemon side is identity::Identity::hook. It matches a hook call with the management
//! interface's CLIENT_LIST row by (VPN address, real address), so `real_address` is built
//! exactly the way OpenVPN 2.6 prints the Real Address column (see [`real_address`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// client-connect or client-disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HookKind {
    ClientConnect,
    ClientDisconnect,
}

/// The body of POST /api/v1/hooks/openvpn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HookCall {
    pub kind: HookKind,
    /// `dev` (tun0, tun1): which instance/device.
    pub dev: String,
    pub common_name: String,
    /// `username` if the client used auth-user-pass.
    pub username: Option<String>,
    /// `ifconfig_pool_remote_ip`
    pub vpn_v4: Option<String>,
    /// `ifconfig_pool_remote_ip6`
    pub vpn_v6: Option<String>,
    /// The client's public address exactly as the management interface's status prints it
    /// (OpenVPN 2.6): `trusted_ip:trusted_port` for IPv4 ("203.0.113.7:51234"), the bare
    /// `trusted_ip6` without a port for IPv6 ("2001:db8::7").
    pub real_address: String,
    /// `time_unix`
    pub connected_since_unix: Option<u64>,
    /// `bytes_received` / `bytes_sent` (disconnect only; OpenVPN's own view).
    pub bytes_received: Option<u64>,
    pub bytes_sent: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("missing environment variable {0} (is this run by OpenVPN as client-connect/client-disconnect?)")]
    MissingEnv(&'static str),
    #[error("bad environment variable {name}={value:?}: {reason}")]
    BadEnv { name: &'static str, value: String, reason: String },
    #[error("script_type {0:?} is neither client-connect nor client-disconnect")]
    BadScriptType(String),
}

/// The Real Address column of `status 3` for a client: OpenVPN 2.6 prints an IPv4 peer as
/// "ip:port" (UDP and TCP alike, also an IPv4 client of a dual-stack udp6/tcp6-server
/// instance, which OpenVPN reports in `trusted_ip`) and an IPv6 peer as the bare address,
/// without port or brackets. Checked against real captures (status/testdata).
pub fn real_address(trusted_ip: Option<&str>, trusted_ip6: Option<&str>, trusted_port: Option<&str>) -> String {
    match (trusted_ip, trusted_ip6) {
        (Some(ip), _) => format!("{ip}:{}", trusted_port.unwrap_or("")),
        (None, Some(ip6)) => ip6.to_string(),
        (None, None) => String::new(),
    }
}

/// Build the call from an environment (`std::env::vars()` in production).
pub fn call_from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<HookCall, HookError> {
    // Empty counts as absent (OpenVPN does not set empty values; a shell might).
    let get = |name: &'static str| env(name).filter(|v| !v.is_empty());
    let need = |name: &'static str| get(name).ok_or(HookError::MissingEnv(name));
    let bad = |name: &'static str, value: &str, reason: &str| HookError::BadEnv {
        name,
        value: value.to_string(),
        reason: reason.to_string(),
    };
    let number = |name: &'static str| -> Result<Option<u64>, HookError> {
        get(name).map(|v| v.trim().parse::<u64>().map_err(|_| bad(name, &v, "not a non-negative integer"))).transpose()
    };

    let script_type = need("script_type")?;
    let kind = match script_type.as_str() {
        "client-connect" => HookKind::ClientConnect,
        "client-disconnect" => HookKind::ClientDisconnect,
        _ => return Err(HookError::BadScriptType(script_type)),
    };
    let dev = need("dev")?;
    let common_name = need("common_name")?;
    let username = get("username");

    let vpn_v4 = get("ifconfig_pool_remote_ip");
    if let Some(v) = &vpn_v4
        && v.parse::<std::net::Ipv4Addr>().is_err()
    {
        return Err(bad("ifconfig_pool_remote_ip", v, "not an IPv4 address"));
    }
    let vpn_v6 = get("ifconfig_pool_remote_ip6");
    if let Some(v) = &vpn_v6
        && v.parse::<std::net::Ipv6Addr>().is_err()
    {
        return Err(bad("ifconfig_pool_remote_ip6", v, "not an IPv6 address"));
    }
    if vpn_v4.is_none() && vpn_v6.is_none() {
        // Without a VPN address the daemon cannot tell which client this is.
        return Err(HookError::MissingEnv("ifconfig_pool_remote_ip"));
    }

    let trusted_ip = get("trusted_ip");
    let trusted_ip6 = get("trusted_ip6");
    let trusted_port = get("trusted_port");
    match (&trusted_ip, &trusted_ip6) {
        (Some(v), _) => {
            if v.parse::<std::net::Ipv4Addr>().is_err() {
                return Err(bad("trusted_ip", v, "not an IPv4 address"));
            }
            let port = trusted_port.as_deref().ok_or(HookError::MissingEnv("trusted_port"))?;
            if port.parse::<u16>().is_err() {
                return Err(bad("trusted_port", port, "not a port number"));
            }
        }
        (None, Some(v)) => {
            if v.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("trusted_ip6", v, "not an IPv6 address"));
            }
        }
        (None, None) => return Err(HookError::MissingEnv("trusted_ip")),
    }
    let real_address = real_address(trusted_ip.as_deref(), trusted_ip6.as_deref(), trusted_port.as_deref());

    Ok(HookCall {
        kind,
        dev,
        common_name,
        username,
        vpn_v4,
        vpn_v6,
        real_address,
        connected_since_unix: number("time_unix")?,
        bytes_received: number("bytes_received")?,
        bytes_sent: number("bytes_sent")?,
    })
}

/// Timeout of one attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before the single retry.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Path of the hook endpoint.
pub const HOOK_PATH: &str = "/api/v1/hooks/openvpn";

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::status::parse_status;
    use super::*;

    /// `env | sort` output as OpenVPN 2.6.14 gave it to a client-connect script.
    fn env_file(text: &str) -> HashMap<String, String> {
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn call(env: &HashMap<String, String>) -> Result<HookCall, HookError> {
        call_from_env(&|k| env.get(k).cloned())
    }

    const STATUS_UDP: &str = include_str!("testdata/status3-udp.txt");
    const STATUS_TCP: &str = include_str!("testdata/status3-tcp.txt");

    /// The hook's real_address equals the Real Address of the same client in status 3 (real
    /// captures of the same connections): IPv4 over UDP, IPv4 over TCP, IPv6 over TCP.
    #[test]
    fn real_address_matches_status_for_real_captures() {
        let cases = [
            (include_str!("testdata/env-connect-udp.txt"), STATUS_UDP, "10.99.0.2:38937"),
            (include_str!("testdata/env-connect-tcp.txt"), STATUS_TCP, "10.99.0.2:43062"),
            (include_str!("testdata/env-connect-tcp-v6.txt"), STATUS_TCP, "fd99::2"),
        ];
        for (env, status, want) in cases {
            let c = call(&env_file(env)).unwrap();
            assert_eq!(c.real_address, want);
            let (rows, _) = parse_status(status);
            let row = rows
                .iter()
                .find(|r| r.virtual_v4.map(|v| v.to_string()) == c.vpn_v4)
                .unwrap_or_else(|| panic!("no status row for {:?}", c.vpn_v4));
            assert_eq!(row.real_address, c.real_address);
            assert_eq!(row.common_name, c.common_name);
            assert_eq!(row.virtual_v6.map(|v| v.to_string()), c.vpn_v6);
            assert_eq!(Some(row.connected_since_unix), c.connected_since_unix);
            assert_eq!(row.username, c.username);
        }
    }

    #[test]
    fn real_connect_env() {
        let c = call(&env_file(include_str!("testdata/env-connect-udp.txt"))).unwrap();
        assert_eq!(
            c,
            HookCall {
                kind: HookKind::ClientConnect,
                dev: "tun0".into(),
                common_name: "client1".into(),
                username: Some("alice".into()),
                vpn_v4: Some("10.8.0.2".into()),
                vpn_v6: Some("fd00:8::1000".into()),
                real_address: "10.99.0.2:38937".into(),
                connected_since_unix: Some(1795449874),
                bytes_received: None,
                bytes_sent: None,
            }
        );
    }

    #[test]
    fn real_disconnect_env() {
        let c = call(&env_file(include_str!("testdata/env-disconnect-tcp-v6.txt"))).unwrap();
        assert_eq!(c.kind, HookKind::ClientDisconnect);
        assert_eq!(c.dev, "tun1");
        assert_eq!(c.username, None);
        assert_eq!((c.bytes_received, c.bytes_sent), (Some(2161), Some(2206)));
        assert_eq!(c.real_address, "fd99::2");
    }

    #[test]
    fn json_body_round_trips() {
        let c = call(&env_file(include_str!("testdata/env-disconnect-tcp-v6.txt"))).unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["kind"], "client-disconnect");
        assert_eq!(serde_json::from_value::<HookCall>(json).unwrap(), c);
    }

    #[test]
    fn missing_and_garbled_values_name_the_variable() {
        let base = env_file(include_str!("testdata/env-connect-udp.txt"));
        let with = |k: &str, v: Option<&str>| {
            let mut e = base.clone();
            match v {
                Some(v) => e.insert(k.to_string(), v.to_string()),
                None => e.remove(k),
            };
            call(&e).unwrap_err().to_string()
        };
        for k in ["script_type", "dev", "common_name", "trusted_port"] {
            let msg = with(k, None);
            assert!(msg.contains(k) && msg.contains("missing"), "{k}: {msg}");
        }
        let mut e = base.clone();
        e.remove("ifconfig_pool_remote_ip");
        e.remove("ifconfig_pool_remote_ip6");
        assert!(call(&e).unwrap_err().to_string().contains("ifconfig_pool_remote_ip"));
        e = base.clone();
        e.remove("trusted_ip");
        assert!(call(&e).unwrap_err().to_string().contains("trusted_ip"));
        for (k, v) in [
            ("ifconfig_pool_remote_ip", "10.8.0.256"),
            ("ifconfig_pool_remote_ip6", "fd00::zz"),
            ("trusted_ip", "fd99::2"),
            ("trusted_port", "70000"),
            ("time_unix", "yesterday"),
            ("bytes_received", "-1"),
            ("bytes_sent", "1e9"),
        ] {
            let msg = with(k, Some(v));
            assert!(msg.contains(k) && msg.contains(v), "{k}: {msg}");
        }
        assert!(with("script_type", Some("up")).contains("\"up\""));
        // An empty username is no username.
        let mut e = base.clone();
        e.insert("username".into(), String::new());
        assert_eq!(call(&e).unwrap().username, None);
    }
}
