//! A typed packet builder for fixtures, benchmarks and fuzzing: IPv4 (options, fragments) and
//! IPv6 (extension headers), TCP, UDP, ICMP and ICMPv6 (echo, errors quoting another packet),
//! raw L4 bytes, ARP and junk, optionally in an Ethernet frame. Checksums are right unless a
//! setter says otherwise; deliberately broken fields have their own setters.
//!
//! ```ignore
//! let syn = Packet::tcp().src("10.8.0.2").dst("1.1.1.1").ports(40000, 443).syn().eth().build();
//! let frags = Packet::udp().src(a).dst(b).ports(1, 2).payload(&data).id(7).fragments(&[400]);
//! ```
//!
//! Defaults: TTL/hop limit 64, IPv4 id 0x1234, TCP seq 0x11223344, ack 0x55667788 when ACK is
//! set (else 0), window 0xfaf0, no TCP flags; ICMP echo id 0x1234, seq 1; Ethernet
//! 02:00:00:00:00:02 -> 02:00:00:00:00:01. TCP/UDP/ICMP setters are in `l4`, serialisation in
//! `wire`, IPv6 extension headers in `ext`; the checksums are computed here independently of `support::checksum`, which
//! verifies them.

mod ext;
mod l4;
#[cfg(test)]
mod tests;
mod wire;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use ext::Ext;

/// IP protocol numbers.
pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;

/// EtherTypes.
pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;

/// IPv4 flags in the flags + fragment offset field.
pub const IP_MF: u16 = 0x2000;
pub const IP_DF: u16 = 0x4000;

/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// An address for `src`/`dst`: `"10.8.0.2"`, `"fd00:8::2"`, or a parsed address.
pub trait ToIp {
    fn to_ip(self) -> IpAddr;
}

impl ToIp for &str {
    fn to_ip(self) -> IpAddr {
        self.parse().unwrap_or_else(|e| panic!("bad address {self:?}: {e}"))
    }
}
impl ToIp for &String {
    fn to_ip(self) -> IpAddr {
        self.as_str().to_ip()
    }
}
impl ToIp for IpAddr {
    fn to_ip(self) -> IpAddr {
        self
    }
}
impl ToIp for Ipv4Addr {
    fn to_ip(self) -> IpAddr {
        self.into()
    }
}
impl ToIp for Ipv6Addr {
    fn to_ip(self) -> IpAddr {
        self.into()
    }
}

/// What the IP packet carries (or, for `Arp` and `Junk`, what the frame carries instead of IP).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: Option<u32>,
        flags: u8,
        window: u16,
        options: Vec<u8>,
        data: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        len: Option<u16>,
        data: Vec<u8>,
    },
    /// ICMP (`v6` false) or ICMPv6: type, code, the 4 bytes after the checksum, the rest.
    Icmp {
        v6: bool,
        typ: u8,
        code: u8,
        rest: u32,
        data: Vec<u8>,
    },
    /// L4 bytes as given, under protocol number `proto` (a later fragment, garbage, ...).
    L4 {
        proto: u8,
        bytes: Vec<u8>,
    },
    Arp,
    /// Not IP: these bytes are the whole L3 part.
    Junk(Vec<u8>),
}

/// A packet being described; [`Packet::build`] makes its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    body: Body,
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    ttl: u8,
    tos: u8,
    id: u16,
    frag_offset: u16,
    more_fragments: bool,
    dont_fragment: bool,
    frag_field: Option<u16>,
    options: Vec<u8>,
    ext: Vec<Ext>,
    ihl: Option<u8>,
    ip_len_field: Option<u16>,
    ip_checksum: Option<u16>,
    bad_ip_checksum: bool,
    l4_checksum: Option<u16>,
    bad_l4_checksum: bool,
    truncate_l4: Option<usize>,
    pokes: Vec<(usize, u8)>,
    truncate: Option<usize>,
    eth: bool,
    ethertype: Option<u16>,
    pad_to: usize,
}

