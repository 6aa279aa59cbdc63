//! The ledger in memory: per-client cursors, totals and periods, and the usage not yet written,
//! taken out together so that what one transaction writes is always consistent.
//!
//! Kernel counters are monotonic and never zeroed. Each poll adds `reading - cursor` to the
//! client's totals and to the pending usage of the current minute; a reset moves the client's
//! base to its total. Pending usage and the client rows (cursor, total, base) are taken out
//! together, under one lock, so what one transaction writes is always consistent: the cursor it
//! stores is exactly the sum of the usage it stores. If the write fails, the usage goes back into
//! pending and the client rows are re-read at the next attempt.

use std::{net::IpAddr, num::NonZeroU64};

use serde::{Deserialize, Serialize};

mod clients;
mod flush;
mod fold;

pub use clients::ClientMap;

pub use flush::{FlushStart, Taken, sort_for_writing};

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
    /// Where the source keeps it (the kernel slot), if it has such a place: a hint that lets
    /// a poll find the client's row without the address index.
    pub slot: Option<u32>,
}

/// What the ledger knows of one client.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientState {
    pub first_seen_ms: u64,
    /// When the kernel last saw a packet of it (unix ms; zero is never: `last_seen_ms`). Not an
    /// `Option<u64>`, which takes 16 bytes.
    pub(crate) last_seen: Option<NonZeroU64>,
    pub period_started_ms: u64,
    /// Kernel counter values already taken into `total` (in the current epoch).
    pub cursor: Totals,
    /// Everything ever counted.
    pub total: Totals,
    /// `total` at the start of the current period.
    pub base: Totals,
    /// Bytes per second over the last poll interval (single precision: seven significant
    /// digits are more than a rate estimate has, and a client's row is 8 bytes smaller).
    pub up_rate: f32,
    pub down_rate: f32,
    /// Number of the last poll that had an entry for this client (wrapping).
    pub(crate) poll_gen: u32,
    /// The client's unwritten usage of its latest minute (empty: zero totals).
    pub(crate) open: Open,
    /// Unwritten usage of minutes before the open one: a minute that ended before a flush took
    /// it, usage a failed write put back, rows folded during an outage. Inline in the row (one
    /// minute without an allocation): at a minute boundary every active client has one, and a
    /// map of them beside the rows would grow by a table's worth at once.
    pub(crate) older: OlderRows,
    /// Listed in `State::dirty`: its row is to be written.
    pub(crate) listed: bool,
    /// Its row is in the database (loaded at start, or written by a flush that committed): a
    /// flush updates only the columns that move (SQLite; a missing row is upserted after all).
    pub(crate) stored: bool,
    /// The flush (`State::flush_gen`, wrapping) that last took this row.
    pub(crate) taken: u32,
}

impl ClientState {
    fn new(now_ms: u64) -> ClientState {
        ClientState { first_seen_ms: now_ms, period_started_ms: now_ms, ..ClientState::default() }
    }

    /// When the kernel last saw a packet of this client (unix ms).
    pub fn last_seen_ms(&self) -> Option<u64> {
        self.last_seen.map(NonZeroU64::get)
    }

    pub(crate) fn set_last_seen_ms(&mut self, ms: Option<u64>) {
        self.last_seen = ms.and_then(NonZeroU64::new);
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
    /// Highest rate of a poll interval in the minute, bytes per second (single precision, as
    /// the clients' rates).
    pub peak_up_rate: f32,
    pub peak_down_rate: f32,
}

impl Bucket {
    pub fn merge(&mut self, o: &Bucket) {
        self.totals.add(&o.totals);
        self.peak_up_rate = self.peak_up_rate.max(o.peak_up_rate);
        self.peak_down_rate = self.peak_down_rate.max(o.peak_down_rate);
    }
}

/// One minute of a client's unwritten usage, kept in its state so that a poll touches one
/// hash entry per client.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Open {
    pub start_ms: u64,
    pub bucket: Bucket,
}

