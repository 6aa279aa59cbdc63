//! Reading the pinned counter maps into plain rows: per-client counters and the outcome
//! counters. Works with or without a running daemon.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{IterableMap as _, MapData, PerCpuArray};
use serde::Serialize;
use tracing::debug;
use tunmeter_common::{
    ClientCounters, ClientKey, Direction, IfaceCounter, MAP_LEGACY_CLIENTS, Outcome, OutcomeCounter, stats_index,
};

use super::{
    batch::{self, BatchError},
    clock::Calibration,
    loader::{LoadError, PinnedMaps},
    slots::SlotReader,
};
use crate::time::unix_ms;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    pub bytes: u64,
    pub packets: u64,
}

impl Count {
    pub fn saturating_sub(self, o: Count) -> Count {
        Count { bytes: self.bytes.saturating_sub(o.bytes), packets: self.packets.saturating_sub(o.packets) }
    }
}

/// One client, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientRow {
    pub ip: IpAddr,
    pub upload: Count,
    pub download: Count,
    /// Wall-clock time of the last packet, milliseconds since the Unix epoch.
    pub last_seen_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Bucket {
    pub upload: Count,
    pub download: Count,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClientsSnapshot {
    pub taken_unix_ms: u64,
    pub clients: Vec<ClientRow>,
    /// IP traffic whose client-side address is outside every configured subnet.
    pub other: Bucket,
    /// Client traffic that found the client map full.
    pub overflow: Bucket,
}

pub fn key_ip(k: &ClientKey) -> IpAddr {
    match k.as_v4() {
        Some(a) => IpAddr::V4(Ipv4Addr::from(a)),
        None => IpAddr::V6(Ipv6Addr::from(k.addr)),
    }
}

pub use super::loader::ip_key;

/// Sum one slot of the per-interface totals over CPUs.
pub fn sum_iface_cpus<'a>(values: impl IntoIterator<Item = &'a IfaceCounter>) -> IfaceCounter {
    values.into_iter().fold(IfaceCounter::default(), |acc, v| IfaceCounter {
        packets: acc.packets + v.packets,
        segments: acc.segments + v.segments,
        bytes: acc.bytes + v.bytes,
    })
}

/// Sum per-CPU values; last seen is the latest of any CPU.
pub fn sum_cpus<'a>(values: impl IntoIterator<Item = &'a ClientCounters>) -> ClientCounters {
    values.into_iter().fold(ClientCounters::default(), |mut acc, v| {
        acc.up_bytes += v.up_bytes;
        acc.up_packets += v.up_packets;
        acc.down_bytes += v.down_bytes;
        acc.down_packets += v.down_packets;
        acc.last_seen_jiffies = acc.last_seen_jiffies.max(v.last_seen_jiffies);
        acc
    })
}

/// Every client slot the index confirms, reserved buckets first, in slot order (a one-off
/// read: the daemon keeps its own [`SlotReader`]).
pub fn read_sums(maps: &PinnedMaps) -> Result<Vec<(ClientKey, ClientCounters)>, LoadError> {
    let mut sums = Vec::new();
    for_each_sum(maps, |k, c| sums.push((*k, *c)))?;
    Ok(sums)
}

/// `f(key, counters)` for every client (as `read_sums`, without collecting).
pub fn for_each_sum(maps: &PinnedMaps, mut f: impl FnMut(&ClientKey, &ClientCounters)) -> Result<(), LoadError> {
    SlotReader::open(maps, false)?.for_each(|_, k, c| f(k, c))
}

