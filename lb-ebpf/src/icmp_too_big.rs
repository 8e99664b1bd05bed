//! ICMP, both ways between a VIP and the path:
//!
//! - "Too big" for TUN: a packet that would exceed the egress MTU once encapsulated is
//!   answered, from the VIP, with ICMP "fragmentation needed" (IPv4, DF set) or ICMPv6 "packet
//!   too big", so the client's path MTU discovery shrinks its packets by the tunnel overhead.
//!   The reply is built in place: the frame is cut to the quote, grown at the front by the new
//!   IP and ICMP headers, and sent back out to the MAC it came from.
//! - Errors to a VIP: a router between a real and its client answers the real's packet (from
//!   the VIP) with an ICMP error to the VIP, which reaches the director. It goes to the real
//!   that serves the quoted flow, as that flow's packets do (Katran does the same), so the
//!   real's path MTU discovery works for established connections.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    Config, ConnKey, FAMILY_V4, Global, PROTO_TCP, PROTO_UDP, SERVICE_F_TUN, ServiceValue,
};

use crate::{
    conntrack::{self, Choice},
    counters, csum, forward_dr, forward_tun, maglev,
    maps::{BACKENDS, CONFIG, CONNS},
    parse::{
        self, ETH_HLEN, Fragment, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN, Packet,
        VLAN_HLEN, ptr_at, read,
    },
    service,
};

/// Bytes of the offending packet quoted, from its IP header on, in both families: one
/// `bpf_csum_diff` call sums it (512 is the helper's limit), it holds any IPv4 header with
/// options and any TCP header, and the reply stays within RFC 1812's 576 bytes (IPv4) and
/// RFC 4443's 1280 (IPv6). A fixed length keeps the checksum free of variable-length loops.
pub const QUOTE_LEN: usize = 512;

const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const REPLY_TTL: u8 = 64;
/// IPv4 precedence "internetwork control", as Linux sends its ICMP errors.
const IPTOS_PREC_INTERNETCONTROL: u8 = 0xc0;
const L2_MAX: usize = ETH_HLEN + VLAN_HLEN;

/// Turns the frame into the "too big" reply for `pkt` (a datagram of `len` bytes), advertising
/// `mtu` (the largest inner packet that fits once encapsulated). XDP_TX, or XDP_DROP when the
/// packet may not be answered (see `answerable`) or is shorter than the quote (only with an
/// MTU below what userspace accepts).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, len: u32, mtu: u32, config: &Config) -> u32 {
    let verdict = reply(ctx, pkt, len, mtu, config).unwrap_or(xdp_action::XDP_DROP);
    counters::global(if verdict == xdp_action::XDP_TX {
        Global::IcmpTooBigSent
    } else {
        Global::DropTooBig
    });
    verdict
}

#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet, len: u32, mtu: u32, config: &Config) -> Option<u32> {
    // The quote must be the datagram's own bytes (`len`, from its header), not padding.
    if len < QUOTE_LEN as u32 {
        return None;
    }
    let l2 = pkt.l3_off;
    let mut eth = read::<[u8; L2_MAX]>(ctx, 0)?;
    answerable(ctx, pkt, &eth)?;
    let quote = csum::packet(ptr_at::<[u8; QUOTE_LEN]>(ctx, l2)?)?;
    // Back to where the packet came from (the client or its router), from this interface.
    eth.copy_within(6..12, 0);
    eth[6..12].copy_from_slice(&config.iface_mac);
    if pkt.family == FAMILY_V4 {
        let mut h = [0u8; IPV4_HLEN + ICMP_HLEN];
        h[0] = 0x45;
        h[1] = IPTOS_PREC_INTERNETCONTROL;
        h[2..4].copy_from_slice(&((IPV4_HLEN + ICMP_HLEN + QUOTE_LEN) as u16).to_be_bytes());
        h[8] = REPLY_TTL;
        h[9] = IPPROTO_ICMP;
        h[12..16].copy_from_slice(&pkt.dst[..4]);
        h[16..20].copy_from_slice(&pkt.src[..4]);
        let ip_check = csum::finish(csum::add(0, &h));
        h[10..12].copy_from_slice(&ip_check);
        h[20] = ICMP_DEST_UNREACH;
        h[21] = ICMP_FRAG_NEEDED;
        // Bytes 24..26 stay zero (unused); the next-hop MTU field is 16 bits.
        h[26..28].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
        let mut icmp = [0u8; ICMP_HLEN];
        icmp.copy_from_slice(&h[20..28]);
        let icmp_check = csum::finish(csum::add(quote, &icmp));
        h[22..24].copy_from_slice(&icmp_check);
        rebuild(ctx, l2, &eth, &h)
    } else {
        let mut h = [0u8; IPV6_HLEN + ICMP_HLEN];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&((ICMP_HLEN + QUOTE_LEN) as u16).to_be_bytes());
        h[6] = IPPROTO_ICMPV6;
        h[7] = REPLY_TTL;
        h[8..24].copy_from_slice(&pkt.dst);
        h[24..40].copy_from_slice(&pkt.src);
        h[40] = ICMPV6_PKT_TOOBIG;
        h[44..48].copy_from_slice(&mtu.to_be_bytes());
        // The ICMPv6 checksum covers a pseudo-header: addresses, upper-layer length, next
        // header; the addresses are summed straight from the header being built.
        let mut rest = [0u8; 8 + ICMP_HLEN];
        rest[0..4].copy_from_slice(&((ICMP_HLEN + QUOTE_LEN) as u32).to_be_bytes());
        rest[7] = IPPROTO_ICMPV6;
        rest[8..].copy_from_slice(&h[40..48]);
        let mut addrs = [0u8; 32];
        addrs.copy_from_slice(&h[8..40]);
        let check = csum::finish(csum::add(csum::add(quote, &addrs), &rest));
        h[42..44].copy_from_slice(&check);
        rebuild(ctx, l2, &eth, &h)
    }
}

