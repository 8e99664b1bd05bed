//! Packet tests: the compiled XDP program runs under BPF_PROG_TEST_RUN, and each case states
//! the input frame, the expected verdict and the expected output frame (Katran's fixtures).

use std::net::IpAddr;

use lb_common::Global;
use xlb::{
    config::{HashKind, RealConfig, ServiceAddr, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const RING: u32 = 65537;

/// A balancer with one service and reals whose MACs are known.
fn with_service(service: &str, reals: &[&str], hash: HashKind) -> (Balancer, ServiceAddr) {
    let mut b = balancer();
    let addr: ServiceAddr = service.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.hash = hash;
    for r in reals {
        b.set_link(ip(r), Some(link(real_mac(ip(r))))).unwrap();
        cfg.reals.push(RealConfig::new(ip(r), 100));
    }
    b.add_service(cfg).unwrap();
    (b, addr)
}

fn run(b: &mut Balancer, frame: &[u8]) -> (u32, Vec<u8>) {
    b.dataplane().test_run(BALANCER_PROGRAM, frame).unwrap()
}

/// The frame DR forwarding must produce: only the two MACs differ.
fn dr_rewritten(frame: &[u8], real: IpAddr) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&real_mac(real));
    out[6..12].copy_from_slice(&DIRECTOR_MAC);
    out
}

const REALS4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const REALS6: [&str; 3] = ["fd00:18::11", "fd00:18::12", "fd00:18::13"];

#[test]
fn dr_forwards_to_the_predicted_real_rewriting_only_macs() {
    struct Case {
        name: &'static str,
        service: &'static str,
        reals: &'static [&'static str],
        frame: Frame,
    }
    let cases = [
        Case {
            name: "tcp syn v4",
            service: "198.18.0.100:80/tcp",
            reals: &REALS4,
            frame: Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN),
        },
        Case {
            name: "udp v4",
            service: "198.18.0.100:53/udp",
            reals: &REALS4,
            frame: Frame::udp(CLIENT4, VIP4, 40001, 53),
        },
        Case {
            name: "tcp syn v6",
            service: "[fd00:18::100]:443/tcp",
            reals: &REALS6,
            frame: Frame::tcp(CLIENT6, VIP6, 40002, 443, SYN),
        },
        Case {
            name: "udp v6",
            service: "[fd00:18::100]:53/udp",
            reals: &REALS6,
            frame: Frame::udp(CLIENT6, VIP6, 40003, 53),
        },
        Case {
            name: "port-0 service takes any port",
            service: "198.18.0.100:0/udp",
            reals: &REALS4,
            frame: Frame::udp(CLIENT4, VIP4, 40004, 9999),
        },
        Case {
            name: "vlan tagged",
            service: "198.18.0.100:80/tcp",
            reals: &REALS4,
            frame: Frame {
                vlan: Some(42),
                ..Frame::tcp(CLIENT4, VIP4, 40005, 80, SYN)
            },
        },
        Case {
            name: "ipv4 with options",
            service: "198.18.0.100:80/tcp",
            reals: &REALS4,
            frame: Frame {
                // Record route (7), length 11, pointer 4, two empty slots, then end of list.
                ipv4_options: vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..Frame::tcp(CLIENT4, VIP4, 40006, 80, SYN)
            },
        },
    ];
    for case in cases {
        let (mut b, _) = with_service(case.service, case.reals, HashKind::FiveTuple);
        let input = case.frame.bytes();
        let expected_real = predict(
            &equal_weight(case.reals),
            RING,
            five_tuple_hash(&case.frame, true),
        );
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{}: verdict", case.name);
        assert_eq!(
            out,
            dr_rewritten(&input, expected_real),
            "{}: output frame",
            case.name
        );
    }
}

