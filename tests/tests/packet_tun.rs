//! Packet tests of TUN mode and the decapsulator: the compiled XDP programs run under
//! BPF_PROG_TEST_RUN and every output byte is compared with a frame built here, by helpers
//! written independently of the program (tests/src/lib.rs).

use std::net::{IpAddr, Ipv6Addr};

use lb_common::{Decap, Global};
use xlb::{
    config::{HashKind, Mode, RealConfig, ServiceAddr, ServiceConfig},
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
/// The interface addresses the balancer uses as tunnel sources by default.
const DEFAULT_SRC4: &str = "198.18.0.2";
const DEFAULT_SRC6: &str = "fd00:18::2";
/// Reals behind a router: their frames go to the router's MAC, not theirs.
const REALS4: [&str; 3] = ["10.1.0.11", "10.1.0.12", "10.1.0.13"];
const REALS6: [&str; 3] = ["fd00:1::11", "fd00:1::12", "fd00:1::13"];
const NEXT_HOP_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
const RING: u32 = 65537;
const MTU: u32 = 1500;

/// A balancer with one TUN service whose reals all sit behind `NEXT_HOP_MAC`.
fn tun_service(service: &str, reals: &[&str], tunnel_src: Option<&str>) -> (Balancer, ServiceAddr) {
    let mut b = balancer();
    b.set_default_tunnel_sources(
        Some(DEFAULT_SRC4.parse().unwrap()),
        Some(DEFAULT_SRC6.parse().unwrap()),
    );
    let addr: ServiceAddr = service.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.mode = Mode::Tun;
    cfg.tunnel_src = tunnel_src.map(ip);
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

/// What TUN forwarding of `frame` to `real` from `src` must produce.
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

#[test]
fn ipv4_services_forward_by_ipip_with_an_exact_outer_header() {
    struct Case {
        name: &'static str,
        service: &'static str,
        tunnel_src: Option<&'static str>,
        frame: Frame,
    }
    let cases = [
        Case {
            name: "tcp syn, DF, DSCP EF and ECT(1) copied, default source",
            service: "198.18.0.100:80/tcp",
            tunnel_src: None,
            frame: Frame {
                tos: 0xb9,
                df: true,
                ..Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN)
            },
        },
        Case {
            name: "udp, the service's own tunnel source",
            service: "198.18.0.100:53/udp",
            tunnel_src: Some("198.18.0.3"),
            frame: Frame::udp(CLIENT4, VIP4, 40001, 53),
        },
        Case {
            name: "vlan tagged: the tag stays on the outer frame",
            service: "198.18.0.100:80/tcp",
            tunnel_src: None,
            frame: Frame {
                vlan: Some(42),
                tos: 0x10,
                ..Frame::tcp(CLIENT4, VIP4, 40002, 80, SYN)
            },
        },
        Case {
            name: "inner ipv4 options are carried untouched",
            service: "198.18.0.100:80/tcp",
            tunnel_src: None,
            frame: Frame {
                ipv4_options: vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..Frame::tcp(CLIENT4, VIP4, 40003, 80, SYN)
            },
        },
        Case {
            name: "first fragment",
            service: "198.18.0.100:53/udp",
            tunnel_src: None,
            frame: Frame {
                fragment: Some((7, 0, true)),
                ..Frame::udp(CLIENT4, VIP4, 40004, 53)
            },
        },
    ];
    for case in cases {
        let (mut b, _) = tun_service(case.service, &REALS4, case.tunnel_src);
        let input = case.frame.bytes();
        let with_ports = case.frame.fragment.is_none();
        let real = predict(
            &equal_weight(&REALS4),
            RING,
            five_tuple_hash(&case.frame, with_ports),
        );
        let src = case.tunnel_src.unwrap_or(DEFAULT_SRC4);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{}: verdict", case.name);
        assert_eq!(
            out,
            tun_expected(&input, src, real, 0),
            "{}: frame",
            case.name
        );
        // Independent checks of what the expected frame claims.
        let l2 = l2_len(&input);
        let outer = &out[l2..l2 + 20];
        assert_eq!(checksum(outer), 0, "{}: outer checksum", case.name);
        assert_eq!(outer[6] & 0x40, 0x40, "{}: DF", case.name);
        assert_eq!(outer[1], input[l2 + 1], "{}: ToS", case.name);
        assert_eq!(&out[l2 + 20..], &input[l2..], "{}: inner packet", case.name);
        assert_eq!(&out[..6], &NEXT_HOP_MAC, "{}: next hop", case.name);
        assert_eq!(&out[12..l2], &input[12..l2], "{}: ethertype/tag", case.name);
    }
}

#[test]
fn ipv6_services_forward_by_ip6ip6_with_the_flow_hash_as_flow_label() {
    let cases = [
        (
            "tcp syn, traffic class copied",
            "[fd00:18::100]:443/tcp",
            Frame {
                tos: 0x2a,
                ..Frame::tcp(CLIENT6, VIP6, 40000, 443, SYN)
            },
        ),
        (
            "udp",
            "[fd00:18::100]:53/udp",
            Frame::udp(CLIENT6, VIP6, 40001, 53),
        ),
        (
            "vlan tagged",
            "[fd00:18::100]:443/tcp",
            Frame {
                vlan: Some(7),
                tos: 0xff,
                ..Frame::tcp(CLIENT6, VIP6, 40002, 443, SYN)
            },
        ),
        (
            "first fragment: label without ports",
            "[fd00:18::100]:53/udp",
            Frame {
                fragment: Some((9, 0, true)),
                ..Frame::udp(CLIENT6, VIP6, 40003, 53)
            },
        ),
    ];
    for (name, service, frame) in cases {
        let (mut b, _) = tun_service(service, &REALS6, None);
        let input = frame.bytes();
        let with_ports = frame.fragment.is_none();
        let real = predict(
            &equal_weight(&REALS6),
            RING,
            five_tuple_hash(&frame, with_ports),
        );
        let hash = outer_hash(&frame, with_ports);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{name}: verdict");
        assert_eq!(
            out,
            tun_expected(&input, DEFAULT_SRC6, real, hash & 0xf_ffff),
            "{name}: frame"
        );
        let l2 = l2_len(&input);
        let outer = &out[l2..l2 + 40];
        let label = u32::from_be_bytes([0, outer[1] & 0x0f, outer[2], outer[3]]);
        assert_eq!(label, hash & 0xf_ffff, "{name}: flow label");
        assert_eq!(
            outer[0] << 4 | outer[1] >> 4,
            frame.tos,
            "{name}: traffic class"
        );
        assert_eq!(
            u16::from_be_bytes([outer[4], outer[5]]) as usize,
            input.len() - l2,
            "{name}: payload length"
        );
        assert_eq!(&out[l2 + 40..], &input[l2..], "{name}: inner packet");
    }
}

#[test]
fn outer_lengths_come_from_the_inner_header_not_from_a_padded_frame() {
    let (mut b, _) = tun_service("198.18.0.100:80/tcp", &REALS4, None);
    // A bare ACK is 54 bytes; on the wire it is padded to 60.
    let frame = Frame {
        payload: Vec::new(),
        ..Frame::tcp(CLIENT4, VIP4, 40010, 80, ACK)
    };
    let mut input = frame.bytes();
    assert_eq!(input.len(), 54);
    input.resize(60, 0);
    let real = predict(&equal_weight(&REALS4), RING, five_tuple_hash(&frame, true));
    let (verdict, out) = run(&mut b, &input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, tun_expected(&input, DEFAULT_SRC4, real, 0));
    assert_eq!(u16::from_be_bytes([out[16], out[17]]), 20 + 40);

    let (mut b6, _) = tun_service("[fd00:18::100]:80/tcp", &REALS6, None);
    let frame6 = Frame {
        payload: Vec::new(),
        ..Frame::tcp(CLIENT6, VIP6, 40011, 80, ACK)
    };
    let mut input6 = frame6.bytes();
    input6.resize(input6.len() + 6, 0);
    let real6 = predict(&equal_weight(&REALS6), RING, five_tuple_hash(&frame6, true));
    let hash = outer_hash(&frame6, true);
    let (verdict, out) = run(&mut b6, &input6);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        out,
        tun_expected(&input6, DEFAULT_SRC6, real6, hash & 0xf_ffff)
    );
    assert_eq!(u16::from_be_bytes([out[18], out[19]]), 40 + 20);
}

