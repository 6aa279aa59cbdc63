//! Counting maps: their names, the per-client key and counters, the client subnets, and the
//! load-time global that places the IP header. The statistics arrays' indexes and names are in
//! `stats.rs`, the steering maps in `steer.rs`.

use core::mem::size_of;

/// Per-client counters: `ARRAY<ClientSlot>` with `BPF_F_MMAPABLE`, one slot per client that
/// every CPU adds to atomically; the daemon reads it through an mmap, without a syscall per
/// entry. Slots [`SLOT_OTHER`] and [`SLOT_OVERFLOW`] are the reserved buckets.
pub const MAP_CLIENTS: &str = "CLIENT_SLOTS";
/// Which slot each client address owns: `HASH<ClientKey, u32>`.
pub const MAP_CLIENT_INDEX: &str = "CLIENT_INDEX";
/// Slots no client owns: `QUEUE<u32>`, filled by the daemon, popped by the program for a new
/// client.
pub const MAP_FREE_SLOTS: &str = "CLIENT_FREE_SLOTS";
/// The per-CPU hash `PERCPU_HASH<ClientKey, ClientCounters>` of versions before the shared
/// slots: the daemon reads it once more after an upgrade to carry its counts over, then unpins it.
pub const MAP_LEGACY_CLIENTS: &str = "CLIENT_COUNTERS";
/// Slot of the OTHER bucket (see [`ClientKey::OTHER`]).
pub const SLOT_OTHER: u32 = 0;
/// Slot of the OVERFLOW bucket (see [`ClientKey::OVERFLOW`]).
pub const SLOT_OVERFLOW: u32 = 1;
/// Slots before the first client slot.
pub const RESERVED_SLOTS: u32 = 2;
/// Which addresses are clients, per interface: `LPM_TRIE<LpmKey<SubnetKey>, SubnetValue>`.
pub const MAP_SUBNETS: &str = "CLIENT_SUBNETS";
/// Outcome and reason counters: `PERCPU_ARRAY<OutcomeCounter>` indexed by
/// [`stats_index`](crate::stats_index).
pub const MAP_STATS: &str = "OUTCOME_STATS";
/// Load-time global: where the IP header starts (0 on tun/wg, 14 on Ethernet).
pub const GLOBAL_L3_OFFSET: &str = "L3_OFFSET";
/// Load-time global: 1 = charge GSO/GRO packets with their segments' wire bytes, 0 = `skb->len`.
pub const GLOBAL_WIRE_BYTES: &str = "WIRE_BYTES";

/// Default number of client slots (and of [`MAP_CLIENT_INDEX`] entries); [`MAP_CLIENTS`] has
/// [`RESERVED_SLOTS`] more.
pub const DEFAULT_MAX_CLIENTS: u32 = 65_536;
/// Capacity of [`MAP_SUBNETS`] (subnet entries over all interfaces).
pub const MAX_SUBNETS: u32 = 1_024;

/// A client address: IPv6, or IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
/// Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<ClientKey>() == 16);

impl ClientKey {
    /// The bucket for IP traffic whose client-side address is outside every configured subnet.
    pub const OTHER: ClientKey = ClientKey { addr: [0; 16] };
    /// The bucket for client traffic that could not get its own entry because the map was full.
    pub const OVERFLOW: ClientKey = ClientKey { addr: [0xff; 16] };

    /// Key for an IPv4 address given as its 4 network-order bytes.
    #[inline(always)]
    pub const fn v4(a: [u8; 4]) -> Self {
        ClientKey { addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]] }
    }

    #[inline(always)]
    pub const fn v6(addr: [u8; 16]) -> Self {
        ClientKey { addr }
    }

    /// Key from the IPv4 address as read from the packet into a native `u32` (its bytes are
    /// already in network order in memory). Built from words so the kernel program fills the
    /// key with four word stores instead of sixteen byte stores.
    #[inline(always)]
    pub const fn v4_word(a: u32) -> Self {
        Self::from_words([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), a])
    }

    /// Key from the IPv6 address read as two native `u64`s (memory order = network order).
    #[inline(always)]
    pub const fn v6_words(w: [u64; 2]) -> Self {
        // SAFETY: [u64; 2] and [u8; 16] have the same size; every bit pattern is valid.
        ClientKey { addr: unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(w) } }
    }

    #[inline(always)]
    const fn from_words(w: [u32; 4]) -> Self {
        // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
        ClientKey { addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) } }
    }

    /// The IPv4 address if this is an IPv4-mapped key.
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        if a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff { Some([a[12], a[13], a[14], a[15]]) } else { None }
    }

    /// True for the two reserved buckets. Compares words, not bytes: it runs per packet.
    #[inline(always)]
    pub fn is_reserved(&self) -> bool {
        // SAFETY: [u8; 16] and [u64; 2] have the same size; every bit pattern is valid.
        let w: [u64; 2] = unsafe { core::mem::transmute(self.addr) };
        (w[0] == 0 && w[1] == 0) || (w[0] == u64::MAX && w[1] == u64::MAX)
    }
}

