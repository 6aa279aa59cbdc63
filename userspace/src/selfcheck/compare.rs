//! One comparison of the self-check: the change of a device's own counters and of the programs'
//! totals between two readings, the packets the device counted beyond what the programs saw,
//! and the drift state of one direction across polls. Pure: no kernel, no clock.

use serde::Serialize;
use tunmeter_common::IfaceCounter;

use crate::bpf::links::DeviceCounters;

/// One reading of a device: its own counters and the programs' totals (upload, download).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub device: DeviceCounters,
    pub programs: [IfaceCounter; 2],
}

/// What changed in one direction between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    /// Upload: received. Download: sent plus dropped on transmit (both after TC egress).
    pub device_packets: u64,
    pub device_bytes: u64,
    pub counted_packets: u64,
    pub counted_segments: u64,
    /// L3 bytes the programs counted plus the device's L2 header per packet.
    pub counted_bytes: u64,
    /// Packets the device counted beyond the segments the programs saw: they went past us.
    pub missed_packets: u64,
}

/// The change in each direction, or `None` where a counter went backwards (device or map
/// re-created): that direction starts over from this reading.
pub fn deltas(prev: &Sample, now: &Sample, l2_header: u64) -> [Option<Delta>; 2] {
    let dev = |a: u64, b: u64| b.checked_sub(a);
    let (p, n) = (&prev.device, &now.device);
    let device = [
        dev(p.rx_packets, n.rx_packets).zip(dev(p.rx_bytes, n.rx_bytes)),
        dev(p.tx_packets + p.tx_dropped, n.tx_packets + n.tx_dropped).zip(dev(p.tx_bytes, n.tx_bytes)),
    ];
    let mut out = [None; 2];
    for i in 0..2 {
        let (a, b) = (&prev.programs[i], &now.programs[i]);
        let counted = dev(a.packets, b.packets).zip(dev(a.segments, b.segments)).zip(dev(a.bytes, b.bytes));
        if let (Some((device_packets, device_bytes)), Some(((packets, segments), bytes))) = (device[i], counted) {
            out[i] = Some(Delta {
                device_packets,
                device_bytes,
                counted_packets: packets,
                counted_segments: segments,
                counted_bytes: bytes + l2_header * packets,
                missed_packets: device_packets.saturating_sub(segments),
            });
        }
    }
    out
}

/// One direction of one device, across polls since the daemon started watching it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirState {
    pub device_packets: u64,
    pub device_bytes: u64,
    pub counted_packets: u64,
    pub counted_bytes: u64,
    /// Packets the device counted that the programs never saw.
    pub missed_packets: u64,
    /// Device bytes minus counted bytes. Not zero on its own: a device that segments after TC
    /// (tun, WireGuard) also counts the headers of the extra segments.
    pub unexplained_bytes: i64,
    pub last_missed_packets: u64,
    /// Polls compared.
    pub polls: u64,
    /// Consecutive polls above the threshold, now.
    pub drifting_polls: u32,
    /// True from the `polls`-th drifting poll until a poll is back under the threshold.
    pub alerting: bool,
    #[serde(skip)]
    pub episode_missed_packets: u64,
    #[serde(skip)]
    pub episode_unexplained_bytes: i64,
}

impl DirState {
    /// Fold one poll in. Returns `Some("drifting")` when the drift has lasted `polls` polls and
    /// `Some("cleared")` at the first poll back under the threshold after that.
    pub fn fold(&mut self, d: &Delta, threshold: u64, polls: u32) -> Option<&'static str> {
        let unexplained = d.device_bytes as i64 - d.counted_bytes as i64;
        self.device_packets += d.device_packets;
        self.device_bytes += d.device_bytes;
        self.counted_packets += d.counted_packets;
        self.counted_bytes += d.counted_bytes;
        self.missed_packets += d.missed_packets;
        self.unexplained_bytes += unexplained;
        self.last_missed_packets = d.missed_packets;
        self.polls += 1;
        if d.missed_packets > threshold {
            if self.drifting_polls == 0 {
                self.episode_missed_packets = 0;
                self.episode_unexplained_bytes = 0;
            }
            self.drifting_polls += 1;
            self.episode_missed_packets += d.missed_packets;
            self.episode_unexplained_bytes += unexplained;
            if self.drifting_polls >= polls && !self.alerting {
                self.alerting = true;
                return Some("drifting");
            }
            return None;
        }
        self.drifting_polls = 0;
        if std::mem::take(&mut self.alerting) { Some("cleared") } else { None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rx: u64, tx: u64, up: u64, down: u64) -> Sample {
        let c = |n: u64| IfaceCounter { packets: n, segments: n, bytes: n * 100 };
        Sample {
            device: DeviceCounters {
                rx_packets: rx,
                rx_bytes: rx * 114,
                tx_packets: tx,
                tx_bytes: tx * 114,
                tx_dropped: 0,
            },
            programs: [c(up), c(down)],
        }
    }

    #[test]
    fn a_device_that_saw_what_the_programs_saw_has_no_drift() {
        let d = deltas(&sample(10, 20, 10, 20), &sample(110, 220, 110, 220), 14);
        for d in d {
            let d = d.unwrap();
            assert_eq!((d.missed_packets, d.device_bytes as i64 - d.counted_bytes as i64), (0, 0));
        }
    }

    #[test]
    fn packets_past_the_programs_are_missed() {
        let [up, down] = deltas(&sample(0, 0, 0, 0), &sample(100, 50, 60, 50), 14);
        assert_eq!(up.unwrap().missed_packets, 40);
        assert_eq!(down.unwrap().missed_packets, 0);
    }

    #[test]
    fn segments_explain_a_device_that_counts_after_segmentation() {
        let prev = sample(0, 0, 0, 0);
        let mut now = sample(0, 45, 0, 0);
        now.programs[1] = IfaceCounter { packets: 1, segments: 45, bytes: 64_000 };
        assert_eq!(deltas(&prev, &now, 0)[1].unwrap().missed_packets, 0);
        // Dropped on transmit after TC: counted by us, explained by tx_dropped.
        now.device.tx_packets = 40;
        now.device.tx_dropped = 5;
        assert_eq!(deltas(&prev, &now, 0)[1].unwrap().missed_packets, 0);
    }

    #[test]
    fn counters_that_go_backwards_restart_that_direction() {
        let [up, down] = deltas(&sample(100, 100, 100, 100), &sample(120, 120, 5, 120), 0);
        assert!(up.is_none());
        assert!(down.is_some());
    }

    #[test]
    fn drift_fires_after_n_polls_and_clears_once() {
        let mut s = DirState::default();
        let bad = Delta { device_packets: 100, missed_packets: 100, ..Delta::default() };
        let good = Delta { device_packets: 100, counted_packets: 100, counted_segments: 100, ..Delta::default() };
        assert_eq!(s.fold(&bad, 64, 3), None);
        assert_eq!(s.fold(&good, 64, 3), None, "one quiet poll ends the run");
        assert_eq!(s.fold(&bad, 64, 3), None);
        assert_eq!(s.fold(&bad, 64, 3), None);
        assert_eq!(s.fold(&bad, 64, 3), Some("drifting"));
        assert_eq!(s.fold(&bad, 64, 3), None, "fires once per episode");
        assert_eq!(s.episode_missed_packets, 400);
        assert_eq!(s.fold(&good, 64, 3), Some("cleared"));
        assert_eq!(s.fold(&good, 64, 3), None);
        assert_eq!((s.missed_packets, s.polls, s.alerting), (500, 8, false));
    }
}
