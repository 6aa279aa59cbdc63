//! The shared client counters (`CLIENT_SLOTS`) through an mmap: every slot read without a
//! syscall per entry (`Slots`), slots taken and released for admitted addresses and the free
//! queue kept topped up (`alloc`), and the scan that attributes each slot to the client the
//! index says owns it (`reader`).

mod alloc;
mod reader;

use std::{
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{HashMap, MapData, MapError, Queue};
use tracing::{info, warn};
use tunmeter_common::{
    ClientCounters, ClientKey, MAP_CLIENT_INDEX, MAP_CLIENTS, MAP_FREE_SLOTS, RESERVED_SLOTS, SLOT_OTHER, SLOT_OVERFLOW,
};

pub use alloc::{MIN_FREE_SLOTS, SlotAlloc};
pub use reader::SlotReader;

use super::loader::{LoadError, PinnedMaps, ip_key};

/// Words of a `ClientSlot` (64 bytes).
const WORDS: usize = 8;
const W_KEY: usize = 0;
const W_UP_BYTES: usize = 2;
const W_LAST_SEEN: usize = 6;
const W_META: usize = 7;
/// Slots per mapping: 256 KiB, a whole number of pages. A scan maps one chunk at a time and
/// unmaps it once read, so the daemon's resident memory holds a chunk of slots, not the map
/// (the map's pages are kernel memory, allocated for `max_clients` whether mapped or not).
const CHUNK_SLOTS: u32 = 4096;
const CHUNK_BYTES: usize = CHUNK_SLOTS as usize * WORDS * 8;

struct Chunk {
    base: NonNull<AtomicU64>,
    bytes: usize,
}

/// `CLIENT_SLOTS` mapped into this process in chunks (shared with the kernel: the programs'
/// atomic adds show here as they happen).
pub struct Slots {
    chunks: Vec<OnceLock<Chunk>>,
    entries: u32,
    data: MapData,
}

// SAFETY: the mappings are plain shared memory, only accessed through atomics.
unsafe impl Send for Slots {}
// SAFETY: as above.
unsafe impl Sync for Slots {}

impl Drop for Slots {
    fn drop(&mut self) {
        for c in self.chunks.iter().filter_map(OnceLock::get) {
            // SAFETY: a mapping made in `map_chunk`, not used after this.
            unsafe { libc::munmap(c.base.as_ptr().cast(), c.bytes) };
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

impl Slots {
    fn open(data: MapData) -> Result<Slots, LoadError> {
        let entries = data.info().map_err(map_err(MAP_CLIENTS))?.max_entries();
        let chunks = (0..entries.div_ceil(CHUNK_SLOTS)).map(|_| OnceLock::new()).collect();
        let slots = Slots { chunks, entries, data };
        slots.map_slot(SLOT_OTHER)?;
        Ok(slots)
    }

    /// Slots in the map, the reserved ones included.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// `f(self, slot)` for every slot in `from..end`, in order, each chunk mapped before its
    /// slots (a failing mmap is an error, not a panic in `words`) and unmapped after them,
    /// except the first (slot 0's meta is the fill mark).
    fn scan(
        &mut self,
        from: u32,
        end: u32,
        mut f: impl FnMut(&Slots, u32) -> Result<(), LoadError>,
    ) -> Result<(), LoadError> {
        let end = end.min(self.entries);
        for i in (from / CHUNK_SLOTS) as usize..end.div_ceil(CHUNK_SLOTS) as usize {
            self.chunk(i)?;
            let first = from.max(i as u32 * CHUNK_SLOTS);
            let result = (first..end.min((i as u32 + 1) * CHUNK_SLOTS)).try_for_each(|slot| f(self, slot));
            if i != 0 {
                self.unmap(i);
            }
            result?;
        }
        Ok(())
    }

    /// Chunks mapped now (a scan leaves only the first: the daemon's resident memory).
    pub fn mapped_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.get().is_some()).count()
    }

    /// Unmap chunk `i` if it is mapped (exclusive access: no reference into it is alive).
    fn unmap(&mut self, i: usize) {
        if let Some(c) = self.chunks[i].take() {
            // SAFETY: a mapping made in `map_chunk`; `&mut self` means no borrow of it remains.
            unsafe { libc::munmap(c.base.as_ptr().cast(), c.bytes) };
        }
    }

    /// Map the chunk that holds `slot` (one slot's access: only its own chunk).
    fn map_slot(&self, slot: u32) -> Result<(), LoadError> {
        self.chunk((slot / CHUNK_SLOTS) as usize).map(drop)
    }

    fn chunk(&self, i: usize) -> Result<&Chunk, LoadError> {
        if let Some(c) = self.chunks[i].get() {
            return Ok(c);
        }
        let c = self.map_chunk(i)?;
        if let Err(c) = self.chunks[i].set(c) {
            // SAFETY: our own mapping; another thread mapped the chunk first, this one is unused.
            unsafe { libc::munmap(c.base.as_ptr().cast(), c.bytes) };
        }
        Ok(self.chunks[i].get().expect("set above"))
    }

    fn map_chunk(&self, i: usize) -> Result<Chunk, LoadError> {
        let offset = i * CHUNK_BYTES;
        let total = (self.entries as usize * WORDS * 8).next_multiple_of(page_size());
        let bytes = CHUNK_BYTES.min(total - offset);
        // SAFETY: a new shared mapping of part of the map's fd; the kernel checks the range
        // and that the map was created with BPF_F_MMAPABLE.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.data.fd().as_fd().as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LoadError::Mmap { name: MAP_CLIENTS, source: std::io::Error::last_os_error() });
        }
        Ok(Chunk { base: NonNull::new(ptr.cast()).expect("mmap returned a mapping"), bytes })
    }

    /// The slot's eight words.
    fn words(&self, slot: u32) -> &[AtomicU64; WORDS] {
        assert!(slot < self.entries, "slot {slot} outside the map ({} slots)", self.entries);
        let c = self
            .chunk((slot / CHUNK_SLOTS) as usize)
            .unwrap_or_else(|e| panic!("slot {slot}: {e} (callers map the slots first)"));
        // SAFETY: inside the chunk's mapping (a chunk holds whole slots); 8-byte aligned
        // (page-aligned base, 64-byte slots).
        unsafe { &*c.base.as_ptr().add((slot % CHUNK_SLOTS) as usize * WORDS).cast::<[AtomicU64; WORDS]>() }
    }

    fn word(&self, slot: u32, w: usize) -> &AtomicU64 {
        &self.words(slot)[w]
    }

    /// How many slots the daemon has handed to the free queue so far (slot 0's `meta`): every
    /// slot a client can own is below it. At least `RESERVED_SLOTS` once filled.
    pub fn fill_mark(&self) -> u32 {
        (self.meta(SLOT_OTHER).min(u64::from(self.entries))) as u32
    }

    /// The slot's owner key as stored (zero: free).
    pub fn key(&self, slot: u32) -> ClientKey {
        let s = self.words(slot);
        ClientKey::v6_words([s[W_KEY].load(Ordering::Acquire), s[W_KEY + 1].load(Ordering::Acquire)])
    }

    fn set_key(&self, slot: u32, key: &ClientKey) {
        let w: [u64; 2] = [
            u64::from_ne_bytes(key.addr[..8].try_into().expect("8 bytes")),
            u64::from_ne_bytes(key.addr[8..].try_into().expect("8 bytes")),
        ];
        let s = self.words(slot);
        s[W_KEY].store(w[0], Ordering::Release);
        s[W_KEY + 1].store(w[1], Ordering::Release);
    }

    /// The slot's counters now (each word read atomically; the words are not one snapshot, but
    /// each only grows, so a reading is never ahead of the kernel).
    pub fn counters(&self, slot: u32) -> ClientCounters {
        let s = self.words(slot);
        let r = |w: usize| s[w].load(Ordering::Relaxed);
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
        let s = self.words(slot);
        let add = |w: usize, v| s[w].fetch_add(v, Ordering::Relaxed);
        add(W_UP_BYTES, c.up_bytes);
        add(W_UP_BYTES + 1, c.up_packets);
        add(W_UP_BYTES + 2, c.down_bytes);
        add(W_UP_BYTES + 3, c.down_packets);
        if c.last_seen_jiffies != 0 {
            s[W_LAST_SEEN].store(c.last_seen_jiffies, Ordering::Relaxed);
        }
    }

    /// Counters and meta zeroed, then the key: the slot is free again.
    fn clear(&self, slot: u32) {
        for w in &self.words(slot)[W_UP_BYTES..] {
            w.store(0, Ordering::Relaxed);
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

    /// Make the counter maps ready for the programs: the reserved buckets' keys, and the free
    /// queue topped up (`alloc::MIN_FREE_SLOTS` fresh slots at least). A slot array that is new
    /// (its fill mark is zero) first empties an index and a queue that outlived it.
    pub fn ensure_slots(&self) -> Result<(), LoadError> {
        let mut slots = self.slots()?;
        let (mut index, mut free) = (self.index()?, self.free_slots()?);
        if slots.meta(SLOT_OTHER) == 0 {
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
            slots.set_meta(SLOT_OTHER, u64::from(RESERVED_SLOTS));
        }
        slots.set_key(SLOT_OVERFLOW, &ClientKey::OVERFLOW);
        let mark = slots.fill_mark();
        let mut free_now = 0u32;
        slots.scan(RESERVED_SLOTS, mark, |slots, s| {
            free_now += u32::from(slots.key(s) == ClientKey::OTHER);
            Ok(())
        })?;
        let in_use = mark - RESERVED_SLOTS - free_now;
        alloc::top_up(&slots, &mut free, free_now, in_use)?;
        info!(fill_mark = slots.fill_mark(), in_use, "client slots ready");
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
        if slot >= slots.entries() {
            return Ok(false);
        }
        slots.map_slot(slot)?;
        if slots.counters(slot) != ClientCounters::default() {
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