#[test]
fn non_service_traffic_passes_byte_identical() {
    let (mut b, _) = with_service("198.18.0.100:80/tcp", &REALS4, HashKind::FiveTuple);
    let frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "arp for the vip",
            arp_request([198, 18, 1, 1], [198, 18, 0, 100]),
        ),
        (
            "tcp to another port of the vip",
            Frame::tcp(CLIENT4, VIP4, 40000, 81, SYN).bytes(),
        ),
        (
            "udp to the service port",
            Frame::udp(CLIENT4, VIP4, 40000, 80).bytes(),
        ),
        (
            "tcp to the director's own ip",
            Frame::tcp(CLIENT4, "198.18.0.2", 40000, 22, SYN).bytes(),
        ),
        (
            "ipv6 tcp, no v6 service",
            Frame::tcp(CLIENT6, VIP6, 40000, 80, SYN).bytes(),
        ),
        (
            "vlan tagged, other address",
            Frame {
                vlan: Some(7),
                ..Frame::udp(CLIENT4, "198.18.0.2", 5000, 53)
            }
            .bytes(),
        ),
        ("icmp echo to the director", icmp_echo_v4()),
        ("syn for the service, sent to another host's mac", {
            // A switch flooding unknown unicast shows us another director's frames: that
            // director forwards them, so we must not.
            let mut f = Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN).bytes();
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
            f
        }),
    ];
    for (name, input) in frames {
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_PASS, "{name}: verdict");
        assert_eq!(out, input, "{name}: bytes changed");
    }
    assert_eq!(b.dataplane().global_counter(Global::Forwarded).unwrap(), 0);
    assert_eq!(b.dataplane().global_counter(Global::Passed).unwrap(), 8);
}

fn icmp_echo_v4() -> Vec<u8> {
    let mut f = Frame::udp(CLIENT4, "198.18.0.2", 0, 0).bytes();
    f[14 + 9] = 1; // protocol ICMP; the checksum no longer matters to a pass verdict
    f
}

#[test]
fn an_established_flow_keeps_its_real_when_the_reals_change() {
    let (mut b, svc) = with_service("198.18.0.100:80/tcp", &["198.18.0.11"], HashKind::FiveTuple);
    let more = ["198.18.0.12", "198.18.0.13", "198.18.0.14", "198.18.0.15"];
    let after: Vec<(IpAddr, u32)> = ["198.18.0.11"]
        .iter()
        .chain(more.iter())
        .map(|r| (ip(r), 100))
        .collect();
    // A flow that a fresh schedule after the change would put elsewhere than 198.18.0.11.
    let sport = (1000..2000)
        .find(|p| {
            let f = Frame::tcp(CLIENT4, VIP4, *p, 80, SYN);
            predict(&after, RING, five_tuple_hash(&f, true)) != ip("198.18.0.11")
        })
        .unwrap();
    let syn = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes();
    let ack = Frame::tcp(CLIENT4, VIP4, sport, 80, ACK).bytes();
    assert_eq!(
        run(&mut b, &syn),
        (XDP_TX, dr_rewritten(&syn, ip("198.18.0.11")))
    );
    for r in more {
        b.set_link(ip(r), Some(link(real_mac(ip(r))))).unwrap();
        b.add_real(&svc, RealConfig::new(ip(r), 100)).unwrap();
    }
    b.set_weight(&svc, ip("198.18.0.11"), 50).unwrap();
    assert_eq!(
        run(&mut b, &ack),
        (XDP_TX, dr_rewritten(&ack, ip("198.18.0.11"))),
        "established flow moved"
    );
    // A new connection on the same 5-tuple (a SYN) is scheduled afresh.
    let expected = predict(
        &[(ip("198.18.0.11"), 50)]
            .into_iter()
            .chain(more.iter().map(|r| (ip(r), 100)))
            .collect::<Vec<_>>(),
        RING,
        five_tuple_hash(&Frame::tcp(CLIENT4, VIP4, sport, 80, SYN), true),
    );
    assert_eq!(run(&mut b, &syn), (XDP_TX, dr_rewritten(&syn, expected)));
}