/// Whether an ICMP error may answer the packet, by the rules hosts and routers follow (RFC 1122
/// 3.2.2, RFC 1812 4.3.2.7 and 5.2.2, RFC 4443 2.4; Linux's icmp_send): never about a header
/// that fails its checksum (it is corrupt, and so may be its source address), a later
/// fragment, a frame from a group MAC, or a source that is no single host. Costs nothing on
/// forwarded packets: only packets too big for the tunnel get here.
#[inline(always)]
fn answerable(ctx: &XdpContext, pkt: &Packet, eth: &[u8; L2_MAX]) -> Option<()> {
    if eth[6] & 1 != 0 {
        return None;
    }
    if pkt.family == FAMILY_V4 {
        // The packet holds at least QUOTE_LEN bytes, so the longest header can be read whole;
        // the sum covers the IHL's words only.
        let h = read::<[u8; 60]>(ctx, pkt.l3_off)?;
        let ihl = ((h[0] & 0x0f) as usize) * 4;
        let mut sum = 0u64;
        let mut i = 0;
        while i < 60 {
            if i < ihl {
                sum += u16::from_ne_bytes([h[i], h[i + 1]]) as u64;
            }
            i += 2;
        }
        let src = h[12];
        if csum::finish(sum) != [0, 0]
            || pkt.fragment == Fragment::Later
            || src == 0
            || src == 127
            || src >= 224
        {
            return None;
        }
    } else {
        let src = u128::from_be_bytes(pkt.src);
        if src == 0 || src == 1 || pkt.src[0] == 0xff {
            return None;
        }
    }
    Some(())
}

/// Cuts the frame after the quote, grows it at the front by `N` bytes, and writes the L2
/// header then the new headers (`N` = IP + ICMP) before the quote, which does not move.
#[inline(always)]
fn rebuild<const N: usize>(
    ctx: &XdpContext,
    l2: usize,
    eth: &[u8; L2_MAX],
    hdrs: &[u8; N],
) -> Option<u32> {
    let len = ctx.data_end() - ctx.data();
    let cut = len - (l2 + QUOTE_LEN);
    // SAFETY: the context is the program's own; the frame keeps l2 + QUOTE_LEN bytes.
    if cut > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(cut as i32)) } != 0 {
        return Some(xdp_action::XDP_ABORTED);
    }
    // SAFETY: as above; a failure leaves the frame as it was.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(N as i32)) } != 0 {
        return Some(xdp_action::XDP_ABORTED);
    }
    // Packet pointers are void after the adjustments: derived afresh. Without a VLAN tag the
    // last four bytes of `eth` land where the headers go, and are overwritten by them.
    let (Some(eth_at), Some(hdrs_at)) =
        (ptr_at::<[u8; L2_MAX]>(ctx, 0), ptr_at::<[u8; N]>(ctx, l2))
    else {
        return Some(xdp_action::XDP_ABORTED);
    };
    // SAFETY: ptr_at checked both ranges.
    unsafe {
        eth_at.write_unaligned(*eth);
        hdrs_at.write_unaligned(*hdrs);
    }
    Some(xdp_action::XDP_TX)
}

