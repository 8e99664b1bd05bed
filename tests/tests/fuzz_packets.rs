//! Property tests of the compiled XDP programs under BPF_PROG_TEST_RUN: the balancer and the
//! decapsulator see random frames and mutations (truncations, bad IHL and lengths, flipped
//! bytes, extension-header chains, VLAN stacks, fragment bits) of a corpus of valid frames that
//! takes every path. Properties:
//!
//! - no verdict but PASS, DROP or TX (never ABORTED); the decapsulator only ever passes;
//! - a passed frame is byte-identical, and a frame not for a service (by a model of the
//!   documented rules, written here) is always passed;
//! - every frame sent out is well-formed: DR changes the two MACs only (the packet is the
//!   real's business); TUN's outer header (IPIP, IP6IP6, 4in6, GUE over either family)
//!   encloses exactly the inner datagram, with a right IPv4 checksum, GUE's UDP checksum zero
//!   over IPv4 and, over IPv6, right whenever the inner packet's own checksums are, the inner
//!   packet as it came, and the decapsulator gives the frame back; an ICMP reply has exact
//!   lengths and right IP and ICMP checksums, quoting the packet; an echo reply is the request
//!   turned around;
//! - a forwarded ICMP error goes to the real its flow's next packet goes to;
//! - a NAT director (NAT and full NAT services) never aborts, passes untouched every frame
//!   that is neither for a NAT VIP nor a reply of a flow it started nor an ICMP error about
//!   one of its requests (a reply that matches no flow included), and sends frames as long as
//!   they came, with right IPv4 header checksums and right TCP/UDP/ICMP checksums whenever
//!   the input's were.
//!
//! Cases: `XLB_FUZZ_CASES` frames in all (default 200,000), shared between the properties;
//! `XLB_FUZZ_SEED` replays a run (each property prints its seed). A failure prints the
//! minimal input and the frames in hex. `cargo xtask fuzz --long` runs millions.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    sync::LazyLock,
    time::{Instant, SystemTime},
};

use lb_common::DEFAULT_GUE_PORT;
use proptest::{
    collection::vec,
    prelude::*,
    sample::{Index, select},
    test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner},
};
use xlb::{
    config::{Encap, Mode, RealConfig, ServiceAddr, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
    netlink::Mac,
    realserver::Decapsulator,
};
use xlb_tests::{wellformed, *};

// --- The director under test -------------------------------------------------------------

const VIP4_DR: &str = "198.18.0.100";
const VIP4_TUN: &str = "198.18.0.101";
const VIP6_DR: &str = "fd00:18::100";
const VIP6_TUN: &str = "fd00:18::101";
/// GUE over IPv4, GUE over IPv6, 4in6, and 4in6 in GUE.
const VIP4_GUE: &str = "198.18.0.102";
const VIP6_GUE: &str = "fd00:18::102";
const VIP4_4IN6: &str = "198.18.0.103";
const VIP4_4IN6_GUE: &str = "198.18.0.104";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const ROUTER4: &str = "198.18.2.1";
const ROUTER6: &str = "fd00:18:2::1";
const TUNNEL_SRC4: &str = "198.18.0.2";
const TUNNEL_SRC6: &str = "fd00:18::2";
const NEXT_HOP_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
const MTU: u32 = 1500;

/// DR and TUN, both families, TCP and UDP, one-port and all-ports services; TUN in IPIP or
/// GUE, over the VIP's family or (4in6) over IPv6.
const SERVICES: [(&str, Mode, Encap, bool); 12] = [
    ("198.18.0.100:80/tcp", Mode::Dr, Encap::Ipip, false),
    ("198.18.0.100:0/udp", Mode::Dr, Encap::Ipip, false),
    ("[fd00:18::100]:443/tcp", Mode::Dr, Encap::Ipip, false),
    ("[fd00:18::100]:53/udp", Mode::Dr, Encap::Ipip, false),
    ("198.18.0.101:80/tcp", Mode::Tun, Encap::Ipip, false),
    ("198.18.0.101:53/udp", Mode::Tun, Encap::Ipip, false),
    ("[fd00:18::101]:0/tcp", Mode::Tun, Encap::Ipip, false),
    ("[fd00:18::101]:53/udp", Mode::Tun, Encap::Ipip, false),
    ("198.18.0.102:80/tcp", Mode::Tun, Encap::Gue, false),
    ("[fd00:18::102]:0/udp", Mode::Tun, Encap::Gue, false),
    ("198.18.0.103:80/tcp", Mode::Tun, Encap::Ipip, true),
    ("198.18.0.104:0/udp", Mode::Tun, Encap::Gue, true),
];
const DR_REALS: [&str; 6] = [
    "198.18.0.11",
    "198.18.0.12",
    "198.18.0.13",
    "fd00:18::11",
    "fd00:18::12",
    "fd00:18::13",
];
const TUN_REALS: [&str; 6] = [
    "198.19.1.11",
    "198.19.1.12",
    "198.19.1.13",
    "fd00:19::11",
    "fd00:19::12",
    "fd00:19::13",
];

fn director() -> Balancer {
    let mut b = balancer();
    b.set_default_tunnel_sources(
        Some(TUNNEL_SRC4.parse().unwrap()),
        Some(TUNNEL_SRC6.parse().unwrap()),
    );
    b.set_mtu(MTU).unwrap();
    for (service, mode, encap, over_v6) in SERVICES {
        let addr: ServiceAddr = service.parse().unwrap();
        let mut cfg = ServiceConfig::new(addr);
        cfg.mode = mode;
        cfg.encap = encap;
        if over_v6 {
            cfg.tunnel_src = Some(ip(TUNNEL_SRC6));
        }
        let reals = if mode == Mode::Dr {
            DR_REALS
        } else {
            TUN_REALS
        };
        for r in reals.iter().map(|r| ip(r)) {
            if r.is_ipv4() == cfg.tunnel_v4() {
                let mac = if mode == Mode::Dr {
                    real_mac(r)
                } else {
                    NEXT_HOP_MAC
                };
                b.set_link(r, Some(link(mac))).unwrap();
                cfg.reals.push(RealConfig::new(r, 100));
            }
        }
        b.add_service(cfg).unwrap();
    }
    b
}

const REAL_VIPS: [&str; 6] = [
    VIP4_TUN,
    VIP6_TUN,
    VIP4_GUE,
    VIP6_GUE,
    VIP4_4IN6,
    VIP4_4IN6_GUE,
];

/// The real server's decapsulator, for the TUN VIPs, unwrapping GUE on the default port.
fn real_server() -> Decapsulator {
    let mut d = decapsulator();
    for vip in REAL_VIPS {
        d.add_vip(ip(vip)).unwrap();
    }
    d.set_gue_port(DEFAULT_GUE_PORT).unwrap();
    d
}

// --- A model of which frames are for a service --------------------------------------------

/// Whether the balancer may act on a frame (forward, answer or drop it), from the documented
/// rules: one VLAN tag at most, IPv4 with any IHL, IPv6 with up to four extension headers,
/// TCP/UDP for a service (later fragments: any service of the address and protocol), ICMP
/// quoting a service's flow from the address it is sent to. Where the rules leave doubt the
/// model says yes: a "no" must be right, since the program then has to pass the frame.
fn may_act(f: &[u8]) -> bool {
    model(f).is_some()
}

/// What a frame the balancer may act on is for.
enum Acts {
    /// A TCP or UDP packet for a service.
    Flow,
    /// An ICMP error about a service's flow: the client's packet of that flow (an ACK or a UDP
    /// datagram from the client's address and port to the VIP's).
    ErrorAbout(Frame),
    /// IPIP / IP6IP6 / 4in6 whose inner packet is for a service: a real's refusal of a flow
    /// (honoured and re-scheduled, or dropped as forged or bounced too often).
    Refusal,
    /// An ICMP echo request to a VIP (its ICMP header's offset): answered.
    Echo(usize),
}

fn model(f: &[u8]) -> Option<Acts> {
    let mut l3 = 14;
    let mut ether_type = be16(f.get(12..14)?);
    if ether_type == 0x8100 || ether_type == 0x88a8 {
        ether_type = be16(f.get(16..18)?);
        l3 = 18;
    }
    let (v4, dst, proto, l4, later, fragmented) = match ether_type {
        0x0800 => {
            let h = f.get(l3..l3 + 20)?;
            let ihl = (h[0] & 0x0f) as usize * 4;
            if h[0] >> 4 != 4 || ihl < 20 || f.len() < l3 + ihl {
                return None;
            }
            let frag = be16(&h[6..8]);
            let later = frag & 0x1fff != 0;
            (
                true,
                addr(&h[16..20]),
                h[9],
                l3 + ihl,
                later,
                frag & 0x3fff != 0,
            )
        }
        0x86dd => {
            let h = f.get(l3..l3 + 40)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let (mut next, mut off, mut later, mut fragmented) = (h[6], l3 + 40, false, false);
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 => {
                        let e = f.get(off..off + 2)?;
                        next = e[0];
                        off += (e[1] as usize + 1) * 8;
                    }
                    44 => {
                        let e = f.get(off..off + 8)?;
                        next = e[0];
                        let offset = be16(&e[2..4]) >> 3;
                        later = offset != 0;
                        fragmented = offset != 0 || e[3] & 1 != 0;
                        off += 8;
                    }
                    _ => break,
                }
            }
            (false, addr(&h[24..40]), next, off, later, fragmented)
        }
        _ => return None,
    };
    match proto {
        6 | 17 if later => service_on_any_port(dst, proto).then_some(Acts::Flow),
        6 | 17 => {
            let ports = f.get(l4..l4 + 4)?;
            service_for(dst, be16(&ports[2..4]), proto).then_some(Acts::Flow)
        }
        1 | 58 if (proto == 1) == v4 && !fragmented => {
            let head = f.get(l4..l4 + 2)?;
            if head == [if v4 { 8 } else { 128 }, 0] {
                return services().any(|s| s.vip == dst).then_some(Acts::Echo(l4));
            }
            // The quote: the real's packet, from the VIP (the address the error is sent to).
            let q = l4 + 8;
            let (src, client, qproto, ql4) = if v4 {
                let h = f.get(q..q + 20)?;
                let ihl = (h[0] & 0x0f) as usize * 4;
                if h[0] >> 4 != 4 || ihl < 20 {
                    return None;
                }
                (addr(&h[12..16]), addr(&h[16..20]), h[9], q + ihl)
            } else {
                let h = f.get(q..q + 40)?;
                if h[0] >> 4 != 6 {
                    return None;
                }
                (addr(&h[8..24]), addr(&h[24..40]), h[6], q + 40)
            };
            let ports = f.get(ql4..ql4 + 4)?;
            let (vip_port, client_port) = (be16(&ports[0..2]), be16(&ports[2..4]));
            if src != dst || !service_for(src, vip_port, qproto) {
                return None;
            }
            let (c, v) = (client.to_string(), src.to_string());
            Some(Acts::ErrorAbout(if qproto == 6 {
                Frame::tcp(&c, &v, client_port, vip_port, ACK)
            } else {
                Frame::udp(&c, &v, client_port, vip_port)
            }))
        }
        4 | 41 if !fragmented => {
            // The inner packet, as if it were the frame's own.
            let mut inner = f[..l3].to_vec();
            let ether_type: u16 = if proto == 4 { 0x0800 } else { 0x86dd };
            inner[l3 - 2..l3].copy_from_slice(&ether_type.to_be_bytes());
            inner.extend_from_slice(f.get(l4..)?);
            matches!(model(&inner)?, Acts::Flow).then_some(Acts::Refusal)
        }
        _ => None,
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn addr(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(b).unwrap()),
        _ => IpAddr::from(<[u8; 16]>::try_from(b).unwrap()),
    }
}

