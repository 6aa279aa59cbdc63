//! Counting: charge every packet's L3 bytes to its VPN client's slot (`CLIENT_SLOTS`, found
//! through `CLIENT_INDEX`), or to the OTHER / OVERFLOW bucket, and give it exactly one outcome. Counting only observes: it never
//! changes or drops a packet, and a parse failure only changes the outcome (fail open).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{EbpfContext as _, bindings::BPF_NOEXIST, helpers::bpf_jiffies64, programs::TcContext};
use tunmeter_common::{
    ClientKey, ClientSlot, Direction, ETH_HLEN, ETH_TYPE_OFFSET, Family, Outcome, SLOT_OTHER, SLOT_OVERFLOW,
    SUBNET_KEY_BITS, SubnetKey, check_header, client_addr_offset, family, is_ip_ethertype,
};

use crate::{
    gso, iface, l3_offset,
    maps::{CLIENT_FREE_SLOTS, CLIENT_INDEX, CLIENT_SLOTS, CLIENT_SUBNETS},
    packet::{l3_len, read},
    stats,
};

const E2BIG: i64 = 7;
const EEXIST: i64 = 17;

/// Count one packet in direction `dir`.
#[inline(always)]
pub fn packet(ctx: &TcContext, dir: Direction) {
    // The loader freezes L3_OFFSET, so the verifier sees a constant and keeps one branch;
    // each branch is compiled with constant header offsets.
    if l3_offset() == 0 { packet_at::<0>(ctx, dir) } else { packet_at::<{ ETH_HLEN as usize }>(ctx, dir) }
}

#[inline(always)]
fn packet_at<const L3: usize>(ctx: &TcContext, dir: Direction) {
    let l3_len = l3_len::<L3>(ctx);
    iface::packet(ctx, dir, l3_len);
    match client_key::<L3>(ctx, l3_len, dir) {
        Ok(key) => count_client(ctx, &key, gso::charged::<L3>(ctx, l3_len), dir),
        Err(outcome) => stats::outcome(dir, outcome, l3_len),
    }
}

/// The key of the packet's client-side address, or the outcome that says why there is none.
#[inline(always)]
fn client_key<const L3: usize>(ctx: &TcContext, l3_len: u32, dir: Direction) -> Result<ClientKey, Outcome> {
    let ethertype = if L3 != 0 {
        let t = u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET as usize)?);
        if !is_ip_ethertype(t) {
            return Err(Outcome::NotIp);
        }
        Some(t)
    } else {
        None
    };
    // Two bytes, not one: a 1-byte bounds check compiles to a form the verifier can't use.
    let first = read::<u16>(ctx, L3)?.to_ne_bytes()[0];
    let fam = family(ethertype, first)?;
    check_header(fam, first, l3_len)?;
    let at = L3 + client_addr_offset(fam, dir) as usize;
    Ok(match fam {
        Family::V4 => ClientKey::v4_word(read(ctx, at)?),
        Family::V6 => ClientKey::v6_words(read(ctx, at)?),
    })
}

/// Add the packet to its client's slot. A client unseen so far gets a slot on its first
/// upload if its address is inside a subnet of this interface; otherwise (outside the subnets,
/// or a download to an address without a slot) the packet goes to the OTHER bucket.
#[inline(always)]
fn count_client(ctx: &TcContext, key: &ClientKey, bytes: u32, dir: Direction) {
    // `::` (e.g. the source of duplicate-address detection) and ff..ff would hit a reserved
    // bucket's key: they are never clients.
    if key.is_reserved() {
        count_slot(SLOT_OTHER, dir, Outcome::OutsideSubnets, bytes);
        return;
    }
    // SAFETY: a copy of the slot number.
    if let Some(slot) = unsafe { CLIENT_INDEX.get(key) }.copied() {
        count_slot(slot, dir, Outcome::Client, bytes);
        return;
    }
    if !in_client_subnet(ifindex(ctx), key) {
        count_slot(SLOT_OTHER, dir, Outcome::OutsideSubnets, bytes);
        return;
    }
    // Only the client's own packets (or the daemon admitting its address) take a slot: a
    // download to an unknown address in the subnet must not, or anyone could fill the map
    // (and the ledger) by sending to random addresses of a routed subnet.
    if dir == Direction::Download {
        count_slot(SLOT_OTHER, dir, Outcome::UnknownClient, bytes);
        return;
    }
    new_client(key, bytes, dir);
}