#[test]
fn flows_of_a_removed_real_are_rescheduled_and_its_id_reuse_does_not_inherit_them() {
    let (mut b, svc) = with_service("198.18.0.100:80/tcp", &["198.18.0.11"], HashKind::FiveTuple);
    let ack = Frame::tcp(CLIENT4, VIP4, 5555, 80, ACK).bytes();
    assert_eq!(
        run(&mut b, &ack),
        (XDP_TX, dr_rewritten(&ack, ip("198.18.0.11")))
    );
    b.remove_real(&svc, ip("198.18.0.11")).unwrap();
    // No real left: dropped, and counted.
    assert_eq!(run(&mut b, &ack).0, XDP_DROP);
    assert_eq!(
        b.dataplane().global_counter(Global::DropNoBackend).unwrap(),
        1
    );
    b.set_link(ip("198.18.0.12"), Some(link(real_mac(ip("198.18.0.12")))))
        .unwrap();
    b.add_real(&svc, RealConfig::new(ip("198.18.0.12"), 100))
        .unwrap();
    assert_eq!(
        run(&mut b, &ack),
        (XDP_TX, dr_rewritten(&ack, ip("198.18.0.12")))
    );
}

#[test]
fn a_real_with_an_unknown_mac_gets_nothing() {
    let (mut b, svc) = with_service("198.18.0.100:80/tcp", &["198.18.0.11"], HashKind::FiveTuple);
    b.add_real(&svc, RealConfig::new(ip("198.18.0.12"), 100))
        .unwrap();
    for sport in 1000..1200 {
        let f = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes();
        assert_eq!(
            run(&mut b, &f),
            (XDP_TX, dr_rewritten(&f, ip("198.18.0.11")))
        );
    }
    // Its MAC lost: the tracked flows re-schedule, nothing goes to a zero MAC.
    b.set_link(ip("198.18.0.11"), None).unwrap();
    let ack = Frame::tcp(CLIENT4, VIP4, 1000, 80, ACK).bytes();
    assert_eq!(run(&mut b, &ack).0, XDP_DROP);
}

#[test]
fn source_ip_hashing_sends_all_of_a_clients_connections_to_one_real() {
    let reals = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];
    let (mut b, _) = with_service("198.18.0.100:80/tcp", &reals, HashKind::SrcIp);
    for client in ["198.18.1.1", "198.18.1.2", "198.18.1.3"] {
        let mut seen = std::collections::BTreeSet::new();
        for sport in 2000..2050 {
            let f = Frame::tcp(client, VIP4, sport, 80, SYN).bytes();
            let (verdict, out) = run(&mut b, &f);
            assert_eq!(verdict, XDP_TX);
            seen.insert(out[..6].to_vec());
        }
        assert_eq!(seen.len(), 1, "client {client} was spread over {seen:?}");
    }
}

#[test]
fn all_fragments_of_a_datagram_reach_the_same_real() {
    let reals = ["198.18.0.11", "198.18.0.12", "198.18.0.13", "198.18.0.14"];
    let cases = [
        ("198.18.0.100:53/udp", CLIENT4, VIP4),
        ("[fd00:18::100]:53/udp", CLIENT6, VIP6),
    ];
    for (service, client, vip) in cases {
        let reals6 = ["fd00:18::11", "fd00:18::12", "fd00:18::13", "fd00:18::14"];
        let reals: &[&str] = if vip == VIP4 { &reals } else { &reals6 };
        let (mut b, _) = with_service(service, reals, HashKind::FiveTuple);
        for id in 0..20u32 {
            let first = Frame {
                fragment: Some((id, 0, true)),
                ..Frame::udp(client, vip, 3000 + id as u16, 53)
            };
            let later = Frame {
                fragment: Some((id, 4, false)),
                ..first.clone()
            };
            // Scheduled on addresses only: the ports of the first fragment do not matter.
            let expected = predict(&equal_weight(reals), RING, five_tuple_hash(&first, false));
            let (v1, out1) = run(&mut b, &first.bytes());
            let (v2, out2) = run(&mut b, &later.bytes());
            assert_eq!((v1, v2), (XDP_TX, XDP_TX), "{service} datagram {id}");
            assert_eq!(out1, dr_rewritten(&first.bytes(), expected));
            assert_eq!(out2, dr_rewritten(&later.bytes(), expected));
        }
        // A later fragment whose first was never seen cannot be matched to port 53: it passes.
        let orphan = Frame {
            fragment: Some((999, 8, false)),
            ..Frame::udp(client, vip, 1, 53)
        }
        .bytes();
        assert_eq!(run(&mut b, &orphan), (XDP_PASS, orphan.clone()));
        assert_eq!(
            b.dataplane().global_counter(Global::FragUntracked).unwrap(),
            1
        );
    }
    // With an all-ports service even an orphan later fragment is scheduled, consistently.
    let (mut b, _) = with_service("198.18.0.100:0/udp", &reals, HashKind::FiveTuple);
    let orphan = Frame {
        fragment: Some((77, 8, false)),
        ..Frame::udp(CLIENT4, VIP4, 1, 53)
    };
    let expected = predict(&equal_weight(&reals), RING, five_tuple_hash(&orphan, false));
    let input = orphan.bytes();
    assert_eq!(
        run(&mut b, &input),
        (XDP_TX, dr_rewritten(&input, expected))
    );
}

