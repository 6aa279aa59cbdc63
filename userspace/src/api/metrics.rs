//! Prometheus metrics: `/metrics` in the OpenMetrics text format, rendered at scrape time from
//! the ledger, the kernel's outcome counters and the steering maps.
//!
//! Durations come from the ledger's histograms (fed as polls and flushes happen); everything
//! else is read at scrape time from the ledger and the kernel maps, so a scrape costs nothing
//! between scrapes.

use std::sync::atomic::AtomicI64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{bpf::counters::OutcomeRow, ledger::Ledger, selfcheck::Report, steer::SteerList};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    direction: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    kind: &'static str,
    rule: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IfaceLabels {
    interface: String,
    direction: &'static str,
}

/// The self-check: per device and direction, packets the device counted that the programs did
/// not see, the bytes difference, and whether it is drifting now.
fn register_selfcheck(reg: &mut Registry, r: &Report) {
    let missed = Family::<IfaceLabels, Counter>::default();
    let unexplained = Family::<IfaceLabels, Gauge<i64, AtomicI64>>::default();
    let drifting = Family::<IfaceLabels, Gauge<i64, AtomicI64>>::default();
    for i in &r.interfaces {
        for (direction, d) in [("upload", &i.upload), ("download", &i.download)] {
            let l = IfaceLabels { interface: i.interface.clone(), direction };
            missed.get_or_create(&l).inc_by(d.missed_packets);
            unexplained.get_or_create(&l).set(d.unexplained_bytes);
            drifting.get_or_create(&l).set(d.alerting as i64);
        }
    }
    reg.register(
        "selfcheck_missed_packets",
        "Packets a device counted that the programs never saw, since the daemon started",
        missed,
    );
    reg.register(
        "selfcheck_unexplained_bytes",
        "Device bytes minus counted bytes since the daemon started (segmentation headers included)",
        unexplained,
    );
    reg.register("selfcheck_drifting", "1 while a device and direction is past the drift threshold", drifting);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

/// Per-rule and per-event steering counters.
fn register_steer(reg: &mut Registry, l: &SteerList) {
    let bytes = Family::<RuleLabels, Counter>::default();
    let packets = Family::<RuleLabels, Counter>::default();
    let add = |kind, rule: String, direction, b, p| {
        let l = RuleLabels { kind, rule, direction };
        bytes.get_or_create(&l).inc_by(b);
        packets.get_or_create(&l).inc_by(p);
    };
    for f in &l.forward {
        let rule = format!("{}/{}", f.proto, f.public_port);
        let c = f.counters;
        add("forward", rule.clone(), "to_target", c.to_target_bytes, c.to_target_packets);
        add("forward", rule, "from_target", c.from_target_bytes, c.from_target_packets);
    }
    for r in &l.redirect {
        add("redirect", r.source.to_string(), "to_target", r.to_target_bytes, r.to_target_packets);
    }
    reg.register("steer_rule_bytes", "L3 bytes steered per rule and direction", bytes);
    reg.register("steer_rule_packets", "Packets steered per rule and direction", packets);
    let eb = Family::<EventLabels, Counter>::default();
    let ep = Family::<EventLabels, Counter>::default();
    for (event, c) in &l.events {
        eb.get_or_create(&EventLabels { event }).inc_by(c.bytes);
        ep.get_or_create(&EventLabels { event }).inc_by(c.packets);
    }
    reg.register("steer_event_bytes", "L3 bytes per steering event (docs/steering.md)", eb);
    reg.register("steer_event_packets", "Packets per steering event (docs/steering.md)", ep);
}

/// Render every metric. `max_clients` caps the per-client label sets (the clients with the most
/// bytes are kept).
pub fn render(
    ledger: &Ledger,
    stream_subscribers: usize,
    outcomes: &[OutcomeRow],
    steer: Option<&SteerList>,
    selfcheck: Option<&Report>,
    max_clients: usize,
) -> String {
    let mut reg = Registry::with_prefix("tunmeter");
    let bytes = Family::<ClientLabels, Counter>::default();
    let packets = Family::<ClientLabels, Counter>::default();
    let mut rows: Vec<_> =
        ledger.with_clients(|c| c.iter().map(|(ip, s)| (ip.to_string(), s.total)).collect::<Vec<_>>());
    let left_out = rows.len().saturating_sub(max_clients);
    if left_out > 0 {
        rows.sort_unstable_by_key(|(_, t)| std::cmp::Reverse(t.up_bytes + t.down_bytes));
        rows.truncate(max_clients);
    }
    for (client, t) in rows {
        for (direction, b, p) in [("upload", t.up_bytes, t.up_packets), ("download", t.down_bytes, t.down_packets)] {
            let l = ClientLabels { client: client.clone(), direction };
            bytes.get_or_create(&l).inc_by(b);
            packets.get_or_create(&l).inc_by(p);
        }
    }
    reg.register("client_bytes", "Bytes per VPN client (lifetime, L3)", bytes);
    reg.register("client_packets", "Packets per VPN client (lifetime)", packets);
    let unlabelled = Gauge::<i64, AtomicI64>::default();
    unlabelled.set(left_out as i64);
    reg.register("clients_unlabelled", "Clients left out of the per-client series (metrics_max_clients)", unlabelled);

    let ob = Family::<OutcomeLabels, Counter>::default();
    let op = Family::<OutcomeLabels, Counter>::default();
    for o in outcomes {
        let l = OutcomeLabels { direction: o.direction, outcome: o.outcome };
        ob.get_or_create(&l).inc_by(o.bytes);
        op.get_or_create(&l).inc_by(o.packets);
    }
    reg.register("packets", "Packets seen by the kernel programs, by outcome", op);
    reg.register("bytes", "Bytes seen by the kernel programs, by outcome", ob);

    if let Some(l) = steer {
        register_steer(&mut reg, l);
    }
    if let Some(r) = selfcheck {
        register_selfcheck(&mut reg, r);
    }
    let timings = ledger.timings();
    reg.register("poll_duration_seconds", "Time to read the kernel client map", timings.poll_seconds.clone());
    reg.register("flush_duration_seconds", "Time to write one ledger batch", timings.flush_seconds.clone());
    let gauge = |v: i64| {
        let g = Gauge::<i64, AtomicI64>::default();
        g.set(v);
        g
    };
    reg.register("ledger_pending_rows", "Usage rows waiting to be written", gauge(ledger.pending_rows() as i64));
    let folded = Counter::<u64>::default();
    folded.inc_by(ledger.folded_rows());
    reg.register(
        "ledger_pending_folded_rows",
        "Pending usage rows merged into hour or day rows because pending usage hit max_pending_rows",
        folded,
    );
    reg.register("database_up", "1 if the last database write succeeded", gauge(ledger.health().database_up as i64));
    reg.register("stream_subscribers", "Live stream subscribers", gauge(stream_subscribers as i64));
    reg.register("clients", "Clients in the ledger", gauge(ledger.with_clients(|c| c.len()) as i64));
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}
