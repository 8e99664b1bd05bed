//! Packet tests of TUN for real fabrics: GUE (over IPv4 and IPv6) and IPv4 services over IPv6
//! reals (4in6, bare and in GUE). The director's output is compared byte for byte with frames
//! built by tests/src/lib.rs (`tunnel_header`, which sums GUE's UDP checksum over every byte,
//! independently of the program's header-only sum); the decapsulator must give back the
//! original frame; "too big" advertises the MTU less each encapsulation's overhead; a GUE
//! real's refusal comes back in bare IP-in-IP and the director re-schedules it in GUE.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener};

use lb_common::{DEFAULT_GUE_PORT, Decap, Global, VIP_F_GUE, VIP_F_REFUSE, VipValue};
use xlb::{
    config::{Encap, Mode, RealConfig, ServiceAddr, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
    netlink::Mac,
    realserver::Decapsulator,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const SRC4: &str = "198.18.0.2";
const SRC6: &str = "fd00:18::2";
const REALS4: [&str; 3] = ["198.18.2.11", "198.18.2.12", "198.18.2.13"];
const REALS6: [&str; 3] = ["fd00:18:2::11", "fd00:18:2::12", "fd00:18:2::13"];
const NEXT_HOP_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
const REAL_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
const RING: u32 = 65537;
const MTU: u32 = 1500;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// A TUN service over `reals` behind `NEXT_HOP_MAC`; `tunnel_src` decides the outer family.
fn service(
    svc: &str,
    reals: &[&str],
    tunnel_src: Option<&str>,
    encap: Encap,
    gue_port: Option<u16>,
) -> (Balancer, ServiceAddr) {
    let mut b = balancer();
    b.set_default_tunnel_sources(Some(SRC4.parse().unwrap()), Some(SRC6.parse().unwrap()));
    let addr: ServiceAddr = svc.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.mode = Mode::Tun;
    cfg.tunnel_src = tunnel_src.map(ip);
    cfg.encap = encap;
    cfg.gue_port = gue_port;
    for r in reals {
        b.set_link(ip(r), Some(link(NEXT_HOP_MAC))).unwrap();
        cfg.reals.push(RealConfig::new(ip(r), 100));
    }
    b.add_service(cfg).unwrap();
    (b, addr)
}

fn run(b: &mut Balancer, frame: &[u8]) -> (u32, Vec<u8>) {
    b.dataplane().test_run(BALANCER_PROGRAM, frame).unwrap()
}

fn global(b: &mut Balancer, which: Global) -> u64 {
    b.dataplane().global_counter(which).unwrap()
}

fn tos_of(l3: &[u8]) -> u8 {
    if l3[0] >> 4 == 4 {
        l3[1]
    } else {
        l3[0] << 4 | l3[1] >> 4
    }
}

/// The tunnel frame for `frame` from `src` to `real` (its family is the outer one), in GUE to
/// `gue_port` if given, between the given MACs. The IPv6 flow label and GUE source port come
/// from `hash`.
fn wrapped(
    frame: &[u8],
    src: IpAddr,
    real: IpAddr,
    hash: u32,
    gue_port: Option<u16>,
    macs: (Mac, Mac),
) -> Vec<u8> {
    let l2 = l2_len(frame);
    let l3 = &frame[l2..];
    let inner = &l3[..ip_len(l3)];
    let label = if real.is_ipv6() { hash & 0xf_ffff } else { 0 };
    let gue = gue_port.map(|p| (gue_sport(hash), p));
    let outer = tunnel_header(src, real, tos_of(l3), label, inner, gue);
    let mut out = encapsulate(frame, macs.0, macs.1, &outer);
    set_ether_type(
        &mut out,
        if real.is_ipv6() {
            ETH_P_IPV6
        } else {
            ETH_P_IPV4
        },
    );
    out
}

fn from_director(frame: &[u8], src: &str, real: IpAddr, hash: u32, gue: Option<u16>) -> Vec<u8> {
    wrapped(
        frame,
        ip(src),
        real,
        hash,
        gue,
        (NEXT_HOP_MAC, DIRECTOR_MAC),
    )
}

struct Case {
    name: &'static str,
    frame: Frame,
    /// GUE over IPv6 without a checksum: the inner packet is no whole segment.
    zero_udp_checksum: bool,
}

fn case(name: &'static str, frame: Frame) -> Case {
    Case {
        name,
        frame,
        zero_udp_checksum: false,
    }
}

fn cases4() -> Vec<Case> {
    vec![
        case(
            "tcp syn, DF, DSCP and ECN copied",
            Frame {
                tos: 0xb9,
                df: true,
                ..Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN)
            },
        ),
        case(
            "udp with payload",
            Frame {
                payload: (0..301).map(|i| i as u8).collect(),
                ..Frame::udp(CLIENT4, VIP4, 40001, 80)
            },
        ),
        case(
            "vlan tagged, ip options",
            Frame {
                vlan: Some(42),
                ipv4_options: vec![7, 7, 4, 0, 0, 0, 0, 0],
                ..Frame::tcp(CLIENT4, VIP4, 40002, 80, ACK)
            },
        ),
        Case {
            name: "first fragment: hashed without ports",
            frame: Frame {
                fragment: Some((7, 0, true)),
                ..Frame::udp(CLIENT4, VIP4, 40003, 80)
            },
            zero_udp_checksum: true,
        },
    ]
}

fn cases6() -> Vec<Case> {
    vec![
        case(
            "tcp syn, traffic class copied",
            Frame {
                tos: 0x2a,
                ..Frame::tcp(CLIENT6, VIP6, 40000, 80, SYN)
            },
        ),
        case(
            "udp, odd payload",
            Frame {
                payload: (0..77).map(|i| i as u8).collect(),
                ..Frame::udp(CLIENT6, VIP6, 40001, 80)
            },
        ),
        case(
            "vlan tagged",
            Frame {
                vlan: Some(7),
                ..Frame::tcp(CLIENT6, VIP6, 40002, 80, ACK)
            },
        ),
        Case {
            name: "extension header: summed as zero",
            frame: Frame {
                ipv6_ext: vec![60],
                ..Frame::tcp(CLIENT6, VIP6, 40003, 80, SYN)
            },
            zero_udp_checksum: true,
        },
    ]
}

/// Runs every case through a fresh service and compares the output with `from_director`.
fn check_cases(
    svc: &str,
    reals: &[&str],
    tunnel_src: Option<&str>,
    src: &str,
    gue: Option<u16>,
    cases: Vec<Case>,
) {
    for c in cases {
        let encap = if gue.is_some() {
            Encap::Gue
        } else {
            Encap::Ipip
        };
        let explicit_port = gue.filter(|p| *p != DEFAULT_GUE_PORT);
        let (mut b, _) = service(svc, reals, tunnel_src, encap, explicit_port);
        let input = c.frame.bytes();
        let hash = five_tuple_hash(&c.frame, c.frame.fragment.is_none());
        let real = predict(&equal_weight(reals), RING, hash);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{svc} {}: verdict", c.name);
        let outer = outer_hash(&c.frame, c.frame.fragment.is_none());
        let mut expected = from_director(&input, src, real, outer, gue);
        let l2 = l2_len(&input);
        let ip_len = if real.is_ipv6() { 40 } else { 20 };
        if gue.is_some() && real.is_ipv6() {
            let at = l2 + 40 + 6;
            if c.zero_udp_checksum {
                expected[at..at + 2].copy_from_slice(&[0, 0]);
            } else {
                assert_ne!(out[at..at + 2], [0, 0], "{svc} {}: a checksum", c.name);
            }
        }
        assert_eq!(out, expected, "{svc} {}: frame", c.name);
        // What the expected frame claims, on the output itself.
        if real.is_ipv4() {
            assert_eq!(checksum(&out[l2..l2 + 20]), 0, "{}: outer checksum", c.name);
        }
        if let Some(port) = gue {
            let udp = &out[l2 + ip_len..l2 + ip_len + 8];
            assert_eq!(
                u16::from_be_bytes([udp[0], udp[1]]) >> 14,
                0b11,
                "ephemeral"
            );
            assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), port);
            if real.is_ipv4() {
                assert_eq!(&udp[6..8], &[0, 0], "{}: zero checksum over IPv4", c.name);
            }
        }
        let overhead = ip_len + if gue.is_some() { 8 } else { 0 };
        assert_eq!(
            &out[l2 + overhead..],
            &input[l2..],
            "{}: inner untouched",
            c.name
        );
    }
}

