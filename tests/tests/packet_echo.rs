//! Packet tests of echo replies for VIPs (lb-ebpf/src/echo.rs): an ICMP / ICMPv6 echo request
//! to a VIP is answered by the data path, byte for byte what a host would send (addresses and
//! MACs swapped, type 0 / 129, TTL 64, checksums right), and counted; anything else ICMP
//! passes as before.

use lb_common::Global;
use xlb::{
    config::{RealConfig, ServiceConfig},
    control::Balancer,
    dataplane::BALANCER_PROGRAM,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";

/// A balancer with one DR service on each VIP.
fn director() -> Balancer {
    let mut b = balancer();
    for (svc, real) in [
        ("198.18.0.100:80/tcp", "198.18.0.11"),
        ("[fd00:18::100]:53/udp", "fd00:18::11"),
    ] {
        let mut cfg = ServiceConfig::new(svc.parse().unwrap());
        b.set_link(ip(real), Some(link(real_mac(ip(real)))))
            .unwrap();
        cfg.reals.push(RealConfig::new(ip(real), 100));
        b.add_service(cfg).unwrap();
    }
    b
}

fn run(b: &mut Balancer, frame: &[u8]) -> (u32, Vec<u8>) {
    b.dataplane().test_run(BALANCER_PROGRAM, frame).unwrap()
}

fn echoed(b: &mut Balancer) -> u64 {
    b.dataplane().global_counter(Global::EchoReplied).unwrap()
}

/// `frame` with its IP TTL / hop limit set to `ttl` (IPv4 checksum fixed).
fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    let l2 = l2_len(&frame);
    if frame[l2] >> 4 == 4 {
        frame[l2 + 8] = ttl;
        frame[l2 + 10..l2 + 12].copy_from_slice(&[0, 0]);
        let ihl = (frame[l2] & 0x0f) as usize * 4;
        let sum = checksum(&frame[l2..l2 + ihl]);
        frame[l2 + 10..l2 + 12].copy_from_slice(&sum.to_be_bytes());
    } else {
        frame[l2 + 7] = ttl;
    }
    frame
}

/// The reply a host sends: built as a fresh frame from the VIP to the client (TTL 64), back
/// to the client's MAC.
fn reply_to(request: &Frame, reply_type: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let reply = Frame {
        vlan: request.vlan,
        tos: request.tos,
        ..Frame::icmp(
            &request.dst.to_string(),
            &request.src.to_string(),
            reply_type,
            0,
            rest,
            body,
        )
    };
    let mut out = reply.bytes();
    out[..6].copy_from_slice(&CLIENT_MAC);
    out[6..12].copy_from_slice(&DIRECTOR_MAC);
    out
}

#[test]
fn echo_requests_to_a_vip_are_answered_byte_exact() {
    let mut b = director();
    let body: Vec<u8> = (0..56).map(|i| i as u8).collect();
    let rest = [0x12, 0x34, 0x00, 0x07];
    let cases = [
        ("v4", Frame::icmp(CLIENT4, VIP4, 8, 0, rest, &body)),
        (
            "v4 vlan, tos",
            Frame {
                vlan: Some(12),
                tos: 0x10,
                ..Frame::icmp(CLIENT4, VIP4, 8, 0, rest, &body)
            },
        ),
        ("v6", Frame::icmp(CLIENT6, VIP6, 128, 0, rest, &body)),
        (
            "v6 vlan, odd length",
            Frame {
                vlan: Some(5),
                ..Frame::icmp(CLIENT6, VIP6, 128, 0, rest, &body[..33])
            },
        ),
    ];
    for (n, (name, request)) in cases.into_iter().enumerate() {
        let reply_type = if request.src.is_ipv4() { 0 } else { 129 };
        let payload = request.payload.clone();
        let input = with_ttl(request.bytes(), 51);
        let (verdict, out) = run(&mut b, &input);
        assert_eq!(verdict, XDP_TX, "{name}");
        assert_eq!(
            out,
            reply_to(&request, reply_type, rest, &payload),
            "{name}"
        );
        // Checked on the output itself.
        let l2 = l2_len(&out);
        if request.src.is_ipv4() {
            let ihl = (out[l2] & 0x0f) as usize * 4;
            assert_eq!(checksum(&out[l2..l2 + ihl]), 0, "{name}: IP checksum");
            assert_eq!(checksum(&out[l2 + ihl..]), 0, "{name}: ICMP checksum");
        } else {
            let sum = icmpv6_checksum(request.dst, request.src, &out[l2 + 40..]);
            assert_eq!(sum, 0, "{name}: ICMPv6 checksum");
        }
        assert_eq!(echoed(&mut b), n as u64 + 1);
    }
    assert_eq!(b.dataplane().global_counter(Global::Forwarded).unwrap(), 0);
}