impl Open {
    pub fn is_empty(&self) -> bool {
        self.bucket.totals.is_zero()
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

/// A client's older unwritten minutes: nearly always none or one (the minute that ended before
/// a flush took it), kept inline.
type OlderRows = smallvec::SmallVec<[(u64, Bucket); 1]>;

/// One minute of one client's usage, as written: ((minute start, client), usage).
pub type MinuteRow = ((u64, IpAddr), Bucket);

#[derive(Debug, Default)]
pub struct State {
    /// Kernel epoch the cursors refer to ("" before the first poll of a new ledger).
    pub epoch: String,
    pub clients: ClientMap,
    /// Rows in the clients' `older` lists.
    older_rows: usize,
    /// Row numbers of the clients whose row is to be written, each once (`ClientState::listed`).
    dirty: Vec<u32>,
    /// Clients whose open minute holds usage.
    open_rows: usize,
    epoch_dirty: bool,
    polls: u32,
    /// Number of the latest flush (wrapping), and whether it is still writing.
    flush_gen: u32,
    in_flush: bool,
    /// Pending rows past which the oldest are folded into coarser ones (0: no bound).
    max_pending: usize,
    /// Pending rows merged into coarser ones so far.
    folded_rows: u64,
}

/// Add one minute of a client's usage to its `older` list (`rows`: the state's count).
fn add_older(c: &mut ClientState, rows: &mut usize, o: Open) {
    let v = &mut c.older;
    match v.iter_mut().find(|(start, _)| *start == o.start_ms) {
        Some((_, b)) => b.merge(&o.bucket),
        None => {
            v.push((o.start_ms, o.bucket));
            *rows += 1;
        }
    }
}

/// List row `i` for the next write unless it is already.
fn list(c: &mut ClientState, i: u32, dirty: &mut Vec<u32>) {
    if !c.listed {
        c.listed = true;
        dirty.push(i);
    }
}

impl State {
    pub fn restore(epoch: String, clients: impl IntoIterator<Item = (IpAddr, ClientState)>) -> State {
        State { epoch, clients: clients.into_iter().collect(), ..State::default() }
    }

    /// Rows of usage waiting to be written (the flush queue's depth).
    pub fn pending_rows(&self) -> usize {
        self.open_rows + self.older_rows
    }

    /// Start a poll of the whole kernel map: a new epoch resets every cursor. Then
    /// `apply_one` each reading and `end_poll`.
    pub fn begin_poll(&mut self, epoch: &str, out: &mut PollOutcome) {
        if epoch != self.epoch {
            out.new_epoch = !self.epoch.is_empty();
            let dirty = &mut self.dirty;
            for (i, c) in self.clients.values_mut().enumerate() {
                c.cursor = Totals::default();
                list(c, i as u32, dirty);
            }
            self.epoch = epoch.to_string();
            self.epoch_dirty = true;
        }
        self.polls = self.polls.wrapping_add(1);
    }

    /// End a poll that applied `readings` entries: clients without one moved nothing.
    pub fn end_poll(&mut self, readings: usize, now_ms: u64, out: &mut PollOutcome) {
        let gen_ = self.polls;
        if readings != self.clients.len() {
            for c in self.clients.values_mut().filter(|c| c.poll_gen != gen_) {
                c.up_rate = 0.0;
                c.down_rate = 0.0;
            }
        }
        out.folded = self.fold_pending(now_ms);
    }

    /// Take in one reading of the whole kernel map. `elapsed_s` is the time since the previous
    /// reading (None for the first one: rates are unknown then). The ledger streams a poll
    /// through `begin_poll`, `apply_one` and `end_poll`; this is their sequence for the tests.
    #[cfg(test)]
    pub fn apply_poll(
        &mut self,
        epoch: &str,
        readings: &[Reading],
        now_ms: u64,
        elapsed_s: Option<f64>,
    ) -> PollOutcome {
        let mut out = PollOutcome::default();
        self.begin_poll(epoch, &mut out);
        for r in readings {
            if self.apply_one(r, now_ms, elapsed_s, &mut out) {
                out.changed += 1;
            }
        }
        self.end_poll(readings.len(), now_ms, &mut out);
        out
    }

    /// Take in one client's reading (a poll, or the fresh read a reset makes). True if it
    /// added usage.
    pub fn apply_one(&mut self, r: &Reading, now_ms: u64, elapsed_s: Option<f64>, out: &mut PollOutcome) -> bool {
        let gen_ = self.polls;
        let (c, is_new, row) = self.clients.get_or_insert_at(r.ip, r.slot, || ClientState::new(now_ms));
        c.poll_gen = gen_;
        let delta = if r.totals.ge(&c.cursor) {
            r.totals.minus(&c.cursor)
        } else {
            out.recreated.push(r.ip);
            r.totals
        };
        c.cursor = r.totals;
        if r.last_seen_ms > c.last_seen_ms() {
            c.set_last_seen_ms(r.last_seen_ms);
        }
        let rate = |bytes: u64| elapsed_s.filter(|s| *s > 0.0).map_or(0.0, |s| (bytes as f64 / s) as f32);
        if elapsed_s.is_some() {
            c.up_rate = rate(delta.up_bytes);
            c.down_rate = rate(delta.down_bytes);
        }
        if delta.is_zero() {
            if is_new {
                // A new entry with nothing counted yet still gets a row.
                list(c, row, &mut self.dirty);
            }
            return false;
        }
        c.total.add(&delta);
        // A reading outside the poll cadence (a reset's fresh read) has no interval of its own:
        // it adds usage but no peak.
        let (pu, pd) = if elapsed_s.is_some() { (c.up_rate, c.down_rate) } else { (0.0, 0.0) };
        let usage = Bucket { totals: delta, peak_up_rate: pu, peak_down_rate: pd };
        let minute = now_ms - now_ms % MINUTE_MS;
        if c.open.is_empty() {
            c.open = Open { start_ms: minute, bucket: usage };
            self.open_rows += 1;
        } else if c.open.start_ms == minute {
            c.open.bucket.merge(&usage);
        } else {
            // The open minute ended before a flush took it.
            let ended = std::mem::replace(&mut c.open, Open { start_ms: minute, bucket: usage });
            add_older(c, &mut self.older_rows, ended);
        }
        list(c, row, &mut self.dirty);
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
        let (c, is_new, row) = self.clients.get_or_insert_with(ip, || ClientState::new(now_ms));
        if is_new {
            list(c, row, &mut self.dirty);
        }
        let total = c.total;
        (total, self.unwritten(ip))
    }
}

#[cfg(test)]
mod tests;