fn services() -> impl Iterator<Item = &'static ServiceAddr> {
    static PARSED: LazyLock<Vec<ServiceAddr>> =
        LazyLock::new(|| SERVICES.iter().map(|(s, ..)| s.parse().unwrap()).collect());
    PARSED.iter()
}

fn service_for(dst: IpAddr, port: u16, proto: u8) -> bool {
    services().any(|s| s.vip == dst && s.proto.number() == proto && (s.port == port || s.port == 0))
}

fn service_on_any_port(dst: IpAddr, proto: u8) -> bool {
    services().any(|s| s.vip == dst && s.proto.number() == proto)
}

// --- The properties, checked on each frame ------------------------------------------------

const XDP_VERDICTS: [&str; 5] = ["ABORTED", "DROP", "PASS", "TX", "REDIRECT"];

fn verdict_name(v: u32) -> String {
    XDP_VERDICTS
        .get(v as usize)
        .map_or_else(|| format!("verdict {v}"), |n| n.to_string())
}

/// The balancer's verdict and output for `input`, against every property; what happened.
fn check_balancer(
    b: &mut Balancer,
    d: &mut Decapsulator,
    input: &[u8],
    verdict: u32,
    out: &[u8],
) -> Result<&'static str, String> {
    match verdict {
        XDP_PASS if out != input => Err("a passed frame was changed".into()),
        XDP_PASS => Ok("pass"),
        XDP_DROP | XDP_TX if !may_act(input) => Err(format!(
            "{} a frame that is for no service",
            verdict_name(verdict)
        )),
        XDP_DROP => Ok("drop"),
        XDP_TX => match model(input) {
            Some(Acts::ErrorAbout(flow)) => {
                let path = check_sent(d, input, out)?;
                if path == "too-big reply" {
                    return Err("answered an ICMP message with ICMP".into());
                }
                same_real(b, &flow, out, path)?;
                Ok(if path == "dr" {
                    "icmp error, dr"
                } else {
                    "icmp error, tun"
                })
            }
            // Exact bytes of re-scheduled refusals: packet_reschedule.rs.
            Some(Acts::Refusal) => Ok("refusal re-scheduled"),
            Some(Acts::Echo(icmp)) => check_echo(input, out, icmp),
            _ => check_sent(d, input, out),
        },
        other => Err(format!("verdict {}", verdict_name(other))),
    }
}

/// An ICMP error went where the flow it quotes goes: the same real (and, over IP6IP6, the same
/// outer flow label), as the flow's next packet from the client shows.
fn same_real(b: &mut Balancer, flow: &Frame, error_out: &[u8], path: &str) -> Result<(), String> {
    let (verdict, flow_out) = run_balancer(b, &flow.bytes())?;
    if verdict != XDP_TX {
        return Err(format!(
            "the error was forwarded but its flow's packet got {}",
            verdict_name(verdict)
        ));
    }
    let same = if path == "dr" {
        flow_out[..6] == error_out[..6]
    } else {
        let (a, b) = (
            wellformed::tunnel(&flow_out)?.0,
            wellformed::tunnel(error_out)?.0,
        );
        let label =
            |f: &[u8], l3: usize| be16(&f[l3 + 2..]) as u32 | (f[l3 + 1] as u32 & 0xf) << 16;
        a.dst == b.dst && (a.version == 4 || label(&flow_out, a.l3) == label(error_out, b.l3))
    };
    if !same {
        return Err(format!(
            "the error went elsewhere than its flow ({flow:?} went out as {})",
            hex(&flow_out)
        ));
    }
    Ok(())
}

/// A frame the balancer sent: a DR rewrite (same length), a TUN encapsulation (longer) or an
/// ICMP "too big" reply (shorter: it quotes 512 bytes of a packet longer than the MTU).
fn check_sent(d: &mut Decapsulator, input: &[u8], out: &[u8]) -> Result<&'static str, String> {
    if out.len() == input.len() {
        if out[12..] != input[12..] {
            return Err("DR changed more than the MACs".into());
        }
        let dr_macs: Vec<Mac> = DR_REALS.iter().map(|r| real_mac(ip(r))).collect();
        if !dr_macs.iter().any(|m| out[..6] == m[..]) || out[6..12] != DIRECTOR_MAC {
            return Err("DR to a MAC that is no real's, or from another MAC".into());
        }
        return Ok("dr");
    }
    if out.len() > input.len() {
        check_tunnel(d, input, out)?;
        return Ok("tun");
    }
    check_too_big(input, out)?;
    Ok("too-big reply")
}

fn check_tunnel(d: &mut Decapsulator, input: &[u8], out: &[u8]) -> Result<(), String> {
    let (outer, inner) = wellformed::tunnel(out)?;
    let l2 = outer.l3;
    if out[..6] != NEXT_HOP_MAC || out[6..12] != DIRECTOR_MAC {
        return Err("TUN frame not from the director to the next hop".into());
    }
    if out[12..l2 - 2] != input[12..l2 - 2] || out[inner..] != input[l2..] {
        return Err("TUN changed the L2 tags or the inner packet".into());
    }
    let outer_type: [u8; 2] = if outer.version == 4 {
        [0x08, 0x00]
    } else {
        [0x86, 0xdd]
    };
    if out[l2 - 2..l2] != outer_type {
        return Err("TUN frame's EtherType is not its outer header's".into());
    }
    if outer.proto == 17 {
        check_gue(out, &outer, inner)?;
    }
    if !TUN_REALS.iter().any(|r| ip(r) == outer.dst)
        || ![TUNNEL_SRC4, TUNNEL_SRC6]
            .iter()
            .any(|s| ip(s) == outer.src)
    {
        return Err(format!("TUN from {} to {}", outer.src, outer.dst));
    }
    if outer.version == 4 && (out[l2 + 6] & 0x40 == 0 || out[l2 + 8] != 64) {
        return Err("outer IPv4 header without DF or with another TTL than 64".into());
    }
    // The real server's decapsulator gives back what the director received.
    let (verdict, back) = d.test_run(out).map_err(|e| e.to_string())?;
    let mut expected = input.to_vec();
    expected[..6].copy_from_slice(&NEXT_HOP_MAC);
    expected[6..12].copy_from_slice(&DIRECTOR_MAC);
    if (verdict, &back) != (XDP_PASS, &expected) {
        return Err(format!(
            "decapsulation did not restore the frame: {} {}",
            verdict_name(verdict),
            hex(&back)
        ));
    }
    Ok(())
}

/// GUE's UDP header: an ephemeral source port, the GUE port, and a checksum that is zero over
/// IPv4 and, over IPv6, right whenever the inner packet's own checksums are right (the
/// director sums it from the headers) and present for a whole TCP segment.
fn check_gue(out: &[u8], outer: &wellformed::Ip, inner: usize) -> Result<(), String> {
    let udp = &out[inner - 8..inner];
    if be16(&udp[0..2]) < 0xc000 || be16(&udp[2..4]) != DEFAULT_GUE_PORT {
        return Err(format!(
            "GUE ports {} -> {}",
            be16(&udp[0..2]),
            be16(&udp[2..4])
        ));
    }
    let check = &udp[6..8];
    if outer.version == 4 {
        return if check == [0, 0] {
            Ok(())
        } else {
            Err("GUE over IPv4 with a UDP checksum".into())
        };
    }
    let inner_ip = if out[inner] >> 4 == 4 {
        wellformed::ipv4(out, inner)
    } else {
        wellformed::ipv6(out, inner)
    };
    let whole_segment = inner_ip.as_ref().is_ok_and(|ip| {
        let frag = ip.version == 4 && be16(&out[inner + 6..]) & 0x3fff != 0;
        !frag && wellformed::l4_checksum(out, ip).is_ok()
    });
    if check == [0, 0] {
        let tcp = inner_ip.as_ref().is_ok_and(|ip| ip.proto == 6);
        return if whole_segment && tcp {
            Err("GUE over IPv6 without a checksum for a whole TCP segment".into())
        } else {
            Ok(())
        };
    }
    if whole_segment {
        wellformed::l4_checksum(out, outer).map_err(|e| format!("GUE over IPv6: {e}"))?;
    }
    Ok(())
}

