//! Packet builders for fixtures: Ethernet, IPv4 (with options and fragments), IPv6, TCP, UDP,
//! ICMP. Checksums are filled in so the packets are what a real stack would send.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_be_bytes([c[0], 0]) };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn tcp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    v.extend_from_slice(payload);
    v
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(payload);
    v
}

pub fn icmp_echo(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    v.extend_from_slice(payload);
    let c = csum(&v);
    v[2..4].copy_from_slice(&c.to_be_bytes());
    v
}

/// IPv4 packet. `options` must be a multiple of 4 bytes; `frag` is the flags+offset field.
pub fn ipv4(src: &str, dst: &str, proto: u8, l4: &[u8], options: &[u8], frag: u16) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + l4.len();
    let s: Ipv4Addr = src.parse().unwrap();
    let d: Ipv4Addr = dst.parse().unwrap();
    let mut v = vec![0x40 | ihl as u8, 0];
    v.extend_from_slice(&(total as u16).to_be_bytes());
    v.extend_from_slice(&[0x12, 0x34]);
    v.extend_from_slice(&frag.to_be_bytes());
    v.extend_from_slice(&[64, proto, 0, 0]);
    v.extend_from_slice(&s.octets());
    v.extend_from_slice(&d.octets());
    v.extend_from_slice(options);
    let c = csum(&v);
    v[10..12].copy_from_slice(&c.to_be_bytes());
    v.extend_from_slice(l4);
    v
}

pub fn ipv6(src: &str, dst: &str, next: u8, l4: &[u8]) -> Vec<u8> {
    let s: Ipv6Addr = src.parse().unwrap();
    let d: Ipv6Addr = dst.parse().unwrap();
    let mut v = vec![0x60, 0, 0, 0];
    v.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    v.extend_from_slice(&[next, 64]);
    v.extend_from_slice(&s.octets());
    v.extend_from_slice(&d.octets());
    v.extend_from_slice(l4);
    v
}

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;

pub fn eth(ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut v = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    v.extend_from_slice(&ethertype.to_be_bytes());
    v.extend_from_slice(l3);
    v
}

/// An ARP request (28 bytes of ARP payload).
pub fn arp() -> Vec<u8> {
    let mut v = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
    v.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 9, 0, 2]);
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 9, 0, 1]);
    v
}

// ---- Builders with valid TCP/UDP/ICMP checksums (steering fixtures) ----

use super::checksum;

fn v4(a: &str) -> [u8; 4] {
    a.parse::<Ipv4Addr>().unwrap().octets()
}

/// TCP segment with a SYN (`flags` 0x02) or other flags, 20-byte header, valid checksum over
/// the IPv4 pseudo-header `src` -> `dst`.
pub fn tcp_valid(src: &str, dst: &str, sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v.extend_from_slice(&0x1122_3344u32.to_be_bytes());
    v.extend_from_slice(&(if flags & 0x10 != 0 { 0x5566_7788u32 } else { 0 }).to_be_bytes());
    v.extend_from_slice(&[0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    v.extend_from_slice(payload);
    checksum::fill_l4_checksum(v4(src), v4(dst), TCP, &mut v);
    v
}

/// UDP datagram with a valid checksum over the IPv4 pseudo-header `src` -> `dst` (a computed
/// 0 is sent as 0xffff).
pub fn udp_valid(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = udp(sport, dport, payload);
    checksum::fill_l4_checksum(v4(src), v4(dst), UDP, &mut v);
    v
}

/// IPv4 packet with an explicit identification and flags+offset field; header checksum valid.
/// `total_len` overrides the total length field (None = header + `l4`).
#[allow(clippy::too_many_arguments)]
pub fn ipv4_with(
    src: &str,
    dst: &str,
    proto: u8,
    l4: &[u8],
    options: &[u8],
    id: u16,
    frag: u16,
    total_len: Option<u16>,
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let ihl = 5 + options.len() / 4;
    let total = total_len.unwrap_or((ihl * 4 + l4.len()) as u16);
    let mut v = vec![0x40 | ihl as u8, 0];
    v.extend_from_slice(&total.to_be_bytes());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&frag.to_be_bytes());
    v.extend_from_slice(&[64, proto, 0, 0]);
    v.extend_from_slice(&v4(src));
    v.extend_from_slice(&v4(dst));
    v.extend_from_slice(options);
    checksum::fill_ipv4_checksum(&mut v);
    v.extend_from_slice(l4);
    v
}

/// IPv4 flag: more fragments.
pub const IP_MF: u16 = 0x2000;
/// IPv4 flag: don't fragment.
pub const IP_DF: u16 = 0x4000;

/// Split the whole L4 datagram `datagram` (header included) into IPv4 fragments with
/// identification `id`: fragment payload sizes `sizes` (each but the last a multiple of 8;
/// what remains goes into a last fragment). Valid header checksums.
pub fn ipv4_fragments(src: &str, dst: &str, proto: u8, id: u16, datagram: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut off = 0;
    let mut sizes = sizes.to_vec();
    let used: usize = sizes.iter().sum();
    assert!(used < datagram.len());
    sizes.push(datagram.len() - used);
    for (i, n) in sizes.iter().enumerate() {
        let last = i + 1 == sizes.len();
        assert!(last || n % 8 == 0, "fragment sizes must be multiples of 8");
        let field = ((off / 8) as u16) | if last { 0 } else { IP_MF };
        out.push(ipv4_with(src, dst, proto, &datagram[off..off + n], &[], id, field, None));
        off += n;
    }
    out
}

/// ICMPv4 message `typ`/`code` with the 4 bytes after the checksum `rest` (unused, or the
/// next-hop MTU for fragmentation-needed) and the quoted datagram; valid ICMP checksum.
pub fn icmp_error(typ: u8, code: u8, rest: u32, quote: &[u8]) -> Vec<u8> {
    let mut v = vec![typ, code, 0, 0];
    v.extend_from_slice(&rest.to_be_bytes());
    v.extend_from_slice(quote);
    checksum::fill_icmp_checksum(&mut v);
    v
}
