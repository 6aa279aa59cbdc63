//! The per-CPU statistics every path bumps: the outcome of counting (`OUTCOME_STATS`), steering
//! events (`STEER_STATS`) and the per-rule counters (`RULE_COUNTERS`). Shared by counting and by
//! both steering paths; it never decides what happens to a packet.

use tunmeter_common::{Direction, Outcome, OutcomeCounter, SteerEvent, stats_index};

use crate::maps::{OUTCOME_STATS, RULE_COUNTERS, STEER_STATS};

/// Which way a steered packet goes relative to the rule's target (device or proxy).
#[derive(Clone, Copy)]
pub enum Toward {
    Target,
    Back,
}

/// One packet of `bytes` with this outcome.
#[inline(always)]
pub fn outcome(dir: Direction, outcome: Outcome, bytes: u32) {
    if let Some(s) = OUTCOME_STATS.get_ptr_mut(stats_index(dir, outcome)) {
        add(s, bytes);
    }
}

/// One packet of `bytes` took this steering path.
#[inline(always)]
pub fn event(e: SteerEvent, bytes: u32) {
    if let Some(s) = STEER_STATS.get_ptr_mut(e.index()) {
        add(s, bytes);
    }
}

/// One packet of `bytes` steered by rule `rule_id`.
#[inline(always)]
pub fn rule(rule_id: u32, toward: Toward, bytes: u32) {
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
fn add(s: *mut OutcomeCounter, bytes: u32) {
    // SAFETY: a per-CPU array slot of this CPU from `get_ptr_mut`; nothing else writes it while
    // we run.
    unsafe {
        (*s).packets += 1;
        (*s).bytes += bytes as u64;
    }
}
