//! WireGuard peers, read with `wg show IFACE dump` (kernel and userspace implementations
//! alike).
//!
//! Dump format (wireguard-tools): tab separated; the first line is the interface
//! (private-key, public-key, listen-port, fwmark), then one line per peer: public-key,
//! preshared-key, endpoint, allowed-ips, latest-handshake, transfer-rx, transfer-tx,
//! persistent-keepalive. "(none)" marks an absent endpoint / allowed-ips, a handshake of 0
//! means never, "off" a disabled keepalive; allowed-ips are comma separated.

use std::{process::Stdio, time::Duration};

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeer {
    /// Base64 public key.
    pub public_key: String,
    /// "ip:port" or None.
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds; None if never.
    pub latest_handshake_unix: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("running `wg show {iface} dump`: {reason} (is wireguard-tools installed and {iface} up?)")]
    Command { iface: String, reason: String },
}

/// A WireGuard key: 32 bytes in standard base64 (44 characters, one '=' of padding).
fn is_key(s: &str) -> bool {
    s.len() == 44 && s.ends_with('=') && s[..43].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

fn parse_peer(line: &str) -> Result<WgPeer, String> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 8 {
        return Err(format!("{} fields, expected 8", f.len()));
    }
    if !is_key(f[0]) {
        return Err(format!("public key {:?} is not a base64 WireGuard key", f[0]));
    }
    let endpoint = match f[2] {
        "(none)" | "" => None,
        e => {
            if e.parse::<std::net::SocketAddr>().is_err() {
                return Err(format!("endpoint {e:?} is not ip:port"));
            }
            Some(e.to_string())
        }
    };
    let allowed_ips = match f[3] {
        "(none)" | "" => Vec::new(),
        list => list
            .split(',')
            .map(|n| n.trim().parse::<IpNet>().map_err(|_| format!("allowed ip {n:?} is not a network")))
            .collect::<Result<_, _>>()?,
    };
    let num = |i: usize, what: &str| f[i].parse::<u64>().map_err(|_| format!("{what} {:?} is not a number", f[i]));
    let handshake = num(4, "latest-handshake")?;
    let rx_bytes = num(5, "transfer-rx")?;
    let tx_bytes = num(6, "transfer-tx")?;
    if f[7] != "off" && f[7].parse::<u16>().is_err() {
        return Err(format!("persistent-keepalive {:?} is neither off nor seconds", f[7]));
    }
    Ok(WgPeer {
        public_key: f[0].to_string(),
        endpoint,
        allowed_ips,
        latest_handshake_unix: (handshake != 0).then_some(handshake),
        rx_bytes,
        tx_bytes,
    })
}

/// Parse `wg show IFACE dump` output (first line: the interface; then one line per peer).
/// Malformed peer lines are skipped (returned as messages in .1).
pub fn parse_dump(text: &str) -> (Vec<WgPeer>, Vec<String>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l)).filter(|l| !l.trim().is_empty());
    match lines.next() {
        None => skipped.push("empty dump: no interface line".to_string()),
        Some(first) => {
            let n = first.split('\t').count();
            if n != 4 {
                // Not fatal: maybe the interface line is missing; try it as a peer.
                match parse_peer(first) {
                    Ok(p) => {
                        skipped.push(format!("no interface line (first line has {n} fields, expected 4)"));
                        peers.push(p);
                    }
                    Err(e) => skipped.push(format!("interface line {first:?}: {n} fields, expected 4 ({e})")),
                }
            }
        }
    }
    for line in lines {
        match parse_peer(line) {
            Ok(p) => peers.push(p),
            Err(e) => skipped.push(format!("peer line {line:?}: {e}")),
        }
    }
    (peers, skipped)
}

/// `wg` may hang on a stuck userspace implementation's UAPI socket.
const WG_TIMEOUT: Duration = Duration::from_secs(5);