#[test]
fn other_echoes_pass_to_the_kernel_untouched() {
    let mut b = director();
    let mut from_group_mac = Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping").bytes();
    from_group_mac[6] |= 1;
    let mut to_another_mac = Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping").bytes();
    to_another_mac[5] = 0x99;
    let mut corrupt_header = Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping").bytes();
    corrupt_header[14 + 10] ^= 1;
    let mut longer_than_frame = Frame::icmp(CLIENT6, VIP6, 128, 0, [0; 4], b"ping").bytes();
    longer_than_frame[14 + 5] += 1;
    let frames = [
        (
            "not a vip",
            Frame::icmp(CLIENT4, "198.18.0.101", 8, 0, [0; 4], b"ping").bytes(),
        ),
        (
            "not a vip, v6",
            Frame::icmp(CLIENT6, "fd00:18::101", 128, 0, [0; 4], b"ping").bytes(),
        ),
        (
            "an echo reply",
            Frame::icmp(CLIENT4, VIP4, 0, 0, [0; 4], b"pong").bytes(),
        ),
        (
            "code not 0",
            Frame::icmp(CLIENT4, VIP4, 8, 1, [0; 4], b"ping").bytes(),
        ),
        (
            "from a loopback source",
            Frame::icmp("127.0.0.1", VIP4, 8, 0, [0; 4], b"ping").bytes(),
        ),
        (
            "from a multicast source, v6",
            Frame::icmp("ff02::1", VIP6, 128, 0, [0; 4], b"ping").bytes(),
        ),
        (
            "a fragment",
            Frame {
                fragment: Some((3, 0, true)),
                ..Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping")
            }
            .bytes(),
        ),
        ("from a group MAC", from_group_mac),
        ("a header failing its checksum", corrupt_header),
        ("longer than its frame, v6", longer_than_frame),
        (
            "ip options: left to the kernel",
            Frame {
                ipv4_options: vec![1, 1, 1, 0],
                ..Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping")
            }
            .bytes(),
        ),
        ("to another director's MAC", to_another_mac),
    ];
    for (name, frame) in frames {
        assert_eq!(run(&mut b, &frame), (XDP_PASS, frame.clone()), "{name}");
    }
    assert_eq!(echoed(&mut b), 0);
}

#[test]
fn echo_follows_the_vips_and_the_switch() {
    let mut b = director();
    let ping = Frame::icmp(CLIENT4, VIP4, 8, 0, [0; 4], b"ping").bytes();
    assert_eq!(run(&mut b, &ping).0, XDP_TX);
    b.set_vip_echo(false).unwrap();
    assert_eq!(run(&mut b, &ping), (XDP_PASS, ping.clone()), "switched off");
    b.set_vip_echo(true).unwrap();
    assert_eq!(run(&mut b, &ping).0, XDP_TX, "back on");
    // A second service on the VIP, then the first removed: still a VIP.
    let mut other = ServiceConfig::new("198.18.0.100:443/tcp".parse().unwrap());
    other.reals.push(RealConfig::new(ip("198.18.0.11"), 100));
    b.add_service(other).unwrap();
    b.remove_service(&"198.18.0.100:80/tcp".parse().unwrap())
        .unwrap();
    assert_eq!(
        run(&mut b, &ping).0,
        XDP_TX,
        "another service holds the VIP"
    );
    b.remove_service(&"198.18.0.100:443/tcp".parse().unwrap())
        .unwrap();
    assert_eq!(run(&mut b, &ping), (XDP_PASS, ping.clone()), "no VIP left");
    assert_eq!(echoed(&mut b), 3);
}
