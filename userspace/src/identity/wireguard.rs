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
    /// As `wg` prints it: "ip:port", "[ipv6]:port" or "[fe80::1%eth0]:port"; None if
    /// "(none)".
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

/// Why a peer line was skipped. Never contains field values other than the public key: peer
/// lines carry the preshared key, and the interface line (if it shows up where a peer line
/// is expected) the private key.
fn parse_peer(line: &str) -> Result<WgPeer, String> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 8 {
        return Err(format!("{} fields, expected 8", f.len()));
    }
    if !is_key(f[0]) {
        return Err("public-key is not a base64 WireGuard key".to_string());
    }
    let bad = |what: &str| format!("peer {}: {what}", f[0]);
    // Kept as printed: `wg` writes link-local IPv6 endpoints with a zone
    // ("[fe80::1%eth0]:51820"), which `SocketAddr` does not parse.
    let endpoint = match f[2] {
        "(none)" | "" => None,
        e => Some(e.to_string()),
    };
    let allowed_ips = match f[3] {
        "(none)" | "" => Vec::new(),
        list => list
            .split(',')
            .map(|n| n.trim().parse::<IpNet>().map_err(|_| bad("allowed-ips is not a list of networks")))
            .collect::<Result<_, _>>()?,
    };
    let num = |i: usize, what: &str| f[i].parse::<u64>().map_err(|_| bad(&format!("{what} is not a number")));
    let handshake = num(4, "latest-handshake")?;
    let rx_bytes = num(5, "transfer-rx")?;
    let tx_bytes = num(6, "transfer-tx")?;
    if f[7] != "off" && f[7].parse::<u16>().is_err() {
        return Err(bad("persistent-keepalive is neither off nor seconds"));
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
/// Malformed peer lines are skipped and described in .1: by line number and field name, and
/// by public key when the line looks like a peer line, never with the keys or other values.
pub fn parse_dump(text: &str) -> (Vec<WgPeer>, Vec<String>) {
    let mut peers = Vec::new();
    let mut skipped = Vec::new();
    let mut lines = text
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        None => skipped.push("empty dump: no interface line".to_string()),
        Some((_, first)) => {
            let n = first.split('\t').count();
            if n != 4 {
                // Not fatal: maybe the interface line is missing; try it as a peer.
                match parse_peer(first) {
                    Ok(p) => {
                        skipped.push(format!("no interface line (first line has {n} fields, expected 4)"));
                        peers.push(p);
                    }
                    Err(e) => skipped.push(format!("interface line: {n} fields, expected 4 (as a peer line: {e})")),
                }
            }
        }
    }
    for (no, line) in lines {
        match parse_peer(line) {
            Ok(p) => peers.push(p),
            Err(e) => skipped.push(format!("line {no}: {e}")),
        }
    }
    (peers, skipped)
}

/// `wg` may hang on a stuck userspace implementation's UAPI socket.
const WG_TIMEOUT: Duration = Duration::from_secs(5);

/// Problems already warned about, as "iface: message" (bounded), so that a malformed peer is
/// not warned about on every tick.
static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
const MAX_WARNED: usize = 256;

/// True the first time (iface, msg) is seen.
fn first_time(iface: &str, msg: &str) -> bool {
    let key = format!("{iface}: {msg}");
    let mut seen = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(&key) {
        return false;
    }
    if seen.len() >= MAX_WARNED {
        seen.remove(0);
    }
    seen.push(key);
    true
}

