//! Packet tests of the real server's refusal (`xlb_realserver`, lb-ebpf/src/refuse.rs): a SYN
//! or UDP datagram for a VIP port with no socket goes back to the director (DR: IPIP / IP6IP6
//! from the real to the VIP; TUN: its own tunnel, reversed); everything else passes
//! byte-identical. BPF_PROG_TEST_RUN runs the program in the caller's network namespace, so
//! the sockets the tests bind here are the ones the program's socket lookups find (the tests
//! with a listener prove it: they would be refused otherwise).

use std::net::{IpAddr, TcpListener, UdpSocket};

use lb_common::{Decap, VIP_F_DR, VIP_F_REFUSE, VipValue};
use xlb::{netlink::Mac, realserver::Decapsulator};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const REAL4: &str = "10.1.0.11";
const REAL6: &str = "fd00:1::11";
/// Frames come from the director (DR) or a router (TUN) to the real.
const REAL_MAC: Mac = [0x02, 0, 0, 0, 0, 0x11];
const PEER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];

fn value(real: &str, flags: u32) -> VipValue {
    let mut addr = [0u8; 16];
    match ip(real) {
        IpAddr::V4(a) => addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => addr = a.octets(),
    }
    VipValue {
        real_addr: addr,
        flags,
    }
}

/// A real-server program refusing for both VIPs in DR mode.
fn dr_real() -> Decapsulator {
    let mut d = decapsulator();
    d.add_vip_with(ip(VIP4), value(REAL4, VIP_F_REFUSE | VIP_F_DR))
        .unwrap();
    d.add_vip_with(ip(VIP6), value(REAL6, VIP_F_REFUSE | VIP_F_DR))
        .unwrap();
    d
}

/// `frame` as it reaches a DR real: from the director's MAC to the real's.
fn at_real(f: &Frame) -> Vec<u8> {
    let mut b = f.bytes();
    b[..6].copy_from_slice(&REAL_MAC);
    b[6..12].copy_from_slice(&PEER_MAC);
    b
}

/// What a DR refusal of `frame` must be: back to the director's MAC, IPIP / IP6IP6 from the
/// real to the VIP, the original packet unchanged inside.
fn dr_refusal(frame: &[u8], real: &str, vip: &str, tos: u8) -> Vec<u8> {
    let l3 = &frame[l2_len(frame)..];
    let outer = outer_header(ip(real), ip(vip), tos, 0, ip_len(l3));
    encapsulate(frame, PEER_MAC, REAL_MAC, &outer)
}

/// A port nobody listens on in this namespace (for TCP and UDP): bound, then released.
fn free_port(v6: bool) -> u16 {
    let any = if v6 { "[::]:0" } else { "0.0.0.0:0" };
    let t = TcpListener::bind(any).unwrap();
    let port = t.local_addr().unwrap().port();
    drop(t);
    port
}

fn refusals(d: &Decapsulator) -> u64 {
    d.counter(Decap::Refusal).unwrap()
}

#[test]
fn a_syn_to_a_port_without_listener_goes_back_to_the_director_in_ipip() {
    let mut d = dr_real();
    for (n, (client, vip, real)) in [(CLIENT4, VIP4, REAL4), (CLIENT6, VIP6, REAL6)]
        .into_iter()
        .enumerate()
    {
        let port = free_port(vip.contains(':'));
        let f = Frame {
            tos: 0x2a,
            payload: b"syn with data".to_vec(),
            ..Frame::tcp(client, vip, 40000, port, SYN)
        };
        let frame = at_real(&f);
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_TX, "{vip}: verdict");
        let expected = dr_refusal(&frame, real, vip, 0x2a);
        assert_eq!(out, expected, "{vip}: refusal bytes");
        if vip == VIP4 {
            // The outer IPv4 header's checksum is right (sums to 0 with itself).
            assert_eq!(checksum(&out[14..34]), 0);
        }
        assert_eq!(refusals(&d), n as u64 + 1);
    }
}

#[test]
fn a_syn_with_a_listener_passes_untouched() {
    let mut d = dr_real();
    for (client, vip, any) in [(CLIENT4, VIP4, "0.0.0.0:0"), (CLIENT6, VIP6, "[::]:0")] {
        let l = TcpListener::bind(any).unwrap();
        let port = l.local_addr().unwrap().port();
        let frame = at_real(&Frame::tcp(client, vip, 40000, port, SYN));
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{vip}: a listener takes it");
        assert_eq!(out, frame);
        // Without the listener the same SYN is refused: the lookup saw this namespace.
        drop(l);
        let (verdict, _) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_TX, "{vip}: refused once the listener is gone");
    }
}

#[test]
fn udp_is_refused_only_without_a_socket() {
    let mut d = dr_real();
    for (client, vip, real, any) in [
        (CLIENT4, VIP4, REAL4, "0.0.0.0:0"),
        (CLIENT6, VIP6, REAL6, "[::]:0"),
    ] {
        let s = UdpSocket::bind(any).unwrap();
        let port = s.local_addr().unwrap().port();
        let frame = at_real(&Frame {
            payload: b"query".to_vec(),
            ..Frame::udp(client, vip, 5353, port)
        });
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{vip}: a socket takes it");
        assert_eq!(out, frame);
        drop(s);
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_TX, "{vip}: no socket");
        assert_eq!(out, dr_refusal(&frame, real, vip, 0));
    }
}

