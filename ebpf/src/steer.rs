//! Steering dispatch: after counting, pick the steering path of this hook and layer. Ingress:
//! redirect rules on tun devices (L3), forward rules on Ethernet devices (L2). Egress: forwarded
//! flows' replies on Ethernet devices. Every path returns the packet's [`Verdict`].

use aya_ebpf::programs::TcContext;
use tunmeter_common::ETH_HLEN;

use crate::{forward, l3_offset, redirect, verdict::Verdict};

/// After counting, on ingress.
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> Verdict {
    if l3_offset() == 0 { redirect::from_client(ctx) } else { forward::inbound::<{ ETH_HLEN as usize }>(ctx) }
}

/// After counting, on egress: nothing to do on tun devices.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> Verdict {
    if l3_offset() == 0 { Verdict::Next } else { forward::outbound::<{ ETH_HLEN as usize }>(ctx) }
}
