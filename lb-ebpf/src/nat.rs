//! NAT forwarding (LVS NAT) in both directions.
//!
//! Requests: the destination becomes the real's address and port (`Backend::port`, 0 keeps the
//! port), IP and TCP/UDP checksums are updated incrementally, and the flow's reply tuple is
//! recorded in `NAT_REPLIES` when the flow is scheduled. Replies: the reals route them through
//! the director; a frame whose tuple is in `NAT_REPLIES` gets its source rewritten back to the
//! VIP and port and leaves for the neighbour the flow's first packet came from, out of the
//! interface it came in on. This lookup runs before the service lookup, and only while some
//! service is in NAT mode (`CONFIG_F_NAT`); a frame matching no entry goes on untouched.
//!
//! The balancer's stack is full, so the rewrites run in programs of their own, tail-called
//! through `NAT_PROGRAM` with what the balancer decided in the per-CPU `NAT_SCRATCH`: the real
//! (`xlb_nat_forward`), or a copy of the reply's entry (`xlb_nat_reply`).
//!
//! Entries are refreshed by replies (once a second, as the connection table's) and marked
//! closing on the real's FIN or RST; the table is an LRU, and a new flow on the same
//! tuple overwrites its entry.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_csum_diff, bpf_get_prandom_u32},
    programs::XdpContext,
};
use lb_common::{
    Backend, CONN_F_CLOSING, FAMILY_V4, Global, NatKey, NatReply, PROTO_TCP, PROTO_UDP,
    SERVICE_F_FULLNAT, SNAT_PORT_COUNT, SNAT_PORT_MIN, SNAT_TRIES, ServiceValue, SnatEndpoint,
};

use crate::{
    conntrack::{self, Choice},
    counters, csum,
    drop::{self, DropReason},
    egress,
    maps::{BACKENDS, FULLNAT_FLOWS, NAT_PROGRAM, NAT_REPLIES, NAT_SCRATCH, SNAT_ADDRS},
    parse::{self, Fragment, Packet, ptr_at},
};

/// `NAT_PROGRAM` slots.
pub const FORWARD_SLOT: u32 = 0;
pub const REPLY_SLOT: u32 = 1;

/// Where the source and destination addresses sit in the IPv4 and IPv6 headers.
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV4_CHECK: usize = 10;
const IPV6_SRC: usize = 8;
const IPV6_DST: usize = 24;
/// Where the source and destination ports sit in TCP and UDP headers.
const L4_SPORT: usize = 0;
const L4_DPORT: usize = 2;

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

