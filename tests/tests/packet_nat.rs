//! NAT packet tests: the compiled balancer (and its NAT programs, tail-called) runs under
//! BPF_PROG_TEST_RUN. Every expected frame is built from scratch by the test's frame builder,
//! whose IP and TCP/UDP checksums are summed over the whole packet (tests/src/lib.rs): an
//! implementation independent of the data path's incremental updates.

use std::net::IpAddr;

use lb_common::{
    CONN_F_SNAT, CONN_SNAT_ADDR_MASK, CONN_SNAT_ADDR_SHIFT, CONN_SNAT_BITS, ConnValue, Global,
    NatKey, NatReply, NatReplyBody, NatReplyWay, SnatEndpoint,
};
use xlb::{
    config::{Mode, ServiceAddr, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
    netlink::Mac,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const RING: u32 = 65537;
const REALS4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const REALS6: [&str; 3] = ["fd00:18::11", "fd00:18::12", "fd00:18::13"];
/// The port the reals serve the service on.
const MAPPED: u16 = 8080;

/// A balancer with one NAT service whose reals (MACs known) serve it on `port` (0: unmapped).
fn nat_service(service: &str, reals: &[&str], port: u16) -> (Balancer, ServiceAddr) {
    let mut b = balancer();
    let addr: ServiceAddr = service.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.mode = Mode::Nat;
    add_service_with_reals(&mut b, cfg, reals, port);
    (b, addr)
}

fn run(b: &mut Balancer, frame: &[u8]) -> (u32, Vec<u8>) {
    b.dataplane().test_run(BALANCER_PROGRAM, frame).unwrap()
}

fn with_macs(mut frame: Vec<u8>, dst: Mac, src: Mac) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// What the director must send the real: the request with the real's address and port, every
/// checksum summed afresh, from the director's MAC to the real's.
fn to_real(request: &Frame, real: IpAddr, port: u16) -> Vec<u8> {
    let f = Frame {
        dst: real,
        dport: port,
        ..request.clone()
    };
    with_macs(f.bytes(), real_mac(real), DIRECTOR_MAC)
}

/// The real's reply to `request` as it reaches the director (its gateway).
fn reply_of(request: &Frame, real: IpAddr, port: u16, l4: L4) -> Frame {
    Frame {
        src: real,
        dst: request.src,
        sport: port,
        dport: request.sport,
        l4,
        ..request.clone()
    }
}

fn reply_bytes(reply: &Frame) -> Vec<u8> {
    with_macs(reply.bytes(), DIRECTOR_MAC, real_mac(reply.src))
}

/// What the director must send back to the client: the reply from the VIP and service port,
/// to the MAC the request came from.
fn to_client(reply: &Frame, vip: &str, port: u16) -> Vec<u8> {
    let f = Frame {
        src: ip(vip),
        sport: port,
        ..reply.clone()
    };
    with_macs(f.bytes(), CLIENT_MAC, DIRECTOR_MAC)
}

struct Case {
    name: &'static str,
    service: &'static str,
    vip: &'static str,
    reals: &'static [&'static str],
    request: Frame,
    reply: L4,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "tcp v4",
            service: "198.18.0.100:80/tcp",
            vip: VIP4,
            reals: &REALS4,
            request: Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN),
            reply: L4::Tcp { flags: SYN | ACK },
        },
        Case {
            name: "udp v4",
            service: "198.18.0.100:80/udp",
            vip: VIP4,
            reals: &REALS4,
            request: Frame {
                payload: b"question".to_vec(),
                ..Frame::udp(CLIENT4, VIP4, 40001, 80)
            },
            reply: L4::Udp,
        },
        Case {
            name: "tcp v6",
            service: "[fd00:18::100]:80/tcp",
            vip: VIP6,
            reals: &REALS6,
            request: Frame::tcp(CLIENT6, VIP6, 40002, 80, SYN),
            reply: L4::Tcp { flags: SYN | ACK },
        },
        Case {
            name: "udp v6",
            service: "[fd00:18::100]:80/udp",
            vip: VIP6,
            reals: &REALS6,
            request: Frame {
                payload: b"question?".to_vec(),
                ..Frame::udp(CLIENT6, VIP6, 40003, 80)
            },
            reply: L4::Udp,
        },
        Case {
            name: "vlan tagged v4",
            service: "198.18.0.100:80/tcp",
            vip: VIP4,
            reals: &REALS4,
            request: Frame {
                vlan: Some(42),
                ..Frame::tcp(CLIENT4, VIP4, 40004, 80, SYN)
            },
            reply: L4::Tcp { flags: SYN | ACK },
        },
        Case {
            name: "ipv4 options",
            service: "198.18.0.100:80/tcp",
            vip: VIP4,
            reals: &REALS4,
            request: Frame {
                ipv4_options: vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                payload: vec![0xab; 333],
                ..Frame::tcp(CLIENT4, VIP4, 40005, 80, SYN)
            },
            reply: L4::Tcp { flags: SYN | ACK },
        },
        Case {
            name: "ipv6 extension headers",
            service: "[fd00:18::100]:80/tcp",
            vip: VIP6,
            reals: &REALS6,
            request: Frame {
                ipv6_ext: vec![0, 60],
                ..Frame::tcp(CLIENT6, VIP6, 40006, 80, SYN)
            },
            reply: L4::Tcp { flags: SYN | ACK },
        },
    ]
}

