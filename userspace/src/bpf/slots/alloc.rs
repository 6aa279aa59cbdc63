//! Handing out slots: the free queue kept topped up with fresh slots above the fill mark, and
//! slots taken from userspace (admitted addresses) the way the program takes them.

use std::sync::atomic::Ordering;

use aya::maps::{HashMap, MapData, MapError, Queue};
use tracing::debug;
use tunmeter_common::{ClientKey, MAP_CLIENT_INDEX, MAP_FREE_SLOTS, SLOT_OTHER};

use super::{Slots, W_META, map_err};
use crate::bpf::loader::{LoadError, PinnedMaps};

/// `BPF_NOEXIST` map update flag: create only.
const BPF_NOEXIST: u64 = 1;
/// Free slots the daemon keeps in the queue at least (or a quarter of the slots in use, if
/// more): the new clients the program can give a slot to between two polls. A new client
/// finding the queue empty counts into OVERFLOW until the next poll tops it up; an admitted
/// one never does (admission pushes a fresh slot itself).
pub const MIN_FREE_SLOTS: u32 = 4096;

/// Push the next fresh slot (the fill mark advances first: a crash in between leaks one slot,
/// it never hands one out twice). None when every slot has been handed out.
fn push_fresh(slots: &Slots, queue: &mut Queue<MapData, u32>) -> Result<Option<u32>, LoadError> {
    let next = slots.word(SLOT_OTHER, W_META).fetch_add(1, Ordering::AcqRel);
    if next >= u64::from(slots.entries()) {
        return Ok(None);
    }
    let slot = next as u32;
    queue.push(&slot, 0).map_err(map_err(MAP_FREE_SLOTS))?;
    Ok(Some(slot))
}

/// Push fresh slots until `free` (the free slots a scan counted) reaches the headroom.
pub(super) fn top_up(slots: &Slots, queue: &mut Queue<MapData, u32>, free: u32, in_use: u32) -> Result<(), LoadError> {
    let want = MIN_FREE_SLOTS.max(in_use / 4);
    let mut pushed = 0;
    while free + pushed < want {
        if push_fresh(slots, queue)?.is_none() {
            break;
        }
        pushed += 1;
    }
    if pushed > 0 {
        debug!(pushed, fill_mark = slots.fill_mark(), "fresh client slots queued");
    }
    Ok(())
}

/// Takes slots from userspace as the program does: a free slot popped, its owner written, the
/// index entry created (`BPF_NOEXIST`); a lost race gives the slot back.
pub struct SlotAlloc {
    slots: Slots,
    index: HashMap<MapData, ClientKey, u32>,
    free: Queue<MapData, u32>,
}

impl SlotAlloc {
    pub fn open(maps: &PinnedMaps) -> Result<SlotAlloc, LoadError> {
        Ok(SlotAlloc { slots: maps.slots()?, index: maps.index()?, free: maps.free_slots()? })
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// A free slot: from the queue, or a fresh one when the queue is empty.
    fn pop(&mut self) -> Result<u32, LoadError> {
        loop {
            match self.free.pop(0) {
                Ok(s) => return Ok(s),
                Err(MapError::ElementNotFound) => {}
                Err(e) => return Err(map_err(MAP_FREE_SLOTS)(e)),
            }
            if push_fresh(&self.slots, &mut self.free)?.is_none() {
                return Err(LoadError::ClientsFull { slots: self.slots.entries() });
            }
        }
    }

    /// `key`'s slot and whether it was taken by this call; None for the reserved keys.
    pub fn admit(&mut self, key: &ClientKey) -> Result<Option<(u32, bool)>, LoadError> {
        if key.is_reserved() {
            return Ok(None);
        }
        match self.index.get(key, 0) {
            Ok(slot) => {
                self.slots.map_slot(slot)?;
                return Ok(Some((slot, false)));
            }
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_CLIENT_INDEX)(e)),
        }
        let slot = self.pop()?;
        self.slots.map_slot(slot)?;
        self.slots.set_key(slot, key);
        match self.index.insert(key, &slot, BPF_NOEXIST) {
            Ok(()) => Ok(Some((slot, true))),
            Err(e) => {
                self.slots.set_key(slot, &ClientKey::OTHER);
                self.free.push(&slot, 0).map_err(map_err(MAP_FREE_SLOTS))?;
                match e {
                    MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {
                        let slot = self.index.get(key, 0).map_err(map_err(MAP_CLIENT_INDEX))?;
                        self.slots.map_slot(slot)?;
                        Ok(Some((slot, false)))
                    }
                    e => Err(map_err(MAP_CLIENT_INDEX)(e)),
                }
            }
        }
    }
}
