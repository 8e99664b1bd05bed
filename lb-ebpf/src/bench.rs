//! Programs of the forwarding-rate benchmark (`cargo xtask bench`), never attached by the
//! daemon. Frames ping-pong over a veth pair: the program under test forwards each frame back
//! with XDP_TX (or redirects it to a second pair), and `xlb_bench_bounce` counts it, restores
//! the original frame as the next of its flows and sends it back in, until its budget runs
//! out. The ceiling is
//! `xlb_bench_swap`: the least a program that sends every frame back can do.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, PerCpuArray},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_store_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::{BENCH_FRAME_MAX, BENCH_GAP_MAX_NS, BENCH_SAMPLE, BenchBounce, bench_flow_source};

use crate::{csum, parse::ptr_at};

/// Where a flow's source goes in the restored frame (IPv4 and TCP without options).
const IP_CHECK_AT: usize = 24;
const SADDR_AT: usize = 26;
const SPORT_AT: usize = 34;
const TCP_CHECK_AT: usize = 50;
const PATCHED_END: usize = TCP_CHECK_AT + 2;

/// Frames the bounce program received, per CPU.
#[btf_map]
pub static BENCH_RECEIVED: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The bounce program's run: budget, timestamps, the frame to restore.
#[btf_map]
pub static BENCH_BOUNCE: Array<BenchBounce, 1> = Array::new();

/// The generator's end of the ping-pong: counts each frame and, while the budget lasts,
/// restores the original frame (the forwarders rewrite MACs, add tunnel headers) as the next
/// flow's and sends it out of `out_ifindex`, always by XDP_REDIRECT so that every path's loop
/// pays the same here (with one flow too: the source is rewritten to the same values). With
/// no budget left (or never set) it is a counting sink.
#[xdp]
pub fn xlb_bench_bounce(ctx: XdpContext) -> u32 {
    if let Some(n) = BENCH_RECEIVED.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe { *n += 1 };
    }
    let Some(run) = BENCH_BOUNCE.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: the map's one element. The ping-pong runs on one CPU (the veth schedules its
    // peer's NAPI on the sending CPU), so the plain read-modify-write does not race.
    let run = unsafe { &mut *run };
    if run.budget == 0 {
        return xdp_action::XDP_DROP;
    }
    run.budget -= 1;
    // The clock now and then only: read on every frame, it would weigh on every path.
    if run.budget % BENCH_SAMPLE == 0 {
        let now = unsafe { bpf_ktime_get_ns() };
        let gap = now.wrapping_sub(run.last_ns);
        if run.last_ns != 0 && gap < BENCH_GAP_MAX_NS {
            run.busy_ns += gap;
            run.busy_frames += BENCH_SAMPLE;
        }
        run.last_ns = now;
    }
    let len = run.len as usize;
    if len == 0 || len > BENCH_FRAME_MAX {
        return xdp_action::XDP_DROP;
    }
    // To the original length at the front (a tunnel header added or removed there), then the
    // original bytes over it.
    let came_back = ctx.data_end() - ctx.data();
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, came_back as i32 - len as i32) } != 0
        || ctx.data_end() - ctx.data() != len
    {
        return xdp_action::XDP_DROP;
    }
    // `len` again, in a form whose bounds (1 to BENCH_FRAME_MAX) the verifier can see.
    let len = ((len - 1) & (BENCH_FRAME_MAX - 1)) + 1;
    // SAFETY: `len` is the frame's length and within `run.frame`.
    let stored =
        unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, run.frame.as_mut_ptr().cast(), len as u32) };
    if stored != 0 || set_flow_source(&ctx, run).is_none() {
        return xdp_action::XDP_DROP;
    }
    unsafe { bpf_redirect(run.out_ifindex, 0) as u32 }
}

/// Makes the restored frame (flow 0's) the frame of flow `run.flow`, checksums updated
/// incrementally, and steps `run.flow` on.
#[inline(always)]
fn set_flow_source(ctx: &XdpContext, run: &mut BenchBounce) -> Option<()> {
    let flow = run.flow;
    // flow_step < flows (set so by the bench): no overflow, one subtraction at most.
    let next = flow + run.flow_step;
    run.flow = if next >= run.flows {
        next - run.flows
    } else {
        next
    };
    let (addr_add, port_add) = bench_flow_source(flow);
    let f = &run.frame;
    let saddr = [
        f[SADDR_AT],
        f[SADDR_AT + 1],
        f[SADDR_AT + 2],
        f[SADDR_AT + 3],
    ];
    let new_saddr = u32::from_be_bytes(saddr)
        .wrapping_add(addr_add)
        .to_be_bytes();
    let sport = [f[SPORT_AT], f[SPORT_AT + 1]];
    let new_sport = u16::from_be_bytes(sport)
        .wrapping_add(port_add)
        .to_be_bytes();
    let addr_change = csum::change([saddr[0], saddr[1]], [new_saddr[0], new_saddr[1]])
        + csum::change([saddr[2], saddr[3]], [new_saddr[2], new_saddr[3]]);
    let ip_check = csum::add_partial([f[IP_CHECK_AT], f[IP_CHECK_AT + 1]], addr_change);
    let tcp_check = csum::add_partial(
        [f[TCP_CHECK_AT], f[TCP_CHECK_AT + 1]],
        addr_change + csum::change(sport, new_sport),
    );
    let head = ptr_at::<[u8; PATCHED_END]>(ctx, 0)?;
    // SAFETY: ptr_at checked the range; a byte array has no alignment to keep.
    let head = unsafe { &mut *head };
    head[IP_CHECK_AT..IP_CHECK_AT + 2].copy_from_slice(&ip_check);
    head[SADDR_AT..SADDR_AT + 4].copy_from_slice(&new_saddr);
    head[SPORT_AT..SPORT_AT + 2].copy_from_slice(&new_sport);
    head[TCP_CHECK_AT..TCP_CHECK_AT + 2].copy_from_slice(&tcp_check);
    Some(())
}

/// The ceiling: swaps the MACs and sends the frame back.
#[xdp]
pub fn xlb_bench_swap(ctx: XdpContext) -> u32 {
    let Some(macs) = ptr_at::<[u8; 12]>(&ctx, 0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked the range.
    let old = unsafe { macs.read_unaligned() };
    let mut new = [0u8; 12];
    new[..6].copy_from_slice(&old[6..]);
    new[6..].copy_from_slice(&old[..6]);
    unsafe { macs.write_unaligned(new) };
    xdp_action::XDP_TX
}
