//! Packet tests of the egress decision (lb-ebpf's egress.rs) of a two-arm director: a frame for
//! a real on the interface it came in on leaves by XDP_TX, one for a real on another attached
//! interface by XDP_REDIRECT to that interface, from that interface's MAC.
//!
//! Each test runs in a thread of its own that unshares a network namespace (nameless: nothing
//! to collide with, gone with the thread) and makes three veth pairs there: `arm0` (where the
//! frames arrive), `arm1` and `arm2` (further attached interfaces). The verdict and the output
//! frame come from BPF_PROG_TEST_RUN with `arm0` as ingress; where each frame really goes comes
//! from the same program attached to `arm0`, fed by a packet socket on `arm0`'s peer, with a
//! counting sink on each pair's far end. (Not BPF_PROG_TEST_RUN's live-frames mode: some
//! kernels refuse it with EPERM, as this machine kind's did.)

use std::{net::IpAddr, process::Command};

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode},
};
use lb_common::Global;
use xlb::{
    config::{Mode, RealConfig, ServiceAddr, ServiceConfig},
    control::{Balancer, Link},
    dataplane::{BALANCER_PROGRAM, EBPF_OBJECT, XdpModeChoice},
    netlink::Mac,
};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const CLIENT4: &str = "198.18.1.1";
const RING: u32 = 65537;
/// The attached interfaces' MACs: arm0 is the one frames arrive on.
const ARM_MACS: [Mac; 3] = [DIRECTOR_MAC, [0x02, 0, 0, 0, 1, 1], [0x02, 0, 0, 0, 1, 2]];
/// DR reals, one on-link on each arm (REALS[i] on arm i).
const REALS: [&str; 3] = ["198.18.0.10", "198.18.0.11", "198.18.0.12"];
const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0xfe];
/// TUN reals behind a router on arm1.
const TUN_REALS: [&str; 2] = ["10.1.0.11", "10.1.0.12"];
const TUN_SRC: &str = "198.18.0.2";

/// Runs `test` in a fresh network namespace holding the arms; `test` gets their ifindexes.
fn with_arms(test: impl FnOnce([u32; 3]) + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: affects this thread only; it ends with the test.
        assert_eq!(unsafe { unshare_netns() }, 0, "unshare(CLONE_NEWNET)");
        // No IPv6 on the arms: their neighbour discovery would reach the sinks too.
        for conf in ["all", "default"] {
            std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1").unwrap();
        }
        let mut arms = [0; 3];
        for (i, arm) in arms.iter_mut().enumerate() {
            let (dev, peer) = (format!("arm{i}"), format!("arm{i}p"));
            ip(&["link", "add", &dev, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &dev, "up"]);
            ip(&["link", "set", &peer, "up"]);
            *arm = ifindex(&dev);
        }
        test(arms)
    })
    .join()
    .expect("the test thread");
}