/// Run `wg show IFACE dump` and parse it. Malformed peer lines are logged and skipped.
pub async fn read_peers(iface: &str) -> Result<Vec<WgPeer>, WgError> {
    let err = |reason: String| WgError::Command { iface: iface.to_string(), reason };
    if iface.is_empty() || iface.len() > 15 || iface.contains(['/', '\0']) || iface.starts_with('-') {
        return Err(err("not a valid interface name".into()));
    }
    // Spawned from this thread (so it runs in this thread's network namespace); waited for
    // on the blocking pool, killed if it takes longer than WG_TIMEOUT.
    let child = std::process::Command::new("wg")
        .args(["show", iface, "dump"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot start wg: {e}")))?;
    let pid = child.id();
    let mut wait = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(WG_TIMEOUT, &mut wait).await {
        Ok(joined) => joined.map_err(|e| err(format!("waiting for wg: {e}")))?,
        Err(_) => {
            // The child is not reaped before wait_with_output returns, so the pid is still ours.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            let _ = wait.await;
            return Err(err(format!("no answer within {} s (killed)", WG_TIMEOUT.as_secs())));
        }
    }
    .map_err(|e| err(format!("waiting for wg: {e}")))?;
    if !out.status.success() {
        return Err(err(format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    let (peers, skipped) = parse_dump(&String::from_utf8_lossy(&out.stdout));
    for s in skipped {
        tracing::warn!(iface, "wg show dump: skipping {s}");
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real `wg show IFACE dump` of a wireguard-go interface (throwaway keys): one peer after
    /// a handshake with a preshared key and two allowed IPs, one without endpoint or
    /// handshake, one with an IPv6 endpoint and no allowed IPs.
    const SERVER_DUMP: &str = "4ExJTc8DNRyfjlAFgZxbgvj171afYqNqSaC4raQybEs=\tZi/cFauYKTg6HmirCKM2KHzdyCddQ0dRWuUdZYAYmzU=\t51820\toff
DzP2039J2+GwQj4HYuj6riLAcmhuBMmN4cQFC1oZ32A=\tNQtbjqn89e+nY7sWLqwmug5kJdwIGg9b7+DTv6Ztrp4=\t10.98.0.2:53640\t10.97.0.2/32,fd97::2/128\t1795450355\t436\t348\toff
lqz5SGHoKpNpx9yVYBfjciNLkAE7tnYjPqEzlCwtz0s=\t(none)\t(none)\t10.97.0.3/32\t0\t0\t0\toff
8SPQGa+j4VhOYrfFzi/LWX97jRC/bQ+GApzrqIqsZHw=\t(none)\t[fd98::5]:51821\t(none)\t0\t0\t0\toff
";
    /// The other side: a client with an endpoint and a keepalive.
    const CLIENT_DUMP: &str = "gLY3h7GxYN1CDVwqHo4yFm3k9bS5FfAvNB6HW84msX4=\tDzP2039J2+GwQj4HYuj6riLAcmhuBMmN4cQFC1oZ32A=\t53640\toff
Zi/cFauYKTg6HmirCKM2KHzdyCddQ0dRWuUdZYAYmzU=\tNQtbjqn89e+nY7sWLqwmug5kJdwIGg9b7+DTv6Ztrp4=\t10.98.0.1:51820\t10.97.0.0/24\t1795450355\t348\t436\t25
";

    #[test]
    fn real_server_dump() {
        let (peers, skipped) = parse_dump(SERVER_DUMP);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[0],
            WgPeer {
                public_key: "DzP2039J2+GwQj4HYuj6riLAcmhuBMmN4cQFC1oZ32A=".into(),
                endpoint: Some("10.98.0.2:53640".into()),
                allowed_ips: vec!["10.97.0.2/32".parse().unwrap(), "fd97::2/128".parse().unwrap()],
                latest_handshake_unix: Some(1795450355),
                rx_bytes: 436,
                tx_bytes: 348,
            }
        );
        assert_eq!(peers[1].endpoint, None);
        assert_eq!(peers[1].latest_handshake_unix, None);
        assert_eq!(peers[1].allowed_ips, vec!["10.97.0.3/32".parse::<IpNet>().unwrap()]);
        assert_eq!(peers[2].endpoint.as_deref(), Some("[fd98::5]:51821"));
        assert!(peers[2].allowed_ips.is_empty());
    }

    #[test]
    fn real_client_dump() {
        let (peers, skipped) = parse_dump(CLIENT_DUMP);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].allowed_ips, vec!["10.97.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!((peers[0].rx_bytes, peers[0].tx_bytes), (348, 436));
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let key = "lqz5SGHoKpNpx9yVYBfjciNLkAE7tnYjPqEzlCwtz0s=";
        let good = format!("{key}\t(none)\t(none)\t10.97.0.3/32\t0\t0\t0\toff");
        let text = [
            "priv\tpub\t51820\toff".to_string(),
            format!("{key}\t(none)\t(none)"),
            "notakey\t(none)\t(none)\t10.97.0.3/32\t0\t0\t0\toff".to_string(),
            format!("{key}\t(none)\t(none)\t10.97.0.300/32\t0\t0\t0\toff"),
            format!("{key}\t(none)\tnowhere\t10.97.0.3/32\t0\t0\t0\toff"),
            format!("{key}\t(none)\t(none)\t10.97.0.3/32\tsoon\t0\t0\toff"),
            format!("{key}\t(none)\t(none)\t10.97.0.3/32\t0\t0\t-1\toff"),
            format!("{key}\t(none)\t(none)\t10.97.0.3/32\t0\t0\t0\tsometimes"),
            good,
        ]
        .join("\n");
        let (peers, skipped) = parse_dump(&text);
        assert_eq!(peers.len(), 1);
        assert_eq!(skipped.len(), 7, "{skipped:#?}");
        for (s, want) in skipped.iter().zip([
            "fields",
            "not a base64",
            "not a network",
            "not ip:port",
            "latest-handshake",
            "transfer-tx",
            "persistent-keepalive",
        ]) {
            assert!(s.contains(want), "{s} should mention {want}");
        }
        let (peers, skipped) = parse_dump("");
        assert!(peers.is_empty() && skipped[0].contains("empty"));
    }

    #[tokio::test]
    async fn missing_interface_is_a_clear_error() {
        let e = read_peers("hanonexist0").await.unwrap_err().to_string();
        assert!(e.contains("wg show hanonexist0 dump"), "{e}");
        let e = read_peers("../x").await.unwrap_err().to_string();
        assert!(e.contains("not a valid interface name"), "{e}");
    }
}
