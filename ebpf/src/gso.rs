//! Wire-byte accounting of GSO/GRO packets (load-time option `WIRE_BYTES`): a merged packet's
//! `skb->len` holds its headers once, while each of its `gso_segs` segments carries them on the
//! wire. With the option on, a client is charged `l3_len + (gso_segs - 1) * header length`.

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use tunmeter_common::{IPPROTO_TCP, IPPROTO_UDP, IPV6_HLEN, TcpHdr, UdpHdr, V6_NEXT_HEADER};

use crate::{packet::read, wire_bytes};

/// Offset of the data-offset byte (high nibble: header length in 32-bit words) in a TCP header.
const TCP_DOFF: usize = core::mem::offset_of!(TcpHdr, off_flags);
/// Offset of the protocol byte in an IPv4 header.
const V4_PROTO: usize = 9;

/// The L3 bytes to charge for a packet whose client was found: `l3_len`, or with wire bytes on
/// and a merged packet, what its segments carry on the wire.
#[inline(always)]
pub fn charged<const L3: usize>(ctx: &TcContext, l3_len: u32) -> u32 {
    if !wire_bytes() {
        return l3_len;
    }
    // SAFETY: the context pointer is the kernel's __sk_buff for this run.
    let segs = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_segs };
    if segs <= 1 {
        return l3_len;
    }
    match headers_len::<L3>(ctx) {
        // At most 65535 segments of at most 120 header bytes: no overflow.
        Some(h) => l3_len.saturating_add((segs - 1).saturating_mul(h)),
        None => l3_len,
    }
}

/// IP plus TCP/UDP header bytes each segment repeats (IPv6 extension headers not included: GSO
/// packets of TCP and UDP rarely carry them, and they are then undercounted, never overcounted).
#[inline(always)]
fn headers_len<const L3: usize>(ctx: &TcContext) -> Option<u32> {
    let first = read::<u16>(ctx, L3).ok()?.to_ne_bytes()[0];
    let (ip_len, proto) = match first >> 4 {
        4 => (((first & 0x0f) as usize) * 4, read::<u16>(ctx, L3 + V4_PROTO).ok()?.to_ne_bytes()[0]),
        6 => (IPV6_HLEN as usize, read::<u16>(ctx, L3 + V6_NEXT_HEADER).ok()?.to_ne_bytes()[0]),
        _ => return None,
    };
    if ip_len < 20 {
        return None;
    }
    let l4_len = match proto {
        IPPROTO_TCP => {
            // The offset is bounded (IHL <= 15) for the verifier.
            let doff = read::<u16>(ctx, L3 + (ip_len & 0x3c) + TCP_DOFF).ok()?.to_ne_bytes()[0] >> 4;
            (doff as usize) * 4
        }
        IPPROTO_UDP => core::mem::size_of::<UdpHdr>(),
        _ => 0,
    };
    Some((ip_len + l4_len) as u32)
}