/// Sets one end (address and port) of the packet, with both checksums updated incrementally.
/// `addr` is the new address (IPv4 in its first 4 bytes; `A` is 4 or 16), read where it lies
/// (a map value): nothing large is copied to the stack, which the balancer's programs have
/// little of. Every pointer is bounds-checked before anything is written: a frame too short
/// for its TCP checksum is left whole (None). A later fragment has no L4 header: only its
/// address changes (the first fragment's checksum already covers the new pseudo-header).
#[inline(always)]
fn set_end<const A: usize>(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    addr: &[u8; 16],
    port: u16,
) -> Option<()> {
    let v4 = A == 4;
    let addr_off = match (v4, end) {
        (true, End::Src) => IPV4_SRC,
        (true, End::Dst) => IPV4_DST,
        (false, End::Src) => IPV6_SRC,
        (false, End::Dst) => IPV6_DST,
    };
    let ip_addr = ptr_at::<[u8; A]>(ctx, pkt.l3_off + addr_off)?;
    let ip_check = ptr_at::<[u8; 2]>(ctx, pkt.l3_off + IPV4_CHECK)?;
    let with_l4 = pkt.fragment != Fragment::Later;
    let (l4_port, l4_check) = if with_l4 {
        let port_off = if end == End::Src { L4_SPORT } else { L4_DPORT };
        let check_off = if pkt.proto == PROTO_TCP { 16 } else { 6 };
        (
            ptr_at::<u16>(ctx, pkt.l4_off + port_off)?,
            ptr_at::<[u8; 2]>(ctx, pkt.l4_off + check_off)?,
        )
    } else {
        (core::ptr::null_mut(), core::ptr::null_mut())
    };
    let new_addr = addr.as_ptr() as *mut u32;
    // SAFETY: both ranges are A bytes (a multiple of 4) of packet or map memory, only read.
    let diff = unsafe { bpf_csum_diff(ip_addr as *mut u32, A as u32, new_addr, A as u32, 0) };
    if diff < 0 {
        return None;
    }
    let diff = diff as u32 as u64;
    // SAFETY: every pointer was bounds-checked by ptr_at above.
    unsafe {
        if v4 {
            ip_check.write_unaligned(csum::add_partial(ip_check.read_unaligned(), diff));
        }
        core::ptr::copy_nonoverlapping(addr.as_ptr(), ip_addr as *mut u8, A);
        if !with_l4 {
            return Some(());
        }
        let old_port = l4_port.read_unaligned();
        l4_port.write_unaligned(port);
        let check = l4_check.read_unaligned();
        // UDP over IPv4 without a checksum stays without one.
        if pkt.proto == PROTO_UDP && check == [0, 0] {
            return Some(());
        }
        let mut new = csum::add_partial(check, diff);
        new = csum::replace(new, old_port.to_ne_bytes(), port.to_ne_bytes());
        // A computed UDP checksum of 0 is sent as all ones (0 means "none", RFC 768).
        if pkt.proto == PROTO_UDP && new == [0, 0] {
            new = [0xff, 0xff];
        }
        l4_check.write_unaligned(new);
    }
    Some(())
}

#[inline(always)]
fn set_either(ctx: &XdpContext, pkt: &Packet, end: End, addr: &[u8; 16], port: u16) -> Option<()> {
    if pkt.family == FAMILY_V4 {
        set_end::<4>(ctx, pkt, end, addr, port)
    } else {
        set_end::<16>(ctx, pkt, end, addr, port)
    }
}

/// The balancer's hand-over of a request for a NAT service: tail-calls `xlb_nat_forward`.
/// Returns only if that fails (no program in the slot): the frame is aborted, visibly.
#[inline(always)]
pub fn hand_over_request(ctx: &XdpContext, svc: &ServiceValue, choice: &Choice) -> u32 {
    if let Some(s) = NAT_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's own element.
        unsafe {
            (*s).backend_id = choice.backend_id;
            (*s).new_flow = choice.new_flow as u32;
            (*s).service_id = svc.id;
            (*s).service_flags = svc.flags;
        }
        // SAFETY: the context is the program's own; a failed tail call returns here.
        unsafe { NAT_PROGRAM.tail_call(ctx, FORWARD_SLOT) };
    }
    xdp_action::XDP_ABORTED
}

/// `xlb_nat_forward`: rewrites a request for the real the balancer chose and sends it there.
/// A frame too short for its checksum field is dropped as malformed (nothing was written).
#[inline(always)]
pub fn forward_request(ctx: &XdpContext) -> u32 {
    forward(ctx).unwrap_or_else(|| drop::drop(ctx, DropReason::Malformed))
}

