//! NAT forwarding (LVS NAT) in both directions.
//!
//! Requests: the destination becomes the real's address and port (`Backend::port`, 0 keeps the
//! port), IP and TCP/UDP checksums are updated incrementally, and the flow's reply tuple is
//! recorded in `NAT_REPLIES` when the flow is scheduled. Replies: the reals route them through
//! the director; a frame whose tuple is in `NAT_REPLIES` gets its source rewritten back to the
//! VIP and port and leaves for the neighbour the flow's first packet came from, out of the
//! interface it came in on. This lookup runs after the service lookup missed (a reply's
//! destination is a client or SNAT address, never a VIP: the control plane refuses a SNAT
//! address that is one), and only while some service is in NAT mode (`CONFIG_F_NAT`); a frame
//! matching no entry passes untouched.
//!
//! The balancer's stack is full, so the rewrites run in programs of their own, tail-called
//! through `NAT_PROGRAM`: `xlb_nat_forward` with the real the balancer chose in the per-CPU
//! `NAT_SCRATCH`, and `xlb_nat_reply` for every frame no service claims, which looks the
//! reply table up itself.
//!
//! Entries are refreshed by replies (once a second, as the connection table's) and marked
//! closing on the real's FIN or RST; the table is an LRU, and a new flow on the same
//! tuple overwrites its entry. IPv4 replies look in a one-cache-line copy of the entries first
//! (reply_cache.rs).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_get_prandom_u32,
    programs::XdpContext,
};
use lb_common::{
    Backend, CONFIG_F_NAT, CONN_F_CLOSING, CONN_F_SNAT, CONN_SNAT_ADDR_MASK, CONN_SNAT_ADDR_SHIFT,
    FAMILY_V4, Global, MAX_SNAT_ADDRS, NAT_FLOW_NEW, NatKey, NatReply, PROTO_TCP, PROTO_UDP,
    SERVICE_F_FULLNAT, SNAT_PORT_COUNT, SNAT_PORT_MIN, SNAT_TRIES, ServiceValue, SnatAddrs,
    SnatEndpoint,
};

use crate::{
    conntrack::{self, Choice},
    counters, csum,
    drop::{self, DropReason},
    egress,
    maps::{BACKENDS, CONFIG, FULLNAT_FLOWS, NAT_PROGRAM, NAT_REPLIES, NAT_SCRATCH, SNAT_ADDRS},
    parse::{self, Fragment, Packet, ptr_at},
    reply_cache,
};

/// `NAT_PROGRAM` slots.
pub const FORWARD_SLOT: u32 = 0;
pub const REPLY_SLOT: u32 = 1;
pub const ICMP_SLOT: u32 = 2;

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
pub enum End {
    Src,
    Dst,
}

/// A bounds-checked packet pointer, kept as it is: LLVM may otherwise compute it again from
/// the frame's start and a spilled offset where it is used, a pointer the verifier has not
/// seen checked (a quoted header's, at offsets that vary with two headers' lengths).
#[inline(always)]
fn checked<T>(p: *mut T) -> *mut T {
    core::hint::black_box(p)
}

/// Where an end's address lies in an IP header of the family (`A`: 4 or 16 bytes).
#[inline(always)]
const fn addr_off<const A: usize>(end: End) -> usize {
    match (A == 4, end) {
        (true, End::Src) => IPV4_SRC,
        (true, End::Dst) => IPV4_DST,
        (false, End::Src) => IPV6_SRC,
        (false, End::Dst) => IPV6_DST,
    }
}

/// Writes `addr` over the address at `ip_addr`; returns the change to a one's complement sum
/// (what a pseudo-header, and an IPv4 header's checksum, see), None if the checksum helper
/// refuses (nothing written).
///
/// # Safety
/// `ip_addr` must have been bounds-checked.
#[inline(always)]
unsafe fn write_addr<const A: usize>(ip_addr: *mut [u8; A], addr: &[u8; 16]) -> Option<u64> {
    // SAFETY: both ranges are A bytes (4 or 16) of packet or map memory; the caller
    // bounds-checked the packet's.
    unsafe {
        let diff = csum::diff::<A>(ip_addr, addr.as_ptr() as *const [u8; A])?;
        core::ptr::copy_nonoverlapping(addr.as_ptr(), ip_addr as *mut u8, A);
        Some(diff)
    }
}

