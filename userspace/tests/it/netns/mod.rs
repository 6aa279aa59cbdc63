//! Integration tests in network namespaces: the real daemon binary, real programs in the real
//! kernel, real traffic through a tun device (relayed like OpenVPN does) and an Ethernet veth.
//! The oracle is independent: nftables netdev counters on the same devices and `ip -s link`.
//!
//! This file: readings of both sides and their comparisons, and another tool's program after
//! ours; `counting`, `errors` and `netlink` hold the tests.

mod counting;
mod errors;
mod netlink;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use support::{PinDir, daemon::Daemon, require_root};
use tunmeter::bpf::{
    counters::{ClientsSnapshot, Count, OutcomeRow, read_clients, read_stats},
    loader::PinnedMaps,
};
use tunmeter_lab::{
    LinkStats, link_stats,
    oracle::{Counter, Direction, OracleCounts},
    traffic,
};

use crate::support;

type Env = support::env::LabEnv;

/// Another tool's TC program on `dev`, after ours (appended to the TCX chain, or at a later
/// netlink priority): an independent instance of a counting program with its own maps. If
/// tunmeter ended processing, it would see nothing.
struct ForeignObserver {
    pins: PinDir,
}

impl ForeignObserver {
    fn attach(ns: &str, dev: &'static str, netlink: bool) -> ForeignObserver {
        use aya::programs::{
            LinkOrder, TcAttach,
            links::FdLink,
            tc::{NlOptions, TcHandle},
        };
        let pins = PinDir::new("foreign");
        let dir = pins.path().to_owned();
        tunmeter_lab::in_netns(ns, move || {
            std::fs::create_dir_all(dir.join("links"))?;
            let mut inst = tunmeter::bpf::loader::Instance::load(tunmeter::types::Layer::L2, &dir, 1024)?;
            let ifindex = nix::net::if_::if_nametoindex(dev)?;
            if netlink {
                let _ = aya::programs::tc::qdisc_add_clsact(ifindex); // may exist already
            }
            for (t, name, hook) in tunmeter::bpf::attach::HOOKS {
                let prog = inst.program_mut(name);
                let attach = if netlink {
                    let options = NlOptions { priority: 300, handle: TcHandle::new(0, 7), classid: None };
                    TcAttach::Netlink { parent: t.into(), options }
                } else {
                    TcAttach::Tcx { attach_type: t, order: LinkOrder::last() }
                };
                let id = prog.attach(ifindex, attach)?;
                let link = prog.take_link(id)?;
                if netlink {
                    std::mem::forget(link); // the filter stays until the namespace goes
                } else {
                    FdLink::try_from(link)?.pin(dir.join("links").join(hook))?;
                }
            }
            Ok(())
        })
        .expect("attach the foreign observer");
        ForeignObserver { pins }
    }

    fn packets(&self, dir: &str) -> u64 {
        outcome_sum(&read_stats(&PinnedMaps::new(self.pins.path())).unwrap(), dir).packets
    }
}

fn assert_foreign_program_saw_everything(fo: &ForeignObserver, before: &Reading, after: &Reading, before_fo: [u64; 2]) {
    for (i, (dir, odir)) in [("upload", Direction::Ingress), ("download", Direction::Egress)].into_iter().enumerate() {
        let seen = fo.packets(dir) - before_fo[i];
        let all = sub(after.oracle.total("eth0", odir), before.oracle.total("eth0", odir)).packets;
        assert_eq!(seen, all, "the other tool's program ({dir}) missed packets: tunmeter must return TCX_NEXT");
    }
}

/// Everything both sides counted at one moment.
struct Reading {
    tm: ClientsSnapshot,
    stats: Vec<OutcomeRow>,
    oracle: OracleCounts,
    tun: LinkStats,
    eth: LinkStats,
}