#[test]
fn frames_truncated_at_every_length_pass_or_drop_never_abort() {
    let (mut b, _) = with_service("198.18.0.100:0/tcp", &REALS4, HashKind::FiveTuple);
    let (mut b6, _) = with_service("[fd00:18::100]:0/udp", &REALS6, HashKind::FiveTuple);
    let frames = [
        Frame::tcp(CLIENT4, VIP4, 1, 80, SYN),
        Frame {
            vlan: Some(5),
            ipv4_options: vec![1, 1, 1, 0],
            ..Frame::tcp(CLIENT4, VIP4, 1, 80, SYN)
        },
        Frame {
            fragment: Some((1, 0, true)),
            ..Frame::udp(CLIENT6, VIP6, 1, 53)
        },
        Frame::udp(CLIENT6, VIP6, 1, 53),
    ];
    let mut tested = 0;
    for frame in frames {
        let full = frame.bytes();
        let bal = if frame.src.is_ipv4() { &mut b } else { &mut b6 };
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for len in 14..full.len() {
            let input = &full[..len];
            let (verdict, out) = run(bal, input);
            assert!(
                verdict == XDP_PASS || verdict == XDP_DROP || verdict == XDP_TX,
                "length {len}: verdict {verdict}"
            );
            assert_ne!(verdict, XDP_ABORTED);
            if verdict == XDP_PASS {
                assert_eq!(out, input, "length {len}: a passed frame was changed");
            }
            tested += 1;
        }
    }
    assert!(tested > 200);
}

#[test]
fn counters_count_packets_bytes_and_new_flows_per_service_and_real() {
    let (mut b, svc) = with_service("198.18.0.100:80/tcp", &["198.18.0.11"], HashKind::FiveTuple);
    let syn = Frame::tcp(CLIENT4, VIP4, 4000, 80, SYN).bytes();
    let ack = Frame::tcp(CLIENT4, VIP4, 4000, 80, ACK).bytes();
    for f in [&syn, &ack, &ack] {
        assert_eq!(run(&mut b, f).0, XDP_TX);
    }
    let id = b.service_id(&svc).unwrap();
    let real = b.real_backend_id(&svc, ip("198.18.0.11")).unwrap();
    let expect_bytes = (syn.len() + 2 * ack.len()) as u64;
    for c in [
        b.dataplane().all_service_counters().unwrap()[id as usize],
        b.dataplane().all_backend_counters().unwrap()[real as usize],
    ] {
        assert_eq!((c.packets, c.bytes, c.new_flows), (3, expect_bytes, 1));
    }
    assert_eq!(b.dataplane().global_counter(Global::Forwarded).unwrap(), 3);
    assert_eq!(b.dataplane().global_counter(Global::ConnMiss).unwrap(), 0);
    // An ACK of a flow never seen (no SYN) misses the table once, then is tracked.
    let stray = Frame::tcp(CLIENT4, VIP4, 4001, 80, ACK).bytes();
    run(&mut b, &stray);
    run(&mut b, &stray);
    assert_eq!(b.dataplane().global_counter(Global::ConnMiss).unwrap(), 1);
    assert_eq!(b.dataplane().conns().unwrap().len(), 2);
}

