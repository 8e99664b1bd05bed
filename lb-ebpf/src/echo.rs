//! Echo replies for VIPs: an ICMP (or ICMPv6) echo request to a VIP is answered by the data
//! path, from the VIP, so monitoring can ping a VIP wherever it is served; the director's kernel
//! would answer only for addresses configured on it. The request is turned into the reply in
//! place (addresses and MACs swapped, type changed, checksums updated incrementally) and sent
//! back out: no copy, no allocation.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{CONFIG_F_VIP_ECHO, FAMILY_V4, Global, VipKey};

use crate::{
    counters, csum, egress,
    maps::{CONFIG, VIPS},
    parse::{IPV4_HLEN, IPV6_HLEN, ptr_at},
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const REPLY_TTL: u8 = 64;

/// Whether the ICMP message at `icmp_off` is an echo request (type and code only).
#[inline(always)]
pub fn is_request(ctx: &XdpContext, family: u8, icmp_off: usize) -> bool {
    let request = if family == FAMILY_V4 {
        ICMP_ECHO_REQUEST
    } else {
        ICMPV6_ECHO_REQUEST
    };
    ptr_at::<[u8; 2]>(ctx, icmp_off)
        // SAFETY: ptr_at checked the 2 bytes.
        .is_some_and(|p| unsafe { p.read_unaligned() } == [request, 0])
}

/// The reply's verdict (XDP_TX) if the unfragmented ICMP message at `icmp_off` is an echo
/// request to a VIP sent to this director's MAC by a single host; None for anything else,
/// which the caller handles as before.
#[inline(always)]
pub fn answer(ctx: &XdpContext, family: u8, l3: usize, icmp_off: usize) -> Option<u32> {
    let v4 = family == FAMILY_V4;
    let (request, reply) = if v4 {
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
    } else {
        (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
    };
    let icmp = ptr_at::<[u8; 4]>(ctx, icmp_off)?;
    // SAFETY: ptr_at checked the 4 bytes.
    let mut head = unsafe { icmp.read_unaligned() };
    if head[0] != request || head[1] != 0 {
        return None;
    }
    let config = CONFIG.get(0)?;
    // Only a frame sent to an attached interface's MAC: see egress::ingress.
    if config.flags & CONFIG_F_VIP_ECHO == 0 || egress::ingress(ctx).is_none() {
        return None;
    }
    let mac_at = ptr_at::<[u8; 12]>(ctx, 0)?;
    // SAFETY: as above.
    let macs = unsafe { mac_at.read_unaligned() };
    // A group source MAC is no single host (RFC 1122 3.2.2 and RFC 4443 2.4 for errors; the
    // same rule keeps a forged broadcast source from turning a reply into a flood).
    if macs[6] & 1 != 0 {
        return None;
    }
    // The datagram as its header states it must be here, ending after the ICMP header.
    let avail = ctx.data_end() - ctx.data() - l3;
    if v4 {
        let ip = ptr_at::<[u8; IPV4_HLEN]>(ctx, l3)?;
        // SAFETY: ptr_at checked the 20 bytes.
        let mut h = unsafe { ip.read_unaligned() };
        let mut key = VipKey {
            addr: [0; 16],
            family,
            _pad: [0; 3],
        };
        key.addr[..4].copy_from_slice(&h[16..20]);
        // No options (a reply would have to handle them) and a header that passes its
        // checksum: a corrupt header's source may be corrupt too (and the kernel would drop
        // it).
        let len = u16::from_be_bytes([h[2], h[3]]) as usize;
        let src = h[12];
        if h[0] != 0x45
            || csum::finish(csum::add(0, &h)) != [0, 0]
            || len > avail
            || len < IPV4_HLEN + 8
            || src == 0
            || src == 127
            || src >= 224
            || VIPS.get_ptr(&key).is_none()
        {
            return None;
        }
        let old = [h[8], h[9]];
        h[8] = REPLY_TTL;
        let check = csum::replace([h[10], h[11]], old, [h[8], h[9]]);
        h[10..12].copy_from_slice(&check);
        // Swapping the addresses leaves the checksum as it is (a sum commutes).
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[12..20]);
        h[12..16].copy_from_slice(&a[4..8]);
        h[16..20].copy_from_slice(&a[..4]);
        // SAFETY: as above.
        unsafe { ip.write_unaligned(h) };
    } else {
        // Only what is read or written: the stack is shared with the rest of xlb_icmp.
        let len_at = ptr_at::<[u8; 2]>(ctx, l3 + 4)?;
        let addrs_at = ptr_at::<[u8; 32]>(ctx, l3 + 8)?;
        // SAFETY: ptr_at checked both ranges.
        let (len, mut addrs) = unsafe { (len_at.read_unaligned(), addrs_at.read_unaligned()) };
        let len = IPV6_HLEN + u16::from_be_bytes(len) as usize;
        let mut key = VipKey {
            addr: [0; 16],
            family,
            _pad: [0; 3],
        };
        key.addr.copy_from_slice(&addrs[16..32]);
        // Unspecified, loopback or multicast: no single host to answer.
        let src = u128::from_be_bytes(addrs[..16].try_into().ok()?);
        if len > avail
            || icmp_off + 8 > l3 + len
            || src <= 1
            || addrs[0] == 0xff
            || VIPS.get_ptr(&key).is_none()
        {
            return None;
        }
        // The pseudo-header's addresses only trade places: the checksum keeps them.
        addrs.rotate_left(16);
        let hop_limit = ptr_at::<u8>(ctx, l3 + 7)?;
        // SAFETY: as above.
        unsafe {
            addrs_at.write_unaligned(addrs);
            hop_limit.write(REPLY_TTL);
        }
    }
    let old = [head[0], head[1]];
    head[0] = reply;
    let check = csum::replace([head[2], head[3]], old, [head[0], head[1]]);
    head[2..4].copy_from_slice(&check);
    let icmp = ptr_at::<[u8; 4]>(ctx, icmp_off)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..12]);
    swapped[6..].copy_from_slice(&macs[..6]);
    let mac_at = ptr_at::<[u8; 12]>(ctx, 0)?;
    // SAFETY: ptr_at checked both ranges again after the writes above (no helper moved the
    // frame; the pointers are re-derived for the verifier's sake).
    unsafe {
        icmp.write_unaligned(head);
        mac_at.write_unaligned(swapped);
    }
    counters::global(Global::EchoReplied);
    Some(xdp_action::XDP_TX)
}
