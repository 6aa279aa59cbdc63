//! Forward rules (what iptables DNAT did), on Ethernet (`--egress`) interfaces: a customer's
//! packet to a forwarded (protocol, public port) gets the device's address and port, and the
//! device's replies, ICMP errors and later fragments are translated back. Drops a TCP segment
//! that has no flow and cannot start one, a device's packet without a flow, and half rewrites.

// Ingress: a flow is created only by a TCP SYN (no ACK) or a UDP datagram, and remembered in
// `FWD_FLOWS`; a TCP flow's destination is also cached in `FWD_INBOUND` (valid while its rule's
// generation in `FWD_RULE_GEN` is unchanged), so its later packets need that one lookup.
// Egress: a packet of a remembered flow gets the public address and port back; one from a
// rule's device address and port (`FWD_DEVICES`) without a flow is dropped. Checksums are
// updated incrementally.

use aya_ebpf::programs::TcContext;
use tunmeter_common::{
    DeviceKey, FRAG_FROM_DEVICE, FRAG_TO_DEVICE, FWD_NONE, FlowIn, FlowInKey, FlowKey, FlowNat, FragKey, FragNat,
    FwdKey, ICMP_CSUM, ICMP_QUOTE, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Ipv4Hdr, L4_DPORT, L4_SPORT, SteerEvent,
    TCP_FLAGS, V4_DST, V4_SRC,
};

use crate::{
    maps::{
        FWD_DEVICE_PORTS, FWD_DEVICES, FWD_EMPTY, FWD_FLOWS, FWD_FRAGS, FWD_INBOUND, FWD_RULE_GEN, FWD_RULELESS_PORTS,
        FWD_RULES,
    },
    packet::{Side, ipv4, l3_len, nat_v4, ports, read, set_u16, set_v4_addr},
    stats::{self, Toward},
    verdict::{Steered, Verdict},
};

/// ICMP error types that quote the offending packet: destination unreachable (incl.
/// fragmentation needed), time exceeded, parameter problem.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// TCP flag bits (the low byte of the data-offset/flags word).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Customer -> device, on the ingress of an Ethernet interface. With no forward rule at all
/// (`FWD_EMPTY`) nothing is parsed: no flow is forwarded then, so neither are its fragments or
/// the ICMP errors about it.
#[inline(always)]
pub fn inbound<const L3: usize>(ctx: &TcContext) -> Verdict {
    if no_rules() {
        return Verdict::Next;
    }
    let Some(h) = ipv4::<L3>(ctx) else { return Verdict::Next };
    let r = if h.is_later_fragment() {
        later_fragment::<L3>(ctx, &h, FRAG_TO_DEVICE)
    } else if h.proto == IPPROTO_ICMP {
        icmp_inbound::<L3>(ctx, &h)
    } else {
        to_device::<L3>(ctx, &h)
    };
    Verdict::of(r, || l3_len::<L3>(ctx))
}

/// Device -> customer, on the egress of an Ethernet interface.
#[inline(always)]
pub fn outbound<const L3: usize>(ctx: &TcContext) -> Verdict {
    let Some(h) = ipv4::<L3>(ctx) else { return Verdict::Next };
    let r = if h.is_later_fragment() {
        later_fragment::<L3>(ctx, &h, FRAG_FROM_DEVICE)
    } else if h.proto == IPPROTO_ICMP {
        icmp_outbound::<L3>(ctx, &h)
    } else {
        from_device::<L3>(ctx, &h)
    };
    Verdict::of(r, || l3_len::<L3>(ctx))
}

#[inline(always)]
fn to_device<const L3: usize>(ctx: &TcContext, h: &Ipv4Hdr) -> Steered {
    let l4 = L3 + h.ihl();
    let Some([sport, dport]) = ports(ctx, l4, h.proto) else { return Ok(()) };
    if ruleless_port(u16::from_be(dport)) {
        return Ok(());
    }
    let in_key = FlowInKey {
        customer_addr: h.src,
        public_addr: h.dst,
        customer_port_be: sport,
        public_port_be: dport,
        proto: h.proto,
        _pad: [0; 3],
    };
    let to = match established(&in_key) {
        Some(to) => to,
        None => match by_rule(ctx, h, l4, &in_key)? {
            Some(to) => to,
            None => return Ok(()),
        },
    };
    if h.is_first_fragment() {
        remember_fragment(h, FRAG_TO_DEVICE, to.device_addr, to.rule_id)?;
    }
    nat_v4(ctx, L3, h, [sport, dport], Side::Destination, to.device_addr, to.device_port_be)?;
    let len = l3_len::<L3>(ctx);
    stats::rule(to.rule_id, Toward::Target, len);
    stats::event(SteerEvent::Forwarded, len);
    Ok(())
}

