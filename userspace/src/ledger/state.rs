//! The ledger in memory: per-client cursors, totals and periods, and the usage not yet written,
//! taken out together so that what one transaction writes is always consistent.
//!
//! Kernel counters are monotonic and never zeroed. Each poll adds `reading - cursor` to the
//! client's totals and to the pending usage of the current minute; a reset moves the client's
//! base to its total. Pending usage and the client rows (cursor, total, base) are taken out
//! together, under one lock, so what one transaction writes is always consistent: the cursor it
//! stores is exactly the sum of the usage it stores. If the write fails, the usage goes back into
//! pending and the client rows are re-read at the next attempt.

use std::net::IpAddr;

use rustc_hash::{FxHashMap, FxHashSet};

use serde::{Deserialize, Serialize};

mod fold;

pub const MINUTE_MS: u64 = 60_000;

/// Four monotonic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub up_bytes: u64,
    pub up_packets: u64,
    pub down_bytes: u64,
    pub down_packets: u64,
}

impl Totals {
    /// Every counter at least as large as in `o`.
    pub fn ge(&self, o: &Totals) -> bool {
        self.up_bytes >= o.up_bytes
            && self.up_packets >= o.up_packets
            && self.down_bytes >= o.down_bytes
            && self.down_packets >= o.down_packets
    }

    pub fn minus(&self, o: &Totals) -> Totals {
        Totals {
            up_bytes: self.up_bytes.saturating_sub(o.up_bytes),
            up_packets: self.up_packets.saturating_sub(o.up_packets),
            down_bytes: self.down_bytes.saturating_sub(o.down_bytes),
            down_packets: self.down_packets.saturating_sub(o.down_packets),
        }
    }

    pub fn add(&mut self, o: &Totals) {
        self.up_bytes += o.up_bytes;
        self.up_packets += o.up_packets;
        self.down_bytes += o.down_bytes;
        self.down_packets += o.down_packets;
    }

    pub fn is_zero(&self) -> bool {
        *self == Totals::default()
    }
}

/// One kernel map entry, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub ip: IpAddr,
    pub totals: Totals,
    pub last_seen_ms: Option<u64>,
}

/// What the ledger knows of one client.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientState {
    pub first_seen_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub period_started_ms: u64,
    /// Kernel counter values already taken into `total` (in the current epoch).
    pub cursor: Totals,
    /// Everything ever counted.
    pub total: Totals,
    /// `total` at the start of the current period.
    pub base: Totals,
    /// Bytes per second over the last poll interval.
    pub up_rate: f64,
    pub down_rate: f64,
    /// Number of the last poll that had an entry for this client.
    pub(crate) poll_gen: u64,
}

impl ClientState {
    fn new(now_ms: u64) -> ClientState {
        ClientState {
            first_seen_ms: now_ms,
            last_seen_ms: None,
            period_started_ms: now_ms,
            cursor: Totals::default(),
            total: Totals::default(),
            base: Totals::default(),
            up_rate: 0.0,
            down_rate: 0.0,
            poll_gen: 0,
        }
    }

    /// Usage since the last reset.
    pub fn period(&self) -> Totals {
        self.total.minus(&self.base)
    }
}

/// Usage of one client in one minute, not yet written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Bucket {
    pub totals: Totals,
    pub peak_up_rate: f64,
    pub peak_down_rate: f64,
}

impl Bucket {
    pub fn merge(&mut self, o: &Bucket) {
        self.totals.add(&o.totals);
        self.peak_up_rate = self.peak_up_rate.max(o.peak_up_rate);
        self.peak_down_rate = self.peak_down_rate.max(o.peak_down_rate);
    }
}