/// `f(key, sum over CPUs)` for every entry of the per-CPU client hash of earlier versions.
/// Reads in batches (BPF_MAP_LOOKUP_BATCH) and falls back to one lookup per entry on kernels
/// without it.
pub fn for_each_legacy_sum(maps: &PinnedMaps, mut f: impl FnMut(&ClientKey, &ClientCounters)) -> Result<(), LoadError> {
    let map = maps.legacy_clients()?;
    let ncpus = aya::util::nr_cpus().map_err(|(_, e)| LoadError::Cpus(e.to_string()))?.get() as usize;
    let chunk = batch::default_chunk::<ClientKey, ClientCounters>(ncpus);
    let mut seen = 0usize;
    let batched = batch::for_each_percpu(map.map(), chunk, |key, values: &[ClientCounters]| {
        seen += 1;
        f(&key, &sum_cpus(values));
    });
    match batched {
        Ok(_) => return Ok(()),
        // Nothing was passed on yet when the first call is refused.
        Err(BatchError::Unsupported(e)) if seen == 0 => debug!(error = %e, "no batch lookups; reading entry by entry"),
        Err(e) => return Err(LoadError::Map { name: MAP_LEGACY_CLIENTS, source: e.into() }),
    }
    for entry in map.iter() {
        // An entry removed between key and value reads is simply skipped.
        let Ok((key, values)) = entry else { continue };
        f(&key, &sum_cpus(values.iter()));
    }
    Ok(())
}

/// Read every client. `clock` converts last-seen stamps; without it they are left out.
pub fn read_clients(maps: &PinnedMaps, clock: Option<&Calibration>) -> Result<ClientsSnapshot, LoadError> {
    let sums = read_sums(maps)?;
    let now_ms = unix_ms();
    let mut snap = ClientsSnapshot {
        taken_unix_ms: now_ms,
        clients: Vec::with_capacity(sums.len()),
        other: Bucket::default(),
        overflow: Bucket::default(),
    };
    for (key, c) in sums {
        let upload = Count { bytes: c.up_bytes, packets: c.up_packets };
        let download = Count { bytes: c.down_bytes, packets: c.down_packets };
        if key == ClientKey::OTHER {
            snap.other = Bucket { upload, download };
        } else if key == ClientKey::OVERFLOW {
            snap.overflow = Bucket { upload, download };
        } else {
            snap.clients.push(ClientRow {
                ip: key_ip(&key),
                upload,
                download,
                last_seen_unix_ms: clock.and_then(|k| k.to_unix_ms(c.last_seen_jiffies)),
            });
        }
    }
    snap.clients.sort_by_key(|a| a.ip);
    Ok(snap)
}

#[derive(Debug, Clone, Serialize)]
pub struct OutcomeRow {
    pub direction: &'static str,
    pub outcome: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

pub fn read_stats(maps: &PinnedMaps) -> Result<Vec<OutcomeRow>, LoadError> {
    let data = maps.stats_data()?;
    let arr: PerCpuArray<MapData, OutcomeCounter> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
        .map_err(|source| LoadError::Map { name: tunmeter_common::MAP_STATS, source })?;
    let mut rows = Vec::new();
    for dir in Direction::ALL {
        for o in Outcome::ALL {
            let v = arr
                .get(&stats_index(dir, o), 0)
                .map_err(|source| LoadError::Map { name: tunmeter_common::MAP_STATS, source })?;
            let (packets, bytes) = v.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            rows.push(OutcomeRow { direction: dir.name(), outcome: o.name(), packets, bytes });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_cpu_values_sum_and_latest_last_seen() {
        let a = ClientCounters { up_bytes: 100, up_packets: 1, down_bytes: 0, down_packets: 0, last_seen_jiffies: 50 };
        let b = ClientCounters { up_bytes: 10, up_packets: 2, down_bytes: 7, down_packets: 1, last_seen_jiffies: 90 };
        let s = sum_cpus([&a, &b]);
        assert_eq!((s.up_bytes, s.up_packets, s.down_bytes, s.down_packets, s.last_seen_jiffies), (110, 3, 7, 1, 90));
    }

    #[test]
    fn keys_round_trip_to_ips() {
        for ip in ["10.8.0.2", "fd00:8::2", "::ffff:1.2.3.4", "0.0.0.0"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = key_ip(&ip_key(ip));
            // IPv4-mapped IPv6 input comes back as IPv4: one key per address.
            assert_eq!(back, ip.to_canonical());
        }
    }
}
