//! The real server's decapsulator (`xlb_realserver`): tunnelled packets (IPIP, IP6IP6) whose inner
//! destination is one of this server's VIPs lose their outer header and go to the stack as if
//! they had arrived unencapsulated. Kernels without tunnel modules (and hosts where loading
//! them is not wanted) can then serve a TUN director, as Katran's and GLB's decappers do.
//!
//! It also refuses (refuse.rs): a SYN or UDP datagram for a VIP port with no socket goes back
//! to the director instead of being answered with RST / port unreachable, in DR mode (plain
//! frames) and in TUN mode (tunnel packets).
//!
//! Everything else passes untouched, tunnel packets for other destinations included: the
//! program drops nothing, so attaching it to a server's interface cannot cut it off.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Decap, FAMILY_V4, FAMILY_V6, PROTO_TCP, VIP_F_REFUSE, VipKey};

use crate::{
    counters, csum,
    maps::DECAP_VIPS,
    parse::{
        self, ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN,
        TCP_FLAG_ACK, TCP_FLAG_SYN, VLAN_HLEN, ptr_at, read,
    },
    refuse,
};

const ECN_MASK: u8 = 0x03;
const ECN_CE: u8 = 0x03;

/// A tunnel packet found in a frame.
struct Tunnel {
    /// Length of the outer IP header: what is stripped.
    outer_len: usize,
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
        ETH_P_IPV4 => ipip(ctx, l3),
        ETH_P_IPV6 => ip6ip6(ctx, l3),
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
    if unsafe { (*vip).flags } & VIP_F_REFUSE != 0
        && let Some(inner) = parse::parse_at(ctx, ether_type, l3 + tunnel.outer_len)
        && refuse::no_socket(ctx, &inner)
    {
        return refuse::bounce(ctx, l3, tunnel.key.family);
    }
    if tunnel.outer_ecn == ECN_CE {
        propagate_ce(ctx, l3 + tunnel.outer_len, tunnel.key.family);
    }
    if strip(ctx, l3, tunnel.outer_len).is_none() {
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

/// An outer IPv4 header carrying IPv4 (`Err(None)`: not a tunnel packet, not counted).
#[inline(always)]
fn ipip(ctx: &XdpContext, l3: usize) -> Result<Tunnel, Option<Decap>> {
    let outer = read::<[u8; IPV4_HLEN]>(ctx, l3).ok_or(None)?;
    let ihl = ((outer[0] & 0x0f) as usize) * 4;
    if outer[0] >> 4 != 4 || ihl < IPV4_HLEN || outer[9] != IPPROTO_IPIP {
        return Err(None);
    }
    // More fragments, or an offset: only part of the inner packet is here.
    if u16::from_be_bytes([outer[6], outer[7]]) & 0x3fff != 0 {
        return Err(Some(Decap::Fragment));
    }
    let inner = read::<[u8; IPV4_HLEN]>(ctx, l3 + ihl).ok_or(Some(Decap::Malformed))?;
    if inner[0] >> 4 != 4 {
        return Err(Some(Decap::Malformed));
    }
    let mut key = VipKey {
        addr: [0; 16],
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    key.addr[..4].copy_from_slice(&inner[16..20]);
    Ok(Tunnel {
        outer_len: ihl,
        outer_ecn: outer[1] & ECN_MASK,
        key,
    })
}

/// An outer IPv6 header whose next header is IPv6 (no extension headers: the director adds
/// none).
#[inline(always)]
fn ip6ip6(ctx: &XdpContext, l3: usize) -> Result<Tunnel, Option<Decap>> {
    let outer = read::<[u8; IPV6_HLEN]>(ctx, l3).ok_or(None)?;
    if outer[0] >> 4 != 6 || outer[6] != IPPROTO_IPV6 {
        return Err(None);
    }
    let inner = read::<[u8; IPV6_HLEN]>(ctx, l3 + IPV6_HLEN).ok_or(Some(Decap::Malformed))?;
    if inner[0] >> 4 != 6 {
        return Err(Some(Decap::Malformed));
    }
    let mut key = VipKey {
        addr: [0; 16],
        family: FAMILY_V6,
        _pad: [0; 3],
    };
    key.addr.copy_from_slice(&inner[24..40]);
    Ok(Tunnel {
        outer_len: IPV6_HLEN,
        outer_ecn: (outer[1] >> 4) & ECN_MASK,
        key,
    })
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

/// Moves the L2 header forward over the outer IP header, then drops the bytes before it.
#[inline(always)]
pub fn strip(ctx: &XdpContext, l3: usize, outer_len: usize) -> Option<()> {
    let eth = read::<[u8; ETH_HLEN + VLAN_HLEN]>(ctx, 0)?;
    // Exactly the L2 header's length is written: a byte more would land on the inner header.
    if l3 == ETH_HLEN + VLAN_HLEN {
        let at = ptr_at::<[u8; ETH_HLEN + VLAN_HLEN]>(ctx, outer_len)?;
        // SAFETY: ptr_at checked the range.
        unsafe { at.write_unaligned(eth) };
    } else {
        let at = ptr_at::<[u8; ETH_HLEN]>(ctx, outer_len)?;
        let mut short = [0u8; ETH_HLEN];
        short.copy_from_slice(&eth[..ETH_HLEN]);
        // SAFETY: ptr_at checked the range.
        unsafe { at.write_unaligned(short) };
    }
    // SAFETY: the context is the program's own; the frame is longer than outer_len.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return None;
    }
    Some(())
}