/// A reset, decided at one instant: `closed` is the period it ends.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResetRecord {
    pub id: String,
    pub ip: IpAddr,
    pub at_ms: u64,
    pub period_started_ms: u64,
    pub closed: Totals,
    /// The client's total at the reset: its new base.
    #[serde(skip)]
    pub new_base: Totals,
}

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct FlushBatch {
    /// Set when the kernel epoch changed since the last write.
    pub epoch: Option<String>,
    /// (minute start, client) -> usage.
    pub buckets: Vec<((u64, IpAddr), Bucket)>,
    /// Current rows of the clients touched since the last write.
    pub clients: Vec<(IpAddr, ClientState)>,
    pub reset: Option<ResetRecord>,
}

impl FlushBatch {
    pub fn is_empty(&self) -> bool {
        self.epoch.is_none() && self.buckets.is_empty() && self.clients.is_empty() && self.reset.is_none()
    }
}

/// What one poll changed.
#[derive(Debug, Default, PartialEq)]
pub struct PollOutcome {
    /// The kernel map is not the one the cursors refer to (reboot, or a detach and a new start):
    /// its counts started from zero and were all taken as new usage.
    pub new_epoch: bool,
    /// Clients whose kernel counters went down within one epoch (their entry was re-created);
    /// the new entry's counts were taken as new usage.
    pub recreated: Vec<IpAddr>,
    /// Clients with new usage.
    pub changed: usize,
    /// Pending rows folded into coarser ones because pending usage hit its bound.
    pub folded: usize,
}

/// Clients by address. (Fx hashing: the keys are the operator's own VPN addresses, and a poll
/// of 100,000 clients spends much of its time hashing them.)
pub type ClientMap = FxHashMap<IpAddr, ClientState>;

#[derive(Debug, Default)]
pub struct State {
    /// Kernel epoch the cursors refer to ("" before the first poll of a new ledger).
    pub epoch: String,
    pub clients: ClientMap,
    pending: FxHashMap<(u64, IpAddr), Bucket>,
    dirty: FxHashSet<IpAddr>,
    epoch_dirty: bool,
    polls: u64,
    /// Pending rows past which the oldest are folded into coarser ones (0: no bound).
    max_pending: usize,
    /// Pending rows merged into coarser ones so far.
    folded_rows: u64,
}

impl State {
    pub fn restore(epoch: String, clients: impl IntoIterator<Item = (IpAddr, ClientState)>) -> State {
        State { epoch, clients: clients.into_iter().collect(), ..State::default() }
    }

    /// Rows of usage waiting to be written (the flush queue's depth).
    pub fn pending_rows(&self) -> usize {
        self.pending.len()
    }

    /// Take in one reading of the whole kernel map. `elapsed_s` is the time since the previous
    /// reading (None for the first one: rates are unknown then).
    pub fn apply_poll(
        &mut self,
        epoch: &str,
        readings: &[Reading],
        now_ms: u64,
        elapsed_s: Option<f64>,
    ) -> PollOutcome {
        let mut out = PollOutcome::default();
        if epoch != self.epoch {
            out.new_epoch = !self.epoch.is_empty();
            for c in self.clients.values_mut() {
                c.cursor = Totals::default();
            }
            self.dirty.extend(self.clients.keys().copied());
            self.epoch = epoch.to_string();
            self.epoch_dirty = true;
        }
        self.polls += 1;
        let gen_ = self.polls;
        for r in readings {
            if self.apply_one(r, now_ms, elapsed_s, &mut out) {
                out.changed += 1;
            }
        }
        // Clients without an entry this time moved nothing.
        if readings.len() != self.clients.len() {
            for c in self.clients.values_mut().filter(|c| c.poll_gen != gen_) {
                c.up_rate = 0.0;
                c.down_rate = 0.0;
            }
        }
        out.folded = self.fold_pending(now_ms);
        out
    }