/// unshare(2) of this thread's network namespace.
unsafe fn unshare_netns() -> i32 {
    const CLONE_NEWNET: i32 = 0x4000_0000;
    unsafe extern "C" {
        fn unshare(flags: i32) -> i32;
    }
    unsafe { unshare(CLONE_NEWNET) }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(dev: &str) -> u32 {
    unsafe extern "C" {
        fn if_nametoindex(name: *const std::ffi::c_char) -> u32;
    }
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: a NUL-terminated name. It asks a socket of this thread's namespace (sysfs shows
    // the host's).
    let index = unsafe { if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {dev}");
    index
}

/// A balancer attached (in its maps) to the three arms, with a DR service whose real i is
/// on-link on arm i, and a TUN service whose reals sit behind a router on arm1.
fn two_arm_balancer(arms: [u32; 3]) -> (Balancer, ServiceAddr, ServiceAddr) {
    let mut b = balancer();
    let ifaces: Vec<(u32, Mac)> = arms.iter().copied().zip(ARM_MACS).collect();
    b.set_interfaces(&ifaces).unwrap();
    b.set_default_tunnel_sources(Some(TUN_SRC.parse().unwrap()), None);
    let dr: ServiceAddr = format!("{VIP4}:80/tcp").parse().unwrap();
    let mut cfg = ServiceConfig::new(dr);
    for (i, r) in REALS.iter().enumerate() {
        let mac = real_mac(ip_addr(r));
        b.set_link(
            ip_addr(r),
            Some(Link {
                ifindex: arms[i],
                mac,
            }),
        )
        .unwrap();
        cfg.reals.push(RealConfig::new(ip_addr(r), 100));
    }
    b.add_service(cfg).unwrap();
    let tun: ServiceAddr = format!("{VIP4}:443/tcp").parse().unwrap();
    let mut cfg = ServiceConfig::new(tun);
    cfg.mode = Mode::Tun;
    for r in TUN_REALS {
        let link = Link {
            ifindex: arms[1],
            mac: ROUTER_MAC,
        };
        b.set_link(ip_addr(r), Some(link)).unwrap();
        cfg.reals.push(RealConfig::new(ip_addr(r), 100));
    }
    b.add_service(cfg).unwrap();
    (b, dr, tun)
}

fn ip_addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A SYN to the DR service from `sport`, and the real Maglev gives it to.
fn dr_flow(sport: u16) -> (Frame, usize) {
    let frame = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN);
    let real = predict(&equal_weight(&REALS), RING, five_tuple_hash(&frame, true));
    let arm = REALS.iter().position(|r| ip_addr(r) == real).unwrap();
    (frame, arm)
}

/// A source port whose flow goes to the real on `arm`.
fn sport_to(arm: usize) -> u16 {
    (40000..41000)
        .find(|&p| dr_flow(p).1 == arm)
        .expect("some port maps to each real")
}

#[test]
fn dr_leaves_by_tx_on_the_ingress_arm_and_by_redirect_on_another_from_its_mac() {
    with_arms(|arms| {
        let (mut b, _, _) = two_arm_balancer(arms);
        for arm in 0..3 {
            let (frame, _) = dr_flow(sport_to(arm));
            let frame = frame.bytes();
            let (verdict, out) = b
                .dataplane()
                .test_run_on(BALANCER_PROGRAM, &frame, Some(arms[0]))
                .unwrap();
            let mut want = frame.clone();
            want[..6].copy_from_slice(&real_mac(ip_addr(REALS[arm])));
            want[6..12].copy_from_slice(&ARM_MACS[arm]);
            let want_verdict = if arm == 0 { XDP_TX } else { XDP_REDIRECT };
            assert_eq!((verdict, out), (want_verdict, want), "real on arm{arm}");
        }
        assert_eq!(b.dataplane().global_counter(Global::Forwarded).unwrap(), 3);
    });
}

#[test]
fn each_frame_is_delivered_out_of_its_reals_arm_only() {
    with_arms(|arms| {
        let (mut b, _, _) = two_arm_balancer(arms);
        let sinks: Vec<Sink> = (0..3).map(|i| Sink::on(&format!("arm{i}p"))).collect();
        b.dataplane()
            .attach("arm0", arms[0], XdpModeChoice::Native)
            .unwrap();
        for arm in [1, 2, 0, 2] {
            let (frame, _) = dr_flow(sport_to(arm));
            let before: Vec<u64> = sinks.iter().map(Sink::received).collect();
            inject(ifindex("arm0p"), &frame.bytes(), 1).expect("sendto on arm0p");
            // Delivery goes through the veths' NAPI, perhaps on the other CPU: allow a moment.
            let delivered = || -> Vec<u64> {
                sinks
                    .iter()
                    .zip(&before)
                    .map(|(s, b)| s.received() - b)
                    .collect()
            };
            for _ in 0..50 {
                if delivered().iter().sum::<u64>() > 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            let got = delivered();
            let mut want = vec![0; 3];
            want[arm] = 1;
            assert_eq!(got, want, "a frame for the real on arm{arm}, by sink");
        }
    });
}

#[test]
fn tun_is_redirected_to_the_routers_arm_and_too_big_answered_out_of_the_ingress_arm() {
    with_arms(|arms| {
        let (mut b, _, _) = two_arm_balancer(arms);
        b.set_mtu(1500).unwrap();
        let frame = Frame::tcp(CLIENT4, VIP4, 40000, 443, SYN);
        let real = predict(
            &equal_weight(&TUN_REALS),
            RING,
            five_tuple_hash(&frame, true),
        );
        let bytes = frame.bytes();
        let (verdict, out) = b
            .dataplane()
            .test_run_on(BALANCER_PROGRAM, &bytes, Some(arms[0]))
            .unwrap();
        let l3 = &bytes[l2_len(&bytes)..];
        let outer = outer_header(ip_addr(TUN_SRC), real, l3[1], 0, ip_len(l3));
        assert_eq!(
            (verdict, out),
            (
                XDP_REDIRECT,
                encapsulate(&bytes, ROUTER_MAC, ARM_MACS[1], &outer)
            )
        );
        // Too big once encapsulated: the reply goes back where the packet came from.
        let big = Frame {
            df: true,
            payload: vec![0; 1480],
            ..Frame::tcp(CLIENT4, VIP4, 40001, 443, ACK)
        }
        .bytes();
        let (verdict, out) = b
            .dataplane()
            .test_run_on(BALANCER_PROGRAM, &big, Some(arms[0]))
            .unwrap();
        assert_eq!(verdict, XDP_TX);
        assert_eq!(
            (&out[..6], &out[6..12]),
            (&CLIENT_MAC[..], &ARM_MACS[0][..])
        );
    });
}

#[test]
fn frames_on_an_unattached_interface_or_for_another_arms_mac_pass() {
    with_arms(|arms| {
        let (mut b, _, _) = two_arm_balancer(arms);
        let (frame, _) = dr_flow(sport_to(1));
        let bytes = frame.bytes();
        // lo is not attached.
        let (verdict, out) = b
            .dataplane()
            .test_run_on(BALANCER_PROGRAM, &bytes, None)
            .unwrap();
        assert_eq!((verdict, &out), (XDP_PASS, &bytes));
        // Sent to arm0's MAC but arriving on arm1: meant for whoever owns that MAC there.
        let (verdict, out) = b
            .dataplane()
            .test_run_on(BALANCER_PROGRAM, &bytes, Some(arms[1]))
            .unwrap();
        assert_eq!((verdict, &out), (XDP_PASS, &bytes));
        assert_eq!(b.dataplane().global_counter(Global::Forwarded).unwrap(), 0);
    });
}

#[test]
fn reals_on_an_interface_no_longer_attached_get_no_new_flows() {
    with_arms(|arms| {
        let (mut b, dr, _) = two_arm_balancer(arms);
        let ifaces: Vec<(u32, Mac)> = arms.iter().copied().zip(ARM_MACS).take(2).collect();
        b.set_interfaces(&ifaces).unwrap();
        let status = b.real_status(&dr);
        let on_arm2 = status.iter().find(|r| r.addr == ip_addr(REALS[2])).unwrap();
        assert!(!on_arm2.in_table && on_arm2.mac.is_none() && on_arm2.ifindex.is_none());
        for sport in 40000..40200 {
            let bytes = Frame::tcp(CLIENT4, VIP4, sport, 80, SYN).bytes();
            let (verdict, out) = b
                .dataplane()
                .test_run_on(BALANCER_PROGRAM, &bytes, Some(arms[0]))
                .unwrap();
            assert_ne!(&out[..6], &real_mac(ip_addr(REALS[2]))[..], "port {sport}");
            assert!(verdict == XDP_TX || verdict == XDP_REDIRECT, "port {sport}");
        }
    });
}

/// `xlb_bench_bounce` on a pair's far end, with no budget (a counting sink): what a veth
/// delivers a redirected or transmitted frame to (its peer must run an XDP program), counting
/// what arrives. One load each, so each
/// has its own counter.
struct Sink {
    ebpf: Ebpf,
}

impl Sink {
    fn on(dev: &str) -> Self {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CONNS", 16)
            .load(EBPF_OBJECT)
            .expect("load the eBPF object");
        let prog: &mut Xdp = ebpf
            .program_mut("xlb_bench_bounce")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().unwrap();
        prog.attach(dev, XdpMode::Driver).unwrap();
        Self { ebpf }
    }

    fn received(&self) -> u64 {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("BENCH_RECEIVED").unwrap()).unwrap();
        map.get(&0, 0).unwrap().iter().sum()
    }
}
