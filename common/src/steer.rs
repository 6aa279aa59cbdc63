//! Steering maps: forward rules (the DNAT of old) and redirect rules (the REDIRECT of old), the
//! flow and fragment tables that translate replies back, and the per-rule counters. Addresses
//! are in network byte order: a `u32` IPv4 address holds the packet's bytes in memory order.

// Forward rules are IPv4: a (protocol, public port) on an Ethernet (`--egress`) interface goes to
// a device's VPN address and port. Redirect rules match VPN client addresses (IPv4 and IPv6) on
// tun (`--tun`) interfaces and hand TCP/UDP to a local transparent proxy with `bpf_sk_assign`.
// An IPv4 address `u32` is `u32::from_ne_bytes(octets)`. The steering events are in `stats.rs`.

use core::mem::size_of;

use crate::headers::{IPPROTO_ICMP, IPPROTO_ICMPV6};

/// `HASH<FwdKey, FwdRule>`: forward rules by (protocol, public port).
pub const MAP_FWD_RULES: &str = "FWD_RULES";
/// `LRU_HASH<FlowKey, FlowNat>`: forwarded flows, written by the inbound path, read by the
/// reply path (replies and ICMP errors about the flow).
pub const MAP_FWD_FLOWS: &str = "FWD_FLOWS";
/// `LRU_HASH<FlowInKey, FlowIn>`: established forwarded TCP flows as the inbound path sees
/// them, so that their packets need one lookup (this one) instead of the rule's and the flow's.
/// Written by the inbound path from the rule; an entry counts only while its rule's generation
/// is current in [`MAP_FWD_RULE_GEN`].
pub const MAP_FWD_INBOUND: &str = "FWD_INBOUND";
/// `ARRAY<u32>` of [`MAX_RULES`]: the generation of the forward rule in force at each rule id.
/// Userspace moves it on before a rule of that id is added or changed (the new rule carries
/// the new value, [`FwdRule::generation`]) and after one is deleted, which ends every cached
/// inbound flow of the old rule.
pub const MAP_FWD_RULE_GEN: &str = "FWD_RULE_GEN";
/// `LRU_HASH<FragKey, FragNat>`: IPv4 datagrams whose first fragment was translated, so that
/// their later fragments (which carry no ports) get the same address.
pub const MAP_FWD_FRAGS: &str = "FWD_FRAGS";
/// `HASH<DeviceKey, FwdDevice>`: the (protocol, device address, device port) of every forward
/// rule, kept by userspace from [`MAP_FWD_RULES`]; the egress path drops packets from these that
/// have no flow.
pub const MAP_FWD_DEVICES: &str = "FWD_DEVICES";
/// `ARRAY<u64>` of [`FWD_DEVICE_PORT_WORDS`]: a bitmap of the device ports in
/// [`MAP_FWD_DEVICES`] (bit `port % 64` of word `port / 64`, host-order port), so that the
/// egress path looks up `FWD_DEVICES` only for packets from such a port.
pub const MAP_FWD_DEVICE_PORTS: &str = "FWD_DEVICE_PORTS";
/// `ARRAY<u64>` of [`FWD_DEVICE_PORT_WORDS`]: a bitmap of the public ports that no forward
/// rule uses, for either protocol (bit `port % 64` of word `port / 64`, host-order port), so
/// that the ingress path skips the [`MAP_FWD_RULES`] lookup for them. Kept by userspace: a bit
/// is cleared before a rule on its port is added and set after the port's last rule is removed.
/// A clear bit (a new map is all clear) only costs the lookup.
pub const MAP_FWD_RULELESS_PORTS: &str = "FWD_RULELESS_PORTS";
/// `ARRAY<u32>` of one entry: [`FWD_NONE`] while [`MAP_FWD_RULES`] holds no rule, so that the
/// Ethernet ingress path does not even parse a packet for forwarding; cleared before a rule is
/// added, set after the last one is removed. 0 (a new map) only costs the parse and the port's
/// hint.
pub const MAP_FWD_EMPTY: &str = "FWD_EMPTY";
/// The [`MAP_FWD_EMPTY`] value that says "no forward rule".
pub const FWD_NONE: u32 = 1;
/// `LPM_TRIE<LpmKey<AddrKey>, RedirectRule>`: redirect rules by client address or subnet.
pub const MAP_REDIRECT_SOURCES: &str = "REDIRECT_SOURCES";
/// `ARRAY<u32>` of one entry: [`REDIRECT_NONE`] while [`MAP_REDIRECT_SOURCES`] holds no rule,
/// so that the tun ingress path skips its lookup; cleared before a rule is added, set after the
/// last one is removed. 0 (a new map) only costs the lookup.
pub const MAP_REDIRECT_EMPTY: &str = "REDIRECT_EMPTY";
/// The [`MAP_REDIRECT_EMPTY`] value that says "no redirect rule".
pub const REDIRECT_NONE: u32 = 1;
/// `LPM_TRIE<LpmKey<AddrKey>, BypassValue>`: destinations never redirected.
pub const MAP_REDIRECT_BYPASS: &str = "REDIRECT_BYPASS";
/// `PERCPU_ARRAY<RuleCounters>` indexed by rule id.
pub const MAP_RULE_COUNTERS: &str = "RULE_COUNTERS";
/// `PERCPU_ARRAY<OutcomeCounter>` indexed by [`SteerEvent`](crate::SteerEvent).
pub const MAP_STEER_STATS: &str = "STEER_STATS";
/// Load-time global: the `skb->mark` put on redirected packets, for the policy route that
/// delivers them locally.
pub const GLOBAL_REDIRECT_MARK: &str = "REDIRECT_MARK";