/// An established TCP flow's cached destination, while the rule it came from is in force (its
/// generation unchanged): the one lookup of such a packet.
#[inline(always)]
fn established(key: &FlowInKey) -> Option<FlowIn> {
    if key.proto != IPPROTO_TCP {
        return None;
    }
    // SAFETY: read-only copy of the value.
    let to = unsafe { FWD_INBOUND.get(key) }.copied()?;
    (*FWD_RULE_GEN.get(to.rule_id)? == to.rule_gen).then_some(to)
}

/// The rule's way: the rule lookup, then the flow table (created by a packet that may start a
/// flow, else the packet is dropped). `None`: no rule applies, the packet passes. A TCP flow's
/// destination is then cached in `FWD_INBOUND` for its next packets. A UDP datagram always
/// takes this way, so that one whose flow was evicted re-creates it for the replies.
#[inline(always)]
fn by_rule(ctx: &TcContext, h: &Ipv4Hdr, l4: usize, in_key: &FlowInKey) -> Result<Option<FlowIn>, SteerEvent> {
    // SAFETY: the value is copied out at once; entries are only replaced whole by userspace.
    let Some(rule) =
        (unsafe { FWD_RULES.get(&FwdKey { proto: h.proto, _pad: 0, port_be: in_key.public_port_be }) }).copied()
    else {
        return Ok(None);
    };
    if rule.public_addr != 0 && rule.public_addr != h.dst {
        return Ok(None);
    }
    let key = FlowKey {
        device_addr: rule.device_addr,
        customer_addr: h.src,
        device_port_be: rule.device_port_be,
        customer_port_be: in_key.customer_port_be,
        proto: h.proto,
        _pad: [0; 3],
    };
    let nat =
        FlowNat { public_addr: h.dst, public_port_be: in_key.public_port_be, _pad: 0, rule_id: rule.rule_id, _pad2: 0 };
    // Written only when new or changed: most packets of a flow only read it. Only a packet that
    // may start a flow creates or redirects one; the same flow under a re-added rule (another
    // id) just gets the new id.
    // SAFETY: read-only copy of the value.
    match unsafe { FWD_FLOWS.get(&key) }.copied() {
        Some(have) if have == nat => {}
        Some(have) if have.public_addr == nat.public_addr && have.public_port_be == nat.public_port_be => {
            FWD_FLOWS.insert(&key, &nat, 0).map_err(|_| SteerEvent::FlowTableError)?
        }
        _ if !starts_flow(ctx, l4, h.proto) => return Err(SteerEvent::FlowlessSegment),
        _ => FWD_FLOWS.insert(&key, &nat, 0).map_err(|_| SteerEvent::FlowTableError)?,
    }
    let to = FlowIn {
        device_addr: rule.device_addr,
        device_port_be: rule.device_port_be,
        _pad: 0,
        rule_id: rule.rule_id,
        rule_gen: rule.generation,
    };
    if h.proto == IPPROTO_TCP {
        // A cache: if it cannot be written, the flow's next packet takes this way again.
        let _ = FWD_INBOUND.insert(in_key, &to, 0);
    }
    Ok(Some(to))
}

/// No forward rule at all (userspace says so in `FWD_EMPTY`).
#[inline(always)]
fn no_rules() -> bool {
    FWD_EMPTY.get(0).is_some_and(|v| *v == FWD_NONE)
}

/// No forward rule has this public port (`FWD_RULELESS_PORTS`): no rule lookup needed.
#[inline(always)]
fn ruleless_port(port: u16) -> bool {
    let port = port as u32;
    FWD_RULELESS_PORTS.get(port / 64).is_some_and(|w| *w & (1 << (port % 64)) != 0)
}

