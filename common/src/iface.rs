//! Per-interface totals for the ledger's self-check: every packet a program sees, per device and
//! direction, in `IFACE_STATS`. The daemon holds them against the device's own counters
//! (IFLA_STATS64); a difference means packets went past the programs.

use core::mem::size_of;

use crate::Direction;

/// Per-interface totals: `PERCPU_ARRAY<IfaceCounter>` indexed by [`iface_index`].
pub const MAP_IFACE_STATS: &str = "IFACE_STATS";

/// Interface slots of [`MAP_IFACE_STATS`]: a device's slot is its ifindex modulo this. The
/// daemon reports two attached devices that share a slot as unchecked.
pub const IFACE_SLOTS: u32 = 1_024;
const _: () = assert!(IFACE_SLOTS.is_power_of_two());

/// Entries of [`MAP_IFACE_STATS`]: one per (slot, direction).
pub const IFACE_ENTRIES: u32 = IFACE_SLOTS * Direction::COUNT;

/// Slot of a device's ifindex.
#[inline(always)]
pub const fn iface_slot(ifindex: u32) -> u32 {
    ifindex & (IFACE_SLOTS - 1)
}

/// Index of (device, direction) in [`MAP_IFACE_STATS`].
#[inline(always)]
pub const fn iface_index(ifindex: u32, dir: Direction) -> u32 {
    iface_slot(ifindex) * Direction::COUNT + dir.index()
}

/// Per-CPU totals of one device and direction: every packet the program ran on, whatever its
/// outcome.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceCounter {
    /// Packets (socket buffers) the program ran on.
    pub packets: u64,
    /// The same packets counted as the segments they become on the wire (`gso_segs`, at least
    /// 1): a device that segments after TC counts this many.
    pub segments: u64,
    /// L3 bytes, as every outcome counts them (`skb->len` minus the L2 header).
    pub bytes: u64,
}
const _: () = assert!(size_of::<IfaceCounter>() == 24);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], Copy, integers only, no padding (size assertion above).
unsafe impl aya::Pod for IfaceCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_stay_in_the_array() {
        for ifindex in [0, 1, 2, 1_023, 1_024, 1_025, u32::MAX] {
            for dir in Direction::ALL {
                assert!(iface_index(ifindex, dir) < IFACE_ENTRIES);
            }
        }
        assert_eq!(iface_slot(1_025), 1);
        assert_ne!(iface_index(7, Direction::Upload), iface_index(7, Direction::Download));
    }
}
