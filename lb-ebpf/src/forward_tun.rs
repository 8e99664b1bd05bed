//! TUN forwarding: the packet is encapsulated whole (IPIP for an IPv4 service, IP6IP6 for an
//! IPv6 one) and sent to the next hop towards the real (out of the interface the kernel routes
//! it through: egress.rs), which
//! strips the outer header (xlb_realserver, or a kernel tunnel) and answers the client directly.
//!
//! Only the outer header is written: the inner packet stays where it is and the L2 header moves
//! to the new start of the frame, so the cost does not grow with the packet.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{FAMILY_V4, ServiceValue};

use crate::{
    conntrack::Choice,
    csum, egress,
    maps::CONFIG,
    parse::{
        ETH_HLEN, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN, Packet, VLAN_HLEN, ptr_at, read,
    },
};

pub const OUTER_TTL: u8 = 64;
/// An L2 header with one VLAN tag: the longest the parser accepts.
const L2_MAX: usize = ETH_HLEN + VLAN_HLEN;

/// What the outer header takes from the inner one. Read here rather than by the parser, so
/// that DR packets do not pay for it.
pub struct Inner {
    /// The datagram's length as its header states it (IPv4 total length, IPv6 payload length
    /// + 40): the outer length comes from it, never from the frame, which may be padded.
    pub len: u32,
    /// IPv4 ToS / IPv6 traffic class (DSCP and ECN).
    pub tos: u8,
    /// IPv4 "don't fragment".
    pub df: bool,
}

#[inline(always)]
pub fn inner(ctx: &XdpContext, pkt: &Packet) -> Option<Inner> {
    if pkt.family == FAMILY_V4 {
        let h = read::<[u8; 8]>(ctx, pkt.l3_off)?;
        Some(Inner {
            len: u16::from_be_bytes([h[2], h[3]]) as u32,
            tos: h[1],
            df: h[6] & 0x40 != 0,
        })
    } else {
        let h = read::<[u8; 6]>(ctx, pkt.l3_off)?;
        Some(Inner {
            len: u16::from_be_bytes([h[4], h[5]]) as u32 + IPV6_HLEN as u32,
            tos: h[0] << 4 | h[1] >> 4,
            df: false,
        })
    }
}

/// Why a packet cannot be encapsulated as it is: the caller drops it or answers it.
pub enum Unfit {
    /// Its header states fewer bytes than a header, or more than the frame holds.
    Malformed,
    /// Too big for the egress MTU once encapsulated.
    TooBig(TooBig),
}

/// What a "too big" reply needs to know.
pub struct TooBig {
    /// The datagram's length, from its header.
    pub len: u32,
    /// The largest inner packet that fits once encapsulated: what an ICMP reply advertises.
    pub mtu: u32,
    /// IPv4 "don't fragment" (false for IPv6).
    pub df: bool,
}

/// Runs before the packet is forwarded (for flows, before scheduling, so that a packet that
/// cannot be encapsulated never becomes a tracked flow): `Err` for a malformed packet or one
/// too big for the egress MTU once encapsulated.
#[inline(always)]
pub fn check(ctx: &XdpContext, pkt: &Packet) -> Result<(), Unfit> {
    // Neither fails once the packet is parsed (a one-element array, a header already read);
    // should one, `forward` aborts.
    let (Some(config), Some(inner)) = (CONFIG.get(0), inner(ctx, pkt)) else {
        return Ok(());
    };
    let overhead = if pkt.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    } as u32;
    // The outer length is taken from the inner header, so that header must describe bytes that
    // are really there (a shorter frame would make the outer header lie).
    let avail = (ctx.data_end() - ctx.data() - pkt.l3_off) as u32;
    if inner.len < overhead || inner.len > avail {
        return Err(Unfit::Malformed);
    }
    if config.mtu == 0 || inner.len + overhead <= config.mtu {
        return Ok(());
    }
    Err(Unfit::TooBig(TooBig {
        len: inner.len,
        mtu: config.mtu - overhead,
        df: inner.df,
    }))
}

