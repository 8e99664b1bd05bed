//! Packet tests of the forwarding-rate bench's bounce program (lb-ebpf's bench.rs) under
//! BPF_PROG_TEST_RUN: whatever comes back, each send is the stored frame made the next flow's
//! (source address and port), with checksums that match, in the order the step gives.

use aya::{Ebpf, EbpfLoader, maps::Array, programs::Xdp};
use lb_common::{BENCH_FRAME_MAX, BenchBounce, bench_flow_source};
use xlb::dataplane::{EBPF_OBJECT, run_once};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
/// Flow 0's source.
const CLIENT: [u8; 4] = [198, 19, 0, 1];
const PORT: u16 = 1024;
const BOUNCE: &str = "xlb_bench_bounce";

fn load() -> Ebpf {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("CONNS", 16)
        .load(EBPF_OBJECT)
        .expect("load the eBPF object");
    let prog: &mut Xdp = ebpf.program_mut(BOUNCE).unwrap().try_into().unwrap();
    prog.load().unwrap();
    ebpf
}

fn ack_of(flow: u32) -> Vec<u8> {
    let (addr_add, port_add) = bench_flow_source(flow);
    let addr = std::net::Ipv4Addr::from(u32::from_be_bytes(CLIENT) + addr_add);
    Frame::tcp(&addr.to_string(), VIP4, PORT + port_add, 80, ACK).bytes()
}

/// Starts a run of `budget` sends cycling over `flows` flows by `step`, flow 0's frame stored.
fn start(ebpf: &mut Ebpf, flows: u32, step: u32, budget: u64) {
    let frame = ack_of(0);
    let mut run = BenchBounce {
        budget,
        last_ns: 0,
        busy_ns: 0,
        busy_frames: 0,
        out_ifindex: 1,
        len: frame.len() as u32,
        flows,
        flow_step: step,
        flow: 0,
        _pad: 0,
        frame: [0; BENCH_FRAME_MAX],
    };
    run.frame[..frame.len()].copy_from_slice(&frame);
    let mut map: Array<_, BenchBounce> =
        Array::try_from(ebpf.map_mut("BENCH_BOUNCE").unwrap()).unwrap();
    map.set(0, run, 0).unwrap();
}

/// What the program sends for one frame that came back (a TUN-encapsulated length, so that
/// the restore also moves the head).
fn bounce(ebpf: &mut Ebpf) -> (u32, Vec<u8>) {
    let mut came_back = vec![0xee; 20];
    came_back.extend(ack_of(0));
    let prog: &mut Xdp = ebpf.program_mut(BOUNCE).unwrap().try_into().unwrap();
    run_once(prog, &came_back, None).unwrap()
}

#[test]
fn each_send_is_the_next_flows_frame_with_its_checksums() {
    let mut ebpf = load();
    // A coprime step: the order is 0, step, 2 step, ... modulo flows; flows from 2^14 on
    // (16,387, the second) add to the source address.
    let (flows, step) = (20_000, 16_387);
    start(&mut ebpf, flows, step, 100);
    let mut flow = 0;
    for send in 0..12 {
        let (verdict, out) = bounce(&mut ebpf);
        assert_eq!(verdict, XDP_REDIRECT, "send {send}");
        // Frame::tcp computes both checksums afresh: equal bytes, right checksums.
        assert_eq!(out, ack_of(flow), "send {send}: flow {flow}");
        flow = (flow + step) % flows;
    }
}

#[test]
fn one_flow_sends_the_stored_frame_unchanged() {
    let mut ebpf = load();
    start(&mut ebpf, 1, 0, 5);
    for send in 0..5 {
        let (verdict, out) = bounce(&mut ebpf);
        assert_eq!(verdict, XDP_REDIRECT, "send {send}");
        assert_eq!(out, ack_of(0), "send {send}");
    }
    // The budget is spent: a counting sink.
    assert_eq!(bounce(&mut ebpf).0, XDP_DROP);
}