/// May this packet start a flow: a UDP datagram, or a TCP SYN without ACK.
#[inline(always)]
fn starts_flow(ctx: &TcContext, l4: usize, proto: u8) -> bool {
    if proto != IPPROTO_TCP {
        return true;
    }
    // `ports` checked that the header up to its checksum is in the packet. The whole
    // offset/flags word is read: a 1-byte read at a variable offset compiles to a bounds check
    // the verifier does not accept.
    let Ok(word) = read::<u16>(ctx, l4 + TCP_FLAGS - 1) else { return false };
    word.to_ne_bytes()[1] & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn from_device<const L3: usize>(ctx: &TcContext, h: &Ipv4Hdr) -> Steered {
    let l4 = L3 + h.ihl();
    let Some([sport, dport]) = ports(ctx, l4, h.proto) else { return Ok(()) };
    let key = FlowKey {
        device_addr: h.src,
        customer_addr: h.dst,
        device_port_be: sport,
        customer_port_be: dport,
        proto: h.proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only copy of the value.
    let Some(nat) = (unsafe { FWD_FLOWS.get(&key) }).copied() else {
        // Not a flow's reply: from a rule's device address and port it would leave with the
        // device's VPN address (an evicted or never-created flow), so it is dropped.
        if is_device(h, sport) {
            return Err(SteerEvent::DeviceWithoutFlow);
        }
        return Ok(());
    };
    if h.is_first_fragment() {
        remember_fragment(h, FRAG_FROM_DEVICE, nat.public_addr, nat.rule_id)?;
    }
    nat_v4(ctx, L3, h, [sport, dport], Side::Source, nat.public_addr, nat.public_port_be)?;
    let len = l3_len::<L3>(ctx);
    stats::rule(nat.rule_id, Toward::Back, len);
    stats::event(SteerEvent::ReplyTranslated, len);
    Ok(())
}

/// Is (protocol, source address, source port) a forward rule's device? The port bitmap first
/// (an array read), the device table only for a port in it.
#[inline(always)]
fn is_device(h: &Ipv4Hdr, sport: u16) -> bool {
    let port = u16::from_be(sport) as u32;
    match FWD_DEVICE_PORTS.get(port / 64) {
        Some(w) if *w & (1u64 << (port % 64)) != 0 => {}
        _ => return false,
    }
    let dev = DeviceKey { device_addr: h.src, device_port_be: sport, proto: h.proto, _pad: 0 };
    // SAFETY: only the presence of the entry is used.
    unsafe { FWD_DEVICES.get(&dev) }.is_some()
}

#[inline(always)]
fn remember_fragment(h: &Ipv4Hdr, dir: u8, addr: u32, rule_id: u32) -> Steered {
    let key = FragKey { src: h.src, dst: h.dst, id_be: h.id, proto: h.proto, dir };
    FWD_FRAGS.insert(&key, &FragNat { addr, rule_id }, 0).map_err(|_| SteerEvent::FlowTableError)
}

/// A fragment after the first: no ports, so the datagram's first fragment decided.
#[inline(always)]
fn later_fragment<const L3: usize>(ctx: &TcContext, h: &Ipv4Hdr, dir: u8) -> Steered {
    let key = FragKey { src: h.src, dst: h.dst, id_be: h.id, proto: h.proto, dir };
    // SAFETY: read-only copy of the value.
    let Some(nat) = (unsafe { FWD_FRAGS.get(&key) }).copied() else {
        if h.proto == IPPROTO_TCP || h.proto == IPPROTO_UDP {
            stats::event(SteerEvent::FragmentUnknown, l3_len::<L3>(ctx));
        }
        return Ok(());
    };
    let (field, old, toward) =
        if dir == FRAG_TO_DEVICE { (V4_DST, h.dst, Toward::Target) } else { (V4_SRC, h.src, Toward::Back) };
    set_v4_addr(ctx, L3, field, old, nat.addr, None)?;
    let len = l3_len::<L3>(ctx);
    stats::rule(nat.rule_id, toward, len);
    stats::event(SteerEvent::FragmentTranslated, len);
    Ok(())
}

/// The packet an ICMP error quotes: its IPv4 header, the header's offset, and its ports.
struct Quoted {
    at: usize,
    h: Ipv4Hdr,
    sport: u16,
    dport: u16,
}

/// The quoted TCP/UDP packet of an ICMP error at `icmp`, if this is one.
#[inline(always)]
fn quoted(ctx: &TcContext, icmp: usize) -> Option<Quoted> {
    let ty: u8 = ctx.load::<[u8; 2]>(icmp).ok()?[0];
    if ty != ICMP_DEST_UNREACH && ty != ICMP_TIME_EXCEEDED && ty != ICMP_PARAMETER_PROBLEM {
        return None;
    }
    let at = icmp + ICMP_QUOTE;
    let h: Ipv4Hdr = ctx.load(at).ok()?;
    if h.ver_ihl >> 4 != 4 || h.ver_ihl & 0x0f < 5 || h.is_later_fragment() {
        return None;
    }
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP {
        return None;
    }
    // Quotes carry at least the first 8 bytes of the transport header: the ports.
    let [sport, dport] = ctx.load::<[u16; 2]>(at + h.ihl()).ok()?;
    Some(Quoted { at, h, sport, dport })
}

/// An ICMP error from the customer's side about a reply we translated (quoted: public address
/// and port -> customer): the error goes to the device, about the device's own packet.
#[inline(always)]
fn icmp_inbound<const L3: usize>(ctx: &TcContext, h: &Ipv4Hdr) -> Steered {
    if h.is_fragment() {
        return Ok(());
    }
    let icmp = L3 + h.ihl();
    let Some(q) = quoted(ctx, icmp) else { return Ok(()) };
    if h.dst != q.h.src {
        return Ok(());
    }
    // SAFETY: read-only copy of the value.
    let Some(rule) = (unsafe { FWD_RULES.get(&FwdKey { proto: q.h.proto, _pad: 0, port_be: q.sport }) }).copied()
    else {
        return Ok(());
    };
    let key = FlowKey {
        device_addr: rule.device_addr,
        customer_addr: q.h.dst,
        device_port_be: rule.device_port_be,
        customer_port_be: q.dport,
        proto: q.h.proto,
        _pad: [0; 3],
    };
    // Only errors about a flow that exists: the flow table knows the public side.
    // SAFETY: read-only copy of the value.
    match unsafe { FWD_FLOWS.get(&key) }.copied() {
        Some(nat) if nat.public_addr == q.h.src && nat.public_port_be == q.sport => {}
        _ => return Ok(()),
    }
    // The quoted header's own checksum absorbs its address change, so the ICMP checksum only
    // changes with the port.
    set_v4_addr(ctx, L3, V4_DST, h.dst, rule.device_addr, None)?;
    set_v4_addr(ctx, q.at, V4_SRC, q.h.src, rule.device_addr, None)?;
    set_u16(ctx, q.at + q.h.ihl() + L4_SPORT, q.sport, rule.device_port_be, icmp + ICMP_CSUM, IPPROTO_ICMP)?;
    let len = l3_len::<L3>(ctx);
    stats::rule(rule.rule_id, Toward::Target, len);
    stats::event(SteerEvent::IcmpTranslated, len);
    Ok(())
}

/// An ICMP error about a packet going to the device (quoted: customer -> device address and
/// port), from the device or a router on the way: the customer must see it about what it sent.
#[inline(always)]
fn icmp_outbound<const L3: usize>(ctx: &TcContext, h: &Ipv4Hdr) -> Steered {
    if h.is_fragment() {
        return Ok(());
    }
    let icmp = L3 + h.ihl();
    let Some(q) = quoted(ctx, icmp) else { return Ok(()) };
    if h.dst != q.h.src {
        return Ok(());
    }
    let key = FlowKey {
        device_addr: q.h.dst,
        customer_addr: q.h.src,
        device_port_be: q.dport,
        customer_port_be: q.sport,
        proto: q.h.proto,
        _pad: [0; 3],
    };
    // SAFETY: read-only copy of the value.
    let Some(nat) = (unsafe { FWD_FLOWS.get(&key) }).copied() else { return Ok(()) };
    if h.src == q.h.dst {
        set_v4_addr(ctx, L3, V4_SRC, h.src, nat.public_addr, None)?;
    }
    set_v4_addr(ctx, q.at, V4_DST, q.h.dst, nat.public_addr, None)?;
    set_u16(ctx, q.at + q.h.ihl() + L4_DPORT, q.dport, nat.public_port_be, icmp + ICMP_CSUM, IPPROTO_ICMP)?;
    let len = l3_len::<L3>(ctx);
    stats::rule(nat.rule_id, Toward::Back, len);
    stats::event(SteerEvent::IcmpTranslated, len);
    Ok(())
}
