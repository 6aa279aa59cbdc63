//! What the statistics arrays count, defined once: the direction and outcome of every counted
//! packet (`OUTCOME_STATS`) and the steering events (`STEER_STATS`). Each enum, its count (the
//! array size), its variants in index order and its stable snake_case names (CLI, JSON, metrics
//! labels) come from one `indexed_enum!` list, so the kernel and userspace cannot drift.

use core::mem::size_of;

/// Defines a `#[repr(u32)]` enum whose discriminants are the slots of a per-CPU array, and from
/// the same list: `COUNT` (the array's size), `ALL` (every variant, in index order), `NAMES` and
/// `name()` (the stable snake_case names), `from_name()` and `index()`. A compile-time check
/// makes the discriminants 0, 1, 2, ... in the order listed, so `ALL[i]`, `NAMES[i]` and slot `i`
/// are the same thing. The discriminants are written out because they are the pinned maps'
/// layout: append new variants, never reorder.
macro_rules! indexed_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $index:literal => $text:literal,
            )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $(
                $(#[$vmeta])*
                $variant = $index,
            )+
        }

        impl $name {
            /// Number of variants: the number of slots of the array they index.
            pub const COUNT: u32 = [$($index),+].len() as u32;
            /// Every variant, in index order.
            pub const ALL: [$name; Self::COUNT as usize] = [$($name::$variant),+];
            /// Stable snake_case names, in index order.
            pub const NAMES: [&'static str; Self::COUNT as usize] = [$($text),+];

            /// The variant's slot in its array.
            #[inline(always)]
            pub const fn index(self) -> u32 {
                self as u32
            }

            /// Stable snake_case name used in CLI, JSON and metrics output.
            pub const fn name(self) -> &'static str {
                Self::NAMES[self as usize]
            }

            /// The variant of a stable name.
            pub fn from_name(name: &str) -> Option<Self> {
                Self::ALL.into_iter().find(|v| v.name() == name)
            }
        }

        const _: () = {
            let mut i = 0;
            while i < $name::ALL.len() {
                assert!(
                    $name::ALL[i] as usize == i,
                    concat!(stringify!($name), ": discriminants must be 0, 1, 2, ... in the order listed")
                );
                i += 1;
            }
        };
    };
}

indexed_enum! {
    /// Direction of a packet on the client-facing device.
    pub enum Direction {
        /// TC ingress: from the client, counted as upload, keyed by source address.
        Upload = 0 => "upload",
        /// TC egress: to the client, counted as download, keyed by destination address.
        Download = 1 => "download",
    }
}

indexed_enum! {
    /// What happened to a packet. Every packet seen gets exactly one outcome per direction.
    pub enum Outcome {
        /// Counted to a client's own entry.
        Client = 0 => "client",
        /// IP packet whose client-side address is outside every subnet of its interface:
        /// counted to the [`ClientKey::OTHER`](crate::ClientKey::OTHER) bucket.
        OutsideSubnets = 1 => "outside_subnets",
        /// Not IPv4/IPv6 (ARP, LLDP, ...): passed, counted here only.
        NotIp = 2 => "not_ip",
        /// Shorter than its fixed IP header: passed, counted here only.
        Truncated = 3 => "truncated",
        /// IP version field disagrees with the EtherType, or IPv4 IHL < 5: passed, counted here only.
        Malformed = 4 => "malformed",
        /// A new client could not be inserted (map full): counted to
        /// [`ClientKey::OVERFLOW`](crate::ClientKey::OVERFLOW).
        MapFull = 5 => "map_full",
        /// A map update failed for another reason (should never happen): passed, counted here only.
        MapError = 6 => "map_error",
        /// Download to an address inside a client subnet that has no entry: not a client until
        /// it uploads or the daemon admits it, so it gets no entry (anyone could fill the map
        /// and the ledger with packets to random addresses). Counted to the
        /// [`ClientKey::OTHER`](crate::ClientKey::OTHER) bucket.
        UnknownClient = 7 => "unknown_client",
    }
}

