//! Helpers of the steering benchmark's forwarding lab (bench module, section 5): an iptables
//! DNAT rule to compare with, the namespace's nftables ruleset, and cleanup guards (a process, a
//! scratch directory). The steering maps themselves are `support::steer`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use super::ns_sh;

/// An iptables DNAT rule in a namespace's `nat` table (`PREROUTING`), for comparison with a
/// forward rule. Dropping it deletes the rule and the whole `nat` table (iptables-nft keeps the
/// table and its base chains otherwise, and a registered NAT hook keeps conntrack running for
/// every packet of the namespace).
pub struct DnatRule {
    ns: String,
    spec: Vec<String>,
}

impl DnatRule {
    /// `iptables -t nat -A PREROUTING -p PROTO --dport PORT -j DNAT --to-destination TO`.
    pub fn add(ns: &str, proto: &str, port: u16, to: &str) -> DnatRule {
        let spec: Vec<String> = ["PREROUTING", "-p", proto, "--dport", &port.to_string(), "-j", "DNAT"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--to-destination".to_string(), to.to_string()])
            .collect();
        let r = DnatRule { ns: ns.into(), spec };
        let mut args = vec!["iptables", "-w", "-t", "nat", "-A"];
        args.extend(r.spec.iter().map(String::as_str));
        ns_sh(ns, &args);
        r
    }

    /// Packets the rule matched (the NAT table sees the first packet of each connection).
    pub fn packets(&self) -> u64 {
        let out = ns_sh(&self.ns, &["iptables", "-w", "-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"]);
        out.lines()
            .filter(|l| l.contains("DNAT"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for DnatRule {
    fn drop(&mut self) {
        let mut args = vec!["netns", "exec", &self.ns, "iptables", "-w", "-t", "nat", "-D"];
        args.extend(self.spec.iter().map(String::as_str));
        let quiet = |c: &mut Command| {
            let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
        };
        quiet(Command::new("ip").args(&args));
        quiet(Command::new("ip").args(["netns", "exec", &self.ns, "nft", "delete", "table", "ip", "nat"]));
    }
}

/// The namespace's nftables ruleset (iptables-nft rules included), empty when nothing hooks
/// netfilter there.
pub fn nft_ruleset(ns: &str) -> String {
    ns_sh(ns, &["nft", "list", "ruleset"]).trim().to_string()
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        let p = PathBuf::from(format!("/tmp/tmbench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        ScratchDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
