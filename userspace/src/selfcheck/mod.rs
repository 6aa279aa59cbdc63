//! The ledger's self-check: on every poll, each attached device's own counters (IFLA_STATS64)
//! are held against every packet the programs saw on it (`IFACE_STATS`). Packets the device
//! counted but the programs never saw went past the ledger: a program detached or replaced behind
//! the daemon's back, or another TC program that drops before ours.

mod compare;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tracing::{debug, error, warn};
use tunmeter_common::{Direction, iface_index, iface_slot};

use crate::{
    bpf::{
        counters::sum_iface_cpus,
        links::{DeviceCounters, Links},
        loader::PinnedMaps,
    },
    tasks::Tasks,
    time::unix_ms,
    types::{EventKind, Layer},
    webhook::{Event, Webhooks},
};
use compare::{DirState, Sample};

/// How the self-check runs.
#[derive(Debug, Clone)]
pub struct SelfCheckConfig {
    pub interval: Duration,
    /// Missed packets per poll above which a poll counts as drifting.
    pub threshold_packets: u64,
    /// Consecutive drifting polls before `ledger.drift` fires.
    pub polls: u32,
}

/// An attached device to watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub ifindex: u32,
    pub layer: Layer,
}

/// What the self-check reports, per device (`/api/v1/stats`, metrics, the dashboard).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub threshold_packets: u64,
    pub polls: u32,
    pub last_check_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    pub interfaces: Vec<IfaceReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IfaceReport {
    pub interface: String,
    pub ifindex: u32,
    /// `ok`, `drift` (a direction is past the threshold), `starting` (no second reading yet)
    /// or `unchecked` (see `reason`).
    pub status: &'static str,
    pub reason: Option<String>,
    pub upload: DirState,
    pub download: DirState,
}

struct Tracked {
    watched: Watched,
    prev: Option<Sample>,
    dirs: [DirState; 2],
    unchecked: Option<String>,
}

/// The self-check's state, shared by its task, the daemon (which says what is attached) and the
/// API (which reads the report).
pub struct SelfCheck {
    cfg: SelfCheckConfig,
    maps: PinnedMaps,
    webhooks: Option<Arc<Webhooks>>,
    tracked: Mutex<BTreeMap<String, Tracked>>,
    report: Mutex<Report>,
}

impl SelfCheck {
    pub fn new(cfg: SelfCheckConfig, maps: PinnedMaps, webhooks: Option<Arc<Webhooks>>) -> Arc<SelfCheck> {
        let report = Report { threshold_packets: cfg.threshold_packets, polls: cfg.polls, ..Report::default() };
        Arc::new(SelfCheck { cfg, maps, webhooks, tracked: Mutex::default(), report: Mutex::new(report) })
    }

    /// The devices attached now. A device re-created under the same name (new ifindex) starts
    /// over; devices that share a slot of the totals map are reported unchecked.
    pub fn watch(&self, now: Vec<Watched>) {
        let mut t = self.tracked.lock().expect("self-check lock");
        t.retain(|name, tr| now.iter().any(|w| &w.name == name && *w == tr.watched));
        for w in &now {
            t.entry(w.name.clone()).or_insert_with(|| Tracked {
                watched: w.clone(),
                prev: None,
                dirs: Default::default(),
                unchecked: None,
            });
        }
        let mut slots: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for w in &now {
            slots.entry(iface_slot(w.ifindex)).or_default().push(w.name.clone());
        }
        for tr in t.values_mut() {
            let sharing = &slots[&iface_slot(tr.watched.ifindex)];
            tr.unchecked = (sharing.len() > 1)
                .then(|| format!("shares a slot of the totals map with {} (ifindex modulo 1024)", sharing.join(", ")));
        }
    }

    pub fn report(&self) -> Report {
        self.report.lock().expect("self-check lock").clone()
    }