/// Take a free slot for `key`, publish it in the index and count the packet there.
#[inline(always)]
fn new_client(key: &ClientKey, bytes: u32, dir: Direction) {
    let slot = match CLIENT_FREE_SLOTS.pop() {
        Ok(Some(slot)) => slot,
        Ok(None) => return count_slot(SLOT_OVERFLOW, dir, Outcome::MapFull, bytes),
        Err(_) => return stats::outcome(dir, Outcome::MapError, bytes),
    };
    let Some(s) = CLIENT_SLOTS.get_ptr_mut(slot) else {
        return stats::outcome(dir, Outcome::MapError, bytes);
    };
    // SAFETY: a map value. The slot is this program's alone until the index publishes it, so
    // its owner is written first: the daemon attributes a slot's counts by this key.
    unsafe { (*s).key = *key };
    match CLIENT_INDEX.insert(key, &slot, BPF_NOEXIST as u64) {
        Ok(()) => count_slot(slot, dir, Outcome::Client, bytes),
        Err(e) => {
            // Not published: give the slot back (it holds no count).
            // SAFETY: as above, still this program's alone.
            unsafe { (*s).key = ClientKey::OTHER };
            let _ = CLIENT_FREE_SLOTS.push(&slot, 0);
            if e as i64 == -EEXIST {
                // Another CPU published this client between our lookup and insert: add to it.
                // SAFETY: a copy of the slot number.
                match unsafe { CLIENT_INDEX.get(key) }.copied() {
                    Some(slot) => count_slot(slot, dir, Outcome::Client, bytes),
                    None => stats::outcome(dir, Outcome::MapError, bytes),
                }
            } else if e as i64 == -E2BIG {
                count_slot(SLOT_OVERFLOW, dir, Outcome::MapFull, bytes);
            } else {
                stats::outcome(dir, Outcome::MapError, bytes);
            }
        }
    }
}

/// Count into `slot`: a client's, or a reserved bucket's fixed one.
#[inline(always)]
fn count_slot(slot: u32, dir: Direction, outcome: Outcome, bytes: u32) {
    match CLIENT_SLOTS.get_ptr_mut(slot) {
        Some(s) => {
            // SAFETY: a map value shared by every CPU: only atomic adds and whole-word stores.
            unsafe { add(&mut *s, bytes, dir) };
            stats::outcome(dir, outcome, bytes);
        }
        None => stats::outcome(dir, Outcome::MapError, bytes),
    }
}

/// Index of the device the program runs on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is the kernel's __sk_buff for this run.
    unsafe { (*(ctx.as_ptr() as *const aya_ebpf::bindings::__sk_buff)).ifindex }
}

#[inline(always)]
fn in_client_subnet(ifindex: u32, key: &ClientKey) -> bool {
    let lpm =
        aya_ebpf::maps::lpm_trie::Key::new(SUBNET_KEY_BITS, SubnetKey { ifindex_be: ifindex.to_be(), addr: key.addr });
    CLIENT_SUBNETS.get(&lpm).is_some()
}

#[inline(always)]
fn atomic_add(field: &mut u64, v: u64) {
    // SAFETY: `field` is in a map value; BPF_ATOMIC | BPF_ADD, what every CPU does to it.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, v) };
}

#[inline(always)]
fn add(c: &mut ClientSlot, bytes: u32, dir: Direction) {
    match dir {
        Direction::Upload => {
            atomic_add(&mut c.up_bytes, bytes as u64);
            atomic_add(&mut c.up_packets, 1);
        }
        Direction::Download => {
            atomic_add(&mut c.down_bytes, bytes as u64);
            atomic_add(&mut c.down_packets, 1);
        }
    }
    // SAFETY: helper without arguments. jiffies64 is inlined by the verifier (~1 ns; the
    // clock-reading helpers cost ~25 ns here). A plain store: any CPU's latest stamp will do.
    c.last_seen_jiffies = unsafe { bpf_jiffies64() };
}
