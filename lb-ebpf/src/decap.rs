//! The real server's decapsulator (`xlb_realserver`): tunnelled packets (IPIP, IP6IP6, 4in6, and
//! GUE over IPv4 or IPv6 on `DECAP_CONFIG`'s port) whose inner destination is one of this
//! server's VIPs lose their outer headers and go to the stack as if they had arrived
//! unencapsulated. A GUE packet's UDP checksum is not verified: the inner packet's own
//! checksums are, by the stack, as Linux's FOU leaves them. Kernels without tunnel modules (and hosts where loading
//! them is not wanted) can then serve a TUN director, as Katran's and GLB's decappers do.
//!
//! It also refuses (refuse.rs): a SYN or UDP datagram for a VIP port with no socket goes back
//! to the director instead of being answered with RST / port unreachable, in DR mode (plain
//! frames) and in TUN mode (tunnel packets).
//!
//! Everything else passes untouched, tunnel packets for other destinations included: the
//! program drops nothing, so attaching it to a server's interface cannot cut it off.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Decap, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VIP_F_REFUSE, VipKey};

use crate::{
    counters, csum,
    forward_tun::{L2_MAX, set_ether_type},
    maps::{DECAP_CONFIG, DECAP_VIPS},
    parse::{
        self, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN,
        TCP_FLAG_ACK, TCP_FLAG_SYN, UDP_HLEN, ptr_at, read,
    },
    refuse,
};

const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;

/// A tunnel packet found in a frame.
struct Tunnel {
    /// Length of the outer headers (IP, and UDP for GUE): what is stripped.
    outer_len: usize,
    /// The outer IP header's family.
    outer_family: u8,
    /// GUE: the outer IP header's length (the UDP header follows it); 0 for bare IP-in-IP.
    gue_ip_len: usize,
    /// The outer header's ECN bits.
    outer_ecn: u8,
    key: VipKey,
}

