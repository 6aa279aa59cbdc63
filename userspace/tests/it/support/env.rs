//! A namespace lab with its nftables oracle, a pin directory, a state directory and a daemon
//! log: what the daemon-level tests share.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use tunmeter::bpf::loader::PinnedMaps;
use tunmeter_lab::{Lab, LabConfig, oracle::Oracle};

use super::{PinDir, daemon::Daemon};

/// The lab's client subnets on tun0 and eth0.
pub const SUBNET_ARGS: [&str; 8] =
    ["--subnet", "10.8.0.0/24", "--subnet", "fd00:8::/64", "--subnet", "10.9.0.0/24", "--subnet", "fd00:9::/64"];

/// A fresh, empty state directory `/tmp/tmtest-state-<tag>-<pid>` and a log path
/// `/tmp/tmtest-<tag>-<pid>.log` (no file yet) for one test's daemon.
pub fn daemon_paths(tag: &str) -> (PathBuf, PathBuf) {
    let state = PathBuf::from(format!("/tmp/tmtest-state-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).unwrap_or_else(|e| panic!("create {}: {e}", state.display()));
    let log = PathBuf::from(format!("/tmp/tmtest-{tag}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    (state, log)
}

pub struct LabEnv {
    pub lab: Lab,
    pub oracle: Oracle,
    pub pins: PinDir,
    pub state: PathBuf,
    pub log: PathBuf,
    /// The daemon's `--node-id` (the lab prefix).
    pub node: String,
}

impl LabEnv {
    pub fn new(prefix: &str, tun_clients: usize, eth_clients: usize) -> LabEnv {
        let lab = Lab::up(LabConfig { prefix: prefix.into(), tun_clients, eth_clients }).expect("lab up");
        let oracle = Oracle::install(&lab).expect("oracle");
        let (state, log) = daemon_paths(prefix);
        LabEnv { lab, oracle, pins: PinDir::new(prefix), state, log, node: prefix.into() }
    }

    /// `run` arguments: tun0 and eth0 with the lab's subnets, this env's paths and node id,
    /// then `extra`.
    pub fn daemon_args(&self, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = ["--tun", "tun0", "--egress", "eth0"].iter().map(|s| s.to_string()).collect();
        a.extend(SUBNET_ARGS.iter().map(|s| s.to_string()));
        let (pin, state) = self.path_args();
        a.extend(["--pin-dir".into(), pin, "--state-dir".into(), state, "--node-id".into(), self.node.clone()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    /// Start the daemon in the server namespace and wait until its ledger and API run.
    pub fn start_daemon(&self, extra: &[&str]) -> Daemon {
        let args = self.daemon_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        const READY: &str = "ledger and API running";
        let before = std::fs::read_to_string(&self.log).unwrap_or_default().matches(READY).count();
        let mut d = Daemon::start(&self.lab.server_ns(), &args, &self.log);
        d.wait_log(READY, before + 1, Duration::from_secs(30));
        d
    }

    /// `--pin-dir` and `--state-dir` values.
    pub fn path_args(&self) -> (String, String) {
        (self.pins.path().display().to_string(), self.state.display().to_string())
    }

    pub fn maps(&self) -> PinnedMaps {
        PinnedMaps::new(self.pins.path())
    }

    /// (device, address) of every lab client, IPv4 and IPv6.
    pub fn clients(&self) -> Vec<(String, IpAddr)> {
        let mut v = Vec::new();
        for (dev, cs) in [("tun0", self.lab.tun_clients()), ("eth0", self.lab.eth_clients())] {
            for c in cs {
                v.push((dev.to_string(), IpAddr::V4(c.v4)));
                v.push((dev.to_string(), IpAddr::V6(c.v6)));
            }
        }
        v
    }
}

impl Drop for LabEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_file(&self.log);
    }
}