/// None if the frame is too short to rewrite (nothing was changed).
#[inline(always)]
fn forward(ctx: &XdpContext) -> Option<u32> {
    let pkt = parse::parse(ctx)?;
    // SAFETY: this CPU's own element, written by the balancer for this frame.
    let scratch = unsafe { &*NAT_SCRATCH.get_ptr(0)? };
    let b = BACKENDS.get(scratch.backend_id)?;
    let pkt = &pkt;
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    // SAFETY: bounds-checked by ptr_at.
    let old_macs = unsafe { macs.read_unaligned() };
    // Whether the rewrites can be done, before any state is recorded for the flow: a frame
    // too short for its checksum field records nothing.
    if pkt.fragment != Fragment::Later {
        let check_off = if pkt.proto == PROTO_TCP { 16 } else { 6 };
        ptr_at::<[u8; 2]>(ctx, pkt.l4_off + check_off)?;
    }
    let dport = if b.port != 0 { b.port } else { pkt.dport };
    if scratch.service_flags & SERVICE_F_FULLNAT != 0 {
        // Decided before anything is rewritten: the flow is known by the client's tuple.
        let Some(snat) = source_for(ctx, pkt, scratch.service_id, b, dport, &old_macs) else {
            return Some(drop::drop(ctx, DropReason::SnatExhausted));
        };
        set_either(ctx, pkt, End::Src, &snat.addr, snat.port)?;
    } else if scratch.new_flow != 0 || pkt.fragment == Fragment::First {
        // Recorded when the flow is (re)scheduled, and for each first fragment (fragments are
        // scheduled without the connection table).
        let key = tuple(pkt, b.addr, pkt.src, dport, pkt.sport);
        let value = reply_value(ctx, pkt, pkt.sport, pkt.dport, &old_macs);
        // A full LRU evicts its oldest entry; a failed insert leaves the replies untranslated.
        let _ = NAT_REPLIES.insert(&key, &value, 0);
    }
    set_either(ctx, pkt, End::Dst, &b.addr, dport)?;
    let mut new_macs = [0u8; 12];
    new_macs[..6].copy_from_slice(&b.mac);
    new_macs[6..].copy_from_slice(&b.src_mac);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { macs.write_unaligned(new_macs) };
    Some(egress::send(ctx, b))
}

/// How a flow's replies are translated back, from its request (the client's tuple, with the
/// ports the caller found) and the request's MACs: the reply goes back to whoever sent the
/// request, from the MAC it was sent to, out of the interface it came in on.
#[inline(always)]
fn reply_value(
    ctx: &XdpContext,
    pkt: &Packet,
    sport: u16,
    dport: u16,
    macs: &[u8; 12],
) -> NatReply {
    let mut mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    mac.copy_from_slice(&macs[6..]);
    src_mac.copy_from_slice(&macs[..6]);
    NatReply {
        vip: pkt.dst,
        client: pkt.src,
        vport: dport,
        client_port: sport,
        mac,
        src_mac,
        ifindex: ctx.ingress_ifindex() as u32,
        last_seen_s: conntrack::now_s(),
        flags: if pkt.is_tcp_fin_or_rst() {
            CONN_F_CLOSING
        } else {
            0
        },
        _pad: [0; 2],
    }
}

/// Full NAT: the source a client's flow leaves with towards real `b` (port `real_port`). The
/// flow's own, while the reply table still holds its reply tuple for this client and real;
/// else a fresh one: a random SNAT address and port, claimed by inserting the reply tuple only
/// if absent (`BPF_NOEXIST`, atomic across CPUs, so two flows never share one), up to
/// `SNAT_TRIES` times. None: no free port found (the flow is refused and counted).
#[inline(always)]
fn source_for(
    ctx: &XdpContext,
    pkt: &Packet,
    service_id: u32,
    b: &Backend,
    real_port: u16,
    macs: &[u8; 12],
) -> Option<SnatEndpoint> {
    let (sport, dport) = if pkt.fragment == Fragment::Later {
        let ports = conntrack::fragment_ports(pkt)?;
        (ports.sport, ports.dport)
    } else {
        (pkt.sport, pkt.dport)
    };
    let flow = tuple(pkt, pkt.src, pkt.dst, sport, dport);
    // Its destination (the SNAT address and port) filled in below.
    let mut reply = tuple(pkt, b.addr, [0; 16], real_port, 0);
    if let Some(known) = FULLNAT_FLOWS.get_ptr(&flow) {
        // SAFETY: an LRU value, copied out.
        let known = unsafe { *known };
        reply.dst = known.addr;
        reply.dport = known.port;
        if let Some(r) = NAT_REPLIES.get_ptr(&reply) {
            // SAFETY: an LRU value, only read.
            let r = unsafe { &*r };
            if r.client == pkt.src && r.client_port == sport {
                return Some(known);
            }
        }
    }
    let addrs = SNAT_ADDRS.get(service_id)?;
    let count = addrs.count;
    if count == 0 {
        return None;
    }
    let value = reply_value(ctx, pkt, sport, dport, macs);
    for _ in 0..SNAT_TRIES {
        // SAFETY: a helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((SNAT_PORT_MIN as u32 + (r & 0xffff) % SNAT_PORT_COUNT) as u16).to_be();
        let addr = *addrs.addrs.get(((r >> 16) % count) as usize)?;
        reply.dst = addr;
        reply.dport = port;
        if NAT_REPLIES
            .insert(&reply, &value, BPF_NOEXIST as u64)
            .is_ok()
        {
            let snat = SnatEndpoint {
                addr,
                port,
                _pad: [0; 2],
            };
            let _ = FULLNAT_FLOWS.insert(&flow, &snat, 0);
            return Some(snat);
        }
    }
    None
}