/// Sets one address of the IP header at `l3_off` (`A`: 4 or 16 bytes; an IPv4 header's
/// checksum updated); returns the address's change to a one's complement sum (an ICMPv6
/// checksum's pseudo-header).
#[inline(always)]
pub fn set_addr<const A: usize>(
    ctx: &XdpContext,
    l3_off: usize,
    end: End,
    addr: &[u8; 16],
) -> Option<u64> {
    let ip_addr = checked(ptr_at::<[u8; A]>(ctx, l3_off + addr_off::<A>(end))?);
    let ip_check = checked(ptr_at::<[u8; 2]>(ctx, l3_off + IPV4_CHECK)?);
    // SAFETY: both bounds-checked.
    unsafe {
        let diff = write_addr(ip_addr, addr)?;
        if A == 4 {
            update_ip_check(ip_check, diff);
        }
        Some(diff)
    }
}

/// Updates the IPv4 header checksum at `at` for addresses that changed the sum by `diff`;
/// returns the change to a one's complement sum of the header.
///
/// # Safety
/// `at` must have been bounds-checked.
#[inline(always)]
unsafe fn update_ip_check(at: *mut [u8; 2], diff: u64) -> u64 {
    // SAFETY: the caller bounds-checked it.
    let old = unsafe { at.read_unaligned() };
    let new = csum::add_partial(old, diff);
    unsafe { at.write_unaligned(new) };
    csum::change(old, new)
}

/// A new address (IPv4 in its first 4 bytes) and port (network order) for one end of a
/// packet. The address is read where it lies (a map value): nothing large is copied to the
/// stack, which the balancer's programs have little of.
#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub addr: &'a [u8; 16],
    pub port: u16,
}

/// Sets the given ends (address and port) of the packet (`A`: 4 or 16 address bytes), with
/// both checksums updated incrementally, once for both ends. Every pointer is bounds-checked
/// before anything is written: a frame too short for its TCP checksum is left whole (None). A
/// later fragment has no L4 header: only its addresses change (the first fragment's checksum
/// already covers the new pseudo-header).
///
/// `l4_check` false leaves the TCP/UDP checksum alone (a packet quoted in an ICMP error may
/// end before it). Returns how much the one's complement sum of the header bytes changed:
/// what the checksum of an ICMP error that quotes the packet needs.
#[inline(always)]
pub fn set_ends<const A: usize>(
    ctx: &XdpContext,
    pkt: &Packet,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
    l4_check: bool,
) -> Option<u64> {
    let ip_check = checked(ptr_at::<[u8; 2]>(ctx, pkt.l3_off + IPV4_CHECK)?);
    let ip_src = addr_at::<A>(ctx, pkt, End::Src, src.is_some())?;
    let ip_dst = addr_at::<A>(ctx, pkt, End::Dst, dst.is_some())?;
    let with_l4 = pkt.fragment != Fragment::Later;
    let ports = if with_l4 {
        checked(ptr_at::<[u16; 2]>(ctx, pkt.l4_off + L4_SPORT)?)
    } else {
        core::ptr::null_mut()
    };
    let check_at = if with_l4 && l4_check {
        let check_off = if pkt.proto == PROTO_TCP { 16 } else { 6 };
        checked(ptr_at::<[u8; 2]>(ctx, pkt.l4_off + check_off)?)
    } else {
        core::ptr::null_mut()
    };
    // SAFETY: every pointer was bounds-checked by ptr_at above (a null one is never used).
    unsafe {
        // The addresses' change, which the IPv4 header and the pseudo-header both see.
        let mut addrs = 0;
        if let Some(e) = src {
            addrs += write_addr(ip_src, e.addr)?;
        }
        if let Some(e) = dst {
            addrs += write_addr(ip_dst, e.addr)?;
        }
        let mut change = addrs;
        if A == 4 {
            change += update_ip_check(ip_check, addrs);
        }
        if !with_l4 {
            return Some(change);
        }
        let ports = ports as *mut u16;
        let mut l4 = addrs;
        if let Some(e) = src {
            l4 += write_port(ports.add(L4_SPORT / 2), e.port);
        }
        if let Some(e) = dst {
            l4 += write_port(ports.add(L4_DPORT / 2), e.port);
        }
        change += l4 - addrs;
        if check_at.is_null() {
            return Some(change);
        }
        let check = check_at.read_unaligned();
        // UDP over IPv4 without a checksum stays without one.
        if pkt.proto == PROTO_UDP && check == [0, 0] {
            return Some(change);
        }
        let mut new = csum::add_partial(check, l4);
        // A computed UDP checksum of 0 is sent as all ones (0 means "none", RFC 768).
        if pkt.proto == PROTO_UDP && new == [0, 0] {
            new = [0xff, 0xff];
        }
        check_at.write_unaligned(new);
        Some(change + csum::change(check, new))
    }
}

