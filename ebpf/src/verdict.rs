//! The one verdict type of every packet path: `Next` (TC_ACT_UNSPEC, TCX_NEXT: the next program
//! or filter runs) or `Shot` (TC_ACT_SHOT). Steering decides it, counting never does, and the entry
//! points turn it into the TC action. There is deliberately no `TC_ACT_OK`: it would end the chain.

use aya_ebpf::bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC};
use tunmeter_common::SteerEvent;

use crate::stats;

/// What happens to a packet after tunmeter's program.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// Not mine (or steered and handed on): TCX programs and tc filters after this one still run.
    Next = TC_ACT_UNSPEC,
    /// Dropped: only steering does this, for a packet it must not let through.
    Shot = TC_ACT_SHOT,
}

impl Verdict {
    /// The TC action the program returns.
    #[inline(always)]
    pub const fn tc_action(self) -> i32 {
        self as i32
    }

    /// The verdict of a steering path. A drop is counted in `STEER_STATS` as its event, with the
    /// packet's L3 bytes (only computed for a drop).
    #[inline(always)]
    pub fn of(steered: Steered, l3_len: impl FnOnce() -> u32) -> Verdict {
        match steered {
            Ok(()) => Verdict::Next,
            Err(e) => {
                stats::event(e, l3_len());
                Verdict::Shot
            }
        }
    }
}

/// What a steering path did: `Ok` = the packet goes on (translated, redirected or untouched; the
/// path counted its own events), `Err(event)` = it must be dropped, and `event` says why.
pub type Steered = Result<(), SteerEvent>;