/// The RFC validators (tests/src/wellformed.rs) agree, where they parse the frame (they do
/// not walk IPv6 extension headers).
fn valid_checksums(case: &Case, frame: &[u8]) {
    if case.request.ipv6_ext.is_empty() {
        let ip = wellformed::ip(frame).unwrap();
        wellformed::l4_checksum(frame, &ip).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
}

#[test]
fn requests_go_to_the_mapped_port_and_replies_come_back_from_the_vip() {
    for case in cases() {
        let (mut b, _) = nat_service(case.service, case.reals, MAPPED);
        let real = predict(
            &equal_weight(case.reals),
            RING,
            five_tuple_hash(&case.request, true),
        );
        let (verdict, out) = run(&mut b, &case.request.bytes());
        assert_eq!(verdict, XDP_TX, "{}: request verdict", case.name);
        assert_eq!(
            out,
            to_real(&case.request, real, MAPPED),
            "{}: request",
            case.name
        );
        valid_checksums(&case, &out);

        let reply = reply_of(&case.request, real, MAPPED, case.reply);
        let (verdict, out) = run(&mut b, &reply_bytes(&reply));
        assert_eq!(verdict, XDP_TX, "{}: reply verdict", case.name);
        assert_eq!(out, to_client(&reply, case.vip, 80), "{}: reply", case.name);
        valid_checksums(&case, &out);

        // The flow's next packet, and the reply to it, take the same ways.
        let mut ack = case.request.clone();
        if let L4::Tcp { flags } = &mut ack.l4 {
            *flags = ACK;
        }
        ack.payload = b"more data".to_vec();
        let (verdict, out) = run(&mut b, &ack.bytes());
        assert_eq!(verdict, XDP_TX, "{}: next request verdict", case.name);
        assert_eq!(
            out,
            to_real(&ack, real, MAPPED),
            "{}: next request",
            case.name
        );
        let reply = Frame {
            payload: b"answer".to_vec(),
            ..reply_of(&ack, real, MAPPED, ack.l4)
        };
        let (_, out) = run(&mut b, &reply_bytes(&reply));
        assert_eq!(
            out,
            to_client(&reply, case.vip, 80),
            "{}: next reply",
            case.name
        );
        assert_eq!(
            b.dataplane().global_counter(Global::NatReplied).unwrap(),
            2,
            "{}",
            case.name
        );
    }
}

#[test]
fn an_unmapped_real_keeps_the_port_and_an_all_ports_service_maps_each_port_to_itself() {
    for (service, dport) in [("198.18.0.100:80/tcp", 80), ("198.18.0.100:0/tcp", 4433)] {
        let (mut b, _) = nat_service(service, &REALS4, 0);
        let request = Frame::tcp(CLIENT4, VIP4, 41000, dport, SYN);
        let real = predict(
            &equal_weight(&REALS4),
            RING,
            five_tuple_hash(&request, true),
        );
        let (verdict, out) = run(&mut b, &request.bytes());
        assert_eq!(verdict, XDP_TX, "{service}");
        assert_eq!(out, to_real(&request, real, dport), "{service}");
        let reply = reply_of(&request, real, dport, L4::Tcp { flags: SYN | ACK });
        let (_, out) = run(&mut b, &reply_bytes(&reply));
        assert_eq!(out, to_client(&reply, VIP4, dport), "{service}: reply");
    }
}

#[test]
fn udp_without_a_checksum_stays_without_one() {
    let (mut b, _) = nat_service("198.18.0.100:53/udp", &REALS4, 5353);
    let request = Frame::udp(CLIENT4, VIP4, 42000, 53);
    let real = predict(
        &equal_weight(&REALS4),
        RING,
        five_tuple_hash(&request, true),
    );
    let without_checksum = |mut f: Vec<u8>| {
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        f
    };
    let (verdict, out) = run(&mut b, &without_checksum(request.bytes()));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out, without_checksum(to_real(&request, real, 5353)));
    let reply = reply_of(&request, real, 5353, L4::Udp);
    let (_, out) = run(&mut b, &without_checksum(reply_bytes(&reply)));
    assert_eq!(out, without_checksum(to_client(&reply, VIP4, 53)));
}

#[test]
fn a_udp_checksum_that_sums_to_zero_is_sent_as_all_ones() {
    // Find a request whose rewritten datagram's checksum is 0xffff, which RFC 768 sends for a
    // computed 0: the builder writes it so, and the incremental update must too.
    let (mut b, _) = nat_service("198.18.0.100:53/udp", &REALS4, 5353);
    let base = Frame::udp(CLIENT4, VIP4, 43000, 53);
    let real = predict(&equal_weight(&REALS4), RING, five_tuple_hash(&base, true));
    let mut found = false;
    for payload in 0..=u16::MAX {
        let request = Frame {
            payload: payload.to_be_bytes().to_vec(),
            ..base.clone()
        };
        let expected = to_real(&request, real, 5353);
        if expected[14 + 20 + 6..14 + 20 + 8] != [0xff, 0xff] {
            continue;
        }
        let (_, out) = run(&mut b, &request.bytes());
        assert_eq!(out, expected);
        found = true;
        break;
    }
    assert!(found, "no payload gives a checksum of all ones");
}