/// Where an end's address lies in the packet, bounds-checked; null if that end is not `set`.
#[inline(always)]
fn addr_at<const A: usize>(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    set: bool,
) -> Option<*mut [u8; A]> {
    if !set {
        return Some(core::ptr::null_mut());
    }
    Some(checked(ptr_at::<[u8; A]>(
        ctx,
        pkt.l3_off + addr_off::<A>(end),
    )?))
}

/// Writes `port` over the one at `at`; returns the change to a one's complement sum.
///
/// # Safety
/// `at` must have been bounds-checked.
#[inline(always)]
unsafe fn write_port(at: *mut u16, port: u16) -> u64 {
    // SAFETY: the caller bounds-checked it.
    let old = unsafe { at.read_unaligned() };
    unsafe { at.write_unaligned(port) };
    csum::change(old.to_ne_bytes(), port.to_ne_bytes())
}

/// `set_ends` for one end.
#[inline(always)]
pub fn set_end<const A: usize>(
    ctx: &XdpContext,
    pkt: &Packet,
    end: End,
    to: Endpoint,
    l4_check: bool,
) -> Option<u64> {
    match end {
        End::Src => set_ends::<A>(ctx, pkt, Some(to), None, l4_check),
        End::Dst => set_ends::<A>(ctx, pkt, None, Some(to), l4_check),
    }
}

/// `set_ends` for the packet's family, TCP/UDP checksum included; see there.
#[inline(always)]
pub fn set_either(
    ctx: &XdpContext,
    pkt: &Packet,
    src: Option<Endpoint>,
    dst: Option<Endpoint>,
) -> Option<u64> {
    if pkt.family == FAMILY_V4 {
        set_ends::<4>(ctx, pkt, src, dst, true)
    } else {
        set_ends::<16>(ctx, pkt, src, dst, true)
    }
}

/// Writes the frame's destination and source MACs (bounds-checked by the caller).
#[inline(always)]
pub fn write_macs(macs: *mut [u8; 12], dst: &[u8; 6], src: &[u8; 6]) {
    let mut new_macs = [0u8; 12];
    new_macs[..6].copy_from_slice(dst);
    new_macs[6..].copy_from_slice(src);
    // SAFETY: the caller bounds-checked the 12 bytes.
    unsafe { macs.write_unaligned(new_macs) };
}