impl Packet {
    fn with(body: Body) -> Packet {
        Packet {
            body,
            src: None,
            dst: None,
            ttl: 64,
            tos: 0,
            id: 0x1234,
            frag_offset: 0,
            more_fragments: false,
            dont_fragment: false,
            frag_field: None,
            options: Vec::new(),
            ext: Vec::new(),
            ihl: None,
            ip_len_field: None,
            ip_checksum: None,
            bad_ip_checksum: false,
            l4_checksum: None,
            bad_l4_checksum: false,
            truncate_l4: None,
            pokes: Vec::new(),
            truncate: None,
            eth: false,
            ethertype: None,
            pad_to: 0,
        }
    }

    /// A TCP segment: 20-byte header, no flags, no data.
    pub fn tcp() -> Packet {
        Packet::with(Body::Tcp {
            sport: 0,
            dport: 0,
            seq: 0x1122_3344,
            ack: None,
            flags: 0,
            window: 0xfaf0,
            options: Vec::new(),
            data: Vec::new(),
        })
    }

    /// A TCP data segment without a checksum, for tests that read none (counting, parsing):
    /// PSH+ACK, seq 1, ack 0, window 0xffff, checksum 0.
    pub fn bare_tcp() -> Packet {
        Packet::tcp().psh().ack().seq(1).ack_no(0).window(0xffff).l4_checksum(0)
    }

    /// A UDP datagram with no data.
    pub fn udp() -> Packet {
        Packet::with(Body::Udp { sport: 0, dport: 0, len: None, data: Vec::new() })
    }

    /// An ICMP echo request (type 8), id 0x1234, seq 1.
    pub fn icmp() -> Packet {
        Packet::with(Body::Icmp { v6: false, typ: 8, code: 0, rest: 0x1234_0001, data: Vec::new() })
    }

    /// An ICMPv6 echo request (type 128), id 0x1234, seq 1.
    pub fn icmpv6() -> Packet {
        Packet::with(Body::Icmp { v6: true, typ: 128, code: 0, rest: 0x1234_0001, data: Vec::new() })
    }

    /// An ICMP error (type 3 destination unreachable, 11 time exceeded, ...): the 4 bytes after
    /// the checksum are 0 (see [`Packet::rest`]); [`Packet::quote`] gives the offending packet.
    pub fn icmp_error(typ: u8, code: u8) -> Packet {
        Packet::with(Body::Icmp { v6: false, typ, code, rest: 0, data: Vec::new() })
    }

    /// An ICMPv6 error (type 1 destination unreachable, 2 packet too big, ...).
    pub fn icmpv6_error(typ: u8, code: u8) -> Packet {
        Packet::with(Body::Icmp { v6: true, typ, code, rest: 0, data: Vec::new() })
    }

    /// Raw L4 bytes under IP protocol `proto` (a later fragment, an unknown protocol, garbage).
    pub fn l4(proto: u8, bytes: impl AsRef<[u8]>) -> Packet {
        Packet::with(Body::L4 { proto, bytes: bytes.as_ref().to_vec() })
    }

    /// An ARP request (28 bytes) for 10.9.0.1 from 10.9.0.2; EtherType 0x0806 in a frame.
    pub fn arp() -> Packet {
        Packet::with(Body::Arp)
    }

    /// Not an IP packet: `bytes` are the whole L3 part (EtherType 0x0800 in a frame unless
    /// [`Packet::ethertype`] says otherwise).
    pub fn junk(bytes: impl AsRef<[u8]>) -> Packet {
        Packet::with(Body::Junk(bytes.as_ref().to_vec()))
    }

    // ---- IP --------------------------------------------------------------------------------

    /// Source address; its family (with the destination's) makes the packet IPv4 or IPv6.
    pub fn src(mut self, a: impl ToIp) -> Packet {
        self.src = Some(a.to_ip());
        self
    }

    pub fn dst(mut self, a: impl ToIp) -> Packet {
        self.dst = Some(a.to_ip());
        self
    }

    /// IPv4 TTL / IPv6 hop limit.
    pub fn ttl(mut self, ttl: u8) -> Packet {
        self.ttl = ttl;
        self
    }

    /// IPv4 TOS / IPv6 traffic class.
    pub fn tos(mut self, tos: u8) -> Packet {
        self.tos = tos;
        self
    }

    /// IPv4 identification (and the id of the fragments [`Packet::fragments`] makes).
    pub fn id(mut self, id: u16) -> Packet {
        self.id = id;
        self
    }