#[test]
fn replies_that_match_no_flow_pass_untouched() {
    let (mut b, _) = nat_service("198.18.0.100:80/tcp", &REALS4, MAPPED);
    let request = Frame::tcp(CLIENT4, VIP4, 44000, 80, SYN);
    let real = predict(
        &equal_weight(&REALS4),
        RING,
        five_tuple_hash(&request, true),
    );
    run(&mut b, &request.bytes());
    let reply = reply_of(&request, real, MAPPED, L4::Tcp { flags: SYN | ACK });
    let other_real = REALS4.iter().map(|r| ip(r)).find(|r| *r != real).unwrap();
    let strangers = [
        (
            "another client port",
            Frame {
                dport: 44001,
                ..reply.clone()
            },
        ),
        (
            "another real port",
            Frame {
                sport: 8081,
                ..reply.clone()
            },
        ),
        (
            "another real",
            Frame {
                src: other_real,
                ..reply.clone()
            },
        ),
        (
            "udp",
            Frame {
                l4: L4::Udp,
                ..reply.clone()
            },
        ),
    ];
    for (name, frame) in strangers {
        let input = reply_bytes(&frame);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(out, input, "{name}");
    }
    // The flow's reply, sent to another host's MAC, is not ours to translate.
    let input = with_macs(reply.bytes(), [0x02, 0, 0, 0, 0, 0x77], real_mac(real));
    let (verdict, out) = run(&mut b, &input);
    assert_eq!((verdict, out), (XDP_PASS, input));
    assert_eq!(b.dataplane().global_counter(Global::NatReplied).unwrap(), 0);
}

#[test]
fn fragments_of_a_reply_are_translated_with_their_first() {
    let (mut b, _) = nat_service("198.18.0.100:53/udp", &REALS4, 5353);
    let request = Frame::udp(CLIENT4, VIP4, 45000, 53);
    let real = predict(
        &equal_weight(&REALS4),
        RING,
        five_tuple_hash(&request, true),
    );
    run(&mut b, &request.bytes());
    // A reply in two fragments: the first carries the UDP header (and the checksum over the
    // whole datagram), the second only data.
    let whole = Frame {
        payload: vec![0x5a; 40],
        ..reply_of(&request, real, 5353, L4::Udp)
    };
    let datagram = whole.bytes()[14 + 20..].to_vec();
    let fragment = |offset: usize, data: &[u8], more: bool, src: &str| {
        let mut f = Frame {
            src: ip(src),
            fragment: Some((0x77, (offset / 8) as u16, more)),
            ..whole.clone()
        }
        .bytes();
        // Replace the builder's L4 segment by the raw slice of the datagram, fixing the length
        // and the header checksum as the builder does.
        f.truncate(14 + 20);
        f.extend_from_slice(data);
        let total = (20 + data.len()) as u16;
        f[14 + 2..14 + 4].copy_from_slice(&total.to_be_bytes());
        f[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
        let sum = checksum(&f[14..14 + 20]);
        f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
        f
    };
    let translated = to_client(&whole, VIP4, 53)[14 + 20..].to_vec();
    let first_in = with_macs(
        fragment(0, &datagram[..24], true, &real.to_string()),
        DIRECTOR_MAC,
        real_mac(real),
    );
    let (verdict, out) = run(&mut b, &first_in);
    assert_eq!(verdict, XDP_TX);
    let first_out = with_macs(
        fragment(0, &translated[..24], true, VIP4),
        CLIENT_MAC,
        DIRECTOR_MAC,
    );
    assert_eq!(out, first_out, "first fragment");
    let second_in = with_macs(
        fragment(24, &datagram[24..], false, &real.to_string()),
        DIRECTOR_MAC,
        real_mac(real),
    );
    let (verdict, out) = run(&mut b, &second_in);
    assert_eq!(verdict, XDP_TX);
    let second_out = with_macs(
        fragment(24, &translated[24..], false, VIP4),
        CLIENT_MAC,
        DIRECTOR_MAC,
    );
    assert_eq!(out, second_out, "second fragment");
}

#[test]
fn a_dr_director_does_not_look_for_nat_replies() {
    // The same reply with a DR service only: nothing is translated, nothing looked up.
    let mut b = balancer();
    add_dr_service(&mut b, "198.18.0.100:80/tcp", &REALS4);
    let request = Frame::tcp(CLIENT4, VIP4, 46000, 80, SYN);
    let (verdict, _) = run(&mut b, &request.bytes());
    assert_eq!(verdict, XDP_TX);
    let reply = reply_bytes(&reply_of(
        &request,
        ip(REALS4[0]),
        80,
        L4::Tcp { flags: SYN | ACK },
    ));
    assert_eq!(run(&mut b, &reply), (XDP_PASS, reply));
}

// ---------------------------------------------------------------------------------------
// Full NAT: the source too becomes one of the service's SNAT addresses and a port the data
// path allocates.

const SNAT4: &str = "198.18.0.50";
const SNAT4_B: &str = "198.18.0.51";
const SNAT6: &str = "fd00:18::50";

fn fullnat_service(service: &str, reals: &[&str], snat: &[&str]) -> Balancer {
    let mut b = balancer();
    let addr: ServiceAddr = service.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.mode = Mode::Fullnat;
    cfg.snat = snat.iter().map(|a| ip(a)).collect();
    add_service_with_reals(&mut b, cfg, reals, MAPPED);
    b
}

/// The source address and port of a frame the director sent (no VLAN, no IP options, no
/// IPv6 extension headers).
fn source_of(frame: &[u8]) -> (IpAddr, u16) {
    let ip = wellformed::ip(frame).unwrap();
    let l4 = 14 + if ip.src.is_ipv4() { 20 } else { 40 };
    (ip.src, u16::from_be_bytes([frame[l4], frame[l4 + 1]]))
}

#[test]
fn full_nat_rewrites_both_ends_and_translates_replies_back() {
    let cases = [
        (
            "198.18.0.100:80/tcp",
            VIP4,
            &REALS4,
            SNAT4,
            Frame::tcp(CLIENT4, VIP4, 47000, 80, SYN),
        ),
        (
            "198.18.0.100:80/udp",
            VIP4,
            &REALS4,
            SNAT4,
            Frame::udp(CLIENT4, VIP4, 47001, 80),
        ),
        (
            "[fd00:18::100]:80/tcp",
            VIP6,
            &REALS6,
            SNAT6,
            Frame::tcp(CLIENT6, VIP6, 47002, 80, SYN),
        ),
        (
            "[fd00:18::100]:80/udp",
            VIP6,
            &REALS6,
            SNAT6,
            Frame::udp(CLIENT6, VIP6, 47003, 80),
        ),
    ];
    for (service, vip, reals, snat, request) in cases {
        let mut b = fullnat_service(service, reals, &[snat]);
        let real = predict(&equal_weight(reals), RING, five_tuple_hash(&request, true));
        let (verdict, out) = run(&mut b, &request.bytes());
        assert_eq!(verdict, XDP_TX, "{service}");
        let (src, port) = source_of(&out);
        assert_eq!(src, ip(snat), "{service}");
        assert!(port >= 1024, "{service}: SNAT port {port}");
        let translated = Frame {
            src: ip(snat),
            sport: port,
            ..request.clone()
        };
        assert_eq!(
            out,
            to_real(&translated, real, MAPPED),
            "{service}: request"
        );
        wellformed::l4_checksum(&out, &wellformed::ip(&out).unwrap()).unwrap();

        // The real answers the SNAT address; the client gets the answer from the VIP.
        let reply = reply_of(&translated, real, MAPPED, request.l4);
        let (verdict, out) = run(&mut b, &reply_bytes(&reply));
        assert_eq!(verdict, XDP_TX, "{service}: reply");
        let back = Frame {
            dst: request.src,
            dport: request.sport,
            ..reply.clone()
        };
        assert_eq!(out, to_client(&back, vip, 80), "{service}: reply");
        wellformed::l4_checksum(&out, &wellformed::ip(&out).unwrap()).unwrap();

        // The flow's next packets keep their SNAT port.
        for _ in 0..3 {
            let mut next = request.clone();
            if let L4::Tcp { flags } = &mut next.l4 {
                *flags = ACK;
            }
            let (_, out) = run(&mut b, &next.bytes());
            assert_eq!(source_of(&out), (ip(snat), port), "{service}: next request");
        }
    }
}

#[test]
fn full_nat_flows_get_distinct_sources_from_every_snat_address() {
    let mut b = fullnat_service("198.18.0.100:80/tcp", &[REALS4[0]], &[SNAT4, SNAT4_B]);
    let mut sources = std::collections::BTreeSet::new();
    for sport in 48000..48040 {
        let (_, out) = run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes());
        assert!(sources.insert(source_of(&out)), "a source given twice");
    }
    let addrs: std::collections::BTreeSet<IpAddr> = sources.iter().map(|s| s.0).collect();
    assert_eq!(addrs, [ip(SNAT4), ip(SNAT4_B)].into_iter().collect());
}

