//! The fuzz cases: structured packets from the typed builder (TCP, UDP, ICMP echo and errors
//! quoting a packet, IPv4 options and fragments, IPv6 extension headers, ARP, deliberately broken
//! fields), the same packets mutated byte-wise, and plain garbage, all from one seeded `StdRng`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom as _};

use crate::support::packet::{ETH_ARP, ETH_IP, ETH_IPV6, Ext, Packet, TCP, UDP};
use tunmeter::types::Layer;

/// Addresses the steering rules and client subnets of the fuzz test know, plus a few odd ones.
const V4: &[&str] =
    &["10.8.0.2", "10.8.0.77", "10.8.0.200", "203.0.113.7", "198.51.100.20", "1.1.1.1", "0.0.0.0", "255.255.255.255"];
const V6: &[&str] = &["fd00:8::2", "fd00:8::77", "2001:db8::1", "::", "ff02::1", "::ffff:10.8.0.2"];
/// The forward rules' public and device ports, the customer port, extremes.
const PORTS: &[u16] = &[8080, 5353, 3128, 53, 40000, 0, 65535];
const ETHERTYPES: &[u16] = &[ETH_IP, ETH_IPV6, ETH_ARP, 0x8100, 0x88cc, 0x0000, 0xffff];

/// One input: its bytes (as the program on its layer sees them) and how it was made.
pub struct Case {
    pub bytes: Vec<u8>,
    pub what: String,
}