/// Rule ids (forward and redirect share them): indexes of [`MAP_RULE_COUNTERS`].
pub const MAX_RULES: u32 = 65_536;
pub const MAX_FWD_RULES: u32 = MAX_RULES;
pub const MAX_REDIRECT_SOURCES: u32 = MAX_RULES;
pub const MAX_BYPASS: u32 = 4_096;
pub const FWD_FLOW_ENTRIES: u32 = 262_144;
pub const FWD_FRAG_ENTRIES: u32 = 8_192;
/// Words of the [`MAP_FWD_DEVICE_PORTS`] bitmap: one bit per port.
pub const FWD_DEVICE_PORT_WORDS: u32 = 65_536 / 64;

/// Rule flag: the rule comes from the config file (the daemon re-applies and prunes these at
/// start); without it the rule was added at run time (CLI or API) and stays until deleted.
pub const RULE_FROM_CONFIG: u32 = 1;
/// Redirect rule flag: `unparsed = "pass"`: packets the program cannot hand to the proxy
/// (fragments, IPv4 options, IPv6 extension headers, other protocols not allowed, cut-short
/// headers) are passed untouched. Without it (the default) they are dropped.
pub const REDIRECT_UNPARSED_PASS: u32 = 1 << 1;

/// Redirect rule flags: the protocols (other than TCP/UDP) a rule's `allow` list lets pass
/// untouched, by name, their IP protocol / IPv6 next-header numbers, and their flag bit.
pub const REDIRECT_ALLOW: [(&str, [u8; 2], u32); 7] = [
    ("icmp", [IPPROTO_ICMP, IPPROTO_ICMPV6], 1 << 8),
    ("gre", [47, 47], 1 << 9),
    ("esp", [50, 50], 1 << 10),
    ("ah", [51, 51], 1 << 11),
    ("sctp", [132, 132], 1 << 12),
    ("ipip", [4, 4], 1 << 13),
    ("ipv6", [41, 41], 1 << 14),
];

/// The `REDIRECT_ALLOW` flag bit of an IP protocol (0: none can allow it).
#[inline(always)]
pub const fn redirect_allow_bit(proto: u8) -> u32 {
    match proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => 1 << 8,
        47 => 1 << 9,
        50 => 1 << 10,
        51 => 1 << 11,
        132 => 1 << 12,
        4 => 1 << 13,
        41 => 1 << 14,
        _ => 0,
    }
}

/// Key of [`MAP_FWD_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FwdKey {
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub _pad: u8,
    pub port_be: u16,
}
const _: () = assert!(size_of::<FwdKey>() == 4);

/// Value of [`MAP_FWD_RULES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdRule {
    /// Only packets to this address are forwarded; 0 = any address the packet is sent to.
    pub public_addr: u32,
    pub device_addr: u32,
    pub device_port_be: u16,
    pub _pad: u16,
    pub rule_id: u32,
    /// `RULE_FROM_CONFIG` or 0.
    pub flags: u32,
    /// This rule's generation: [`MAP_FWD_RULE_GEN`] holds it at the rule's id while the rule is
    /// in force, so inbound flows cached from it ([`FlowIn::rule_gen`]) stay valid.
    pub generation: u32,
}
const _: () = assert!(size_of::<FwdRule>() == 24);

/// Key of [`MAP_FWD_DEVICES`]: where a forward rule sends its packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    pub device_addr: u32,
    pub device_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<DeviceKey>() == 8);

/// Value of [`MAP_FWD_DEVICES`]: the id of one rule that points there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdDevice {
    pub rule_id: u32,
}
const _: () = assert!(size_of::<FwdDevice>() == 4);

/// Key of [`MAP_FWD_FLOWS`]: a forwarded flow as the reply path sees it (from the device to the
/// customer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub device_addr: u32,
    pub customer_addr: u32,
    pub device_port_be: u16,
    pub customer_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowKey>() == 16);

/// Value of [`MAP_FWD_FLOWS`]: what the customer addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowNat {
    pub public_addr: u32,
    pub public_port_be: u16,
    pub _pad: u16,
    pub rule_id: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<FlowNat>() == 16);

/// Key of [`MAP_FWD_INBOUND`]: a forwarded TCP flow as the customer sends it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowInKey {
    pub customer_addr: u32,
    pub public_addr: u32,
    pub customer_port_be: u16,
    pub public_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FlowInKey>() == 16);