/// An echo reply: the request with MACs and addresses swapped, TTL / hop limit 64, the
/// reply's type, and checksums right exactly when the request's were.
fn check_echo(input: &[u8], out: &[u8], icmp: usize) -> Result<&'static str, String> {
    let req = wellformed::ip(input)?;
    let l2 = req.l3;
    let v4 = req.version == 4;
    if out.len() != input.len() || out[..6] != input[6..12] || out[6..12] != input[..6] {
        return Err("echo reply not back to the sender's MAC, or resized".into());
    }
    let rep = wellformed::ip(out)?;
    if (rep.src, rep.dst) != (req.dst, req.src) {
        return Err(format!("echo reply from {} to {}", rep.src, rep.dst));
    }
    let ttl_at = if v4 { l2 + 8 } else { l2 + 7 };
    if out[ttl_at] != 64 || out[icmp] != if v4 { 0 } else { 129 } {
        return Err("echo reply with another TTL than 64 or another type".into());
    }
    // Everything else as it was: the header's other fields, the identifier, sequence, data.
    let (addrs, check) = if v4 {
        (l2 + 12..l2 + 20, l2 + 10..l2 + 12)
    } else {
        (l2 + 8..l2 + 40, l2 + 2..l2 + 2)
    };
    for i in 12..out.len() {
        let rewritten = i == ttl_at
            || addrs.contains(&i)
            || check.contains(&i)
            || i == icmp
            || i == icmp + 2
            || i == icmp + 3;
        if !rewritten && out[i] != input[i] {
            return Err(format!("echo reply differs from the request at byte {i}"));
        }
    }
    let sums_right = |f: &[u8], ip: &wellformed::Ip| {
        // ICMPv6 after extension headers is not summed here.
        (v4 || icmp == l2 + 40) && wellformed::l4_checksum(f, ip).is_ok()
    };
    if sums_right(input, &req) != sums_right(out, &rep) {
        return Err(
            "echo reply's ICMP checksum right where the request's was not, or the reverse".into(),
        );
    }
    Ok("echo reply")
}

fn check_too_big(input: &[u8], out: &[u8]) -> Result<(), String> {
    let reply = wellformed::generated(out)?;
    let l2 = reply.l3;
    let (v4, hdr) = (reply.version == 4, reply.header_len);
    let asked = if v4 {
        wellformed::ipv4(input, l2)
    } else {
        wellformed::ipv6(input, l2)
    }
    .map_err(|e| format!("answered a malformed packet ({e})"))?;
    // Never an error about a later fragment, from a group MAC or to no single host (RFC 1122
    // 3.2.2, RFC 1812 4.3.2.7, RFC 4443 2.4).
    if v4 && be16(&input[l2 + 6..]) & 0x1fff != 0 {
        return Err("answered a later fragment".into());
    }
    let single_host = match asked.src {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.octets()[0] == 0 || a.is_loopback() || a.octets()[0] >= 224)
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
    };
    if !single_host || input[6] & 1 != 0 {
        return Err(format!(
            "answered a packet from {} (MAC {})",
            asked.src,
            hex(&input[6..12])
        ));
    }
    if out[..6] != input[6..12] || out[6..12] != DIRECTOR_MAC || out[12..l2] != input[12..l2] {
        return Err("reply not back to the sender's MAC from the director".into());
    }
    if (reply.src, reply.dst) != (asked.dst, asked.src) {
        return Err(format!("reply from {} to {}", reply.src, reply.dst));
    }
    let icmp = &out[l2 + hdr..];
    let (want_proto, want_type) = if v4 { (1, [3, 4]) } else { (58, [2, 0]) };
    if reply.proto != want_proto || icmp[..2] != want_type {
        return Err(format!(
            "reply protocol {} type {:?}",
            reply.proto,
            &icmp[..2]
        ));
    }
    if icmp[8..] != input[l2..l2 + 512] {
        return Err("reply does not quote the first 512 bytes of the packet".into());
    }
    Ok(())
}

/// The decapsulator's properties: it passes everything; it unwraps exactly the tunnel packets
/// for its VIPs (outer IPv4 of any IHL, unfragmented, or outer IPv6 with no extension header;
/// IP-in-IP or GUE), giving back the L2 header (with the inner EtherType) and the inner packet, with an outer
/// congestion mark carried to an ECN-capable inner packet; everything else is untouched.
fn check_decap(input: &[u8], verdict: u32, out: &[u8]) -> Result<&'static str, String> {
    if verdict != XDP_PASS {
        return Err(format!("decapsulator verdict {}", verdict_name(verdict)));
    }
    let Some((l2, outer_len, outer_ecn)) = decap_model(input) else {
        return if out == input {
            Ok("untouched")
        } else {
            Err("changed a frame that is no tunnel packet for its VIPs".into())
        };
    };
    let mut expected = input[..l2].to_vec();
    expected.extend_from_slice(&input[l2 + outer_len..]);
    // A 4in6 packet goes on as IPv4.
    let inner_type: [u8; 2] = if expected[l2] >> 4 == 4 {
        [0x08, 0x00]
    } else {
        [0x86, 0xdd]
    };
    expected[l2 - 2..l2].copy_from_slice(&inner_type);
    if out.len() != expected.len() {
        return Err(format!(
            "decapsulated to {} bytes, not {}",
            out.len(),
            expected.len()
        ));
    }
    let v4 = expected[l2] >> 4 == 4;
    let ecn = |b: &[u8]| {
        if v4 {
            b[l2 + 1] & 3
        } else {
            (b[l2 + 1] >> 4) & 3
        }
    };
    // Only an ECN-capable inner packet not marked yet has anything to carry.
    let marked = outer_ecn == 3 && matches!(ecn(&expected), 1 | 2);
    // Bytes that may differ: the ECN bits (and the IPv4 checksum) when a mark is carried.
    let touched: &[usize] = match (marked, v4) {
        (false, _) => &[],
        (true, true) => &[l2 + 1, l2 + 10, l2 + 11],
        (true, false) => &[l2 + 1],
    };
    for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
        if a != b && !touched.contains(&i) {
            return Err(format!("decapsulated frame differs at byte {i}"));
        }
    }
    if marked && ecn(out) != 3 {
        return Err("outer congestion mark not carried to the inner packet".into());
    }
    if marked && v4 {
        let ihl = (expected[l2] & 0x0f) as usize * 4;
        let header = |b: &[u8]| b.get(l2..l2 + ihl).map(checksum);
        if ihl >= 20 && header(&expected) == Some(0) && header(out) != Some(0) {
            return Err("inner IPv4 checksum broken by the congestion mark".into());
        }
    }
    Ok(if marked {
        "decapsulated, CE carried"
    } else {
        "decapsulated"
    })
}

/// (L2 length, outer header length, outer ECN) of a tunnel packet the decapsulator must
/// unwrap (IPIP, IP6IP6, 4in6, GUE to the default port over either family); None for anything
/// it must leave alone.
fn decap_model(f: &[u8]) -> Option<(usize, usize, u8)> {
    let mut l2 = 14;
    let mut ether_type = be16(f.get(12..14)?);
    if ether_type == 0x8100 || ether_type == 0x88a8 {
        ether_type = be16(f.get(16..18)?);
        l2 = 18;
    }
    let gue_at = |udp: usize| {
        f.get(udp..udp + 4)
            .is_some_and(|h| be16(&h[2..4]) == DEFAULT_GUE_PORT)
    };
    let version_at = |at: usize| f.get(at..at + 4).map(|h| h[0] >> 4);
    let (outer_len, ecn, version) = match ether_type {
        0x0800 => {
            let h = f.get(l2..l2 + 20)?;
            let ihl = (h[0] & 0x0f) as usize * 4;
            if h[0] >> 4 != 4 || ihl < 20 {
                return None;
            }
            let gue = h[9] == 17 && gue_at(l2 + ihl);
            if (h[9] != 4 && !gue) || be16(&h[6..8]) & 0x3fff != 0 {
                return None;
            }
            if gue {
                (ihl + 8, h[1] & 3, version_at(l2 + ihl + 8)?)
            } else {
                (ihl, h[1] & 3, 4)
            }
        }
        0x86dd => {
            let h = f.get(l2..l2 + 40)?;
            if h[0] >> 4 != 6 {
                return None;
            }
            let ecn = (h[1] >> 4) & 3;
            match h[6] {
                41 => (40, ecn, 6),
                4 => (40, ecn, 4),
                17 if gue_at(l2 + 40) => (48, ecn, version_at(l2 + 48)?),
                _ => return None,
            }
        }
        _ => return None,
    };
    let at = l2 + outer_len;
    let inner_dst = match version {
        4 => {
            let inner = f.get(at..at + 20)?;
            (inner[0] >> 4 == 4).then(|| addr(&inner[16..20]))?
        }
        6 => {
            let inner = f.get(at..at + 40)?;
            (inner[0] >> 4 == 6).then(|| addr(&inner[24..40]))?
        }
        _ => return None,
    };
    REAL_VIPS
        .iter()
        .any(|v| ip(v) == inner_dst)
        .then_some((l2, outer_len, ecn))
}

// --- The corpus: valid frames for every path ----------------------------------------------

/// What the balancer does with a corpus frame as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Dr,
    Tun,
    TooBig,
    Drop,
    Pass,
    Echo,
}

fn sized(frame: Frame, l3_len: usize) -> Frame {
    let headers = if frame.src.is_ipv4() { 20 } else { 40 } + 20;
    Frame {
        payload: (0..l3_len - headers).map(|i| i as u8).collect(),
        ..frame
    }
}

/// The real's packet to a client (what routers quote), from `vip`:`port`.
fn reply_from(vip: &str, port: u16, tcp: bool) -> Frame {
    let client = if vip.contains(':') { CLIENT6 } else { CLIENT4 };
    let f = if tcp {
        Frame::tcp(vip, client, port, 40000, ACK)
    } else {
        Frame::udp(vip, client, port, 40000)
    };
    Frame {
        payload: vec![0x5a; 100],
        ..f
    }
}

/// A router's ICMP error to `quoted`'s source about it, quoting up to 512 bytes.
fn error_about(quoted: &Frame, icmp_type: u8, code: u8, rest: [u8; 4]) -> Frame {
    let bytes = quoted.bytes();
    let l3 = &bytes[l2_len(&bytes)..];
    let router = if quoted.src.is_ipv4() {
        ROUTER4
    } else {
        ROUTER6
    };
    let mut f = Frame::icmp(
        router,
        VIP4_DR,
        icmp_type,
        code,
        rest,
        &l3[..l3.len().min(512)],
    );
    f.dst = quoted.src;
    f
}

