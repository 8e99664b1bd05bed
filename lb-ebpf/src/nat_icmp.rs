//! ICMP errors about NAT flows, translated so that path MTU discovery (and every other error)
//! works through the director, as IPVS and netfilter translate them:
//!
//! - from the real's side (the real, or a router between the director and it), about a
//!   request: the quote is client -> real (NAT) or SNAT address -> real (full NAT). It becomes
//!   an error from the VIP about client -> VIP:port, sent to the client as the flow's replies
//!   go (its `NAT_REPLIES` entry);
//! - from the client's side, about a reply: the quote is VIP:port -> client. It becomes an
//!   error about real -> client (NAT) or real -> SNAT address:port (full NAT), sent to the
//!   real as the flow's requests go; in full NAT it comes from the SNAT address, as they do.
//!
//! The quoted addresses and ports, the quoted IPv4 header checksum, the quoted TCP/UDP
//! checksum where the quote holds it, the outer addresses (and IPv4 header checksum) and the
//! ICMP checksum are all updated incrementally. `xlb_icmp` recognises the two kinds (an error
//! about a NAT service's flow, or about no service's flow on a NAT director) and tail-calls
//! `xlb_nat_icmp` (`nat::hand_over_error`), which finds the flow again: its own stack, none of
//! `xlb_icmp`'s.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, FAMILY_V4, Global, PROTO_TCP, SERVICE_F_FULLNAT, SERVICE_F_NAT};

use crate::{
    conntrack, counters, csum,
    drop::{self, DropReason},
    egress, icmp_error,
    maps::{FULLNAT_FLOWS, NAT_REPLIES},
    nat::{self, End},
    parse::{self, ICMP_HLEN, IPV6_HLEN, Packet, ptr_at, read},
    service,
};

/// `xlb_nat_icmp`: translates an error about a NAT flow and sends it on; an error about no
/// NAT flow passes untouched.
#[inline(always)]
pub fn translate_error(ctx: &XdpContext) -> u32 {
    let verdict = translate(ctx).unwrap_or(xdp_action::XDP_PASS);
    if egress::sent(verdict) {
        counters::global(Global::IcmpErrorForwarded);
    }
    verdict
}

/// The error's offsets, and where its ICMP message ends (the datagram's length, not the
/// frame's, which may hold padding).
struct Error {
    family: u8,
    l3_off: usize,
    icmp_off: usize,
    end: usize,
}

#[inline(always)]
fn translate(ctx: &XdpContext) -> Option<u32> {
    let (family, l3_off, icmp_off) = parse::icmp(ctx)?;
    let flow = icmp_error::quoted_flow(ctx, family, l3_off, icmp_off)?;
    let end = if family == FAMILY_V4 {
        l3_off + u16::from_be(read::<u16>(ctx, l3_off + 2)?) as usize
    } else {
        l3_off + IPV6_HLEN + u16::from_be(read::<u16>(ctx, l3_off + 4)?) as usize
    };
    // Both quoted ports must be part of the message, not padding after it.
    if flow.l4_off + 4 > end {
        return None;
    }
    let err = Error {
        family,
        l3_off,
        icmp_off,
        end,
    };
    match service::lookup(&flow, flow.dport) {
        Some(svc) if svc.flags & SERVICE_F_NAT != 0 => {
            let Some(choice) = conntrack::peek(&flow, &svc) else {
                return Some(drop::drop(ctx, DropReason::NoBackend));
            };
            // One branch on the family, not one per rewrite: the verifier walks each once.
            if family == FAMILY_V4 {
                from_client::<4>(ctx, &err, &flow, svc.flags, &choice.backend)
            } else {
                from_client::<16>(ctx, &err, &flow, svc.flags, &choice.backend)
            }
        }
        Some(_) => None,
        None if family == FAMILY_V4 => from_real::<4>(ctx, &err, &flow),
        None => from_real::<16>(ctx, &err, &flow),
    }
}

