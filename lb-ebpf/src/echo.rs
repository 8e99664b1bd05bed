//! Echo replies for VIPs: an ICMP (or ICMPv6) echo request to a VIP is answered by the data
//! path, from the VIP, so monitoring can ping a VIP wherever it is served; the director's kernel
//! would answer only for addresses configured on it. The request is turned into the reply in
//! place (addresses and MACs swapped, type changed, checksums updated incrementally) and sent
//! back out: no copy, no allocation.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{CONFIG_F_VIP_ECHO, FAMILY_V4, Global, VipKey};

use crate::{
    counters, csum,
    maps::{CONFIG, VIPS},
    parse::{self, IPV4_HLEN, IPV6_HLEN, ptr_at},
};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const REPLY_TTL: u8 = 64;

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
    if config.flags & CONFIG_F_VIP_ECHO == 0 || !parse::sent_to(ctx, &config.iface_mac) {
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
        let src = h[12];
        if src == 0 || src == 127 || src >= 224 || VIPS.get_ptr(&key).is_none() {
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
        let ip = ptr_at::<[u8; IPV6_HLEN]>(ctx, l3)?;
        // SAFETY: ptr_at checked the 40 bytes.
        let mut h = unsafe { ip.read_unaligned() };
        let mut key = VipKey {
            addr: [0; 16],
            family,
            _pad: [0; 3],
        };
        key.addr.copy_from_slice(&h[24..40]);
        let mut src = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        // Unspecified, loopback or multicast: no single host to answer.
        if u128::from_be_bytes(src) <= 1 || src[0] == 0xff || VIPS.get_ptr(&key).is_none() {
            return None;
        }
        h[7] = REPLY_TTL;
        // The pseudo-header's addresses only trade places: the checksum keeps them.
        let mut a = [0u8; 32];
        a.copy_from_slice(&h[8..40]);
        h[8..24].copy_from_slice(&a[16..32]);
        h[24..40].copy_from_slice(&a[..16]);
        // SAFETY: as above.
        unsafe { ip.write_unaligned(h) };
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