#[test]
fn a_datagram_longer_than_its_frame_is_dropped_as_malformed() {
    let (mut b, _) = tun_service("198.18.0.100:80/tcp", &REALS4, None);
    let mut input = Frame::tcp(CLIENT4, VIP4, 40020, 80, SYN).bytes();
    input.truncate(input.len() - 4);
    assert_eq!(run(&mut b, &input).0, XDP_DROP);
    assert_eq!(global(&mut b, Global::DropMalformed), 1);
    assert!(b.dataplane().conns().unwrap().is_empty());
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
fn packets_that_fit_the_mtu_once_encapsulated_are_forwarded() {
    let (mut b, _) = tun_service("198.18.0.100:80/tcp", &REALS4, None);
    b.set_mtu(MTU).unwrap();
    let f = sized(
        Frame {
            df: true,
            ..Frame::tcp(CLIENT4, VIP4, 40030, 80, SYN)
        },
        1480,
    );
    let (verdict, out) = run(&mut b, &f.bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 14 + 20 + 1480);

    let (mut b6, _) = tun_service("[fd00:18::100]:80/tcp", &REALS6, None);
    b6.set_mtu(MTU).unwrap();
    let f6 = sized(Frame::tcp(CLIENT6, VIP6, 40031, 80, SYN), 1460);
    let (verdict, out) = run(&mut b6, &f6.bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), 14 + 40 + 1460);
    assert_eq!(global(&mut b6, Global::IcmpTooBigSent), 0);
}