#[test]
fn everything_else_passes_byte_identical() {
    let mut d = dr_real();
    let port = free_port(false);
    let port6 = free_port(true);
    let frames = [
        // Established TCP and a SYN-ACK to a VIP port without listener: never refused.
        ("ack", at_real(&Frame::tcp(CLIENT4, VIP4, 40000, port, ACK))),
        (
            "syn-ack",
            at_real(&Frame::tcp(CLIENT4, VIP4, 40000, port, SYN | ACK)),
        ),
        (
            "rst",
            at_real(&Frame::tcp(CLIENT6, VIP6, 40000, port6, 0x04)),
        ),
        // Not a VIP.
        (
            "other dst",
            at_real(&Frame::tcp(CLIENT4, REAL4, 40000, port, SYN)),
        ),
        (
            "other dst v6",
            at_real(&Frame::udp(CLIENT6, REAL6, 40000, port6)),
        ),
        // A fragment of a datagram to the VIP: cannot be looked up alone.
        (
            "fragment",
            at_real(&Frame {
                fragment: Some((7, 0, true)),
                payload: vec![0; 64],
                ..Frame::udp(CLIENT4, VIP4, 40000, port)
            }),
        ),
        ("arp", arp_request([198, 18, 1, 1], [198, 18, 0, 100])),
        (
            "icmp",
            at_real(&Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping")),
        ),
    ];
    for (name, frame) in frames {
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}: byte-identical");
    }
    // Truncated SYNs to the VIP: never aborted, never sent (the kernel runs nothing shorter
    // than an Ethernet header).
    let frame = at_real(&Frame::tcp(CLIENT4, VIP4, 40000, port, SYN));
    for len in 14..frame.len() {
        let (verdict, _) = d.test_run(&frame[..len]).unwrap();
        assert_eq!(verdict, XDP_PASS, "truncated at {len}");
    }
    assert_eq!(refusals(&d), 0);
}

#[test]
fn without_the_refuse_flag_nothing_is_refused() {
    let mut d = decapsulator();
    d.add_vip_with(ip(VIP4), value(REAL4, VIP_F_DR)).unwrap();
    d.add_vip(ip(VIP6)).unwrap();
    for (client, vip) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
        let frame = at_real(&Frame::tcp(client, vip, 40000, free_port(false), SYN));
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{vip}");
        assert_eq!(out, frame);
    }
}

/// A tunnel frame from the director (through a router) to a TUN real.
fn tunnelled(inner: &Frame, outer_src: &str, outer_dst: &str) -> Vec<u8> {
    let frame = inner.bytes();
    let l3 = &frame[l2_len(&frame)..];
    let outer = outer_header(ip(outer_src), ip(outer_dst), 0, 0x12345, ip_len(l3));
    encapsulate(&frame, REAL_MAC, PEER_MAC, &outer)
}

#[test]
fn tun_refusals_go_back_through_the_tunnel_reversed() {
    let mut d = decapsulator();
    d.add_vip_with(ip(VIP4), value(REAL4, VIP_F_REFUSE))
        .unwrap();
    d.add_vip_with(ip(VIP6), value(REAL6, VIP_F_REFUSE))
        .unwrap();
    for (client, vip, director, real) in [
        (CLIENT4, VIP4, "198.18.0.2", REAL4),
        (CLIENT6, VIP6, "fd00:18::2", REAL6),
    ] {
        let port = free_port(vip.contains(':'));
        let inner = Frame::tcp(client, vip, 40000, port, SYN);
        let mut frame = tunnelled(&inner, director, real);
        // A router on the way decremented the TTL: the refusal starts again at 64.
        let l2 = 14;
        if vip == VIP4 {
            frame[l2 + 8] = 61;
            let c = {
                frame[l2 + 10] = 0;
                frame[l2 + 11] = 0;
                checksum(&frame[l2..l2 + 20])
            };
            frame[l2 + 10..l2 + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            frame[l2 + 7] = 61;
        }
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_TX, "{vip}: verdict");
        let inner_bytes = inner.bytes();
        let l3 = &inner_bytes[14..];
        let outer = outer_header(ip(real), ip(director), 0, 0x12345, ip_len(l3));
        let expected = encapsulate(&inner_bytes, PEER_MAC, REAL_MAC, &outer);
        assert_eq!(out, expected, "{vip}: reversed tunnel");

        // With a listener the same SYN is decapsulated and passed.
        let any = if vip == VIP4 { "0.0.0.0" } else { "[::]" };
        let l = TcpListener::bind(format!("{any}:{port}")).unwrap();
        let (verdict, out) = d.test_run(&frame).unwrap();
        assert_eq!(verdict, XDP_PASS, "{vip}: listener");
        assert_eq!(&out[14..], &inner_bytes[14..], "{vip}: decapsulated");
        drop(l);
    }
    assert_eq!(refusals(&d), 2);
    assert_eq!(d.counter(Decap::Decapsulated).unwrap(), 2);
}

#[test]
fn the_real_server_program_stays_small() {
    // What the kernel keeps after verification, in 8-byte instructions: a bound that catches
    // an accidental blow-up (an unrolled loop, a copied helper), printed for the record.
    let mut d = decapsulator();
    let info = d.program().unwrap().info().unwrap();
    let insns = info.size_translated().unwrap() / 8;
    eprintln!("xlb_realserver: {insns} instructions (xlated)");
    assert!(insns > 100 && insns < 4096, "{insns} instructions");
}
