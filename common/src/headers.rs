//! Packet headers as `#[repr(C)]` structs, the field offsets taken from them with `offset_of!`,
//! and the header decisions of the counting path (family, sanity, client-side address), shared by
//! the kernel programs and host tests, which cover the decisions without a kernel.

use core::mem::{offset_of, size_of};

use crate::stats::{Direction, Outcome};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Ethernet header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub ethertype: u16,
}
const _: () = assert!(size_of::<EthHdr>() == 14);

/// The fixed IPv4 header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
const _: () = assert!(size_of::<Ipv4Hdr>() == 20);

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

/// The fixed IPv6 header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}
const _: () = assert!(size_of::<Ipv6Hdr>() == 40);

/// The TCP header without options, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpHdr {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub off_flags: u16,
    pub window: u16,
    pub csum: u16,
    pub urg_ptr: u16,
}
const _: () = assert!(size_of::<TcpHdr>() == 20);

/// The UDP header, fields in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHdr {
    pub sport: u16,
    pub dport: u16,
    pub len: u16,
    pub csum: u16,
}
const _: () = assert!(size_of::<UdpHdr>() == 8);

/// The ICMP header; an error message quotes the offending packet right after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub csum: u16,
    /// Unused, or the next-hop MTU, in the error types tunmeter translates.
    pub rest: u32,
}
const _: () = assert!(size_of::<IcmpHdr>() == 8);

/// Ethernet header length, the L3 offset on L2 devices.
pub const ETH_HLEN: u32 = size_of::<EthHdr>() as u32;
/// Offset of the EtherType in an Ethernet header.
pub const ETH_TYPE_OFFSET: u32 = offset_of!(EthHdr, ethertype) as u32;
pub const IPV4_HLEN: u32 = size_of::<Ipv4Hdr>() as u32;
pub const IPV6_HLEN: u32 = size_of::<Ipv6Hdr>() as u32;

/// Offsets inside the IPv4 header.
pub const V4_CSUM: usize = offset_of!(Ipv4Hdr, csum);
pub const V4_SRC: usize = offset_of!(Ipv4Hdr, src);
pub const V4_DST: usize = offset_of!(Ipv4Hdr, dst);
/// Offsets inside the IPv6 header.
pub const V6_NEXT_HEADER: usize = offset_of!(Ipv6Hdr, next_header);
pub const V6_SRC: usize = offset_of!(Ipv6Hdr, src);
pub const V6_DST: usize = offset_of!(Ipv6Hdr, dst);
/// Offsets of the ports inside TCP and UDP headers (the same in both).
pub const L4_SPORT: usize = offset_of!(UdpHdr, sport);
pub const L4_DPORT: usize = offset_of!(UdpHdr, dport);
const _: () = assert!(offset_of!(TcpHdr, sport) == L4_SPORT && offset_of!(TcpHdr, dport) == L4_DPORT);
/// Offsets of the checksums inside TCP, UDP and ICMP headers.
pub const TCP_CSUM: usize = offset_of!(TcpHdr, csum);
/// The TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10): the second byte of
/// the data-offset/flags word.
pub const TCP_FLAGS: usize = offset_of!(TcpHdr, off_flags) + 1;
pub const UDP_CSUM: usize = offset_of!(UdpHdr, csum);
pub const ICMP_CSUM: usize = offset_of!(IcmpHdr, csum);
/// Where the packet quoted by an ICMP error starts, from the ICMP header.
pub const ICMP_QUOTE: usize = size_of::<IcmpHdr>();

/// IP family of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Decide the family from the EtherType (L2 devices; host byte order) or, on L3 devices
/// (`ethertype == None`), from the version nibble of the first IP byte.
///
/// On L2 the version nibble must agree with the EtherType, else the packet is
/// [`Outcome::Malformed`].
#[inline(always)]
pub fn family(ethertype: Option<u16>, first_byte: u8) -> Result<Family, Outcome> {
    let version = first_byte >> 4;
    match ethertype {
        Some(ETH_P_IP) if version == 4 => Ok(Family::V4),
        Some(ETH_P_IPV6) if version == 6 => Ok(Family::V6),
        Some(ETH_P_IP) | Some(ETH_P_IPV6) => Err(Outcome::Malformed),
        Some(_) => Err(Outcome::NotIp),
        None => match version {
            4 => Ok(Family::V4),
            6 => Ok(Family::V6),
            _ => Err(Outcome::NotIp),
        },
    }
}

/// Only EtherTypes that can carry a counted packet.
#[inline(always)]
pub fn is_ip_ethertype(ethertype: u16) -> bool {
    ethertype == ETH_P_IP || ethertype == ETH_P_IPV6
}

