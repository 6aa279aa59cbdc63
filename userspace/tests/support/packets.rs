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
