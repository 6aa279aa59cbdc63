//! Prometheus metrics: `/metrics` in the text format.
//!
//! Durations are histograms fed as things happen; everything else is read at scrape time from
//! the ledger and the kernel maps, so a scrape costs nothing between scrapes.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{counters::OutcomeRow, ledger::Ledger};

/// Metrics updated as events happen.
pub struct Metrics {
    pub poll_seconds: Histogram,
    pub flush_seconds: Histogram,
    pub stream_subscribers: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 100 µs .. ~6.5 s
            poll_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            flush_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            stream_subscribers: AtomicI64::new(0),
        }
    }
}

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

/// Render every metric. `max_clients` caps the per-client label sets (the clients with the most
/// bytes are kept).
pub fn render(m: &Metrics, ledger: &Ledger, outcomes: &[OutcomeRow], max_clients: usize) -> String {
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

    reg.register("poll_duration_seconds", "Time to read the kernel client map", m.poll_seconds.clone());
    reg.register("flush_duration_seconds", "Time to write one ledger batch", m.flush_seconds.clone());
    let gauge = |v: i64| {
        let g = Gauge::<i64, AtomicI64>::default();
        g.set(v);
        g
    };
    reg.register("ledger_pending_rows", "Usage rows waiting to be written", gauge(ledger.pending_rows() as i64));
    reg.register("database_up", "1 if the last database write succeeded", gauge(ledger.health().database_up as i64));
    reg.register("stream_subscribers", "Live stream subscribers", gauge(m.stream_subscribers.load(Ordering::Relaxed)));
    reg.register("clients", "Clients in the ledger", gauge(ledger.with_clients(|c| c.len()) as i64));
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}
