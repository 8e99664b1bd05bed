//! The real server's refusal: a TCP SYN (or a UDP datagram) for a VIP port that has no socket
//! here goes back to the director, which schedules it to another real, instead of being
//! answered with RST (or port unreachable) by the kernel. A real whose server died thus costs
//! its clients no failed connection.
//!
//! - DR: the packet is wrapped in IPIP / IP6IP6 from the real's own address to the VIP and sent
//!   back to the frame's source MAC (the director's). The director accepts it only from the
//!   MAC of the real its flow is tracked to.
//! - TUN: the tunnel packet goes back as it came, outer addresses and MACs swapped, so it
//!   arrives from the real's address, which is what the director checks.
//!
//! Only SYNs (SYN set, ACK clear) and UDP datagrams are looked at, and only after the cheap
//! tests; established TCP pays one flag test.

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple, xdp_action},
    helpers::{bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::XdpContext,
};
use lb_common::{Decap, FAMILY_V4, PROTO_TCP, PROTO_UDP, VIP_F_DR, VIP_F_REFUSE, VipKey, VipValue};

use crate::{
    counters, csum,
    forward_tun::{self, OUTER_TTL, Outer},
    parse::{Fragment, IPV4_HLEN, IPV6_HLEN, Packet, ptr_at, read},
};

/// Whether this packet is one the real should refuse: a whole TCP SYN or UDP datagram (the
/// caller checked that its VIP refuses) for which this network namespace has no socket.
#[inline(always)]
pub fn no_socket(ctx: &XdpContext, pkt: &Packet) -> bool {
    if pkt.fragment != Fragment::None {
        return false;
    }
    let tcp = pkt.proto == PROTO_TCP;
    if !(tcp && pkt.is_tcp_syn()) && pkt.proto != PROTO_UDP {
        return false;
    }
    // SAFETY: a plain C union of integers; zero is a valid value.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let netns = BPF_F_CURRENT_NETNS as i64 as u64;
    let c = ctx.ctx as *mut _;
    // SAFETY: the tuple lives on this stack frame and its size is the union member written;
    // every socket the helpers return is released below.
    let sk = unsafe {
        if pkt.family == FAMILY_V4 {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.saddr = u32::from_ne_bytes([pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]]);
            t.daddr = u32::from_ne_bytes([pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]]);
            t.sport = pkt.sport;
            t.dport = pkt.dport;
            let size = core::mem::size_of_val(t) as u32;
            if tcp {
                bpf_skc_lookup_tcp(c, &mut tuple, size, netns, 0)
            } else {
                bpf_sk_lookup_udp(c, &mut tuple, size, netns, 0)
            }
        } else {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.saddr = (pkt.src.as_ptr() as *const [u32; 4]).read_unaligned();
            t.daddr = (pkt.dst.as_ptr() as *const [u32; 4]).read_unaligned();
            t.sport = pkt.sport;
            t.dport = pkt.dport;
            let size = core::mem::size_of_val(t) as u32;
            if tcp {
                bpf_skc_lookup_tcp(c, &mut tuple, size, netns, 0)
            } else {
                bpf_sk_lookup_udp(c, &mut tuple, size, netns, 0)
            }
        }
    };
    if sk.is_null() {
        return true;
    }
    // SAFETY: a socket the lookup returned, released once.
    unsafe { bpf_sk_release(sk as *mut _) };
    false
}

/// The VIP's settings, if `pkt` is for a VIP of this real.
#[inline(always)]
pub fn vip(pkt: &Packet) -> Option<&'static VipValue> {
    let key = VipKey {
        addr: pkt.dst,
        family: pkt.family,
        _pad: [0; 3],
    };
    // SAFETY: a hash map value, only read.
    crate::maps::DECAP_VIPS.get_ptr(key).map(|v| unsafe { &*v })
}