    /// Take in one client's reading (a poll, or the fresh read a reset makes). True if it
    /// added usage.
    pub fn apply_one(&mut self, r: &Reading, now_ms: u64, elapsed_s: Option<f64>, out: &mut PollOutcome) -> bool {
        let gen_ = self.polls;
        let mut is_new = false;
        let c = self.clients.entry(r.ip).or_insert_with(|| {
            is_new = true;
            ClientState::new(now_ms)
        });
        c.poll_gen = gen_;
        let delta = if r.totals.ge(&c.cursor) {
            r.totals.minus(&c.cursor)
        } else {
            out.recreated.push(r.ip);
            r.totals
        };
        c.cursor = r.totals;
        if r.last_seen_ms > c.last_seen_ms {
            c.last_seen_ms = r.last_seen_ms;
        }
        let rate = |bytes: u64| elapsed_s.filter(|s| *s > 0.0).map_or(0.0, |s| bytes as f64 / s);
        if elapsed_s.is_some() {
            c.up_rate = rate(delta.up_bytes);
            c.down_rate = rate(delta.down_bytes);
        }
        if delta.is_zero() {
            if is_new {
                // A new entry with nothing counted yet still gets a row.
                self.dirty.insert(r.ip);
            }
            return false;
        }
        c.total.add(&delta);
        let b = self.pending.entry((now_ms - now_ms % MINUTE_MS, r.ip)).or_default();
        // A reading outside the poll cadence (a reset's fresh read) has no interval of its own:
        // it adds usage but no peak.
        let (pu, pd) = if elapsed_s.is_some() { (c.up_rate, c.down_rate) } else { (0.0, 0.0) };
        b.merge(&Bucket { totals: delta, peak_up_rate: pu, peak_down_rate: pd });
        self.dirty.insert(r.ip);
        true
    }

    /// Decide a reset of `ip` at `now_ms` (after its fresh reading was applied). It takes effect
    /// in memory only when `commit_reset` is called after the write succeeded.
    pub fn prepare_reset(&self, ip: IpAddr, now_ms: u64) -> Option<ResetRecord> {
        let c = self.clients.get(&ip)?;
        Some(ResetRecord {
            id: uuid::Uuid::new_v4().to_string(),
            ip,
            at_ms: now_ms,
            period_started_ms: c.period_started_ms,
            closed: c.period(),
            new_base: c.total,
        })
    }

    pub fn commit_reset(&mut self, r: &ResetRecord) {
        if let Some(c) = self.clients.get_mut(&r.ip) {
            c.base = r.new_base;
            c.period_started_ms = r.at_ms;
        }
    }