fn balancer_corpus() -> Vec<(Path, &'static str, Vec<u8>)> {
    use Path::*;
    let tcp = |s, d, sp, dp, fl| Frame::tcp(s, d, sp, dp, fl);
    let udp = |s, d, sp, dp| Frame::udp(s, d, sp, dp);
    let frag = |f: Frame, id, off, more| Frame {
        fragment: Some((id, off, more)),
        ..f
    };
    let mut padded_ack = Frame {
        payload: Vec::new(),
        ..tcp(CLIENT4, VIP4_TUN, 40010, 80, ACK)
    }
    .bytes();
    padded_ack.resize(60, 0);
    let mut short_datagram = tcp(CLIENT4, VIP4_TUN, 40011, 80, SYN).bytes();
    short_datagram.truncate(short_datagram.len() - 4);
    let mut c: Vec<(Path, &str, Vec<u8>)> = vec![
        (
            Dr,
            "dr v4 syn",
            tcp(CLIENT4, VIP4_DR, 40000, 80, SYN).bytes(),
        ),
        (
            Dr,
            "dr v4 established",
            tcp(CLIENT4, VIP4_DR, 40000, 80, ACK).bytes(),
        ),
        (
            Dr,
            "dr v4 udp, all-ports service",
            udp(CLIENT4, VIP4_DR, 40001, 5353).bytes(),
        ),
        (
            Dr,
            "dr v4 options, one vlan tag",
            Frame {
                vlan: Some(42),
                ipv4_options: vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..tcp(CLIENT4, VIP4_DR, 40002, 80, SYN)
            }
            .bytes(),
        ),
        (
            Pass,
            "dr v4, two vlan tags",
            Frame {
                vlan: Some(42),
                outer_vlan: Some(7),
                ..tcp(CLIENT4, VIP4_DR, 40003, 80, SYN)
            }
            .bytes(),
        ),
        (
            Dr,
            "dr v4 first fragment",
            frag(udp(CLIENT4, VIP4_DR, 40004, 53), 11, 0, true).bytes(),
        ),
        (
            Dr,
            "dr v4 later fragment",
            frag(udp(CLIENT4, VIP4_DR, 40004, 53), 11, 4, false).bytes(),
        ),
        (
            Dr,
            "dr v6 syn",
            tcp(CLIENT6, VIP6_DR, 40000, 443, SYN).bytes(),
        ),
        (
            Dr,
            "dr v6 established",
            tcp(CLIENT6, VIP6_DR, 40000, 443, ACK).bytes(),
        ),
        (
            Dr,
            "dr v6 three extension headers",
            Frame {
                ipv6_ext: vec![0, 43, 60],
                ..udp(CLIENT6, VIP6_DR, 40001, 53)
            }
            .bytes(),
        ),
        (
            Dr,
            "dr v6 four extension headers",
            Frame {
                ipv6_ext: vec![0, 43, 60, 60],
                ..udp(CLIENT6, VIP6_DR, 40002, 53)
            }
            .bytes(),
        ),
        (
            Pass,
            "dr v6 five extension headers: past the parser's bound",
            Frame {
                ipv6_ext: vec![0, 43, 60, 60, 60],
                ..udp(CLIENT6, VIP6_DR, 40003, 53)
            }
            .bytes(),
        ),
        (
            Dr,
            "dr v6 first fragment after a hop-by-hop header",
            Frame {
                ipv6_ext: vec![0],
                ..frag(udp(CLIENT6, VIP6_DR, 40004, 53), 12, 0, true)
            }
            .bytes(),
        ),
        (
            Dr,
            "dr v6 later fragment",
            frag(udp(CLIENT6, VIP6_DR, 40004, 53), 12, 4, false).bytes(),
        ),
        (
            Dr,
            "dr v6 vlan",
            Frame {
                vlan: Some(5),
                ..tcp(CLIENT6, VIP6_DR, 40005, 443, SYN)
            }
            .bytes(),
        ),
        (
            Tun,
            "tun v4 syn, DF",
            Frame {
                df: true,
                tos: 0xb9,
                ..tcp(CLIENT4, VIP4_TUN, 40000, 80, SYN)
            }
            .bytes(),
        ),
        (
            Tun,
            "tun v4 established",
            tcp(CLIENT4, VIP4_TUN, 40000, 80, ACK).bytes(),
        ),
        (Tun, "tun v4 udp", udp(CLIENT4, VIP4_TUN, 40001, 53).bytes()),
        (Tun, "tun v4 bare ack padded to 60 bytes", padded_ack),
        (
            Tun,
            "tun v4 first fragment",
            frag(udp(CLIENT4, VIP4_TUN, 40002, 53), 13, 0, true).bytes(),
        ),
        (
            TooBig,
            "tun v4 DF, too big once encapsulated",
            sized(
                Frame {
                    df: true,
                    ..tcp(CLIENT4, VIP4_TUN, 40003, 80, ACK)
                },
                1481,
            )
            .bytes(),
        ),
        (
            Drop,
            "tun v4 no DF, too big",
            sized(tcp(CLIENT4, VIP4_TUN, 40004, 80, ACK), 1481).bytes(),
        ),
        (
            Drop,
            "tun v4 datagram longer than its frame",
            short_datagram,
        ),
        (
            Tun,
            "tun v6 syn, all-ports service",
            tcp(CLIENT6, VIP6_TUN, 40000, 8080, SYN).bytes(),
        ),
        (
            Tun,
            "tun v6 established",
            tcp(CLIENT6, VIP6_TUN, 40000, 8080, ACK).bytes(),
        ),
        (
            Tun,
            "tun v6 udp, vlan",
            Frame {
                vlan: Some(9),
                tos: 0x2a,
                ..udp(CLIENT6, VIP6_TUN, 40001, 53)
            }
            .bytes(),
        ),
        (
            Tun,
            "tun v6 orphan later fragment, all-ports service",
            frag(tcp(CLIENT6, VIP6_TUN, 40002, 22, ACK), 14, 8, false).bytes(),
        ),
        (
            TooBig,
            "tun v6 too big once encapsulated",
            sized(tcp(CLIENT6, VIP6_TUN, 40003, 8080, ACK), 1461).bytes(),
        ),
        (Pass, "arp", arp_request([198, 18, 1, 1], [198, 18, 0, 100])),
        (
            Pass,
            "tcp to the director",
            tcp(CLIENT4, TUNNEL_SRC4, 40000, 22, SYN).bytes(),
        ),
        (
            Pass,
            "tcp to another port of a vip",
            tcp(CLIENT4, VIP4_DR, 40000, 81, SYN).bytes(),
        ),
        (
            Pass,
            "v6 to no vip",
            tcp(CLIENT6, "fd00:18::200", 40000, 443, SYN).bytes(),
        ),
        (
            Echo,
            "echo to a vip",
            Frame::icmp(CLIENT4, VIP4_DR, 8, 0, [0, 1, 0, 1], b"ping").bytes(),
        ),
        (
            Echo,
            "echo to a v6 vip, vlan",
            Frame {
                vlan: Some(4),
                ..Frame::icmp(CLIENT6, VIP6_TUN, 128, 0, [0, 1, 0, 2], b"ping6")
            }
            .bytes(),
        ),
        (
            Pass,
            "echo to the director",
            Frame::icmp(CLIENT4, TUNNEL_SRC4, 8, 0, [0, 1, 0, 1], b"ping").bytes(),
        ),
        (
            Tun,
            "gue v4 syn",
            tcp(CLIENT4, VIP4_GUE, 40020, 80, SYN).bytes(),
        ),
        (
            Tun,
            "gue v4 established, vlan",
            Frame {
                vlan: Some(8),
                ..tcp(CLIENT4, VIP4_GUE, 40020, 80, ACK)
            }
            .bytes(),
        ),
        (
            Tun,
            "gue v6 udp, all-ports service",
            udp(CLIENT6, VIP6_GUE, 40021, 5353).bytes(),
        ),
        (
            Tun,
            "gue v6 first fragment: no checksum",
            frag(udp(CLIENT6, VIP6_GUE, 40022, 53), 15, 0, true).bytes(),
        ),
        (
            Tun,
            "4in6 syn",
            tcp(CLIENT4, VIP4_4IN6, 40023, 80, SYN).bytes(),
        ),
        (
            Tun,
            "4in6 gue udp",
            udp(CLIENT4, VIP4_4IN6_GUE, 40024, 53).bytes(),
        ),
        (
            Tun,
            "4in6 gue first fragment",
            frag(udp(CLIENT4, VIP4_4IN6_GUE, 40025, 53), 16, 0, true).bytes(),
        ),
        (
            TooBig,
            "gue v4 DF, too big once in GUE",
            sized(
                Frame {
                    df: true,
                    ..tcp(CLIENT4, VIP4_GUE, 40026, 80, ACK)
                },
                1473,
            )
            .bytes(),
        ),
        (
            TooBig,
            "gue v6 too big once in GUE",
            // `sized` counts a TCP header: 1465 is a 1453-byte UDP datagram.
            sized(udp(CLIENT6, VIP6_GUE, 40027, 53), 1465).bytes(),
        ),
        (
            TooBig,
            "4in6 DF, too big once in IPv6",
            sized(
                Frame {
                    df: true,
                    ..tcp(CLIENT4, VIP4_4IN6, 40028, 80, ACK)
                },
                1461,
            )
            .bytes(),
        ),
        (
            Drop,
            "4in6 no DF, too big",
            sized(tcp(CLIENT4, VIP4_4IN6, 40029, 80, ACK), 1461).bytes(),
        ),
    ];
    // ICMP errors about the services' flows, and about other traffic.
    let errors4: [(u8, u8, [u8; 4]); 3] =
        [(3, 4, [0, 0, 5, 0x78]), (3, 3, [0; 4]), (11, 0, [0; 4])];
    let errors6: [(u8, u8, [u8; 4]); 3] = [(2, 0, [0, 0, 5, 0]), (1, 4, [0; 4]), (3, 0, [0; 4])];
    for (t, code, rest) in errors4 {
        c.push((
            Dr,
            "icmp error about a dr v4 flow",
            error_about(&reply_from(VIP4_DR, 80, true), t, code, rest).bytes(),
        ));
        c.push((
            Tun,
            "icmp error about a tun v4 flow",
            error_about(&reply_from(VIP4_TUN, 53, false), t, code, rest).bytes(),
        ));
    }
    for (t, code, rest) in errors6 {
        c.push((
            Dr,
            "icmpv6 error about a dr v6 flow",
            error_about(&reply_from(VIP6_DR, 443, true), t, code, rest).bytes(),
        ));
        c.push((
            Tun,
            "icmpv6 error about a tun v6 flow",
            error_about(&reply_from(VIP6_TUN, 8080, true), t, code, rest).bytes(),
        ));
    }
    c.push((
        Tun,
        "icmp error about a gue v4 flow",
        error_about(&reply_from(VIP4_GUE, 80, true), 3, 4, [0, 0, 5, 0x78]).bytes(),
    ));
    c.push((
        Tun,
        "icmp error about a 4in6 gue flow",
        error_about(&reply_from(VIP4_4IN6_GUE, 53, false), 3, 3, [0; 4]).bytes(),
    ));
    c.push((
        Tun,
        "icmpv6 error about a gue v6 flow",
        error_about(&reply_from(VIP6_GUE, 53, false), 2, 0, [0, 0, 5, 0]).bytes(),
    ));
    c.push((
        Tun,
        "icmpv6 error after a hop-by-hop header, vlan",
        Frame {
            ipv6_ext: vec![0],
            vlan: Some(3),
            ..error_about(&reply_from(VIP6_TUN, 53, false), 2, 0, [0, 0, 5, 0])
        }
        .bytes(),
    ));
    c.push((
        Pass,
        "icmp error about another port",
        error_about(&reply_from(VIP4_DR, 81, true), 3, 4, [0; 4]).bytes(),
    ));
    c.push((
        Pass,
        "icmpv6 error quoting the client's direction",
        Frame {
            dst: ip(VIP6_DR),
            ..error_about(&tcp(CLIENT6, VIP6_DR, 40000, 443, ACK), 2, 0, [0, 0, 5, 0])
        }
        .bytes(),
    ));
    c
}

