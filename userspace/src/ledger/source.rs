//! Where readings come from: the pinned kernel client slots (a trait, so tests can feed their
//! own readings), with the map's identity as the counter epoch; and the per-CPU map of earlier
//! versions, read once after an upgrade.

use std::{net::IpAddr, path::Path, sync::Mutex};

use tunmeter_common::ClientCounters;

use super::state::{Reading, Totals};
use crate::bpf::{
    clock::{Calibration, KernelClock},
    counters::{self, key_ip},
    loader::{LoadError, PinnedMaps},
    slots::SlotReader,
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
    /// Opened at the first read (the maps exist once the dataplane is up), then kept: it
    /// remembers which slot each client owns and frees released slots.
    reader: Mutex<Option<SlotReader>>,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into())
}

impl KernelSource {
    pub fn new(pin_dir: &Path) -> KernelSource {
        let clock = KernelClock::open(pin_dir).and_then(|k| k.calibrate().map(|c| (k, c.hz)));
        if let Err(e) = &clock {
            tracing::warn!(%e, "kernel clock unavailable: last-seen times will be missing");
        }
        KernelSource { maps: PinnedMaps::new(pin_dir), clock: clock.ok(), boot_id: boot_id(), reader: Mutex::new(None) }
    }

    fn calibration(&self) -> Option<Calibration> {
        self.clock.as_ref().and_then(|(k, hz)| k.recalibrate(*hz).ok())
    }

    fn with_reader<R>(&self, f: impl FnOnce(&mut SlotReader) -> Result<R, LoadError>) -> Result<R, LoadError> {
        let mut guard = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(SlotReader::open(&self.maps, true)?);
        }
        f(guard.as_mut().expect("opened above"))
    }
}

fn reading(ip: IpAddr, c: &ClientCounters, cal: Option<&Calibration>, slot: Option<u32>) -> Reading {
    Reading {
        ip,
        totals: Totals {
            up_bytes: c.up_bytes,
            up_packets: c.up_packets,
            down_bytes: c.down_bytes,
            down_packets: c.down_packets,
        },
        last_seen_ms: cal.and_then(|cal| cal.to_unix_ms(c.last_seen_jiffies)),
        slot,
    }
}

impl Source for KernelSource {
    fn epoch(&self) -> Result<String, LoadError> {
        // Map ids restart after a reboot: the boot id makes the epoch unique.
        Ok(format!("{}/{}", self.boot_id, self.maps.clients_epoch()?))
    }

    fn read_all(&self, f: &mut dyn FnMut(Reading)) -> Result<(), LoadError> {
        let cal = self.calibration();
        self.with_reader(|r| {
            r.for_each(|slot, k, c| {
                if !k.is_reserved() {
                    f(reading(key_ip(k), c, cal.as_ref(), Some(slot)));
                }
            })
        })
    }

    fn read_one(&self, ip: IpAddr) -> Result<Option<Reading>, LoadError> {
        let c = self.with_reader(|r| r.read_one(ip))?;
        Ok(c.map(|c| reading(ip, &c, self.calibration().as_ref(), None)))
    }

    fn admit(&self, ip: IpAddr) -> Result<(), LoadError> {
        self.maps.admit_client(ip).map(drop)
    }

    fn release(&self, ip: IpAddr) -> Result<(), LoadError> {
        self.maps.expire_if_unused(ip).map(drop)
    }
}

/// The per-CPU client map of versions before the shared slots, still pinned after an upgrade:
/// its epoch is the one that version used, so one more reading of it carries every count it
/// holds into the ledger exactly (the cursors continue), before the new map's epoch starts.
pub struct LegacySource {
    maps: PinnedMaps,
    boot_id: String,
}

impl LegacySource {
    /// The legacy map under `pin_dir`, if it is pinned there.
    pub fn find(pin_dir: &Path) -> Option<LegacySource> {
        let maps = PinnedMaps::new(pin_dir);
        maps.legacy_epoch().ok().map(|_| LegacySource { maps, boot_id: boot_id() })
    }

    /// Unpin it (its programs are gone: the new ones replaced them at attach).
    pub fn remove(&self) -> std::io::Result<()> {
        std::fs::remove_file(self.maps.dir.join(tunmeter_common::MAP_LEGACY_CLIENTS))
    }
}

impl Source for LegacySource {
    fn epoch(&self) -> Result<String, LoadError> {
        Ok(format!("{}/{}", self.boot_id, self.maps.legacy_epoch()?))
    }

    fn read_all(&self, f: &mut dyn FnMut(Reading)) -> Result<(), LoadError> {
        counters::for_each_legacy_sum(&self.maps, |k, c| {
            if !k.is_reserved() {
                f(reading(key_ip(k), c, None, None));
            }
        })
    }

    fn read_one(&self, _ip: IpAddr) -> Result<Option<Reading>, LoadError> {
        Ok(None)
    }
}
