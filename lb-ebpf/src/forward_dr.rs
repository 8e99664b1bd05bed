//! DR forwarding: the frame goes to the real's MAC, out of the interface the real is on-link
//! on (egress.rs); IP and L4 bytes are untouched (the real holds the VIP on lo and answers the
//! client directly).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::Backend;

use crate::{egress, parse::ptr_at};

#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> u32 {
    let Some(macs) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let mut new_macs = [0u8; 12];
    new_macs[..6].copy_from_slice(&backend.mac);
    new_macs[6..].copy_from_slice(&backend.src_mac);
    // SAFETY: ptr_at checked that the 12 bytes are inside the frame.
    unsafe { macs.write_unaligned(new_macs) };
    egress::send(ctx, backend)
}
