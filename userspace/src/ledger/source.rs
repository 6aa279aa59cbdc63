//! Where readings come from: the pinned kernel client map (a trait, so tests can feed their
//! own readings), with the map's identity as the counter epoch.

use std::{net::IpAddr, path::Path};

use tunmeter_common::ClientCounters;

use super::state::{Reading, Totals};
use crate::bpf::{
    clock::{Calibration, KernelClock},
    counters::{self, ip_key, key_ip},
    loader::{LoadError, PinnedMaps},
};

/// A source of per-client counter readings.
pub trait Source: Send + Sync + 'static {
    /// Identity of the counter map: changes when the kernel map is new (its counts restart).
    fn epoch(&self) -> Result<String, LoadError>;
    /// Every client entry, each passed to `f` as it is read.
    fn read_all(&self, f: &mut dyn FnMut(Reading)) -> Result<(), LoadError>;
    /// One client's entry, now.
    fn read_one(&self, ip: IpAddr) -> Result<Option<Reading>, LoadError>;
    /// Create `ip`'s (zeroed) entry now that it is admitted, so downloads to it count as its
    /// own before it sends anything. Sources without such entries do nothing.
    fn admit(&self, _ip: IpAddr) -> Result<(), LoadError> {
        Ok(())
    }
    /// Remove `ip`'s entry if it never counted a byte (its session ended silent).
    fn release(&self, _ip: IpAddr) -> Result<(), LoadError> {
        Ok(())
    }
}

/// The pinned kernel maps of a running dataplane.
pub struct KernelSource {
    maps: PinnedMaps,
    clock: Option<(KernelClock, u32)>,
    boot_id: String,
}

impl KernelSource {
    pub fn new(pin_dir: &Path) -> KernelSource {
        let clock = KernelClock::open(pin_dir).and_then(|k| k.calibrate().map(|c| (k, c.hz)));
        if let Err(e) = &clock {
            tracing::warn!(%e, "kernel clock unavailable: last-seen times will be missing");
        }
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown-boot".into());
        KernelSource { maps: PinnedMaps::new(pin_dir), clock: clock.ok(), boot_id }
    }

    fn calibration(&self) -> Option<Calibration> {
        self.clock.as_ref().and_then(|(k, hz)| k.recalibrate(*hz).ok())
    }
}

fn reading(ip: IpAddr, c: &ClientCounters, cal: Option<&Calibration>) -> Reading {
    Reading {
        ip,
        totals: Totals {
            up_bytes: c.up_bytes,
            up_packets: c.up_packets,
            down_bytes: c.down_bytes,
            down_packets: c.down_packets,
        },
        last_seen_ms: cal.and_then(|cal| cal.to_unix_ms(c.last_seen_jiffies)),
    }
}

impl Source for KernelSource {
    fn epoch(&self) -> Result<String, LoadError> {
        // Map ids restart after a reboot: the boot id makes the epoch unique.
        Ok(format!("{}/{}", self.boot_id, self.maps.clients_epoch()?))
    }

    fn read_all(&self, f: &mut dyn FnMut(Reading)) -> Result<(), LoadError> {
        let cal = self.calibration();
        counters::for_each_sum(&self.maps, |k, c| {
            if !k.is_reserved() {
                f(reading(key_ip(k), c, cal.as_ref()));
            }
        })
    }

    fn read_one(&self, ip: IpAddr) -> Result<Option<Reading>, LoadError> {
        let map = self.maps.clients()?;
        match map.get(&ip_key(ip), 0) {
            Ok(v) => Ok(Some(reading(ip, &counters::sum_cpus(v.iter()), self.calibration().as_ref()))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(LoadError::Map { name: tunmeter_common::MAP_CLIENTS, source }),
        }
    }

    fn admit(&self, ip: IpAddr) -> Result<(), LoadError> {
        self.maps.admit_client(ip).map(drop)
    }

    fn release(&self, ip: IpAddr) -> Result<(), LoadError> {
        self.maps.expire_if_unused(ip).map(drop)
    }
}