#[inline(always)]
pub fn decap(ctx: &XdpContext) -> u32 {
    let Some((ether_type, l3)) = parse::ethernet(ctx) else {
        return xdp_action::XDP_PASS;
    };
    if tcp_but_not_syn(ctx, ether_type, l3) {
        return xdp_action::XDP_PASS;
    }
    let tunnel = match ether_type {
        ETH_P_IPV4 => outer_v4(ctx, l3),
        ETH_P_IPV6 => outer_v6(ctx, l3),
        _ => Err(None),
    };
    let tunnel = match tunnel {
        Ok(t) => t,
        // Not a tunnel packet: a DR real's traffic, refused here when its port has no socket.
        Err(None) => return refuse::plain(ctx, ether_type, l3),
        Err(Some(which)) => {
            counters::decap(which);
            return xdp_action::XDP_PASS;
        }
    };
    let Some(vip) = DECAP_VIPS.get_ptr(tunnel.key) else {
        counters::decap(Decap::Refused);
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a hash map value, only read.
    let inner_ether_type = ether_type_of(tunnel.key.family);
    if unsafe { (*vip).flags } & VIP_F_REFUSE != 0
        && let Some(inner) = parse::parse_at(ctx, inner_ether_type, l3 + tunnel.outer_len)
        && refuse::no_socket(ctx, &inner)
    {
        // A GUE refusal goes back as bare IP-in-IP: the director looks for refusals only among
        // frames that are not TCP or UDP, so its flow path pays nothing for them.
        if tunnel.gue_ip_len != 0 && drop_udp(ctx, l3, tunnel.gue_ip_len, &tunnel).is_none() {
            return xdp_action::XDP_PASS;
        }
        return refuse::bounce(ctx, l3, tunnel.outer_family);
    }
    if tunnel.outer_ecn == ECN_CE {
        propagate_ce(ctx, l3 + tunnel.outer_len, tunnel.key.family);
    }
    if strip(ctx, l3, tunnel.outer_len, inner_ether_type).is_none() {
        // Cannot happen (both headers were read above), but the frame may be half rewritten.
        return xdp_action::XDP_ABORTED;
    }
    counters::decap(Decap::Decapsulated);
    xdp_action::XDP_PASS
}

/// A TCP segment other than a SYN: neither a tunnel packet nor anything to refuse. This is
/// the bulk of a real's traffic (established connections, VIP or not), so it leaves after two
/// small reads, before the full parse. A later fragment's "flags" are payload bytes: if they
/// look like a SYN, the full path passes the fragment all the same.
#[inline(always)]
fn tcp_but_not_syn(ctx: &XdpContext, ether_type: u16, l3: usize) -> bool {
    let l4 = match ether_type {
        ETH_P_IPV4 => match read::<[u8; IPV4_HLEN]>(ctx, l3) {
            Some(h) if h[0] >> 4 == 4 && h[9] == PROTO_TCP => l3 + ((h[0] & 0x0f) as usize) * 4,
            _ => return false,
        },
        ETH_P_IPV6 => match read::<[u8; 8]>(ctx, l3) {
            Some(h) if h[0] >> 4 == 6 && h[6] == PROTO_TCP => l3 + IPV6_HLEN,
            _ => return false,
        },
        _ => return false,
    };
    match read::<u8>(ctx, l4 + 13) {
        Some(flags) => flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN,
        None => false,
    }
}

pub fn ether_type_of(family: u8) -> u16 {
    if family == FAMILY_V4 {
        ETH_P_IPV4
    } else {
        ETH_P_IPV6
    }
}

/// The GUE port the decapsulator unwraps (network order), 0 when none.
#[inline(always)]
fn gue_port() -> u16 {
    DECAP_CONFIG.get(0).map_or(0, |c| c.gue_port)
}

/// An outer IPv4 header carrying IPv4 (IPIP) or GUE (`Err(None)`: not a tunnel packet, not
/// counted).
#[inline(always)]
fn outer_v4(ctx: &XdpContext, l3: usize) -> Result<Tunnel, Option<Decap>> {
    let outer = read::<[u8; IPV4_HLEN]>(ctx, l3).ok_or(None)?;
    let ihl = ((outer[0] & 0x0f) as usize) * 4;
    if outer[0] >> 4 != 4 || ihl < IPV4_HLEN {
        return Err(None);
    }
    let gue = outer[9] == PROTO_UDP && is_gue(ctx, l3 + ihl);
    if outer[9] != IPPROTO_IPIP && !gue {
        return Err(None);
    }
    // More fragments, or an offset: only part of the inner packet is here.
    if u16::from_be_bytes([outer[6], outer[7]]) & 0x3fff != 0 {
        return Err(Some(Decap::Fragment));
    }
    let (outer_len, gue_ip_len) = if gue { (ihl + UDP_HLEN, ihl) } else { (ihl, 0) };
    let inner_v4 = !gue || inner_version(ctx, l3 + outer_len)? == 4;
    inner(ctx, l3 + outer_len, inner_v4).map(|key| Tunnel {
        outer_len,
        outer_family: FAMILY_V4,
        gue_ip_len,
        outer_ecn: outer[1] & ECN_MASK,
        key,
    })
}

/// An outer IPv6 header (no extension headers: the director adds none) whose next header is
/// IPv6 (IP6IP6), IPv4 (4in6) or GUE.
#[inline(always)]
fn outer_v6(ctx: &XdpContext, l3: usize) -> Result<Tunnel, Option<Decap>> {
    let outer = read::<[u8; IPV6_HLEN]>(ctx, l3).ok_or(None)?;
    if outer[0] >> 4 != 6 {
        return Err(None);
    }
    let (outer_len, gue_ip_len, inner_v4) = match outer[6] {
        IPPROTO_IPV6 => (IPV6_HLEN, 0, false),
        IPPROTO_IPIP => (IPV6_HLEN, 0, true),
        PROTO_UDP if is_gue(ctx, l3 + IPV6_HLEN) => {
            let at = IPV6_HLEN + UDP_HLEN;
            (at, IPV6_HLEN, inner_version(ctx, l3 + at)? == 4)
        }
        _ => return Err(None),
    };
    inner(ctx, l3 + outer_len, inner_v4).map(|key| Tunnel {
        outer_len,
        outer_family: FAMILY_V6,
        gue_ip_len,
        outer_ecn: (outer[1] >> 4) & ECN_MASK,
        key,
    })
}

/// Whether the UDP header at `udp` is addressed to the GUE port.
#[inline(always)]
fn is_gue(ctx: &XdpContext, udp: usize) -> bool {
    let port = gue_port();
    port != 0 && read::<[u16; 2]>(ctx, udp).is_some_and(|p| p[1] == port)
}

/// The IP version of a GUE payload: GUE variant 1 ("direct IP encapsulation") carries the IP
/// packet right after the UDP header, its version nibble standing for GUE's (0100 or 0110).
/// Variant 0 (a GUE header) is not sent by the director: counted as malformed.
#[inline(always)]
fn inner_version(ctx: &XdpContext, at: usize) -> Result<u8, Option<Decap>> {
    // Four bytes, not one: a one-byte bound check compiles to a form the verifier rejects, and
    // any inner header is longer anyway.
    let v = read::<[u8; 4]>(ctx, at).ok_or(Some(Decap::Malformed))?[0] >> 4;
    if v == 4 || v == 6 {
        Ok(v)
    } else {
        Err(Some(Decap::Malformed))
    }
}

/// The inner header's VIP key (IPv4 or IPv6 as told).
#[inline(always)]
fn inner(ctx: &XdpContext, at: usize, v4: bool) -> Result<VipKey, Option<Decap>> {
    let mut key = VipKey {
        addr: [0; 16],
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    if v4 {
        let inner = read::<[u8; IPV4_HLEN]>(ctx, at).ok_or(Some(Decap::Malformed))?;
        if inner[0] >> 4 != 4 {
            return Err(Some(Decap::Malformed));
        }
        key.addr[..4].copy_from_slice(&inner[16..20]);
    } else {
        let inner = read::<[u8; IPV6_HLEN]>(ctx, at).ok_or(Some(Decap::Malformed))?;
        if inner[0] >> 4 != 6 {
            return Err(Some(Decap::Malformed));
        }
        key.addr.copy_from_slice(&inner[24..40]);
        key.family = FAMILY_V6;
    }
    Ok(key)
}

/// Turns a GUE packet into bare IP-in-IP: the UDP header after the outer IP header (of
/// `ip_len` bytes, 20 or 40) goes, the outer header's protocol and length follow.
#[inline(always)]
fn drop_udp(ctx: &XdpContext, l3: usize, ip_len: usize, t: &Tunnel) -> Option<()> {
    let proto = if t.key.family == FAMILY_V4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let eth = read::<[u8; L2_MAX]>(ctx, 0)?;
    if t.outer_family == FAMILY_V4 {
        // Options are not moved: the director sends none.
        if ip_len != IPV4_HLEN {
            return None;
        }
        let mut h = read::<[u8; IPV4_HLEN]>(ctx, l3)?;
        let len = u16::from_be_bytes([h[2], h[3]]).checked_sub(UDP_HLEN as u16)?;
        h[2..4].copy_from_slice(&len.to_be_bytes());
        h[9] = proto;
        h[10] = 0;
        h[11] = 0;
        let check = csum::finish(csum::add(0, &h));
        h[10..12].copy_from_slice(&check);
        move_forward(ctx, l3, &eth, &h)
    } else {
        let mut h = read::<[u8; IPV6_HLEN]>(ctx, l3)?;
        let len = u16::from_be_bytes([h[4], h[5]]).checked_sub(UDP_HLEN as u16)?;
        h[4..6].copy_from_slice(&len.to_be_bytes());
        h[6] = proto;
        move_forward(ctx, l3, &eth, &h)
    }
}

/// Writes the L2 header and the outer IP header `h` UDP_HLEN bytes further on, over the UDP
/// header, and drops the bytes before them.
#[inline(always)]
fn move_forward<const N: usize>(
    ctx: &XdpContext,
    l3: usize,
    eth: &[u8; L2_MAX],
    h: &[u8; N],
) -> Option<()> {
    let ip_at = ptr_at::<[u8; N]>(ctx, l3 + UDP_HLEN)?;
    // SAFETY: ptr_at checked the range (the L2 header, written next, ends before it).
    unsafe { ip_at.write_unaligned(*h) };
    write_l2(ctx, l3, eth, UDP_HLEN)?;
    // SAFETY: the context is the program's own; the frame is longer than UDP_HLEN.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, UDP_HLEN as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Writes exactly the L2 header (`l3` bytes: 14, or 18 with a tag) at offset `at`.
#[inline(always)]
fn write_l2(ctx: &XdpContext, l3: usize, eth: &[u8; L2_MAX], at: usize) -> Option<()> {
    // Exactly the L2 header's length is written: a byte more would land on the next header.
    if l3 == L2_MAX {
        let p = ptr_at::<[u8; L2_MAX]>(ctx, at)?;
        // SAFETY: ptr_at checked the range.
        unsafe { p.write_unaligned(*eth) };
    } else {
        let p = ptr_at::<[u8; L2_MAX - 4]>(ctx, at)?;
        let mut short = [0u8; L2_MAX - 4];
        short.copy_from_slice(&eth[..L2_MAX - 4]);
        // SAFETY: ptr_at checked the range.
        unsafe { p.write_unaligned(short) };
    }
    Some(())
}

/// RFC 6040 (normal mode): congestion marked on the outer header reaches the inner one when
/// the inner packet is ECN-capable, or the marks that routers set on the tunnel would be lost.
/// A not-ECN-capable inner packet is left as it is, and so is one already marked: rewriting
/// it would turn an IPv4 checksum of 0xffff into 0x0000 for nothing (found by the fuzzer).
#[inline(always)]
fn propagate_ce(ctx: &XdpContext, inner: usize, family: u8) {
    if family == FAMILY_V4 {
        let Some(h) = ptr_at::<[u8; 12]>(ctx, inner) else {
            return;
        };
        // SAFETY: ptr_at checked the 12 bytes (through the checksum field).
        let mut b = unsafe { h.read_unaligned() };
        if b[1] & ECN_MASK == 0 || b[1] & ECN_MASK == ECN_CE {
            return;
        }
        let old = [b[0], b[1]];
        b[1] |= ECN_CE;
        let check = csum::replace([b[10], b[11]], old, [b[0], b[1]]);
        b[10..12].copy_from_slice(&check);
        // SAFETY: as above.
        unsafe { h.write_unaligned(b) };
    } else {
        let Some(h) = ptr_at::<[u8; 2]>(ctx, inner) else {
            return;
        };
        // SAFETY: ptr_at checked the 2 bytes; the traffic class's ECN bits are bits 4-5 of the
        // second byte.
        let mut b = unsafe { h.read_unaligned() };
        if (b[1] >> 4) & ECN_MASK == 0 || (b[1] >> 4) & ECN_MASK == ECN_CE {
            return;
        }
        b[1] |= ECN_CE << 4;
        unsafe { h.write_unaligned(b) };
    }
}

/// Moves the L2 header forward over the outer headers, with the inner packet's EtherType (a
/// 4in6 packet turns back into IPv4), then drops the bytes before it.
#[inline(always)]
pub fn strip(ctx: &XdpContext, l3: usize, outer_len: usize, inner_ether_type: u16) -> Option<()> {
    let mut eth = read::<[u8; L2_MAX]>(ctx, 0)?;
    set_ether_type(&mut eth, l3, inner_ether_type);
    write_l2(ctx, l3, &eth, outer_len)?;
    // SAFETY: the context is the program's own; the frame is longer than outer_len.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return None;
    }
    Some(())
}