/// One client's counters summed (the daemon's reading of a [`ClientSlot`]), and the per-CPU
/// value of [`MAP_LEGACY_CLIENTS`]. Bytes are L3 bytes (IP header and payload, no L2 header), so
/// figures agree between tun and Ethernet devices; a GSO packet counts its `skb->len`, or with
/// the `WIRE_BYTES` global its segments' wire bytes. Upload = packets from the client (ingress on
/// the client-facing device), download = packets to the client (egress).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientCounters {
    pub up_bytes: u64,
    pub up_packets: u64,
    pub down_bytes: u64,
    pub down_packets: u64,
    /// Kernel `jiffies` at the last packet seen on this CPU (0 = never). Converted to wall-clock
    /// time in userspace with the `tunmeter_clock` program.
    pub last_seen_jiffies: u64,
}
const _: () = assert!(size_of::<ClientCounters>() == 40);

/// One client's counters in [`MAP_CLIENTS`], shared by every CPU: the program adds with atomic
/// instructions, so a slot is one cache line of its own (no false sharing with a neighbour).
/// Counters only grow while `key` owns the slot. Bytes and packets as in [`ClientCounters`].
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientSlot {
    /// The owner, written before the index publishes the slot. All zero: free (or being
    /// taken); [`ClientKey::OVERFLOW`] outside the reserved slots: released, waiting out
    /// [`SLOT_RELEASE_GRACE_MS`] before it is zeroed and freed.
    pub key: ClientKey,
    pub up_bytes: u64,
    pub up_packets: u64,
    pub down_bytes: u64,
    pub down_packets: u64,
    /// Kernel `jiffies` at the last packet (0 = never).
    pub last_seen_jiffies: u64,
    /// Daemon bookkeeping, never touched by the program. In [`SLOT_OTHER`]: how many slots the
    /// daemon has put into [`MAP_FREE_SLOTS`] so far. In a released slot: when it was released
    /// (Unix ms).
    pub meta: u64,
}
const _: () = assert!(size_of::<ClientSlot>() == 64);

/// How long a released slot waits before it is reused: longer than any program run that may
/// still hold its number from an index lookup made before the release.
pub const SLOT_RELEASE_GRACE_MS: u64 = 1_000;

/// Key data of [`MAP_SUBNETS`]: interface index then address (IPv4 mapped as in [`ClientKey`]).
/// The LPM prefix length covers the 32 interface bits plus the address prefix, so a lookup
/// with `prefix_len = 160` matches the longest configured subnet of that interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubnetKey {
    /// Interface index in network byte order (LPM tries match bytes from the front).
    pub ifindex_be: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<SubnetKey>() == 20);

/// Bits of a full [`SubnetKey`]: the LPM lookup prefix length.
pub const SUBNET_KEY_BITS: u32 = 160;

impl SubnetKey {
    /// LPM prefix length of an IPv4 subnet `/len` (within the mapped address).
    pub const fn v4_prefix_len(len: u8) -> u32 {
        32 + 96 + len as u32
    }
    /// LPM prefix length of an IPv6 subnet `/len`.
    pub const fn v6_prefix_len(len: u8) -> u32 {
        32 + len as u32
    }
}

/// Value of [`MAP_SUBNETS`]: 1 = addresses in this subnet are clients. Reserved for flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubnetValue {
    pub flags: u32,
}
const _: () = assert!(size_of::<SubnetValue>() == 4);
pub const SUBNET_FLAG_CLIENTS: u32 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: ClientKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: ClientCounters is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::ClientCounters {}
    // SAFETY: ClientSlot is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::ClientSlot {}
    // SAFETY: SubnetKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::SubnetKey {}
    // SAFETY: SubnetValue is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::SubnetValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_keys_map_ipv4_into_ipv6() {
        let k = ClientKey::v4([10, 8, 0, 2]);
        assert_eq!(&k.addr[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(k.as_v4(), Some([10, 8, 0, 2]));
        let v6 = ClientKey::v6([0xfd, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(v6.as_v4(), None);
        assert!(ClientKey::OTHER.is_reserved() && ClientKey::OVERFLOW.is_reserved());
        assert!(!k.is_reserved());
        // The reserved keys can never collide with a real client address:
        // :: is unspecified and ff..ff is not a valid unicast source/destination.
        assert_ne!(ClientKey::v4([0, 0, 0, 0]), ClientKey::OTHER);
        // Word constructors give the same keys as the byte ones.
        assert_eq!(ClientKey::v4_word(u32::from_ne_bytes([10, 8, 0, 2])), k);
        let a6 = [0xfd, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let w = [u64::from_ne_bytes(a6[..8].try_into().unwrap()), u64::from_ne_bytes(a6[8..].try_into().unwrap())];
        assert_eq!(ClientKey::v6_words(w), ClientKey::v6(a6));
    }

    #[test]
    fn subnet_prefix_lengths() {
        assert_eq!(SubnetKey::v4_prefix_len(24), 152);
        assert_eq!(SubnetKey::v6_prefix_len(64), 96);
        assert_eq!(SubnetKey::v4_prefix_len(32), SUBNET_KEY_BITS);
        assert_eq!(SubnetKey::v6_prefix_len(128), SUBNET_KEY_BITS);
    }
}
