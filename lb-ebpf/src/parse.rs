//! Header parsing: Ethernet (with one 802.1Q tag), IPv4 (any IHL), IPv6 (with extension
//! headers), TCP and UDP. Every read is bounds-checked against `data_end`; a frame that ends
//! early yields `None` and is handed to the kernel untouched.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 and IPv6 as the payload of an IP header (IPIP, 4in6; IP6IP6): what TUN sends and
/// refusals come back in.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
/// IPv6 extension headers skipped before giving up (Cilium uses the same bound).
const IPV6_MAX_EXT_HEADERS: usize = 4;

/// ICMP and ICMPv6 headers: type, code, checksum, then 4 bytes that depend on the type.
pub const ICMP_HLEN: usize = 8;
/// ICMP "destination unreachable" (code 4: "fragmentation needed").
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv6 "packet too big".
pub const ICMPV6_PKT_TOOBIG: u8 = 2;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Where a packet stands in fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: carries the L4 header.
    First,
    /// A later fragment: no L4 header, ports unknown.
    Later,
}

impl Fragment {
    /// From a header's fragment offset and "more fragments" flag.
    #[inline(always)]
    fn from_header(offset: u16, more_fragments: bool) -> Self {
        if offset != 0 {
            Fragment::Later
        } else if more_fragments {
            Fragment::First
        } else {
            // Whole, or an IPv6 atomic fragment (RFC 6946).
            Fragment::None
        }
    }
}

/// What the balancer needs from a frame. Addresses are in network order; an IPv4 address
/// fills the first four bytes. Ports are as on the wire (network order in memory).
pub struct Packet {
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub fragment: Fragment,
    /// IP identification of a fragmented datagram (IPv6: the fragment header's 32 bits).
    pub frag_id: u32,
    /// Offset of the IP header: the L2 header's length (14, or 18 with a VLAN tag).
    pub l3_off: usize,
    /// Offset of the L4 header (NAT rewrites ports and checksums there).
    pub l4_off: usize,
}

impl Packet {
    /// Nothing parsed yet but the family and where the IP header starts.
    #[inline(always)]
    pub const fn at(family: u8, l3_off: usize) -> Self {
        Packet {
            family,
            proto: 0,
            src: [0; 16],
            dst: [0; 16],
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            fragment: Fragment::None,
            frag_id: 0,
            l3_off,
            l4_off: 0,
        }
    }

    #[inline(always)]
    pub fn is_tcp_fin_or_rst(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0
    }

    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.proto == PROTO_TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// A pointer to a `T` at `offset` bytes into the frame, if the frame is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that size_of::<T>() bytes at offset lie inside the frame.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// The EtherType after at most one VLAN tag, and the offset of the L3 header.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Option<(u16, usize)> {
    let mut l3 = ETH_HLEN;
    let mut ether_type = u16::from_be(read::<u16>(ctx, 12)?);
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        ether_type = u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?);
        l3 += VLAN_HLEN;
    }
    Some((ether_type, l3))
}

/// Parses L2 to L4. `None` means "not IPv4/IPv6 TCP/UDP, or too short to tell": pass it.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Option<Packet> {
    let (ether_type, l3) = ethernet(ctx)?;
    parse_at(ctx, ether_type, l3)
}

/// Parses an IP packet of `ether_type`'s family at `l3`, to L4 (TCP or UDP only): a frame's
/// own packet, or the inner packet of a tunnel.
#[inline(always)]
pub fn parse_at(ctx: &XdpContext, ether_type: u16, l3: usize) -> Option<Packet> {
    let mut pkt = Packet::at(0, l3);
    let l4 = match ether_type {
        ETH_P_IPV4 => parse_ipv4(ctx, l3, &mut pkt)?,
        ETH_P_IPV6 => parse_ipv6(ctx, l3, &mut pkt)?,
        _ => return None,
    };
    if pkt.proto != PROTO_TCP && pkt.proto != PROTO_UDP {
        return None;
    }
    pkt.l4_off = l4;
    if pkt.fragment != Fragment::Later {
        // Source and destination ports lead both TCP and UDP headers.
        let ports = read::<[u16; 2]>(ctx, l4)?;
        pkt.sport = ports[0];
        pkt.dport = ports[1];
        if pkt.proto == PROTO_TCP {
            pkt.tcp_flags = read::<u8>(ctx, l4 + 13)?;
        }
    }
    Some(pkt)
}

