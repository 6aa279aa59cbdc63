//! Per-interface totals (`IFACE_STATS`): every packet a program runs on, whatever its outcome,
//! so the daemon can hold the device's own counters against what counting saw (the ledger's
//! self-check). Observes only.

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use tunmeter_common::{Direction, iface_index};

use crate::maps::IFACE_STATS;

/// Add one packet of `l3_bytes` to its device's totals in direction `dir`.
#[inline(always)]
pub fn packet(ctx: &TcContext, dir: Direction, l3_bytes: u32) {
    // SAFETY: the context pointer is the kernel's __sk_buff for this run.
    let (ifindex, segs) = unsafe {
        let skb = ctx.as_ptr() as *const __sk_buff;
        ((*skb).ifindex, (*skb).gso_segs)
    };
    if let Some(c) = IFACE_STATS.get_ptr_mut(iface_index(ifindex, dir)) {
        // SAFETY: per-CPU array slot of this CPU; nothing else writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).segments += if segs > 1 { segs as u64 } else { 1 };
            (*c).bytes += l3_bytes as u64;
        }
    }
}
