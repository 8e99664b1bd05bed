//! "Too big" for TUN: a packet that would exceed the egress MTU once encapsulated is answered,
//! from the VIP, with ICMP "fragmentation needed" (IPv4, DF set) or ICMPv6 "packet too big", so
//! the client's path MTU discovery shrinks its packets by the tunnel overhead. The reply is
//! built in place: the frame is cut to the quote, grown at the front by the new IP and ICMP
//! headers, and sent back out to the MAC it came from.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Global, Iface};

use crate::{
    counters, csum,
    drop::{self, DropReason},
    forward_tun::TooBig,
    parse::{
        ETH_HLEN, Fragment, ICMP_DEST_UNREACH, ICMP_HLEN, ICMPV6_PKT_TOOBIG, IPPROTO_ICMP,
        IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN, Packet, VLAN_HLEN, ptr_at, read,
    },
};

/// Bytes of the offending packet quoted, from its IP header on, in both families: one
/// `bpf_csum_diff` call sums it (512 is the helper's limit), it holds any IPv4 header with
/// options and any TCP header, and the reply stays within RFC 1812's 576 bytes (IPv4) and
/// RFC 4443's 1280 (IPv6). A fixed length keeps the checksum free of variable-length loops.
pub const QUOTE_LEN: usize = 512;

const ICMP_FRAG_NEEDED: u8 = 4;
const REPLY_TTL: u8 = 64;
/// IPv4 precedence "internetwork control", as Linux sends its ICMP errors.
const IPTOS_PREC_INTERNETCONTROL: u8 = 0xc0;
const L2_MAX: usize = ETH_HLEN + VLAN_HLEN;

/// Turns the frame into the "too big" reply for `pkt`, advertising `too_big.mtu`, sent back out
/// of `ingress` (the interface it came in on) by XDP_TX. Drops
/// it instead when it may not be answered: IPv4 without DF (the sender allowed fragmenting,
/// which is not the balancer's job), a packet `answerable` refuses, or one shorter than the
/// quote (only with an MTU below what userspace accepts).
#[inline(always)]
pub fn answer(ctx: &XdpContext, pkt: &Packet, too_big: &TooBig, ingress: &Iface) -> u32 {
    if pkt.family == FAMILY_V4 && !too_big.df {
        return drop::drop(ctx, DropReason::TooBig);
    }
    let Some(verdict) = reply(ctx, pkt, too_big.len, too_big.mtu, ingress) else {
        return drop::drop(ctx, DropReason::TooBig);
    };
    // An aborted reply (no room to rebuild the frame) is lost too, and counted as a drop as
    // ever; it is not logged: the frame is half rewritten.
    counters::global(if verdict == xdp_action::XDP_TX {
        Global::IcmpTooBigSent
    } else {
        Global::DropTooBig
    });
    verdict
}

#[inline(always)]
fn reply(ctx: &XdpContext, pkt: &Packet, len: u32, mtu: u32, ingress: &Iface) -> Option<u32> {
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
    eth[6..12].copy_from_slice(&ingress.mac);
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