/// A tuple of the packet's flow (protocol and family) with the given ends; ports in network
/// byte order.
#[inline(always)]
fn tuple(pkt: &Packet, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> NatKey {
    NatKey {
        src,
        dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Whether the frame is a reply of a NAT flow (its tuple, with `sport`/`dport` as the caller
/// found them for a later fragment); if it is, its entry is refreshed and `xlb_nat_reply`
/// tail-called, which translates it back and sends it to the client's side. Returns the
/// verdict if the tail call fails; None: not a NAT reply, untouched.
#[inline(always)]
pub fn hand_over_reply(ctx: &XdpContext, pkt: &Packet, sport: u16, dport: u16) -> Option<u32> {
    let key = tuple(pkt, pkt.src, pkt.dst, sport, dport);
    let entry = NAT_REPLIES.get_ptr_mut(&key)?;
    // SAFETY: an LRU value; concurrent writers of one flow write equally valid values.
    let r = unsafe { &mut *entry };
    conntrack::touch(&mut r.last_seen_s, conntrack::now_ns());
    if pkt.is_tcp_fin_or_rst() && r.flags & CONN_F_CLOSING == 0 {
        r.flags |= CONN_F_CLOSING;
    }
    let s = NAT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's own element; the entry is a valid map value.
    unsafe { (*s).reply = *r };
    if pkt.fragment == Fragment::First {
        // Its later fragments carry no ports: they find this entry through the ports kept here.
        conntrack::remember_fragment_ports(pkt);
    }
    // SAFETY: the context is the program's own; a failed tail call returns here.
    unsafe { NAT_PROGRAM.tail_call(ctx, REPLY_SLOT) };
    Some(xdp_action::XDP_ABORTED)
}

/// `xlb_nat_reply`: translates back the reply `hand_over_reply` found. A frame too short for
/// its checksum field passes untouched (nothing was written).
#[inline(always)]
pub fn translate_reply(ctx: &XdpContext) -> u32 {
    reply(ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn reply(ctx: &XdpContext) -> Option<u32> {
    let pkt = parse::parse(ctx)?;
    let pkt = &pkt;
    // SAFETY: this CPU's own element, written by the balancer for this frame.
    let r = unsafe { &(*NAT_SCRATCH.get_ptr(0)?).reply };
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    set_either(ctx, pkt, End::Src, &r.vip, r.vport)?;
    // Full NAT: the destination (an SNAT address and port) goes back to the client's.
    if r.client != pkt.dst || r.client_port != pkt.dport {
        set_either(ctx, pkt, End::Dst, &r.client, r.client_port)?;
    }
    let mut new_macs = [0u8; 12];
    new_macs[..6].copy_from_slice(&r.mac);
    new_macs[6..].copy_from_slice(&r.src_mac);
    // SAFETY: bounds-checked by ptr_at.
    unsafe { macs.write_unaligned(new_macs) };
    counters::global(Global::NatReplied);
    Some(egress::send_via(ctx, r.ifindex))
}