/// The balancer's hand-over of a request for a NAT service: tail-calls `xlb_nat_forward`.
/// Returns only if that fails (no program in the slot): the frame is aborted, visibly.
#[inline(always)]
pub fn hand_over_request(ctx: &XdpContext, svc: &ServiceValue, choice: &Choice) -> u32 {
    if let Some(s) = NAT_SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's own element.
        unsafe {
            (*s).backend_id = choice.backend_id;
            (*s).flow = if choice.new_flow {
                NAT_FLOW_NEW
            } else {
                choice.snat
            };
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
    let to_real = Endpoint {
        addr: &b.addr,
        port: dport,
    };
    let new_flow = scratch.flow & NAT_FLOW_NEW != 0;
    if scratch.service_flags & SERVICE_F_FULLNAT != 0 {
        let addrs = SNAT_ADDRS.get(scratch.service_id)?;
        // A flow the connection table knows, with its source in its entry: no FULLNAT_FLOWS
        // lookup (the daemon clears that source with the flow's reply entry).
        let in_entry = scratch.flow & CONN_F_SNAT as u32 != 0;
        let index = (scratch.flow & CONN_SNAT_ADDR_MASK as u32) >> CONN_SNAT_ADDR_SHIFT;
        if !new_flow && in_entry && index < addrs.count {
            let to_snat = Endpoint {
                addr: addrs.addrs.get(index as usize)?,
                port: (scratch.flow >> 16) as u16,
            };
            set_either(ctx, pkt, Some(to_snat), Some(to_real))?;
        } else {
            // Decided before anything is rewritten: the flow is known by the client's tuple.
            let Some((snat, index)) = source_for(ctx, pkt, addrs, b, dport, &old_macs, !new_flow)
            else {
                return Some(drop::drop(ctx, DropReason::SnatExhausted));
            };
            if let Some(index) = index
                && pkt.fragment == Fragment::None
            {
                conntrack::record_snat(pkt, scratch.backend_id, index, snat.port);
            }
            let to_snat = Endpoint {
                addr: &snat.addr,
                port: snat.port,
            };
            set_either(ctx, pkt, Some(to_snat), Some(to_real))?;
        }
    } else {
        if new_flow || pkt.fragment == Fragment::First {
            // Recorded when the flow is (re)scheduled, and for each first fragment (fragments
            // are scheduled without the connection table).
            let key = tuple(pkt, b.addr, pkt.src, dport, pkt.sport);
            let value = reply_value(ctx, pkt, pkt.sport, pkt.dport, &old_macs);
            // A full LRU evicts its oldest entry; a failed insert leaves the replies
            // untranslated.
            if NAT_REPLIES.insert(&key, &value, 0).is_ok() {
                reply_cache::record(&key, &value);
            }
        }
        set_either(ctx, pkt, None, Some(to_real))?;
    }
    write_macs(macs, &b.mac, &b.src_mac);
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
/// flow's own, while the reply table still holds its reply tuple for this client and real
/// (`known_flow`, a flow the connection table holds, takes that for granted);
/// else a fresh one: a random SNAT address and port, claimed by inserting the reply tuple only
/// if absent (`BPF_NOEXIST`, atomic across CPUs, so two flows never share one), up to
/// `SNAT_TRIES` times. None: no free port found (the flow is refused and counted). With the
/// source, the index of its address in `addrs` (the service's SNAT addresses), if there.
#[inline(always)]
fn source_for(
    ctx: &XdpContext,
    pkt: &Packet,
    addrs: &SnatAddrs,
    b: &Backend,
    real_port: u16,
    macs: &[u8; 12],
    known_flow: bool,
) -> Option<(SnatEndpoint, Option<u32>)> {
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
        // A flow the connection table knows (on the real it had) trusts its entry: the control
        // plane deletes it with the flow's reply entry. A flow (re)scheduled, a SYN included (a
        // new connection may reuse an old tuple), checks that the reply entry is still its own.
        if known_flow {
            return Some((known, index_of(addrs, &known.addr)));
        }
        reply.dst = known.addr;
        reply.dport = known.port;
        if let Some(r) = NAT_REPLIES.get_ptr(&reply) {
            // SAFETY: an LRU value, only read.
            let r = unsafe { &*r };
            if r.client == pkt.src && r.client_port == sport {
                return Some((known, index_of(addrs, &known.addr)));
            }
        }
    }
    let count = addrs.count;
    if count == 0 {
        return None;
    }
    let value = reply_value(ctx, pkt, sport, dport, macs);
    for _ in 0..SNAT_TRIES {
        // SAFETY: a helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        let port = ((SNAT_PORT_MIN as u32 + (r & 0xffff) % SNAT_PORT_COUNT) as u16).to_be();
        let index = (r >> 16) % count;
        let addr = *addrs.addrs.get(index as usize)?;
        reply.dst = addr;
        reply.dport = port;
        if NAT_REPLIES
            .insert(&reply, &value, BPF_NOEXIST as u64)
            .is_ok()
        {
            reply_cache::record(&reply, &value);
            let snat = SnatEndpoint {
                addr,
                port,
                _pad: [0; 2],
            };
            let _ = FULLNAT_FLOWS.insert(&flow, &snat, 0);
            return Some((snat, Some(index)));
        }
    }
    None
}

/// Where `addr` is among a service's SNAT addresses; None if no longer among them (the flow
/// then keeps it, but not in its connection-table entry).
#[inline(always)]
fn index_of(addrs: &SnatAddrs, addr: &[u8; 16]) -> Option<u32> {
    let wanted = u128::from_ne_bytes(*addr);
    (0..MAX_SNAT_ADDRS as u32)
        .take_while(|&i| i < addrs.count)
        .find(|&i| {
            addrs
                .addrs
                .get(i as usize)
                .is_some_and(|a| u128::from_ne_bytes(*a) == wanted)
        })
}

/// A tuple of the packet's flow (protocol and family) with the given ends; ports in network
/// byte order.
#[inline(always)]
pub fn tuple(pkt: &Packet, src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> NatKey {
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

/// `xlb_icmp`'s hand-over of an ICMP error NAT may concern: it quotes a NAT service's flow
/// (`nat_service`), or no service's flow while some service is in NAT mode. Tail-calls
/// `xlb_nat_icmp` (nat_icmp.rs); passes the error otherwise, or if the tail call fails.
#[inline(always)]
pub fn hand_over_error(ctx: &XdpContext, nat_service: bool) -> u32 {
    if nat_service || CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_NAT != 0) {
        // SAFETY: the context is the program's own; a failed tail call returns here.
        unsafe { NAT_PROGRAM.tail_call(ctx, ICMP_SLOT) };
    }
    xdp_action::XDP_PASS
}

/// The balancer's hand-over of a frame no service claims, while some service is in NAT mode:
/// tail-calls `xlb_nat_reply`, which translates it if it is a NAT flow's reply. Returns only
/// if the tail call fails (no program in the slot): the frame passes, as before NAT.
#[inline(always)]
pub fn hand_over_reply(ctx: &XdpContext) -> u32 {
    if CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_NAT != 0) {
        // SAFETY: the context is the program's own; a failed tail call returns here.
        unsafe { NAT_PROGRAM.tail_call(ctx, REPLY_SLOT) };
    }
    xdp_action::XDP_PASS
}

/// `xlb_nat_reply`: a frame whose tuple (a later fragment's ports from its first fragment) is
/// in `NAT_REPLIES` is a NAT flow's reply: its entry is refreshed and the frame translated
/// back and sent to the client's side. Anything else, and a frame too short for its checksum
/// field, passes untouched.
#[inline(always)]
pub fn translate_reply(ctx: &XdpContext) -> u32 {
    reply(ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn reply(ctx: &XdpContext) -> Option<u32> {
    let pkt = parse::parse(ctx)?;
    let pkt = &pkt;
    // As for flows: a frame flooded to us but sent to another host's MAC is its business.
    egress::ingress(ctx)?;
    // Whether the rewrites can be done, before an entry is touched.
    let macs = ptr_at::<[u8; 12]>(ctx, 0)?;
    let (sport, dport) = if pkt.fragment == Fragment::Later {
        let ports = conntrack::fragment_ports(pkt)?;
        (ports.sport, ports.dport)
    } else {
        (pkt.sport, pkt.dport)
    };
    // An IPv4 reply looks in the reply cache first; a FIN or RST goes to the reply table, which
    // records that the flow is closing.
    let cached =
        if pkt.family == FAMILY_V4 && pkt.fragment == Fragment::None && !pkt.is_tcp_fin_or_rst() {
            reply_cache::find(pkt)
        } else {
            None
        };
    // The translation, and where it records when it was last used.
    let (r, last_seen_s): (&NatReply, *mut u32) = match cached {
        // SAFETY: a way of the cache (see reply_cache.rs).
        Some((way, copy)) => (copy, unsafe { &raw mut (*way).last_seen_s }),
        None => {
            let key = tuple(pkt, pkt.src, pkt.dst, sport, dport);
            // SAFETY: an LRU value; concurrent writers of one flow write equally valid values.
            let r = unsafe { &mut *NAT_REPLIES.get_ptr_mut(&key)? };
            if pkt.is_tcp_fin_or_rst() && r.flags & CONN_F_CLOSING == 0 {
                r.flags |= CONN_F_CLOSING;
            }
            if pkt.fragment == Fragment::First {
                // Its later fragments carry no ports: they find this entry through the ports
                // kept here.
                conntrack::remember_fragment_ports(pkt);
            }
            let last_seen_s = &raw mut r.last_seen_s;
            (&*r, last_seen_s)
        }
    };
    // SAFETY: a field of map memory (the way's or the entry's).
    conntrack::touch(unsafe { &mut *last_seen_s }, conntrack::now_ns());
    let to_vip = Endpoint {
        addr: &r.vip,
        port: r.vport,
    };
    // Full NAT: the destination (an SNAT address and port) goes back to the client's.
    let to_client = (r.client != pkt.dst || r.client_port != dport).then_some(Endpoint {
        addr: &r.client,
        port: r.client_port,
    });
    set_either(ctx, pkt, Some(to_vip), to_client)?;
    write_macs(macs, &r.mac, &r.src_mac);
    counters::global(Global::NatReplied);
    Some(egress::send_via(ctx, r.ifindex))
}