    /// Check every `interval` until cancelled.
    pub fn spawn(self: &Arc<Self>, tasks: &mut Tasks) {
        let me = self.clone();
        let stop = tasks.token();
        tasks.spawn("self-check", async move {
            let links = match Links::requests() {
                Ok(l) => l,
                Err(e) => {
                    error!(%e, "self-check disabled: no rtnetlink socket");
                    me.report.lock().expect("self-check lock").last_error = Some(e.to_string());
                    return Ok::<_, std::convert::Infallible>(());
                }
            };
            let mut tick = tokio::time::interval(me.cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tick.tick() => {}
                }
                let devices = links.counters().await.map_err(|e| e.to_string());
                let events = me.check(devices);
                for ev in events {
                    me.announce(ev).await;
                }
            }
        });
    }

    /// One check: take a sample of every tracked device and fold it in. Returns the webhook
    /// events to send.
    fn check(&self, devices: Result<BTreeMap<u32, DeviceCounters>, String>) -> Vec<Event> {
        let mut events = Vec::new();
        let mut t = self.tracked.lock().expect("self-check lock");
        let programs = self.maps.iface_stats().map_err(|e| e.to_string());
        let error = devices.as_ref().err().or(programs.as_ref().err()).cloned();
        if let Some(e) = &error {
            debug!(%e, "self-check reading failed");
        }
        if let (Ok(devices), Ok(programs)) = (&devices, &programs) {
            for tr in t.values_mut() {
                let w = &tr.watched;
                let Some(device) = devices.get(&w.ifindex).copied() else { continue };
                let read = |dir| programs.get(&iface_index(w.ifindex, dir), 0).map(|v| sum_iface_cpus(v.iter()));
                let (Ok(up), Ok(down)) = (read(Direction::Upload), read(Direction::Download)) else { continue };
                let now = Sample { device, programs: [up, down] };
                if let Some(prev) = tr.prev.replace(now)
                    && tr.unchecked.is_none()
                {
                    let deltas = compare::deltas(&prev, &now, l2_header(w.layer));
                    for (i, d) in deltas.into_iter().enumerate() {
                        let Some(d) = d else { continue };
                        let dir = Direction::ALL[i];
                        if let Some(state) = tr.dirs[i].fold(&d, self.cfg.threshold_packets, self.cfg.polls) {
                            events.push(self.event(w, dir, &tr.dirs[i], state));
                        }
                    }
                }
            }
        }
        let mut r = self.report.lock().expect("self-check lock");
        r.last_check_unix_ms = Some(unix_ms());
        r.last_error = error;
        r.interfaces = t.values().map(iface_report).collect();
        events
    }

    fn event(&self, w: &Watched, dir: Direction, s: &DirState, state: &'static str) -> Event {
        match state {
            "drifting" => warn!(
                iface = w.name,
                direction = dir.name(),
                missed_packets = s.episode_missed_packets,
                "self-check: the device counted packets the programs did not see"
            ),
            _ => warn!(iface = w.name, direction = dir.name(), "self-check: drift cleared"),
        }
        Event {
            kind: EventKind::LedgerDrift,
            subject: format!("interface:{}", w.name),
            data: serde_json::json!({
                "state": state,
                "interface": w.name,
                "ifindex": w.ifindex,
                "direction": dir.name(),
                "missed_packets": s.episode_missed_packets,
                "unexplained_bytes": s.episode_unexplained_bytes,
                "polls": s.drifting_polls,
                "threshold_packets": self.cfg.threshold_packets,
            }),
        }
    }

    async fn announce(&self, ev: Event) {
        let Some(hooks) = &self.webhooks else { return };
        if let Err(e) = hooks.enqueue(&ev).await {
            error!(%e, subject = ev.subject, "self-check: writing the ledger.drift event failed");
        }
    }
}

/// Bytes a device counts per packet in front of the IP header.
fn l2_header(layer: Layer) -> u64 {
    match layer {
        Layer::L2 => u64::from(tunmeter_common::ETH_HLEN),
        Layer::L3 => 0,
    }
}

fn iface_report(tr: &Tracked) -> IfaceReport {
    let status = if tr.unchecked.is_some() {
        "unchecked"
    } else if tr.dirs.iter().any(|d| d.alerting) {
        "drift"
    } else if tr.dirs.iter().all(|d| d.polls == 0) {
        "starting"
    } else {
        "ok"
    };
    IfaceReport {
        interface: tr.watched.name.clone(),
        ifindex: tr.watched.ifindex,
        status,
        reason: tr.unchecked.clone(),
        upload: tr.dirs[0].clone(),
        download: tr.dirs[1].clone(),
    }
}
