//! The shared client counters (`CLIENT_SLOTS`) through an mmap: every slot read without a
//! syscall per entry, slots taken and released for admitted addresses, the free queue filled,
//! and the scan that attributes each slot to the client the index says owns it.

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{HashMap, MapData, MapError, Queue};
use tracing::{debug, info, warn};
use tunmeter_common::{
    ClientCounters, ClientKey, MAP_CLIENT_INDEX, MAP_CLIENTS, MAP_FREE_SLOTS, RESERVED_SLOTS, SLOT_OTHER,
    SLOT_OVERFLOW, SLOT_RELEASE_GRACE_MS,
};

use super::loader::{LoadError, PinnedMaps, ip_key};

/// `BPF_NOEXIST` map update flag: create only.
const BPF_NOEXIST: u64 = 1;
/// Words of a `ClientSlot` (64 bytes).
const WORDS: usize = 8;
const W_KEY: usize = 0;
const W_UP_BYTES: usize = 2;
const W_LAST_SEEN: usize = 6;
const W_META: usize = 7;

/// `CLIENT_SLOTS` mapped into this process (shared with the kernel: the programs' atomic adds
/// show here as they happen).
pub struct Slots {
    base: NonNull<AtomicU64>,
    entries: u32,
    bytes: usize,
    _data: MapData,
}

// SAFETY: the mapping is plain shared memory, only accessed through atomics.
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

impl Slots {
    fn open(data: MapData) -> Result<Slots, LoadError> {
        let entries = data.info().map_err(map_err(MAP_CLIENTS))?.max_entries();
        let bytes = entries as usize * WORDS * 8;
        // SAFETY: a new shared mapping of the map's fd; the kernel checks the length and that
        // the map was created with BPF_F_MMAPABLE.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(LoadError::Mmap { name: MAP_CLIENTS, source: e });
        }
        let base = NonNull::new(ptr.cast()).expect("mmap returned a mapping");
        Ok(Slots { base, entries, bytes, _data: data })
    }

    /// Slots in the map, the reserved ones included.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn word(&self, slot: u32, w: usize) -> &AtomicU64 {
        assert!(slot < self.entries, "slot {slot} outside the map ({} slots)", self.entries);
        // SAFETY: inside the mapping (checked above); 8-byte aligned (page-aligned base).
        unsafe { &*self.base.as_ptr().add(slot as usize * WORDS + w) }
    }

    /// The slot's owner key as stored (zero: free).
    pub fn key(&self, slot: u32) -> ClientKey {
        let w = [self.word(slot, W_KEY).load(Ordering::Acquire), self.word(slot, W_KEY + 1).load(Ordering::Acquire)];
        ClientKey::v6_words(w)
    }

    fn set_key(&self, slot: u32, key: &ClientKey) {
        let w: [u64; 2] = [
            u64::from_ne_bytes(key.addr[..8].try_into().expect("8 bytes")),
            u64::from_ne_bytes(key.addr[8..].try_into().expect("8 bytes")),
        ];
        self.word(slot, W_KEY).store(w[0], Ordering::Release);
        self.word(slot, W_KEY + 1).store(w[1], Ordering::Release);
    }

    /// The slot's counters now (each word read atomically; the words are not one snapshot, but
    /// each only grows, so a reading is never ahead of the kernel).
    pub fn counters(&self, slot: u32) -> ClientCounters {
        let r = |w| self.word(slot, w).load(Ordering::Relaxed);
        ClientCounters {
            up_bytes: r(W_UP_BYTES),
            up_packets: r(W_UP_BYTES + 1),
            down_bytes: r(W_UP_BYTES + 2),
            down_packets: r(W_UP_BYTES + 3),
            last_seen_jiffies: r(W_LAST_SEEN),
        }
    }

    /// Add `c` to the slot as the program does for packets (atomic adds; last seen stored).
    /// For tests and benchmarks that stand in for traffic.
    pub fn add(&self, slot: u32, c: &ClientCounters) {
        let add = |w, v| self.word(slot, w).fetch_add(v, Ordering::Relaxed);
        add(W_UP_BYTES, c.up_bytes);
        add(W_UP_BYTES + 1, c.up_packets);
        add(W_UP_BYTES + 2, c.down_bytes);
        add(W_UP_BYTES + 3, c.down_packets);
        if c.last_seen_jiffies != 0 {
            self.word(slot, W_LAST_SEEN).store(c.last_seen_jiffies, Ordering::Relaxed);
        }
    }

    /// Counters and meta zeroed, then the key: the slot is free again.
    fn clear(&self, slot: u32) {
        for w in W_UP_BYTES..WORDS {
            self.word(slot, w).store(0, Ordering::Relaxed);
        }
        self.set_key(slot, &ClientKey::OTHER);
    }

    fn meta(&self, slot: u32) -> u64 {
        self.word(slot, W_META).load(Ordering::Acquire)
    }

    fn set_meta(&self, slot: u32, v: u64) {
        self.word(slot, W_META).store(v, Ordering::Release);
    }
}