/// Run `wg show IFACE dump` and parse it. Malformed peer lines are skipped and logged: a
/// warning the first time a problem is seen, at debug level on later reads.
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
        if first_time(iface, &s) {
            tracing::warn!(iface, "wg show dump: skipping {s} (logged at debug level from now on)");
        } else {
            tracing::debug!(iface, "wg show dump: skipping {s}");
        }
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
            format!("{key}\t(none)\t(none)\t10.97.0.3/32,nowhere\t0\t0\t0\toff"),
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
            "line 2: 3 fields",
            "line 3: public-key is not a base64",
            "allowed-ips",
            "allowed-ips",
            "latest-handshake",
            "transfer-tx",
            "persistent-keepalive",
        ]) {
            assert!(s.contains(want), "{s} should mention {want}");
        }
        for s in &skipped[2..] {
            assert!(s.contains(&format!("peer {key}")), "{s} should name the peer");
            assert!(!s.contains("10.97.0.300") && !s.contains("nowhere") && !s.contains("soon"), "{s}");
        }
        let (peers, skipped) = parse_dump("");
        assert!(peers.is_empty() && skipped[0].contains("empty"));
    }

    /// Link-local IPv6 endpoints come with a zone, which `SocketAddr` rejects: the peer is kept
    /// with the endpoint as printed.
    #[test]
    fn link_local_endpoint_keeps_the_peer() {
        let text =
            "4ExJTc8DNRyfjlAFgZxbgvj171afYqNqSaC4raQybEs=\tZi/cFauYKTg6HmirCKM2KHzdyCddQ0dRWuUdZYAYmzU=\t51820\toff
DzP2039J2+GwQj4HYuj6riLAcmhuBMmN4cQFC1oZ32A=\t(none)\t[fe80::1%eth0]:51820\t10.97.0.2/32\t1795450355\t1\t2\toff
lqz5SGHoKpNpx9yVYBfjciNLkAE7tnYjPqEzlCwtz0s=\t(none)\tsomething odd\t10.97.0.3/32\t0\t0\t0\t25
";
        let (peers, skipped) = parse_dump(text);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].endpoint.as_deref(), Some("[fe80::1%eth0]:51820"));
        assert_eq!(peers[0].latest_handshake_unix, Some(1795450355));
        assert_eq!(peers[1].endpoint.as_deref(), Some("something odd"), "never dropped for its endpoint");
    }

    /// Messages about bad lines never contain the private or preshared keys (or the whole
    /// line), only the peer's public key and the field.
    #[test]
    fn messages_never_contain_secret_keys() {
        let private = "4ExJTc8DNRyfjlAFgZxbgvj171afYqNqSaC4raQybEs=";
        let psk = "NQtbjqn89e+nY7sWLqwmug5kJdwIGg9b7+DTv6Ztrp4=";
        let public = "DzP2039J2+GwQj4HYuj6riLAcmhuBMmN4cQFC1oZ32A=";
        let text = [
            // An interface line with an extra field (tried as a peer, fails).
            format!("{private}\tZi/cFauYKTg6HmirCKM2KHzdyCddQ0dRWuUdZYAYmzU=\t51820\toff\textra"),
            // Peer lines with a preshared key and one bad field each.
            format!("{public}\t{psk}\t10.98.0.2:1\t10.97.0.2/32\tnever\t1\t2\toff"),
            format!("{public}\t{psk}\t10.98.0.2:1\t{psk}\t0\t1\t2\toff"),
            format!("{public}\t{psk}\t10.98.0.2:1\t10.97.0.2/32\t0\t1\t2\t{psk}"),
            // A peer line with a field missing (the columns may have moved: no key is named).
            format!("{public}\t{psk}\t10.98.0.2:1\t10.97.0.2/32\t0\t1\t2"),
            // The interface line again where a peer is expected.
            format!("{private}\tZi/cFauYKTg6HmirCKM2KHzdyCddQ0dRWuUdZYAYmzU=\t51820\toff"),
            // A line whose first field is a secret but not a key.
            format!("{psk}x\t(none)\t(none)\t(none)\t0\t0\t0\toff"),
        ]
        .join("\n");
        let (peers, skipped) = parse_dump(&text);
        assert!(peers.is_empty(), "{peers:?}");
        assert_eq!(skipped.len(), 7, "{skipped:#?}");
        for s in &skipped {
            assert!(!s.contains(private), "private key in {s:?}");
            assert!(!s.contains(psk), "preshared key in {s:?}");
            assert!(!s.contains('\t'), "a whole line in {s:?}");
        }
        assert!(skipped[0].starts_with("interface line: 5 fields"), "{:?}", skipped[0]);
        for (s, field) in skipped[1..4].iter().zip(["latest-handshake", "allowed-ips", "persistent-keepalive"]) {
            assert!(s.contains(&format!("peer {public}")) && s.contains(field), "{s:?} should name {field}");
        }
        assert!(skipped[4].contains("line 5: 7 fields") && !skipped[4].contains(public), "{:?}", skipped[4]);
        assert!(skipped[5].contains("line 6: 4 fields"), "{:?}", skipped[5]);
        assert!(skipped[6].contains("line 7: public-key is not"), "{:?}", skipped[6]);
    }

    #[test]
    fn the_same_problem_is_warned_about_once() {
        assert!(first_time("hatest0", "line 2: 3 fields, expected 8"));
        assert!(!first_time("hatest0", "line 2: 3 fields, expected 8"));
        assert!(first_time("hatest1", "line 2: 3 fields, expected 8"));
        assert!(first_time("hatest0", "line 3: 3 fields, expected 8"));
        for i in 0..MAX_WARNED {
            first_time("hatest2", &format!("{i}"));
        }
        assert!(WARNED.lock().unwrap().len() <= MAX_WARNED);
    }

    #[tokio::test]
    async fn missing_interface_is_a_clear_error() {
        let e = read_peers("hanonexist0").await.unwrap_err().to_string();
        assert!(e.contains("wg show hanonexist0 dump"), "{e}");
        let e = read_peers("../x").await.unwrap_err().to_string();
        assert!(e.contains("not a valid interface name"), "{e}");
    }
}