#[test]
fn removing_a_service_passes_its_traffic_again() {
    let (mut b, svc) = with_service("198.18.0.100:80/tcp", &REALS4, HashKind::FiveTuple);
    let f = Frame::tcp(CLIENT4, VIP4, 4000, 80, SYN).bytes();
    assert_eq!(run(&mut b, &f).0, XDP_TX);
    b.remove_service(&svc).unwrap();
    assert_eq!(run(&mut b, &f), (XDP_PASS, f.clone()));
}

#[test]
fn a_client_fin_or_rst_marks_its_flow_closing_and_a_new_syn_clears_it() {
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;
    let (mut b, _) = with_service("198.18.0.100:80/tcp", &REALS4, HashKind::FiveTuple);
    let flags_of = |b: &mut Balancer, sport: u16| {
        let key = conn_key(&Frame::tcp(CLIENT4, VIP4, sport, 80, ACK));
        let v = b.dataplane().conn(&key).unwrap().expect("flow tracked");
        // The closing mark only (other bits: the ACK seen, the SYN's time).
        v.flags & lb_common::CONN_F_CLOSING
    };
    for (sport, close) in [(41000u16, FIN | ACK), (41001, RST)] {
        run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes());
        run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, ACK).bytes());
        assert_eq!(flags_of(&mut b, sport), 0, "open flow marked closing");
        let (verdict, _) = run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, close).bytes());
        assert_eq!(verdict, XDP_TX, "the closing packet still goes to its real");
        assert_eq!(flags_of(&mut b, sport), lb_common::CONN_F_CLOSING);
        // The last ACK of the close keeps the mark; a new connection on the 5-tuple clears it.
        run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, ACK).bytes());
        assert_eq!(flags_of(&mut b, sport), lb_common::CONN_F_CLOSING);
        run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes());
        assert_eq!(
            flags_of(&mut b, sport),
            0,
            "a new SYN inherited the closing mark"
        );
    }
}

#[test]
fn an_established_flow_records_the_second_it_was_last_seen() {
    let (mut b, _) = with_service("198.18.0.100:80/tcp", &REALS4, HashKind::FiveTuple);
    let sport = 41100u16;
    let last_seen = |b: &mut Balancer| {
        let key = conn_key(&Frame::tcp(CLIENT4, VIP4, sport, 80, ACK));
        let v = b.dataplane().conn(&key).unwrap().expect("flow tracked");
        v.last_seen_s
    };
    run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes());
    let first = last_seen(&mut b);
    // The data path divides only when a packet falls outside the recorded second.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    run(&mut b, &Frame::tcp(CLIENT4, VIP4, sport, 80, ACK).bytes());
    let later = last_seen(&mut b);
    assert!(
        (first + 2..=first + 3).contains(&later),
        "last seen {first}, then {later} about 2.1 s later"
    );
}

/// The real a flow from `sport` is on, by the destination MAC of its forwarded frame.
fn real_of(b: &mut Balancer, flags: u8, sport: u16, reals: &[&str]) -> Option<IpAddr> {
    let frame = Frame::tcp(CLIENT4, VIP4, sport, 80, flags).bytes();
    let (verdict, out) = run(b, &frame);
    if verdict != XDP_TX {
        return None;
    }
    reals
        .iter()
        .map(|r| ip(r))
        .find(|r| out[..6] == real_mac(*r))
}