const QUOTE: usize = 512;

#[test]
fn ipv4_with_df_too_big_gets_icmp_fragmentation_needed_from_the_vip() {
    for vlan in [None, Some(42)] {
        let (mut b, _) = tun_service("198.18.0.100:80/tcp", &REALS4, None);
        b.set_mtu(MTU).unwrap();
        let frame = sized(
            Frame {
                df: true,
                vlan,
                ..Frame::tcp(CLIENT4, VIP4, 40040, 80, SYN)
            },
            1481,
        );
        let input = frame.bytes();
        let l2 = l2_len(&input);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{vlan:?}");

        let mut ip_hdr = vec![0x45, 0xc0];
        ip_hdr.extend_from_slice(&((20 + 8 + QUOTE) as u16).to_be_bytes());
        ip_hdr.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
        ip_hdr.extend_from_slice(&[198, 18, 0, 100]);
        ip_hdr.extend_from_slice(&[198, 18, 1, 1]);
        let sum = checksum(&ip_hdr);
        ip_hdr[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&((MTU - 20) as u16).to_be_bytes());
        icmp.extend_from_slice(&input[l2..l2 + QUOTE]);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut expected = CLIENT_MAC.to_vec();
        expected.extend_from_slice(&DIRECTOR_MAC);
        expected.extend_from_slice(&input[12..l2]);
        expected.extend_from_slice(&ip_hdr);
        expected.extend_from_slice(&icmp);
        assert_eq!(out, expected, "{vlan:?}: reply frame");
        // What the expected frame claims, checked on the output itself.
        assert_eq!(checksum(&out[l2..l2 + 20]), 0, "IP checksum");
        assert_eq!(checksum(&out[l2 + 20..]), 0, "ICMP checksum");
        assert_eq!(&out[l2 + 28..], &input[l2..l2 + QUOTE], "quote");
        assert_eq!(u16::from_be_bytes([out[l2 + 26], out[l2 + 27]]), 1480);

        assert_eq!(global(&mut b, Global::IcmpTooBigSent), 1);
        assert_eq!(global(&mut b, Global::Forwarded), 0);
        assert!(
            b.dataplane().conns().unwrap().is_empty(),
            "a too-big packet created a flow"
        );
    }
}

