//! Every map of the tunmeter programs, in one place; layouts, names and sizes come from
//! `tunmeter_common`. All are pinned by name under the daemon's pin directory, so counts and rules
//! survive daemon restarts and both program instances (L2 and L3) share them.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, Queue},
};
use tunmeter_common::{
    AddrKey, BypassValue, ClientKey, ClientSlot, DEFAULT_MAX_CLIENTS, DeviceKey, FWD_DEVICE_PORT_WORDS,
    FWD_FLOW_ENTRIES, FWD_FRAG_ENTRIES, FlowIn, FlowInKey, FlowKey, FlowNat, FragKey, FragNat, FwdDevice, FwdKey,
    FwdRule, IFACE_ENTRIES, IfaceCounter, MAX_BYPASS, MAX_FWD_RULES, MAX_REDIRECT_SOURCES, MAX_RULES, MAX_SUBNETS,
    OutcomeCounter, RESERVED_SLOTS, RedirectRule, RuleCounters, STATS_ENTRIES, SteerEvent, SubnetKey, SubnetValue,
};

// ---- counting ----

/// Bytes, packets and last-seen per client slot (and the OTHER / OVERFLOW buckets at their
/// fixed slots), shared by every CPU and read by the daemon through an mmap. Capacity is set
/// by the daemon at load time.
#[map(name = "CLIENT_SLOTS")]
pub static CLIENT_SLOTS: Array<ClientSlot> = Array::pinned(DEFAULT_MAX_CLIENTS + RESERVED_SLOTS, BPF_F_MMAPABLE);

/// Client address -> its slot in `CLIENT_SLOTS`.
#[map(name = "CLIENT_INDEX")]
pub static CLIENT_INDEX: HashMap<ClientKey, u32> = HashMap::pinned(DEFAULT_MAX_CLIENTS, 0);

/// Slots no client owns, filled by the daemon; a new client takes one.
#[map(name = "CLIENT_FREE_SLOTS")]
pub static CLIENT_FREE_SLOTS: Queue<u32> = Queue::pinned(DEFAULT_MAX_CLIENTS, 0);

/// VPN subnets per interface: an address inside one is a client on that interface.
#[map(name = "CLIENT_SUBNETS")]
pub static CLIENT_SUBNETS: LpmTrie<SubnetKey, SubnetValue> = LpmTrie::pinned(MAX_SUBNETS, 0);

/// Packets and bytes per (direction, outcome), at `stats_index`.
#[map(name = "OUTCOME_STATS")]
pub static OUTCOME_STATS: PerCpuArray<OutcomeCounter> = PerCpuArray::pinned(STATS_ENTRIES, 0);

/// Every packet per (device slot, direction), at `iface_index`: the ledger's self-check.
#[map(name = "IFACE_STATS")]
pub static IFACE_STATS: PerCpuArray<IfaceCounter> = PerCpuArray::pinned(IFACE_ENTRIES, 0);

// ---- steering ----

/// Forward rules: (protocol, public port) -> device address and port.
#[map(name = "FWD_RULES")]
pub static FWD_RULES: HashMap<FwdKey, FwdRule> = HashMap::pinned(MAX_FWD_RULES, 0);

/// Every forward rule's (protocol, device address, device port): egress packets from these
/// without a flow are dropped.
#[map(name = "FWD_DEVICES")]
pub static FWD_DEVICES: HashMap<DeviceKey, FwdDevice> = HashMap::pinned(MAX_FWD_RULES, 0);

/// Bitmap of the device ports in `FWD_DEVICES`: the cheap test before that lookup.
#[map(name = "FWD_DEVICE_PORTS")]
pub static FWD_DEVICE_PORTS: Array<u64> = Array::pinned(FWD_DEVICE_PORT_WORDS, 0);

/// Bitmap of the public ports no forward rule uses: the ingress path skips `FWD_RULES` there.
#[map(name = "FWD_RULELESS_PORTS")]
pub static FWD_RULELESS_PORTS: Array<u64> = Array::pinned(FWD_DEVICE_PORT_WORDS, 0);

/// `FWD_NONE` while `FWD_RULES` is empty: the Ethernet ingress path skips forwarding.
#[map(name = "FWD_EMPTY")]
pub static FWD_EMPTY: Array<u32> = Array::pinned(1, 0);

/// Forwarded flows as the reply path sees them -> the public address and port to restore.
#[map(name = "FWD_FLOWS")]
pub static FWD_FLOWS: LruHashMap<FlowKey, FlowNat> = LruHashMap::pinned(FWD_FLOW_ENTRIES, 0);

/// Established forwarded TCP flows as the inbound path sees them -> the device (one lookup a
/// packet instead of the rule's and the flow's).
#[map(name = "FWD_INBOUND")]
pub static FWD_INBOUND: LruHashMap<FlowInKey, FlowIn> = LruHashMap::pinned(FWD_FLOW_ENTRIES, 0);

/// The generation of the forward rule in force at each rule id (a `FWD_INBOUND` entry of an
/// older generation is not used).
#[map(name = "FWD_RULE_GEN")]
pub static FWD_RULE_GEN: Array<u32> = Array::pinned(MAX_RULES, 0);

/// Fragmented datagrams whose first fragment was translated -> the address the rest get.
#[map(name = "FWD_FRAGS")]
pub static FWD_FRAGS: LruHashMap<FragKey, FragNat> = LruHashMap::pinned(FWD_FRAG_ENTRIES, 0);

/// Redirect rules by VPN client address or subnet.
#[map(name = "REDIRECT_SOURCES")]
pub static REDIRECT_SOURCES: LpmTrie<AddrKey, RedirectRule> = LpmTrie::pinned(MAX_REDIRECT_SOURCES, 0);

/// `REDIRECT_NONE` while `REDIRECT_SOURCES` is empty: the tun ingress path skips its lookup.
#[map(name = "REDIRECT_EMPTY")]
pub static REDIRECT_EMPTY: Array<u32> = Array::pinned(1, 0);

/// Destinations that are never redirected (this host's addresses and configured ones).
#[map(name = "REDIRECT_BYPASS")]
pub static REDIRECT_BYPASS: LpmTrie<AddrKey, BypassValue> = LpmTrie::pinned(MAX_BYPASS, 0);

/// Bytes and packets per rule id, both directions.
#[map(name = "RULE_COUNTERS")]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::pinned(MAX_RULES, 0);

/// Packets and bytes per steering event (translated, dropped and why, passed and why), at
/// `SteerEvent::index`.
#[map(name = "STEER_STATS")]
pub static STEER_STATS: PerCpuArray<OutcomeCounter> = PerCpuArray::pinned(SteerEvent::COUNT, 0);
