//! Redirect rules (what iptables REDIRECT did, with TPROXY semantics), on tun devices: a TCP or
//! UDP packet from a redirected VPN client is handed to the local transparent proxy's socket.
//!
//! A packet to a destination outside the bypass set is assigned to the proxy's socket
//! (`bpf_sk_assign`) and marked for the daemon's local-delivery route. Not one byte changes.
//! Nothing else may go around the proxy: fragments, IPv4 options, IPv6 extension headers and
//! protocols outside the rule's `allow` list are dropped (unless the rule passes them), as are
//! packets whose proxy has no socket or whose assignment fails.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6,
    },
    helpers::{bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tunmeter_common::{
    ADDR_KEY_BITS, AddrKey, ClientKey, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, REDIRECT_NONE,
    REDIRECT_UNPARSED_PASS, RedirectRule, SteerEvent, V6_DST, V6_NEXT_HEADER, V6_SRC, redirect_allow_bit,
};

use crate::{
    maps::{REDIRECT_BYPASS, REDIRECT_EMPTY, REDIRECT_SOURCES},
    packet::{ipv4, ports, read},
    redirect_mark,
    stats::{self, Toward},
    verdict::{Steered, Verdict},
};

/// IPv6 next-header values of extension headers a TCP or UDP header may hide behind:
/// hop-by-hop options, routing, fragment, destination options.
const IPV6_EXTENSION_HEADERS: [u8; 4] = [0, 43, 44, 60];

/// A packet entering a tun device (L3: the IP header is at 0).
#[inline(always)]
pub fn from_client(ctx: &TcContext) -> Verdict {
    if no_rules() {
        return Verdict::Next;
    }
    let Ok(first) = read::<u16>(ctx, 0) else { return Verdict::Next };
    let r = match first.to_ne_bytes()[0] >> 4 {
        4 => v4(ctx),
        6 => v6(ctx),
        _ => Ok(()),
    };
    Verdict::of(r, || ctx.len())
}

/// No redirect rule at all (userspace says so in `REDIRECT_EMPTY`): nothing to look up.
#[inline(always)]
fn no_rules() -> bool {
    REDIRECT_EMPTY.get(0).is_some_and(|v| *v == REDIRECT_NONE)
}

#[inline(always)]
fn rule_for(src: ClientKey) -> Option<RedirectRule> {
    REDIRECT_SOURCES.get(&Key::new(ADDR_KEY_BITS, AddrKey { addr: src.addr })).copied()
}

#[inline(always)]
fn bypassed(dst: ClientKey) -> bool {
    REDIRECT_BYPASS.get(&Key::new(ADDR_KEY_BITS, AddrKey { addr: dst.addr })).is_some()
}

#[inline(always)]
fn v4(ctx: &TcContext) -> Steered {
    let Some(h) = ipv4::<0>(ctx) else { return Ok(()) };
    let Some(rule) = rule_for(ClientKey::v4_word(h.src)) else { return Ok(()) };
    if bypassed(ClientKey::v4_word(h.dst)) {
        stats::event(SteerEvent::Bypassed, ctx.len());
        return Ok(());
    }
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP {
        return other_proto(ctx, rule, h.proto);
    }
    if h.is_fragment() {
        return unparsed(ctx, rule, SteerEvent::RedirectFragment);
    }
    if h.ihl() != IPV4_HLEN as usize {
        return unparsed(ctx, rule, SteerEvent::RedirectIpOptions);
    }
    let Some([sport, dport]) = ports(ctx, IPV4_HLEN as usize, h.proto) else {
        return unparsed(ctx, rule, SteerEvent::NotRedirectable);
    };
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
            ipv4: Tuple4 { saddr: h.src, daddr: h.dst, sport, dport },
        },
    };
    let size = core::mem::size_of::<Tuple4>() as u32;
    assign(ctx, &mut tuple, size, h.proto, rule, |t, port| t.__bindgen_anon_1.ipv4.dport = port)
}