#[test]
fn ipv4_without_df_too_big_is_dropped_and_counted() {
    let (mut b, _) = tun_service("198.18.0.100:80/tcp", &REALS4, None);
    b.set_mtu(MTU).unwrap();
    let input = sized(Frame::tcp(CLIENT4, VIP4, 40050, 80, SYN), 1481).bytes();
    assert_eq!(run(&mut b, &input).0, XDP_DROP);
    assert_eq!(global(&mut b, Global::DropTooBig), 1);
    assert_eq!(global(&mut b, Global::IcmpTooBigSent), 0);
    assert!(b.dataplane().conns().unwrap().is_empty());
    // With the check off the same packet is forwarded.
    b.set_mtu(0).unwrap();
    assert_eq!(run(&mut b, &input).0, XDP_TX);
}

#[test]
fn ipv6_too_big_gets_icmpv6_packet_too_big_from_the_vip() {
    let (mut b, _) = tun_service("[fd00:18::100]:80/tcp", &REALS6, None);
    b.set_mtu(MTU).unwrap();
    let input = sized(
        Frame {
            tos: 0x2a,
            ..Frame::tcp(CLIENT6, VIP6, 40060, 80, ACK)
        },
        1461,
    )
    .bytes();
    let (verdict, out) = run(&mut b, &input);
    assert_eq!(verdict, XDP_TX);

    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&(MTU - 40).to_be_bytes());
    icmp.extend_from_slice(&input[14..14 + QUOTE]);
    let sum = icmpv6_checksum(ip(VIP6), ip(CLIENT6), &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut expected = CLIENT_MAC.to_vec();
    expected.extend_from_slice(&DIRECTOR_MAC);
    expected.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    expected.extend_from_slice(&((8 + QUOTE) as u16).to_be_bytes());
    expected.extend_from_slice(&[58, 64]);
    expected.extend_from_slice(&VIP6.parse::<Ipv6Addr>().unwrap().octets());
    expected.extend_from_slice(&CLIENT6.parse::<Ipv6Addr>().unwrap().octets());
    expected.extend_from_slice(&icmp);
    assert_eq!(out, expected, "reply frame");
    assert_eq!(icmpv6_checksum(ip(VIP6), ip(CLIENT6), &out[54..]), 0);
    assert_eq!(&out[54 + 8..], &input[14..14 + QUOTE], "quote");
    assert_eq!(global(&mut b, Global::IcmpTooBigSent), 1);
    assert!(b.dataplane().conns().unwrap().is_empty());
}

#[test]
fn an_established_flow_keeps_its_real_over_tun_when_the_reals_change() {
    let first = "10.1.0.11";
    let more = ["10.1.0.12", "10.1.0.13", "10.1.0.14", "10.1.0.15"];
    let (mut b, svc) = tun_service("198.18.0.100:80/tcp", &[first], None);
    let after: Vec<(IpAddr, u32)> = std::iter::once(first)
        .chain(more)
        .map(|r| (ip(r), 100))
        .collect();
    let sport = (1000..2000)
        .find(|p| {
            let f = Frame::tcp(CLIENT4, VIP4, *p, 80, SYN);
            predict(&after, RING, five_tuple_hash(&f, true)) != ip(first)
        })
        .unwrap();
    let syn = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes();
    let ack = Frame::tcp(CLIENT4, VIP4, sport, 80, ACK).bytes();
    assert_eq!(
        run(&mut b, &syn),
        (XDP_TX, tun_expected(&syn, DEFAULT_SRC4, ip(first), 0))
    );
    for r in more {
        b.set_link(ip(r), Some(link(NEXT_HOP_MAC))).unwrap();
        b.add_real(&svc, RealConfig::new(ip(r), 100)).unwrap();
    }
    assert_eq!(
        run(&mut b, &ack),
        (XDP_TX, tun_expected(&ack, DEFAULT_SRC4, ip(first), 0)),
        "established flow moved"
    );
    let moved = predict(
        &after,
        RING,
        five_tuple_hash(&Frame::tcp(CLIENT4, VIP4, sport, 80, SYN), true),
    );
    assert_eq!(
        run(&mut b, &syn),
        (XDP_TX, tun_expected(&syn, DEFAULT_SRC4, moved, 0)),
        "a new connection on the same 5-tuple is scheduled afresh"
    );
}

