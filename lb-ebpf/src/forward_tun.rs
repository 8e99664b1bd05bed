//! TUN forwarding: the packet is encapsulated whole and sent to the next hop towards the real
//! (out of the interface the kernel routes it through: egress.rs), which strips the outer header
//! (xlb_realserver, or a kernel tunnel) and answers the client directly. The outer header is IPv4
//! or IPv6 as the service says (an IPv4 service over IPv6 reals is 4in6), and either bare
//! IP-in-IP (IPIP, IP6IP6, 4in6) or GUE: outer IP + UDP whose source port comes from the flow
//! hash, so NICs (RSS) and ECMP routers, which hash the UDP ports, spread a director's flows.
//!
//! Only the outer header is written: the inner packet stays where it is and the L2 header moves
//! to the new start of the frame, so the cost does not grow with the packet.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{FAMILY_V4, PROTO_TCP, PROTO_UDP, SERVICE_F_GUE, SERVICE_F_OUTER_V6, ServiceValue};

use crate::{
    conntrack::Choice,
    csum, egress,
    maps::CONFIG,
    parse::{
        ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_IPV6,
        IPV4_HLEN, IPV6_HLEN, Packet, UDP_HLEN, VLAN_HLEN, ptr_at, read,
    },
};

pub const OUTER_TTL: u8 = 64;
/// GUE source ports come from the ephemeral range (RFC 8086 3.2.1 asks the same of
/// GRE-in-UDP): the flow hash fills the low 14 bits.
const GUE_SPORT_BASE: u16 = 0xc000;
const GUE_SPORT_MASK: u32 = 0x3fff;
/// An L2 header with one VLAN tag: the longest the parser accepts.
pub const L2_MAX: usize = ETH_HLEN + VLAN_HLEN;

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
pub fn check(ctx: &XdpContext, pkt: &Packet, svc: &ServiceValue) -> Result<(), Unfit> {
    // Neither fails once the packet is parsed (a one-element array, a header already read);
    // should one, `forward` aborts.
    let (Some(config), Some(inner)) = (CONFIG.get(0), inner(ctx, pkt)) else {
        return Ok(());
    };
    let header = if pkt.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    } as u32;
    // The outer length is taken from the inner header, so that header must describe bytes that
    // are really there (a shorter frame would make the outer header lie).
    let avail = (ctx.data_end() - ctx.data() - pkt.l3_off) as u32;
    if inner.len < header || inner.len > avail {
        return Err(Unfit::Malformed);
    }
    let overhead = Tunnel::of(svc, pkt).overhead();
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
    let tunnel = Tunnel::of(svc, pkt);
    let gue_sport = if tunnel.gue_dport != 0 {
        (GUE_SPORT_BASE | (choice.outer_hash & GUE_SPORT_MASK) as u16).to_be()
    } else {
        0
    };
    let src = flow_source(svc, choice.outer_hash);
    let outer = Outer {
        src: &src,
        dst: &backend.addr,
        // The flow label spreads flows over the receiver's queues and ECMP paths, which see
        // only the outer addresses otherwise. Fragments hash without ports (later ones have
        // none), so every fragment of a datagram takes the same path.
        label: choice.outer_hash & 0xf_ffff,
        dst_mac: &backend.mac,
        src_mac: &backend.src_mac,
    };
    let verdict = wrap_in(ctx, pkt, &inner, &outer, &tunnel, gue_sport);
    if verdict != xdp_action::XDP_TX {
        return verdict;
    }
    egress::send(ctx, backend)
}

/// How a service's packets are wrapped.
pub struct Tunnel {
    /// The outer header is IPv6.
    pub outer_v6: bool,
    /// GUE's UDP destination port (network order); 0: bare IP-in-IP.
    pub gue_dport: u16,
}

impl Tunnel {
    #[inline(always)]
    pub fn of(svc: &ServiceValue, pkt: &Packet) -> Self {
        Tunnel {
            // An IPv6 service always has IPv6 reals: the control plane refuses 6in4.
            outer_v6: svc.flags & SERVICE_F_OUTER_V6 != 0 || pkt.family != FAMILY_V4,
            gue_dport: if svc.flags & SERVICE_F_GUE != 0 {
                svc.gue_port
            } else {
                0
            },
        }
    }