#[test]
fn a_real_going_down_moves_its_flows_unless_the_service_keeps_them() {
    use xlb::{config::OnDown, health::Health};
    for on_down in [OnDown::Move, OnDown::Keep] {
        let mut b = balancer();
        let svc: ServiceAddr = "198.18.0.100:80/tcp".parse().unwrap();
        let mut cfg = ServiceConfig::new(svc);
        cfg.on_down = on_down;
        for r in REALS4 {
            b.set_link(ip(r), Some(link(real_mac(ip(r))))).unwrap();
            cfg.reals.push(RealConfig::new(ip(r), 100));
        }
        b.add_service(cfg).unwrap();
        // Flows on every real; then the first one goes down.
        let on: Vec<(u16, IpAddr)> = (2000..2060)
            .map(|p| (p, real_of(&mut b, SYN, p, &REALS4).unwrap()))
            .collect();
        let down = ip(REALS4[0]);
        assert!(b.set_health(&svc, down, Health::Down).unwrap());
        for (p, was) in &on {
            let now = real_of(&mut b, ACK, *p, &REALS4).unwrap();
            match (on_down, *was == down) {
                (OnDown::Move, true) => assert_ne!(now, down, "{on_down:?}: flow stayed"),
                _ => assert_eq!(now, *was, "{on_down:?}: flow {p} moved"),
            }
        }
        // New flows never reach the down real, either way.
        for p in 3000..3100 {
            assert_ne!(real_of(&mut b, SYN, p, &REALS4), Some(down));
        }
        let status = b.real_status(&svc);
        assert!(status.iter().any(|r| r.addr == down && !r.in_table));
        // Up again: new flows reach it again.
        assert!(b.set_health(&svc, down, Health::Up).unwrap());
        assert!((3000..3100).any(|p| real_of(&mut b, SYN, p, &REALS4) == Some(down)));
    }
}

#[test]
fn drained_reals_keep_their_flows_and_get_no_new_ones() {
    let (mut b, svc) = with_service("198.18.0.100:80/tcp", &REALS4, HashKind::FiveTuple);
    let on: Vec<(u16, IpAddr)> = (2000..2060)
        .map(|p| (p, real_of(&mut b, SYN, p, &REALS4).unwrap()))
        .collect();
    let drained = ip(REALS4[1]);
    b.set_draining(&svc, drained, true).unwrap();
    for (p, was) in &on {
        assert_eq!(
            real_of(&mut b, ACK, *p, &REALS4),
            Some(*was),
            "flow {p} moved"
        );
    }
    for p in 3000..3100 {
        assert_ne!(real_of(&mut b, SYN, p, &REALS4), Some(drained));
    }
    assert!(b.config().services[0].reals[1].draining, "drain not saved");
    b.set_draining(&svc, drained, false).unwrap();
    assert!((3000..3100).any(|p| real_of(&mut b, SYN, p, &REALS4) == Some(drained)));
}

#[test]
fn with_every_real_down_new_flows_go_to_the_fallback_or_are_dropped() {
    use xlb::health::Health;
    let sorry = "198.18.0.99";
    let all: Vec<&str> = REALS4.iter().copied().chain([sorry]).collect();
    for fallback in [Some(ip(sorry)), None] {
        let mut b = balancer();
        let svc: ServiceAddr = "198.18.0.100:80/tcp".parse().unwrap();
        let mut cfg = ServiceConfig::new(svc);
        cfg.fallback = fallback;
        for r in &all {
            b.set_link(ip(r), Some(link(real_mac(ip(r))))).unwrap();
        }
        for r in REALS4 {
            cfg.reals.push(RealConfig::new(ip(r), 100));
        }
        b.add_service(cfg).unwrap();
        // While any real is up, the fallback gets nothing.
        for r in &REALS4[..2] {
            b.set_health(&svc, ip(r), Health::Down).unwrap();
        }
        for p in 4000..4050 {
            assert_eq!(real_of(&mut b, SYN, p, &all), Some(ip(REALS4[2])));
        }
        b.set_health(&svc, ip(REALS4[2]), Health::Down).unwrap();
        let dropped_before = b.dataplane().global_counter(Global::DropNoBackend).unwrap();
        for p in 4100..4150 {
            assert_eq!(real_of(&mut b, SYN, p, &all), fallback);
        }
        let dropped = b.dataplane().global_counter(Global::DropNoBackend).unwrap() - dropped_before;
        assert_eq!(dropped, if fallback.is_some() { 0 } else { 50 });
        // A real back up takes over from the fallback.
        b.set_health(&svc, ip(REALS4[0]), Health::Up).unwrap();
        assert_eq!(real_of(&mut b, SYN, 4200, &all), Some(ip(REALS4[0])));
    }
}