/// A plain (not tunnelled) frame: a DR real's. Refused when it is a SYN or datagram for a DR
/// VIP that refuses and no socket takes it; everything else passes untouched.
#[inline(always)]
pub fn plain(ctx: &XdpContext, ether_type: u16, l3: usize) -> u32 {
    let Some(pkt) = crate::parse::parse_at(ctx, ether_type, l3) else {
        return xdp_action::XDP_PASS;
    };
    // Cheap tests first: established TCP stops here.
    if pkt.proto == PROTO_TCP && !pkt.is_tcp_syn() {
        return xdp_action::XDP_PASS;
    }
    let Some(vip) = vip(&pkt) else {
        return xdp_action::XDP_PASS;
    };
    if vip.flags & (VIP_F_REFUSE | VIP_F_DR) != VIP_F_REFUSE | VIP_F_DR || !no_socket(ctx, &pkt) {
        return xdp_action::XDP_PASS;
    }
    let verdict = wrap(ctx, &pkt, vip);
    if verdict == xdp_action::XDP_TX {
        counters::decap(Decap::Refusal);
    }
    verdict
}

/// DR refusal: IPIP / IP6IP6 from the real's address to the VIP, back to the source MAC.
#[inline(always)]
fn wrap(ctx: &XdpContext, pkt: &Packet, vip: &VipValue) -> u32 {
    let Some(inner) = forward_tun::inner(ctx, pkt) else {
        return xdp_action::XDP_PASS;
    };
    let avail = (ctx.data_end() - ctx.data() - pkt.l3_off) as u32;
    let min = if pkt.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    } as u32;
    // The outer length comes from the inner header: it must describe bytes that are here.
    if inner.len < min || inner.len > avail || inner.len + min > 0xffff {
        return xdp_action::XDP_PASS;
    }
    let Some(macs) = read::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    let mut dst_mac = [0u8; 6];
    let mut src_mac = [0u8; 6];
    dst_mac.copy_from_slice(&macs[6..12]);
    src_mac.copy_from_slice(&macs[..6]);
    let outer = Outer {
        src: &vip.real_addr,
        dst: &pkt.dst,
        label: 0,
        dst_mac: &dst_mac,
        src_mac: &src_mac,
    };
    forward_tun::wrap(ctx, pkt, &inner, &outer)
}

/// TUN refusal: the tunnel packet goes back whole, outer addresses and MACs swapped and the
/// TTL / hop limit renewed. `outer_len` is the outer IPv4 header's length (IPv6: 40).
#[inline(always)]
pub fn bounce(ctx: &XdpContext, l3: usize, family: u8) -> u32 {
    let Some(macs) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_PASS;
    };
    if family == FAMILY_V4 {
        let Some(h) = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: ptr_at checked the range.
        let mut b = unsafe { h.read_unaligned() };
        let old = [b[8], b[9]];
        b[8] = OUTER_TTL;
        let check = csum::replace([b[10], b[11]], old, [b[8], b[9]]);
        b[10..12].copy_from_slice(&check);
        // Swapping the addresses leaves the checksum as it is (a sum commutes).
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[12..20]);
        b[12..16].copy_from_slice(&a[4..8]);
        b[16..20].copy_from_slice(&a[..4]);
        // SAFETY: as above.
        unsafe { h.write_unaligned(b) };
    } else {
        let Some(h) = ptr_at::<[u8; IPV6_HLEN]>(ctx, l3) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: ptr_at checked the range.
        let mut b = unsafe { h.read_unaligned() };
        b[7] = OUTER_TTL;
        let mut a = [0u8; 32];
        a.copy_from_slice(&b[8..40]);
        b[8..24].copy_from_slice(&a[16..32]);
        b[24..40].copy_from_slice(&a[..16]);
        // SAFETY: as above.
        unsafe { h.write_unaligned(b) };
    }
    // SAFETY: ptr_at checked the 12 bytes.
    let m = unsafe { macs.read_unaligned() };
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&m[6..12]);
    swapped[6..].copy_from_slice(&m[..6]);
    // SAFETY: as above.
    unsafe { macs.write_unaligned(swapped) };
    counters::decap(Decap::Refusal);
    xdp_action::XDP_TX
}