    /// IPv4 don't-fragment flag.
    pub fn df(mut self) -> Packet {
        self.dont_fragment = true;
        self
    }

    /// An IPv4 fragment: payload `offset` in bytes (a multiple of 8) and the more-fragments flag.
    pub fn frag(mut self, offset: u16, more: bool) -> Packet {
        assert_eq!(offset % 8, 0, "fragment offsets are multiples of 8 bytes");
        (self.frag_offset, self.more_fragments) = (offset, more);
        self
    }

    /// The IPv4 flags + fragment offset field as written, overriding `df` and `frag`.
    pub fn frag_field(mut self, field: u16) -> Packet {
        self.frag_field = Some(field);
        self
    }

    /// IPv4 options (a multiple of 4 bytes; IHL grows with them).
    pub fn options(mut self, bytes: impl AsRef<[u8]>) -> Packet {
        assert_eq!(bytes.as_ref().len() % 4, 0, "IPv4 options come in 4-byte words");
        assert!(bytes.as_ref().len() <= 40, "at most 40 bytes of IPv4 options");
        self.options = bytes.as_ref().to_vec();
        self
    }

    /// Append an IPv6 extension header (in order, before the L4 header).
    pub fn ext(mut self, header: Ext) -> Packet {
        self.ext.push(header);
        self
    }

    // ---- Deliberately broken IP fields -----------------------------------------------------

    /// The IPv4 IHL field as the sender wrote it (the header bytes stay 20 + options); the
    /// header checksum covers the bytes this IHL claims (clamped to the header).
    pub fn ihl(mut self, ihl: u8) -> Packet {
        assert!(ihl < 16, "IHL is 4 bits");
        self.ihl = Some(ihl);
        self
    }

    /// The length field as written: IPv4 total length, IPv6 payload length.
    pub fn ip_len_field(mut self, len: u16) -> Packet {
        self.ip_len_field = Some(len);
        self
    }

    /// The IPv4 header checksum as written.
    pub fn ip_checksum(mut self, c: u16) -> Packet {
        self.ip_checksum = Some(c);
        self
    }

    /// A wrong IPv4 header checksum (the right one with its lowest bit flipped).
    pub fn bad_ip_checksum(mut self) -> Packet {
        self.bad_ip_checksum = true;
        self
    }

    /// The TCP/UDP/ICMP checksum as written (0 for a UDP datagram: "no checksum").
    pub fn l4_checksum(mut self, c: u16) -> Packet {
        self.l4_checksum = Some(c);
        self
    }

    /// A wrong TCP/UDP/ICMP checksum (the right one with its lowest bit flipped).
    pub fn bad_l4_checksum(mut self) -> Packet {
        self.bad_l4_checksum = true;
        self
    }

    /// Cut the L4 segment to `n` bytes after its checksum is computed; the IP length fields
    /// count what is left.
    pub fn truncate_l4(mut self, n: usize) -> Packet {
        self.truncate_l4 = Some(n);
        self
    }

    /// Overwrite byte `offset` of the finished L3 packet (after every checksum): damage in
    /// transit, e.g. `.poke(0, 0x44)` for IHL 4 under the IHL 5 header's checksum.
    pub fn poke(mut self, offset: usize, value: u8) -> Packet {
        self.pokes.push((offset, value));
        self
    }

    /// Cut the finished L3 packet to `n` bytes (its length fields still claim the whole).
    pub fn truncate(mut self, n: usize) -> Packet {
        self.truncate = Some(n);
        self
    }

    // ---- Ethernet --------------------------------------------------------------------------

    /// Wrap in an Ethernet frame (EtherType from the packet: IPv4, IPv6, ARP).
    pub fn eth(mut self) -> Packet {
        self.eth = true;
        self
    }

    /// Wrap in an Ethernet frame with this EtherType.
    pub fn ethertype(mut self, t: u16) -> Packet {
        self.eth = true;
        self.ethertype = Some(t);
        self
    }

    /// Zero-pad the output to `len` bytes (a short Ethernet frame padded to the 60-byte minimum).
    pub fn pad_to(mut self, len: usize) -> Packet {
        self.pad_to = len;
        self
    }
}