#[inline(always)]
fn v6(ctx: &TcContext) -> Steered {
    let Ok(src) = read::<[u64; 2]>(ctx, V6_SRC) else { return Ok(()) };
    let Some(rule) = rule_for(ClientKey::v6_words(src)) else { return Ok(()) };
    let Ok(next) = read::<u16>(ctx, V6_NEXT_HEADER) else { return unparsed(ctx, rule, SteerEvent::NotRedirectable) };
    let next = next.to_ne_bytes()[0];
    let Ok(dst) = read::<[u64; 2]>(ctx, V6_DST) else { return unparsed(ctx, rule, SteerEvent::NotRedirectable) };
    if bypassed(ClientKey::v6_words(dst)) {
        stats::event(SteerEvent::Bypassed, ctx.len());
        return Ok(());
    }
    if IPV6_EXTENSION_HEADERS.contains(&next) {
        return unparsed(ctx, rule, SteerEvent::RedirectExtHeader);
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return other_proto(ctx, rule, next);
    }
    let Some([sport, dport]) = ports(ctx, IPV6_HLEN as usize, next) else {
        return unparsed(ctx, rule, SteerEvent::NotRedirectable);
    };
    // SAFETY: [u64; 2] and [u32; 4] have the same size; every bit pattern is valid.
    let (saddr, daddr) =
        unsafe { (core::mem::transmute::<[u64; 2], [u32; 4]>(src), core::mem::transmute::<[u64; 2], [u32; 4]>(dst)) };
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1 {
            ipv6: Tuple6 { saddr, daddr, sport, dport },
        },
    };
    let size = core::mem::size_of::<Tuple6>() as u32;
    assign(ctx, &mut tuple, size, next, rule, |t, port| t.__bindgen_anon_1.ipv6.dport = port)
}

/// A protocol the proxy cannot take: passed if the rule's `allow` list has it, else unparsed.
#[inline(always)]
fn other_proto(ctx: &TcContext, rule: RedirectRule, proto: u8) -> Steered {
    if rule.flags & redirect_allow_bit(proto) != 0 {
        stats::event(SteerEvent::RedirectAllowed, ctx.len());
        return Ok(());
    }
    unparsed(ctx, rule, SteerEvent::RedirectOtherProto)
}

/// A packet of a redirected client that cannot be handed to the proxy: it must not go around
/// it, so it is dropped, unless the rule says `unparsed = "pass"`. Counted as `why` either way.
#[inline(always)]
fn unparsed(ctx: &TcContext, rule: RedirectRule, why: SteerEvent) -> Steered {
    if rule.flags & REDIRECT_UNPARSED_PASS == 0 {
        return Err(why);
    }
    stats::event(why, ctx.len());
    Ok(())
}

/// Find the socket the packet belongs to and assign it: for TCP an established connection of
/// the proxy (its local address is the original destination) or else the proxy's listener; for
/// UDP the proxy's socket. Then mark the packet for the local-delivery policy route.
#[inline(always)]
fn assign(
    ctx: &TcContext,
    tuple: &mut bpf_sock_tuple,
    size: u32,
    proto: u8,
    rule: RedirectRule,
    set_dport: impl Fn(&mut bpf_sock_tuple, u16),
) -> Steered {
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = ctx.as_ptr();
    // SAFETY: helpers called with a stack tuple of the size given; every socket they return is
    // released on every path below.
    let sk: *mut bpf_sock = unsafe {
        if proto == IPPROTO_TCP {
            let sk = bpf_skc_lookup_tcp(skb, tuple, size, netns, 0);
            if !sk.is_null() {
                if (*sk).state != BPF_TCP_LISTEN {
                    return assign_sock(ctx, sk, rule);
                }
                bpf_sk_release(sk as *mut _);
            }
            set_dport(tuple, rule.proxy_port_be);
            let sk = bpf_skc_lookup_tcp(skb, tuple, size, netns, 0);
            if !sk.is_null() && (*sk).state != BPF_TCP_LISTEN {
                bpf_sk_release(sk as *mut _);
                return Err(SteerEvent::ProxyMissing);
            }
            sk
        } else {
            set_dport(tuple, rule.proxy_port_be);
            bpf_sk_lookup_udp(skb, tuple, size, netns, 0)
        }
    };
    if sk.is_null() {
        return Err(SteerEvent::ProxyMissing);
    }
    assign_sock(ctx, sk, rule)
}

#[inline(always)]
fn assign_sock(ctx: &TcContext, sk: *mut bpf_sock, rule: RedirectRule) -> Steered {
    // SAFETY: `sk` is a referenced socket from a lookup; released right after.
    let r = unsafe {
        let r = bpf_sk_assign(ctx.as_ptr(), sk as *mut _, 0);
        bpf_sk_release(sk as *mut _);
        r
    };
    if r != 0 {
        return Err(SteerEvent::AssignFailed);
    }
    ctx.set_mark(redirect_mark());
    let len = ctx.len();
    stats::rule(rule.rule_id, Toward::Target, len);
    stats::event(SteerEvent::Redirected, len);
    Ok(())
}