/// The family, L3 and ICMP header offsets of an unfragmented ICMP or ICMPv6 message (for
/// `xlb_icmp`, which gets the frames `parse` refused).
#[inline(always)]
pub fn icmp(ctx: &XdpContext) -> Option<(u8, usize, usize)> {
    let (ether_type, l3) = ethernet(ctx)?;
    let mut pkt = Packet::at(0, l3);
    let (l4, icmp) = match ether_type {
        ETH_P_IPV4 => (parse_ipv4(ctx, l3, &mut pkt)?, IPPROTO_ICMP),
        ETH_P_IPV6 => (parse_ipv6(ctx, l3, &mut pkt)?, IPPROTO_ICMPV6),
        _ => return None,
    };
    if pkt.proto != icmp || pkt.fragment != Fragment::None {
        return None;
    }
    Some((pkt.family, l3, l4))
}

/// Fills addresses, protocol and fragment state; returns the L4 offset.
///
/// The fixed header is copied out in one bounds-checked read: the verifier then needs no
/// reasoning about variable offsets for its fields (only the options length is variable).
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize, pkt: &mut Packet) -> Option<usize> {
    let hdr = read::<[u8; 20]>(ctx, l3)?;
    let ihl = ((hdr[0] & 0x0f) as usize) * 4;
    if hdr[0] >> 4 != 4 || ihl < 20 {
        return None;
    }
    // The options (if any) must be present too: the L4 header starts after them.
    ptr_at::<u8>(ctx, l3 + ihl - 1)?;
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    pkt.fragment = Fragment::from_header(frag & 0x1fff, frag & 0x2000 != 0);
    pkt.frag_id = u16::from_be_bytes([hdr[4], hdr[5]]) as u32;
    pkt.proto = hdr[9];
    pkt.family = FAMILY_V4;
    pkt.src[..4].copy_from_slice(&hdr[12..16]);
    pkt.dst[..4].copy_from_slice(&hdr[16..20]);
    Some(l3 + ihl)
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize, pkt: &mut Packet) -> Option<usize> {
    let hdr = read::<[u8; IPV6_HLEN]>(ctx, l3)?;
    if hdr[0] >> 4 != 6 {
        return None;
    }
    let mut next = hdr[6];
    pkt.src.copy_from_slice(&hdr[8..24]);
    pkt.dst.copy_from_slice(&hdr[24..40]);
    pkt.family = FAMILY_V6;
    let mut off = l3 + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let hdr = read::<[u8; 2]>(ctx, off)?;
                next = hdr[0];
                off += (hdr[1] as usize + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let hdr = read::<[u8; 8]>(ctx, off)?;
                next = hdr[0];
                let offset = u16::from_be_bytes([hdr[2], hdr[3]]) >> 3;
                pkt.fragment = Fragment::from_header(offset, hdr[3] & 1 != 0);
                pkt.frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                off += 8;
            }
            _ => break,
        }
    }
    pkt.proto = next;
    Some(off)
}

/// Whether the frame's destination MAC is `mac`.
#[inline(always)]
pub fn sent_to(ctx: &XdpContext, mac: &[u8; 6]) -> bool {
    // SAFETY: ptr_at checked that the 6 bytes are inside the frame.
    ptr_at::<[u8; 6]>(ctx, 0).is_some_and(|dst| unsafe { dst.read_unaligned() } == *mac)
}