#[test]
fn gue_over_ipv4_has_an_exact_outer_header_and_a_zero_udp_checksum() {
    check_cases(
        "198.18.0.100:80/tcp",
        &REALS4,
        None,
        SRC4,
        Some(DEFAULT_GUE_PORT),
        cases4()
            .into_iter()
            .filter(|c| c.frame.proto() == 6)
            .collect(),
    );
    check_cases(
        "198.18.0.100:80/udp",
        &REALS4,
        Some("198.18.0.3"),
        "198.18.0.3",
        Some(9999),
        cases4()
            .into_iter()
            .filter(|c| c.frame.proto() == 17)
            .collect(),
    );
}

#[test]
fn gue_over_ipv6_carries_a_udp_checksum_summed_from_the_headers() {
    check_cases(
        "[fd00:18::100]:80/tcp",
        &REALS6,
        None,
        SRC6,
        Some(DEFAULT_GUE_PORT),
        cases6()
            .into_iter()
            .filter(|c| c.frame.proto() == 6)
            .collect(),
    );
    check_cases(
        "[fd00:18::100]:80/udp",
        &REALS6,
        None,
        SRC6,
        Some(DEFAULT_GUE_PORT),
        cases6()
            .into_iter()
            .filter(|c| c.frame.proto() == 17)
            .collect(),
    );
}

