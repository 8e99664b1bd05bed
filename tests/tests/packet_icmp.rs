//! Packet tests of ICMP errors to a VIP: a router between a real and its client answers the
//! real's packet (VIP:port -> client:port) with an error addressed to the VIP, which reaches the
//! director. The compiled program must send it to the real that serves the quoted flow (DR:
//! MAC rewrite; TUN: encapsulated), as that flow's own packets go, and pass everything else.

use std::net::IpAddr;

use lb_common::Global;
use xlb::{
    config::{Mode, RealConfig, ServiceAddr, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
    netlink::Mac,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
/// A router on the path from the reals to the clients.
const ROUTER4: &str = "198.18.2.1";
const ROUTER6: &str = "fd00:18:2::1";
const DEFAULT_SRC4: &str = "198.18.0.2";
const DEFAULT_SRC6: &str = "fd00:18::2";
const NEXT_HOP_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
const RING: u32 = 65537;

/// (type, code, last four header bytes) of the errors a router sends.
const ERRORS4: [(u8, u8, [u8; 4]); 3] = [
    (3, 4, [0, 0, 0x05, 0x78]), // fragmentation needed, next-hop MTU 1400
    (3, 3, [0; 4]),             // port unreachable
    (11, 0, [0; 4]),            // time exceeded in transit
];
const ERRORS6: [(u8, u8, [u8; 4]); 3] = [
    (2, 0, [0, 0, 0x05, 0x00]), // packet too big, MTU 1280
    (1, 4, [0; 4]),             // port unreachable
    (3, 0, [0; 4]),             // hop limit exceeded
];

struct Family {
    vip: &'static str,
    client: &'static str,
    router: &'static str,
    service: &'static str,
    /// DR reals, on the director's link.
    reals: [&'static str; 5],
    /// TUN reals, behind a router.
    tun_reals: [&'static str; 5],
    errors: [(u8, u8, [u8; 4]); 3],
    tunnel_src: &'static str,
}

const V4: Family = Family {
    vip: VIP4,
    client: CLIENT4,
    router: ROUTER4,
    service: "198.18.0.100:80/tcp",
    reals: [
        "198.18.0.11",
        "198.18.0.12",
        "198.18.0.13",
        "198.18.0.14",
        "198.18.0.15",
    ],
    tun_reals: [
        "198.19.1.11",
        "198.19.1.12",
        "198.19.1.13",
        "198.19.1.14",
        "198.19.1.15",
    ],
    errors: ERRORS4,
    tunnel_src: DEFAULT_SRC4,
};

const V6: Family = Family {
    vip: VIP6,
    client: CLIENT6,
    router: ROUTER6,
    service: "[fd00:18::100]:80/tcp",
    reals: [
        "fd00:18::11",
        "fd00:18::12",
        "fd00:18::13",
        "fd00:18::14",
        "fd00:18::15",
    ],
    tun_reals: [
        "fd00:19::11",
        "fd00:19::12",
        "fd00:19::13",
        "fd00:19::14",
        "fd00:19::15",
    ],
    errors: ERRORS6,
    tunnel_src: DEFAULT_SRC6,
};

/// A balancer with one service in `mode` over `reals`. DR reals are on the link (their own
/// MACs), TUN reals behind a router.
fn balancer_with(service: &str, mode: Mode, reals: &[&str]) -> (Balancer, ServiceAddr) {
    let mut b = balancer();
    b.set_default_tunnel_sources(
        Some(DEFAULT_SRC4.parse().unwrap()),
        Some(DEFAULT_SRC6.parse().unwrap()),
    );
    let addr: ServiceAddr = service.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.mode = mode;
    for r in reals {
        b.set_link(ip(r), Some(link(mac_for(mode, ip(r))))).unwrap();
        cfg.reals.push(RealConfig::new(ip(r), 100));
    }
    b.add_service(cfg).unwrap();
    (b, addr)
}

fn mac_for(mode: Mode, real: IpAddr) -> Mac {
    match mode {
        Mode::Dr | Mode::Nat | Mode::Fullnat => real_mac(real),
        Mode::Tun => NEXT_HOP_MAC,
    }
}

fn run(b: &mut Balancer, frame: &[u8]) -> (u32, Vec<u8>) {
    b.dataplane().test_run(BALANCER_PROGRAM, frame).unwrap()
}

fn global(b: &mut Balancer, which: Global) -> u64 {
    b.dataplane().global_counter(which).unwrap()
}

/// The real's packet to the client (what the router quotes), from the service port.
fn reply(f: &Family, client_port: u16) -> Frame {
    Frame {
        payload: vec![0x5a; 200],
        ..Frame::tcp(f.vip, f.client, 80, client_port, ACK)
    }
}

/// The router's error about `quoted`, sent to its source (the VIP), quoting `quote_len` bytes
/// of its IP packet (all of it when longer).
fn error_about(
    f: &Family,
    quoted: &Frame,
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    quote_len: usize,
) -> Frame {
    let bytes = quoted.bytes();
    let ip_packet = &bytes[l2_len(&bytes)..];
    let quote = &ip_packet[..quote_len.min(ip_packet.len())];
    Frame::icmp(f.router, f.vip, icmp_type, code, rest, quote)
}

/// What DR forwarding must produce: only the two MACs differ.
fn dr_rewritten(frame: &[u8], real: IpAddr) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&real_mac(real));
    out[6..12].copy_from_slice(&DIRECTOR_MAC);
    out
}

/// What TUN forwarding must produce: the whole frame encapsulated to `real`.
fn tun_expected(frame: &[u8], src: &str, real: IpAddr, flow_label: u32) -> Vec<u8> {
    let l3 = &frame[l2_len(frame)..];
    let tos = if l3[0] >> 4 == 4 {
        l3[1]
    } else {
        l3[0] << 4 | l3[1] >> 4
    };
    let outer = outer_header(ip(src), real, tos, flow_label, ip_len(l3));
    encapsulate(frame, NEXT_HOP_MAC, DIRECTOR_MAC, &outer)
}

/// A client port whose flow, once the four other reals join, Maglev would put elsewhere than
/// on the first real: only the connection table can keep its errors on the first real.
fn port_that_would_move(f: &Family, reals: &[&str]) -> u16 {
    let after: Vec<(IpAddr, u32)> = reals.iter().map(|r| (ip(r), 100)).collect();
    (40000..41000)
        .find(|p| {
            let syn = Frame::tcp(f.client, f.vip, *p, 80, SYN);
            predict(&after, RING, five_tuple_hash(&syn, true)) != ip(reals[0])
        })
        .unwrap()
}

#[test]
fn errors_about_a_tracked_flow_go_to_its_real_in_dr_mode() {
    for f in [V4, V6] {
        let (mut b, svc) = balancer_with(f.service, Mode::Dr, &f.reals[..1]);
        let port = port_that_would_move(&f, &f.reals);
        let syn = Frame::tcp(f.client, f.vip, port, 80, SYN).bytes();
        assert_eq!(
            run(&mut b, &syn),
            (XDP_TX, dr_rewritten(&syn, ip(f.reals[0])))
        );
        for r in &f.reals[1..] {
            b.add_real(&svc, RealConfig::new(ip(r), 100)).unwrap();
        }
        // Routers may quote only the IP header and 8 bytes (RFC 792), or more.
        for (i, error) in f.errors.iter().enumerate() {
            let ip_header = if f.vip == VIP4 { 20 } else { 40 };
            let quote_len = if i == 0 { ip_header + 8 } else { 512 };
            let input = error_about(&f, &reply(&f, port), *error, quote_len).bytes();
            assert_eq!(
                run(&mut b, &input),
                (XDP_TX, dr_rewritten(&input, ip(f.reals[0]))),
                "{}: error {error:?}",
                f.service
            );
        }
        assert_eq!(global(&mut b, Global::IcmpErrorForwarded), 3);
        assert_eq!(
            global(&mut b, Global::Forwarded),
            1,
            "errors are not client traffic"
        );
        assert_eq!(
            b.dataplane().conns().unwrap().len(),
            1,
            "an error made a flow"
        );
    }
}

#[test]
fn errors_about_an_untracked_flow_go_where_maglev_puts_it_and_create_no_flow() {
    for f in [V4, V6] {
        let reals = &f.reals[..3];
        let (mut b, _) = balancer_with(f.service, Mode::Dr, reals);
        let weights: Vec<(IpAddr, u32)> = reals.iter().map(|r| (ip(r), 100)).collect();
        for (i, port) in (50000..50030).enumerate() {
            let error = f.errors[i % 3];
            let mut icmp = error_about(&f, &reply(&f, port), error, 512);
            // Oddities the outer packet may carry: a VLAN tag, an IPv6 extension header.
            if i % 5 == 1 {
                icmp.vlan = Some(42);
            }
            if i % 5 == 2 && f.vip == VIP6 {
                icmp.ipv6_ext = vec![0];
            }
            let input = icmp.bytes();
            let flow = Frame::tcp(f.client, f.vip, port, 80, SYN);
            let real = predict(&weights, RING, five_tuple_hash(&flow, true));
            assert_eq!(
                run(&mut b, &input),
                (XDP_TX, dr_rewritten(&input, real)),
                "{}: port {port}",
                f.service
            );
        }
        assert!(
            b.dataplane().conns().unwrap().is_empty(),
            "an error made a flow"
        );
        assert_eq!(global(&mut b, Global::IcmpErrorForwarded), 30);
    }
}

#[test]
fn errors_about_a_tracked_flow_go_to_its_real_in_tun_mode() {
    for f in [V4, V6] {
        let reals = f.tun_reals;
        let (mut b, svc) = balancer_with(f.service, Mode::Tun, &reals[..1]);
        let port = port_that_would_move(&f, &reals);
        let flow = Frame::tcp(f.client, f.vip, port, 80, SYN);
        let label = if f.vip == VIP6 {
            outer_hash(&flow, true) & 0xf_ffff
        } else {
            0
        };
        let syn = flow.bytes();
        assert_eq!(
            run(&mut b, &syn),
            (
                XDP_TX,
                tun_expected(&syn, f.tunnel_src, ip(reals[0]), label)
            )
        );
        for r in &reals[1..] {
            b.set_link(ip(r), Some(link(NEXT_HOP_MAC))).unwrap();
            b.add_real(&svc, RealConfig::new(ip(r), 100)).unwrap();
        }
        for error in f.errors {
            let icmp = Frame {
                vlan: Some(7),
                ..error_about(&f, &reply(&f, port), error, 512)
            };
            let input = icmp.bytes();
            // Same real, same outer flow label as the flow's own packets.
            assert_eq!(
                run(&mut b, &input),
                (
                    XDP_TX,
                    tun_expected(&input, f.tunnel_src, ip(reals[0]), label)
                ),
                "{}: error {error:?}",
                f.service
            );
        }
        assert_eq!(global(&mut b, Global::IcmpErrorForwarded), 3);
    }
}

#[test]
fn a_tun_error_too_big_for_the_tunnel_is_dropped_not_answered() {
    let (mut b, _) = balancer_with(V6.service, Mode::Tun, &V6.tun_reals[..1]);
    b.set_mtu(1280).unwrap();
    // An error of 1280 bytes, as big as IPv6 errors get: 1320 once encapsulated.
    let big = Frame {
        payload: vec![0x5a; 1280 - 40 - 8 - 60],
        ..Frame::tcp(VIP6, CLIENT6, 80, 40000, ACK)
    };
    let input = error_about(&V6, &big, ERRORS6[0], 1280).bytes();
    assert_eq!(input.len(), 14 + 1280);
    assert_eq!(run(&mut b, &input).0, XDP_DROP);
    assert_eq!(global(&mut b, Global::DropTooBig), 1);
    assert_eq!(
        global(&mut b, Global::IcmpTooBigSent),
        0,
        "an ICMP error was answered"
    );
    assert_eq!(global(&mut b, Global::IcmpErrorForwarded), 0);
    // One that fits goes through.
    let small = error_about(&V6, &reply(&V6, 40000), ERRORS6[0], 512).bytes();
    assert_eq!(run(&mut b, &small).0, XDP_TX);
}

#[test]
fn errors_about_other_traffic_pass_untouched() {
    let (mut b, _) = balancer_with(V4.service, Mode::Dr, &V4.reals[..3]);
    let mut b6 = balancer_with(V6.service, Mode::Dr, &V6.reals[..3]).0;
    let frag_needed = ERRORS4[0];
    let too_big = ERRORS6[0];
    let quoting = |f: &Family, quoted: Frame, error| error_about(f, &quoted, error, 512);
    let cases: Vec<(&str, Frame)> = vec![
        (
            "quotes another port of the vip",
            quoting(&V4, Frame::tcp(VIP4, CLIENT4, 81, 40000, ACK), frag_needed),
        ),
        (
            "quotes udp to the tcp service's port",
            quoting(&V4, Frame::udp(VIP4, CLIENT4, 80, 40000), frag_needed),
        ),
        (
            "quotes the client's direction (client -> vip)",
            quoting(&V4, Frame::tcp(CLIENT4, VIP4, 40000, 80, ACK), frag_needed),
        ),
        (
            "quotes another source than the address it is sent to",
            quoting(
                &V4,
                Frame::tcp("198.18.0.101", CLIENT4, 80, 40000, ACK),
                frag_needed,
            ),
        ),
        (
            "sent to the director's own address",
            Frame {
                dst: ip("198.18.0.2"),
                ..quoting(&V4, reply(&V4, 40000), frag_needed)
            },
        ),
        (
            "quote too short for the ports",
            error_about(&V4, &reply(&V4, 40000), frag_needed, 21),
        ),
        (
            "quotes a later fragment",
            quoting(
                &V4,
                Frame {
                    fragment: Some((5, 10, false)),
                    ..reply(&V4, 40000)
                },
                frag_needed,
            ),
        ),
        (
            "a redirect, not an error about the flow",
            quoting(&V4, reply(&V4, 40000), (5, 1, [198, 18, 2, 2])),
        ),
        (
            "an echo request to the director's own address (no vip: packet_echo.rs)",
            Frame::icmp(CLIENT4, DEFAULT_SRC4, 8, 0, [0, 1, 0, 1], b"ping"),
        ),
        (
            "a fragment of an error",
            Frame {
                fragment: Some((9, 0, true)),
                ..quoting(&V4, reply(&V4, 40000), frag_needed)
            },
        ),
        (
            "v6: quotes another port of the vip",
            quoting(&V6, Frame::tcp(VIP6, CLIENT6, 81, 40000, ACK), too_big),
        ),
        (
            "v6: quotes the client's direction",
            quoting(&V6, Frame::tcp(CLIENT6, VIP6, 40000, 80, ACK), too_big),
        ),
        (
            "v6: parameter problem",
            quoting(&V6, reply(&V6, 40000), (4, 0, [0, 0, 0, 6])),
        ),
        (
            "v6: an echo request to the director's own address",
            Frame::icmp(CLIENT6, DEFAULT_SRC6, 128, 0, [0, 1, 0, 1], b"ping"),
        ),
        (
            "v6: quote too short for the ports",
            error_about(&V6, &reply(&V6, 40000), too_big, 41),
        ),
    ];
    let n = cases.len() as u64 + 1;
    for (name, frame) in cases {
        let bal = if frame.dst.is_ipv4() { &mut b } else { &mut b6 };
        let input = frame.bytes();
        assert_eq!(run(bal, &input), (XDP_PASS, input.clone()), "{name}");
    }
    // About a service's flow, but flooded to us while sent to another director's MAC.
    let mut flooded = quoting(&V4, reply(&V4, 40000), frag_needed).bytes();
    flooded[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x03]);
    assert_eq!(
        run(&mut b, &flooded),
        (XDP_PASS, flooded.clone()),
        "flooded"
    );
    for bal in [&mut b, &mut b6] {
        assert_eq!(global(bal, Global::IcmpErrorForwarded), 0);
    }
    assert_eq!(
        global(&mut b, Global::Passed) + global(&mut b6, Global::Passed),
        n
    );
}

#[test]
fn an_error_about_a_service_without_a_usable_real_is_dropped() {
    let (mut b, _) = balancer_with(V4.service, Mode::Dr, &V4.reals[..1]);
    b.set_link(ip(V4.reals[0]), None).unwrap();
    let input = error_about(&V4, &reply(&V4, 40000), ERRORS4[0], 512).bytes();
    assert_eq!(run(&mut b, &input).0, XDP_DROP);
    assert_eq!(global(&mut b, Global::DropNoBackend), 1);
}

/// A frame whose IP datagram is exactly `l3_len` bytes.
fn sized(frame: Frame, l3_len: usize) -> Frame {
    let headers = if frame.src.is_ipv4() { 20 } else { 40 } + 20;
    Frame {
        payload: vec![0x5a; l3_len - headers],
        ..frame
    }
}

#[test]
fn packets_too_big_for_the_tunnel_that_may_not_be_answered_are_dropped() {
    // Found by the fuzzer (fuzz_packets.rs): the director answered a packet whose IPv4 header
    // failed its checksum, with an ICMP error to whatever its corrupt source said. Hosts and
    // routers never answer those, nor later fragments, group MACs or sources that are no
    // single host (RFC 1122 3.2.2, RFC 1812 4.3.2.7 and 5.2.2, RFC 4443 2.4).
    let big4 = |src: &str| {
        sized(
            Frame {
                df: true,
                ..Frame::tcp(src, VIP4, 40000, 80, ACK)
            },
            1481,
        )
    };
    let big6 = |src: &str| sized(Frame::tcp(src, VIP6, 40000, 80, ACK), 1461);
    let mut bad_checksum = big4(CLIENT4).bytes();
    bad_checksum[14 + 10] ^= 0xff;
    let mut group_mac = big4(CLIENT4).bytes();
    group_mac[6] |= 1;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("ipv4 header checksum wrong", bad_checksum),
        (
            "later fragment",
            // A later fragment carries no L4 header: its payload alone makes it 1481 bytes.
            Frame {
                fragment: Some((3, 100, false)),
                payload: vec![0x5a; 1461],
                ..big4(CLIENT4)
            }
            .bytes(),
        ),
        ("from 0.0.0.0", big4("0.0.0.0").bytes()),
        ("from loopback", big4("127.0.0.1").bytes()),
        ("from multicast", big4("224.0.0.1").bytes()),
        ("from broadcast", big4("255.255.255.255").bytes()),
        ("from a group mac", group_mac),
        ("from ::", big6("::").bytes()),
        ("from ::1", big6("::1").bytes()),
        ("from ff02::1", big6("ff02::1").bytes()),
    ];
    let n = cases.len() as u64;
    let (mut b, _) = balancer_with("198.18.0.100:0/tcp", Mode::Tun, &V4.tun_reals[..1]);
    let (mut b6, _) = balancer_with("[fd00:18::100]:0/tcp", Mode::Tun, &V6.tun_reals[..1]);
    for bal in [&mut b, &mut b6] {
        bal.set_mtu(1500).unwrap();
    }
    for (name, input) in cases {
        let bal = if input[12..14] == [0x08, 0x00] {
            &mut b
        } else {
            &mut b6
        };
        assert_eq!(run(bal, &input).0, XDP_DROP, "{name}");
    }
    let mut count = |which| global(&mut b, which) + global(&mut b6, which);
    assert_eq!(count(Global::DropTooBig), n);
    assert_eq!(count(Global::IcmpTooBigSent), 0);
    // The same packets from a client are answered.
    assert_eq!(run(&mut b, &big4(CLIENT4).bytes()).0, XDP_TX);
    assert_eq!(run(&mut b6, &big6(CLIENT6).bytes()).0, XDP_TX);
    assert!(b.dataplane().conns().unwrap().is_empty());
}
