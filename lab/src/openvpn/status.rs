//! The management interfaces: one command over TCP (with the optional password) and the
//! `CLIENT_LIST` rows of `status 3`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::{OvpnLab, Transport};
use crate::in_netns;

/// One `CLIENT_LIST` row of `status 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusClient {
    pub common_name: String,
    pub real_address: String,
    pub virtual_v4: String,
    pub virtual_v6: String,
    pub username: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// Parse the `CLIENT_LIST` rows of `status 3` (tab separated) output, columns located by the
/// `HEADER CLIENT_LIST` row (fixed positions without it).
pub fn parse_status_clients(text: &str) -> Vec<StatusClient> {
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.trim_end_matches('\r').split('\t').collect()).collect();
    let header: Option<&Vec<&str>> = rows.iter().find(|r| r.len() > 2 && r[0] == "HEADER" && r[1] == "CLIENT_LIST");
    // Column of `name` in a CLIENT_LIST row (the header row has one extra leading field).
    let col = |name: &str, default: usize| -> usize {
        header.and_then(|h| h.iter().position(|f| *f == name)).map(|p| p - 1).unwrap_or(default)
    };
    let (cn, real, v4, v6, rx, tx, user) = (
        col("Common Name", 1),
        col("Real Address", 2),
        col("Virtual Address", 3),
        col("Virtual IPv6 Address", 4),
        col("Bytes Received", 5),
        col("Bytes Sent", 6),
        col("Username", 9),
    );
    rows.iter()
        .filter(|r| r.first() == Some(&"CLIENT_LIST"))
        .map(|r| {
            let f = |k: usize| r.get(k).map(|s| s.to_string()).unwrap_or_default();
            StatusClient {
                common_name: f(cn),
                real_address: f(real),
                virtual_v4: f(v4),
                virtual_v6: f(v6),
                username: f(user),
                bytes_received: f(rx).parse().unwrap_or(0),
                bytes_sent: f(tx).parse().unwrap_or(0),
            }
        })
        .collect()
}

impl OvpnLab {
    /// `status 3` of instance `t` through its management port (raw text, `\r` removed, up to
    /// and including the `END` line). Management admits one client at a time: while another
    /// client (e.g. the daemon) holds the port this times out after 5 s; read
    /// [`OvpnLab::status_file`] instead then.
    pub fn status(&self, t: Transport) -> Result<String> {
        let port = t.mgmt_port();
        let pw = self.cfg.mgmt_password.clone();
        in_netns(&self.server_ns(), move || mgmt_command(port, pw.as_deref(), "status 3"))
            .with_context(|| format!("status 3 via management 127.0.0.1:{port}"))
    }

    /// [`parse_status_clients`] of [`OvpnLab::status`].
    pub fn status_clients(&self, t: Transport) -> Result<Vec<StatusClient>> {
        Ok(parse_status_clients(&self.status(t)?))
    }
}

/// Run one management command on 127.0.0.1:`port` (from the calling thread's namespace) and
/// return its output up to and including `END` (`\r` removed, `>` notifications dropped).
fn mgmt_command(port: u16, password: Option<&str>, cmd: &str) -> Result<String> {
    let timeout = Duration::from_secs(5);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut sock = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut buf = String::new();
    let deadline = Instant::now() + timeout;
    // Read until `done(buf)` holds, bounded by the deadline.
    let read_until = |sock: &mut TcpStream, buf: &mut String, what: &str, done: &dyn Fn(&str) -> bool| {
        let mut chunk = [0u8; 4096];
        while !done(buf) {
            if Instant::now() > deadline {
                bail!("management: no {what} within {timeout:?} (port busy with another client?); got {buf:?}");
            }
            match sock.read(&mut chunk) {
                Ok(0) => bail!("management closed the connection; got {buf:?}"),
                Ok(n) => buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(anyhow!(e).context("management read")),
            }
        }
        Ok(())
    };
    if let Some(pw) = password {
        read_until(&mut sock, &mut buf, "password prompt", &|b| b.contains("ENTER PASSWORD:"))?;
        sock.write_all(format!("{pw}\n").as_bytes())?;
        read_until(&mut sock, &mut buf, "password reply", &|b| b.contains("SUCCESS:") || b.contains("ERROR:"))?;
        if !buf.contains("SUCCESS:") {
            bail!("management password rejected: {buf:?}");
        }
    }
    read_until(&mut sock, &mut buf, "banner", &|b| {
        b.contains(">INFO:") && b[b.find(">INFO:").unwrap_or(0)..].contains('\n')
    })?;
    buf.clear();
    sock.write_all(format!("{cmd}\n").as_bytes())?;
    read_until(&mut sock, &mut buf, "END", &|b| b.lines().any(|l| l.trim_end() == "END"))?;
    let _ = sock.write_all(b"quit\n");
    let mut out = String::new();
    for l in buf.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.starts_with('>')) {
        out.push_str(l);
        out.push('\n');
        if l == "END" {
            break;
        }
    }
    Ok(out)
}
