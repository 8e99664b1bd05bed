//! ICMP errors to a VIP: a router between a real and its client answers the real's packet
//! (from the VIP) with an ICMP error to the VIP, which reaches the director. It goes to the real
//! that serves the quoted flow, as that flow's packets do (Katran does the same), so the real's
//! path MTU discovery works for established connections. Errors about NAT flows, in either
//! direction, are translated instead (nat_icmp.rs).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FAMILY_V4, Global, PROTO_TCP, PROTO_UDP, SERVICE_F_NAT, SERVICE_F_TUN};

use crate::{
    conntrack, counters,
    drop::{self, DropReason},
    egress, forward_dr,
    forward_tun::{self, Unfit},
    nat,
    parse::{ICMP_DEST_UNREACH, ICMP_HLEN, ICMPV6_PKT_TOOBIG, IPV4_HLEN, IPV6_HLEN, Packet, read},
    service,
};

const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// An unfragmented ICMP message whose header is at `icmp_off`: an error quoting a service's
/// flow goes to that flow's real (DR or TUN, as the service forwards); one that may be about a
/// NAT flow goes to `xlb_nat_icmp`; anything else (echo, errors about other traffic) passes to
/// the kernel untouched.
#[inline(always)]
pub fn forward_error(ctx: &XdpContext, family: u8, l3_off: usize, icmp_off: usize) -> u32 {
    let Some(flow) = quoted_flow(ctx, family, l3_off, icmp_off) else {
        return xdp_action::XDP_PASS;
    };
    // As for flows: a frame flooded to us but sent to another director's MAC is its business.
    if egress::ingress(ctx).is_none() {
        return xdp_action::XDP_PASS;
    }
    let Some(svc) = service::lookup(&flow, flow.dport) else {
        // Perhaps about a NAT flow's request, from the real's side: translated (nat_icmp.rs).
        return nat::hand_over_error(ctx, false);
    };
    if svc.flags & SERVICE_F_NAT != 0 {
        // About a NAT flow's reply, from the client's side: translated (nat_icmp.rs).
        return nat::hand_over_error(ctx, true);
    }
    let Some(choice) = conntrack::peek(&flow, &svc) else {
        return drop::drop(ctx, DropReason::NoBackend);
    };
    let verdict = if svc.flags & SERVICE_F_TUN != 0 {
        // The flow's family and L3 offset are the error's: the whole error is encapsulated.
        // One too big for the tunnel is dropped, never answered: no ICMP error about an ICMP
        // error (RFC 1122 3.2.2, RFC 4443 2.4).
        match forward_tun::check(ctx, &flow, &svc) {
            Ok(()) => {}
            Err(Unfit::Malformed) => return drop::drop(ctx, DropReason::Malformed),
            Err(Unfit::TooBig(_)) => return drop::drop(ctx, DropReason::TooBig),
        }
        forward_tun::forward(ctx, &flow, &svc, &choice)
    } else {
        forward_dr::forward(ctx, &choice.backend)
    };
    if egress::sent(verdict) {
        counters::global(Global::IcmpErrorForwarded);
    }
    verdict
}

/// The client's 5-tuple of the flow an error quotes, or None if the message is not an error
/// about a TCP/UDP packet sent from the address it is addressed to. The quote is the real's
/// packet, VIP:port -> client:port, so addresses and ports are swapped back. A quoted first
/// fragment still carries its ports; a later one does not and is refused. The tuple's
/// `l3_off` is the error's own; its `l4_off` is the quoted packet's L4 header.
#[inline(always)]
pub fn quoted_flow(ctx: &XdpContext, family: u8, l3_off: usize, icmp_off: usize) -> Option<Packet> {
    // Type and code: a one-byte read's bounds check compiles to a form the verifier rejects.
    let [icmp_type, _code] = read::<[u8; 2]>(ctx, icmp_off)?;
    let quote = icmp_off + ICMP_HLEN;
    let mut flow = Packet::at(family, l3_off);
    // The error's destination: the quote must come from it.
    let mut to = [0u8; 16];
    let l4;
    if family == FAMILY_V4 {
        to[..4].copy_from_slice(&read::<[u8; 4]>(ctx, l3_off + 16)?);
        if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
            return None;
        }
        let h = read::<[u8; IPV4_HLEN]>(ctx, quote)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        if h[0] >> 4 != 4 || ihl < IPV4_HLEN || u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
            return None;
        }
        flow.proto = h[9];
        flow.src[..4].copy_from_slice(&h[16..20]);
        flow.dst[..4].copy_from_slice(&h[12..16]);
        l4 = quote + ihl;
    } else {
        if icmp_type != ICMPV6_DEST_UNREACH
            && icmp_type != ICMPV6_PKT_TOOBIG
            && icmp_type != ICMPV6_TIME_EXCEEDED
        {
            return None;
        }
        to = read::<[u8; 16]>(ctx, l3_off + 24)?;
        // The real's own packets carry no extension headers: TCP or UDP follows directly.
        let h = read::<[u8; IPV6_HLEN]>(ctx, quote)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        flow.proto = h[6];
        flow.src.copy_from_slice(&h[24..40]);
        flow.dst.copy_from_slice(&h[8..24]);
        l4 = quote + IPV6_HLEN;
    }
    // Sent from the address the error came to (the VIP), about TCP or UDP.
    if !same_addr(&flow.dst, &to) || (flow.proto != PROTO_TCP && flow.proto != PROTO_UDP) {
        return None;
    }
    // Every error quotes at least 8 bytes past the IP header: both ports.
    let ports = read::<[u16; 2]>(ctx, l4)?;
    flow.sport = ports[1];
    flow.dport = ports[0];
    flow.l4_off = l4;
    Some(flow)
}

/// Compared by words: a slice comparison could become a memcmp call, which BPF lacks.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b)
}
