//! The scan: every slot below the fill mark read through the mapping and attributed to the
//! key stored in it once the index confirms that key owns it; the daemon's scan also frees
//! released slots after their grace and keeps the free queue topped up.

use std::net::IpAddr;

use aya::maps::{HashMap, MapData, MapError, Queue};
use tracing::debug;
use tunmeter_common::{
    ClientCounters, ClientKey, MAP_CLIENT_INDEX, MAP_FREE_SLOTS, RESERVED_SLOTS, SLOT_OTHER, SLOT_OVERFLOW,
    SLOT_RELEASE_GRACE_MS,
};

use super::{Slots, alloc, is_released, map_err};
use crate::bpf::loader::{LoadError, PinnedMaps, ip_key};

/// Reads every slot and attributes it: a slot counts for the key stored in it only once the
/// index confirms that key owns it (a slot being taken, or given back after a lost race, holds
/// a key the index does not point at). Confirmed owners are remembered, so a steady-state
/// scan makes no syscall. Kept for the daemon's life; a fresh one for one-off reads.
pub struct SlotReader {
    slots: Slots,
    index: HashMap<MapData, ClientKey, u32>,
    /// The daemon's reader only: frees released slots and tops the queue up.
    free: Option<Queue<MapData, u32>>,
    owners: Vec<ClientKey>,
}

impl SlotReader {
    /// `manage`: also zero and free released slots whose grace has passed, and keep the free
    /// queue topped up (the daemon only: one process must own that, and it clears its
    /// remembered owner at the same time).
    pub fn open(maps: &PinnedMaps, manage: bool) -> Result<SlotReader, LoadError> {
        let slots = maps.slots()?;
        let free = if manage { Some(maps.free_slots()?) } else { None };
        Ok(SlotReader { slots, index: maps.index()?, free, owners: Vec::new() })
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// `f(slot, key, counters)` for the reserved buckets, then every owned slot in slot order
    /// (a chunk of slots mapped at a time: `Slots::scan`).
    pub fn for_each(&mut self, mut f: impl FnMut(u32, &ClientKey, &ClientCounters)) -> Result<(), LoadError> {
        let mark = self.slots.fill_mark();
        let owners = &mut self.owners;
        if owners.len() < mark as usize {
            owners.resize(mark as usize, ClientKey::OTHER);
        }
        f(SLOT_OTHER, &ClientKey::OTHER, &self.slots.counters(SLOT_OTHER));
        f(SLOT_OVERFLOW, &ClientKey::OVERFLOW, &self.slots.counters(SLOT_OVERFLOW));
        let now = crate::time::unix_ms();
        let (mut free, mut in_use) = (0u32, 0u32);
        let (index, mut queue) = (&self.index, self.free.as_mut());
        self.slots.scan(RESERVED_SLOTS, mark, |slots, slot| {
            let key = slots.key(slot);
            if key == ClientKey::OTHER {
                owners[slot as usize] = key;
                free += 1;
                return Ok(());
            }
            in_use += 1;
            if is_released(slot, &key) {
                owners[slot as usize] = ClientKey::OTHER;
                if let Some(queue) = queue.as_deref_mut()
                    && recycle(slots, queue, slot, now)?
                {
                    (free, in_use) = (free + 1, in_use - 1);
                }
                return Ok(());
            }
            if owners[slot as usize] != key {
                match index.get(&key, 0) {
                    Ok(s) if s == slot => owners[slot as usize] = key,
                    Ok(_) | Err(MapError::KeyNotFound) => return Ok(()),
                    Err(e) => return Err(map_err(MAP_CLIENT_INDEX)(e)),
                }
            }
            f(slot, &key, &slots.counters(slot));
            Ok(())
        })?;
        if let Some(queue) = queue {
            alloc::top_up(&self.slots, queue, free, in_use)?;
        }
        Ok(())
    }

    /// One client's counters, if it owns a slot.
    pub fn read_one(&self, ip: IpAddr) -> Result<Option<ClientCounters>, LoadError> {
        let key = ip_key(ip);
        let Some(slot) = self.slot_of(ip)? else { return Ok(None) };
        if slot >= self.slots.entries() {
            return Ok(None);
        }
        self.slots.map_slot(slot)?;
        Ok((self.slots.key(slot) == key).then(|| self.slots.counters(slot)))
    }

    /// The slot `ip` owns.
    pub fn slot_of(&self, ip: IpAddr) -> Result<Option<u32>, LoadError> {
        match self.index.get(&ip_key(ip), 0) {
            Ok(slot) => Ok(Some(slot)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_CLIENT_INDEX)(e)),
        }
    }
}

/// Zero and free a released slot whose grace has passed; true if freed.
fn recycle(slots: &Slots, free: &mut Queue<MapData, u32>, slot: u32, now: u64) -> Result<bool, LoadError> {
    if now.saturating_sub(slots.meta(slot)) < SLOT_RELEASE_GRACE_MS {
        return Ok(false);
    }
    slots.clear(slot);
    free.push(&slot, 0).map_err(map_err(MAP_FREE_SLOTS))?;
    debug!(slot, "released slot freed");
    Ok(true)
}