    /// IP-in-IP of the packet's own family (what refusals come back in).
    #[inline(always)]
    pub fn same_family(pkt: &Packet) -> Self {
        Tunnel {
            outer_v6: pkt.family != FAMILY_V4,
            gue_dport: 0,
        }
    }

    /// Bytes the outer headers add.
    #[inline(always)]
    pub fn overhead(&self) -> u32 {
        let ip = if self.outer_v6 { IPV6_HLEN } else { IPV4_HLEN };
        let udp = if self.gue_dport != 0 { UDP_HLEN } else { 0 };
        (ip + udp) as u32
    }
}

/// The outer source of a flow: the service's tunnel source, with its low
/// `tunnel_src_host_bits` bits (`--tunnel-src-prefix`) taken from the flow hash.
#[inline(always)]
fn flow_source(svc: &ServiceValue, flow_hash: u32) -> [u8; 16] {
    let mut src = svc.tunnel_src;
    let bits = svc.tunnel_src_host_bits as u32;
    if bits == 0 || bits > 16 {
        return src;
    }
    let mask = (1u32 << bits) - 1;
    // The last two bytes of the address of the outer family (an IPv6 service has the flag).
    let at = if svc.flags & SERVICE_F_OUTER_V6 != 0 {
        14
    } else {
        2
    };
    let low = u16::from_be_bytes([src[at], src[at + 1]]) as u32;
    let host = ((low & !mask) | (flow_hash & mask)) as u16;
    src[at..at + 2].copy_from_slice(&host.to_be_bytes());
    src
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
    wrap_in(ctx, pkt, inner, outer, &Tunnel::same_family(pkt), 0)
}

/// Wraps the packet as `tunnel` says: IPv4 or IPv6 outer header, bare or GUE (UDP from
/// `gue_sport`, network order).
///
/// The headers are written straight into the frame once it has grown: none is built on the
/// stack first, because the balancer's flow path, everything inlined, has little of its 512
/// bytes of stack to spare.
#[inline(always)]
fn wrap_in(
    ctx: &XdpContext,
    pkt: &Packet,
    inner: &Inner,
    outer: &Outer,
    tunnel: &Tunnel,
    gue_sport: u16,
) -> u32 {
    let l2 = pkt.l3_off;
    let gue = tunnel.gue_dport != 0;
    // GUE over IPv6 needs the inner packet's sum, taken while the inner header is where the
    // parser found it.
    let inner_sum = if gue && tunnel.outer_v6 {
        inner_sum(ctx, l2, inner)
    } else {
        None
    };
    let overhead = tunnel.overhead();
    // SAFETY: the context is the program's own; a failure leaves the frame unchanged.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        // No headroom: a driver problem, visible through the xdp_exception tracepoint.
        return xdp_action::XDP_ABORTED;
    }
    let ether_type = if tunnel.outer_v6 {
        ETH_P_IPV6
    } else {
        ETH_P_IPV4
    };
    // adjust_head voids every packet pointer: all are derived afresh from the context. The old
    // L2 header now lies `overhead` bytes in, where the outer header goes: it moves first.
    if move_l2(ctx, l2, overhead as usize, ether_type, outer).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    let next = if gue {
        PROTO_UDP
    } else if pkt.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let written = if tunnel.outer_v6 {
        write_ipv6(ctx, l2, inner, outer, overhead, next)
    } else {
        write_ipv4(ctx, l2, inner, outer, overhead, next)
    };
    if written.is_none() {
        return xdp_action::XDP_ABORTED;
    }
    if !gue {
        return xdp_action::XDP_TX;
    }
    let ip_len = if tunnel.outer_v6 {
        IPV6_HLEN
    } else {
        IPV4_HLEN
    };
    let udp_len = ((inner.len + UDP_HLEN as u32) as u16).to_be_bytes();
    let Some(udp) = ptr_at::<[u8; UDP_HLEN]>(ctx, l2 + ip_len) else {
        return xdp_action::XDP_ABORTED;
    };
    let s = gue_sport.to_ne_bytes();
    let d = tunnel.gue_dport.to_ne_bytes();
    // GUE over IPv4 carries a zero UDP checksum, as Linux's FOU and Katran send it (RFC
    // 8086 3.2.2 allows it for tunnels): the inner packet has its own checksums. Over IPv6 it
    // stays zero where the inner sum cannot be known cheaply (see inner_sum).
    // SAFETY: ptr_at checked the 8 bytes.
    unsafe {
        *udp = [s[0], s[1], d[0], d[1], udp_len[0], udp_len[1], 0, 0];
    }
    let Some(inner_sum) = inner_sum else {
        return xdp_action::XDP_TX;
    };
    // GUE over IPv6: the pseudo-header (addresses, UDP length, next header 17), the UDP header
    // and the inner packet's sum; addresses and UDP header are read back from the frame.
    let Some(summed) = ptr_at::<[u8; 32 + UDP_HLEN]>(ctx, l2 + 8) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: ptr_at checked the 40 bytes.
    let summed = unsafe { &mut *summed };
    let sum = csum::add(inner_sum, summed)
        + u16::from_ne_bytes(udp_len) as u64
        + (PROTO_UDP as u16).to_be() as u64;
    let c = csum::finish(sum);
    // A sum of zero is sent as all ones: zero means "no checksum" (RFC 768).
    let c = if c == [0, 0] { [0xff, 0xff] } else { c };
    // The checksum: the UDP header's last two bytes.
    summed[32 + 6] = c[0];
    summed[32 + 7] = c[1];
    xdp_action::XDP_TX
}