/// Check the fixed header is present (`l3_len` = bytes from the IP header to the end of the
/// packet) and sane. Options, extension headers and fragments need nothing more: the addresses
/// sit at fixed offsets in the fixed header.
#[inline(always)]
pub fn check_header(family: Family, first_byte: u8, l3_len: u32) -> Result<(), Outcome> {
    match family {
        Family::V4 => {
            if l3_len < IPV4_HLEN {
                Err(Outcome::Truncated)
            } else if first_byte & 0x0f < 5 {
                Err(Outcome::Malformed)
            } else {
                Ok(())
            }
        }
        Family::V6 => {
            if l3_len < IPV6_HLEN {
                Err(Outcome::Truncated)
            } else {
                Ok(())
            }
        }
    }
}

/// Offset, from the IP header, of the client-side address: the source on upload
/// (the client sent it), the destination on download.
#[inline(always)]
pub const fn client_addr_offset(family: Family, dir: Direction) -> u32 {
    (match (family, dir) {
        (Family::V4, Direction::Upload) => V4_SRC,
        (Family::V4, Direction::Download) => V4_DST,
        (Family::V6, Direction::Upload) => V6_SRC,
        (Family::V6, Direction::Download) => V6_DST,
    }) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_from_l3_version_nibble() {
        assert_eq!(family(None, 0x45), Ok(Family::V4));
        assert_eq!(family(None, 0x60), Ok(Family::V6));
        assert_eq!(family(None, 0x00), Err(Outcome::NotIp));
        assert_eq!(family(None, 0x55), Err(Outcome::NotIp));
    }

    #[test]
    fn family_from_ethertype_must_agree_with_version() {
        assert_eq!(family(Some(ETH_P_IP), 0x45), Ok(Family::V4));
        assert_eq!(family(Some(ETH_P_IPV6), 0x6f), Ok(Family::V6));
        assert_eq!(family(Some(ETH_P_IP), 0x60), Err(Outcome::Malformed));
        assert_eq!(family(Some(ETH_P_IPV6), 0x45), Err(Outcome::Malformed));
        assert_eq!(family(Some(0x0806), 0x45), Err(Outcome::NotIp)); // ARP
        assert!(!is_ip_ethertype(0x8100));
        assert!(is_ip_ethertype(ETH_P_IPV6));
    }

    #[test]
    fn header_checks() {
        assert_eq!(check_header(Family::V4, 0x45, 20), Ok(()));
        assert_eq!(check_header(Family::V4, 0x4f, 60), Ok(())); // with options
        assert_eq!(check_header(Family::V4, 0x45, 19), Err(Outcome::Truncated));
        assert_eq!(check_header(Family::V4, 0x44, 40), Err(Outcome::Malformed));
        assert_eq!(check_header(Family::V6, 0x60, 40), Ok(()));
        assert_eq!(check_header(Family::V6, 0x60, 39), Err(Outcome::Truncated));
    }

    #[test]
    fn offsets_are_the_wire_format() {
        // RFC 894, 791, 8200, 9293, 768 and 792 positions.
        assert_eq!((ETH_HLEN, ETH_TYPE_OFFSET, IPV4_HLEN, IPV6_HLEN), (14, 12, 20, 40));
        assert_eq!((V4_CSUM, V4_SRC, V4_DST), (10, 12, 16));
        assert_eq!((V6_NEXT_HEADER, V6_SRC, V6_DST), (6, 8, 24));
        assert_eq!((L4_SPORT, L4_DPORT, TCP_CSUM, TCP_FLAGS, UDP_CSUM), (0, 2, 16, 13, 6));
        assert_eq!((ICMP_CSUM, ICMP_QUOTE), (2, 8));
    }

    #[test]
    fn ipv4_fragment_bits() {
        let h = |frag: u16| Ipv4Hdr {
            ver_ihl: 0x46,
            tos: 0,
            tot_len: 0,
            id: 0,
            frag_off: frag.to_be(),
            ttl: 64,
            proto: IPPROTO_UDP,
            csum: 0,
            src: 0,
            dst: 0,
        };
        assert_eq!(h(0).ihl(), 24);
        let df = h(0x4000); // don't fragment: not a fragment
        assert!(!df.is_fragment() && !df.is_first_fragment() && !df.is_later_fragment());
        let first = h(0x2000); // more fragments, offset 0
        assert!(first.is_fragment() && first.is_first_fragment() && !first.is_later_fragment());
        let last = h(0x0010); // offset 16 * 8, no more fragments
        assert!(last.is_fragment() && !last.is_first_fragment() && last.is_later_fragment());
    }

    #[test]
    fn address_offsets_pick_the_client_side() {
        // A real IPv4 header: 10.8.0.2 -> 1.1.1.1.
        let hdr: [u8; 20] = [0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 8, 0, 2, 1, 1, 1, 1];
        let up = client_addr_offset(Family::V4, Direction::Upload) as usize;
        let down = client_addr_offset(Family::V4, Direction::Download) as usize;
        assert_eq!(&hdr[up..up + 4], &[10, 8, 0, 2]);
        assert_eq!(&hdr[down..down + 4], &[1, 1, 1, 1]);
        assert_eq!(client_addr_offset(Family::V6, Direction::Upload), 8);
        assert_eq!(client_addr_offset(Family::V6, Direction::Download), 24);
    }
}