#[test]
fn ipv4_services_reach_ipv6_reals_in_4in6() {
    for gue in [None, Some(DEFAULT_GUE_PORT)] {
        for proto in [6, 17] {
            let svc = if proto == 6 {
                "198.18.0.100:80/tcp"
            } else {
                "198.18.0.100:80/udp"
            };
            check_cases(
                svc,
                &REALS6,
                Some(SRC6),
                SRC6,
                gue,
                cases4()
                    .into_iter()
                    .filter(|c| c.frame.proto() == proto)
                    .collect(),
            );
        }
    }
}

#[test]
fn gue_source_ports_spread_flows_where_ipip_headers_are_all_alike() {
    let (mut b, _) = service("198.18.0.100:80/tcp", &REALS4[..1], None, Encap::Gue, None);
    let (mut ipip, _) = service("198.18.0.100:80/tcp", &REALS4[..1], None, Encap::Ipip, None);
    let mut ports = std::collections::BTreeSet::new();
    let mut outer = std::collections::BTreeSet::new();
    for sport in 30000..30064 {
        let f = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes();
        let (_, out) = run(&mut b, &f);
        ports.insert(u16::from_be_bytes([out[34], out[35]]));
        let (_, out) = run(&mut ipip, &f);
        outer.insert(out[14..34].to_vec());
    }
    assert_eq!(outer.len(), 1, "IPIP: one outer header for every flow");
    assert!(
        ports.len() > 60,
        "GUE: {} source ports for 64 flows",
        ports.len()
    );
}

/// A too-big case: service, reals, tunnel source, GUE port, largest inner datagram that fits.
type TooBigCase = (
    &'static str,
    &'static [&'static str],
    Option<&'static str>,
    Option<u16>,
    usize,
);

fn too_big_cases() -> Vec<TooBigCase> {
    vec![
        ("198.18.0.100:80/tcp", &REALS4, None, Some(6080), 1500 - 28),
        (
            "[fd00:18::100]:80/tcp",
            &REALS6,
            None,
            Some(6080),
            1500 - 48,
        ),
        ("198.18.0.100:80/tcp", &REALS6, Some(SRC6), None, 1500 - 40),
        (
            "198.18.0.100:80/tcp",
            &REALS6,
            Some(SRC6),
            Some(6080),
            1500 - 48,
        ),
    ]
}

/// A frame whose IP datagram is exactly `l3_len` bytes.
fn sized(frame: Frame, l3_len: usize) -> Frame {
    let headers = if frame.src.is_ipv4() { 20 } else { 40 } + 20;
    Frame {
        payload: (0..l3_len - headers).map(|i| i as u8).collect(),
        ..frame
    }
}