#[test]
fn full_nat_refuses_and_counts_a_flow_when_no_snat_port_is_free() {
    let real = REALS4[0];
    let mut b = fullnat_service("198.18.0.100:80/tcp", &[real], &[SNAT4]);
    // Every SNAT port towards this real's port is taken (by flows of other clients).
    let taken: Vec<(NatKey, NatReply)> = (lb_common::SNAT_PORT_MIN..=u16::MAX)
        .map(|port| {
            let key = NatKey {
                src: addr16(real),
                dst: addr16(SNAT4),
                sport: MAPPED.to_be(),
                dport: port.to_be(),
                proto: lb_common::PROTO_TCP,
                family: lb_common::FAMILY_V4,
                _pad: [0; 2],
            };
            let value = NatReply {
                vip: addr16(VIP4),
                client: addr16("198.18.9.9"),
                vport: 80u16.to_be(),
                client_port: port.to_be(),
                ..NatReply::default()
            };
            (key, value)
        })
        .collect();
    b.dataplane().insert_nat_replies(&taken).unwrap();
    let request = Frame::tcp(CLIENT4, VIP4, 49000, 80, SYN).bytes();
    assert_eq!(run(&mut b, &request).0, XDP_DROP);
    assert_eq!(
        b.dataplane()
            .global_counter(Global::DropSnatExhausted)
            .unwrap(),
        1
    );
    // The taken entries are untouched: no flow shares a port.
    let replies = b.dataplane().nat_replies().unwrap();
    assert_eq!(replies.len(), taken.len());
    assert!(
        replies
            .iter()
            .all(|(_, v)| v.client == addr16("198.18.9.9"))
    );
}

