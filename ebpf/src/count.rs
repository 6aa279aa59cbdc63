//! Counting: charge every packet's L3 bytes to its VPN client (`CLIENT_COUNTERS`), or to the
//! OTHER / OVERFLOW bucket, and give it exactly one outcome. Counting only observes: it never
//! changes or drops a packet, and a parse failure only changes the outcome (fail open).

use aya_ebpf::{EbpfContext as _, bindings::BPF_NOEXIST, helpers::bpf_jiffies64, programs::TcContext};
use tunmeter_common::{
    ClientCounters, ClientKey, Direction, ETH_HLEN, ETH_TYPE_OFFSET, Family, Outcome, SUBNET_KEY_BITS, SubnetKey,
    check_header, client_addr_offset, family, is_ip_ethertype,
};

use crate::{
    gso, iface, l3_offset,
    maps::{CLIENT_COUNTERS, CLIENT_SUBNETS},
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

/// Add the packet to its client's entry. A client unseen so far gets an entry on its first
/// upload if its address is inside a subnet of this interface; otherwise (outside the subnets,
/// or a download to an address without an entry) the packet goes to the OTHER bucket.
#[inline(always)]
fn count_client(ctx: &TcContext, key: &ClientKey, bytes: u32, dir: Direction) {
    // `::` (e.g. the source of duplicate-address detection) and ff..ff would hit a reserved
    // bucket's entry: they are never clients.
    if key.is_reserved() {
        count_bucket(&ClientKey::OTHER, dir, Outcome::OutsideSubnets, bytes);
        return;
    }
    if let Some(c) = CLIENT_COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it while we run.
        unsafe { add(&mut *c, bytes, dir) };
        stats::outcome(dir, Outcome::Client, bytes);
        return;
    }
    if !in_client_subnet(ifindex(ctx), key) {
        count_bucket(&ClientKey::OTHER, dir, Outcome::OutsideSubnets, bytes);
        return;
    }
    // Only the client's own packets (or the daemon admitting its address) create an entry: a
    // download to an unknown address in the subnet must not, or anyone could fill the map
    // (and the ledger) by sending to random addresses of a routed subnet.
    if dir == Direction::Download {
        count_bucket(&ClientKey::OTHER, dir, Outcome::UnknownClient, bytes);
        return;
    }
    let mut fresh = ClientCounters::default();
    add(&mut fresh, bytes, dir);
    match CLIENT_COUNTERS.insert(key, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => stats::outcome(dir, Outcome::Client, bytes),
        // Another CPU created it between our lookup and insert: add to it.
        Err(e) if e as i64 == -EEXIST => {
            if let Some(c) = CLIENT_COUNTERS.get_ptr_mut(key) {
                // SAFETY: as above.
                unsafe { add(&mut *c, bytes, dir) };
                stats::outcome(dir, Outcome::Client, bytes);
            } else {
                stats::outcome(dir, Outcome::MapError, bytes);
            }
        }
        Err(e) if e as i64 == -E2BIG => count_bucket(&ClientKey::OVERFLOW, dir, Outcome::MapFull, bytes),
        Err(_) => stats::outcome(dir, Outcome::MapError, bytes),
    }
}

/// Count into a reserved bucket (created by the daemon at load time, so it exists even when
/// the map is full).
#[inline(always)]
fn count_bucket(bucket: &ClientKey, dir: Direction, outcome: Outcome, bytes: u32) {
    match CLIENT_COUNTERS.get_ptr_mut(bucket) {
        Some(c) => {
            // SAFETY: per-CPU value of this CPU.
            unsafe { add(&mut *c, bytes, dir) };
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
fn add(c: &mut ClientCounters, bytes: u32, dir: Direction) {
    match dir {
        Direction::Upload => {
            c.up_bytes += bytes as u64;
            c.up_packets += 1;
        }
        Direction::Download => {
            c.down_bytes += bytes as u64;
            c.down_packets += 1;
        }
    }
    // SAFETY: helper without arguments. jiffies64 is inlined by the verifier (~1 ns; the
    // clock-reading helpers cost ~25 ns here).
    c.last_seen_jiffies = unsafe { bpf_jiffies64() };
}