/// Value of [`MAP_FWD_INBOUND`]: where the flow goes, and the generation of the rule it was
/// taken from (valid while [`MAP_FWD_RULE_GEN`] still holds it at `rule_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowIn {
    pub device_addr: u32,
    pub device_port_be: u16,
    pub _pad: u16,
    pub rule_id: u32,
    pub rule_gen: u32,
}
const _: () = assert!(size_of::<FlowIn>() == 16);

/// Which way a fragment travels, in [`FragKey::dir`].
pub const FRAG_TO_DEVICE: u8 = 0;
pub const FRAG_FROM_DEVICE: u8 = 1;

/// Key of [`MAP_FWD_FRAGS`]: an IPv4 datagram before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: u32,
    pub dst: u32,
    pub id_be: u16,
    pub proto: u8,
    /// [`FRAG_TO_DEVICE`] (rewrite the destination) or [`FRAG_FROM_DEVICE`] (the source).
    pub dir: u8,
}
const _: () = assert!(size_of::<FragKey>() == 12);

/// Value of [`MAP_FWD_FRAGS`]: the address the datagram's fragments get.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragNat {
    pub addr: u32,
    pub rule_id: u32,
}
const _: () = assert!(size_of::<FragNat>() == 8);

/// LPM key data of the redirect maps: an address, IPv4 mapped as in `ClientKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrKey {
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<AddrKey>() == 16);

/// Bits of a full [`AddrKey`].
pub const ADDR_KEY_BITS: u32 = 128;

impl AddrKey {
    /// LPM prefix length of an IPv4 prefix `/len` (within the mapped address).
    pub const fn v4_prefix_len(len: u8) -> u32 {
        96 + len as u32
    }
    pub const fn v6_prefix_len(len: u8) -> u32 {
        len as u32
    }
}

/// Value of [`MAP_REDIRECT_SOURCES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectRule {
    /// The transparent proxy's port (TCP and UDP), on the wildcard address.
    pub proxy_port_be: u16,
    pub _pad: u16,
    pub rule_id: u32,
    /// `RULE_FROM_CONFIG`, `REDIRECT_UNPARSED_PASS` and the `REDIRECT_ALLOW` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<RedirectRule>() == 12);

/// Value of [`MAP_REDIRECT_BYPASS`]. Reserved for flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BypassValue {
    pub flags: u32,
}
const _: () = assert!(size_of::<BypassValue>() == 4);

/// Per-CPU counters of one rule, L3 bytes. For a forward rule "to target" is customer ->
/// device and "from target" device -> customer. A redirect rule counts what it steered to the
/// proxy in "to target"; the proxy's answers are ordinary download traffic of the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    pub to_target_bytes: u64,
    pub to_target_packets: u64,
    pub from_target_bytes: u64,
    pub from_target_packets: u64,
}
const _: () = assert!(size_of::<RuleCounters>() == 32);

impl RuleCounters {
    /// Field-wise sum: folds the per-CPU copies of one rule.
    pub const fn plus(self, o: RuleCounters) -> RuleCounters {
        RuleCounters {
            to_target_bytes: self.to_target_bytes + o.to_target_bytes,
            to_target_packets: self.to_target_packets + o.to_target_packets,
            from_target_bytes: self.from_target_bytes + o.from_target_bytes,
            from_target_packets: self.from_target_packets + o.from_target_packets,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], Copy, integers only, no implicit padding (size assertions above).
    unsafe impl aya::Pod for super::FwdKey {}
    // SAFETY: FwdRule is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FwdRule {}
    // SAFETY: DeviceKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::DeviceKey {}
    // SAFETY: FwdDevice is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FwdDevice {}
    // SAFETY: FlowKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: FlowNat is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FlowNat {}
    // SAFETY: FlowInKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FlowInKey {}
    // SAFETY: FlowIn is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FlowIn {}
    // SAFETY: FragKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: FragNat is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::FragNat {}
    // SAFETY: AddrKey is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::AddrKey {}
    // SAFETY: RedirectRule is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::RedirectRule {}
    // SAFETY: BypassValue is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::BypassValue {}
    // SAFETY: RuleCounters is #[repr(C)] integers without padding (size assertion above).
    unsafe impl aya::Pod for super::RuleCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_bits_match_the_table_and_leave_the_rule_flags_alone() {
        let mut all = 0;
        for (name, protos, bit) in REDIRECT_ALLOW {
            for p in protos {
                assert_eq!(redirect_allow_bit(p), bit, "{name}");
            }
            assert_eq!(bit.count_ones(), 1, "{name}");
            assert_eq!(all & bit, 0, "{name}: bit used twice");
            all |= bit;
        }
        assert_eq!(all & (RULE_FROM_CONFIG | REDIRECT_UNPARSED_PASS), 0);
        for p in [0u8, 6, 17, 43, 44, 59, 60, 135] {
            assert_eq!(redirect_allow_bit(p), 0, "protocol {p}");
        }
    }
}
