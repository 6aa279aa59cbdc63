//! tunmeter's TC programs: the entry points, the load-time globals, the panic handler and the
//! license. Each attached program counts the packet (`count`), then steers it (`steer`), and turns
//! the steering [`Verdict`](verdict::Verdict) into the TC action; nothing is logged per packet.
#![no_std]
#![no_main]
// The atomic add intrinsic: the BPF target's core has no `AtomicU64::fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

// Module graph (siblings form a DAG; any module may use this root's globals):
//   count            -> iface, maps, packet, stats, gso
//   iface            -> maps
//   steer            -> forward, redirect, verdict
//   forward/redirect -> maps, packet, stats, verdict
//   verdict          -> stats -> maps
mod count;
mod forward;
mod gso;
mod iface;
mod maps;
mod packet;
mod redirect;
mod stats;
mod steer;
mod verdict;

use aya_ebpf::{
    Global,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_jiffies64,
    macros::classifier,
    programs::TcContext,
};
use tunmeter_common::Direction;

/// Where the IP header starts: 0 on tun/wg devices, 14 on Ethernet. Set by the loader
/// (`L3_OFFSET`); one object is loaded once per value.
#[unsafe(no_mangle)]
static L3_OFFSET: Global<u32> = Global::new(0);

/// `skb->mark` of redirected packets, matched by the daemon's local-delivery policy route
/// (`REDIRECT_MARK`, from the config).
#[unsafe(no_mangle)]
static REDIRECT_MARK: Global<u32> = Global::new(0x746d_0001);

/// 1: charge a GSO/GRO packet with the L3 bytes its segments have on the wire (each segment
/// repeats the IP and TCP/UDP headers), from `gso_segs`; 0 (default): charge `skb->len` minus
/// the L2 header. Set by the loader (`WIRE_BYTES`, from `count_wire_bytes`); frozen, so the
/// default path does not contain the wire-byte code at all.
#[unsafe(no_mangle)]
static WIRE_BYTES: Global<u32> = Global::new(0);

/// Whether wire bytes are counted (a constant to the verifier).
#[inline(always)]
fn wire_bytes() -> bool {
    WIRE_BYTES.load() != 0
}

/// The L3 offset as the verifier sees it: a constant, so only one branch is kept.
#[inline(always)]
fn l3_offset() -> u32 {
    L3_OFFSET.load()
}

/// The mark a redirected packet gets.
#[inline(always)]
fn redirect_mark() -> u32 {
    REDIRECT_MARK.load()
}

/// TC ingress: upload. Counting only observes; steering passes (TCX_NEXT) every packet it does
/// not have to drop, so the next TCX program or tc filter on the device still runs.
#[classifier]
fn tunmeter_in(ctx: TcContext) -> i32 {
    count::packet(&ctx, Direction::Upload);
    steer::ingress(&ctx).tc_action()
}

/// TC egress: download.
#[classifier]
fn tunmeter_out(ctx: TcContext) -> i32 {
    count::packet(&ctx, Direction::Download);
    steer::egress(&ctx).tc_action()
}

/// Not attached anywhere: run by the daemon and CLI through BPF_PROG_TEST_RUN to read the
/// kernel's jiffies (written into the first 8 bytes of the test packet), so that last-seen
/// stamps can be turned into wall-clock time. Its return value is a status for the test run
/// (`TC_ACT_OK`: a reading), not a verdict on a packet.
#[classifier]
fn tunmeter_clock(ctx: TcContext) -> i32 {
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
fn tunmeter_empty(_ctx: TcContext) -> i32 {
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
