//! Steering entry points and the counters every steering path shares.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, programs::TcContext};
use tunmeter_common::SteerEvent;

use crate::{
    forward, l3_offset,
    maps::{RULE_COUNTERS, STEER_STATS},
    redirect,
};

/// After counting, on ingress: redirect rules on tun devices (L3), forward rules on Ethernet
/// devices (L2).
#[inline(always)]
pub fn ingress(ctx: &TcContext) -> i32 {
    if l3_offset() == 0 {
        redirect::from_client(ctx)
    } else {
        forward::inbound::<{ tunmeter_common::ETH_HLEN as usize }>(ctx)
    }
}

/// After counting, on egress: forwarded flows' replies leave through Ethernet devices.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> i32 {
    if l3_offset() == 0 { TC_ACT_UNSPEC } else { forward::outbound::<{ tunmeter_common::ETH_HLEN as usize }>(ctx) }
}

/// Which way a steered packet goes relative to the rule's target (device or proxy).
#[derive(Clone, Copy)]
pub enum Toward {
    Target,
    Back,
}

#[inline(always)]
pub fn count_rule(rule_id: u32, toward: Toward, bytes: u32) {
    if let Some(c) = RULE_COUNTERS.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU array slot of this CPU.
        unsafe {
            match toward {
                Toward::Target => {
                    (*c).to_target_bytes += bytes as u64;
                    (*c).to_target_packets += 1;
                }
                Toward::Back => {
                    (*c).from_target_bytes += bytes as u64;
                    (*c).from_target_packets += 1;
                }
            }
        }
    }
}

#[inline(always)]
pub fn event(e: SteerEvent, bytes: u32) {
    if let Some(s) = STEER_STATS.get_ptr_mut(e as u32) {
        // SAFETY: per-CPU array slot of this CPU.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes as u64;
        }
    }
}