/// An error from the real's side about a request; `flow` (the quote, reversed) is the reply
/// tuple of its flow.
#[inline(always)]
fn from_real<const A: usize>(ctx: &XdpContext, err: &Error, flow: &Packet) -> Option<u32> {
    let key = nat::tuple(flow, flow.src, flow.dst, flow.sport, flow.dport);
    // SAFETY: an LRU value, only read.
    let r = unsafe { &*NAT_REPLIES.get_ptr(&key)? };
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    let mut change = quoted_end::<A>(ctx, err, flow, End::Src, &r.client, r.client_port)?;
    change += quoted_end::<A>(ctx, err, flow, End::Dst, &r.vip, r.vport)?;
    change += outer_end::<A>(ctx, err, End::Src, &r.vip)?;
    change += outer_end::<A>(ctx, err, End::Dst, &r.client)?;
    fix_icmp_checksum(ctx, err, change)?;
    nat::write_macs(macs, &r.mac, &r.src_mac);
    Some(egress::send_via(ctx, r.ifindex))
}

/// An error from the client's side about a reply; `flow` (the quote, reversed) is the
/// client's tuple of its flow, whose real is `b`.
#[inline(always)]
fn from_client<const A: usize>(
    ctx: &XdpContext,
    err: &Error,
    flow: &Packet,
    service_flags: u32,
    b: &Backend,
) -> Option<u32> {
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    let real_port = if b.port != 0 { b.port } else { flow.dport };
    let mut change = 0;
    if service_flags & SERVICE_F_FULLNAT != 0 {
        let key = nat::tuple(flow, flow.src, flow.dst, flow.sport, flow.dport);
        // SAFETY: an LRU value, only read.
        let snat = unsafe { &*FULLNAT_FLOWS.get_ptr(&key)? };
        change += quoted_end::<A>(ctx, err, flow, End::Dst, &snat.addr, snat.port)?;
        change += outer_end::<A>(ctx, err, End::Src, &snat.addr)?;
    }
    change += quoted_end::<A>(ctx, err, flow, End::Src, &b.addr, real_port)?;
    change += outer_end::<A>(ctx, err, End::Dst, &b.addr)?;
    fix_icmp_checksum(ctx, err, change)?;
    nat::write_macs(macs, &b.mac, &b.src_mac);
    Some(egress::send(ctx, b))
}

/// Sets one end of the quoted packet; returns the change to the ICMP message's sum. The
/// quoted TCP/UDP checksum is updated only if the quote holds it (RFC 792 promises 8 bytes).
#[inline(always)]
fn quoted_end<const A: usize>(
    ctx: &XdpContext,
    err: &Error,
    flow: &Packet,
    end: End,
    addr: &[u8; 16],
    port: u16,
) -> Option<u64> {
    let mut quoted = Packet::at(err.family, err.icmp_off + ICMP_HLEN);
    quoted.proto = flow.proto;
    quoted.l4_off = flow.l4_off;
    let check_off = if flow.proto == PROTO_TCP { 16 } else { 6 };
    let l4_check = flow.l4_off + check_off + 2 <= err.end;
    nat::set_end::<A>(ctx, &quoted, end, nat::Endpoint { addr, port }, l4_check)
}

/// Sets one address of the error's own IP header; returns its change to the ICMP checksum's
/// sum: ICMPv6 sums a pseudo-header with the addresses, ICMP (IPv4) the message alone.
#[inline(always)]
fn outer_end<const A: usize>(
    ctx: &XdpContext,
    err: &Error,
    end: End,
    addr: &[u8; 16],
) -> Option<u64> {
    let change = nat::set_addr::<A>(ctx, err.l3_off, end, addr)?;
    Some(if A == 4 { 0 } else { change })
}

/// The ICMP checksum after what it sums changed by `change`.
#[inline(always)]
fn fix_icmp_checksum(ctx: &XdpContext, err: &Error, change: u64) -> Option<()> {
    let at = ptr_at::<[u8; 2]>(ctx, err.icmp_off + 2)?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe { at.write_unaligned(csum::add_partial(at.read_unaligned(), change)) };
    Some(())
}