#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, svc: &ServiceValue, choice: &Choice) -> u32 {
    let Some(inner) = inner(ctx, pkt) else {
        return xdp_action::XDP_ABORTED;
    };
    let backend = &choice.backend;
    let outer = Outer {
        src: &svc.tunnel_src,
        dst: &backend.addr,
        // The flow label spreads flows over the receiver's queues and ECMP paths, which see
        // only the outer addresses otherwise. Fragments hash without ports (later ones have
        // none), so every fragment of a datagram takes the same path.
        label: choice.flow_hash & 0xf_ffff,
        dst_mac: &backend.mac,
        src_mac: &backend.src_mac,
    };
    let verdict = wrap(ctx, pkt, &inner, &outer);
    if verdict != xdp_action::XDP_TX {
        return verdict;
    }
    egress::send(ctx, backend)
}

/// How an IPIP / IP6IP6 packet is addressed.
pub struct Outer<'a> {
    pub src: &'a [u8; 16],
    pub dst: &'a [u8; 16],
    /// The IPv6 outer flow label (ignored for IPv4).
    pub label: u32,
    pub dst_mac: &'a [u8; 6],
    pub src_mac: &'a [u8; 6],
}

/// Wraps the packet in an outer header of its own family (IPIP or IP6IP6), addressed as
/// `outer` says, with the inner header's ToS / traffic class.
#[inline(always)]
pub fn wrap(ctx: &XdpContext, pkt: &Packet, inner: &Inner, outer: &Outer) -> u32 {
    if pkt.family == FAMILY_V4 {
        let mut h = [0u8; IPV4_HLEN];
        h[0] = 0x45;
        h[1] = inner.tos;
        h[2..4].copy_from_slice(&((inner.len + IPV4_HLEN as u32) as u16).to_be_bytes());
        // Identification 0 with DF set: an atomic datagram's id means nothing (RFC 6864).
        h[6] = 0x40;
        h[8] = OUTER_TTL;
        h[9] = IPPROTO_IPIP;
        h[12..16].copy_from_slice(&outer.src[..4]);
        h[16..20].copy_from_slice(&outer.dst[..4]);
        let check = csum::finish(csum::add(0, &h));
        h[10] = check[0];
        h[11] = check[1];
        encapsulate(ctx, pkt.l3_off, &h, outer.dst_mac, outer.src_mac)
    } else {
        let label = outer.label;
        let mut h = [0u8; IPV6_HLEN];
        h[0] = 0x60 | inner.tos >> 4;
        h[1] = inner.tos << 4 | (label >> 16) as u8;
        h[2] = (label >> 8) as u8;
        h[3] = label as u8;
        h[4..6].copy_from_slice(&(inner.len as u16).to_be_bytes());
        h[6] = IPPROTO_IPV6;
        h[7] = OUTER_TTL;
        h[8..24].copy_from_slice(outer.src);
        h[24..40].copy_from_slice(outer.dst);
        encapsulate(ctx, pkt.l3_off, &h, outer.dst_mac, outer.src_mac)
    }
}

/// Grows the frame by the outer header `N` bytes at the front, moves the L2 header there with
/// new MACs (its VLAN tag and EtherType stay: the outer header is of the inner's family) and
/// writes the outer header after it.
#[inline(always)]
pub fn encapsulate<const N: usize>(
    ctx: &XdpContext,
    l2: usize,
    outer: &[u8; N],
    dst_mac: &[u8; 6],
    src_mac: &[u8; 6],
) -> u32 {
    // Copied whole: without a tag the last four bytes are the inner header's, overwritten
    // below by the outer header. One fixed-size copy keeps the verifier's work simple.
    let Some(mut eth) = read::<[u8; L2_MAX]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    eth[..6].copy_from_slice(dst_mac);
    eth[6..12].copy_from_slice(src_mac);
    // SAFETY: the context is the program's own; a failure leaves the frame unchanged.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(N as i32)) } != 0 {
        // No headroom: a driver problem, visible through the xdp_exception tracepoint.
        return xdp_action::XDP_ABORTED;
    }
    // adjust_head voids every packet pointer: both are derived afresh from the context.
    let (Some(eth_at), Some(outer_at)) =
        (ptr_at::<[u8; L2_MAX]>(ctx, 0), ptr_at::<[u8; N]>(ctx, l2))
    else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked both ranges; the outer header is written last on purpose.
    unsafe {
        eth_at.write_unaligned(eth);
        outer_at.write_unaligned(*outer);
    }
    xdp_action::XDP_TX
}
