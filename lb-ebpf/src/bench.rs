//! Programs of the forwarding-rate benchmark (`cargo xtask bench`), never attached by the
//! daemon. A generator feeds frames into a veth pair with BPF_PROG_RUN's live-frames mode, the
//! program under test forwards them back with XDP_TX, and a sink drops and counts them. The
//! ceiling is `xlb_bench_swap`: the least a program that sends every frame back can do.

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

use crate::parse::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, ptr_at};

/// Frames the sink received, per CPU.
#[btf_map]
pub static BENCH_RECEIVED: PerCpuArray<u64, 1> = PerCpuArray::new();

/// The generator: sends each frame out of the interface the run names. The live-frames mode
/// recycles pages without copying the frame again, so a frame may come back as the forwarder
/// left it (a TUN frame's Ethernet header lies under its outer IP header): the Ethernet header
/// is rewritten every time, the IP packet behind it is never touched by the forwarders.
#[xdp]
pub fn xlb_bench_gen(ctx: XdpContext) -> u32 {
    let (Some(eth), Some(version)) = (
        ptr_at::<[u8; ETH_HLEN]>(&ctx, 0),
        ptr_at::<u8>(&ctx, ETH_HLEN),
    ) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: ptr_at checked both ranges.
    let ether_type = match unsafe { *version } >> 4 {
        4 => ETH_P_IPV4,
        6 => ETH_P_IPV6,
        _ => return xdp_action::XDP_DROP,
    };
    let mut hdr = [0u8; ETH_HLEN];
    hdr[..6].copy_from_slice(&GEN_DST_MAC);
    hdr[6..12].copy_from_slice(&GEN_SRC_MAC);
    hdr[12..].copy_from_slice(&ether_type.to_be_bytes());
    // SAFETY: as above.
    unsafe { eth.write_unaligned(hdr) };
    xdp_action::XDP_TX
}

/// The generated frames' MACs: the director's and a client's (the forwarders ignore them).
const GEN_DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const GEN_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

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

/// The sink on the generator's side: counts and drops what the forwarder sent back.
#[xdp]
pub fn xlb_bench_sink(_ctx: XdpContext) -> u32 {
    if let Some(n) = BENCH_RECEIVED.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
}