#[test]
fn tun_packets_are_counted_like_dr_ones() {
    let (mut b, svc) = tun_service("198.18.0.100:80/tcp", &["10.1.0.11"], None);
    let syn = Frame::tcp(CLIENT4, VIP4, 4000, 80, SYN).bytes();
    let ack = Frame::tcp(CLIENT4, VIP4, 4000, 80, ACK).bytes();
    for f in [&syn, &ack, &ack] {
        assert_eq!(run(&mut b, f).0, XDP_TX);
    }
    let id = b.service_id(&svc).unwrap();
    let real = b.real_backend_id(&svc, ip("10.1.0.11")).unwrap();
    // Bytes as received, before encapsulation, as DR counts them.
    let bytes = (syn.len() + 2 * ack.len()) as u64;
    for c in [
        b.dataplane().all_service_counters().unwrap()[id as usize],
        b.dataplane().all_backend_counters().unwrap()[real as usize],
    ] {
        assert_eq!((c.packets, c.bytes, c.new_flows), (3, bytes, 1));
    }
    assert_eq!(global(&mut b, Global::Forwarded), 3);
    assert_eq!(b.dataplane().conns().unwrap().len(), 1);
}

#[test]
fn tun_and_dr_services_live_side_by_side() {
    let (mut b, _) = tun_service("198.18.0.100:80/tcp", &REALS4, None);
    let dr_real = "198.18.0.11";
    b.set_link(ip(dr_real), Some(link(real_mac(ip(dr_real)))))
        .unwrap();
    let mut dr = ServiceConfig::new("198.18.0.100:81/tcp".parse().unwrap());
    dr.reals.push(RealConfig::new(ip(dr_real), 100));
    b.add_service(dr).unwrap();
    let input = Frame::tcp(CLIENT4, VIP4, 4000, 81, SYN).bytes();
    let mut expected = input.clone();
    expected[..6].copy_from_slice(&real_mac(ip(dr_real)));
    expected[6..12].copy_from_slice(&DIRECTOR_MAC);
    assert_eq!(run(&mut b, &input), (XDP_TX, expected));
}

#[test]
fn a_tun_service_needs_a_tunnel_source() {
    let mut b = balancer();
    b.set_default_tunnel_sources(None, Some(DEFAULT_SRC6.parse().unwrap()));
    let mut cfg = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
    cfg.mode = Mode::Tun;
    let err = format!("{:#}", b.add_service(cfg.clone()).unwrap_err());
    assert_eq!(
        err,
        "service 198.18.0.100:80/tcp: no IPv4 address to use as tunnel source on the \
         interface; pass --tunnel-src"
    );
    assert!(b.service_id(&cfg.service).is_none());
    cfg.tunnel_src = Some(ip("198.18.0.5"));
    b.add_service(cfg).unwrap();
    let mut cfg6 = ServiceConfig::new("[fd00:18::100]:80/tcp".parse().unwrap());
    cfg6.mode = Mode::Tun;
    b.add_service(cfg6).unwrap();
}

#[test]
fn set_mtu_refuses_what_the_icmp_reply_cannot_handle() {
    let mut b = balancer();
    for mtu in [0, 576, 1500, 9000, 65535] {
        b.set_mtu(mtu).unwrap();
    }
    for mtu in [1, 575, 65536] {
        assert!(b.set_mtu(mtu).is_err(), "{mtu} accepted");
    }
}

#[test]
fn tun_frames_truncated_at_every_length_pass_or_drop_never_abort() {
    let (mut b, _) = tun_service("198.18.0.100:0/tcp", &REALS4, None);
    let (mut b6, _) = tun_service("[fd00:18::100]:0/udp", &REALS6, None);
    b.set_mtu(MTU).unwrap();
    b6.set_mtu(MTU).unwrap();
    let frames = [
        Frame {
            vlan: Some(5),
            ipv4_options: vec![1, 1, 1, 0],
            df: true,
            ..Frame::tcp(CLIENT4, VIP4, 1, 80, SYN)
        },
        sized(
            Frame {
                df: true,
                ..Frame::tcp(CLIENT4, VIP4, 1, 80, SYN)
            },
            1481,
        ),
        Frame::udp(CLIENT6, VIP6, 1, 53),
    ];
    let mut tested = 0;
    for frame in frames {
        let full = frame.bytes();
        let bal = if frame.src.is_ipv4() { &mut b } else { &mut b6 };
        for len in 14..=full.len() {
            let input = &full[..len];
            let (verdict, out) = run(bal, input);
            assert!(
                [XDP_PASS, XDP_DROP, XDP_TX].contains(&verdict),
                "length {len}: verdict {verdict}"
            );
            if verdict == XDP_PASS {
                assert_eq!(out, input, "length {len}: a passed frame was changed");
            }
            // Only whole datagrams are forwarded or answered.
            if verdict == XDP_TX {
                assert_eq!(len, full.len(), "length {len} was sent");
            }
            tested += 1;
        }
    }
    assert!(tested > 1500);
}

