//! Rendering snapshots for people (tables) and programs (JSON). The JSON shapes are documented
//! in docs/cli-json.md and are a stable interface.

use std::{fmt::Write as _, net::IpAddr, time::Duration};

use serde::Serialize;

use crate::bpf::counters::{ClientsSnapshot, Count, OutcomeRow};

/// Rates between two snapshots, bits per second.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Rate {
    pub upload_bps: u64,
    pub download_bps: u64,
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

pub fn human_bps(bps: u64) -> String {
    const UNITS: [&str; 5] = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"];
    let mut v = bps as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 { format!("{bps} bit/s") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn rate(now: Count, before: Count, dt: Duration) -> u64 {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 { 0 } else { (now.saturating_sub(before).bytes as f64 * 8.0 / secs) as u64 }
}

/// Per-client rates of `now` against `before` (clients absent before have no rate).
pub fn rates(now: &ClientsSnapshot, before: &ClientsSnapshot) -> Vec<(IpAddr, Rate)> {
    let dt = Duration::from_millis(now.taken_unix_ms.saturating_sub(before.taken_unix_ms));
    now.clients
        .iter()
        .filter_map(|c| {
            let b = before.clients.iter().find(|b| b.ip == c.ip)?;
            Some((
                c.ip,
                Rate { upload_bps: rate(c.upload, b.upload, dt), download_bps: rate(c.download, b.download, dt) },
            ))
        })
        .collect()
}

fn ago(now_ms: u64, then: Option<u64>) -> String {
    match then {
        None => "never".into(),
        Some(t) => {
            let s = now_ms.saturating_sub(t) / 1000;
            if s < 60 {
                format!("{s}s ago")
            } else if s < 3600 {
                format!("{}m ago", s / 60)
            } else {
                format!("{}h ago", s / 3600)
            }
        }
    }
}

pub fn clients_table(snap: &ClientsSnapshot, rates: Option<&[(IpAddr, Rate)]>) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{:<40} {:>12} {:>10} {:>12} {:>10} {:>10}",
        "CLIENT", "UPLOAD", "UP PKTS", "DOWNLOAD", "DOWN PKTS", "LAST SEEN"
    );
    if rates.is_some() {
        let _ = write!(out, " {:>13} {:>13}", "UP RATE", "DOWN RATE");
    }
    out.push('\n');
    for c in &snap.clients {
        let _ = write!(
            out,
            "{:<40} {:>12} {:>10} {:>12} {:>10} {:>10}",
            c.ip.to_string(),
            human_bytes(c.upload.bytes),
            c.upload.packets,
            human_bytes(c.download.bytes),
            c.download.packets,
            ago(snap.taken_unix_ms, c.last_seen_unix_ms)
        );
        if let Some(r) = rates {
            let r = r.iter().find(|(ip, _)| *ip == c.ip).map(|(_, r)| *r).unwrap_or_default();
            let _ = write!(out, " {:>13} {:>13}", human_bps(r.upload_bps), human_bps(r.download_bps));
        }
        out.push('\n');
    }
    for (name, b) in [("(other)", &snap.other), ("(overflow: client map full)", &snap.overflow)] {
        if b.upload.packets + b.download.packets > 0 || name == "(other)" {
            let _ = writeln!(
                out,
                "{:<40} {:>12} {:>10} {:>12} {:>10}",
                name,
                human_bytes(b.upload.bytes),
                b.upload.packets,
                human_bytes(b.download.bytes),
                b.download.packets
            );
        }
    }
    let _ = writeln!(out, "{} clients", snap.clients.len());
    out
}

pub fn stats_table(rows: &[OutcomeRow]) -> String {
    let mut out = format!("{:<10} {:<16} {:>14} {:>16}\n", "DIRECTION", "OUTCOME", "PACKETS", "BYTES");
    for r in rows {
        let _ = writeln!(out, "{:<10} {:<16} {:>14} {:>16}", r.direction, r.outcome, r.packets, r.bytes);
    }
    out
}