fn decap_corpus() -> Vec<(bool, &'static str, Vec<u8>)> {
    let tunnel = |inner: Frame, src: &str, dst: &str, tos: u8| {
        let frame = inner.bytes();
        let l3 = &frame[l2_len(&frame)..];
        let outer = outer_header(ip(src), ip(dst), tos, 0x12345, ip_len(l3));
        encapsulate(&frame, [0x02, 0, 0, 0, 0, 0x11], NEXT_HOP_MAC, &outer)
    };
    let t4 = |inner, tos| tunnel(inner, TUNNEL_SRC4, TUN_REALS[0], tos);
    let t6 = |inner, tos| tunnel(inner, TUNNEL_SRC6, TUN_REALS[3], tos);
    let mut with_options = t4(Frame::tcp(CLIENT4, VIP4_TUN, 1, 80, SYN), 0);
    // Outer IHL 7: eight bytes of no-op options, checksum and length fixed.
    with_options.splice(34..34, [1, 1, 1, 1, 1, 1, 1, 0]);
    with_options[14] = 0x47;
    let len = be16(&with_options[16..18]) + 8;
    with_options[16..18].copy_from_slice(&len.to_be_bytes());
    with_options[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&with_options[14..42]);
    with_options[24..26].copy_from_slice(&sum.to_be_bytes());
    let mut fragment = t4(Frame::tcp(CLIENT4, VIP4_TUN, 1, 80, SYN), 0);
    fragment[14 + 6] = 0x20;
    // GUE (to `port`) or 4in6, as the director sends them.
    let wrap = |inner: Frame, src: &str, dst: &str, port: Option<u16>| {
        let frame = inner.bytes();
        let l3 = &frame[l2_len(&frame)..];
        let outer = tunnel_header(
            ip(src),
            ip(dst),
            0,
            0x12345,
            &l3[..ip_len(l3)],
            port.map(|p| (0xc123, p)),
        );
        let mut out = encapsulate(&frame, [0x02, 0, 0, 0, 0, 0x11], NEXT_HOP_MAC, &outer);
        let ether_type = if dst.contains(':') { 0x86dd } else { 0x0800 };
        set_ether_type(&mut out, ether_type);
        out
    };
    let gue = Some(DEFAULT_GUE_PORT);
    let mut variant0 = wrap(
        Frame::tcp(CLIENT4, VIP4_GUE, 1, 80, SYN),
        TUNNEL_SRC4,
        TUN_REALS[0],
        gue,
    );
    variant0[14 + 28] = 0;
    let mut decap = vec![
        (
            true,
            "gue v4 tcp",
            wrap(
                Frame::tcp(CLIENT4, VIP4_GUE, 1, 80, SYN),
                TUNNEL_SRC4,
                TUN_REALS[0],
                gue,
            ),
        ),
        (
            true,
            "gue v6 udp, vlan",
            wrap(
                Frame {
                    vlan: Some(9),
                    ..Frame::udp(CLIENT6, VIP6_GUE, 2, 53)
                },
                TUNNEL_SRC6,
                TUN_REALS[3],
                gue,
            ),
        ),
        (
            true,
            "4in6 tcp",
            wrap(
                Frame::tcp(CLIENT4, VIP4_4IN6, 1, 80, SYN),
                TUNNEL_SRC6,
                TUN_REALS[3],
                None,
            ),
        ),
        (
            true,
            "4in6 gue udp, vlan",
            wrap(
                Frame {
                    vlan: Some(9),
                    ..Frame::udp(CLIENT4, VIP4_4IN6_GUE, 2, 53)
                },
                TUNNEL_SRC6,
                TUN_REALS[3],
                gue,
            ),
        ),
        (
            false,
            "gue to another port",
            wrap(
                Frame::tcp(CLIENT4, VIP4_GUE, 1, 80, SYN),
                TUNNEL_SRC4,
                TUN_REALS[0],
                Some(7000),
            ),
        ),
        (false, "gue variant 0", variant0),
    ];
    decap.extend(vec![
        (
            true,
            "ipip tcp",
            t4(Frame::tcp(CLIENT4, VIP4_TUN, 1, 80, SYN), 0),
        ),
        (
            true,
            "ipip udp, vlan",
            t4(
                Frame {
                    vlan: Some(9),
                    ..Frame::udp(CLIENT4, VIP4_TUN, 2, 53)
                },
                0,
            ),
        ),
        (
            true,
            "ip6ip6 tcp",
            t6(Frame::tcp(CLIENT6, VIP6_TUN, 1, 80, SYN), 0),
        ),
        (
            true,
            "ip6ip6 udp, vlan",
            t6(
                Frame {
                    vlan: Some(9),
                    ..Frame::udp(CLIENT6, VIP6_TUN, 2, 53)
                },
                0,
            ),
        ),
        (true, "ipip, outer options", with_options),
        (
            true,
            "ipip, outer CE over inner ECT(0)",
            t4(
                Frame {
                    tos: 0xba,
                    ..Frame::tcp(CLIENT4, VIP4_TUN, 3, 80, ACK)
                },
                0xbb,
            ),
        ),
        (
            true,
            "ip6ip6, outer CE over inner ECT(1)",
            t6(
                Frame {
                    tos: 0x01,
                    ..Frame::udp(CLIENT6, VIP6_TUN, 3, 53)
                },
                0x03,
            ),
        ),
        (
            true,
            "ipip icmp error about a flow",
            t4(
                error_about(&reply_from(VIP4_TUN, 53, false), 3, 4, [0, 0, 5, 0x78]),
                0,
            ),
        ),
        (
            false,
            "ipip for another vip",
            t4(Frame::tcp(CLIENT4, VIP4_DR, 1, 80, SYN), 0),
        ),
        (false, "ipip fragment", fragment),
        (
            false,
            "plain tcp to a vip",
            Frame::tcp(CLIENT4, VIP4_TUN, 1, 80, SYN).bytes(),
        ),
        (false, "arp", arp_request([198, 18, 1, 1], [198, 19, 1, 11])),
        (
            false,
            "ipip with two vlan tags",
            t4(
                Frame {
                    vlan: Some(9),
                    outer_vlan: Some(10),
                    ..Frame::tcp(CLIENT4, VIP4_TUN, 4, 80, SYN)
                },
                0,
            ),
        ),
    ]);
    decap
}

// --- Mutations and random frames ----------------------------------------------------------

/// Frames stay within what BPF_PROG_TEST_RUN takes in one buffer (a page less headroom and
/// tail room) and above its minimum (an Ethernet header).
const MAX_FRAME: usize = 3000;
const MIN_FRAME: usize = 14;

#[derive(Clone, Debug)]
enum Mutation {
    /// Cut the frame (never below an Ethernet header).
    Truncate(Index),
    /// Append bytes: padding or junk after the datagram.
    Extend(Vec<u8>),
    /// Flip one bit, anywhere.
    FlipBit(Index, u8),
    /// Set one byte among the first 128 (L2 to L4 headers, quotes, inner headers).
    SetHeaderByte(u8, u8),
    /// Set the IPv4 IHL.
    Ihl(u8),
    /// Set the IPv4 total length / IPv6 payload length, or move it by a few bytes.
    IpLen(u16),
    IpLenBy(i8),
    /// Set the IPv4 protocol / IPv6 next header.
    Proto(u8),
    /// Set the IPv4 fragment offset and "more fragments" (DF kept).
    Fragment(u16, bool),
    /// Insert an IPv6 extension header (0, 43, 60 with `len` units, or 44) after the fixed
    /// header, keeping the chain and the payload length consistent.
    ExtHeader(u8, u8, u16),
    /// Replace the VLAN tags with `n` tags (0, 1 or 2).
    Tags(u8),
    /// Set the IP source (or destination) to one of `ADDRESSES4`/`ADDRESSES6`: no single host,
    /// a VIP, a client.
    Address(bool, Index),
    /// Recompute the outer IPv4 header checksum (after other mutations).
    FixChecksum,
}

/// A byte value, from the ones that hit boundaries more often than random ones.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        1 => select(vec![0u8, 1, 4, 5, 6, 17, 41, 43, 44, 58, 60, 0x45, 0x60, 0x7f, 0x80, 0xff]),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        3 => (any::<Index>(), 0..8u8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        4 => (0..128u8, interesting_byte()).prop_map(|(p, v)| Mutation::SetHeaderByte(p, v)),
        2 => (0..16u8).prop_map(Mutation::Ihl),
        1 => any::<u16>().prop_map(Mutation::IpLen),
        2 => any::<i8>().prop_map(Mutation::IpLenBy),
        2 => select(vec![0u8, 1, 4, 6, 17, 41, 43, 44, 58, 59, 60, 255]).prop_map(Mutation::Proto),
        2 => (0..0x2000u16, any::<bool>()).prop_map(|(o, m)| Mutation::Fragment(o, m)),
        2 => (select(vec![0u8, 43, 44, 60]), 0..3u8, any::<u16>())
            .prop_map(|(k, l, f)| Mutation::ExtHeader(k, l, f)),
        2 => (0..3u8).prop_map(Mutation::Tags),
        2 => (any::<bool>(), any::<Index>()).prop_map(|(s, i)| Mutation::Address(s, i)),
        1 => Just(Mutation::FixChecksum),
    ]
}

