//! A client of one OpenVPN management interface: log in, read `status 3` on a timer and on
//! every client notification, reconnect with backoff, report snapshots and losses.
//!
//! Protocol as seen from OpenVPN 2.6.14 (captures in `testdata/`): lines end in CRLF. With a
//! `pw-file` the server first sends `ENTER PASSWORD:` *without* a line end; after the right
//! password it answers `SUCCESS: password is correct`, then the `>INFO:` banner. `status 3`
//! answers with lines up to `END`; `>` notifications (`>CLIENT:ESTABLISHED,cid` plus an ENV
//! block, `>LOG:`, ...) can arrive at any time, also between the lines of a reply.
//! `>CLIENT:ESTABLISHED` is sent without `management-client-auth`; `>CLIENT:DISCONNECT` only
//! with it (docs/openvpn.md). Disconnects are therefore also found by the periodic `status 3`.

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    sync::mpsc,
};
use tracing::{debug, info, warn};

use super::{
    notify::{Notification, NotificationParser},
    status::{OvpnClient, parse_status},
};
use crate::config::{MgmtAddr, OpenvpnInstance};

/// The password as OpenVPN reads it from its pw-file: the first line, without its line end.
fn first_line(password: &str) -> &str {
    password.split(['\n', '\r']).next().unwrap_or("")
}

/// What an instance task reports.
#[derive(Debug, Clone, PartialEq)]
pub enum MgmtEvent {
    /// The full client list of `instance`, from `status 3` (after connecting, every
    /// `reconcile`, and right after an ESTABLISHED/DISCONNECT notification).
    Snapshot { instance: String, clients: Vec<OvpnClient> },
    /// The connection to the management interface was lost or could not be made (after it had
    /// been up, or at the first attempt). The task keeps reconnecting with backoff (1 s doubling
    /// to 30 s) and sends a Snapshot when it is back.
    Lost { instance: String, error: String },
}

/// Connecting, the greeting and the password exchange.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for a command's END (and for a write to finish). OpenVPN serves the management
/// interface from its single event loop, so it stalls while it runs a synchronous
/// `client-connect` / `client-disconnect` script, and our hook (`tunmeter hook openvpn`) may
/// take up to ~11 s when the daemon hangs (5 s per attempt, 1 s pause, 5 s retry). A reply
/// that late is not a lost connection: `Lost` closes all of the instance's sessions, so wait
/// longer than the hook's worst case.
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest line accepted from the server.
const MAX_LINE: usize = 1 << 20;
/// The password prompt OpenVPN sends without a line end.
const PROMPT: &str = "ENTER PASSWORD:";

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The `events` receiver is gone: stop.
    #[error("the receiver of management events was dropped")]
    Stopped,
    #[error("{0}")]
    Failed(String),
}