/// The 16-byte form the maps keep an address in (IPv4 in the first four bytes).
fn addr16(a: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip(a) {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// The full-NAT source a flow's connection-table entry holds: (SNAT address index, port).
fn entry_source(b: &mut Balancer, flow: &Frame) -> Option<(u16, u16)> {
    let v = b
        .dataplane()
        .conn(&conn_key(flow))
        .unwrap()
        .expect("the flow's entry");
    (v.flags & CONN_F_SNAT != 0).then(|| {
        (
            (v.flags & CONN_SNAT_ADDR_MASK) >> CONN_SNAT_ADDR_SHIFT,
            u16::from_be(v.snat_port),
        )
    })
}

#[test]
fn an_established_full_nat_flow_takes_its_source_from_its_connection_entry() {
    let snat = [SNAT4, SNAT4_B];
    let mut b = fullnat_service("198.18.0.100:80/tcp", &[REALS4[0]], &snat);
    let syn = Frame::tcp(CLIENT4, VIP4, 51000, 80, SYN);
    let ack = Frame {
        l4: L4::Tcp { flags: ACK },
        ..syn.clone()
    };
    let (_, out) = run(&mut b, &syn.bytes());
    let (addr, port) = source_of(&out);
    let index = snat.iter().position(|a| ip(a) == addr).unwrap() as u16;
    assert_eq!(entry_source(&mut b, &syn), Some((index, port)));
    let endpoint = |addr: IpAddr, port: u16| SnatEndpoint {
        addr: addr16(&addr.to_string()),
        port: port.to_be(),
        _pad: [0; 2],
    };

    // With its FULLNAT_FLOWS entry gone, the flow still leaves with its source: the entry's
    // (a claim would never give it that port again, its reply entry holds it).
    b.dataplane()
        .delete_fullnat_flows(&[(conn_key(&syn), endpoint(addr, port))])
        .unwrap();
    let (verdict, out) = run(&mut b, &ack.bytes());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(source_of(&out), (addr, port));

    // An entry without the source (an older build's, a synced one) falls back to
    // FULLNAT_FLOWS, and gets the source recorded.
    let mut b = fullnat_service("198.18.0.100:80/tcp", &[REALS4[0]], &snat);
    let (_, out) = run(&mut b, &syn.bytes());
    let (addr, port) = source_of(&out);
    let key = conn_key(&syn);
    let v = b.dataplane().conn(&key).unwrap().unwrap();
    let plain = ConnValue {
        flags: v.flags & !CONN_SNAT_BITS,
        snat_port: 0,
        ..v
    };
    b.dataplane().insert_conns(&[(key, plain)]).unwrap();
    assert_eq!(entry_source(&mut b, &syn), None);
    let (_, out) = run(&mut b, &ack.bytes());
    assert_eq!(source_of(&out), (addr, port));
    let index = snat.iter().position(|a| ip(a) == addr).unwrap() as u16;
    assert_eq!(entry_source(&mut b, &syn), Some((index, port)));

    // The daemon's expiry of the flow's reply entry takes the source out of its entry too: its
    // next packet claims a source afresh (in the reply table again, for this client).
    let aged: Vec<(NatKey, NatReply)> = b
        .dataplane()
        .nat_replies()
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let last_seen_s = v.last_seen_s - xlb::control::NAT_TCP_IDLE_S - 5;
            (k, NatReply { last_seen_s, ..v })
        })
        .collect();
    b.dataplane().insert_nat_replies(&aged).unwrap();
    assert_eq!(xlb::control::expire_nat_replies(&mut b).unwrap(), 1);
    assert_eq!(entry_source(&mut b, &syn), None);
    let (verdict, out) = run(&mut b, &ack.bytes());
    assert_eq!(verdict, XDP_TX);
    let (addr, port) = source_of(&out);
    let index = snat.iter().position(|a| ip(a) == addr).unwrap() as u16;
    assert_eq!(entry_source(&mut b, &syn), Some((index, port)));
    let replies = b.dataplane().nat_replies().unwrap();
    assert_eq!(replies.len(), 1);
    assert_eq!(
        (replies[0].0.dst, u16::from_be(replies[0].0.dport)),
        (addr16(&addr.to_string()), port)
    );
    assert_eq!(replies[0].1.client, addr16(CLIENT4));

    // Entries name their address by its index: another list of SNAT addresses for the service
    // (id 0, its only one) takes every source out of the table.
    b.dataplane()
        .set_snat(0, &[addr16(SNAT4_B), addr16(SNAT4)])
        .unwrap();
    assert_eq!(entry_source(&mut b, &syn), None);
    let (_, out) = run(&mut b, &ack.bytes());
    assert_eq!(source_of(&out), (addr, port), "kept, from FULLNAT_FLOWS");
    let index = [SNAT4_B, SNAT4].iter().position(|a| ip(a) == addr).unwrap() as u16;
    assert_eq!(entry_source(&mut b, &syn), Some((index, port)));
}

#[test]
fn reply_entries_expire_by_their_timeouts() {
    let (mut b, _) = nat_service("198.18.0.100:80/tcp", &REALS4, MAPPED);
    for sport in [50000, 50001, 50002] {
        run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes());
    }
    // The real's FIN ends its flow's entry sooner.
    let request = Frame::tcp(CLIENT4, VIP4, 50002, 80, SYN);
    let real = predict(
        &equal_weight(&REALS4),
        RING,
        five_tuple_hash(&request, true),
    );
    let fin = reply_of(&request, real, MAPPED, L4::Tcp { flags: ACK | 0x01 });
    assert_eq!(run(&mut b, &reply_bytes(&fin)).0, XDP_TX);
    let fresh = b.dataplane().nat_replies().unwrap();
    assert_eq!(fresh.len(), 3);
    assert_eq!(xlb::control::expire_nat_replies(&mut b).unwrap(), 0);
    // Age them: one idle just within the TCP timeout, one past it, and the closing one past
    // its shorter timeout.
    let now = fresh.iter().map(|(_, v)| v.last_seen_s).max().unwrap();
    let aged: Vec<(NatKey, NatReply)> = fresh
        .iter()
        .map(|(k, v)| {
            let idle = match u16::from_be(k.dport) {
                50000 => xlb::control::NAT_TCP_IDLE_S - 5,
                50001 => xlb::control::NAT_TCP_IDLE_S + 5,
                _ => xlb::control::NAT_CLOSING_IDLE_S + 5,
            };
            (
                *k,
                NatReply {
                    last_seen_s: now - idle,
                    ..*v
                },
            )
        })
        .collect();
    b.dataplane().insert_nat_replies(&aged).unwrap();
    assert_eq!(xlb::control::expire_nat_replies(&mut b).unwrap(), 2);
    let left = b.dataplane().nat_replies().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(u16::from_be(left[0].0.dport), 50000);
}

