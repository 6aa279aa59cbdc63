//! `cargo xtask demo`: the real OpenVPN lab (a UDP and a TCP server instance, named clients
//! alice, bob, carol, dave with background traffic) + the daemon in the server namespace, which
//! learns who each VPN address is from both management interfaces, + a live client table, and
//! the dashboard on the host's loopback (a relay into the server namespace) with an admin token.
//!
//! This file: the command lines (the contract with tunmeter and tunmeter-lab), starting the lab
//! and the daemon; `show` draws the live table, `relay` brings the dashboard to the host,
//! `cleanup` stops everything and checks nothing is left.

mod cleanup;
mod relay;
mod show;

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::setup::{require_root, setup};
use crate::util::{cmd, describe, run, target_dir};
use relay::Relay;

// ---- The command lines of the demo: the contract with tunmeter and tunmeter-lab. ----------

const DAEMON_PACKAGE: &str = "tunmeter";
const LAB_PACKAGE: &str = "tunmeter-lab";
const DAEMON_BIN: &str = "tunmeter";
const LAB_BIN: &str = "tunmeter-lab";
/// Name prefix of everything the lab creates (namespaces, links).
const LAB_PREFIX: &str = "tmdemo";
const PIN_DIR: &str = "/sys/fs/bpf/tunmeter-demo";
/// Named OpenVPN clients: alice, bob, carol, dave (odd ones UDP, even ones TCP).
const CLIENTS: &str = "4";
/// The daemon's API, on the server namespace's loopback.
const API_LISTEN: &str = "127.0.0.1:9107";
/// The host's end of the relay to the API: the same port on the host's loopback if it is free,
/// else any free port.
const DASHBOARD_PORT: u16 = 9107;
const NODE_ID: &str = "demo";

/// `tunmeter-lab openvpn up ...`: builds the lab, connects the clients, starts traffic, prints
/// `READY <server netns>`, then runs until SIGTERM and tears the lab down.
fn lab_up_args() -> Vec<String> {
    strings(&["openvpn", "up", "--prefix", LAB_PREFIX, "--clients", CLIENTS, "--traffic"])
}

fn lab_down_args() -> Vec<String> {
    strings(&["openvpn", "down", "--prefix", LAB_PREFIX])
}

/// The daemon's config: the two instances' tun devices and their management interfaces (the
/// clients are connected before the daemon starts, so the names come from management; a
/// production server also runs `tunmeter hook openvpn`, see docs/openvpn.md), and the
/// customer's Ethernet link.
const DAEMON_CONFIG: &str = r#"# written by cargo xtask demo
[[interface]]
name = "tun0"
layer = "l3"
subnets = ["10.8.0.0/24", "fd00:8::/64"]

[[interface]]
name = "tun1"
layer = "l3"
subnets = ["10.8.100.0/24", "fd00:8:100::/64"]

[[interface]]
name = "eth0"
layer = "l2"
subnets = ["10.9.0.0/24", "fd00:9::/64"]

[[openvpn]]
name = "udp"
protocol = "udp"
management = "127.0.0.1:7505"
interface = "tun0"

[[openvpn]]
name = "tcp"
protocol = "tcp"
management = "127.0.0.1:7506"
interface = "tun1"
"#;

fn daemon_run_args(state_dir: &Path) -> Vec<String> {
    let mut args = strings(&["run", "--config"]);
    args.push(state_dir.join("tunmeter.toml").display().to_string());
    args.extend(strings(&["--node-id", NODE_ID, "--api-listen", API_LISTEN, "--pin-dir", PIN_DIR, "--state-dir"]));
    args.push(state_dir.display().to_string());
    args
}

/// `tunmeter token create`: prints the new token on stdout (only this once).
fn daemon_token_args(state_dir: &Path) -> Vec<String> {
    let mut args = strings(&["token", "create", "--role", "admin", "--name", "demo", "--node-id", NODE_ID]);
    args.extend(strings(&["--state-dir"]));
    args.push(state_dir.display().to_string());
    args
}

/// `tunmeter sessions`: who each address is (usernames from OpenVPN management).
fn daemon_sessions_args(state_dir: &Path) -> Vec<String> {
    let mut args = strings(&["sessions", "--state-dir"]);
    args.push(state_dir.display().to_string());
    args
}