/// A released slot: owner key [`ClientKey::OVERFLOW`] outside the reserved slots.
fn is_released(slot: u32, key: &ClientKey) -> bool {
    slot >= RESERVED_SLOTS && *key == ClientKey::OVERFLOW
}

impl PinnedMaps {
    /// The shared counter slots, mapped.
    pub fn slots(&self) -> Result<Slots, LoadError> {
        Slots::open(self.open(MAP_CLIENTS)?)
    }

    /// Address -> slot.
    pub fn index(&self) -> Result<HashMap<MapData, ClientKey, u32>, LoadError> {
        HashMap::try_from(aya::maps::Map::HashMap(self.open(MAP_CLIENT_INDEX)?)).map_err(map_err(MAP_CLIENT_INDEX))
    }

    fn free_slots(&self) -> Result<Queue<MapData, u32>, LoadError> {
        Queue::try_from(aya::maps::Map::Queue(self.open(MAP_FREE_SLOTS)?)).map_err(map_err(MAP_FREE_SLOTS))
    }

    /// Make the counter maps ready for the programs: the reserved buckets' keys, and every
    /// client slot not yet handed to the free queue pushed into it. A slot array that is new
    /// (its fill count is zero) empties an index and a queue that outlived it.
    pub fn ensure_slots(&self) -> Result<(), LoadError> {
        let slots = self.slots()?;
        let (mut index, mut free) = (self.index()?, self.free_slots()?);
        let mut next = slots.meta(SLOT_OTHER);
        if next == 0 {
            let stale: Vec<ClientKey> = index.keys().filter_map(Result::ok).collect();
            for k in &stale {
                index.remove(k).map_err(map_err(MAP_CLIENT_INDEX))?;
            }
            let mut drained = 0u32;
            while free.pop(0).is_ok() {
                drained += 1;
            }
            if !stale.is_empty() || drained > 0 {
                warn!(
                    index = stale.len(),
                    queued = drained,
                    "the slot array is new: its old index and free queue were emptied"
                );
            }
            next = u64::from(RESERVED_SLOTS);
        }
        slots.set_key(SLOT_OVERFLOW, &ClientKey::OVERFLOW);
        let first = next;
        while next < u64::from(slots.entries()) {
            // Counted before the push: a crash in between leaks one slot instead of handing
            // the same slot out twice.
            slots.set_meta(SLOT_OTHER, next + 1);
            free.push(&(next as u32), 0).map_err(map_err(MAP_FREE_SLOTS))?;
            next += 1;
        }
        if next > first {
            info!(slots = next - first, "client slots added to the free queue");
        }
        Ok(())
    }

    /// Give an address a slot before it sends anything (identity knows it is assigned), so
    /// downloads to it are counted as its own from the first packet. The kernel gives slots
    /// only to a client's own (upload) packets. True if the slot was taken now; no free slot
    /// is an error (the address then counts as unknown until it uploads, into OVERFLOW).
    pub fn admit_client(&self, ip: IpAddr) -> Result<bool, LoadError> {
        Ok(SlotAlloc::open(self)?.admit(&ip_key(ip))?.is_some_and(|(_, taken)| taken))
    }

    /// Release `ip`'s slot if it never counted anything: an admitted address that never sent
    /// or received a packet. The ledger has nothing to account for it, so nothing is lost; a
    /// slot with any count is kept. The slot waits `SLOT_RELEASE_GRACE_MS` before the daemon's
    /// scan reuses it. True if released. Race accepted: a packet counted between the read and
    /// the index removal (one syscall apart) is lost; only a slot silent until then can lose it.
    pub fn expire_if_unused(&self, ip: IpAddr) -> Result<bool, LoadError> {
        let key = ip_key(ip);
        if key.is_reserved() {
            return Ok(false);
        }
        let mut index = self.index()?;
        let slot = match index.get(&key, 0) {
            Ok(s) => s,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(map_err(MAP_CLIENT_INDEX)(e)),
        };
        let slots = self.slots()?;
        if slot >= slots.entries() || slots.counters(slot) != ClientCounters::default() {
            return Ok(false);
        }
        match index.remove(&key) {
            Ok(()) => {}
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(map_err(MAP_CLIENT_INDEX)(e)),
        }
        slots.set_meta(slot, crate::time::unix_ms());
        slots.set_key(slot, &ClientKey::OVERFLOW);
        Ok(true)
    }
}

