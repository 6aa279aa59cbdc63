//! tunmeter TC programs: per-client byte and packet counting on tun (L3) and Ethernet (L2)
//! devices, then steering (forward and redirect rules).
//!
//! Flow: entry (`tunmeter_in` / `tunmeter_out`) -> `try_count` -> small helpers, then
//! `steer::ingress` / `steer::egress`. Counting only observes; steering rewrites (forward) or
//! assigns a socket (redirect) for packets that match a rule. Both return `TC_ACT_UNSPEC`
//! (TCX_NEXT) for every packet they pass, so the next TCX program or tc filter on the device
//! still runs; steering returns `TC_ACT_SHOT` only for a packet it must not let through (a
//! rewrite failed halfway, the proxy is gone). Parse errors fail open. Each packet gets one
//! outcome in `OUTCOME_STATS` and steering events in `STEER_STATS`; nothing is logged per
//! packet.
#![no_std]
#![no_main]

mod forward;
mod maps;
mod packet;
mod redirect;
mod steer;

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_jiffies64,
    macros::classifier,
    programs::TcContext,
};
use tunmeter_common::{
    ClientCounters, ClientKey, Direction, ETH_TYPE_OFFSET, Family, Outcome, SUBNET_KEY_BITS, SubnetKey, check_header,
    client_addr_offset, family, stats_index,
};

use crate::{
    maps::{CLIENT_COUNTERS, CLIENT_SUBNETS, OUTCOME_STATS},
    packet::read,
};

/// Where the IP header starts: 0 on tun/wg devices, 14 on Ethernet. Set by the loader
/// (`L3_OFFSET`); one object is loaded once per value.
#[unsafe(no_mangle)]
static L3_OFFSET: Global<u32> = Global::new(0);

/// `skb->mark` of redirected packets, matched by the daemon's local-delivery policy route
/// (`REDIRECT_MARK`, from the config).
#[unsafe(no_mangle)]
static REDIRECT_MARK: Global<u32> = Global::new(0x746d_0001);

/// The L3 offset as the verifier sees it: a constant, so only one branch is kept.
#[inline(always)]
fn l3_offset() -> u32 {
    L3_OFFSET.load()
}

const E2BIG: i64 = 7;
const EEXIST: i64 = 17;

#[classifier]
pub fn tunmeter_in(ctx: TcContext) -> i32 {
    try_count(&ctx, Direction::Upload);
    steer::ingress(&ctx)
}

#[classifier]
pub fn tunmeter_out(ctx: TcContext) -> i32 {
    try_count(&ctx, Direction::Download);
    steer::egress(&ctx)
}

/// Not attached anywhere: run by the daemon and CLI through BPF_PROG_TEST_RUN to read the
/// kernel's jiffies (written into the first 8 bytes of the test packet), so that last-seen
/// stamps can be turned into wall-clock time.
#[classifier]
pub fn tunmeter_clock(ctx: TcContext) -> i32 {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    match ctx.store(0, &now, 0) {
        Ok(()) => TC_ACT_OK,
        Err(_) => TC_ACT_SHOT,
    }
}

/// Never attached, not loaded by the daemon: an empty program whose BPF_PROG_TEST_RUN time is
/// the harness cost that `cargo xtask bench` subtracts to report the counting cost itself.
#[classifier]
pub fn tunmeter_empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[inline(always)]
fn try_count(ctx: &TcContext, dir: Direction) {
    // The loader freezes L3_OFFSET, so the verifier sees a constant and keeps one branch;
    // each branch is compiled with constant header offsets.
    if l3_offset() == 0 { count::<0>(ctx, dir) } else { count::<{ tunmeter_common::ETH_HLEN as usize }>(ctx, dir) }
}

#[inline(always)]
fn count<const L3: usize>(ctx: &TcContext, dir: Direction) {
    let l3_len = ctx.len().saturating_sub(L3 as u32);
    match client_key::<L3>(ctx, l3_len, dir) {
        Ok(key) => count_client(ctx, &key, l3_len, dir),
        Err(outcome) => bump_stats(dir, outcome, l3_len),
    }
}

/// The key of the packet's client-side address, or the outcome that says why there is none.
#[inline(always)]
fn client_key<const L3: usize>(ctx: &TcContext, l3_len: u32, dir: Direction) -> Result<ClientKey, Outcome> {
    let ethertype = if L3 != 0 {
        let t = u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET as usize)?);
        if !tunmeter_common::is_ip_ethertype(t) {
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

/// Add the packet to its client's entry. A client unseen so far gets an entry if its address
/// is inside a subnet of this interface; otherwise the packet goes to the OTHER bucket.
#[inline(always)]
fn count_client(ctx: &TcContext, key: &ClientKey, bytes: u32, dir: Direction) {
    // `::` (e.g. the source of duplicate-address detection) and ff..ff would hit a reserved
    // bucket's entry: they are never clients.
    if key.is_reserved() {
        bump_bucket(&ClientKey::OTHER, dir, Outcome::OutsideSubnets, bytes);
        return;
    }
    if let Some(c) = CLIENT_COUNTERS.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; nothing else writes it while we run.
        unsafe { add(&mut *c, bytes, dir) };
        bump_stats(dir, Outcome::Client, bytes);
        return;
    }
    if !in_client_subnet(ifindex(ctx), key) {
        bump_bucket(&ClientKey::OTHER, dir, Outcome::OutsideSubnets, bytes);
        return;
    }
    let mut fresh = ClientCounters::default();
    add(&mut fresh, bytes, dir);
    match CLIENT_COUNTERS.insert(key, &fresh, BPF_NOEXIST as u64) {
        Ok(()) => bump_stats(dir, Outcome::Client, bytes),
        // Another CPU created it between our lookup and insert: add to it.
        Err(e) if e as i64 == -EEXIST => {
            if let Some(c) = CLIENT_COUNTERS.get_ptr_mut(key) {
                unsafe { add(&mut *c, bytes, dir) };
                bump_stats(dir, Outcome::Client, bytes);
            } else {
                bump_stats(dir, Outcome::MapError, bytes);
            }
        }
        Err(e) if e as i64 == -E2BIG => bump_bucket(&ClientKey::OVERFLOW, dir, Outcome::MapFull, bytes),
        Err(_) => bump_stats(dir, Outcome::MapError, bytes),
    }
}

/// Count into a reserved bucket (created by the daemon at load time, so it exists even when
/// the map is full).
#[inline(always)]
fn bump_bucket(bucket: &ClientKey, dir: Direction, outcome: Outcome, bytes: u32) {
    match CLIENT_COUNTERS.get_ptr_mut(bucket) {
        Some(c) => {
            unsafe { add(&mut *c, bytes, dir) };
            bump_stats(dir, outcome, bytes);
        }
        None => bump_stats(dir, Outcome::MapError, bytes),
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

#[inline(always)]
fn bump_stats(dir: Direction, outcome: Outcome, bytes: u32) {
    if let Some(s) = OUTCOME_STATS.get_ptr_mut(stats_index(dir, outcome)) {
        // SAFETY: per-CPU array slot of this CPU.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
