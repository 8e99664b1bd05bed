//! Packet tests of the director's handling of refusals (lb-ebpf/src/reschedule.rs): a real
//! with no socket for a SYN's or datagram's port sends it back in IPIP / IP6IP6 (DR: from its
//! MAC; TUN: its own tunnel reversed). The director honours it only from the real the flow is
//! tracked to, re-schedules the flow to the next real in Maglev order, rewrites the connection
//! entry and forwards the inner packet; bounces are bounded; all of it is counted.

use std::net::IpAddr;

use lb_common::{Global, MAX_BOUNCES};
use xlb::{
    config::{HashKind, Mode, RealConfig, ServiceAddr, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
    health::Health,
    netlink::Mac,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const REALS4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const REALS6: [&str; 3] = ["fd00:18::11", "fd00:18::12", "fd00:18::13"];
const RING: u32 = 65537;
const TUNNEL_SRC4: &str = "198.18.0.2";
const TUNNEL_SRC6: &str = "fd00:18::2";
const NEXT_HOP_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];

fn service(service: &str, reals: &[&str], mode: Mode) -> (Balancer, ServiceAddr) {
    let mut b = balancer();
    b.set_default_tunnel_sources(
        Some(TUNNEL_SRC4.parse().unwrap()),
        Some(TUNNEL_SRC6.parse().unwrap()),
    );
    let addr: ServiceAddr = service.parse().unwrap();
    let mut cfg = ServiceConfig::new(addr);
    cfg.hash = HashKind::FiveTuple;
    cfg.mode = mode;
    for r in reals {
        let mac = if mode == Mode::Dr {
            real_mac(ip(r))
        } else {
            NEXT_HOP_MAC
        };
        b.set_link(ip(r), Some(link(mac))).unwrap();
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

fn refusals_of(b: &mut Balancer, svc: &ServiceAddr, real: IpAddr) -> u64 {
    let id = b.real_backend_id(svc, real).unwrap();
    b.dataplane().all_backend_counters().unwrap()[id as usize].refusals
}

fn dr_to(frame: &[u8], real: IpAddr) -> Vec<u8> {
    let mut out = frame.to_vec();
    out[..6].copy_from_slice(&real_mac(real));
    out[6..12].copy_from_slice(&DIRECTOR_MAC);
    out
}

/// A DR refusal of `frame` (as the director sent it to `real`) from `src_mac`: IPIP / IP6IP6
/// from the real to the VIP, back to the director's MAC.
fn dr_refusal(frame: &[u8], real: IpAddr, vip: &str, src_mac: Mac) -> Vec<u8> {
    let l3 = &frame[l2_len(frame)..];
    let outer = outer_header(real, ip(vip), 0, 0, ip_len(l3));
    encapsulate(frame, DIRECTOR_MAC, src_mac, &outer)
}

/// The frame TUN forwarding to `real` produces.
fn tun_to(frame: &[u8], src: &str, real: IpAddr, label: u32) -> Vec<u8> {
    let l3 = &frame[l2_len(frame)..];
    let outer = outer_header(ip(src), real, 0, label, ip_len(l3));
    encapsulate(frame, NEXT_HOP_MAC, DIRECTOR_MAC, &outer)
}

/// A TUN refusal: the tunnel packet reversed by the real `from` (outer source), delivered by
/// the next hop.
fn tun_refusal(frame: &[u8], from: IpAddr, to: &str, label: u32) -> Vec<u8> {
    let l3 = &frame[l2_len(frame)..];
    let outer = outer_header(from, ip(to), 0, label, ip_len(l3));
    encapsulate(frame, DIRECTOR_MAC, NEXT_HOP_MAC, &outer)
}

#[test]
fn a_dr_refusal_from_the_flows_real_is_rescheduled_to_the_next_maglev_real() {
    for (svc, vip, client, reals, proto) in [
        ("198.18.0.100:80/tcp", VIP4, CLIENT4, &REALS4, "tcp"),
        ("[fd00:18::100]:443/tcp", VIP6, CLIENT6, &REALS6, "tcp"),
        ("198.18.0.100:53/udp", VIP4, CLIENT4, &REALS4, "udp"),
        ("[fd00:18::100]:53/udp", VIP6, CLIENT6, &REALS6, "udp"),
    ] {
        let (mut b, addr) = service(svc, reals, Mode::Dr);
        let f = if proto == "tcp" {
            Frame::tcp(client, vip, 40000, addr.port, SYN)
        } else {
            Frame::udp(client, vip, 40000, addr.port)
        };
        let input = f.bytes();
        let hash = five_tuple_hash(&f, true);
        let first = predict(&equal_weight(reals), RING, hash);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(
            (verdict, &out),
            (XDP_TX, &dr_to(&input, first)),
            "{svc}: first"
        );

        let refusal = dr_refusal(&out, first, vip, real_mac(first));
        let next = predict_other(&equal_weight(reals), RING, hash, first).unwrap();
        assert_ne!(next, first);
        let (verdict, out) = run(&mut b, &refusal);
        assert_eq!(verdict, XDP_TX, "{svc}: refusal verdict");
        assert_eq!(out, dr_to(&input, next), "{svc}: re-scheduled packet");
        assert_eq!(global(&mut b, Global::RefusalRescheduled), 1, "{svc}");
        assert_eq!(refusals_of(&mut b, &addr, first), 1, "{svc}");
        assert_eq!(refusals_of(&mut b, &addr, next), 0, "{svc}");

        // The flow's next packet (the client's ACK, or the next datagram) follows.
        let later = if proto == "tcp" {
            Frame::tcp(client, vip, 40000, addr.port, ACK)
        } else {
            f.clone()
        }
        .bytes();
        let (verdict, out) = run(&mut b, &later);
        assert_eq!(
            (verdict, out),
            (XDP_TX, dr_to(&later, next)),
            "{svc}: follows"
        );
    }
}

#[test]
fn a_refusal_not_from_the_flows_real_is_dropped_and_counted() {
    let (mut b, addr) = service("198.18.0.100:80/tcp", &REALS4, Mode::Dr);
    let f = Frame::tcp(CLIENT4, VIP4, 40001, 80, SYN);
    let input = f.bytes();
    let hash = five_tuple_hash(&f, true);
    let first = predict(&equal_weight(&REALS4), RING, hash);
    let (_, sent) = run(&mut b, &input);
    let other = REALS4.iter().map(|r| ip(r)).find(|r| *r != first).unwrap();
    let forged = [
        // Another real of the service, a client on the segment, the right real's MAC with
        // the director's own.
        (
            "other real's mac",
            dr_refusal(&sent, first, VIP4, real_mac(other)),
        ),
        ("client mac", dr_refusal(&sent, first, VIP4, CLIENT_MAC)),
        ("director mac", dr_refusal(&sent, first, VIP4, DIRECTOR_MAC)),
        // The right MAC, but about a flow the director never saw.
        (
            "untracked flow",
            dr_refusal(
                &dr_to(&Frame::tcp(CLIENT4, VIP4, 40999, 80, SYN).bytes(), first),
                first,
                VIP4,
                real_mac(first),
            ),
        ),
        // The right MAC, but not a SYN: reals refuse nothing else.
        (
            "not a syn",
            dr_refusal(
                &dr_to(&Frame::tcp(CLIENT4, VIP4, 40001, 80, ACK).bytes(), first),
                first,
                VIP4,
                real_mac(first),
            ),
        ),
    ];
    for (i, (name, frame)) in forged.iter().enumerate() {
        let (verdict, _) = run(&mut b, frame);
        assert_eq!(verdict, XDP_DROP, "{name}");
        assert_eq!(
            global(&mut b, Global::DropRefusalForged),
            i as u64 + 1,
            "{name}"
        );
    }
    assert_eq!(global(&mut b, Global::RefusalRescheduled), 0);
    assert_eq!(refusals_of(&mut b, &addr, first), 0);
    // The flow did not move.
    let ack = Frame::tcp(CLIENT4, VIP4, 40001, 80, ACK).bytes();
    assert_eq!(run(&mut b, &ack), (XDP_TX, dr_to(&ack, first)));
}

#[test]
fn bounces_are_bounded_and_a_lone_real_cannot_bounce() {
    let (mut b, addr) = service("198.18.0.100:80/tcp", &REALS4, Mode::Dr);
    let f = Frame::tcp(CLIENT4, VIP4, 40002, 80, SYN);
    let input = f.bytes();
    let (_, mut sent) = run(&mut b, &input);
    let mut at = ip(REALS4
        .iter()
        .find(|r| sent[..6] == real_mac(ip(r)))
        .unwrap());
    for n in 0..MAX_BOUNCES {
        let (verdict, out) = run(&mut b, &dr_refusal(&sent, at, VIP4, real_mac(at)));
        assert_eq!(verdict, XDP_TX, "bounce {n}");
        let to = ip(REALS4.iter().find(|r| out[..6] == real_mac(ip(r))).unwrap());
        assert_ne!(to, at, "bounce {n}: never back to the refusing real");
        at = to;
        sent = out;
    }
    let (verdict, _) = run(&mut b, &dr_refusal(&sent, at, VIP4, real_mac(at)));
    assert_eq!(verdict, XDP_DROP, "bounce {MAX_BOUNCES} is one too many");
    assert_eq!(
        global(&mut b, Global::RefusalRescheduled),
        MAX_BOUNCES as u64
    );
    assert_eq!(global(&mut b, Global::DropRefusalBounced), 1);
    // A new SYN of the same 5-tuple starts counting again.
    let (verdict, sent) = run(&mut b, &input);
    assert_eq!(verdict, XDP_TX);
    let first = ip(REALS4
        .iter()
        .find(|r| sent[..6] == real_mac(ip(r)))
        .unwrap());
    let (verdict, _) = run(&mut b, &dr_refusal(&sent, first, VIP4, real_mac(first)));
    assert_eq!(verdict, XDP_TX);
    let _ = addr;

    // A service with one real has nowhere else to send it.
    let (mut b, addr) = service("198.18.0.100:80/tcp", &REALS4[..1], Mode::Dr);
    let (_, sent) = run(&mut b, &input);
    let only = ip(REALS4[0]);
    let (verdict, _) = run(&mut b, &dr_refusal(&sent, only, VIP4, real_mac(only)));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(global(&mut b, Global::DropRefusalBounced), 1);
    assert_eq!(
        refusals_of(&mut b, &addr, only),
        1,
        "counted even when not re-scheduled"
    );
}

#[test]
fn a_refusal_still_counts_after_its_real_was_taken_down() {
    let (mut b, addr) = service("198.18.0.100:80/tcp", &REALS4, Mode::Dr);
    let f = Frame::tcp(CLIENT4, VIP4, 40003, 80, SYN);
    let input = f.bytes();
    let hash = five_tuple_hash(&f, true);
    let first = predict(&equal_weight(&REALS4), RING, hash);
    let (_, sent) = run(&mut b, &input);
    // The daemon took it down after an earlier refusal; this one was already on its way.
    b.set_health(&addr, first, Health::Down).unwrap();
    let (verdict, out) = run(&mut b, &dr_refusal(&sent, first, VIP4, real_mac(first)));
    assert_eq!(verdict, XDP_TX);
    assert_ne!(out[..6], real_mac(first));
    assert_eq!(refusals_of(&mut b, &addr, first), 1);
}

#[test]
fn a_tun_refusal_is_accepted_only_from_the_flows_real_address() {
    for (svc, vip, client, reals, src) in [
        ("198.18.0.100:80/tcp", VIP4, CLIENT4, &REALS4, TUNNEL_SRC4),
        ("[fd00:18::100]:80/tcp", VIP6, CLIENT6, &REALS6, TUNNEL_SRC6),
    ] {
        let (mut b, addr) = service(svc, reals, Mode::Tun);
        let f = Frame::tcp(client, vip, 40004, 80, SYN);
        let input = f.bytes();
        let hash = five_tuple_hash(&f, true);
        let label = if vip == VIP6 {
            outer_hash(&f, true) & 0xf_ffff
        } else {
            0
        };
        let first = predict(&equal_weight(reals), RING, hash);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!((verdict, out), (XDP_TX, tun_to(&input, src, first, label)));
        let other = reals.iter().map(|r| ip(r)).find(|r| *r != first).unwrap();

        let (verdict, _) = run(&mut b, &tun_refusal(&input, other, src, label));
        assert_eq!(verdict, XDP_DROP, "{svc}: from another real's address");
        assert_eq!(global(&mut b, Global::DropRefusalForged), 1);

        let next = predict_other(&equal_weight(reals), RING, hash, first).unwrap();
        let (verdict, out) = run(&mut b, &tun_refusal(&input, first, src, label));
        assert_eq!(verdict, XDP_TX, "{svc}");
        assert_eq!(
            out,
            tun_to(&input, src, next, label),
            "{svc}: re-encapsulated to next"
        );
        assert_eq!(refusals_of(&mut b, &addr, first), 1);
        assert_eq!(global(&mut b, Global::RefusalRescheduled), 1);
    }
}

#[test]
fn other_tunnel_packets_pass_untouched() {
    let (mut b, _) = service("198.18.0.100:80/tcp", &REALS4, Mode::Dr);
    let real = ip(REALS4[0]);
    let frames = [
        // Inner packet for no service (another port, another address).
        dr_refusal(
            &Frame::tcp(CLIENT4, VIP4, 40005, 81, SYN).bytes(),
            real,
            VIP4,
            real_mac(real),
        ),
        dr_refusal(
            &Frame::tcp(CLIENT4, "198.18.0.200", 40005, 80, SYN).bytes(),
            real,
            "198.18.0.200",
            real_mac(real),
        ),
        // Not sent to the director's MAC.
        {
            let mut f = dr_refusal(
                &Frame::tcp(CLIENT4, VIP4, 40005, 80, SYN).bytes(),
                real,
                VIP4,
                real_mac(real),
            );
            f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
            f
        },
    ];
    for (i, frame) in frames.iter().enumerate() {
        assert_eq!(run(&mut b, frame), (XDP_PASS, frame.clone()), "case {i}");
    }
    // Truncated refusals: never aborted (one whose inner headers are whole is honoured, as a
    // plain frame with whole headers is forwarded).
    let (_, sent) = run(&mut b, &Frame::tcp(CLIENT4, VIP4, 40006, 80, SYN).bytes());
    let at = ip(REALS4
        .iter()
        .find(|r| sent[..6] == real_mac(ip(r)))
        .unwrap());
    let refusal = dr_refusal(&sent, at, VIP4, real_mac(at));
    for len in 14..refusal.len() {
        let (verdict, _) = run(&mut b, &refusal[..len]);
        assert_ne!(verdict, XDP_ABORTED, "truncated at {len}");
    }
}

#[test]
fn a_retransmitted_syn_never_answered_moves_to_the_next_real() {
    let (mut b, _) = service("198.18.0.100:80/tcp", &REALS4, Mode::Dr);
    let f = Frame::tcp(CLIENT4, VIP4, 40010, 80, SYN);
    let syn = f.bytes();
    let hash = five_tuple_hash(&f, true);
    let first = predict(&equal_weight(&REALS4), RING, hash);
    let next = predict_other(&equal_weight(&REALS4), RING, hash, first).unwrap();
    assert_eq!(run(&mut b, &syn), (XDP_TX, dr_to(&syn, first)));
    // A duplicate right away is no retransmission.
    assert_eq!(run(&mut b, &syn), (XDP_TX, dr_to(&syn, first)), "duplicate");
    // Linux retransmits an unanswered SYN after 1 s.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(
        run(&mut b, &syn),
        (XDP_TX, dr_to(&syn, next)),
        "retransmission"
    );
    assert_eq!(global(&mut b, Global::SynRetriesMoved), 1);
    // The client's ACK follows the move.
    let ack = Frame::tcp(CLIENT4, VIP4, 40010, 80, ACK).bytes();
    assert_eq!(run(&mut b, &ack), (XDP_TX, dr_to(&ack, next)));

    // A flow whose ACK was seen: a later SYN is a new connection, scheduled by Maglev.
    let g = Frame::tcp(CLIENT4, VIP4, 40011, 80, SYN);
    let syn2 = g.bytes();
    let own = predict(&equal_weight(&REALS4), RING, five_tuple_hash(&g, true));
    run(&mut b, &syn2);
    run(&mut b, &Frame::tcp(CLIENT4, VIP4, 40011, 80, ACK).bytes());
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert_eq!(
        run(&mut b, &syn2),
        (XDP_TX, dr_to(&syn2, own)),
        "new connection"
    );
    assert_eq!(global(&mut b, Global::SynRetriesMoved), 1);
}

#[test]
fn the_drop_log_program_loads_with_the_refusal_reasons() {
    // xlb_drop_log names the refusal drop reasons; a string search there once made it a
    // program the verifier refused ("last insn is not an exit or jmp").
    let mut b = balancer();
    let _logger = b.dataplane().start_datapath_log().unwrap();
}