#[test]
fn too_big_counts_each_encapsulations_overhead() {
    const QUOTE: usize = 512;
    for (svc, reals, tunnel_src, gue, fits) in too_big_cases() {
        let encap = if gue.is_some() {
            Encap::Gue
        } else {
            Encap::Ipip
        };
        let (mut b, _) = service(svc, reals, tunnel_src, encap, None);
        b.set_mtu(MTU).unwrap();
        let v4 = svc.starts_with("198");
        let (client, vip) = if v4 { (CLIENT4, VIP4) } else { (CLIENT6, VIP6) };
        let base = Frame {
            df: true,
            ..Frame::tcp(client, vip, 40100, 80, ACK)
        };
        let (verdict, out) = run(&mut b, &sized(base.clone(), fits).bytes());
        assert_eq!(verdict, XDP_TX, "{svc} {gue:?}: {fits} fits");
        assert_eq!(out.len(), 14 + MTU as usize, "{svc} {gue:?}: a full frame");

        let input = sized(base, fits + 1).bytes();
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{svc} {gue:?}: answered");
        let mut expected = CLIENT_MAC.to_vec();
        expected.extend_from_slice(&DIRECTOR_MAC);
        if v4 {
            let mut h = vec![0x45, 0xc0];
            h.extend_from_slice(&((20 + 8 + QUOTE) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
            h.extend_from_slice(&[198, 18, 0, 100, 198, 18, 1, 1]);
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut icmp = vec![3, 4, 0, 0, 0, 0];
            icmp.extend_from_slice(&(fits as u16).to_be_bytes());
            icmp.extend_from_slice(&input[14..14 + QUOTE]);
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            expected.extend_from_slice(&[0x08, 0x00]);
            expected.extend_from_slice(&h);
            expected.extend_from_slice(&icmp);
        } else {
            let mut icmp = vec![2, 0, 0, 0];
            icmp.extend_from_slice(&(fits as u32).to_be_bytes());
            icmp.extend_from_slice(&input[14..14 + QUOTE]);
            let sum = icmpv6_checksum(ip(VIP6), ip(CLIENT6), &icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            expected.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            expected.extend_from_slice(&((8 + QUOTE) as u16).to_be_bytes());
            expected.extend_from_slice(&[58, 64]);
            expected.extend_from_slice(&VIP6.parse::<Ipv6Addr>().unwrap().octets());
            expected.extend_from_slice(&CLIENT6.parse::<Ipv6Addr>().unwrap().octets());
            expected.extend_from_slice(&icmp);
        }
        assert_eq!(
            out, expected,
            "{svc} {gue:?}: too-big reply advertises {fits}"
        );
        assert_eq!(global(&mut b, Global::IcmpTooBigSent), 1);
    }
}

// --- The real server's side --------------------------------------------------------------

fn decap(gue_port: u16) -> Decapsulator {
    let mut d = decapsulator();
    d.add_vip(ip(VIP4)).unwrap();
    d.add_vip(ip(VIP6)).unwrap();
    d.set_gue_port(gue_port).unwrap();
    d
}

/// The frame a router delivers to the real: `inner` tunnelled from the director.
fn at_real(inner: &[u8], outer_src: &str, real: &str, gue: Option<u16>, hash: u32) -> Vec<u8> {
    wrapped(
        inner,
        ip(outer_src),
        ip(real),
        hash,
        gue,
        (REAL_MAC, NEXT_HOP_MAC),
    )
}

/// What the stack must get: the inner frame behind the tunnel frame's MACs.
fn unwrapped(inner: &[u8]) -> Vec<u8> {
    let mut out = inner.to_vec();
    out[..6].copy_from_slice(&REAL_MAC);
    out[6..12].copy_from_slice(&NEXT_HOP_MAC);
    out
}

#[test]
fn the_decapsulator_unwraps_gue_and_4in6_back_to_the_original_frame() {
    let mut d = decap(DEFAULT_GUE_PORT);
    let inner4 = Frame {
        tos: 0x10,
        vlan: Some(3),
        ..Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN)
    }
    .bytes();
    let inner4_plain = Frame::udp(CLIENT4, VIP4, 40001, 53).bytes();
    let inner6 = Frame::tcp(CLIENT6, VIP6, 40002, 443, ACK).bytes();
    // (name, inner frame, outer source, real, GUE port)
    type Case<'a> = (&'a str, &'a [u8], &'a str, &'a str, Option<u16>);
    let cases: [Case; 6] = [
        ("gue v4 in v4, vlan", &inner4, SRC4, REALS4[0], Some(6080)),
        ("gue v4 in v4", &inner4_plain, SRC4, REALS4[0], Some(6080)),
        ("gue v6 in v6", &inner6, SRC6, REALS6[0], Some(6080)),
        ("4in6", &inner4_plain, SRC6, REALS6[0], None),
        ("4in6, vlan", &inner4, SRC6, REALS6[0], None),
        ("gue v4 in v6", &inner4_plain, SRC6, REALS6[0], Some(6080)),
    ];
    for (n, (name, inner, src, real, gue)) in cases.into_iter().enumerate() {
        let frame = at_real(inner, src, real, gue, 0x12345);
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(out, unwrapped(inner), "{name}: the original frame");
        assert_eq!(d.counter(Decap::Decapsulated).unwrap(), n as u64 + 1);
    }
}

#[test]
fn udp_that_is_not_gue_for_a_vip_passes_untouched() {
    let inner = Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN).bytes();
    // GUE not set up: UDP to 6080 is ordinary UDP.
    let mut off = decap(0);
    let frame = at_real(&inner, SRC4, REALS4[0], Some(6080), 1);
    assert_eq!(off.test_run(&frame).unwrap(), (XDP_PASS, frame.clone()));
    // Another port than the one set up.
    let mut d = decap(7777);
    assert_eq!(d.test_run(&frame).unwrap(), (XDP_PASS, frame.clone()));
    // GUE for an address that is no VIP here: counted, untouched.
    let other = Frame::tcp(CLIENT4, "198.18.0.200", 40000, 80, SYN).bytes();
    let frame = at_real(&other, SRC4, REALS4[0], Some(7777), 1);
    assert_eq!(d.test_run(&frame).unwrap(), (XDP_PASS, frame.clone()));
    assert_eq!(d.counter(Decap::Refused).unwrap(), 1);
    // GUE variant 0 (a GUE header before the payload): not what the director sends.
    let mut variant0 = at_real(&inner, SRC4, REALS4[0], Some(7777), 1);
    variant0[14 + 28] = 0x00;
    assert_eq!(d.test_run(&variant0).unwrap(), (XDP_PASS, variant0.clone()));
    assert_eq!(d.counter(Decap::Malformed).unwrap(), 1);
    // Cut short anywhere: passed, never aborted.
    let frame = at_real(&inner, SRC6, REALS6[0], Some(7777), 1);
    for len in 14..frame.len() {
        assert_eq!(
            d.test_run(&frame[..len]).unwrap().0,
            XDP_PASS,
            "cut at {len}"
        );
    }
    // Those whose inner header is whole are unwrapped (the stack then drops what is short).
    let whole = frame.len() - (14 + 48 + 20);
    assert_eq!(d.counter(Decap::Decapsulated).unwrap(), whole as u64);
}

#[test]
fn what_the_director_sends_in_gue_or_4in6_the_decapsulator_restores() {
    for (svc, reals, tunnel_src, encap, frame) in [
        (
            "198.18.0.100:80/tcp",
            &REALS4,
            None,
            Encap::Gue,
            Frame::tcp(CLIENT4, VIP4, 1234, 80, SYN),
        ),
        (
            "[fd00:18::100]:80/tcp",
            &REALS6,
            None,
            Encap::Gue,
            Frame::tcp(CLIENT6, VIP6, 1234, 80, SYN),
        ),
        (
            "198.18.0.100:80/tcp",
            &REALS6,
            Some(SRC6),
            Encap::Ipip,
            Frame::tcp(CLIENT4, VIP4, 1234, 80, SYN),
        ),
        (
            "198.18.0.100:80/tcp",
            &REALS6,
            Some(SRC6),
            Encap::Gue,
            Frame {
                vlan: Some(9),
                ..Frame::tcp(CLIENT4, VIP4, 1234, 80, SYN)
            },
        ),
    ] {
        let (mut b, _) = service(svc, reals, tunnel_src, encap, None);
        let mut d = decap(DEFAULT_GUE_PORT);
        let input = frame.bytes();
        let (verdict, tunnel) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX);
        let (verdict, out) = d.test_run(&tunnel).unwrap();
        assert_eq!(verdict, XDP_PASS, "{svc} {encap:?}");
        let mut expected = input.clone();
        expected[..6].copy_from_slice(&NEXT_HOP_MAC);
        expected[6..12].copy_from_slice(&DIRECTOR_MAC);
        assert_eq!(out, expected, "{svc} {encap:?}");
    }
}