/// The reply cache's way holding `key`'s copy (index and content).
fn cached_way(b: &mut Balancer, key: &NatKey) -> Option<(u32, NatReplyWay)> {
    let ways = b.dataplane().cached_ways(key).unwrap()?;
    ways.into_iter().find(|(_, w)| {
        w.body.src == key.src[..4] && w.body.dst == key.dst[..4] && w.body.dport == key.dport
    })
}

/// A NAT director with one IPv4 TCP flow from client port `sport`: the real's ACK to it, and
/// the flow's reply entry.
fn one_flow(sport: u16) -> (Balancer, Frame, (NatKey, NatReply)) {
    let (mut b, _) = nat_service("198.18.0.100:80/tcp", &REALS4, MAPPED);
    let request = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN);
    run(&mut b, &request.bytes());
    let real = predict(
        &equal_weight(&REALS4),
        RING,
        five_tuple_hash(&request, true),
    );
    let reply = reply_of(&request, real, MAPPED, L4::Tcp { flags: ACK });
    let entry = b.dataplane().nat_replies().unwrap()[0];
    (b, reply, entry)
}

#[test]
fn ipv4_replies_are_translated_from_whole_cached_copies_only() {
    let (mut b, reply, (key, _)) = one_flow(50010);
    let expected = to_client(&reply, VIP4, 80);
    let (i, copy) = cached_way(&mut b, &key).expect("the flow's reply entry is copied");
    assert_eq!(copy.seal, copy.body.seal());
    assert_eq!(
        run(&mut b, &reply_bytes(&reply)),
        (XDP_TX, expected.clone())
    );

    // A torn copy (here: another VIP, under the old seal) is refused: the reply table answers.
    let other_vip = [198, 18, 0, 200];
    let torn = NatReplyWay {
        body: NatReplyBody {
            vip: other_vip,
            ..copy.body
        },
        ..copy
    };
    b.dataplane().set_cached_way(i, torn).unwrap();
    assert_eq!(
        run(&mut b, &reply_bytes(&reply)),
        (XDP_TX, expected.clone())
    );
    // Sealed, the same copy is whole, and used: replies are translated from the cache.
    let whole = NatReplyWay {
        seal: torn.body.seal(),
        ..torn
    };
    b.dataplane().set_cached_way(i, whole).unwrap();
    assert_eq!(
        run(&mut b, &reply_bytes(&reply)),
        (XDP_TX, to_client(&reply, "198.18.0.200", 80))
    );
    // Deleting the flow's reply entry takes its copy with it: its replies pass untouched.
    b.dataplane().delete_nat_replies(&[key]).unwrap();
    assert!(cached_way(&mut b, &key).is_none_or(|(_, w)| w.seal != w.body.seal()));
    let frame = reply_bytes(&reply);
    assert_eq!(run(&mut b, &frame), (XDP_PASS, frame));
}

#[test]
fn replies_found_in_the_cache_keep_their_flow_from_expiring() {
    let (mut b, reply, (key, entry)) = one_flow(50020);
    // Its entry and copy idle past the TCP timeout...
    let aged = NatReply {
        last_seen_s: entry.last_seen_s - xlb::control::NAT_TCP_IDLE_S - 5,
        ..entry
    };
    b.dataplane().insert_nat_replies(&[(key, aged)]).unwrap();
    // ...then a reply, found in the cache: the copy is refreshed, not the entry.
    assert_eq!(run(&mut b, &reply_bytes(&reply)).0, XDP_TX);
    assert_eq!(b.dataplane().nat_replies().unwrap(), vec![(key, aged)]);
    let seen = b.dataplane().cached_reply_seen(&key).unwrap();
    assert!(seen.is_some_and(|s| s >= entry.last_seen_s), "{seen:?}");
    assert_eq!(xlb::control::expire_nat_replies(&mut b).unwrap(), 0);
    // Both idle: the flow expires, and its replies pass untouched.
    b.dataplane().insert_nat_replies(&[(key, aged)]).unwrap();
    assert_eq!(xlb::control::expire_nat_replies(&mut b).unwrap(), 1);
    let frame = reply_bytes(&reply);
    assert_eq!(run(&mut b, &frame), (XDP_PASS, frame));
}

// ---------------------------------------------------------------------------------------
// ICMP errors about NAT flows: translated for the other side, so that path MTU discovery works
// through the director. Expected errors are built whole by the frame builder (every checksum
// summed afresh: ICMP, the quoted IPv4 header, the quoted TCP/UDP segment).

/// A router between the director and the reals, and one between the director and the clients.
const REAL_SIDE4: &str = "198.18.0.1";
const REAL_SIDE6: &str = "fd00:18::1";
const CLIENT_SIDE4: &str = "198.18.2.1";
const CLIENT_SIDE6: &str = "fd00:18:2::1";

/// (type, code, last four header bytes) of the errors tested, per family: "fragmentation
/// needed" / "packet too big" with an MTU, port unreachable, time exceeded.
const ERRORS4: [(u8, u8, [u8; 4]); 3] =
    [(3, 4, [0, 0, 0x05, 0x78]), (3, 3, [0; 4]), (11, 0, [0; 4])];
const ERRORS6: [(u8, u8, [u8; 4]); 3] =
    [(2, 0, [0, 0, 0x05, 0x00]), (1, 4, [0; 4]), (3, 0, [0; 4])];

/// An error from `from` to the source of `quoted`, quoting `quote_len` bytes of its IP packet
/// (all of it when shorter).
fn error_about(from: IpAddr, quoted: &Frame, kind: (u8, u8, [u8; 4]), quote_len: usize) -> Frame {
    error_to(from, quoted.src, quoted, kind, quote_len)
}

