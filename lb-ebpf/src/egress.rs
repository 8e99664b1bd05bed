//! Where a frame leaves: every forwarding mode ends here. A director may be attached to several
//! interfaces (two-arm: clients on one network, reals on another); each backend records the
//! attached interface the kernel routes its real through. A frame for a real on the interface
//! it came in on leaves by XDP_TX; one for a real on another interface by XDP_REDIRECT through
//! `REDIRECT_PORTS`. Replies to the sender (ICMP "too big") always leave by XDP_TX.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, Iface};

use crate::{
    maps::{CONFIG, REDIRECT_PORTS},
    parse,
};

/// The interface the frame came in on, if the balancer is attached to it and the frame was
/// sent to its MAC: a switch flooding unknown unicast (or a promiscuous NIC) shows us frames
/// meant for another director, which forwards them itself.
#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> Option<&'static Iface> {
    let ifindex = ctx.ingress_ifindex() as u32;
    // A scan of a few words, unrolled: cheaper than a hash lookup on every packet.
    let iface = CONFIG
        .get(0)?
        .ifaces
        .iter()
        .find(|i| i.ifindex == ifindex && ifindex != 0)?;
    parse::sent_to(ctx, &iface.mac).then_some(iface)
}

/// Sends the frame (its MACs already rewritten from `backend.src_mac` to `backend.mac`)
/// towards the backend's interface.
#[inline(always)]
pub fn send(ctx: &XdpContext, backend: &Backend) -> u32 {
    send_via(ctx, backend.ifindex)
}

/// Sends the frame (its MACs already rewritten) out of the attached interface `ifindex`.
#[inline(always)]
pub fn send_via(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // A miss (the interface left the map) aborts: visible through the xdp_exception
    // tracepoint, as any frame the program cannot send.
    match REDIRECT_PORTS.redirect(ifindex, xdp_action::XDP_ABORTED as u64) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// Whether a verdict sent the frame on (to a real or back to its sender).
#[inline(always)]
pub fn sent(verdict: u32) -> bool {
    verdict == xdp_action::XDP_TX || verdict == xdp_action::XDP_REDIRECT
}