/// A port nobody listens on in this namespace: bound, then released.
fn free_port() -> u16 {
    let t = TcpListener::bind("[::]:0").unwrap();
    let port = t.local_addr().unwrap().port();
    drop(t);
    port
}

#[test]
fn a_gue_real_refuses_in_bare_ip_in_ip_and_the_director_reschedules_in_gue() {
    for (svc, vip, client, reals, tunnel_src, src) in [
        ("198.18.0.100:0/tcp", VIP4, CLIENT4, &REALS4, None, SRC4),
        ("[fd00:18::100]:0/tcp", VIP6, CLIENT6, &REALS6, None, SRC6),
        (
            "198.18.0.100:0/tcp",
            VIP4,
            CLIENT4,
            &REALS6,
            Some(SRC6),
            SRC6,
        ),
    ] {
        let (mut b, _) = service(svc, reals, tunnel_src, Encap::Gue, None);
        let port = free_port();
        let f = Frame::tcp(client, vip, 40000, port, SYN);
        let input = f.bytes();
        let hash = five_tuple_hash(&f, true);
        let first = predict(&equal_weight(reals), RING, hash);
        let (verdict, sent) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX);

        // The real: GUE in, no listener on the port: back to the director without the UDP
        // header, outer addresses and MACs swapped, TTL renewed.
        let mut d = decapsulator();
        let mut value = VipValue {
            flags: VIP_F_REFUSE | VIP_F_GUE,
            ..VipValue::default()
        };
        value.real_addr[..4].copy_from_slice(&[198, 18, 2, 11]);
        d.add_vip_with(ip(vip), value).unwrap();
        d.set_gue_port(DEFAULT_GUE_PORT).unwrap();
        let mut at_real = sent.clone();
        at_real[..6].copy_from_slice(&REAL_MAC);
        at_real[6..12].copy_from_slice(&NEXT_HOP_MAC);
        let (verdict, refusal) = d.test_run(&at_real).unwrap();
        assert_eq!(verdict, XDP_TX, "{svc}: refused");
        // The real keeps the director's outer header, addresses swapped: its flow label too.
        let expected = wrapped(
            &input,
            first,
            ip(src),
            outer_hash(&f, true),
            None,
            (NEXT_HOP_MAC, REAL_MAC),
        );
        assert_eq!(
            refusal, expected,
            "{svc}: bare IP-in-IP back to the director"
        );
        assert_eq!(d.counter(Decap::Refusal).unwrap(), 1);

        // The director: from the flow's real, so re-scheduled, and sent on in GUE.
        let mut back = refusal.clone();
        back[..6].copy_from_slice(&DIRECTOR_MAC);
        let next = predict_other(&equal_weight(reals), RING, hash, first).unwrap();
        let (verdict, out) = run(&mut b, &back);
        assert_eq!(verdict, XDP_TX, "{svc}: re-scheduled");
        assert_eq!(
            out,
            from_director(
                &input,
                src,
                next,
                outer_hash(&f, true),
                Some(DEFAULT_GUE_PORT)
            ),
            "{svc}: in GUE to the next real"
        );
        assert_eq!(global(&mut b, Global::RefusalRescheduled), 1);
    }
}