const ADDRESSES4: [&str; 8] = [
    "0.0.0.0",
    "127.0.0.1",
    "224.0.0.1",
    "255.255.255.255",
    VIP4_DR,
    VIP4_TUN,
    CLIENT4,
    "198.18.1.2",
];
const ADDRESSES6: [&str; 7] = [
    "::",
    "::1",
    "ff02::1",
    VIP6_DR,
    VIP6_TUN,
    CLIENT6,
    "fd00:18:1::2",
];

/// The L3 offset as the mutations see it (up to two tags) and whether it is IPv4.
fn l3_of(f: &[u8]) -> Option<(usize, bool)> {
    let (ether_type, l3) = wellformed::ethernet(f).ok()?;
    match ether_type {
        0x0800 => Some((l3, true)),
        0x86dd => Some((l3, false)),
        _ => None,
    }
}

impl Mutation {
    fn apply(&self, f: &mut Vec<u8>) {
        let l3 = l3_of(f).filter(|(l3, v4)| f.len() >= l3 + if *v4 { 20 } else { 40 });
        match self {
            Mutation::Truncate(i) => f.truncate(MIN_FRAME + i.index(f.len() - MIN_FRAME + 1)),
            Mutation::Extend(bytes) => f.extend_from_slice(bytes),
            Mutation::FlipBit(i, bit) => {
                let at = i.index(f.len());
                f[at] ^= 1 << bit;
            }
            Mutation::SetHeaderByte(at, v) => {
                if let Some(b) = f.get_mut(*at as usize) {
                    *b = *v;
                }
            }
            Mutation::Ihl(ihl) => {
                if let Some((l3, true)) = l3 {
                    f[l3] = 0x40 | ihl;
                }
            }
            Mutation::IpLen(len) => {
                if let Some((l3, v4)) = l3 {
                    let at = if v4 { l3 + 2 } else { l3 + 4 };
                    f[at..at + 2].copy_from_slice(&len.to_be_bytes());
                }
            }
            Mutation::IpLenBy(delta) => {
                if let Some((l3, v4)) = l3 {
                    let at = if v4 { l3 + 2 } else { l3 + 4 };
                    let len = be16(&f[at..]).wrapping_add_signed(*delta as i16);
                    f[at..at + 2].copy_from_slice(&len.to_be_bytes());
                }
            }
            Mutation::Proto(p) => {
                if let Some((l3, v4)) = l3 {
                    f[if v4 { l3 + 9 } else { l3 + 6 }] = *p;
                }
            }
            Mutation::Fragment(offset, more) => {
                if let Some((l3, true)) = l3 {
                    let df = be16(&f[l3 + 6..]) & 0x4000;
                    let v = df | offset | if *more { 0x2000 } else { 0 };
                    f[l3 + 6..l3 + 8].copy_from_slice(&v.to_be_bytes());
                }
            }
            Mutation::ExtHeader(kind, units, frag) => {
                if let Some((l3, false)) = l3 {
                    let next = f[l3 + 6];
                    let mut ext = if *kind == 44 {
                        let mut e = vec![next, 0];
                        e.extend_from_slice(&frag.to_be_bytes());
                        e.extend_from_slice(&[0, 0, 0x12, 0x34]);
                        e
                    } else {
                        let mut e = vec![0u8; (*units as usize + 1) * 8];
                        e[0] = next;
                        e[1] = *units;
                        e
                    };
                    f[l3 + 6] = *kind;
                    let len = be16(&f[l3 + 4..]).wrapping_add(ext.len() as u16);
                    f[l3 + 4..l3 + 6].copy_from_slice(&len.to_be_bytes());
                    let at = l3 + 40;
                    f.splice(at..at, ext.drain(..));
                }
            }
            Mutation::Tags(n) => {
                let Ok((ether_type, l3)) = wellformed::ethernet(f) else {
                    return;
                };
                let mut l2 = f[..12].to_vec();
                for (i, tpid) in [0x88a8u16, 0x8100].iter().skip(2 - *n as usize).enumerate() {
                    l2.extend_from_slice(&tpid.to_be_bytes());
                    l2.extend_from_slice(&(100 + i as u16).to_be_bytes());
                }
                l2.extend_from_slice(&ether_type.to_be_bytes());
                f.splice(..l3, l2);
            }
            Mutation::Address(src, i) => match l3 {
                Some((l3, true)) => {
                    let a: std::net::Ipv4Addr =
                        ADDRESSES4[i.index(ADDRESSES4.len())].parse().unwrap();
                    let at = l3 + if *src { 12 } else { 16 };
                    f[at..at + 4].copy_from_slice(&a.octets());
                }
                Some((l3, false)) => {
                    let a: std::net::Ipv6Addr =
                        ADDRESSES6[i.index(ADDRESSES6.len())].parse().unwrap();
                    let at = l3 + if *src { 8 } else { 24 };
                    f[at..at + 16].copy_from_slice(&a.octets());
                }
                None => {}
            },
            Mutation::FixChecksum => {
                if let Some((l3, true)) = l3 {
                    let ihl = (f[l3] & 0x0f) as usize * 4;
                    if ihl >= 20 && f.len() >= l3 + ihl {
                        f[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
                        let sum = checksum(&f[l3..l3 + ihl]);
                        f[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
                    }
                }
            }
        }
        f.truncate(MAX_FRAME);
        if f.len() < MIN_FRAME {
            f.resize(MIN_FRAME, 0);
        }
    }
}

/// A mutated corpus frame: which one, and what is done to it (then, half the time, the IPv4
/// header checksum made right again, so that checks of it do not hide what follows).
#[derive(Clone)]
struct Mutated {
    index: usize,
    mutations: Vec<Mutation>,
    fix_checksum: bool,
    frame: Vec<u8>,
}

impl fmt::Debug for Mutated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The frame itself is in the failure's reason, in hex.
        write!(
            f,
            "corpus[{}] {:?}{}",
            self.index,
            self.mutations,
            if self.fix_checksum {
                " then FixChecksum"
            } else {
                ""
            }
        )
    }
}

fn mutated(corpus: Vec<Vec<u8>>) -> impl Strategy<Value = Mutated> {
    (0..corpus.len(), vec(mutation(), 1..=4), any::<bool>()).prop_map(
        move |(index, mutations, fix_checksum)| {
            let mut frame = corpus[index].clone();
            for m in &mutations {
                m.apply(&mut frame);
            }
            if fix_checksum {
                Mutation::FixChecksum.apply(&mut frame);
            }
            Mutated {
                index,
                mutations,
                fix_checksum,
                frame,
            }
        },
    )
}

/// A frame shown as hex when a case fails.
#[derive(Clone)]
struct Hex(Vec<u8>);

impl fmt::Debug for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a random frame carries after its IP header.
#[derive(Clone, Copy, Debug)]
enum Carries {
    /// The service's protocol and ports.
    Flow,
    /// An ICMP error quoting a packet from the VIP.
    IcmpError,
    /// A tunnelled packet of the same family, to a VIP.
    Tunnel,
    /// Another protocol number, random bytes.
    Other(u8),
}

