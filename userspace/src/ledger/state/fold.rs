//! Bounding pending usage while the database is down: past `max_pending` rows beyond the two
//! each client holds in place, the oldest minutes are merged into hour rows, then day rows, then
//! one row per client, so memory stays bounded through a long outage and no byte is lost.

use super::{MINUTE_MS, State};

const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Pending rows a client holds in its own row (`open` and one `older` inline), not bounded.
pub(super) const IN_PLACE_ROWS: usize = 2;

impl State {
    /// Bound the pending usage to `rows` rows beyond the ones held in place (see
    /// [`State::fold_pending`]).
    pub fn set_max_pending(&mut self, rows: usize) {
        self.max_pending = rows;
    }

    /// Pending rows merged into coarser ones so far (by [`State::fold_pending`]).
    pub fn folded_rows(&self) -> u64 {
        self.folded_rows
    }

    /// While the database is down, pending usage grows by one row per active client and minute.
    /// Two rows a client cost no memory of their own (the open minute and one ended minute live
    /// in the client's row) and never count: with the database up, every active client has both
    /// at a minute boundary, and folding them would merge minutes for nothing. Past the bound
    /// beyond those, the rows before the current minute are merged into one row per client and
    /// hour (at the hour's first minute), then per day, then into one row per client at the
    /// oldest day. Bytes and packets stay exact at every granularity the history rolls up to;
    /// only where inside the hour (day) the usage happened is lost. Peaks stay the highest of
    /// any poll interval. Returns the rows folded away.
    pub fn fold_pending(&mut self, now_ms: u64) -> usize {
        let bound = self.max_pending.saturating_add(IN_PLACE_ROWS * self.clients.len());
        if self.max_pending == 0 || self.pending_rows() <= bound {
            return 0;
        }
        let before = self.pending_rows();
        let current = now_ms - now_ms % MINUTE_MS;
        // Open minutes that have ended join the older ones, where they can be merged.
        for c in self.clients.values_mut() {
            if !c.open.is_empty() && c.open.start_ms < current {
                let ended = std::mem::take(&mut c.open);
                self.open_rows -= 1;
                super::add_older(c, &mut self.older_rows, ended);
            }
        }
        let oldest = self.clients.values().flat_map(|c| &c.older).map(|(start, _)| *start).min().unwrap_or(current);
        for level in [HOUR_MS, DAY_MS, 0] {
            let to = |start: u64| match level {
                0 => oldest - oldest % DAY_MS,
                len => start - start % len,
            };
            let mut rows = 0;
            for v in self.clients.values_mut().map(|c| &mut c.older).filter(|v| !v.is_empty()) {
                let mut merged = super::OlderRows::new();
                for (start, b) in v.drain(..) {
                    let start = if start < current { to(start) } else { start };
                    match merged.iter_mut().find(|(s, _)| *s == start) {
                        Some((_, m)) => m.merge(&b),
                        None => merged.push((start, b)),
                    }
                }
                rows += merged.len();
                *v = merged;
            }
            self.older_rows = rows;
            if self.pending_rows() <= bound {
                break;
            }
        }
        let folded = before - self.pending_rows();
        self.folded_rows += folded as u64;
        folded
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::super::{Bucket, ClientState, Open, Totals};
    use super::*;

    impl State {
        fn insert_older(&mut self, start_ms: u64, ip: IpAddr, bucket: Bucket) {
            let c = self.clients.get_or_insert_with(ip, ClientState::default).0;
            super::super::add_older(c, &mut self.older_rows, Open { start_ms, bucket });
        }

        fn older_rows(&self) -> Vec<(u64, IpAddr, Bucket)> {
            self.clients.iter().flat_map(|(ip, c)| c.older.iter().map(|(start, b)| (*start, *ip, *b))).collect()
        }
    }

    fn bucket(bytes: u64, peak: f32) -> Bucket {
        Bucket {
            totals: Totals { up_bytes: bytes, up_packets: 1, down_bytes: 2 * bytes, down_packets: 1 },
            peak_up_rate: peak,
            peak_down_rate: 0.0,
        }
    }

    fn sums(s: &State) -> (u64, u64, f32) {
        s.older_rows().iter().map(|(_, _, b)| *b).fold((0, 0, 0.0), |(b, p, peak), v| {
            (b + v.totals.up_bytes + v.totals.down_bytes, p + v.totals.up_packets, f32::max(peak, v.peak_up_rate))
        })
    }

    #[test]
    fn folding_keeps_every_byte_and_the_bound() {
        let day0 = 20_000 * DAY_MS;
        let now = day0 + 3 * DAY_MS + 5 * HOUR_MS + 7 * MINUTE_MS;
        let mut s = State::default();
        // 40 clients x every 10th minute over three days and a bit.
        let ips: Vec<IpAddr> = (0..40u8).map(|i| IpAddr::from([10, 8, 0, i])).collect();
        let mut t = day0;
        let mut n = 0u64;
        while t <= now {
            for ip in &ips {
                n += 1;
                s.insert_older(t, *ip, bucket(n, n as f32));
            }
            t += 10 * MINUTE_MS;
        }
        let before = sums(&s);
        let rows = s.pending_rows();
        s.set_max_pending(rows);
        assert_eq!(s.fold_pending(now), 0, "at the bound: nothing to fold");

        // One hour row per client and hour: within 5,000 (beyond the rows in place) after the
        // first level.
        let in_place = IN_PLACE_ROWS * ips.len();
        s.set_max_pending(5_000);
        let folded = s.fold_pending(now);
        assert!(s.pending_rows() <= 5_000 + in_place, "{}", s.pending_rows());
        assert!(s.older_rows().iter().all(|(start, _, _)| start % HOUR_MS == 0), "hour starts");
        assert_eq!(sums(&s), before, "bytes, packets and the peak are kept");
        assert_eq!((folded, s.folded_rows()), (rows - s.pending_rows(), folded as u64));

        // Then days; then one row per client at the oldest day.
        s.set_max_pending(200);
        s.fold_pending(now);
        assert!(s.older_rows().iter().all(|(start, _, _)| start % DAY_MS == 0), "day starts");
        assert_eq!(sums(&s), before);
        s.set_max_pending(40);
        s.fold_pending(now);
        assert_eq!(s.pending_rows(), 40, "one row per client");
        assert!(s.older_rows().iter().all(|(start, _, _)| *start == day0));
        assert_eq!(sums(&s), before);
        assert_eq!(s.folded_rows(), (rows - 40) as u64);
    }

    #[test]
    fn the_rows_held_in_place_are_not_folded() {
        // With the database up, a minute boundary leaves every active client an open minute and
        // the ended one: more pending rows than the bound when the clients outnumber it, but
        // none of them costs memory of its own, and folding them would lose the minutes.
        let now = 20_000 * DAY_MS + 90 * MINUTE_MS + 1;
        let current = now - now % MINUTE_MS;
        let mut s = State::default();
        for i in 0..600u32 {
            let ip = IpAddr::from((0x0a08_0000 + i).to_be_bytes());
            s.insert_older(current - MINUTE_MS, ip, bucket(1, 0.0));
            s.insert_older(current, ip, bucket(2, 0.0));
        }
        s.set_max_pending(1_000);
        assert_eq!(s.pending_rows(), 1_200);
        assert_eq!(s.fold_pending(now), 0);
        assert!(s.older_rows().iter().any(|(start, _, _)| *start == current - MINUTE_MS), "the minute is kept");

        // Two older minutes more per client (1,200 rows beyond those in place) are past it.
        for i in 0..600u32 {
            for m in [2, 3] {
                s.insert_older(current - m * MINUTE_MS, IpAddr::from((0x0a08_0000 + i).to_be_bytes()), bucket(4, 0.0));
            }
        }
        assert!(s.fold_pending(now) > 0);
        assert!(s.pending_rows() <= 1_000 + IN_PLACE_ROWS * 600, "{}", s.pending_rows());
        assert_eq!(sums(&s).0, 600 * 3 * (1 + 2 + 4 + 4), "no byte lost");
    }

    #[test]
    fn the_current_minute_is_never_folded() {
        let now = 20_000 * DAY_MS + 90 * MINUTE_MS + 1;
        let current = now - now % MINUTE_MS;
        let mut s = State::default();
        let ip = IpAddr::from([10, 8, 0, 2]);
        for m in 0..=90 {
            s.insert_older(20_000 * DAY_MS + m * MINUTE_MS, ip, bucket(1, 0.0));
        }
        s.set_max_pending(10);
        s.fold_pending(now);
        let kept: Vec<_> = s.older_rows().into_iter().filter(|(start, _, _)| *start == current).collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].2.totals.up_bytes, 1);
    }
}