/// Read tunmeter, the oracle and link stats while nothing moves: tunmeter is read before and
/// after the others and the reading is retried until both agree (bounded).
fn quiet_reading(env: &Env) -> Reading {
    let ns = env.lab.server_ns();
    for _ in 0..50 {
        let a = read_clients(&env.maps(), None).unwrap();
        let stats = read_stats(&env.maps()).unwrap();
        let oracle = env.oracle.read().unwrap();
        let tun = link_stats(&ns, "tun0").unwrap();
        let eth = link_stats(&ns, "eth0").unwrap();
        let b = read_clients(&env.maps(), None).unwrap();
        let stats_b = read_stats(&env.maps()).unwrap();
        let same_stats = stats.iter().zip(&stats_b).all(|(x, y)| x.packets == y.packets);
        if a.clients == b.clients && a.other == b.other && same_stats {
            return Reading { tm: a, stats, oracle, tun, eth };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("traffic never went quiet");
}

fn tm_of(r: &Reading, ip: IpAddr) -> (Count, Count) {
    r.tm.clients.iter().find(|c| c.ip == ip).map(|c| (c.upload, c.download)).unwrap_or_default()
}

fn sub(a: Counter, b: Counter) -> Count {
    d(Count { bytes: a.bytes, packets: a.packets }, Count { bytes: b.bytes, packets: b.packets })
}

fn d(a: Count, b: Count) -> Count {
    Count { bytes: a.bytes - b.bytes, packets: a.packets - b.packets }
}

/// Per client and direction, tunmeter's counts between two readings equal the oracle's.
fn assert_clients_match(env: &Env, before: &Reading, after: &Reading) {
    let mut seen = 0;
    for (dev, ip) in env.clients() {
        let (tu, td) = tm_of(after, ip);
        let (bu, bd) = tm_of(before, ip);
        let ou =
            sub(after.oracle.client(&dev, ip, Direction::Ingress), before.oracle.client(&dev, ip, Direction::Ingress));
        let od =
            sub(after.oracle.client(&dev, ip, Direction::Egress), before.oracle.client(&dev, ip, Direction::Egress));
        assert_eq!(d(tu, bu), ou, "upload of {ip} on {dev}");
        assert_eq!(d(td, bd), od, "download of {ip} on {dev}");
        assert!(ou.packets > 0 && od.packets > 0, "{ip}: the test sent no traffic");
        seen += 1;
    }
    assert_eq!(seen, env.clients().len());
}

fn outcome_sum(stats: &[OutcomeRow], dir: &str) -> Count {
    stats
        .iter()
        .filter(|r| r.direction == dir)
        .fold(Count::default(), |a, r| Count { bytes: a.bytes + r.bytes, packets: a.packets + r.packets })
}

/// Every packet on the two devices got exactly one outcome: tunmeter's totals equal the
/// oracle's per-chain totals (clients + other + non-IP).
fn assert_totals_match(before: &Reading, after: &Reading) {
    for (dir, odir) in [("upload", Direction::Ingress), ("download", Direction::Egress)] {
        let tm = d(outcome_sum(&after.stats, dir), outcome_sum(&before.stats, dir));
        let mut o = Count::default();
        for dev in ["tun0", "eth0"] {
            let x = sub(after.oracle.total(dev, odir), before.oracle.total(dev, odir));
            o = Count { bytes: o.bytes + x.bytes, packets: o.packets + x.packets };
        }
        assert_eq!(tm, o, "{dir} totals vs nftables");
    }
}

/// TCX programs attached to `dev` in namespace `ns`.
fn tcx_programs(ns: &str, dev: &'static str) -> usize {
    tunmeter_lab::in_netns(ns, move || {
        let name = std::ffi::CString::new(dev).unwrap();
        let mut n = 0;
        for t in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress] {
            n += aya::programs::SchedClassifier::query_tcx(name.as_c_str(), t).map(|(_, p)| p.len()).unwrap_or(0);
        }
        Ok(n)
    })
    .unwrap()
}