fn error_to(
    from: IpAddr,
    to: IpAddr,
    quoted: &Frame,
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    quote_len: usize,
) -> Frame {
    let bytes = quoted.bytes();
    let packet = &bytes[l2_len(&bytes)..];
    let quote = &packet[..quote_len.min(packet.len())];
    Frame::icmp(
        &from.to_string(),
        &to.to_string(),
        icmp_type,
        code,
        rest,
        quote,
    )
}

/// The RFC validators agree on a translated error: its IP header and ICMP checksum, and the
/// quoted IPv4 header's checksum.
fn valid_error(frame: &[u8], name: &str) {
    let ip = wellformed::ip(frame).unwrap_or_else(|e| panic!("{name}: {e}"));
    wellformed::l4_checksum(frame, &ip).unwrap_or_else(|e| panic!("{name}: {e}"));
    let quote = &ip.payload(frame)[8..];
    if ip.version == 4 {
        assert_eq!(
            checksum(&quote[..20]),
            0,
            "{name}: quoted IPv4 header checksum"
        );
    }
}

/// One NAT flow set up in the director: the client's request, the packet the real got for it,
/// the real's reply to that, and the reply as the client got it.
struct NatFlow {
    b: Balancer,
    real: IpAddr,
    request: Frame,
    at_real: Frame,
    reply: Frame,
    at_client: Frame,
}

/// A flow of `request` through a NAT (`snat` None) or full-NAT service, request and reply.
fn nat_flow(service: &str, reals: &[&str], snat: Option<&str>, request: Frame) -> NatFlow {
    let vip = request.dst;
    let mut b = match snat {
        None => nat_service(service, reals, MAPPED).0,
        Some(snat) => fullnat_service(service, reals, &[snat]),
    };
    let real = predict(&equal_weight(reals), RING, five_tuple_hash(&request, true));
    let (verdict, out) = run(&mut b, &request.bytes());
    assert_eq!(verdict, XDP_TX, "{service}: request");
    let (src, sport) = source_of(&out);
    let at_real = Frame {
        src,
        sport,
        dst: real,
        dport: MAPPED,
        ..request.clone()
    };
    assert_eq!(out, to_real(&at_real, real, MAPPED), "{service}: request");
    let reply = Frame {
        payload: vec![0x5a; 300],
        ..reply_of(&at_real, real, MAPPED, request.l4)
    };
    let (verdict, out) = run(&mut b, &reply_bytes(&reply));
    assert_eq!(verdict, XDP_TX, "{service}: reply");
    let at_client = Frame {
        src: vip,
        sport: request.dport,
        dst: request.src,
        dport: request.sport,
        ..reply.clone()
    };
    assert_eq!(
        out,
        with_macs(at_client.bytes(), CLIENT_MAC, DIRECTOR_MAC),
        "{service}: reply"
    );
    NatFlow {
        b,
        real,
        request,
        at_real,
        reply,
        at_client,
    }
}

/// A flow the ICMP tests run, with the routers on either side and the errors of its family.
struct IcmpCase {
    name: &'static str,
    flow: NatFlow,
    real_side: IpAddr,
    client_side: IpAddr,
    errors: [(u8, u8, [u8; 4]); 3],
    fullnat: bool,
}

/// NAT and full NAT, both families, TCP and UDP.
fn icmp_cases() -> Vec<IcmpCase> {
    let mut cases = Vec::new();
    for (name, service, snat, tcp) in [
        ("nat tcp v4", "198.18.0.100:80/tcp", None, true),
        ("nat udp v4", "198.18.0.100:80/udp", None, false),
        ("nat tcp v6", "[fd00:18::100]:80/tcp", None, true),
        ("nat udp v6", "[fd00:18::100]:80/udp", None, false),
        ("fullnat tcp v4", "198.18.0.100:80/tcp", Some(SNAT4), true),
        ("fullnat udp v4", "198.18.0.100:80/udp", Some(SNAT4), false),
        ("fullnat tcp v6", "[fd00:18::100]:80/tcp", Some(SNAT6), true),
        (
            "fullnat udp v6",
            "[fd00:18::100]:80/udp",
            Some(SNAT6),
            false,
        ),
    ] {
        let v4 = name.ends_with("v4");
        let (client, vip) = if v4 { (CLIENT4, VIP4) } else { (CLIENT6, VIP6) };
        let request = Frame {
            payload: vec![0xa5; 400],
            df: true,
            ..if tcp {
                Frame::tcp(client, vip, 51000, 80, ACK)
            } else {
                Frame::udp(client, vip, 51000, 80)
            }
        };
        let reals: &[&str] = if v4 { &REALS4 } else { &REALS6 };
        cases.push(IcmpCase {
            name,
            flow: nat_flow(service, reals, snat, request),
            real_side: ip(if v4 { REAL_SIDE4 } else { REAL_SIDE6 }),
            client_side: ip(if v4 { CLIENT_SIDE4 } else { CLIENT_SIDE6 }),
            errors: if v4 { ERRORS4 } else { ERRORS6 },
            fullnat: snat.is_some(),
        });
    }
    cases
}

/// Quote lengths tried: the whole packet, and RFC 792's minimum, the IP header and 8 bytes (no
/// TCP checksum in it; the UDP one is).
fn quote_lens(f: &Frame) -> [usize; 2] {
    [usize::MAX, if f.src.is_ipv4() { 28 } else { 48 }]
}

