//! Per-CPU counters: the data path only ever adds to its own CPU's slot, without atomics;
//! the control plane sums the CPUs when it reads.

use lb_common::{Counters, Decap, Global};

use crate::maps::{BACKEND_STATS, DECAP_STATS, GLOBAL_STATS, SERVICE_STATS};

#[inline(always)]
pub fn global(which: Global) {
    if let Some(slot) = GLOBAL_STATS.get_ptr_mut(which as u32) {
        // SAFETY: a per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Returns `verdict`, counting it as `Global::Passed` when it is XDP_PASS: every program that
/// can hand a frame to the kernel ends through this.
#[inline(always)]
pub fn count_pass(verdict: u32) -> u32 {
    if verdict == aya_ebpf::bindings::xdp_action::XDP_PASS {
        global(Global::Passed);
    }
    verdict
}

/// The decapsulator's counters.
#[inline(always)]
pub fn decap(which: Decap) {
    if let Some(slot) = DECAP_STATS.get_ptr_mut(which as u32) {
        // SAFETY: as in `global`.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn add(slot: Option<*mut Counters>, bytes: u64, new_flow: bool) {
    if let Some(c) = slot {
        // SAFETY: as in `global`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

#[inline(always)]
pub fn service(id: u32, bytes: u64, new_flow: bool) {
    add(SERVICE_STATS.get_ptr_mut(id), bytes, new_flow);
}

#[inline(always)]
pub fn backend(id: u32, bytes: u64, new_flow: bool) {
    add(BACKEND_STATS.get_ptr_mut(id), bytes, new_flow);
}

/// A refusal from this backend's real, honoured.
#[inline(always)]
pub fn refusal(id: u32) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: as in `global`.
        unsafe { (*c).refusals += 1 };
    }
}