/// Random frames shaped enough to reach past the Ethernet header: mostly aimed at one of the
/// services (its VIP, protocol and port; sometimes a random address or port, another
/// EtherType, VLAN tags), every other header byte and the lengths random or consistent by
/// turns (`care`), then random bytes. `tunnels` makes tunnel packets the likeliest.
fn random_frame(tunnels: bool) -> impl Strategy<Value = Hex> {
    let (flows, tunnelled) = if tunnels { (1, 4) } else { (4, 1) };
    (
        (0..SERVICES.len(), 0..2usize),
        prop_oneof![8 => Just(None), 1 => select(vec![0x0806u16, 0x8100, 0x88a8]).prop_map(Some), 1 => any::<u16>().prop_map(Some)],
        prop_oneof![4 => Just(0usize), 2 => Just(1), 1 => Just(2)],
        (prop::bool::weighted(0.15), prop::bool::weighted(0.15), any::<u16>()),
        prop_oneof![
            flows => Just(Carries::Flow),
            1 => Just(Carries::IcmpError),
            tunnelled => Just(Carries::Tunnel),
            1 => any::<u8>().prop_map(Carries::Other),
        ],
        vec(any::<u8>(), 80),
        vec(any::<u8>(), 0..160),
        prop_oneof![1 => Just(0u8), 1 => Just(1), 2 => Just(2), 4 => Just(3)],
    )
        .prop_map(
            |((svc, inner_vip), ether_type, tags, (random_dst, random_port, any_port), carries, noise, body, care)| {
                let service: ServiceAddr = SERVICES[svc].0.parse().unwrap();
                let v6 = service.vip.is_ipv6();
                let octets = |a: IpAddr| match a {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                let vip = octets(service.vip);
                let port = if random_port || service.port == 0 {
                    any_port
                } else {
                    service.port
                };
                let mut f = DIRECTOR_MAC.to_vec();
                f.extend_from_slice(&CLIENT_MAC);
                for tpid in &[0x88a8u16, 0x8100][2 - tags..] {
                    f.extend_from_slice(&tpid.to_be_bytes());
                    f.extend_from_slice(&[0, 5]);
                }
                let ip_type: u16 = if v6 { 0x86dd } else { 0x0800 };
                f.extend_from_slice(&ether_type.unwrap_or(ip_type).to_be_bytes());
                let proto = service.proto.number();
                // What follows the IP header: ports, or another IP header (a quote from
                // the VIP, or an inner packet to one of the family's VIPs), then random bytes.
                let mut rest = noise[40..].to_vec();
                let outer_proto = match carries {
                    Carries::Flow => {
                        rest[2..4].copy_from_slice(&port.to_be_bytes());
                        proto
                    }
                    Carries::IcmpError => {
                        rest.truncate(8);
                        rest[0] = [3, 11, 2, 1, 3, 8][noise[0] as usize % 6];
                        let mut q = random_ip_header(v6, &noise[8..], &vip, false, proto, care, 8);
                        let (src, dst) = if v6 { (8, 24) } else { (12, 16) };
                        q.copy_within(dst..dst + vip.len(), src);
                        rest.extend_from_slice(&q);
                        rest.extend_from_slice(&port.to_be_bytes());
                        if v6 { 58 } else { 1 }
                    }
                    Carries::Tunnel => {
                        let vips = if v6 { [VIP6_DR, VIP6_TUN] } else { [VIP4_DR, VIP4_TUN] };
                        let inner = octets(ip(vips[inner_vip]));
                        rest = random_ip_header(v6, &noise[16..], &inner, false, proto, care, body.len());
                        if v6 { 41 } else { 4 }
                    }
                    Carries::Other(p) => p,
                };
                let payload = rest.len() + body.len();
                f.extend_from_slice(&random_ip_header(v6, &noise, &vip, random_dst, outer_proto, care, payload));
                f.extend_from_slice(&rest);
                f.extend_from_slice(&body);
                f.truncate(MAX_FRAME);
                Hex(f)
            },
        )
}

/// An IP header of random bytes with the fields that matter set: version and IHL 5 unless
/// `care` is 0, the destination (random if `random_dst`), the protocol; the length is
/// consistent with `payload` and the IPv4 checksum right when `care` is 3.
fn random_ip_header(
    v6: bool,
    noise: &[u8],
    dst: &[u8],
    random_dst: bool,
    proto: u8,
    care: u8,
    payload: usize,
) -> Vec<u8> {
    if v6 {
        let mut h = noise[..40].to_vec();
        if care > 0 {
            h[0] = 0x60 | (h[0] & 0x0f);
        }
        h[6] = proto;
        if !random_dst {
            h[24..40].copy_from_slice(dst);
        }
        if care >= 2 {
            h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
        }
        h
    } else {
        let mut h = noise[..20].to_vec();
        if care > 0 {
            h[0] = 0x45;
            // A whole datagram (DF as it comes).
            h[6] &= 0x40;
            h[7] = 0;
        }
        h[9] = proto;
        if !random_dst {
            h[16..20].copy_from_slice(dst);
        }
        if care >= 2 {
            h[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        }
        if care >= 3 {
            h[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
        }
        h
    }
}

// --- Running ------------------------------------------------------------------------------

/// Frames in all, over the properties (`XLB_FUZZ_CASES`, default 200,000).
fn total_cases() -> u64 {
    std::env::var("XLB_FUZZ_CASES")
        .ok()
        .map(|v| v.parse().expect("XLB_FUZZ_CASES: a number of frames"))
        .unwrap_or(200_000)
}

/// The run's seed (`XLB_FUZZ_SEED`, decimal or 0x-hex), else one from the clock: one per
/// process, so every property prints the same.
fn base_seed() -> u64 {
    static SEED: LazyLock<u64> = LazyLock::new(|| match std::env::var("XLB_FUZZ_SEED") {
        Ok(v) => {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => v.parse(),
            }
            .expect("XLB_FUZZ_SEED: a number")
        }
        Err(_) => SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    });
    *SEED
}

/// Runs `test` on `share` of the frames from `strategy`, with a seed printed (and replayable)
/// and no failure files; a failure panics with the minimal input and the reason. `test` names
/// what happened to the frame; the tally is printed, to show the paths the frames took.
fn fuzz<S>(
    name: &str,
    share: f64,
    strategy: S,
    test: impl Fn(&S::Value) -> Result<&'static str, String>,
) where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let cases = ((total_cases() as f64 * share).round() as u32).max(1);
    // Each property its own stream, all from one printed seed.
    let seed = base_seed();
    let stream = seed
        ^ name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&stream.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    eprintln!("{name}: {cases} frames, XLB_FUZZ_SEED={seed:#x}");
    let started = Instant::now();
    let tally = RefCell::new(BTreeMap::<&str, u64>::new());
    let result = runner.run(&strategy, |v| {
        let outcome = test(&v).map_err(TestCaseError::fail)?;
        *tally.borrow_mut().entry(outcome).or_default() += 1;
        Ok(())
    });
    match result {
        Ok(()) => eprintln!(
            "{name}: {cases} frames in {:.1?}: {:?}",
            started.elapsed(),
            tally.into_inner()
        ),
        Err(TestError::Fail(reason, value)) => panic!(
            "{name} failed (replay with XLB_FUZZ_SEED={seed:#x} XLB_FUZZ_CASES={}): {reason}\n\
             minimal input: {value:?}",
            total_cases()
        ),
        Err(e) => panic!("{name}: {e}"),
    }
}

fn run_balancer(b: &mut Balancer, frame: &[u8]) -> Result<(u32, Vec<u8>), String> {
    b.dataplane()
        .test_run(BALANCER_PROGRAM, frame)
        .map_err(|e| format!("BPF_PROG_TEST_RUN: {e:#}"))
}

/// The balancer's check with the frames in the failure message.
fn balancer_case(
    b: &mut Balancer,
    d: &mut Decapsulator,
    input: &[u8],
) -> Result<&'static str, String> {
    let (verdict, out) = run_balancer(b, input)?;
    check_balancer(b, d, input, verdict, &out).map_err(|e| {
        format!(
            "{e}\n  verdict {}\n  input  {}\n  output {}",
            verdict_name(verdict),
            hex(input),
            hex(&out)
        )
    })
}

fn decap_case(d: &mut Decapsulator, input: &[u8]) -> Result<&'static str, String> {
    let (verdict, out) = d
        .test_run(input)
        .map_err(|e| format!("BPF_PROG_TEST_RUN: {e:#}"))?;
    check_decap(input, verdict, &out).map_err(|e| {
        format!(
            "{e}\n  verdict {}\n  input  {}\n  output {}",
            verdict_name(verdict),
            hex(input),
            hex(&out)
        )
    })
}

// --- The tests ----------------------------------------------------------------------------