/// `tunmeter steer list`: rules with counters, then the steering events that happened.
pub fn steer_table(l: &crate::steer::SteerList) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "forward rules: {}", l.forward.len());
    if !l.forward.is_empty() {
        let _ = writeln!(
            out,
            "{:>5}  {:<5} {:>6}  {:<15} {:<21} {:<7} {:>14} {:>10} {:>14} {:>10}",
            "id",
            "proto",
            "port",
            "public address",
            "device",
            "origin",
            "to dev bytes",
            "pkts",
            "from dev bytes",
            "pkts"
        );
        for f in &l.forward {
            let _ = writeln!(
                out,
                "{:>5}  {:<5} {:>6}  {:<15} {:<21} {:<7} {:>14} {:>10} {:>14} {:>10}",
                f.id,
                f.proto.to_string(),
                f.public_port,
                f.public_address.map_or_else(|| "any".to_string(), |a| a.to_string()),
                f.device.to_string(),
                format!("{:?}", f.origin).to_lowercase(),
                f.counters.to_target_bytes,
                f.counters.to_target_packets,
                f.counters.from_target_bytes,
                f.counters.from_target_packets
            );
        }
    }
    let _ = writeln!(out, "redirect rules: {}", l.redirect.len());
    if !l.redirect.is_empty() {
        let _ = writeln!(
            out,
            "{:>5}  {:<43} {:>10} {:<7} {:>14} {:>10}  {:<8} allow",
            "id", "source", "proxy port", "origin", "bytes", "pkts", "unparsed"
        );
        for r in &l.redirect {
            let _ = writeln!(
                out,
                "{:>5}  {:<43} {:>10} {:<7} {:>14} {:>10}  {:<8} {}",
                r.id,
                r.source.to_string(),
                r.proxy_port,
                format!("{:?}", r.origin).to_lowercase(),
                r.to_target_bytes,
                r.to_target_packets,
                format!("{:?}", r.unparsed).to_lowercase(),
                r.allow.names().join(",")
            );
        }
    }
    let _ = writeln!(out, "bypass: {}", l.bypass.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" "));
    let _ = writeln!(out, "events:");
    for (name, c) in &l.events {
        let _ = writeln!(out, "  {name:<20} {:>12} packets {:>16} bytes", c.packets, c.bytes);
    }
    out
}

/// `tunmeter sessions`: one row per session (the API's session objects).
pub fn sessions_table(sessions: &[serde_json::Value]) -> String {
    let text = |v: &serde_json::Value, k: &str| match &v[k] {
        serde_json::Value::String(s) if !s.is_empty() => s.clone(),
        _ => "-".to_string(),
    };
    let num = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let mut out = format!(
        "{:<24} {:<14} {:<12} {:<12} {:<22} {:>10} {:>10}  {:<20}  {}\n",
        "CLIENT", "USERNAME", "PROTOCOL", "INSTANCE", "FROM", "UPLOAD", "DOWNLOAD", "OPENED", "SESSION"
    );
    let now = crate::time::unix_ms();
    for s in sessions {
        let opened = num(s, "opened_unix_ms");
        let state = match s["closed_unix_ms"].as_u64() {
            None => format!("{} ago", human_duration(now.saturating_sub(opened))),
            Some(_) => format!("closed: {}", text(s, "close_reason")),
        };
        let user = match text(s, "username").as_str() {
            "-" => text(s, "common_name"),
            u => u.to_string(),
        };
        out.push_str(&format!(
            "{:<24} {:<14} {:<12} {:<12} {:<22} {:>10} {:>10}  {:<20}  {}\n",
            text(s, "client_ip"),
            user,
            text(s, "protocol"),
            text(s, "instance"),
            text(s, "real_address"),
            human_bytes(num(s, "up_bytes")),
            human_bytes(num(s, "down_bytes")),
            state,
            text(s, "id"),
        ));
    }
    out.push_str(&format!("{} session(s)\n", sessions.len()));
    out
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::counters::{Bucket, ClientRow};

    fn snap(ms: u64, up: u64) -> ClientsSnapshot {
        ClientsSnapshot {
            taken_unix_ms: ms,
            clients: vec![ClientRow {
                ip: "10.8.0.2".parse().unwrap(),
                upload: Count { bytes: up, packets: 1 },
                download: Count::default(),
                last_seen_unix_ms: Some(ms),
            }],
            other: Bucket::default(),
            overflow: Bucket::default(),
        }
    }

    #[test]
    fn rates_from_two_snapshots() {
        let r = rates(&snap(2000, 1_250_000), &snap(1000, 0));
        assert_eq!(r[0].1.upload_bps, 10_000_000);
        assert_eq!(r[0].1.download_bps, 0);
    }

    #[test]
    fn table_lists_clients_and_other() {
        let t = clients_table(&snap(1000, 2048), None);
        assert!(
            t.contains("10.8.0.2") && t.contains("2.0 KiB") && t.contains("(other)") && t.contains("1 clients"),
            "{t}"
        );
        assert!(!t.contains("overflow"));
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bps(999), "999 bit/s");
        assert_eq!(human_bps(12_500_000), "12.5 Mbit/s");
    }

    #[test]
    fn sessions_table_shows_names_and_states() {
        let rows = vec![
            serde_json::json!({"client_ip": "10.8.0.2", "username": "alice", "protocol": "openvpn-udp",
                "instance": "udp", "real_address": "172.30.1.2:4000", "up_bytes": 2048, "down_bytes": 1,
                "opened_unix_ms": 1, "id": "u1"}),
            serde_json::json!({"client_ip": "10.8.0.3", "username": "", "common_name": "bob", "protocol": "openvpn-tcp",
                "closed_unix_ms": 5, "close_reason": "disconnected", "opened_unix_ms": 1, "id": "u2"}),
        ];
        let t = sessions_table(&rows);
        assert!(t.contains("alice") && t.contains("2.0 KiB") && t.contains("ago"), "{t}");
        assert!(t.contains("bob") && t.contains("closed: disconnected"), "{t}");
        assert!(t.ends_with("2 session(s)\n"), "{t}");
    }
}