/// A tunnel frame as a router would deliver it to a real server.
const REAL_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];

fn tunnelled(inner: &Frame, outer_src: &str, outer_dst: &str, outer_tos: u8) -> (Vec<u8>, Vec<u8>) {
    let frame = inner.bytes();
    let l3 = &frame[l2_len(&frame)..];
    let outer = outer_header(ip(outer_src), ip(outer_dst), outer_tos, 0x12345, ip_len(l3));
    let tunnel = encapsulate(&frame, REAL_MAC, ROUTER_MAC, &outer);
    // What the stack must receive: the tunnel frame's L2 header, then the inner packet.
    let mut expected = frame.clone();
    expected[..6].copy_from_slice(&REAL_MAC);
    expected[6..12].copy_from_slice(&ROUTER_MAC);
    (tunnel, expected)
}

fn decap_with(vips: &[&str]) -> Decapsulator {
    let mut d = decapsulator();
    for v in vips {
        d.add_vip(ip(v)).unwrap();
    }
    d
}

fn decap_counts(d: &Decapsulator) -> [u64; 4] {
    [
        Decap::Decapsulated,
        Decap::Refused,
        Decap::Malformed,
        Decap::Fragment,
    ]
    .map(|which| d.counter(which).unwrap())
}

#[test]
fn the_decapsulator_unwraps_ipip_and_ip6ip6_for_local_vips() {
    let mut d = decap_with(&[VIP4, VIP6]);
    let cases = [
        (
            "ipip tcp",
            Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN),
            "198.18.0.2",
            "10.1.0.11",
        ),
        (
            "ipip udp, vlan",
            Frame {
                vlan: Some(9),
                ..Frame::udp(CLIENT4, VIP4, 40001, 53)
            },
            "198.18.0.2",
            "10.1.0.11",
        ),
        (
            "ip6ip6 tcp",
            Frame::tcp(CLIENT6, VIP6, 40002, 443, SYN),
            "fd00:18::2",
            "fd00:1::11",
        ),
        (
            "ip6ip6 udp, vlan",
            Frame {
                vlan: Some(9),
                ..Frame::udp(CLIENT6, VIP6, 40003, 53)
            },
            "fd00:18::2",
            "fd00:1::11",
        ),
    ];
    for (i, (name, inner, src, dst)) in cases.iter().enumerate() {
        let (tunnel, expected) = tunnelled(inner, src, dst, 0);
        let (verdict, out) = d.test_run(&tunnel).unwrap();
        assert_eq!(verdict, XDP_PASS, "{name}: verdict");
        assert_eq!(out, expected, "{name}: frame");
        assert_eq!(
            decap_counts(&d),
            [i as u64 + 1, 0, 0, 0],
            "{name}: counters"
        );
    }
}

#[test]
fn the_decapsulator_strips_an_outer_ipv4_header_with_options() {
    let mut d = decap_with(&[VIP4]);
    let inner = Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN);
    let frame = inner.bytes();
    let mut outer = outer_header(
        ip("198.18.0.2"),
        ip("10.1.0.11"),
        0,
        0,
        ip_len(&frame[14..]) + 8,
    );
    outer[0] = 0x47;
    outer[10..12].copy_from_slice(&[0, 0]);
    outer.extend_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]);
    let sum = checksum(&outer);
    outer[10..12].copy_from_slice(&sum.to_be_bytes());
    let tunnel = encapsulate(&frame, REAL_MAC, ROUTER_MAC, &outer);
    let mut expected = frame.clone();
    expected[..6].copy_from_slice(&REAL_MAC);
    expected[6..12].copy_from_slice(&ROUTER_MAC);
    assert_eq!(d.test_run(&tunnel).unwrap(), (XDP_PASS, expected));
}