pub struct Gen {
    rng: StdRng,
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen { rng: StdRng::seed_from_u64(seed) }
    }

    /// The next case for a program on `layer`: 60% structured, 30% mutated, 10% garbage.
    pub fn case(&mut self, layer: Layer) -> Case {
        let roll = self.rng.random_range(0..10);
        if roll < 6 {
            let (p, what) = self.structured();
            Case { bytes: self.frame(layer, p), what }
        } else if roll < 9 {
            let (p, what) = self.structured();
            let mut bytes = self.frame(layer, p);
            let how = self.mutate(&mut bytes);
            Case { bytes, what: format!("{what}, mutated: {how}") }
        } else {
            let n = self.rng.random_range(0..320);
            let mut bytes = vec![0u8; n];
            self.rng.fill(&mut bytes[..]);
            if layer == Layer::L2 && n >= 14 && self.rng.random_bool(0.5) {
                let t = *[ETH_IP, ETH_IPV6].choose(&mut self.rng).unwrap();
                bytes[12..14].copy_from_slice(&t.to_be_bytes());
            }
            Case { bytes, what: format!("garbage, {n} bytes") }
        }
    }

    fn v4(&mut self) -> IpAddr {
        if self.rng.random_bool(0.2) {
            IpAddr::V4(Ipv4Addr::from(self.rng.random::<u32>()))
        } else if self.rng.random_bool(0.2) {
            // A random address inside the client subnet.
            IpAddr::V4(Ipv4Addr::new(10, 8, 0, self.rng.random()))
        } else {
            V4.choose(&mut self.rng).unwrap().parse().unwrap()
        }
    }

    fn v6(&mut self) -> IpAddr {
        if self.rng.random_bool(0.2) {
            IpAddr::V6(Ipv6Addr::from(self.rng.random::<u128>()))
        } else if self.rng.random_bool(0.2) {
            let host: u64 = self.rng.random();
            IpAddr::V6(Ipv6Addr::from((0xfd00_0008u128 << 96) | host as u128))
        } else {
            V6.choose(&mut self.rng).unwrap().parse().unwrap()
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.random_bool(0.25) { self.rng.random() } else { *PORTS.choose(&mut self.rng).unwrap() }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.rng.random_range(0..=max);
        let mut v = vec![0u8; n];
        self.rng.fill(&mut v[..]);
        v
    }

    /// A TCP or UDP packet (or, for ICMP errors, a quote) between two addresses of one family.
    fn transport(&mut self, v6: bool) -> (Packet, String) {
        let (src, dst) = if v6 { (self.v6(), self.v6()) } else { (self.v4(), self.v4()) };
        let (sport, dport) = (self.port(), self.port());
        let data = self.bytes(200);
        let p = if self.rng.random_bool(0.5) {
            let mut p = Packet::tcp().flags(self.rng.random()).seq(self.rng.random()).payload(&data);
            if self.rng.random_bool(0.2) {
                let words = self.rng.random_range(1..=10);
                let opts: Vec<u8> = (0..words * 4).map(|_| self.rng.random()).collect();
                p = p.tcp_options(opts);
            }
            p
        } else {
            let p = Packet::udp().payload(&data);
            if self.rng.random_bool(0.2) { p.l4_checksum(0) } else { p }
        };
        let what = format!("{src} -> {dst} ports {sport} -> {dport}, {} data bytes", data.len());
        (p.src(src).dst(dst).ports(sport, dport), what)
    }

    /// A packet aimed at the fuzz test's forward rules: a customer to a forwarded public port,
    /// or the device's reply to a customer (then a known flow if one was made).
    fn steered(&mut self) -> (Packet, String) {
        let customer = *["198.51.100.20", "198.51.100.21"].choose(&mut self.rng).unwrap();
        let cport = *[40000u16, 40001].choose(&mut self.rng).unwrap();
        let tcp = self.rng.random_bool(0.6);
        let mut p = if tcp {
            Packet::tcp().flags(*[0x02u8, 0x10, 0x18, 0x11, 0x04, 0x12].choose(&mut self.rng).unwrap())
        } else {
            Packet::udp()
        };
        p = p.payload(self.bytes(100));
        if self.rng.random_bool(0.2) {
            p = p.id(self.rng.random()).frag(0, true);
        }
        let (pub_port, dev_port) = if tcp { (8080, 3128) } else { (5353, 53) };
        if self.rng.random_bool(0.5) {
            let p = p.src(customer).dst("203.0.113.7").ports(cport, pub_port);
            (p, format!("customer {customer}:{cport} -> public port {pub_port}"))
        } else {
            let p = p.src("10.8.0.77").dst(customer).ports(dev_port, cport);
            (p, format!("device reply {dev_port} -> {customer}:{cport}"))
        }
    }

    /// A well-formed packet of some kind, sometimes with one field broken on purpose.
    fn structured(&mut self) -> (Packet, String) {
        if self.rng.random_bool(0.15) {
            return self.steered();
        }
        let v6 = self.rng.random_bool(0.35);
        let kind = self.rng.random_range(0..9);
        let (mut p, what) = match kind {
            0..=3 => {
                let (p, w) = self.transport(v6);
                (p, format!("transport {w}"))
            }
            4 => {
                let (s, d) = if v6 { (self.v6(), self.v6()) } else { (self.v4(), self.v4()) };
                let p = if v6 { Packet::icmpv6() } else { Packet::icmp() };
                (p.src(s).dst(d).payload(self.bytes(64)), format!("echo {s} -> {d}"))
            }
            5 => {
                // An ICMP error quoting (the start of) a packet, as routers send them.
                let (inner, w) = self.transport(v6);
                let mut quote = inner.build();
                let cut = self.rng.random_range(0..=quote.len());
                quote.truncate(cut.max(28.min(quote.len())));
                let (s, d) = if v6 { (self.v6(), self.v6()) } else { (self.v4(), self.v4()) };
                let p = if v6 {
                    Packet::icmpv6_error(*[1u8, 2, 3, 4].choose(&mut self.rng).unwrap(), 0)
                } else {
                    Packet::icmp_error(*[3u8, 11, 12, 5].choose(&mut self.rng).unwrap(), self.rng.random_range(0..5))
                };
                (p.src(s).dst(d).quote(quote), format!("icmp error {s} -> {d} quoting {w}"))
            }
            6 if !v6 => {
                let (p, w) = self.transport(false);
                let words = self.rng.random_range(1..=10);
                let opts: Vec<u8> =
                    (0..words * 4).map(|_| *[0u8, 1, 7, 68, 130, 148].choose(&mut self.rng).unwrap()).collect();
                (p.options(opts), format!("ipv4 options ({words} words), {w}"))
            }
            6 => {
                let (mut p, w) = self.transport(true);
                let n = self.rng.random_range(1..=4);
                for _ in 0..n {
                    let h = match self.rng.random_range(0..5) {
                        0 => Ext::hop_by_hop(),
                        1 => Ext::dest_opts(),
                        2 => Ext::Routing {
                            typ: self.rng.random_range(0..5),
                            segments_left: self.rng.random(),
                            data: self.bytes(20),
                        },
                        3 => Ext::fragment(self.rng.random_range(0..100) * 8, self.rng.random(), self.rng.random()),
                        _ => Ext::Raw { kind: self.rng.random(), bytes: self.bytes(15) },
                    };
                    p = p.ext(h);
                }
                (p, format!("ipv6 with {n} extension headers, {w}"))
            }
            7 if !v6 => {
                // A fragment: the first (with the L4 header) or a later one (raw bytes).
                if self.rng.random_bool(0.5) {
                    let (p, w) = self.transport(false);
                    (p.frag(0, true), format!("first fragment, {w}"))
                } else {
                    let (s, d) = (self.v4(), self.v4());
                    let proto = *[TCP, UDP, 1, 47].choose(&mut self.rng).unwrap();
                    let off = self.rng.random_range(1..400) * 8;
                    let more = self.rng.random();
                    let p = Packet::l4(proto, self.bytes(300)).src(s).dst(d).frag(off, more);
                    (p, format!("later fragment {s} -> {d} proto {proto} offset {off}"))
                }
            }
            7 => {
                let (s, d) = (self.v6(), self.v6());
                let proto = *[TCP, UDP, 58, 59, 0].choose(&mut self.rng).unwrap();
                (Packet::l4(proto, self.bytes(100)).src(s).dst(d), format!("ipv6 raw proto {proto} {s} -> {d}"))
            }
            _ => {
                if self.rng.random_bool(0.5) {
                    (Packet::arp(), "arp".to_string())
                } else {
                    let b = self.bytes(120);
                    let n = b.len();
                    (Packet::junk(b), format!("junk, {n} bytes"))
                }
            }
        };
        let ip = kind < 8;
        let mut broken = String::new();
        if ip && self.rng.random_bool(0.3) {
            p = match self.rng.random_range(0..7) {
                0 if !v6 => {
                    let ihl = self.rng.random_range(0..16);
                    broken = format!(", ihl {ihl}");
                    p.ihl(ihl)
                }
                1 => {
                    let len = self.rng.random();
                    broken = format!(", ip length field {len}");
                    p.ip_len_field(len)
                }
                2 if !v6 => {
                    broken = ", bad ip checksum".into();
                    p.bad_ip_checksum()
                }
                3 if kind < 6 => {
                    broken = ", bad l4 checksum".into();
                    p.bad_l4_checksum()
                }
                4 => {
                    let n = self.rng.random_range(0..40);
                    broken = format!(", l4 cut to {n}");
                    p.truncate_l4(n)
                }
                5 => {
                    let len = p.build().len();
                    let n = self.rng.random_range(0..len.max(1));
                    broken = format!(", cut to {n} bytes");
                    p.truncate(n)
                }
                _ => {
                    let ttl = self.rng.random();
                    broken = format!(", ttl {ttl}");
                    p.ttl(ttl)
                }
            };
        }
        (p, format!("{what}{broken}"))
    }

    /// `p` as the program on `layer` sees it; on L2 the EtherType is sometimes another one.
    fn frame(&mut self, layer: Layer, p: Packet) -> Vec<u8> {
        match layer {
            Layer::L3 => p.build(),
            Layer::L2 if self.rng.random_bool(0.1) => p.ethertype(*ETHERTYPES.choose(&mut self.rng).unwrap()).build(),
            Layer::L2 => p.eth().build(),
        }
    }

    /// Damage `b` in one to four ways; returns what was done.
    fn mutate(&mut self, b: &mut Vec<u8>) -> String {
        let mut how = Vec::new();
        for _ in 0..self.rng.random_range(1..=4) {
            match self.rng.random_range(0..5) {
                0 if !b.is_empty() => {
                    // Header bytes are where the parsers look.
                    let at = self.rng.random_range(0..b.len().min(80));
                    let v = self.rng.random();
                    how.push(format!("byte {at} = {v:#04x}"));
                    b[at] = v;
                }
                1 if !b.is_empty() => {
                    let at = self.rng.random_range(0..b.len());
                    let bit = self.rng.random_range(0..8);
                    how.push(format!("bit {bit} of byte {at} flipped"));
                    b[at] ^= 1 << bit;
                }
                2 if !b.is_empty() => {
                    let n = self.rng.random_range(0..b.len());
                    how.push(format!("cut to {n}"));
                    b.truncate(n);
                }
                3 => {
                    let more = self.bytes(64);
                    how.push(format!("{} bytes appended", more.len()));
                    b.extend_from_slice(&more);
                }
                _ => {
                    // The version/IHL byte of an IP header at 0 (L3) or 14 (L2).
                    let at = *[0usize, 14].choose(&mut self.rng).unwrap();
                    if at < b.len() {
                        let v = self.rng.random();
                        how.push(format!("byte {at} = {v:#04x}"));
                        b[at] = v;
                    }
                }
            }
        }
        how.join(", ")
    }
}