    /// Make sure `ip` is a client (a VPN client admitted before its first packet: its counters
    /// start at zero, so the first reading of its kernel entry is all new usage). Returns its
    /// total and whether its row still has to be written.
    pub fn admit(&mut self, ip: IpAddr, now_ms: u64) -> (Totals, bool) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.clients.entry(ip) {
            e.insert(ClientState::new(now_ms));
            self.dirty.insert(ip);
        }
        (self.clients[&ip].total, self.dirty.contains(&ip))
    }

    /// Take what must be written: pending usage and the current rows of touched clients.
    pub fn take_flush(&mut self, reset: Option<ResetRecord>) -> FlushBatch {
        let mut clients: Vec<(IpAddr, ClientState)> =
            self.dirty.drain().filter_map(|ip| self.clients.get(&ip).map(|c| (ip, c.clone()))).collect();
        if let Some(r) = &reset {
            // The reset's client row is written as it will be after the reset.
            let pos = clients.iter().position(|(ip, _)| *ip == r.ip);
            let row = match pos {
                Some(p) => &mut clients[p].1,
                None => {
                    clients.push((r.ip, self.clients[&r.ip].clone()));
                    &mut clients.last_mut().expect("just pushed").1
                }
            };
            row.base = r.new_base;
            row.period_started_ms = r.at_ms;
        }
        FlushBatch {
            epoch: std::mem::take(&mut self.epoch_dirty).then(|| self.epoch.clone()),
            buckets: self.pending.drain().collect(),
            clients,
            reset,
        }
    }

    /// Put back what a failed write held: its usage is merged into pending (and written with
    /// the next batch), its clients are marked for re-reading.
    pub fn restore_failed(&mut self, b: FlushBatch) {
        if b.epoch.is_some() {
            self.epoch_dirty = true;
        }
        for (k, bucket) in b.buckets {
            self.pending.entry(k).or_default().merge(&bucket);
        }
        self.dirty.extend(b.clients.into_iter().map(|(ip, _)| ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(up: u64, down: u64) -> Totals {
        Totals { up_bytes: up, up_packets: up / 100, down_bytes: down, down_packets: down / 100 }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn r(a: &str, tot: Totals) -> Reading {
        Reading { ip: ip(a), totals: tot, last_seen_ms: Some(1) }
    }

    fn pending_sum(b: &FlushBatch, who: IpAddr) -> Totals {
        let mut s = Totals::default();
        for ((_, i), bucket) in &b.buckets {
            if *i == who {
                s.add(&bucket.totals);
            }
        }
        s
    }

    #[test]
    fn polls_add_increments_and_rates() {
        let mut s = State::default();
        s.apply_poll("e1", &[r("10.8.0.2", t(1000, 500))], 60_000, None);
        let o = s.apply_poll("e1", &[r("10.8.0.2", t(3000, 500)), r("fd00:8::2", t(100, 0))], 61_000, Some(2.0));
        assert_eq!(o.changed, 2);
        let c = &s.clients[&ip("10.8.0.2")];
        assert_eq!(c.total, t(3000, 500));
        assert_eq!(c.up_rate, 1000.0);
        assert_eq!(c.down_rate, 0.0);
        let b = s.take_flush(None);
        assert_eq!(b.epoch.as_deref(), Some("e1"));
        assert_eq!(pending_sum(&b, ip("10.8.0.2")), t(3000, 500));
        // The peak of the minute is the highest poll-interval rate.
        let bucket = b.buckets.iter().find(|((_, i), _)| *i == ip("10.8.0.2")).unwrap().1;
        assert_eq!(bucket.peak_up_rate, 1000.0);
        assert!(s.take_flush(None).is_empty());
    }

    #[test]
    fn a_new_epoch_counts_the_new_map_from_zero() {
        let mut s = State::default();
        s.apply_poll("boot1/7", &[r("10.8.0.2", t(900_000, 900_000))], 0, None);
        let o = s.apply_poll("boot2/7", &[r("10.8.0.2", t(300, 200))], 1000, Some(1.0));
        assert!(o.new_epoch);
        assert!(o.recreated.is_empty());
        assert_eq!(s.clients[&ip("10.8.0.2")].total, t(900_300, 900_200));
    }

    #[test]
    fn a_recreated_entry_is_reported_and_counted_from_zero() {
        let mut s = State::default();
        s.apply_poll("e", &[r("10.8.0.2", t(900, 900))], 0, None);
        let o = s.apply_poll("e", &[r("10.8.0.2", t(100, 0))], 1000, Some(1.0));
        assert_eq!(o.recreated, vec![ip("10.8.0.2")]);
        assert_eq!(s.clients[&ip("10.8.0.2")].total, t(1000, 900));
    }

    #[test]
    fn a_failed_write_loses_nothing() {
        let mut s = State::default();
        s.apply_poll("e", &[r("10.8.0.2", t(1000, 0))], 0, None);
        let failed = s.take_flush(None);
        s.apply_poll("e", &[r("10.8.0.2", t(1500, 0))], 500, Some(0.5));
        s.restore_failed(failed);
        let b = s.take_flush(None);
        assert_eq!(b.epoch.as_deref(), Some("e"));
        assert_eq!(pending_sum(&b, ip("10.8.0.2")), t(1500, 0));
        // The client row written is the current one: its cursor matches the usage above.
        assert_eq!(b.clients[0].1.cursor, t(1500, 0));
    }

    #[test]
    fn reset_closes_the_period_and_is_visible_only_after_commit() {
        let mut s = State::default();
        s.apply_poll("e", &[r("10.8.0.2", t(1000, 400))], 0, None);
        let rec = s.prepare_reset(ip("10.8.0.2"), 5000).unwrap();
        assert_eq!(rec.closed, t(1000, 400));
        let b = s.take_flush(Some(rec.clone()));
        assert_eq!(b.clients[0].1.base, t(1000, 400));
        assert_eq!(s.clients[&ip("10.8.0.2")].period(), t(1000, 400));
        s.commit_reset(&rec);
        assert!(s.clients[&ip("10.8.0.2")].period().is_zero());
        s.apply_poll("e", &[r("10.8.0.2", t(1300, 400))], 6000, Some(1.0));
        assert_eq!(s.clients[&ip("10.8.0.2")].period(), t(300, 0));
        assert!(s.prepare_reset(ip("10.9.9.9"), 0).is_none());
    }

    #[test]
    fn usage_polled_while_a_reset_is_written_belongs_to_the_new_period() {
        let mut s = State::default();
        s.apply_poll("e", &[r("10.8.0.2", t(1000, 0))], 0, None);
        let rec = s.prepare_reset(ip("10.8.0.2"), 10).unwrap();
        let batch = s.take_flush(Some(rec.clone()));
        // A poll lands while the reset's transaction is in flight.
        s.apply_poll("e", &[r("10.8.0.2", t(1700, 0))], 20, Some(1.0));
        s.commit_reset(&rec);
        assert_eq!(rec.closed, t(1000, 0));
        assert_eq!(s.clients[&ip("10.8.0.2")].period(), t(700, 0));
        // The next batch carries that usage and the reset's base, so the stored period agrees.
        let next = s.take_flush(None);
        assert_eq!(pending_sum(&next, ip("10.8.0.2")), t(700, 0));
        assert_eq!(next.clients[0].1.base, t(1000, 0));
        drop(batch);
    }

    #[test]
    fn an_admitted_client_counts_its_first_reading_in_full() {
        let mut s = State::default();
        s.apply_poll("e", &[r("10.8.0.3", t(10, 10))], 0, None);
        assert_eq!(s.admit(ip("10.8.0.2"), 5), (Totals::default(), true));
        let b = s.take_flush(None);
        assert!(b.clients.iter().any(|(i, c)| *i == ip("10.8.0.2") && c.cursor.is_zero()));
        // Known and written: nothing more to write.
        assert_eq!(s.admit(ip("10.8.0.2"), 6), (Totals::default(), false));
        s.apply_poll("e", &[r("10.8.0.3", t(10, 10)), r("10.8.0.2", t(700, 300))], 1000, Some(1.0));
        assert_eq!(s.clients[&ip("10.8.0.2")].total, t(700, 300));
        assert_eq!(s.clients[&ip("10.8.0.2")].first_seen_ms, 5);
    }

    #[test]
    fn restarts_from_a_stored_cursor_neither_lose_nor_double() {
        // Readings of one growing counter; every 7th poll the state is rebuilt from what was
        // written (cursor + total), as after a restart; the total must equal the last reading.
        let series: Vec<u64> = (0..50).map(|i| i * i * 37).collect();
        let mut s = State::default();
        let mut written: Option<ClientState> = None;
        for (n, v) in series.iter().enumerate() {
            if n % 7 == 0
                && let Some(c) = &written
            {
                s = State::restore("e".into(), [(ip("10.8.0.9"), c.clone())]);
            }
            s.apply_poll("e", &[r("10.8.0.9", t(*v, *v / 2))], n as u64 * 1000, Some(1.0));
            if n % 3 == 0 {
                written = s.take_flush(None).clients.into_iter().next().map(|(_, c)| c).or(written);
            }
        }
        assert_eq!(s.clients[&ip("10.8.0.9")].total.up_bytes, *series.last().unwrap());
    }
}
