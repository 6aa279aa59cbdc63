//! Counter-layout prototypes for `cargo xtask bench` (issue 14), an object the daemon never
//! loads: an L3 IPv4 packet counted for its source into today's per-CPU hash, into a shared
//! mmapable array of slots (atomic adds), or into that array with change tracking (the first
//! packet of a slot after each poll generation pushes the slot to a ring buffer).
#![no_std]
#![no_main]
// The atomic add intrinsic: the BPF target's core has no `AtomicU64::fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, TC_ACT_OK},
    helpers::bpf_jiffies64,
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use tunmeter_common::{
    ClientCounters, ClientKey,
    design::{DESIGN_DEFAULT_ENTRIES, DesignSlot},
};

#[map(name = "DESIGN_PERCPU")]
static DESIGN_PERCPU: PerCpuHashMap<ClientKey, ClientCounters> =
    PerCpuHashMap::with_max_entries(DESIGN_DEFAULT_ENTRIES, 0);

#[map(name = "DESIGN_SLOT_OF")]
static DESIGN_SLOT_OF: HashMap<ClientKey, u32> = HashMap::with_max_entries(DESIGN_DEFAULT_ENTRIES, 0);

#[map(name = "DESIGN_SLOTS")]
static DESIGN_SLOTS: Array<DesignSlot> = Array::with_max_entries(DESIGN_DEFAULT_ENTRIES, BPF_F_MMAPABLE);

#[map(name = "DESIGN_POLL_GEN")]
static DESIGN_POLL_GEN: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "DESIGN_ACTIVE")]
static DESIGN_ACTIVE: RingBuf = RingBuf::with_byte_size(1 << 12, 0);

/// (source address key, bytes) of an IPv4 packet, or None.
#[inline(always)]
fn source(ctx: &TcContext) -> Option<(ClientKey, u64)> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 20 > end {
        return None;
    }
    // SAFETY: bounds checked above.
    let first = unsafe { *(start as *const u8) };
    if first >> 4 != 4 {
        return None;
    }
    // SAFETY: bounds checked above (bytes 12..16 of a 20-byte header).
    let src = unsafe { core::ptr::read((start + 12) as *const u32) };
    Some((ClientKey::v4_word(src), ctx.len() as u64))
}

#[inline(always)]
fn add(field: &mut u64, v: u64) {
    // SAFETY: `field` points into a map value; an atomic add (BPF_ATOMIC | BPF_ADD) is what
    // every CPU does to it.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, v) };
}

#[inline(always)]
fn slot(src: &ClientKey) -> Option<(u32, *mut DesignSlot)> {
    // SAFETY: read-only copy of the slot number.
    let i = unsafe { DESIGN_SLOT_OF.get(src) }.copied()?;
    Some((i, DESIGN_SLOTS.get_ptr_mut(i)?))
}

#[classifier]
fn design_percpu_hash(ctx: TcContext) -> i32 {
    if let Some((src, len)) = source(&ctx)
        && let Some(c) = DESIGN_PERCPU.get_ptr_mut(&src)
    {
        // SAFETY: this CPU's own value; nothing else writes it.
        let c = unsafe { &mut *c };
        c.up_bytes += len;
        c.up_packets += 1;
        // SAFETY: a helper without arguments.
        c.last_seen_jiffies = unsafe { bpf_jiffies64() };
    }
    TC_ACT_OK
}

/// Count the packet into its client's shared slot: (slot number, slot) if it has one.
#[inline(always)]
fn count_shared(ctx: &TcContext) -> Option<(u32, &'static mut DesignSlot)> {
    let (src, len) = source(ctx)?;
    let (i, s) = slot(&src)?;
    // SAFETY: a map value, shared by every CPU: only atomic adds and whole-word stores.
    let s = unsafe { &mut *s };
    add(&mut s.up_bytes, len);
    add(&mut s.up_packets, 1);
    // SAFETY: a helper without arguments.
    s.last_seen_jiffies = unsafe { bpf_jiffies64() };
    Some((i, s))
}

#[classifier]
fn design_shared_array(ctx: TcContext) -> i32 {
    let _ = count_shared(&ctx);
    TC_ACT_OK
}

#[classifier]
fn design_shared_array_dirty(ctx: TcContext) -> i32 {
    if let Some((i, s)) = count_shared(&ctx) {
        let poll_gen = DESIGN_POLL_GEN.get(0).copied().unwrap_or(0);
        if s.poll_gen != poll_gen {
            // Two CPUs may both see the old generation: the slot is then listed twice, which
            // a poll tolerates (it reads the slot, not a delta from the ring).
            s.poll_gen = poll_gen;
            let _ = DESIGN_ACTIVE.output(&i, 0);
        }
    }
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