/// Reads every slot and attributes it: a slot counts for the key stored in it only once the
/// index confirms that key owns it (a slot being taken, or given back after a lost race, holds
/// a key the index does not point at). Confirmed owners are remembered, so a steady-state
/// scan makes no syscall. Kept for the daemon's life; a fresh one for one-off reads.
pub struct SlotReader {
    slots: Slots,
    index: HashMap<MapData, ClientKey, u32>,
    free: Option<Queue<MapData, u32>>,
    owners: Vec<ClientKey>,
}

impl SlotReader {
    /// `recycle`: also zero and free released slots whose grace has passed (the daemon only:
    /// one process must own that, and it clears its remembered owner at the same time).
    pub fn open(maps: &PinnedMaps, recycle: bool) -> Result<SlotReader, LoadError> {
        let slots = maps.slots()?;
        let owners = vec![ClientKey::OTHER; slots.entries() as usize];
        let free = if recycle { Some(maps.free_slots()?) } else { None };
        Ok(SlotReader { slots, index: maps.index()?, free, owners })
    }

    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// `f(key, counters)` for the reserved buckets, then every owned slot in slot order.
    pub fn for_each(&mut self, mut f: impl FnMut(&ClientKey, &ClientCounters)) -> Result<(), LoadError> {
        f(&ClientKey::OTHER, &self.slots.counters(SLOT_OTHER));
        f(&ClientKey::OVERFLOW, &self.slots.counters(SLOT_OVERFLOW));
        let now = crate::time::unix_ms();
        for slot in RESERVED_SLOTS..self.slots.entries() {
            let key = self.slots.key(slot);
            if key == ClientKey::OTHER {
                self.owners[slot as usize] = key;
                continue;
            }
            if is_released(slot, &key) {
                self.owners[slot as usize] = ClientKey::OTHER;
                self.recycle(slot, now)?;
                continue;
            }
            if self.owners[slot as usize] != key {
                match self.index.get(&key, 0) {
                    Ok(s) if s == slot => self.owners[slot as usize] = key,
                    Ok(_) | Err(MapError::KeyNotFound) => continue,
                    Err(e) => return Err(map_err(MAP_CLIENT_INDEX)(e)),
                }
            }
            f(&key, &self.slots.counters(slot));
        }
        Ok(())
    }

    fn recycle(&mut self, slot: u32, now: u64) -> Result<(), LoadError> {
        let Some(free) = self.free.as_mut() else { return Ok(()) };
        if now.saturating_sub(self.slots.meta(slot)) < SLOT_RELEASE_GRACE_MS {
            return Ok(());
        }
        self.slots.clear(slot);
        free.push(&slot, 0).map_err(map_err(MAP_FREE_SLOTS))?;
        debug!(slot, "released slot freed");
        Ok(())
    }

    /// One client's counters, if it owns a slot.
    pub fn read_one(&self, ip: IpAddr) -> Result<Option<ClientCounters>, LoadError> {
        let key = ip_key(ip);
        match self.index.get(&key, 0) {
            Ok(slot) if slot < self.slots.entries() && self.slots.key(slot) == key => {
                Ok(Some(self.slots.counters(slot)))
            }
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_CLIENT_INDEX)(e)),
        }
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

    /// `key`'s slot and whether it was taken by this call; None for the reserved keys.
    pub fn admit(&mut self, key: &ClientKey) -> Result<Option<(u32, bool)>, LoadError> {
        if key.is_reserved() {
            return Ok(None);
        }
        match self.index.get(key, 0) {
            Ok(slot) => return Ok(Some((slot, false))),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_CLIENT_INDEX)(e)),
        }
        let slot = match self.free.pop(0) {
            Ok(s) => s,
            Err(MapError::ElementNotFound) => return Err(LoadError::ClientsFull { slots: self.slots.entries() }),
            Err(e) => return Err(map_err(MAP_FREE_SLOTS)(e)),
        };
        self.slots.set_key(slot, key);
        match self.index.insert(key, &slot, BPF_NOEXIST) {
            Ok(()) => Ok(Some((slot, true))),
            Err(e) => {
                self.slots.set_key(slot, &ClientKey::OTHER);
                self.free.push(&slot, 0).map_err(map_err(MAP_FREE_SLOTS))?;
                match e {
                    MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {
                        self.index.get(key, 0).map(|slot| Some((slot, false))).map_err(map_err(MAP_CLIENT_INDEX))
                    }
                    e => Err(map_err(MAP_CLIENT_INDEX)(e)),
                }
            }
        }
    }
}