#[test]
fn the_decapsulator_passes_everything_else_untouched() {
    let mut d = decap_with(&[VIP4, VIP6]);
    // Tunnel packets for another destination: refused.
    for (inner, src, dst) in [
        (
            Frame::tcp(CLIENT4, "198.18.0.200", 1, 80, SYN),
            "198.18.0.2",
            "10.1.0.11",
        ),
        (
            Frame::tcp(CLIENT6, "fd00:18::200", 1, 80, SYN),
            "fd00:18::2",
            "fd00:1::11",
        ),
    ] {
        let (tunnel, _) = tunnelled(&inner, src, dst, 0);
        assert_eq!(d.test_run(&tunnel).unwrap(), (XDP_PASS, tunnel.clone()));
    }
    assert_eq!(decap_counts(&d), [0, 2, 0, 0]);
    // Too short for the inner header: malformed.
    for (inner, src, dst) in [
        (
            Frame::tcp(CLIENT4, VIP4, 1, 80, SYN),
            "198.18.0.2",
            "10.1.0.11",
        ),
        (
            Frame::tcp(CLIENT6, VIP6, 1, 80, SYN),
            "fd00:18::2",
            "fd00:1::11",
        ),
    ] {
        let (tunnel, _) = tunnelled(&inner, src, dst, 0);
        let outer_end = 14 + if inner.src.is_ipv4() { 20 } else { 40 };
        for cut in [outer_end, outer_end + 10] {
            let short = &tunnel[..cut];
            assert_eq!(d.test_run(short).unwrap(), (XDP_PASS, short.to_vec()));
        }
    }
    assert_eq!(decap_counts(&d), [0, 2, 4, 0]);
    // A fragment of a tunnel packet cannot be unwrapped alone.
    let (mut frag, _) = tunnelled(
        &Frame::tcp(CLIENT4, VIP4, 1, 80, SYN),
        "198.18.0.2",
        "10.1.0.11",
        0,
    );
    frag[14 + 6] = 0x20; // more fragments
    assert_eq!(d.test_run(&frag).unwrap(), (XDP_PASS, frag.clone()));
    assert_eq!(decap_counts(&d), [0, 2, 4, 1]);
    // Not tunnel packets at all: passed and not counted.
    let plain = [
        Frame::tcp(CLIENT4, VIP4, 1, 80, SYN).bytes(),
        Frame::udp(CLIENT6, VIP6, 1, 53).bytes(),
        Frame {
            vlan: Some(3),
            ..Frame::tcp(CLIENT4, "10.1.0.11", 1, 22, SYN)
        }
        .bytes(),
        arp_request([198, 18, 1, 1], [10, 1, 0, 11]),
    ];
    for f in plain {
        assert_eq!(d.test_run(&f).unwrap(), (XDP_PASS, f.clone()));
    }
    assert_eq!(decap_counts(&d), [0, 2, 4, 1]);
}

#[test]
fn decapsulation_stops_when_the_vip_is_removed() {
    let mut d = decap_with(&[VIP4]);
    assert_eq!(d.vips().unwrap(), vec![ip(VIP4)]);
    let (tunnel, expected) = tunnelled(
        &Frame::tcp(CLIENT4, VIP4, 1, 80, SYN),
        "198.18.0.2",
        "10.1.0.11",
        0,
    );
    assert_eq!(d.test_run(&tunnel).unwrap(), (XDP_PASS, expected));
    d.remove_vip(ip(VIP4)).unwrap();
    assert!(d.remove_vip(ip(VIP4)).is_err());
    assert_eq!(d.test_run(&tunnel).unwrap(), (XDP_PASS, tunnel.clone()));
    assert_eq!(decap_counts(&d), [1, 1, 0, 0]);
    assert!(d.vips().unwrap().is_empty());
}