fn fail(msg: impl Into<String>) -> SessionError {
    SessionError::Failed(msg.into())
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Line reader over the management connection (CRLF or LF; the password prompt counts as a
/// line). Cancel safe: bytes are only consumed once a read completed.
struct Lines {
    io: Box<dyn Stream>,
    buf: Vec<u8>,
}

impl Lines {
    async fn next_line(&mut self) -> Result<String, SessionError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.starts_with(PROMPT.as_bytes()) {
                self.buf.drain(..PROMPT.len());
                return Ok(PROMPT.to_string());
            }
            if self.buf.len() > MAX_LINE {
                return Err(fail(format!("the server sent a line longer than {MAX_LINE} bytes")));
            }
            let mut chunk = [0u8; 8192];
            let n = self.io.read(&mut chunk).await.map_err(|e| fail(format!("reading: {e}")))?;
            if n == 0 {
                return Err(fail("the management interface closed the connection"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn send(&mut self, cmd: &str) -> Result<(), SessionError> {
        let mut data = Vec::with_capacity(cmd.len() + 1);
        data.extend_from_slice(cmd.as_bytes());
        data.push(b'\n');
        let write = async {
            self.io.write_all(&data).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(REPLY_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(fail(format!("writing: {e}"))),
            Err(_) => Err(fail(format!("writing did not finish within {} s", REPLY_TIMEOUT.as_secs()))),
        }
    }
}

/// Warns once per kind of odd input per task; later ones go to debug.
#[derive(Default)]
struct Warned(HashSet<&'static str>);

impl Warned {
    fn warn(&mut self, instance: &str, kind: &'static str, line: &str, reason: &str) {
        if self.0.insert(kind) {
            warn!(
                instance,
                kind,
                line,
                reason,
                "OpenVPN management: skipping unexpected input (further ones of this kind are logged at debug level)"
            );
        } else {
            debug!(instance, kind, line, reason, "OpenVPN management: skipping unexpected input");
        }
    }
}

/// One connection's state.
struct Session<'a> {
    cfg: &'a OpenvpnInstance,
    events: &'a mpsc::Sender<MgmtEvent>,
    lines: Lines,
    parser: NotificationParser,
    warned: &'a mut Warned,
    /// An ESTABLISHED or DISCONNECT arrived: issue `status 3` now.
    refresh: bool,
    /// REPLY_TIMEOUT (shorter in tests).
    reply_timeout: Duration,
}

impl Session<'_> {
    /// Handle a `>` line.
    fn notification(&mut self, line: &str) {
        for item in self.parser.feed(line) {
            match item {
                Ok(n @ (Notification::Established { .. } | Notification::Disconnect { .. })) => {
                    debug!(instance = %self.cfg.name, notification = ?short(&n), "OpenVPN client notification");
                    self.refresh = true;
                }
                Ok(Notification::Other(l)) => {
                    if l.starts_with(">FATAL:") {
                        warn!(instance = %self.cfg.name, line = %l, "OpenVPN management: fatal notification");
                    } else {
                        debug!(instance = %self.cfg.name, line = %l, "OpenVPN notification");
                    }
                }
                Err(s) => self.warned.warn(&self.cfg.name, "notification", &s.line, &s.reason),
            }
        }
    }

    /// Read a line with the command timeout, handling notifications in between; returns the
    /// next non-notification line.
    async fn reply_line(
        &mut self,
        limit: Duration,
        deadline: tokio::time::Instant,
        what: &str,
    ) -> Result<String, SessionError> {
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| fail(format!("no complete answer to {what} within {} s", limit.as_secs())))??;
            if line.starts_with('>') {
                self.notification(&line);
            } else {
                return Ok(line);
            }
        }
    }

    /// The password exchange (if asked) and the banner.
    async fn login(&mut self) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + LOGIN_TIMEOUT;
        let first = tokio::time::timeout_at(deadline, self.lines.next_line())
            .await
            .map_err(|_| {
                fail(format!(
                    "no greeting within {} s (OpenVPN serves one management client at a time: is another program connected?)",
                    LOGIN_TIMEOUT.as_secs()
                ))
            })??;
        if first == PROMPT {
            let Some(pw) = self.cfg.password.as_deref().map(first_line) else {
                return Err(fail(
                    "the management interface asks for a password but none is configured (password_file)",
                ));
            };
            self.lines.send(pw).await?;
            loop {
                let line = self.reply_line(LOGIN_TIMEOUT, deadline, "the password").await?;
                if line.starts_with("SUCCESS:") {
                    break;
                }
                // OpenVPN 2.6 answers a wrong password by asking again (no ERROR line).
                if line == PROMPT {
                    return Err(fail(
                        "the management interface rejected the password (it asked again): check password_file",
                    ));
                }
                if line.starts_with("ERROR:") {
                    return Err(fail(format!(
                        "the management interface rejected the password ({}): check password_file",
                        line.trim()
                    )));
                }
                self.warned.warn(&self.cfg.name, "login", &line, "unexpected line after the password");
            }
        } else if first.starts_with('>') {
            if self.cfg.password.is_some() {
                debug!(instance = %self.cfg.name, "a management password is configured but the server did not ask for one");
            }
            self.notification(&first);
        } else {
            self.warned.warn(&self.cfg.name, "login", &first, "unexpected greeting");
        }
        Ok(())
    }

    /// `status 3` -> the client list.
    async fn status(&mut self) -> Result<Vec<OvpnClient>, SessionError> {
        self.refresh = false;
        self.lines.send("status 3").await?;
        let deadline = tokio::time::Instant::now() + self.reply_timeout;
        let mut text = String::new();
        loop {
            let line = self.reply_line(self.reply_timeout, deadline, "status 3").await?;
            if line.starts_with("ERROR:") {
                return Err(fail(format!("status 3 failed: {line}")));
            }
            if line.starts_with("SUCCESS:") {
                // A late reply to something else; not part of the status table.
                self.warned.warn(&self.cfg.name, "reply", &line, "unexpected SUCCESS line");
                continue;
            }
            let end = line == "END";
            text.push_str(&line);
            text.push('\n');
            if end {
                break;
            }
        }
        let (clients, skipped) = parse_status(&text);
        for s in &skipped {
            self.warned.warn(&self.cfg.name, "status", &s.line, &s.reason);
        }
        Ok(clients)
    }

    async fn snapshot(&mut self) -> Result<(), SessionError> {
        let clients = self.status().await?;
        let ev = MgmtEvent::Snapshot { instance: self.cfg.name.clone(), clients };
        self.events.send(ev).await.map_err(|_| SessionError::Stopped)
    }

    /// Snapshots until something fails.
    async fn follow(&mut self, up: &mut bool) -> Result<(), SessionError> {
        self.login().await?;
        self.snapshot().await?;
        *up = true;
        let mut tick = tokio::time::interval(self.cfg.reconcile.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate
        loop {
            if self.refresh {
                self.snapshot().await?;
                tick.reset();
                continue;
            }
            tokio::select! {
                _ = tick.tick() => self.snapshot().await?,
                line = self.lines.next_line() => {
                    let line = line?;
                    if line.starts_with('>') {
                        self.notification(&line);
                    } else {
                        self.warned.warn(&self.cfg.name, "idle", &line, "a line outside of a command reply");
                    }
                }
                _ = self.events.closed() => return Err(SessionError::Stopped),
            }
        }
    }
}

fn short(n: &Notification) -> String {
    match n {
        Notification::Established { client_id, .. } => {
            format!("ESTABLISHED {client_id} {}", n.env("common_name").unwrap_or(""))
        }
        Notification::Disconnect { client_id, .. } => {
            format!("DISCONNECT {client_id} {}", n.env("common_name").unwrap_or(""))
        }
        Notification::Other(l) => l.clone(),
    }
}

async fn connect(addr: &MgmtAddr) -> Result<Box<dyn Stream>, SessionError> {
    let fut = async {
        match addr {
            MgmtAddr::Tcp(a) => {
                let s = match a.parse::<SocketAddr>() {
                    Ok(sa) => tokio::net::TcpStream::connect(sa).await,
                    Err(_) => tokio::net::TcpStream::connect(a.as_str()).await,
                }?;
                let _ = s.set_nodelay(true);
                Ok::<Box<dyn Stream>, std::io::Error>(Box::new(s))
            }
            MgmtAddr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await?;
                Ok(Box::new(s) as Box<dyn Stream>)
            }
        }
    };
    match tokio::time::timeout(LOGIN_TIMEOUT, fut).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(fail(format!("connecting to {addr}: {e}"))),
        Err(_) => Err(fail(format!("connecting to {addr}: no answer within {} s", LOGIN_TIMEOUT.as_secs()))),
    }
}

/// Run one instance until `events` is closed: connect, authenticate, follow notifications, and
/// send snapshots. Never returns an error: failures become `Lost` and a reconnect.
pub async fn run_instance(cfg: OpenvpnInstance, events: mpsc::Sender<MgmtEvent>) {
    run(cfg, events, REPLY_TIMEOUT).await
}

async fn run(cfg: OpenvpnInstance, events: mpsc::Sender<MgmtEvent>, reply_timeout: Duration) {
    let mut backoff = MIN_BACKOFF;
    // Lost is sent once per outage (the first failed attempt, or the loss of a working
    // connection), not for every failed reconnect.
    let mut lost_reported = false;
    let mut warned = Warned::default();
    loop {
        if events.is_closed() {
            return;
        }
        let mut up = false;
        let result = match connect(&cfg.addr).await {
            Ok(io) => {
                debug!(instance = %cfg.name, addr = %cfg.addr, "connected to the OpenVPN management interface");
                let mut s = Session {
                    cfg: &cfg,
                    events: &events,
                    lines: Lines { io, buf: Vec::new() },
                    parser: NotificationParser::new(),
                    warned: &mut warned,
                    refresh: false,
                    reply_timeout,
                };
                let r = s.follow(&mut up).await;
                if up {
                    lost_reported = false;
                }
                r
            }
            Err(e) => Err(e),
        };
        let error = match result {
            Ok(()) => "the session ended".to_string(),
            Err(SessionError::Stopped) => return,
            Err(SessionError::Failed(e)) => e,
        };
        if up {
            backoff = MIN_BACKOFF;
            info!(instance = %cfg.name, addr = %cfg.addr, error = %error, "lost the OpenVPN management interface; reconnecting");
        }
        if !lost_reported {
            if !up {
                warn!(instance = %cfg.name, addr = %cfg.addr, error = %error, "cannot use the OpenVPN management interface; retrying");
            }
            let ev = MgmtEvent::Lost { instance: cfg.name.clone(), error };
            if events.send(ev).await.is_err() {
                return;
            }
            lost_reported = true;
        } else {
            debug!(instance = %cfg.name, error = %error, "OpenVPN management interface still unavailable");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = events.closed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests;
