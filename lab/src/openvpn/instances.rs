//! Starting and stopping the OpenVPN server instances and clients, and reading a client's VPN
//! addresses from its tun device.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::{ClientAddrs, OvpnLab, SERVER_START_TIMEOUT, STOP_GRACE, Transport, s};
use crate::procs::{LabProc, tail, wait_for};
use crate::run;

impl OvpnLab {
    /// Start server instance `t` and wait (<= 15 s) until it is initialised. Errors if it is
    /// running already.
    pub fn start_instance(&mut self, t: Transport) -> Result<()> {
        if self.instance_running(t)? {
            bail!("OpenVPN {t} instance is running already");
        }
        let log = self.server_log(t);
        let conf = s(&self.server_conf(t));
        let proc = LabProc::spawn(
            &format!("openvpn {t} server"),
            &self.server_ns(),
            "openvpn",
            &["--config", &conf],
            &[],
            &log,
            &self.dir.join(format!("server-{t}.pid")),
        )?;
        let slot = &mut self.servers[t.index()];
        *slot = Some(proc);
        let proc = slot.as_mut().expect("just set");
        wait_for(SERVER_START_TIMEOUT, &format!("OpenVPN {t} server to initialise"), || {
            if let Some(st) = proc.exited()? {
                bail!("OpenVPN {t} server exited ({st}); log:\n{}", tail(&log, 30));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text.contains("Initialization Sequence Completed").then_some(()))
        })
        .with_context(|| format!("log tail:\n{}", tail(&log, 20)))
    }

    /// Stop server instance `t` (SIGTERM, wait for exit; SIGKILL after 8 s). Its tun device and
    /// management port go away; clients of that instance lose their tunnel and keep retrying.
    pub fn stop_instance(&mut self, t: Transport) -> Result<()> {
        let mut p = self.servers[t.index()].take().ok_or_else(|| anyhow!("OpenVPN {t} instance is not running"))?;
        p.terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Whether server instance `t`'s process is alive.
    pub fn instance_running(&mut self, t: Transport) -> Result<bool> {
        match &mut self.servers[t.index()] {
            Some(p) => Ok(p.exited()?.is_none()),
            None => Ok(false),
        }
    }

    /// Start client `i`'s OpenVPN process (returns at once; see [`OvpnLab::wait_connected`]).
    /// Errors if it is running already.
    pub fn connect(&mut self, i: usize) -> Result<()> {
        self.check_index(i)?;
        if let Some(p) = &mut self.clients[i]
            && p.exited()?.is_none()
        {
            bail!("client #{i} ({}) is running already", self.cfg.clients[i].name);
        }
        let conf = s(&self.client_conf(i));
        let proc = LabProc::spawn(
            &format!("openvpn client {}", self.cfg.clients[i].name),
            &self.client_ns(i),
            "openvpn",
            &["--config", &conf],
            &[],
            &self.client_log(i),
            &self.dir.join(format!("client-{}.pid", i + 1)),
        )?;
        self.clients[i] = Some(proc);
        Ok(())
    }

    /// Whether client `i`'s tunnel is up now: its process runs, its log's last
    /// "Initialization Sequence Completed" comes after its last restart, and its `tun0` has an
    /// IPv4 address. Returns the addresses then.
    pub fn connected_addrs(&mut self, i: usize) -> Result<Option<ClientAddrs>> {
        self.check_index(i)?;
        let name = self.cfg.clients[i].name.clone();
        let Some(p) = &mut self.clients[i] else { return Ok(None) };
        if let Some(st) = p.exited()? {
            bail!("client #{i} ({name}) exited ({st}); log:\n{}", tail(&self.client_log(i), 30));
        }
        let log = std::fs::read_to_string(self.client_log(i)).unwrap_or_default();
        let done = log.rfind("Initialization Sequence Completed");
        let restart = log.rfind("process restarting");
        if done.is_none() || restart > done {
            return Ok(None);
        }
        tun_addrs(&self.client_ns(i), "tun0")
    }

    /// Wait until client `i`'s tunnel is up ([`OvpnLab::connected_addrs`]), at most `timeout`.
    pub fn wait_connected(&mut self, i: usize, timeout: Duration) -> Result<ClientAddrs> {
        self.check_index(i)?;
        if self.clients[i].is_none() {
            bail!("client #{i} was never started: call connect first");
        }
        let log = self.client_log(i);
        let name = self.cfg.clients[i].name.clone();
        wait_for(timeout, &format!("client #{i} ({name}) to connect"), || self.connected_addrs(i))
            .with_context(|| format!("client log tail:\n{}", tail(&log, 20)))
    }

    /// Start every client, then wait for all of them (each within `timeout` of the start).
    pub fn connect_all(&mut self, timeout: Duration) -> Result<Vec<ClientAddrs>> {
        for i in 0..self.cfg.clients.len() {
            self.connect(i)?;
        }
        let deadline = Instant::now() + timeout;
        (0..self.cfg.clients.len())
            .map(|i| self.wait_connected(i, deadline.saturating_duration_since(Instant::now())))
            .collect()
    }

    /// Stop client `i` (SIGTERM: UDP clients send an explicit exit notification first; wait for
    /// the exit, SIGKILL after 8 s). Errors if it is not running.
    pub fn disconnect(&mut self, i: usize) -> Result<()> {
        self.check_index(i)?;
        let mut p = self.clients[i].take().ok_or_else(|| anyhow!("client #{i} is not running"))?;
        p.terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Whether client `i`'s OpenVPN process is alive (connected or not).
    pub fn client_running(&mut self, i: usize) -> Result<bool> {
        self.check_index(i)?;
        match &mut self.clients[i] {
            Some(p) => Ok(p.exited()?.is_none()),
            None => Ok(false),
        }
    }
}

/// Global (non-link-local) addresses of `dev` in `ns`: `Ok(None)` if the device does not exist
/// or has no IPv4 address yet.
pub fn tun_addrs(ns: &str, dev: &str) -> Result<Option<ClientAddrs>> {
    let Ok(out) = run("ip", &["-n", ns, "-j", "addr", "show", "dev", dev]) else { return Ok(None) };
    let v: Value = serde_json::from_str(&out).context("parsing ip -j addr output")?;
    let mut v4 = None;
    let mut v6 = None;
    for a in v.as_array().into_iter().flatten().filter_map(|l| l.get("addr_info")).filter_map(Value::as_array).flatten()
    {
        let local = a.get("local").and_then(Value::as_str).unwrap_or_default();
        match a.get("family").and_then(Value::as_str) {
            Some("inet") => v4 = v4.or_else(|| local.parse::<Ipv4Addr>().ok()),
            Some("inet6") if a.get("scope").and_then(Value::as_str) == Some("global") => {
                v6 = v6.or_else(|| local.parse::<Ipv6Addr>().ok())
            }
            _ => {}
        }
    }
    Ok(v4.map(|v4| ClientAddrs { v4, v6 }))
}
