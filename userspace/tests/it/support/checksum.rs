//! Internet checksums (RFC 1071) computed from scratch, independent of the kernel and of the packet
//! builder (`support::packet`): used to verify what a program wrote. Every `*_problems` function
//! returns a list of human-readable findings; empty = valid.

use std::net::Ipv4Addr;

/// One's-complement sum of `data` as big-endian 16-bit words (odd length: zero-padded), added
/// to `init`, not folded.
pub fn sum(data: &[u8], init: u32) -> u32 {
    let mut s = init as u64;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        s += w as u64;
    }
    fold32(s)
}

fn fold32(mut s: u64) -> u32 {
    while s >> 32 != 0 {
        s = (s & 0xffff_ffff) + (s >> 32);
    }
    s as u32
}

/// Fold a 32-bit sum to 16 bits with end-around carry.
pub fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The Internet checksum of `data` (the checksum field inside it must be zero).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data, 0))
}

/// Sum of the IPv4 pseudo-header.
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum(&p, 0)
}

/// Offset of the checksum field in a TCP (16) or UDP (6) header.
pub fn l4_csum_offset(proto: u8) -> usize {
    match proto {
        6 => 16,
        17 => 6,
        _ => panic!("no L4 checksum for protocol {proto}"),
    }
}

/// The checksum a sender puts in the TCP/UDP header `segment` (header + payload, the whole
/// datagram) between `src` and `dst`; the segment's own checksum field is ignored. UDP: a
/// computed 0 is sent as 0xffff (RFC 768), 0 meaning "no checksum".
pub fn l4_checksum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let off = l4_csum_offset(proto);
    let mut seg = segment.to_vec();
    seg[off] = 0;
    seg[off + 1] = 0;
    let c = !fold(sum(&seg, pseudo_sum(src, dst, proto, seg.len())));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// True if the TCP/UDP checksum of the whole `segment` verifies over the pseudo-header. A UDP
/// checksum of 0 means "none" and is accepted.
pub fn l4_valid(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> bool {
    let off = l4_csum_offset(proto);
    if segment.len() < off + 2 {
        return false;
    }
    if proto == 17 && segment[off..off + 2] == [0, 0] {
        return true;
    }
    fold(sum(segment, pseudo_sum(src, dst, proto, segment.len()))) == 0xffff
}

/// Header length of the IPv4 packet `ip` (from IHL), if plausible.
pub fn ipv4_ihl(ip: &[u8]) -> Option<usize> {
    let ihl = (*ip.first()? & 0x0f) as usize * 4;
    (ip.len() >= ihl && ihl >= 20 && ip[0] >> 4 == 4).then_some(ihl)
}

/// The header checksum an IPv4 header should carry.
pub fn ipv4_header_checksum(hdr: &[u8]) -> u16 {
    let mut h = hdr.to_vec();
    h[10] = 0;
    h[11] = 0;
    checksum(&h)
}

/// True if the IPv4 header at the start of `ip` has a valid checksum.
pub fn ipv4_header_valid(ip: &[u8]) -> bool {
    match ipv4_ihl(ip) {
        Some(ihl) => fold(sum(&ip[..ihl], 0)) == 0xffff,
        None => false,
    }
}

/// True if the ICMP message's checksum (over the whole message) verifies.
pub fn icmp_valid(msg: &[u8]) -> bool {
    msg.len() >= 8 && fold(sum(msg, 0)) == 0xffff
}

/// Write the ICMP checksum of `msg`.
pub fn fill_icmp_checksum(msg: &mut [u8]) {
    msg[2] = 0;
    msg[3] = 0;
    let c = checksum(msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
}

/// ICMPv4 error types that quote the offending datagram.
pub fn is_icmp_error(typ: u8) -> bool {
    matches!(typ, 3 | 4 | 5 | 11 | 12)
}

fn a4(b: &[u8]) -> [u8; 4] {
    [b[0], b[1], b[2], b[3]]
}

/// Every checksum problem of the IPv4 packet `ip` (starting at the IP header): header
/// checksum; TCP/UDP checksum if the packet is a whole datagram (not a fragment) and its
/// segment is complete; ICMP checksum; for an ICMP error, the quoted IPv4 header's checksum.
/// The quoted TCP/UDP checksum is not checked (quotes are usually cut short and it is not
/// translated). Empty = valid.
pub fn ipv4_problems(ip: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(ihl) = ipv4_ihl(ip) else {
        out.push("not a parseable IPv4 header".into());
        return out;
    };
    if !ipv4_header_valid(ip) {
        out.push(format!(
            "IPv4 header checksum invalid: have {:#06x}, want {:#06x}",
            u16::from_be_bytes([ip[10], ip[11]]),
            ipv4_header_checksum(&ip[..ihl])
        ));
    }
    let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).min(ip.len());
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    let is_fragment = frag & 0x3fff != 0;
    let proto = ip[9];
    let (src, dst) = (a4(&ip[12..16]), a4(&ip[16..20]));
    let l4 = &ip[ihl.min(total)..total];
    match proto {
        6 | 17 if !is_fragment => {
            if l4.len() >= l4_csum_offset(proto) + 2 && !l4_valid(src, dst, proto, l4) {
                out.push(format!(
                    "{} checksum invalid: have {:#06x}, want {:#06x} (pseudo-header {} -> {})",
                    if proto == 6 { "TCP" } else { "UDP" },
                    u16::from_be_bytes([l4[l4_csum_offset(proto)], l4[l4_csum_offset(proto) + 1]]),
                    l4_checksum(src, dst, proto, l4),
                    Ipv4Addr::from(src),
                    Ipv4Addr::from(dst)
                ));
            }
        }
        1 if !is_fragment => {
            if !icmp_valid(l4) {
                let mut m = l4.to_vec();
                let have = if m.len() >= 4 { u16::from_be_bytes([m[2], m[3]]) } else { 0 };
                let want = if m.len() >= 8 {
                    fill_icmp_checksum(&mut m);
                    u16::from_be_bytes([m[2], m[3]])
                } else {
                    0
                };
                out.push(format!("ICMP checksum invalid: have {have:#06x}, want {want:#06x}"));
            }
            if l4.len() >= 28 && is_icmp_error(l4[0]) {
                let inner = &l4[8..];
                if !ipv4_header_valid(inner) {
                    let want = ipv4_ihl(inner).map(|h| ipv4_header_checksum(&inner[..h])).unwrap_or(0);
                    out.push(format!(
                        "inner (quoted) IPv4 header checksum invalid: have {:#06x}, want {want:#06x}",
                        u16::from_be_bytes([inner[10], inner[11]])
                    ));
                }
            }
        }
        _ => {}
    }
    out
}