/// An unfragmented ICMP message whose header is at `icmp_off`: an error quoting a service's
/// flow goes to that flow's real (DR or TUN, as the service forwards); anything else (echo,
/// errors about other traffic) passes to the kernel untouched.
#[inline(always)]
pub fn forward_error(ctx: &XdpContext, family: u8, l3_off: usize, icmp_off: usize) -> u32 {
    let Some(flow) = quoted_flow(ctx, family, l3_off, icmp_off) else {
        return xdp_action::XDP_PASS;
    };
    let Some(svc) = service::lookup(&flow, flow.dport) else {
        return xdp_action::XDP_PASS;
    };
    // As for flows: a frame flooded to us but sent to another director's MAC is its business.
    if !CONFIG
        .get(0)
        .is_some_and(|c| parse::sent_to(ctx, &c.iface_mac))
    {
        return xdp_action::XDP_PASS;
    }
    let Some(choice) = flow_real(&flow, &svc) else {
        counters::global(Global::DropNoBackend);
        return xdp_action::XDP_DROP;
    };
    let verdict = if svc.flags & SERVICE_F_TUN != 0 {
        // The flow's family and L3 offset are the error's: the whole error is encapsulated.
        if let Some(verdict) = check_tunnel(ctx, &flow) {
            return verdict;
        }
        forward_tun::forward(ctx, &flow, &svc, &choice)
    } else {
        forward_dr::forward(ctx, &choice.backend)
    };
    if verdict == xdp_action::XDP_TX {
        counters::global(Global::IcmpErrorForwarded);
    }
    verdict
}

/// The client's 5-tuple of the flow an error quotes, or None if the message is not an error
/// about a TCP/UDP packet sent from the address it is addressed to. The quote is the real's
/// packet, VIP:port -> client:port, so addresses and ports are swapped back. A quoted first
/// fragment still carries its ports; a later one does not and is refused.
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, family: u8, l3_off: usize, icmp_off: usize) -> Option<Packet> {
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
    Some(flow)
}

/// Compared by words: a slice comparison could become a memcmp call, which BPF lacks.
#[inline(always)]
fn same_addr(a: &[u8; 16], b: &[u8; 16]) -> bool {
    u128::from_ne_bytes(*a) == u128::from_ne_bytes(*b)
}

/// The real of a flow: its connection-table entry's, else where Maglev puts it now (as its
/// next packet would go). Read only: an error neither creates a flow nor keeps one alive.
#[inline(always)]
fn flow_real(flow: &Packet, svc: &ServiceValue) -> Option<Choice> {
    let key = ConnKey {
        src: flow.src,
        dst: flow.dst,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    if let Some(entry) = CONNS.get_ptr(&key) {
        // SAFETY: an LRU value, copied out whole.
        let conn = unsafe { *entry };
        if let Some(b) = BACKENDS.get(u32::from(conn.backend_id)) {
            if b.generation == conn.generation && conntrack::usable(b, svc) {
                return Some(Choice {
                    backend_id: conn.backend_id.into(),
                    backend: *b,
                    new_flow: false,
                    flow_hash: conn.flow_hash,
                });
            }
        }
    }
    let backend_id = maglev::pick(svc.id, maglev::hash(flow, svc, true))?;
    let b = BACKENDS.get(backend_id)?;
    if !conntrack::usable(b, svc) {
        return None;
    }
    Some(Choice {
        backend_id,
        backend: *b,
        new_flow: false,
        flow_hash: maglev::five_tuple_hash(flow, true),
    })
}

/// As forward_tun::check, except that an error too big for the tunnel is dropped, never
/// answered: no ICMP error about an ICMP error (RFC 1122 3.2.2, RFC 4443 2.4).
#[inline(always)]
fn check_tunnel(ctx: &XdpContext, error: &Packet) -> Option<u32> {
    let (Some(config), Some(inner)) = (CONFIG.get(0), forward_tun::inner(ctx, error)) else {
        return Some(xdp_action::XDP_DROP);
    };
    let overhead = if error.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    } as u32;
    let avail = (ctx.data_end() - ctx.data() - error.l3_off) as u32;
    if inner.len < overhead || inner.len > avail {
        counters::global(Global::DropMalformed);
        return Some(xdp_action::XDP_DROP);
    }
    if config.mtu != 0 && inner.len + overhead > config.mtu {
        counters::global(Global::DropTooBig);
        return Some(xdp_action::XDP_DROP);
    }
    None
}
