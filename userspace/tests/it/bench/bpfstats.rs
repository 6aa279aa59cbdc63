//! What the attached programs cost under real traffic: the kernel's BPF run-time statistics
//! (run_time_ns / run_cnt per program), switched on with BPF_ENABLE_STATS (the switch behind
//! `kernel.bpf_stats_enabled`; the kernel turns it off again when the fd closes, even if the
//! bench dies) only around the iperf3 runs, and tallied per device and hook.

use std::collections::{BTreeMap, HashMap};

/// Statistics on while held.
pub(super) struct StatsOn {
    _fd: std::os::fd::OwnedFd,
}

impl StatsOn {
    pub(super) fn new() -> StatsOn {
        let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS (root, kernel >= 5.8)");
        StatsOn { _fd: fd }
    }
}

/// (run time ns, runs) of every loaded program, by id.
pub(super) fn counters() -> HashMap<u32, (u64, u64)> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| (p.id(), (p.run_time().as_nanos() as u64, p.run_count())))
        .collect()
}

/// (device, hook, program name) of each TCX attachment on `devices` in `ns`, by program id
/// (Debian 12's bpftool predates TCX: asked with BPF_PROG_QUERY through aya instead).
fn attachments(ns: &str, devices: &[&str]) -> HashMap<u32, (String, String, String)> {
    let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
    tunmeter_lab::in_netns(ns, move || {
        use aya::programs::{SchedClassifier, TcAttachType};
        let mut m = HashMap::new();
        for dev in &devices {
            let Ok(name) = std::ffi::CString::new(dev.as_str()) else { continue };
            for (hook, t) in [("ingress", TcAttachType::Ingress), ("egress", TcAttachType::Egress)] {
                let Ok((_, progs)) = SchedClassifier::query_tcx(name.as_c_str(), t) else { continue };
                for p in progs {
                    let name = p.name_as_str().unwrap_or("?").to_string();
                    m.insert(p.id(), (dev.clone(), hook.to_string(), name));
                }
            }
        }
        Ok(m)
    })
    .unwrap_or_default()
}

/// Runs and run time per (device, hook, program) over measurement windows.
#[derive(Default)]
pub(super) struct Tally(BTreeMap<(String, String, String), (u64, u64)>);

impl Tally {
    /// Add what the programs attached to `devices` in `ns` ran between `before` and now.
    pub(super) fn window(&mut self, ns: &str, devices: &[&str], before: &HashMap<u32, (u64, u64)>) {
        let after = counters();
        for (id, key) in attachments(ns, devices) {
            let (Some(a), b) = (after.get(&id), before.get(&id).copied().unwrap_or_default()) else { continue };
            let e = self.0.entry(key).or_default();
            e.0 += a.0.saturating_sub(b.0);
            e.1 += a.1.saturating_sub(b.1);
        }
    }

    /// Runs and run time per run of the programs on `dev`'s `hook`, if any ran.
    pub(super) fn of(&self, dev: &str, hook: &str) -> Option<(u64, f64)> {
        let (ns, runs) = self
            .0
            .iter()
            .filter(|((d, h, _), _)| d == dev && h == hook)
            .fold((0u64, 0u64), |(a, b), (_, (ns, runs))| (a + ns, b + runs));
        (runs > 0).then(|| (runs, ns as f64 / runs as f64))
    }

    /// Run time per run over everything tallied, if anything ran.
    pub(super) fn ns_per_run(&self) -> Option<f64> {
        let (ns, runs) = self.0.values().fold((0u64, 0u64), |(a, b), (ns, runs)| (a + ns, b + runs));
        (runs > 0).then(|| ns as f64 / runs as f64)
    }

    /// A Markdown table: device, hook, program, runs, ns/run, with `what` saying which packets
    /// each (device, hook) saw; hooks that ran nothing are left out. The figures include what
    /// the statistics themselves cost (two clock reads a run) and the cache misses of real
    /// traffic, which BPF_PROG_TEST_RUN's one hot packet does not have.
    pub(super) fn print(&self, what: impl Fn(&str, &str) -> &'static str) {
        println!("| device | hook | program | packets there | runs | ns/run |");
        println!("|---|---|---|---|---:|---:|");
        for ((dev, hook, name), (ns, runs)) in self.0.iter().filter(|(_, (_, runs))| *runs > 0) {
            let per = if *runs == 0 { "-".to_string() } else { format!("{:.0}", *ns as f64 / *runs as f64) };
            println!("| {dev} | {hook} | {name} | {} | {runs} | {per} |", what(dev, hook));
        }
        println!();
    }
}
