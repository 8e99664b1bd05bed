//! Data-path debug events through aya-log (`xlb daemon --datapath-log`): one line per dropped
//! packet, with its reason and flow. The balancer's stack is nearly full, so it does not log
//! itself: on a drop (drop.rs), with `CONFIG_F_DATAPATH_LOG` set, it stores the reason and
//! tail-calls `xlb_drop_log`, a program of its own (own stack) that parses the frame again,
//! logs and drops. Forwarded and passed packets never get here; with the flag off a drop costs
//! one array lookup more.

use aya_ebpf::programs::XdpContext;
use aya_log_ebpf::debug;
use lb_common::{CONFIG_F_DATAPATH_LOG, FAMILY_V4, Global};

use crate::{
    maps::{CONFIG, DROP_LOG_PROGRAM, DROP_REASON},
    parse,
};

/// The target the records carry; the daemon's `--datapath-log` lets it through at debug level.
const TARGET: &str = "xlb_datapath";

/// Called by `drop::drop` before it returns XDP_DROP for `reason`. Returns only when the drop
/// is not logged (flag off, or no logging program installed).
#[inline(always)]
pub fn dropped(ctx: &XdpContext, reason: Global) {
    if !CONFIG
        .get(0)
        .is_some_and(|c| c.flags & CONFIG_F_DATAPATH_LOG != 0)
    {
        return;
    }
    if let Some(slot) = DROP_REASON.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, read by the tail-called program on this CPU right after.
        unsafe { *slot = reason as u32 };
    }
    // SAFETY: the slot holds an XDP program (or nothing: the call then returns).
    unsafe { DROP_LOG_PROGRAM.tail_call(ctx, 0) };
}

/// The body of `xlb_drop_log`: one debug record for the dropped frame.
#[inline(always)]
pub fn drop_record(ctx: &XdpContext) {
    let raw = DROP_REASON.get(0).copied().unwrap_or(u32::MAX);
    let refusal =
        raw == Global::DropRefusalBounced as u32 || raw == Global::DropRefusalForged as u32;
    let reason = match raw {
        r if r == Global::DropNoBackend as u32 => Global::DropNoBackend.name(),
        r if r == Global::DropMalformed as u32 => Global::DropMalformed.name(),
        r if r == Global::DropTooBig as u32 => Global::DropTooBig.name(),
        r if r == Global::DropRefusalBounced as u32 => Global::DropRefusalBounced.name(),
        r if r == Global::DropRefusalForged as u32 => Global::DropRefusalForged.name(),
        _ => "drop",
    };
    let Some(pkt) = parse::parse(ctx) else {
        // Not TCP or UDP: `xlb_icmp` drops ICMP errors about a service's flow.
        let what = if parse::icmp(ctx).is_some() {
            "ICMP error"
        } else if refusal {
            "tunnel packet"
        } else {
            "frame not parseable"
        };
        debug!(ctx, target: TARGET, "{} ({})", reason, what);
        return;
    };
    let (sport, dport) = (u16::from_be(pkt.sport), u16::from_be(pkt.dport));
    if pkt.family == FAMILY_V4 {
        let src = [pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]];
        let dst = [pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]];
        debug!(
            ctx,
            target: TARGET,
            "{} proto {} {:i}:{} -> {:i}:{}",
            reason,
            pkt.proto,
            src,
            sport,
            dst,
            dport
        );
    } else {
        debug!(
            ctx,
            target: TARGET,
            "{} proto {} [{:i}]:{} -> [{:i}]:{}",
            reason,
            pkt.proto,
            pkt.src,
            sport,
            pkt.dst,
            dport
        );
    }
}
