//! Every map of the tunmeter programs, in one place. All are pinned by name under the daemon's
//! pin directory, so counts survive daemon restarts and both program instances (L2 and L3)
//! share them.

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, PerCpuArray, PerCpuHashMap},
};
use tunmeter_common::{
    ClientCounters, ClientKey, DEFAULT_MAX_CLIENTS, MAX_SUBNETS, OutcomeCounter, STATS_ENTRIES, SubnetKey, SubnetValue,
};

/// Bytes, packets and last-seen per client address (and the OTHER / OVERFLOW buckets).
/// Capacity is set by the daemon at load time.
#[map(name = "CLIENT_COUNTERS")]
pub static CLIENT_COUNTERS: PerCpuHashMap<ClientKey, ClientCounters> = PerCpuHashMap::pinned(DEFAULT_MAX_CLIENTS, 0);

/// VPN subnets per interface: an address inside one is a client on that interface.
#[map(name = "CLIENT_SUBNETS")]
pub static CLIENT_SUBNETS: LpmTrie<SubnetKey, SubnetValue> = LpmTrie::pinned(MAX_SUBNETS, 0);

/// Packets and bytes per (direction, outcome).
#[map(name = "OUTCOME_STATS")]
pub static OUTCOME_STATS: PerCpuArray<OutcomeCounter> = PerCpuArray::pinned(STATS_ENTRIES, 0);
