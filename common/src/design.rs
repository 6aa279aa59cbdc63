//! The counter layouts that the design prototypes (`ebpf/src/bin/design.rs`, loaded only by
//! `cargo xtask bench`) compare with today's per-CPU hash of [`ClientCounters`](crate::ClientCounters).

use core::mem::size_of;

/// Default capacity of the prototypes' maps; the benchmark sets its own at load time.
pub const DESIGN_DEFAULT_ENTRIES: u32 = 1;

/// One client's counters in the shared array: every CPU adds to it atomically, so it is one
/// cache line of its own (no false sharing with a neighbour slot).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DesignSlot {
    pub up_bytes: u64,
    pub up_packets: u64,
    pub down_bytes: u64,
    pub down_packets: u64,
    pub last_seen_jiffies: u64,
    /// The poll generation in which this slot was last listed as active.
    pub poll_gen: u64,
    pub _pad: [u64; 2],
}
const _: () = assert!(size_of::<DesignSlot>() == 64);

#[cfg(feature = "user")]
// SAFETY: DesignSlot is #[repr(C)] integers without padding (size assertion above).
unsafe impl aya::Pod for DesignSlot {}
