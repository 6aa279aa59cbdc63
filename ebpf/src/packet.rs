//! Reading packet fields and rewriting them with the TC store and checksum helpers.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use tunmeter_common::{ETH_P_IP, ETH_TYPE_OFFSET, IPPROTO_TCP, IPPROTO_UDP, Outcome};

/// Read a field (`u16`, `u32`, `[u64; 2]`, a header struct) at a constant offset: straight from
/// the linear packet data when it is there (the usual case), else through
/// `bpf_skb_load_bytes`. A failed read means the packet is shorter than its headers claim.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Outcome> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() <= ctx.data_end() {
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

/// The fixed IPv4 header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: u16,
    pub src: u32,
    pub dst: u32,
}

/// Offsets inside the IPv4 header.
pub const V4_CSUM: usize = 10;
pub const V4_SRC: usize = 12;
pub const V4_DST: usize = 16;
/// Offsets inside TCP/UDP headers.
pub const L4_SPORT: usize = 0;
pub const L4_DPORT: usize = 2;

impl Ipv4Hdr {
    /// Header length in bytes (20..=60).
    #[inline(always)]
    pub fn ihl(&self) -> usize {
        ((self.ver_ihl & 0x0f) as usize) * 4
    }
    #[inline(always)]
    fn frag(&self) -> u16 {
        u16::from_be(self.frag_off)
    }
    /// A fragment other than the first: it carries no transport header.
    #[inline(always)]
    pub fn is_later_fragment(&self) -> bool {
        self.frag() & 0x1fff != 0
    }
    /// The first fragment of a fragmented datagram (more fragments follow).
    #[inline(always)]
    pub fn is_first_fragment(&self) -> bool {
        self.frag() & 0x3fff == 0x2000
    }
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag() & 0x3fff != 0
    }
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
        IPPROTO_TCP => 18,
        IPPROTO_UDP => 8,
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
    if proto == IPPROTO_TCP { 16 } else { 6 }
}

/// `BPF_F_MARK_MANGLED_0` for UDP: a zero checksum (none) stays zero, and a computed zero is
/// written as 0xffff.
#[inline(always)]
fn mangled(proto: u8) -> u64 {
    if proto == IPPROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 }
}

/// A rewrite that failed part way: the caller must drop the packet.
pub struct RewriteFailed;

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
        ctx.l4_csum_replace(csum, old as u64, new as u64, BPF_F_PSEUDO_HDR as u64 | mangled(proto) | 4)
            .map_err(|_| RewriteFailed)?;
    }
    ctx.store(l3 + field, &new, 0).map_err(|_| RewriteFailed)
}

/// Replace a 16-bit field at `at` (a port) and fix the checksum at `csum` that covers it.
#[inline(always)]
pub fn set_u16(ctx: &TcContext, at: usize, old: u16, new: u16, csum: usize, proto: u8) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(csum, old as u64, new as u64, mangled(proto) | 2).map_err(|_| RewriteFailed)?;
    ctx.store(at, &new, 0).map_err(|_| RewriteFailed)
}
