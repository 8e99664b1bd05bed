//! The director's side of refusals: a real with no socket for a SYN's (or datagram's) port
//! sends it back inside IPIP / IP6IP6 (refuse.rs, on the real). When it comes from the very
//! real its flow is tracked to (DR: that real's MAC; TUN: its address as outer source), the
//! flow is re-scheduled to another real (conntrack::refused), the outer header is stripped and
//! the packet is forwarded as the service forwards. Anything else that looks like one is
//! dropped and counted (`drop_refusal_forged`): a client cannot move flows or take reals down.
//!
//! Runs in `xlb_icmp` (the program for frames that are not TCP or UDP), so the flow path
//! carries none of this code.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Global, PROTO_UDP, SERVICE_F_TUN};

use crate::{
    conntrack::{self, Refused, Sender},
    counters, decap,
    drop::{self, DropReason},
    egress, forward_dr, forward_tun,
    parse::{
        self, ETH_P_IPV4, ETH_P_IPV6, Fragment, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN,
        read,
    },
    service,
};

/// An IPIP / IP6IP6 / 4in6 packet: its inner packet's EtherType, L3 offset, outer header
/// length and outer source.
pub struct Tunnel {
    ether_type: u16,
    l3: usize,
    outer_len: usize,
    src: [u8; 16],
}

/// The frame's tunnel packet, if it is one (unfragmented; IPIP, IP6IP6, or 4in6: a real
/// refuses a GUE packet in bare IP-in-IP, decap.rs).
#[inline(always)]
pub fn tunnel(ctx: &XdpContext) -> Option<Tunnel> {
    let (mut ether_type, l3) = parse::ethernet(ctx)?;
    let mut src = [0u8; 16];
    let outer_len = match ether_type {
        ETH_P_IPV4 => {
            let h = read::<[u8; IPV4_HLEN]>(ctx, l3)?;
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            if h[0] >> 4 != 4
                || ihl < IPV4_HLEN
                || h[9] != IPPROTO_IPIP
                || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0
            {
                return None;
            }
            src[..4].copy_from_slice(&h[12..16]);
            ihl
        }
        ETH_P_IPV6 => {
            let h = read::<[u8; IPV6_HLEN]>(ctx, l3)?;
            if h[0] >> 4 != 6 || (h[6] != IPPROTO_IPV6 && h[6] != IPPROTO_IPIP) {
                return None;
            }
            if h[6] == IPPROTO_IPIP {
                ether_type = ETH_P_IPV4;
            }
            src.copy_from_slice(&h[8..24]);
            IPV6_HLEN
        }
        _ => return None,
    };
    Some(Tunnel {
        ether_type,
        l3,
        outer_len,
        src,
    })
}

/// A tunnel packet: a refusal of a service's flow is honoured or dropped; any other tunnel
/// packet (not for a service, not sent to our MAC) passes to the kernel untouched.
#[inline(always)]
pub fn refusal(ctx: &XdpContext, t: &Tunnel) -> u32 {
    let Some(mut pkt) = parse::parse_at(ctx, t.ether_type, t.l3 + t.outer_len) else {
        return xdp_action::XDP_PASS;
    };
    let Some(svc) = service::lookup(&pkt, pkt.dport) else {
        return xdp_action::XDP_PASS;
    };
    if egress::ingress(ctx).is_none() {
        return xdp_action::XDP_PASS;
    }
    // Reals refuse only whole SYNs and datagrams.
    if pkt.fragment != Fragment::None || !(pkt.is_tcp_syn() || pkt.proto == PROTO_UDP) {
        return drop::drop(ctx, DropReason::RefusalForged);
    }
    let tun = svc.flags & SERVICE_F_TUN != 0;
    let from = if tun {
        Sender::Addr(t.src)
    } else {
        let Some(mac) = read::<[u8; 6]>(ctx, 6) else {
            return xdp_action::XDP_PASS;
        };
        Sender::Mac(mac)
    };
    let choice = match conntrack::refused(&pkt, &svc, &from) {
        Refused::Moved(c) => c,
        Refused::Bounced => return drop::drop(ctx, DropReason::RefusalBounced),
        Refused::Forged => return drop::drop(ctx, DropReason::RefusalForged),
    };
    if decap::strip(ctx, t.l3, t.outer_len, t.ether_type).is_none() {
        // Cannot happen (both headers were read above), but the frame may be half rewritten.
        return xdp_action::XDP_ABORTED;
    }
    pkt.l3_off = t.l3;
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    counters::backend(choice.backend_id, bytes, true);
    counters::global(Global::RefusalRescheduled);
    if tun {
        forward_tun::forward(ctx, &pkt, &svc, &choice)
    } else {
        forward_dr::forward(ctx, &choice.backend)
    }
}