fn daemon_clients_args() -> Vec<String> {
    // One refresh of `--watch`: two snapshots 1 s apart, printed with per-client rates.
    strings(&["clients", "--pin-dir", PIN_DIR, "--watch", "1", "--count", "1"])
}

/// `--state-dir` lets detach refuse while a daemon still runs.
fn daemon_detach_args(state_dir: &Path) -> Vec<String> {
    let mut args = strings(&["detach", "--pin-dir", PIN_DIR, "--state-dir"]);
    args.push(state_dir.display().to_string());
    args
}

fn state_dir() -> PathBuf {
    target_dir().join("demo-state")
}

/// How long the lab may take to print READY.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemon gets between SIGTERM and SIGKILL.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the lab gets to tear itself down after SIGTERM.
const LAB_STOP_TIMEOUT: Duration = Duration::from_secs(30);
const REFRESH: Duration = Duration::from_secs(1);
/// While the daemon starts, a failing `tunmeter clients` is expected and not shown.
const DAEMON_START_GRACE: Duration = Duration::from_secs(5);

// --------------------------------------------------------------------------------------------

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Runs `program` inside the network namespace `ns` only (the mount namespace, and with it
/// /sys/fs/bpf, stays ours). nsenter execs the program, so the child's pid is the program's.
fn in_netns(ns: &str, program: &Path) -> Command {
    let mut c = cmd("nsenter");
    c.arg(format!("--net={}", netns_path(ns))).arg(program);
    c
}

/// Runs the long-lived children in their own process group (Ctrl-C reaches only xtask, which
/// then shuts them down in order) and has the kernel SIGTERM them if xtask dies first.
fn detach_from_terminal(c: &mut Command) {
    c.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes the prctl syscall,
    // which is async-signal-safe.
    unsafe {
        c.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from));
    }
}

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.is_empty() {
        format!("{} is empty", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

/// SIGTERM, wait up to `timeout`, then SIGKILL.
fn stop_child(mut child: Child, timeout: Duration) -> Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    kill(pid, Signal::SIGTERM).context("sending SIGTERM")?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!("demo: warning: pid {pid} still running {} s after SIGTERM; killing it", timeout.as_secs());
    child.kill().context("sending SIGKILL")?;
    child.wait()?;
    Ok(())
}

pub fn demo(seconds: Option<u64>) -> Result<()> {
    setup()?;
    require_root("the demo creates network namespaces and loads BPF programs", "demo")?;
    run(cmd("cargo").args(["build", "--bins", "-p", DAEMON_PACKAGE, "-p", LAB_PACKAGE]))?;

    // From here on Ctrl-C (or SIGTERM) only sets `stop`, so that everything gets cleaned up;
    // a second Ctrl-C while cleaning up exits immediately.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&stop))
            .context("installing the signal handler")?;
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing the signal handler")?;
    }

    let bin = target_dir().join("debug");
    let mut demo = Demo {
        daemon_bin: bin.join(DAEMON_BIN),
        lab_bin: bin.join(LAB_BIN),
        lab: None,
        lab_reader: None,
        daemon: None,
        ns: None,
        relay: None,
        token: None,
    };
    demo.clean_leftovers();
    let result = demo.run(&stop, seconds);
    match &result {
        Ok(()) => println!("demo: cleaning up"),
        Err(_) => println!("demo: failed (error below); cleaning up"),
    }
    let cleanup = demo.cleanup();
    match (result, cleanup) {
        (Ok(()), Ok(())) => {
            println!("demo: done, nothing left behind");
            Ok(())
        }
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c),
        (Err(e), Err(c)) => Err(e.context(format!("and cleaning up also failed: {c:#}"))),
    }
}

struct Demo {
    daemon_bin: PathBuf,
    lab_bin: PathBuf,
    lab: Option<Child>,
    lab_reader: Option<JoinHandle<()>>,
    daemon: Option<Child>,
    /// The server network namespace, once the lab said READY.
    ns: Option<String>,
    /// The host's way to the dashboard.
    relay: Option<Relay>,
    /// The admin token for the dashboard.
    token: Option<String>,
}

fn lab_log() -> PathBuf {
    target_dir().join("demo-lab.log")
}

fn daemon_log() -> PathBuf {
    target_dir().join("demo-daemon.log")
}

