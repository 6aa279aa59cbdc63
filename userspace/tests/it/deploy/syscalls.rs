//! The unit's SystemCallFilter and RestrictAddressFamilies do not block the daemon: strace of a
//! real run (start, counting, reconciles and a link event, a clean stop), every call checked
//! against `systemd-analyze syscall-filter` and every socket family against the unit.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use tunmeter_lab::traffic;

/// Every named set of `systemd-analyze syscall-filter`, expanded (nested @sets included).
fn syscall_sets() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new("systemd-analyze").arg("syscall-filter").output().expect("systemd-analyze syscall-filter");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut raw: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') && t.starts_with('@') {
            current = Some(t.to_owned());
            raw.entry(t.to_owned()).or_default();
        } else if let Some(set) = &current {
            raw.get_mut(set).unwrap().push(t.to_owned());
        }
    }
    fn expand(name: &str, raw: &BTreeMap<String, Vec<String>>, out: &mut BTreeSet<String>, depth: u32) {
        assert!(depth < 10, "syscall set nesting too deep at {name}");
        for m in raw.get(name).unwrap_or_else(|| panic!("unknown syscall set {name}")) {
            if m.starts_with('@') {
                expand(m, raw, out, depth + 1);
            } else {
                out.insert(m.clone());
            }
        }
    }
    raw.keys()
        .map(|k| {
            let mut s = BTreeSet::new();
            expand(k, &raw, &mut s, 0);
            (k.clone(), s)
        })
        .collect()
}

/// (system call names, socket address families) in an `strace -f` output file.
fn traced(path: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(path).expect("strace output");
    let (mut calls, mut families) = (BTreeSet::new(), BTreeSet::new());
    for line in text.lines() {
        let rest = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if name.is_empty() || rest.starts_with("---") || rest.starts_with("+++") {
            continue;
        }
        if let Some(args) = rest.strip_prefix("socket(").or_else(|| rest.strip_prefix("socketpair(")) {
            families.insert(args.split(',').next().unwrap_or("").trim().to_owned());
        }
        calls.insert(name);
    }
    (calls, families)
}

#[test]
fn every_syscall_and_address_family_of_a_real_run_passes_the_unit_filters() {
    if !support::require_root() {
        return;
    }
    if !systemd_analyze() {
        panic!("systemd-analyze missing (cargo xtask setup installs the systemd package)");
    }
    let env = Env::new("tmds", 1, 1);
    let ns = env.lab.server_ns();
    let trace = PathBuf::from(format!("/tmp/tmtest-strace-{}.txt", std::process::id()));
    let _cleanup = Cleanup(trace.clone());
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .args(["strace", "-f", "-qq", "-e", "trace=all", "-o"])
        .arg(&trace)
        .arg(BIN)
        .arg("run")
        .args(env.daemon_args(&[]))
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info");
    let mut d = support::daemon::Daemon::start_with(c, &env.log);
    d.wait_log("ledger and API running", 1, std::time::Duration::from_secs(60));
    let before = counted_packets(&env);
    traffic::mixed_round(&env.lab, 1).expect("traffic");
    assert!(counted_packets(&env) > before, "counting under strace");
    // A link event and a few reconcile ticks (every second by default).
    support::ns_sh(&ns, &["ip", "link", "add", "tmds-x0", "type", "veth", "peer", "name", "tmds-x1"]);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    support::ns_sh(&ns, &["ip", "link", "del", "tmds-x0"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let strace_pid = d.pid().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children")).unwrap();
    let daemon_pid: u32 = children.split_whitespace().next().expect("strace's child").parse().unwrap();
    let st = d.stop_pid(daemon_pid);
    assert!(st.is_some_and(|s| s.success()), "clean stop under strace:\n{}", d.log_text());
    assert!(d.log_text().contains("stopping; programs stay attached"), "stop logged:\n{}", d.log_text());

    let (calls, families) = traced(&trace);
    assert!(calls.contains("bpf") && calls.len() > 20, "strace saw the run: {calls:?}");
    let sets = syscall_sets();
    let mut allowed = BTreeSet::new();
    for entry in unit_values("SystemCallFilter") {
        assert!(!entry.starts_with('~'), "the check assumes an allow list: {entry}");
        match sets.get(&entry) {
            Some(s) => allowed.extend(s.iter().cloned()),
            None => {
                allowed.insert(entry);
            }
        }
    }
    let blocked: Vec<&String> = calls.iter().filter(|c| !allowed.contains(*c)).collect();
    assert!(blocked.is_empty(), "system calls the unit's SystemCallFilter would block: {blocked:?}");
    let allowed_families: BTreeSet<String> = unit_values("RestrictAddressFamilies").into_iter().collect();
    let bad: Vec<&String> = families.iter().filter(|f| !allowed_families.contains(*f)).collect();
    assert!(bad.is_empty(), "address families outside RestrictAddressFamilies: {bad:?} (all: {families:?})");
    assert!(families.contains("AF_NETLINK"), "rtnetlink seen: {families:?}");
    eprintln!("{} distinct system calls, families {families:?}, all allowed by the unit", calls.len());
}
