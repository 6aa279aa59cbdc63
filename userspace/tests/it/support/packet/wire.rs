//! The bytes of a [`Packet`]: L4 segment with its checksum, IPv4 or IPv6 header (extension
//! headers from `ext`), the deliberate damage, the Ethernet frame; and the split into fragments.
//! Checksums use this file's own RFC 1071 sum, not `support::checksum` (which checks them).

use std::net::IpAddr;

use super::{Body, ETH_ARP, ETH_IP, ETH_IPV6, Ext, ICMP, ICMPV6, IP_DF, IP_MF, Packet, TCP, UDP, ext};

/// One's-complement sum of big-endian 16-bit words (odd length: zero-padded), folded.
fn sum(data: &[u8], init: u64) -> u16 {
    let mut s = init;
    for c in data.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u64;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Sum of the pseudo-header for an upper-layer packet of `len` bytes.
fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => unreachable!("families checked by addrs()"),
    }
    sum(&p, 0) as u64
}

impl Packet {
    /// The source and destination, defaulting to 192.0.2.1 -> 192.0.2.2 (or 2001:db8::1 ->
    /// 2001:db8::2 when one of them is IPv6); both of one family.
    fn addrs(&self) -> (IpAddr, IpAddr) {
        let v6 = matches!(self.src, Some(IpAddr::V6(_))) || matches!(self.dst, Some(IpAddr::V6(_)));
        let (ds, dd): (IpAddr, IpAddr) = if v6 {
            ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap())
        } else {
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap())
        };
        let (s, d) = (self.src.unwrap_or(ds), self.dst.unwrap_or(dd));
        assert_eq!(s.is_ipv6(), d.is_ipv6(), "source {s} and destination {d} of different families");
        (s, d)
    }

    fn is_ip(&self) -> bool {
        !matches!(self.body, Body::Arp | Body::Junk(_))
    }

    /// IP protocol number of the L4 part.
    fn proto(&self) -> u8 {
        match &self.body {
            Body::Tcp { .. } => TCP,
            Body::Udp { .. } => UDP,
            Body::Icmp { v6: false, .. } => ICMP,
            Body::Icmp { v6: true, .. } => ICMPV6,
            Body::L4 { proto, .. } => *proto,
            Body::Arp | Body::Junk(_) => panic!("no IP protocol for {:?}", self.body),
        }
    }

    /// The L4 segment with its checksum (before `truncate_l4`), and the checksum's offset.
    fn segment(&self) -> (Vec<u8>, Option<usize>) {
        let mut v = Vec::new();
        let (csum_at, pseudo_header) = match &self.body {
            Body::Tcp { sport, dport, seq, ack, flags, window, options, data } => {
                v.extend_from_slice(&sport.to_be_bytes());
                v.extend_from_slice(&dport.to_be_bytes());
                v.extend_from_slice(&seq.to_be_bytes());
                let ack = ack.unwrap_or(if flags & super::ACK != 0 { 0x5566_7788 } else { 0 });
                v.extend_from_slice(&ack.to_be_bytes());
                v.extend_from_slice(&[((5 + options.len() / 4) as u8) << 4, *flags]);
                v.extend_from_slice(&window.to_be_bytes());
                v.extend_from_slice(&[0, 0, 0, 0]);
                v.extend_from_slice(options);
                v.extend_from_slice(data);
                (16, true)
            }
            Body::Udp { sport, dport, len, data } => {
                v.extend_from_slice(&sport.to_be_bytes());
                v.extend_from_slice(&dport.to_be_bytes());
                v.extend_from_slice(&len.unwrap_or((8 + data.len()) as u16).to_be_bytes());
                v.extend_from_slice(&[0, 0]);
                v.extend_from_slice(data);
                (6, true)
            }
            Body::Icmp { v6, typ, code, rest, data } => {
                v.extend_from_slice(&[*typ, *code, 0, 0]);
                v.extend_from_slice(&rest.to_be_bytes());
                v.extend_from_slice(data);
                (2, *v6)
            }
            Body::L4 { bytes, .. } => return (bytes.clone(), None),
            Body::Arp | Body::Junk(_) => panic!("no L4 segment in {:?}", self.body),
        };
        let c = match self.l4_checksum {
            Some(c) => c,
            None => {
                let init = if pseudo_header {
                    let (s, d) = self.addrs();
                    pseudo(s, d, self.proto(), v.len())
                } else {
                    0
                };
                let c = !sum(&v, init);
                // UDP: a computed 0 is sent as 0xffff (0 means "no checksum", RFC 768).
                let c = if c == 0 && self.proto() == UDP { 0xffff } else { c };
                if self.bad_l4_checksum { c ^ 1 } else { c }
            }
        };
        v[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        (v, Some(csum_at))
    }

    /// The L4 segment as it goes into the packet (checksum in, `truncate_l4` applied).
    pub fn l4_bytes(&self) -> Vec<u8> {
        let (mut v, _) = self.segment();
        if let Some(n) = self.truncate_l4 {
            v.truncate(n);
        }
        v
    }

    /// The TCP/UDP/ICMP checksum this packet carries.
    pub fn l4_checksum_value(&self) -> u16 {
        let (v, at) = self.segment();
        let at = at.unwrap_or_else(|| panic!("no L4 checksum in {:?}", self.body));
        u16::from_be_bytes([v[at], v[at + 1]])
    }

    /// The L3 packet before `poke` and `truncate`.
    fn l3(&self) -> Vec<u8> {
        match &self.body {
            Body::Arp => {
                let mut v = vec![0, 1, 0x08, 0, 6, 4, 0, 1];
                v.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 9, 0, 2]);
                v.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 9, 0, 1]);
                return v;
            }
            Body::Junk(b) => return b.clone(),
            _ => {}
        }
        let l4 = self.l4_bytes();
        match self.addrs() {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                assert!(self.ext.is_empty(), "IPv6 extension headers on an IPv4 packet");
                let real_ihl = 5 + self.options.len() / 4;
                let ihl = self.ihl.map_or(real_ihl, usize::from);
                let total = self.ip_len_field.unwrap_or((real_ihl * 4 + l4.len()) as u16);
                let frag = self.frag_field.unwrap_or(
                    (self.frag_offset / 8)
                        | if self.more_fragments { IP_MF } else { 0 }
                        | if self.dont_fragment { IP_DF } else { 0 },
                );
                let mut v = vec![0x40 | ihl as u8, self.tos];
                v.extend_from_slice(&total.to_be_bytes());
                v.extend_from_slice(&self.id.to_be_bytes());
                v.extend_from_slice(&frag.to_be_bytes());
                v.extend_from_slice(&[self.ttl, self.proto(), 0, 0]);
                v.extend_from_slice(&s.octets());
                v.extend_from_slice(&d.octets());
                v.extend_from_slice(&self.options);
                let c = self.ip_checksum.unwrap_or_else(|| {
                    // Over the header the IHL claims, as a receiver checks it.
                    let c = !sum(&v[..(ihl * 4).min(v.len())], 0);
                    if self.bad_ip_checksum { c ^ 1 } else { c }
                });
                v[10..12].copy_from_slice(&c.to_be_bytes());
                v.extend_from_slice(&l4);
                v
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let chain = ext::chain(&self.ext, self.proto());
                let next = self.ext.first().map_or(self.proto(), Ext::kind);
                let len = self.ip_len_field.unwrap_or((chain.len() + l4.len()) as u16);
                let mut v = vec![0x60 | self.tos >> 4, self.tos << 4, 0, 0];
                v.extend_from_slice(&len.to_be_bytes());
                v.extend_from_slice(&[next, self.ttl]);
                v.extend_from_slice(&s.octets());
                v.extend_from_slice(&d.octets());
                v.extend_from_slice(&chain);
                v.extend_from_slice(&l4);
                v
            }
            _ => unreachable!("families checked by addrs()"),
        }
    }

    /// The packet's bytes: L3 (with `poke` and `truncate` applied), in an Ethernet frame if
    /// asked for, padded to `pad_to`.
    pub fn build(&self) -> Vec<u8> {
        let mut l3 = self.l3();
        for &(at, value) in &self.pokes {
            l3[at] = value;
        }
        if let Some(n) = self.truncate {
            l3.truncate(n);
        }
        let mut out = if self.eth {
            let ethertype = self.ethertype.unwrap_or(match &self.body {
                Body::Arp => ETH_ARP,
                Body::Junk(_) => ETH_IP,
                _ if self.addrs().0.is_ipv6() => ETH_IPV6,
                _ => ETH_IP,
            });
            let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend_from_slice(&l3);
            f
        } else {
            l3
        };
        if out.len() < self.pad_to {
            out.resize(self.pad_to, 0);
        }
        out
    }

    /// Split the whole L4 datagram (header included) into fragments with this packet's id:
    /// payload sizes `sizes` (each a multiple of 8), the rest in a last fragment. IPv4: the
    /// fragment offset and MF flag; IPv6: a fragment extension header after the others. Every
    /// other setting (Ethernet, DF, TTL, ...) is kept.
    pub fn fragments(&self, sizes: &[usize]) -> Vec<Packet> {
        assert!(self.is_ip(), "fragments of {:?}", self.body);
        let datagram = self.l4_bytes();
        let proto = self.proto();
        let mut sizes = sizes.to_vec();
        let used: usize = sizes.iter().sum();
        assert!(used < datagram.len(), "the fragment sizes leave nothing for a last fragment");
        sizes.push(datagram.len() - used);
        let mut off = 0;
        let mut out = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let last = i + 1 == sizes.len();
            assert!(last || n % 8 == 0, "fragment sizes must be multiples of 8");
            let mut f = self.clone();
            f.body = Body::L4 { proto, bytes: datagram[off..off + n].to_vec() };
            (f.l4_checksum, f.bad_l4_checksum, f.truncate_l4) = (None, false, None);
            if self.addrs().0.is_ipv6() {
                f.ext.push(Ext::Fragment { offset: off as u16, more: !last, id: self.id as u32 });
            } else {
                f = f.frag(off as u16, !last);
            }
            out.push(f);
            off += n;
        }
        out
    }
}