impl Demo {
    fn run(&mut self, stop: &AtomicBool, seconds: Option<u64>) -> Result<()> {
        let ns = self.start_lab(stop)?;
        self.create_token()?;
        self.start_daemon(&ns)?;
        let relay = Relay::start(&ns)?;
        self.relay = Some(relay);
        self.print_dashboard(seconds);
        self.show_clients(&ns, stop, seconds)
    }

    /// A fresh ledger for every demo, and an admin token in it for the dashboard.
    fn create_token(&mut self) -> Result<()> {
        let state_dir = state_dir();
        if state_dir.exists() {
            std::fs::remove_dir_all(&state_dir).with_context(|| format!("removing {}", state_dir.display()))?;
        }
        std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let mut c = cmd(&self.daemon_bin);
        c.args(daemon_token_args(&state_dir)).stdin(Stdio::null()).env("NO_COLOR", "1");
        let what = describe(&c);
        let out = c.output().with_context(|| format!("running `{what}`"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("`{what}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        let token = stdout.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
        if !token.starts_with("tm_") {
            bail!("`{what}` printed {stdout:?}, expected a token tm_...");
        }
        self.token = Some(token.to_owned());
        Ok(())
    }

    fn dashboard_url(&self) -> String {
        self.relay.as_ref().map(|r| format!("http://{}/", r.addr)).unwrap_or_default()
    }

    fn print_dashboard(&self, seconds: Option<u64>) {
        let url = self.dashboard_url();
        let token = self.token.as_deref().unwrap_or_default();
        let stop = match seconds {
            Some(n) => format!("the demo stops after {n} s (or Ctrl-C)"),
            None => "Ctrl-C stops the demo and removes everything".to_owned(),
        };
        println!();
        println!("demo: dashboard:   {url}   (paste the admin token into its login form)");
        println!("demo: admin token: {token}");
        println!("demo: API:         curl -H 'Authorization: Bearer {token}' {url}api/v1/clients");
        println!("demo: {stop}");
        println!();
    }

    fn start_lab(&mut self, stop: &AtomicBool) -> Result<String> {
        let log_path = lab_log();
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut c = cmd(&self.lab_bin);
        c.args(lab_up_args()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log.try_clone()?);
        detach_from_terminal(&mut c);
        let what = describe(&c);
        println!("demo: starting the lab: {what} (log: {})", log_path.display());
        let mut child = c.spawn().with_context(|| format!("starting `{what}`"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        self.lab = Some(child);

        // Read the lab's stdout for READY; everything it prints goes to the log, and the pipe
        // keeps being drained so the lab never blocks on it.
        let (tx, rx) = mpsc::channel();
        let mut log = log;
        self.lab_reader = Some(thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if let Some(ns) = line.strip_prefix("READY ") {
                    let _ = tx.send(ns.trim().to_owned());
                }
            }
        }));

        let start = Instant::now();
        let ns = loop {
            if stop.load(Ordering::Relaxed) {
                bail!("interrupted while waiting for the lab");
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(ns) => break ns,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the lab closed its output without printing READY; {}", log_tail(&log_path));
                }
            }
            if let Some(status) = self.lab.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the lab exited ({status}) before printing READY; {}", log_tail(&log_path));
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("the lab did not print READY within {} s; {}", READY_TIMEOUT.as_secs(), log_tail(&log_path));
            }
        };
        if ns.is_empty() || ns.contains('/') {
            bail!("the lab printed READY with an unusable namespace name {ns:?}");
        }
        if !Path::new(&netns_path(&ns)).exists() {
            bail!("the lab said READY {ns}, but {} does not exist", netns_path(&ns));
        }
        println!("demo: lab ready, server namespace {ns}");
        self.ns = Some(ns.clone());
        Ok(ns)
    }

    fn start_daemon(&mut self, ns: &str) -> Result<()> {
        let state_dir = state_dir();
        std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let config = state_dir.join("tunmeter.toml");
        std::fs::write(&config, DAEMON_CONFIG).with_context(|| format!("writing {}", config.display()))?;
        let log_path = daemon_log();
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut c = in_netns(ns, &self.daemon_bin);
        c.args(daemon_run_args(&state_dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its output goes to a file: no colour codes.
            .env("NO_COLOR", "1");
        detach_from_terminal(&mut c);
        let what = describe(&c);
        println!("demo: starting the daemon: {what} (log: {})", log_path.display());
        self.daemon = Some(c.spawn().with_context(|| format!("starting `{what}`"))?);
        Ok(())
    }
}
