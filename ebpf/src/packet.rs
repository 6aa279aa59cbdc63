//! Reading packet fields (straight from the linear data, else `bpf_skb_load_bytes`) and
//! rewriting them with the TC store and checksum helpers. Header layouts and offsets are the
//! `#[repr(C)]` structs of `tunmeter_common::headers`.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use tunmeter_common::{
    ETH_P_IP, ETH_TYPE_OFFSET, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, L4_DPORT, L4_SPORT, Outcome, SteerEvent, TCP_CSUM,
    UDP_CSUM, V4_CSUM, V4_DST, V4_SRC,
};

/// Read a field (`u16`, `u32`, `[u64; 2]`, a header struct) at a constant offset: straight from
/// the linear packet data when it is there (the usual case), else through
/// `bpf_skb_load_bytes`. A failed read means the packet is shorter than its headers claim.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Outcome> {
    let start = ctx.data();
    if start + off + size_of::<T>() <= ctx.data_end() {
        // SAFETY: bounds checked against data_end just above. Whole-word loads, not
        // `read_unaligned` (which the BPF backend splits into byte loads, ~3x the hot-path
        // instructions): header fields may sit at 2-byte alignment, and the verifier accepts
        // such packet loads on the architectures that run this (x86-64, arm64: efficient
        // unaligned access). A strict-alignment kernel would refuse the program at load time,
        // loudly, never miscount.
        #[allow(clippy::cast_ptr_alignment)]
        return Ok(unsafe { core::ptr::read((start + off) as *const T) });
    }
    ctx.load::<T>(off).map_err(|_| Outcome::Truncated)
}

/// Bytes from the IP header at `L3` to the end of the packet: what every counter charges.
#[inline(always)]
pub fn l3_len<const L3: usize>(ctx: &TcContext) -> u32 {
    ctx.len().saturating_sub(L3 as u32)
}

/// The IPv4 header at `L3`, if the packet is IPv4 with a sane header (else: not ours, pass).
#[inline(always)]
pub fn ipv4<const L3: usize>(ctx: &TcContext) -> Option<Ipv4Hdr> {
    if L3 != 0 && u16::from_be(read::<u16>(ctx, ETH_TYPE_OFFSET as usize).ok()?) != ETH_P_IP {
        return None;
    }
    let h: Ipv4Hdr = read(ctx, L3).ok()?;
    if h.ver_ihl >> 4 != 4 || h.ver_ihl & 0x0f < 5 {
        return None;
    }
    // A total length shorter than the header is malformed. 0 is left alone: BIG TCP GSO
    // packets carry 0 there.
    let tot = u16::from_be(h.tot_len) as usize;
    if tot != 0 && tot < h.ihl() {
        return None;
    }
    Some(h)
}

/// Source and destination port (network order) of the transport header at `l4`, if the whole
/// header up to and including its checksum is in the packet.
#[inline(always)]
pub fn ports(ctx: &TcContext, l4: usize, proto: u8) -> Option<[u16; 2]> {
    let need = match proto {
        IPPROTO_TCP => TCP_CSUM + size_of::<u16>(),
        IPPROTO_UDP => UDP_CSUM + size_of::<u16>(),
        _ => return None,
    };
    if (ctx.len() as usize) < l4 + need {
        return None;
    }
    read::<[u16; 2]>(ctx, l4).ok()
}

/// Offset of the transport checksum within a TCP or UDP header.
#[inline(always)]
pub fn l4_csum_field(proto: u8) -> usize {
    if proto == IPPROTO_TCP { TCP_CSUM } else { UDP_CSUM }
}

