//! Batched reads (BPF_MAP_LOOKUP_BATCH) of a per-CPU client map as earlier versions pinned it
//! (what an upgrade reads once), against aya's element-by-element reads: the same entries and
//! the same per-CPU values, whatever the chunk size.

use crate::support;

use std::collections::BTreeMap;

use aya::{
    maps::{IterableMap as _, MapError},
    util::nr_cpus,
};
use support::{Harness, require_root};
use tunmeter::{
    bpf::{
        batch::{self, BatchError},
        counters::{for_each_legacy_sum, sum_cpus},
    },
    types::Layer,
};
use tunmeter_common::{ClientCounters, ClientKey};

/// A harness whose pin directory also holds a legacy per-CPU client map with the two reserved
/// buckets and `n` clients, each with values that differ per client and per CPU.
fn filled(n: u32) -> (Harness, aya::Ebpf) {
    let h = Harness::new(Layer::L3, 1024, &[]);
    let ncpus = nr_cpus().unwrap().get() as u64;
    let mut entries: Vec<(ClientKey, Vec<ClientCounters>)> = [ClientKey::OTHER, ClientKey::OVERFLOW]
        .into_iter()
        .map(|k| (k, vec![ClientCounters::default(); ncpus as usize]))
        .collect();
    for i in 0..n {
        let i = u64::from(i);
        let values: Vec<ClientCounters> = (0..ncpus)
            .map(|cpu| ClientCounters {
                up_bytes: i * 1000 + cpu,
                up_packets: i + cpu * 7,
                down_bytes: (i << 20) | cpu,
                down_packets: cpu,
                // Not the last CPU's value everywhere, so the max is tested.
                last_seen_jiffies: 1_000_000 + (i + cpu * 3) % 5,
            })
            .collect();
        entries.push((key(i as u32), values));
    }
    // Buckets = capacity rounded up to a power of two: with at most about one bucket per
    // entry, some bucket surely holds two (what the chunk-size test relies on).
    let capacity = (n + 2).next_power_of_two().max(1024);
    let legacy = support::legacy_map(h.pins.path(), capacity, &entries);
    (h, legacy)
}

/// Half IPv4, half IPv6 clients.
fn key(i: u32) -> ClientKey {
    let b = i.to_be_bytes();
    if i.is_multiple_of(2) {
        ClientKey::v4([10, b[1], b[2], b[3]])
    } else {
        ClientKey::v6([0xfd, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, b[0], b[1], b[2], b[3]])
    }
}

/// Every entry with its per-CPU values, read element by element with aya.
fn aya_entries(h: &Harness) -> BTreeMap<ClientKey, Vec<ClientCounters>> {
    h.maps.legacy_clients().unwrap().iter().map(|e| e.map(|(k, v)| (k, v.to_vec())).unwrap()).collect()
}

#[test]
fn legacy_sums_equal_element_by_element_reads() {
    if !require_root() {
        return;
    }
    for n in [0, 1, 1000, 70_000] {
        let (h, _legacy) = filled(n);
        let want: Vec<(ClientKey, ClientCounters)> =
            aya_entries(&h).iter().map(|(k, v)| (*k, sum_cpus(v.iter()))).collect();
        assert_eq!(want.len(), n as usize + 2, "clients plus the two reserved buckets");
        let mut got = Vec::new();
        for_each_legacy_sum(&h.maps, |k, c| got.push((*k, *c))).unwrap();
        got.sort_by_key(|(k, _)| *k);
        assert!(got == want, "the legacy read differs from aya's reads with {n} clients");
    }
}

#[test]
fn per_cpu_values_match_for_every_chunk_size() {
    if !require_root() {
        return;
    }
    for n in [1000, 70_000] {
        let (h, _legacy) = filled(n);
        let want = aya_entries(&h);
        let map = h.maps.legacy_clients().unwrap();
        // 1 is smaller than most buckets (ENOSPC, then growth); the others end batches at
        // arbitrary places, and the last is larger than the map.
        for chunk in [1, 3, 64, 1000, 4096, 1 << 20] {
            let mut got = BTreeMap::new();
            let stats = batch::for_each_percpu(map.map(), chunk, |k: ClientKey, v: &[ClientCounters]| {
                assert!(got.insert(k, v.to_vec()).is_none(), "{k:?} seen twice");
            })
            .unwrap();
            assert_eq!(stats.entries, want.len(), "n={n} chunk={chunk}");
            assert!(got == want, "per-CPU values differ with n={n} chunk={chunk}");
            if chunk == 1 {
                assert!(stats.chunk > 1, "some bucket holds two entries: chunk grows on ENOSPC");
            }
        }
    }
}

#[test]
fn maps_of_another_layout_are_refused() {
    if !require_root() {
        return;
    }
    let (h, _legacy) = filled(3);
    let clients = h.maps.legacy_clients().unwrap();
    let r = batch::for_each_percpu::<u32, ClientCounters>(clients.map(), 64, |_, _| {});
    assert!(matches!(r, Err(BatchError::Map(MapError::InvalidKeySize { size: 4, expected: 16 }))), "{r:?}");
    let r = batch::for_each_percpu::<ClientKey, [u64; 4]>(clients.map(), 64, |_, _| {});
    assert!(matches!(r, Err(BatchError::Map(MapError::InvalidValueSize { size: 32, expected: 40 }))), "{r:?}");
    // OUTCOME_STATS is a per-CPU array, not a hash.
    let stats = h.maps.stats_data().unwrap();
    let r = batch::for_each_percpu::<u32, [u64; 2]>(&stats, 64, |_, _| {});
    assert!(matches!(r, Err(BatchError::Map(MapError::InvalidMapType { .. }))), "{r:?}");
}

#[test]
fn an_empty_map_reads_as_empty() {
    if !require_root() {
        return;
    }
    let (h, _legacy) = filled(0);
    let mut map = h.maps.legacy_clients().unwrap();
    for k in [ClientKey::OTHER, ClientKey::OVERFLOW] {
        map.remove(&k).unwrap();
    }
    let stats = batch::for_each_percpu(map.map(), 64, |_: ClientKey, _: &[ClientCounters]| panic!("no entry")).unwrap();
    assert_eq!((stats.entries, stats.syscalls), (0, 1), "one call that ends with ENOENT");
    for_each_legacy_sum(&h.maps, |k, _| panic!("no entry, got {k:?}")).unwrap();
}