/// Moves the L2 header, which the frame's growth by `overhead` bytes left `overhead` bytes in,
/// to the front, with the outer MACs and `ether_type` (a VLAN tag stays).
#[inline(always)]
fn move_l2(
    ctx: &XdpContext,
    l2: usize,
    overhead: usize,
    ether_type: u16,
    outer: &Outer,
) -> Option<()> {
    let t = ether_type.to_be_bytes();
    // SAFETY: ptr_at checked every range written or read below.
    unsafe {
        let macs = &mut *ptr_at::<[u8; 12]>(ctx, 0)?;
        macs[..6].copy_from_slice(outer.dst_mac);
        macs[6..].copy_from_slice(outer.src_mac);
        if l2 == L2_MAX {
            let tag = ptr_at::<[u8; VLAN_HLEN]>(ctx, overhead + ETH_HLEN - 2)?.read_unaligned();
            let at = ptr_at::<[u8; VLAN_HLEN + 2]>(ctx, ETH_HLEN - 2)?;
            *at = [tag[0], tag[1], tag[2], tag[3], t[0], t[1]];
        } else {
            *ptr_at::<[u8; 2]>(ctx, ETH_HLEN - 2)? = t;
        }
    }
    Some(())
}

/// Writes an outer IPv4 header at `l2`, `overhead` bytes longer than the inner packet.
#[inline(always)]
fn write_ipv4(
    ctx: &XdpContext,
    l2: usize,
    inner: &Inner,
    outer: &Outer,
    overhead: u32,
    next: u8,
) -> Option<()> {
    // SAFETY: ptr_at checks the 20 bytes.
    let h = unsafe { &mut *ptr_at::<[u8; IPV4_HLEN]>(ctx, l2)? };
    let total = ((inner.len + overhead) as u16).to_be_bytes();
    // Identification 0 with DF set: an atomic datagram's id means nothing (RFC 6864).
    h[..12].copy_from_slice(&[
        0x45, inner.tos, total[0], total[1], 0, 0, 0x40, 0, OUTER_TTL, next, 0, 0,
    ]);
    h[12..16].copy_from_slice(&outer.src[..4]);
    h[16..20].copy_from_slice(&outer.dst[..4]);
    let check = csum::finish(csum::add(0, h));
    h[10] = check[0];
    h[11] = check[1];
    Some(())
}