#[test]
fn services_that_cannot_be_tunnelled_are_refused_with_one_line() {
    let mut b = balancer();
    b.set_default_tunnel_sources(Some(SRC4.parse().unwrap()), Some(SRC6.parse().unwrap()));
    let cfg = |svc: &str, src: Option<&str>, encap: Encap, real: &str| {
        let mut c = ServiceConfig::new(svc.parse().unwrap());
        c.mode = Mode::Tun;
        c.tunnel_src = src.map(ip);
        c.encap = encap;
        c.reals.push(RealConfig::new(ip(real), 100));
        c
    };
    for (c, why) in [
        (
            cfg("[fd00:18::100]:80/tcp", Some(SRC4), Encap::Ipip, REALS4[0]),
            "IPv6 service cannot be tunnelled over IPv4",
        ),
        (
            cfg("198.18.0.100:80/tcp", None, Encap::Gue, REALS6[0]),
            "tunnels over IPv4, so its reals must be IPv4",
        ),
        (
            cfg("198.18.0.100:80/tcp", Some(SRC6), Encap::Gue, REALS4[0]),
            "tunnels over IPv6, so its reals must be IPv6",
        ),
        (
            ServiceConfig {
                encap: Encap::Gue,
                ..ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap())
            },
            "--encap gue needs --mode tun",
        ),
        (
            ServiceConfig {
                gue_port: Some(7000),
                ..cfg("198.18.0.100:80/tcp", None, Encap::Ipip, REALS4[0])
            },
            "a GUE port needs --encap gue",
        ),
    ] {
        let err = format!("{:#}", b.add_service(c).unwrap_err());
        assert!(err.contains(why), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        assert!(b.config().services.is_empty());
    }
}

