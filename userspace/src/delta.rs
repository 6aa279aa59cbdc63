//! Turning monotonic kernel counters into deltas, for the usage ledger.
//!
//! The kernel counters are never zeroed (a reset happens in the ledger), so each poll's
//! increment is `now - last` per client. The ledger must store the cursor (`last`, with the
//! map's epoch) in the same transaction as the deltas it produced: after a restart, even after
//! `kill -9`, polling resumes from the stored cursor and nothing is counted twice or lost.
//!
//! Epoch: the kernel id of the client map. A different id means a new map (reboot, or
//! `tunmeter detach` and a new start) whose counters started from zero: every value in it is
//! new usage, not a wrap and not a reset.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

/// One client's monotonic totals, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub up_bytes: u64,
    pub up_packets: u64,
    pub down_bytes: u64,
    pub down_packets: u64,
}

impl Totals {
    fn ge(&self, o: &Totals) -> bool {
        self.up_bytes >= o.up_bytes
            && self.up_packets >= o.up_packets
            && self.down_bytes >= o.down_bytes
            && self.down_packets >= o.down_packets
    }

    fn minus(&self, o: &Totals) -> Totals {
        Totals {
            up_bytes: self.up_bytes - o.up_bytes,
            up_packets: self.up_packets - o.up_packets,
            down_bytes: self.down_bytes - o.down_bytes,
            down_packets: self.down_packets - o.down_packets,
        }
    }

    pub fn is_zero(&self) -> bool {
        *self == Totals::default()
    }
}

/// Where polling stands: the epoch and the last totals already turned into deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: Option<u32>,
    pub last: BTreeMap<IpAddr, Totals>,
}

/// What one poll adds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Non-zero increments per client.
    pub deltas: BTreeMap<IpAddr, Totals>,
    /// The map is new (a different epoch): all its counts were taken as new usage.
    pub new_epoch: bool,
    /// Clients whose counters went down within one epoch: their entry was removed and created
    /// again between two polls; the new entry's counts were taken as new usage, and what the
    /// old entry counted after the previous poll was lost with it.
    pub recreated: Vec<IpAddr>,
    /// Clients whose entry disappeared since the previous poll.
    pub vanished: Vec<IpAddr>,
}

impl Cursor {
    /// Advance to a new reading of the map (`epoch` = its kernel id) and say what it adds.
    pub fn advance(&mut self, epoch: u32, now: &BTreeMap<IpAddr, Totals>) -> Step {
        let mut step = Step { new_epoch: self.epoch.is_some_and(|e| e != epoch), ..Step::default() };
        if step.new_epoch {
            self.last.clear();
        }
        for (ip, t) in now {
            let d = match self.last.get(ip) {
                Some(prev) if t.ge(prev) => t.minus(prev),
                Some(_) => {
                    step.recreated.push(*ip);
                    *t
                }
                None => *t,
            };
            if !d.is_zero() {
                step.deltas.insert(*ip, d);
            }
        }
        step.vanished = self.last.keys().filter(|ip| !now.contains_key(ip)).copied().collect();
        self.epoch = Some(epoch);
        self.last = now.clone();
        step
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

    fn reading(v: &[(&str, Totals)]) -> BTreeMap<IpAddr, Totals> {
        v.iter().map(|(a, t)| (ip(a), *t)).collect()
    }

    #[test]
    fn first_poll_counts_everything_then_only_increments() {
        let mut c = Cursor::default();
        let s = c.advance(7, &reading(&[("10.8.0.2", t(1000, 500))]));
        assert!(!s.new_epoch);
        assert_eq!(s.deltas[&ip("10.8.0.2")], t(1000, 500));
        let s = c.advance(7, &reading(&[("10.8.0.2", t(1500, 500)), ("fd00:8::2", t(100, 0))]));
        assert_eq!(s.deltas[&ip("10.8.0.2")], Totals { up_bytes: 500, up_packets: 5, ..Totals::default() });
        assert_eq!(s.deltas[&ip("fd00:8::2")], t(100, 0));
        // Nothing moved: no deltas at all.
        let s = c.advance(7, &reading(&[("10.8.0.2", t(1500, 500)), ("fd00:8::2", t(100, 0))]));
        assert!(s.deltas.is_empty());
    }

    #[test]
    fn a_new_map_is_a_new_epoch_not_a_reset_or_a_wrap() {
        let mut c = Cursor::default();
        c.advance(7, &reading(&[("10.8.0.2", t(900_000, 900_000))]));
        // After a reboot the counters are small again, in a map with another id.
        let s = c.advance(9, &reading(&[("10.8.0.2", t(300, 200))]));
        assert!(s.new_epoch);
        assert!(s.recreated.is_empty());
        assert_eq!(s.deltas[&ip("10.8.0.2")], t(300, 200));
    }

    #[test]
    fn a_recreated_entry_is_reported_and_counted_from_zero() {
        let mut c = Cursor::default();
        c.advance(7, &reading(&[("10.8.0.2", t(900, 900))]));
        let s = c.advance(7, &reading(&[("10.8.0.2", t(100, 0))]));
        assert_eq!(s.recreated, vec![ip("10.8.0.2")]);
        assert_eq!(s.deltas[&ip("10.8.0.2")], t(100, 0));
        let s = c.advance(7, &reading(&[]));
        assert_eq!(s.vanished, vec![ip("10.8.0.2")]);
    }

    #[test]
    fn a_restored_cursor_neither_loses_nor_doubles() {
        // The sum of all deltas equals the final totals, however the polls are split and
        // wherever the daemon restarts from its stored cursor.
        let series: Vec<u64> = (0..50).map(|i| i * i * 37).collect();
        let mut stored = Cursor::default();
        let mut sum = 0;
        for (n, v) in series.iter().enumerate() {
            let mut c = if n % 7 == 0 {
                serde_json::from_str(&serde_json::to_string(&stored).unwrap()).unwrap()
            } else {
                stored.clone()
            };
            let s = c.advance(3, &reading(&[("10.8.0.9", t(*v, *v / 2))]));
            sum += s.deltas.get(&ip("10.8.0.9")).map_or(0, |d| d.up_bytes);
            stored = c;
        }
        assert_eq!(sum, *series.last().unwrap());
    }
}