/// The corpus is what it claims: each frame takes its path, and every frame sent passes the
/// same checks as the fuzzed ones. Without this a corpus could quietly miss a path.
#[test]
fn the_corpus_takes_every_path() {
    let (mut b, mut d) = (director(), real_server());
    let mut taken = std::collections::BTreeSet::new();
    for (path, name, frame) in balancer_corpus() {
        let (verdict, out) = run_balancer(&mut b, &frame).unwrap();
        let got = match (verdict, out.len().cmp(&frame.len())) {
            (XDP_TX, std::cmp::Ordering::Equal) if out[..6] == frame[6..12] => Path::Echo,
            (XDP_TX, std::cmp::Ordering::Equal) => Path::Dr,
            (XDP_TX, std::cmp::Ordering::Greater) => Path::Tun,
            (XDP_TX, std::cmp::Ordering::Less) => Path::TooBig,
            (XDP_DROP, _) => Path::Drop,
            (XDP_PASS, _) => Path::Pass,
            (v, _) => panic!("{name}: verdict {}", verdict_name(v)),
        };
        assert_eq!(got, path, "{name}");
        if let Err(e) = balancer_case(&mut b, &mut d, &frame) {
            panic!("{name}: {e}");
        }
        taken.insert(format!("{path:?}"));
    }
    assert_eq!(taken.len(), 6, "paths taken: {taken:?}");
    for (unwrapped, name, frame) in decap_corpus() {
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(out != frame, unwrapped, "{name}: unwrapped");
        assert_eq!(decap_model(&frame).is_some(), unwrapped, "{name}: model");
        decap_case(&mut d, &frame).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// Frames the fuzzer found failing, fixed since: each stays a case of the properties.
#[test]
fn frames_the_fuzzer_found() {
    let (mut b, mut d) = (director(), real_server());
    let unhex = |h: &str| -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    };
    // A TUN packet already CE-marked with an IPv4 checksum of 0xffff: the decapsulator
    // "carried" the outer mark and rewrote the checksum to 0x0000, so the real server did not
    // receive what the director had.
    let ce_ffff = unhex(
        "02000000000202000000000108004513003c000000000006ffff00000000c61200650000005000000000\
         0000000000000000000000000000000000000000000000000000000000000000",
    );
    // A TUN packet too big for the tunnel whose IPv4 header fails its checksum: it was
    // answered with an ICMP error to its (possibly corrupt) source.
    let mut corrupt = sized(
        Frame {
            df: true,
            ..Frame::tcp(CLIENT4, VIP4_TUN, 40003, 80, ACK)
        },
        1481,
    )
    .bytes();
    corrupt[14 + 10] = 0;
    for frame in [ce_ffff, corrupt] {
        balancer_case(&mut b, &mut d, &frame).unwrap();
    }
}

#[test]
fn balancer_on_mutated_corpus_frames() {
    let state = RefCell::new((director(), real_server()));
    let corpus = balancer_corpus().into_iter().map(|(_, _, f)| f).collect();
    fuzz(
        "balancer_on_mutated_corpus_frames",
        0.5,
        mutated(corpus),
        |m| {
            let (b, d) = &mut *state.borrow_mut();
            balancer_case(b, d, &m.frame)
        },
    );
}

#[test]
fn balancer_on_random_frames() {
    let state = RefCell::new((director(), real_server()));
    fuzz("balancer_on_random_frames", 0.2, random_frame(false), |f| {
        let (b, d) = &mut *state.borrow_mut();
        balancer_case(b, d, &f.0)
    });
}

#[test]
fn decapsulator_on_mutated_corpus_frames() {
    let d = RefCell::new(real_server());
    let corpus = decap_corpus().into_iter().map(|(_, _, f)| f).collect();
    fuzz(
        "decapsulator_on_mutated_corpus_frames",
        0.2,
        mutated(corpus),
        |m| decap_case(&mut d.borrow_mut(), &m.frame),
    );
}

#[test]
fn decapsulator_on_random_frames() {
    let d = RefCell::new(real_server());
    fuzz(
        "decapsulator_on_random_frames",
        0.1,
        random_frame(true),
        |f| decap_case(&mut d.borrow_mut(), &f.0),
    );
}

// --- A NAT director ------------------------------------------------------------------------

/// NAT services (both families, TCP and UDP) and a full-NAT one, over the DR reals at port
/// 8080 (they are on-link).
const NAT_SERVICES: [(&str, Mode); 4] = [
    ("198.18.0.110:80/tcp", Mode::Nat),
    ("198.18.0.110:53/udp", Mode::Nat),
    ("[fd00:18::110]:80/tcp", Mode::Nat),
    ("198.18.0.111:80/tcp", Mode::Fullnat),
];
const NAT_VIPS: [&str; 3] = ["198.18.0.110", "fd00:18::110", "198.18.0.111"];
const SNAT4: &str = "198.18.0.50";

/// A NAT director with one established flow per service; the corpus: each flow's next request,
/// its real's reply, and replies that match no flow. Also every reply tuple it knows, as
/// (real, real port, client or SNAT address, port, protocol).
fn nat_director() -> (Balancer, Vec<Vec<u8>>, Vec<Tuple>) {
    let mut b = balancer();
    for (service, mode) in NAT_SERVICES {
        let addr: ServiceAddr = service.parse().unwrap();
        let mut cfg = ServiceConfig::new(addr);
        cfg.mode = mode;
        if mode == Mode::Fullnat {
            cfg.snat = vec![ip(SNAT4)];
        }
        for r in DR_REALS.iter().map(|r| ip(r)) {
            if r.is_ipv4() == addr.vip.is_ipv4() {
                b.set_link(r, Some(link(real_mac(r)))).unwrap();
                cfg.reals.push(RealConfig {
                    port: 8080,
                    ..RealConfig::new(r, 100)
                });
            }
        }
        b.add_service(cfg).unwrap();
    }
    let (mut corpus, mut replies) = (Vec::new(), Vec::new());
    for (i, (service, _)) in NAT_SERVICES.iter().enumerate() {
        let addr: ServiceAddr = service.parse().unwrap();
        let client = if addr.vip.is_ipv4() { CLIENT4 } else { CLIENT6 };
        let vip = addr.vip.to_string();
        let sport = 41000 + i as u16;
        let request = |flags| match addr.proto {
            xlb::config::Proto::Tcp => Frame::tcp(client, &vip, sport, addr.port, flags),
            xlb::config::Proto::Udp => Frame {
                payload: b"question".to_vec(),
                ..Frame::udp(client, &vip, sport, addr.port)
            },
        };
        let (verdict, sent) = run_balancer(&mut b, &request(SYN).bytes()).unwrap();
        assert_eq!(verdict, XDP_TX, "{service}");
        let ip = wellformed::ip(&sent).unwrap();
        let l4 = ip.l3 + ip.header_len;
        let (to, from) = (be16(&sent[l4 + 2..l4 + 4]), be16(&sent[l4..l4 + 2]));
        replies.push((ip.dst, to, ip.src, from, addr.proto.number()));
        let reply = |dport: u16| {
            let f = Frame {
                src: ip.dst,
                dst: ip.src,
                sport: to,
                dport,
                payload: b"answer".to_vec(),
                ..request(ACK)
            };
            let mut bytes = f.bytes();
            bytes[6..12].copy_from_slice(&real_mac(ip.dst));
            bytes
        };
        corpus.push(request(ACK).bytes());
        corpus.push(reply(from));
        corpus.push(reply(from.wrapping_add(1)));
        // ICMP errors about the flow: from the real's side about the request as the real got
        // it, and from the client's side about a reply as the client got it.
        let router = if addr.vip.is_ipv4() { ROUTER4 } else { ROUTER6 };
        let (kind, rest) = if addr.vip.is_ipv4() {
            (3, [0, 0, 0x05, 0x78])
        } else {
            (2, [0, 0, 0x05, 0x00])
        };
        let mut from_real = Frame::icmp(
            router,
            &ip.src.to_string(),
            kind,
            if addr.vip.is_ipv4() { 4 } else { 0 },
            rest,
            &sent[ip.l3..ip.l3 + ip.len],
        )
        .bytes();
        from_real[6..12].copy_from_slice(&real_mac(ip.dst));
        corpus.push(from_real);
        let seen_by_client = Frame {
            src: addr.vip,
            sport: addr.port,
            dst: request(ACK).src,
            dport: sport,
            ..request(ACK)
        }
        .bytes();
        let l3 = l2_len(&seen_by_client);
        corpus.push(
            Frame::icmp(
                router,
                &vip,
                kind,
                if addr.vip.is_ipv4() { 4 } else { 0 },
                rest,
                &seen_by_client[l3..],
            )
            .bytes(),
        );
    }
    (b, corpus, replies)
}

/// A frame's (source, source port, destination, destination port, protocol), its L4 header
/// found past IPv4 options and IPv6 extension headers; and whether it is a fragment (whose
/// ports may not be there). None: no IP header.
type Tuple = (IpAddr, u16, IpAddr, u16, u8);

fn tuple_of(f: &[u8]) -> Option<(Tuple, bool)> {
    let (src, dst, proto, l4, fragment) = headers(f)?;
    let ports = f.get(l4..l4 + 4);
    let (sport, dport) = ports.map_or((0, 0), |p| (be16(&p[..2]), be16(&p[2..])));
    Some(((src, sport, dst, dport, proto), fragment || ports.is_none()))
}

/// The tuple of the packet an ICMP error quotes (None: not an unfragmented ICMP message, or
/// its quote has no whole header and ports).
fn quoted_tuple(f: &[u8]) -> Option<Tuple> {
    let (_, _, proto, l4, fragment) = headers(f)?;
    if fragment || (proto != 1 && proto != 58) {
        return None;
    }
    // The quote as a frame of its own, behind the error's L2 header (one family). A quoted
    // first fragment holds its ports as a whole datagram does: its MF flag is cleared.
    let (l3, v4) = l3_of(f)?;
    let mut quote = f[..l3].to_vec();
    quote.extend_from_slice(f.get(l4 + 8..)?);
    if v4 && quote.len() > l3 + 6 {
        quote[l3 + 6] &= !0x20;
    }
    tuple_of(&quote)
        .filter(|(_, fragment)| !fragment)
        .map(|(t, _)| t)
}

/// A frame's addresses, protocol, L4 offset and whether it is a fragment.
fn headers(f: &[u8]) -> Option<(IpAddr, IpAddr, u8, usize, bool)> {
    let (l3, v4) = l3_of(f)?;
    let (src, dst, mut proto, mut l4, mut fragment) = if v4 {
        let h = f.get(l3..l3 + 20)?;
        let frag = be16(&h[6..8]);
        let ihl = (h[0] & 0x0f) as usize * 4;
        (
            addr(&h[12..16]),
            addr(&h[16..20]),
            h[9],
            l3 + ihl,
            frag & 0x3fff != 0,
        )
    } else {
        let h = f.get(l3..l3 + 40)?;
        (addr(&h[8..24]), addr(&h[24..40]), h[6], l3 + 40, false)
    };
    if !v4 {
        for _ in 0..8 {
            match proto {
                0 | 43 | 60 => {
                    let h = f.get(l4..l4 + 2)?;
                    proto = h[0];
                    l4 += (h[1] as usize + 1) * 8;
                }
                44 => {
                    let h = f.get(l4..l4 + 8)?;
                    proto = h[0];
                    // An atomic fragment (offset 0, no more) is a whole datagram (RFC 6946).
                    fragment = be16(&h[2..4]) >> 3 != 0 || h[3] & 1 != 0;
                    l4 += 8;
                }
                _ => break,
            }
        }
    }
    Some((src, dst, proto, l4, fragment))
}

fn is_real(a: IpAddr) -> bool {
    DR_REALS.iter().any(|r| ip(r) == a)
}

/// Whether the NAT director may change (or drop) the frame, by the documented rules: a frame
/// to a NAT VIP, a reply whose tuple is a flow's the director started (a fragment from a real
/// may be one too), or an ICMP error about a request of such a flow. Everything else passes
/// untouched, a reply that matches no flow included.
fn nat_may_act(f: &[u8], replies: &[Tuple]) -> bool {
    let Some(((src, sport, dst, dport, proto), fragment)) = tuple_of(f) else {
        return false;
    };
    if NAT_VIPS.iter().any(|v| ip(v) == dst) {
        return true;
    }
    if let Some((qsrc, qsport, qdst, qdport, qproto)) = quoted_tuple(f)
        && replies.contains(&(qdst, qdport, qsrc, qsport, qproto))
    {
        return true;
    }
    if fragment {
        return is_real(src);
    }
    replies.contains(&(src, sport, dst, dport, proto))
}

/// The NAT director's properties: never aborted; passed frames untouched, and every frame the
/// rules leave alone passed; a sent frame as long as it came, with a right IPv4 header
/// checksum, and right TCP/UDP checksums whenever the input's were. A request sent to a real
/// starts a flow whose replies the director may translate from then on (`replies` learns it).
fn nat_case(
    b: &mut Balancer,
    replies: &mut Vec<Tuple>,
    input: &[u8],
) -> Result<&'static str, String> {
    let (verdict, out) = run_balancer(b, input)?;
    let fail = |e: String| {
        format!(
            "{e}\n  verdict {}\n  input  {}\n  output {}",
            verdict_name(verdict),
            hex(input),
            hex(&out)
        )
    };
    match verdict {
        XDP_PASS if out != input => Err(fail("passed, but changed".into())),
        XDP_PASS => Ok("passed"),
        _ if !nat_may_act(input, replies) => Err(fail("not for NAT, but not passed".into())),
        XDP_DROP => Ok("dropped"),
        XDP_TX => {
            if out.len() != input.len() {
                return Err(fail("sent with another length".into()));
            }
            // A fragment's L4 checksum covers the whole datagram: only its IP header is
            // checked here.
            let whole = tuple_of(input).is_some_and(|(_, fragment)| !fragment);
            let checked = |f: &[u8]| {
                let ip = wellformed::ip(f)?;
                if whole {
                    wellformed::l4_checksum(f, &ip)?;
                }
                Ok::<(), String>(())
            };
            if checked(input).is_ok() {
                checked(&out).map_err(|e| fail(format!("sent: {e}")))?;
            }
            if let Some(((src, sport, dst, dport, proto), _)) = tuple_of(&out)
                && is_real(dst)
            {
                replies.push((dst, dport, src, sport, proto));
            }
            Ok("sent")
        }
        v => Err(fail(format!("verdict {}", verdict_name(v)))),
    }
}

#[test]
fn nat_director_on_mutated_corpus_frames() {
    let (mut b, corpus, mut replies) = nat_director();
    // The corpus takes its paths: requests, replies and errors about them sent, the stray
    // replies passed.
    for (i, frame) in corpus.iter().enumerate() {
        let (verdict, _) = run_balancer(&mut b, frame).unwrap();
        let want = if i % 5 == 2 { XDP_PASS } else { XDP_TX };
        assert_eq!(verdict, want, "corpus frame {i}: {}", hex(frame));
        nat_case(&mut b, &mut replies, frame).unwrap();
    }
    let state = RefCell::new((b, replies));
    fuzz(
        "nat_director_on_mutated_corpus_frames",
        0.1,
        mutated(corpus),
        |m| {
            let (b, replies) = &mut *state.borrow_mut();
            nat_case(b, replies, &m.frame)
        },
    );
}