/// Writes an outer IPv6 header at `l2`, `overhead` bytes longer than the inner packet.
#[inline(always)]
fn write_ipv6(
    ctx: &XdpContext,
    l2: usize,
    inner: &Inner,
    outer: &Outer,
    overhead: u32,
    next: u8,
) -> Option<()> {
    // SAFETY: ptr_at checks the 40 bytes.
    let h = unsafe { &mut *ptr_at::<[u8; IPV6_HLEN]>(ctx, l2)? };
    let label = outer.label;
    let payload = ((inner.len + overhead - IPV6_HLEN as u32) as u16).to_be_bytes();
    h[..8].copy_from_slice(&[
        0x60 | inner.tos >> 4,
        inner.tos << 4 | (label >> 16) as u8,
        (label >> 8) as u8,
        label as u8,
        payload[0],
        payload[1],
        next,
        OUTER_TTL,
    ]);
    h[8..24].copy_from_slice(outer.src);
    h[24..40].copy_from_slice(outer.dst);
    Some(())
}

/// The one's complement sum of the inner packet's `inner.len` bytes, from its headers alone
/// (Linux's "local checksum offload"): a segment whose own checksum is right sums to the
/// negated sum of its pseudo-header, and an IPv4 header whose checksum is right sums to zero.
/// So GUE over IPv6 gets a real UDP checksum (RFC 8200 8.1) at a constant cost. None where
/// that does not hold or cannot be known cheaply (fragments, IPv6 extension headers, UDP over
/// IPv4 without a checksum, other protocols): the UDP checksum is then zero, which RFC 6935
/// allows for tunnels and which Linux's FOU and xlb's decapsulator accept.
#[inline(always)]
fn inner_sum(ctx: &XdpContext, l3: usize, inner: &Inner) -> Option<u64> {
    let h = read::<[u8; 10]>(ctx, l3)?;
    let v4 = h[0] >> 4 == 4;
    let (proto, l4) = if v4 {
        // More fragments, or an offset: not a whole segment.
        if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return None;
        }
        (h[9], ((h[0] & 0x0f) as usize) * 4)
    } else {
        (h[6], IPV6_HLEN)
    };
    let seg_len = inner.len.checked_sub(l4 as u32)?;
    match proto {
        PROTO_TCP => {}
        IPPROTO_ICMPV6 if !v4 => {}
        PROTO_UDP => {
            if read::<[u8; 2]>(ctx, l3 + l4 + 6)? == [0, 0] {
                return None;
            }
        }
        // ICMP (IPv4) sums the message alone, and a right IPv4 header sums to zero.
        IPPROTO_ICMP if v4 => return Some(0),
        _ => return None,
    }
    // The pseudo-header's length and protocol, which sum the same as IPv4's 16-bit length and
    // IPv6's 32-bit one.
    let len_proto = (seg_len as u16).to_be() as u64 + (proto as u16).to_be() as u64;
    if v4 {
        // The header sums to zero; the pseudo-header's addresses are the header's.
        let pseudo = csum::add(0, &read::<[u8; 8]>(ctx, l3 + 12)?) + len_proto;
        Some(u16::from_ne_bytes(csum::finish(pseudo)) as u64)
    } else {
        // The addresses are summed in the header and negated in the segment's pseudo-header:
        // they cancel, leaving the header's first 8 bytes and the negated length and protocol.
        Some(csum::add_words(0, &h, 0, 8) + u16::from_ne_bytes(csum::finish(len_proto)) as u64)
    }
}

/// Writes the EtherType of an L2 header of length `l2` (14, or 18 with a tag).
#[inline(always)]
pub fn set_ether_type(eth: &mut [u8; L2_MAX], l2: usize, ether_type: u16) {
    let t = ether_type.to_be_bytes();
    if l2 == L2_MAX {
        eth[16] = t[0];
        eth[17] = t[1];
    } else {
        eth[12] = t[0];
        eth[13] = t[1];
    }
}