indexed_enum! {
    /// What the steering code did with a packet, counted in
    /// [`MAP_STEER_STATS`](crate::MAP_STEER_STATS) (packets and L3 bytes). Packets steering has
    /// nothing to do with are not counted here.
    pub enum SteerEvent {
        /// Customer -> device: translated to the device's address and port.
        Forwarded = 0 => "forwarded",
        /// Device -> customer: translated back to the public address and port.
        ReplyTranslated = 1 => "reply_translated",
        /// An ICMP error about a forwarded flow, translated (either way).
        IcmpTranslated = 2 => "icmp_translated",
        /// A later fragment of a translated datagram, translated.
        FragmentTranslated = 3 => "fragment_translated",
        /// A later fragment of a datagram whose first fragment was not seen: passed untouched.
        FragmentUnknown = 4 => "fragment_unknown",
        /// The flow table refused a new flow: dropped (its replies could not be translated).
        FlowTableError = 5 => "flow_table_error",
        /// A rewrite failed halfway: dropped, never sent half-translated.
        RewriteFailed = 6 => "rewrite_failed",
        /// Handed to the transparent proxy.
        Redirected = 7 => "redirected",
        /// From a redirected client, to a bypassed destination: passed.
        Bypassed = 8 => "bypassed",
        /// From a redirected client, but the proxy has no socket: dropped.
        ProxyMissing = 9 => "proxy_missing",
        /// From a redirected client, TCP/UDP whose header is cut short: dropped, or passed with
        /// `unparsed = "pass"`.
        NotRedirectable = 10 => "not_redirectable",
        /// `bpf_sk_assign` failed: dropped.
        AssignFailed = 11 => "assign_failed",
        /// A TCP segment to a forwarded port that may not start a flow (not a SYN without ACK)
        /// and has none: dropped, no flow created.
        FlowlessSegment = 12 => "flowless_segment",
        /// Egress, from a forward rule's device address and port, but no flow: dropped (it
        /// would leak the device's VPN address).
        DeviceWithoutFlow = 13 => "device_without_flow",
        /// From a redirected client, an IPv4 fragment: dropped, or passed with `unparsed = "pass"`.
        RedirectFragment = 14 => "redirect_fragment",
        /// From a redirected client, IPv4 with options: dropped, or passed with `unparsed = "pass"`.
        RedirectIpOptions = 15 => "redirect_ip_options",
        /// From a redirected client, IPv6 with an extension header before the transport header:
        /// dropped, or passed with `unparsed = "pass"`.
        RedirectExtHeader = 16 => "redirect_ext_header",
        /// From a redirected client, a protocol other than TCP/UDP not in the rule's `allow`
        /// list: dropped, or passed with `unparsed = "pass"`.
        RedirectOtherProto = 17 => "redirect_other_proto",
        /// From a redirected client, a protocol in the rule's `allow` list (e.g. ICMP): passed.
        RedirectAllowed = 18 => "redirect_allowed",
    }
}

/// Slots of [`MAP_STATS`](crate::MAP_STATS): one per (direction, outcome).
pub const STATS_ENTRIES: u32 = Direction::COUNT * Outcome::COUNT;

/// Index of an (direction, outcome) pair in [`MAP_STATS`](crate::MAP_STATS).
#[inline(always)]
pub const fn stats_index(dir: Direction, outcome: Outcome) -> u32 {
    dir.index() * Outcome::COUNT + outcome.index()
}

/// Per-CPU packets and L3 bytes of one outcome or steering event: the value of both statistics
/// arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<OutcomeCounter>() == 16);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], Copy, integers only, no padding (size assertion above).
unsafe impl aya::Pod for OutcomeCounter {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_indexes_are_dense_and_distinct() {
        let mut seen = [false; STATS_ENTRIES as usize];
        for dir in Direction::ALL {
            for o in Outcome::ALL {
                let i = stats_index(dir, o);
                assert!(i < STATS_ENTRIES);
                assert!(!seen[i as usize]);
                seen[i as usize] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn names_are_distinct_and_round_trip() {
        fn check<T: Copy + PartialEq + core::fmt::Debug>(
            all: &[T],
            name: fn(T) -> &'static str,
            from: fn(&str) -> Option<T>,
        ) {
            for (i, a) in all.iter().enumerate() {
                assert_eq!(from(name(*a)), Some(*a));
                assert!(name(*a).bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", name(*a));
                for b in &all[i + 1..] {
                    assert_ne!(name(*a), name(*b));
                }
            }
            assert_eq!(from("no_such_name"), None);
        }
        check(&Direction::ALL, Direction::name, Direction::from_name);
        check(&Outcome::ALL, Outcome::name, Outcome::from_name);
        check(&SteerEvent::ALL, SteerEvent::name, SteerEvent::from_name);
    }

    /// The names are an interface (`tunmeter stats`, `/api/v1/stats`, metrics labels, `steer
    /// list`; docs/cli-json.md and docs/steering.md) and the indexes are the pinned maps' layout:
    /// a change here must be deliberate.
    #[test]
    fn names_and_sizes_are_the_documented_ones() {
        assert_eq!(Direction::NAMES, ["upload", "download"]);
        assert_eq!(
            Outcome::NAMES,
            [
                "client",
                "outside_subnets",
                "not_ip",
                "truncated",
                "malformed",
                "map_full",
                "map_error",
                "unknown_client"
            ]
        );
        assert_eq!(
            SteerEvent::NAMES,
            [
                "forwarded",
                "reply_translated",
                "icmp_translated",
                "fragment_translated",
                "fragment_unknown",
                "flow_table_error",
                "rewrite_failed",
                "redirected",
                "bypassed",
                "proxy_missing",
                "not_redirectable",
                "assign_failed",
                "flowless_segment",
                "device_without_flow",
                "redirect_fragment",
                "redirect_ip_options",
                "redirect_ext_header",
                "redirect_other_proto",
                "redirect_allowed",
            ]
        );
        assert_eq!((STATS_ENTRIES, SteerEvent::COUNT), (16, 19));
        assert_eq!(stats_index(Direction::Download, Outcome::Client), 8);
    }
}