#[test]
fn errors_from_the_reals_side_reach_the_client_about_its_own_request() {
    for IcmpCase {
        name,
        mut flow,
        real_side,
        errors,
        ..
    } in icmp_cases()
    {
        let mut sent = 0;
        // From a router between the director and the real, and from the real itself.
        for from in [real_side, flow.real] {
            for kind in errors {
                for len in quote_lens(&flow.request) {
                    let error = error_about(from, &flow.at_real, kind, len);
                    let input = with_macs(error.bytes(), DIRECTOR_MAC, real_mac(flow.real));
                    let want =
                        error_to(flow.request.dst, flow.request.src, &flow.request, kind, len);
                    let (verdict, out) = run(&mut flow.b, &input);
                    let case = format!("{name}: from {from}, {kind:?}, quote {len}");
                    assert_eq!(verdict, XDP_TX, "{case}");
                    assert_eq!(
                        out,
                        with_macs(want.bytes(), CLIENT_MAC, DIRECTOR_MAC),
                        "{case}"
                    );
                    valid_error(&out, &case);
                    sent += 1;
                }
            }
        }
        assert_eq!(
            flow.b
                .dataplane()
                .global_counter(Global::IcmpErrorForwarded)
                .unwrap(),
            sent,
            "{name}"
        );
    }
}

#[test]
fn errors_from_the_clients_side_reach_the_real_about_its_own_reply() {
    for IcmpCase {
        name,
        mut flow,
        client_side,
        errors,
        fullnat,
        ..
    } in icmp_cases()
    {
        for kind in errors {
            for len in quote_lens(&flow.request) {
                let error = error_about(client_side, &flow.at_client, kind, len);
                let input = with_macs(error.bytes(), DIRECTOR_MAC, CLIENT_MAC);
                // In full NAT the real hears from the SNAT address, as with the flow's requests.
                let from = if fullnat {
                    flow.at_real.src
                } else {
                    client_side
                };
                let want = error_to(from, flow.real, &flow.reply, kind, len);
                let (verdict, out) = run(&mut flow.b, &input);
                let case = format!("{name}: {kind:?}, quote {len}");
                assert_eq!(verdict, XDP_TX, "{case}");
                assert_eq!(
                    out,
                    with_macs(want.bytes(), real_mac(flow.real), DIRECTOR_MAC),
                    "{case}"
                );
                valid_error(&out, &case);
            }
        }
    }
}

#[test]
fn errors_about_no_nat_flow_pass_untouched() {
    for IcmpCase {
        name,
        mut flow,
        real_side,
        client_side,
        errors,
        fullnat,
    } in icmp_cases()
    {
        let strangers = [
            // About a request of another client port: no such flow.
            error_about(
                real_side,
                &Frame {
                    sport: flow.at_real.sport.wrapping_add(1),
                    ..flow.at_real.clone()
                },
                errors[0],
                usize::MAX,
            ),
            // About a packet from another real port.
            error_about(
                real_side,
                &Frame {
                    dport: MAPPED + 1,
                    ..flow.at_real.clone()
                },
                errors[0],
                usize::MAX,
            ),
        ];
        for (i, error) in strangers.iter().enumerate() {
            let input = with_macs(error.bytes(), DIRECTOR_MAC, real_mac(flow.real));
            assert_eq!(
                run(&mut flow.b, &input),
                (XDP_PASS, input.clone()),
                "{name}: stranger {i}"
            );
        }
        if fullnat {
            // About a reply to a client port whose flow never got an SNAT port.
            let error = error_about(
                client_side,
                &Frame {
                    dport: flow.at_client.dport.wrapping_add(1),
                    ..flow.at_client.clone()
                },
                errors[0],
                usize::MAX,
            );
            let input = with_macs(error.bytes(), DIRECTOR_MAC, CLIENT_MAC);
            assert_eq!(run(&mut flow.b, &input), (XDP_PASS, input), "{name}");
        }
        // The flow's own error, sent to another host's MAC, is not ours to translate.
        let error = error_about(real_side, &flow.at_real, errors[0], usize::MAX);
        let input = with_macs(error.bytes(), [0x02, 0, 0, 0, 0, 0x77], real_mac(flow.real));
        assert_eq!(
            run(&mut flow.b, &input),
            (XDP_PASS, input),
            "{name}: not ours"
        );
        assert_eq!(
            flow.b
                .dataplane()
                .global_counter(Global::IcmpErrorForwarded)
                .unwrap(),
            0,
            "{name}"
        );
    }
}

#[test]
fn full_nat_ports_never_collide_when_two_cpus_allocate_at_once() {
    // Two CPUs each start 5,000 flows of distinct clients to one real, at the same time, from
    // one SNAT address: random ports meet hundreds of times (the birthday bound), and only
    // the atomic claim keeps two flows from sharing one. A 15 % full port range: no flow is
    // refused.
    const FLOWS: u16 = 5000;
    let mut b = fullnat_service("198.18.0.100:80/tcp", &[REALS4[0]], &[SNAT4]);
    let frames: Vec<Vec<Vec<u8>>> = (0..2u16)
        .map(|cpu| {
            (0..FLOWS)
                .map(|i| {
                    let client = format!("198.18.{}.{}", 4 + cpu * 64 + i / 250, 1 + i % 250);
                    Frame::tcp(&client, VIP4, 40000 + i, 80, SYN).bytes()
                })
                .collect()
        })
        .collect();
    let runs = b
        .dataplane()
        .test_run_on_cpus(BALANCER_PROGRAM, &frames)
        .unwrap();
    let mut sources = std::collections::HashSet::new();
    for (verdict, out) in runs.iter().flatten() {
        assert_eq!(*verdict, XDP_TX);
        let source = source_of(out);
        assert_eq!(source.0, ip(SNAT4));
        assert!(sources.insert(source), "SNAT source {source:?} given twice");
    }
    assert_eq!(sources.len(), 2 * FLOWS as usize);
    assert_eq!(
        b.dataplane().nat_replies().unwrap().len(),
        2 * FLOWS as usize
    );
}