#[test]
fn a_tunnel_source_prefix_gives_each_flow_an_outer_source() {
    for (svc, reals, prefix, bits) in [
        ("198.18.0.100:80/tcp", &REALS4, "198.18.0.16/28", 4),
        ("[fd00:18::100]:80/tcp", &REALS6, "fd00:18::1:0/116", 12),
        ("198.18.0.100:80/tcp", &REALS6, "fd00:18::2:0/120", 8),
    ] {
        let mut b = balancer();
        let addr: ServiceAddr = svc.parse().unwrap();
        let mut cfg = ServiceConfig::new(addr);
        cfg.mode = Mode::Tun;
        cfg.tunnel_src_prefix = Some(prefix.parse().unwrap());
        for r in reals.iter() {
            b.set_link(ip(r), Some(link(NEXT_HOP_MAC))).unwrap();
            cfg.reals.push(RealConfig::new(ip(r), 100));
        }
        b.add_service(cfg).unwrap();
        let base = ip(prefix.split_once('/').unwrap().0);
        let (client, vip) = if svc.starts_with('[') {
            (CLIENT6, VIP6)
        } else {
            (CLIENT4, VIP4)
        };
        let mut sources = std::collections::BTreeSet::new();
        for sport in 20000..20064 {
            let f = Frame::tcp(client, vip, sport, 80, SYN);
            let input = f.bytes();
            let hash = five_tuple_hash(&f, true);
            let real = predict(&equal_weight(reals), RING, hash);
            let hash = outer_hash(&f, true);
            let src = match base {
                IpAddr::V4(a) => {
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) | (hash & ((1 << bits) - 1))))
                }
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                    u128::from(a) | (hash & ((1 << bits) - 1)) as u128,
                )),
            };
            let (verdict, out) = run(&mut b, &input);
            assert_eq!(verdict, XDP_TX);
            let expected = wrapped(&input, src, real, hash, None, (NEXT_HOP_MAC, DIRECTOR_MAC));
            assert_eq!(out, expected, "{svc} {prefix} sport {sport}");
            sources.insert(src);
        }
        assert!(sources.len() > 10, "{prefix}: {} sources", sources.len());
    }
    // One line for what cannot be.
    for (bad, why) in [
        ("198.18.0.0/12", "host bits"),
        ("198.18.0.1/28", "host bits set"),
        ("198.18.0.0", "expected ADDR/LEN"),
        ("fd00::/64", "host bits"),
    ] {
        let err = format!(
            "{:#}",
            bad.parse::<xlb::config::TunnelPrefix>().unwrap_err()
        );
        assert!(err.contains(why) && !err.contains('\n'), "{bad}: {err}");
    }
    let mut both = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
    both.mode = Mode::Tun;
    both.tunnel_src = Some(ip(SRC4));
    both.tunnel_src_prefix = Some("198.18.0.16/28".parse().unwrap());
    let err = format!("{:#}", balancer().add_service(both).unwrap_err());
    assert!(err.contains("not both"), "{err}");
}