#[test]
fn congestion_marks_on_the_outer_header_reach_an_ecn_capable_inner_packet() {
    let mut d = decap_with(&[VIP4, VIP6]);
    // Outer CE, inner ECT(0): the inner packet arrives CE-marked, IPv4 checksum updated.
    let inner = Frame {
        tos: 0xb8 | 0x02,
        ..Frame::tcp(CLIENT4, VIP4, 1, 80, SYN)
    };
    let (tunnel, mut expected) = tunnelled(&inner, "198.18.0.2", "10.1.0.11", 0xb8 | 0x03);
    let marked = Frame {
        tos: 0xb8 | 0x03,
        ..inner.clone()
    }
    .bytes();
    expected[14..].copy_from_slice(&marked[14..]);
    let (verdict, out) = d.test_run(&tunnel).unwrap();
    assert_eq!((verdict, &out), (XDP_PASS, &expected));
    assert_eq!(checksum(&out[14..34]), 0);
    // Inner not ECN-capable: left as it is.
    let plain = Frame {
        tos: 0xb8,
        ..Frame::tcp(CLIENT4, VIP4, 1, 80, SYN)
    };
    let (tunnel, expected) = tunnelled(&plain, "198.18.0.2", "10.1.0.11", 0x03);
    assert_eq!(d.test_run(&tunnel).unwrap(), (XDP_PASS, expected));
    // IPv6: ECT(1) becomes CE.
    let inner6 = Frame {
        tos: 0x01,
        ..Frame::udp(CLIENT6, VIP6, 1, 53)
    };
    let (tunnel, mut expected) = tunnelled(&inner6, "fd00:18::2", "fd00:1::11", 0x03);
    let marked6 = Frame {
        tos: 0x03,
        ..inner6.clone()
    }
    .bytes();
    expected[14..].copy_from_slice(&marked6[14..]);
    assert_eq!(d.test_run(&tunnel).unwrap(), (XDP_PASS, expected));
}

#[test]
fn what_the_director_encapsulates_the_decapsulator_restores() {
    for (service, reals, frame) in [
        (
            "198.18.0.100:80/tcp",
            &REALS4,
            Frame {
                tos: 0x12,
                df: true,
                vlan: Some(4),
                ..Frame::tcp(CLIENT4, VIP4, 4321, 80, SYN)
            },
        ),
        (
            "[fd00:18::100]:80/tcp",
            &REALS6,
            Frame {
                tos: 0x12,
                ..Frame::tcp(CLIENT6, VIP6, 4321, 80, SYN)
            },
        ),
    ] {
        let (mut b, _) = tun_service(service, reals, None);
        let mut d = decap_with(&[VIP4, VIP6]);
        let input = frame.bytes();
        let (verdict, tunnel) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX);
        let (verdict, out) = d.test_run(&tunnel).unwrap();
        assert_eq!(verdict, XDP_PASS);
        let mut expected = input.clone();
        expected[..6].copy_from_slice(&NEXT_HOP_MAC);
        expected[6..12].copy_from_slice(&DIRECTOR_MAC);
        assert_eq!(out, expected, "{service}");
    }
}

#[test]
fn hash_kind_src_ip_still_labels_flows_by_five_tuple() {
    let mut b = balancer();
    b.set_default_tunnel_sources(None, Some(DEFAULT_SRC6.parse().unwrap()));
    let mut cfg = ServiceConfig::new("[fd00:18::100]:80/tcp".parse().unwrap());
    cfg.mode = Mode::Tun;
    cfg.hash = HashKind::SrcIp;
    for r in REALS6 {
        b.set_link(ip(r), Some(link(NEXT_HOP_MAC))).unwrap();
        cfg.reals.push(RealConfig::new(ip(r), 100));
    }
    b.add_service(cfg).unwrap();
    let mut labels = std::collections::BTreeSet::new();
    let mut reals = std::collections::BTreeSet::new();
    for sport in 5000..5020 {
        let f = Frame::tcp(CLIENT6, VIP6, sport, 80, SYN);
        let (verdict, out) = run(&mut b, &f.bytes());
        assert_eq!(verdict, XDP_TX);
        let label = u32::from_be_bytes([0, out[15] & 0x0f, out[16], out[17]]);
        assert_eq!(label, outer_hash(&f, true) & 0xf_ffff);
        labels.insert(label);
        reals.insert(out[14 + 24..14 + 40].to_vec());
    }
    assert_eq!(reals.len(), 1, "one client, one real");
    assert!(
        labels.len() > 15,
        "flows of one client share labels: {labels:?}"
    );
}