/// `BPF_F_MARK_MANGLED_0` for UDP: a zero checksum (none) stays zero, and a computed zero is
/// written as 0xffff.
#[inline(always)]
fn mangled(proto: u8) -> u64 {
    if proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

/// A rewrite that failed part way: the caller must drop the packet.
pub struct RewriteFailed;

impl From<RewriteFailed> for SteerEvent {
    #[inline(always)]
    fn from(_: RewriteFailed) -> Self {
        SteerEvent::RewriteFailed
    }
}

/// Replace the IPv4 address at `l3 + field` (`V4_SRC` / `V4_DST`): IP header checksum, and,
/// with `l4 = Some((offset of the transport checksum, proto))`, the transport checksum whose
/// pseudo-header holds the address.
#[inline(always)]
pub fn set_v4_addr(
    ctx: &TcContext,
    l3: usize,
    field: usize,
    old: u32,
    new: u32,
    l4: Option<(usize, u8)>,
) -> Result<(), RewriteFailed> {
    ctx.l3_csum_replace(l3 + V4_CSUM, old as u64, new as u64, 4).map_err(|_| RewriteFailed)?;
    if let Some((csum, proto)) = l4 {
        l4_csum_addr(ctx, csum, old, new, proto)?;
    }
    ctx.store(l3 + field, &new, 0).map_err(|_| RewriteFailed)
}

/// Fix the transport checksum at `csum` for an address of its pseudo-header changing.
#[inline(always)]
fn l4_csum_addr(ctx: &TcContext, csum: usize, old: u32, new: u32, proto: u8) -> Result<(), RewriteFailed> {
    ctx.l4_csum_replace(csum, old as u64, new as u64, BPF_F_PSEUDO_HDR as u64 | mangled(proto) | 4)
        .map_err(|_| RewriteFailed)
}

/// Fix the checksum at `csum` for a 16-bit field it covers changing (a port).
#[inline(always)]
fn l4_csum_u16(ctx: &TcContext, csum: usize, old: u16, new: u16, proto: u8) -> Result<(), RewriteFailed> {
    ctx.l4_csum_replace(csum, old as u64, new as u64, mangled(proto) | 2).map_err(|_| RewriteFailed)
}

/// Replace a 16-bit field at `at` (a port) and fix the checksum at `csum` that covers it.
#[inline(always)]
pub fn set_u16(ctx: &TcContext, at: usize, old: u16, new: u16, csum: usize, proto: u8) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    l4_csum_u16(ctx, csum, old, new, proto)?;
    ctx.store(at, &new, 0).map_err(|_| RewriteFailed)
}

/// One's-complement update of the IPv4 header checksum `csum` (as stored) for a 32-bit field
/// changing from `old` to `new` (both as stored): RFC 1624, HC' = ~(~HC + ~m + m'), on the
/// 16-bit words in memory order, which makes it independent of the byte order.
#[inline(always)]
fn csum_replace4(csum: u16, old: u32, new: u32) -> u16 {
    let [o0, o1, o2, o3] = old.to_ne_bytes();
    let [n0, n1, n2, n3] = new.to_ne_bytes();
    let mut sum = (!csum) as u32
        + (!u16::from_ne_bytes([o0, o1])) as u32
        + (!u16::from_ne_bytes([o2, o3])) as u32
        + u16::from_ne_bytes([n0, n1]) as u32
        + u16::from_ne_bytes([n2, n3]) as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Which side of an IPv4 TCP/UDP packet a NAT rewrite changes.
#[derive(Clone, Copy, PartialEq)]
pub enum Side {
    /// Source address and source port (a reply going back out).
    Source,
    /// Destination address and destination port (toward a forwarded device).
    Destination,
}

/// Rewrite one side's address and port of the TCP/UDP packet with header `h` at `l3`, whose
/// ports (as read) are `ports`, and fix both checksums. For a header without options, three
/// helper calls: the transport checksum for the address (pseudo-header) and for the port
/// (only the kernel knows whether that checksum is a partial one), then one store of bytes
/// 10..24 (the IP checksum, computed here, both addresses and both ports). With IP options
/// the ports are not next to the addresses: a store per field, and the IP checksum helper.
#[inline(always)]
pub fn nat_v4(
    ctx: &TcContext,
    l3: usize,
    h: &Ipv4Hdr,
    ports: [u16; 2],
    side: Side,
    new_addr: u32,
    new_port: u16,
) -> Result<(), RewriteFailed> {
    let l4 = l3 + h.ihl();
    let csum = l4 + l4_csum_field(h.proto);
    let (field, old_addr, port_at, old_port) = match side {
        Side::Source => (V4_SRC, h.src, l4 + L4_SPORT, ports[0]),
        Side::Destination => (V4_DST, h.dst, l4 + L4_DPORT, ports[1]),
    };
    if h.ihl() != size_of::<Ipv4Hdr>() {
        set_v4_addr(ctx, l3, field, old_addr, new_addr, Some((csum, h.proto)))?;
        return set_u16(ctx, port_at, old_port, new_port, csum, h.proto);
    }
    l4_csum_addr(ctx, csum, old_addr, new_addr, h.proto)?;
    if old_port != new_port {
        l4_csum_u16(ctx, csum, old_port, new_port, h.proto)?;
    }
    let (src, dst, sport, dport) = match side {
        Side::Source => (new_addr, h.dst, new_port, ports[1]),
        Side::Destination => (h.src, new_addr, ports[0], new_port),
    };
    let [s0, s1, s2, s3] = src.to_ne_bytes();
    let [d0, d1, d2, d3] = dst.to_ne_bytes();
    let words: [u16; 7] = [
        csum_replace4(h.csum, old_addr, new_addr),
        u16::from_ne_bytes([s0, s1]),
        u16::from_ne_bytes([s2, s3]),
        u16::from_ne_bytes([d0, d1]),
        u16::from_ne_bytes([d2, d3]),
        sport,
        dport,
    ];
    ctx.store(l3 + V4_CSUM, &words, 0).map_err(|_| RewriteFailed)
}
