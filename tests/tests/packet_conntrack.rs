//! The set-associative connection table (lb-ebpf's conntrack.rs), through the compiled program
//! under BPF_PROG_TEST_RUN: hits, misses that go through Maglev, the least recently seen entry
//! of a full bucket taken by a new flow, torn entries and entries naming a real that no longer
//! serves the flow's service. The table is read and written through the control plane's
//! mapping, with the flow's hashes computed as the data path does (`ConnKey::hashes`).

use std::net::IpAddr;

use lb_common::{ConnKey, ConnValue, Global, conn_seal};
use xlb::{config::ServiceAddr, control::Balancer, dataplane::BALANCER_PROGRAM};
use xlb_tests::*;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "fd00:18::100";
const OTHER_VIP4: &str = "198.18.0.110";
const CLIENT4: &str = "198.18.1.1";
const CLIENT6: &str = "fd00:18:1::1";
const RING: u32 = 65537;
const REALS4: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const REALS6: [&str; 3] = ["fd00:18::11", "fd00:18::12", "fd00:18::13"];
const OTHER_REALS4: [&str; 2] = ["198.18.0.21", "198.18.0.22"];
/// Buckets of the small table the tests use, so that flows sharing a bucket are easy to find.
const BUCKETS: u32 = 16;

fn balancer_with_services() -> Balancer {
    let mut b = balancer_with_capacity(BUCKETS);
    add_dr_service(&mut b, "198.18.0.100:80/tcp", &REALS4);
    add_dr_service(&mut b, "[fd00:18::100]:80/tcp", &REALS6);
    add_dr_service(&mut b, "198.18.0.110:80/tcp", &OTHER_REALS4);
    b
}

/// The real a frame was sent to (its destination MAC), checking the rest is the input's.
fn sent_to(b: &mut Balancer, frame: &Frame, reals: &[&str]) -> IpAddr {
    let input = frame.bytes();
    let (verdict, out) = b.dataplane().test_run(BALANCER_PROGRAM, &input).unwrap();
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out[12..], input[12..], "DR rewrites the MACs only");
    reals
        .iter()
        .map(|r| ip(r))
        .find(|&r| out[..6] == real_mac(r))
        .expect("sent to one of the service's reals")
}

/// Where Maglev sends the flow of `frame` (a 5-tuple service of `reals`).
fn maglev_real(frame: &Frame, reals: &[&str]) -> IpAddr {
    predict(&equal_weight(reals), RING, five_tuple_hash(frame, true))
}

fn global(b: &mut Balancer, which: Global) -> u64 {
    b.dataplane().global_counter(which).unwrap()
}

fn conn(b: &mut Balancer, frame: &Frame) -> Option<ConnValue> {
    b.dataplane().conn(&conn_key(frame)).unwrap()
}

fn ack(sport: u16) -> Frame {
    Frame::tcp(CLIENT4, VIP4, sport, 80, ACK)
}

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT4, VIP4, sport, 80, SYN)
}

fn bucket_of(key: &ConnKey) -> u32 {
    key.hashes()[1] & (BUCKETS - 1)
}

/// Four source ports from `from` on whose flows share a bucket (of three entries).
fn four_flows_of_one_bucket(from: u16) -> Vec<u16> {
    let mut by_bucket = std::collections::HashMap::<u32, Vec<u16>>::new();
    (from..)
        .find_map(|sport| {
            let members = by_bucket
                .entry(bucket_of(&conn_key(&syn(sport))))
                .or_default();
            members.push(sport);
            (members.len() == 4).then(|| members.clone())
        })
        .unwrap()
}

/// Makes the three flows of one full bucket (by source port) last seen `seconds_ago`.
fn age(b: &mut Balancer, sports: &[u16], seconds_ago: [u32; 3]) {
    let key = conn_key(&syn(sports[0]));
    let mut bucket = b.dataplane().conn_bucket(&key).unwrap();
    for e in &mut bucket.entries {
        let i = sports
            .iter()
            .position(|&p| e.fingerprint[0] == conn_key(&syn(p)).hashes()[0])
            .expect("the bucket holds the three flows");
        e.value.last_seen_s -= seconds_ago[i];
    }
    b.dataplane().set_conn_bucket(&key, bucket).unwrap();
}

#[test]
fn the_data_path_and_the_control_plane_hash_flows_alike() {
    for (frame, svc) in [
        (
            Frame::tcp(CLIENT4, VIP4, 40000, 80, SYN),
            "198.18.0.100:80/tcp",
        ),
        (
            Frame::tcp(CLIENT6, VIP6, 40000, 80, SYN),
            "[fd00:18::100]:80/tcp",
        ),
    ] {
        let mut b = balancer_with_services();
        let reals: &[&str] = if frame.src.is_ipv4() {
            &REALS4
        } else {
            &REALS6
        };
        let real = sent_to(&mut b, &frame, reals);
        // Found by the key's hashes: the control plane computes the data path's bucket and
        // fingerprint (what connection sync needs to install a peer's flows).
        let entry = conn(&mut b, &frame).expect("the SYN recorded its flow");
        assert_eq!(
            entry.backend_id as u32,
            b.real_backend_id(&svc.parse().unwrap(), real).unwrap()
        );
    }
}

#[test]
fn an_established_flow_hits_its_entry_and_a_flow_never_seen_misses_into_maglev() {
    let mut b = balancer_with_services();
    let real = sent_to(&mut b, &syn(40000), &REALS4);
    assert_eq!(sent_to(&mut b, &ack(40000), &REALS4), real);
    assert_eq!(global(&mut b, Global::ConnMiss), 0, "the ACK hit");
    // An ACK without a SYN: a miss, scheduled by Maglev, then tracked (the next one hits).
    let stray = ack(40001);
    assert_eq!(
        sent_to(&mut b, &stray, &REALS4),
        maglev_real(&stray, &REALS4)
    );
    assert_eq!(global(&mut b, Global::ConnMiss), 1);
    assert!(conn(&mut b, &stray).is_some());
    sent_to(&mut b, &stray, &REALS4);
    assert_eq!(global(&mut b, Global::ConnMiss), 1);
}

/// Four flows of one bucket (three entries): the fourth takes the entry seen least recently;
/// that flow's next packet misses and Maglev sends it to the same real (the reals did not
/// change), taking in turn the entry then seen least recently.
#[test]
fn a_new_flow_in_a_full_bucket_takes_the_entry_seen_least_recently() {
    let mut b = balancer_with_services();
    let same = four_flows_of_one_bucket(40000);
    let reals: Vec<IpAddr> = same[..3]
        .iter()
        .map(|&p| sent_to(&mut b, &syn(p), &REALS4))
        .collect();
    // Ages: the first flow seen 30 s ago, the second 20 s, the third 10 s.
    age(&mut b, &same[..3], [30, 20, 10]);

    sent_to(&mut b, &syn(same[3]), &REALS4);
    assert!(
        conn(&mut b, &syn(same[0])).is_none(),
        "the oldest entry stays"
    );
    for &p in &same[1..] {
        assert!(conn(&mut b, &syn(p)).is_some(), "flow {p} lost its entry");
    }
    // The evicted flow stays on its real, through Maglev, and takes the next oldest entry.
    assert_eq!(sent_to(&mut b, &ack(same[0]), &REALS4), reals[0]);
    assert_eq!(reals[0], maglev_real(&ack(same[0]), &REALS4));
    assert_eq!(global(&mut b, Global::ConnMiss), 1);
    assert!(conn(&mut b, &syn(same[0])).is_some());
    assert!(conn(&mut b, &syn(same[1])).is_none());
}

/// A flood of SYNs takes the entries of other SYNs before those of connections that were
/// ACKed and are idle for less than `CONN_ACKED_KEEP_S`.
#[test]
fn a_new_flow_takes_an_unacknowledged_entry_before_an_acked_one_seen_earlier() {
    let mut b = balancer_with_services();
    let same = four_flows_of_one_bucket(41000);
    for &p in &same[..3] {
        sent_to(&mut b, &syn(p), &REALS4);
    }
    sent_to(&mut b, &ack(same[0]), &REALS4);
    // The ACKed flow seen 5 s ago, the two SYNs 2 s and 1 s ago.
    age(&mut b, &same[..3], [5, 2, 1]);
    sent_to(&mut b, &syn(same[3]), &REALS4);
    assert!(
        conn(&mut b, &syn(same[0])).is_some(),
        "the ACKed flow lost its entry"
    );
    assert!(
        conn(&mut b, &syn(same[1])).is_none(),
        "the older SYN kept its entry"
    );
    assert!(conn(&mut b, &syn(same[2])).is_some());
}

/// An entry with the flow's first hash but a seal that does not match the real it names
/// (two CPUs wrote it at once): a miss, never a real taken from the torn entry.
#[test]
fn a_torn_entry_is_a_miss_and_the_flow_goes_to_its_maglev_real() {
    let mut b = balancer_with_services();
    let flow = ack(40000);
    let real = sent_to(&mut b, &syn(40000), &REALS4);
    let other = REALS4.iter().map(|r| ip(r)).find(|&r| r != real).unwrap();
    let svc: ServiceAddr = "198.18.0.100:80/tcp".parse().unwrap();
    let other_id = b.real_backend_id(&svc, other).unwrap();
    let key = conn_key(&flow);
    let mut bucket = b.dataplane().conn_bucket(&key).unwrap();
    let entry = bucket
        .entries
        .iter_mut()
        .find(|e| e.fingerprint[0] == key.hashes()[0])
        .unwrap();
    // The other real's id and generation, the fingerprint as sealed for the flow's real.
    entry.value.backend_id = other_id as u16;
    assert_ne!(
        entry.fingerprint[1],
        key.hashes()[1] ^ conn_seal(&entry.value)
    );
    b.dataplane().set_conn_bucket(&key, bucket).unwrap();
    assert!(
        conn(&mut b, &flow).is_none(),
        "a torn entry reads as a miss"
    );

    assert_eq!(sent_to(&mut b, &flow, &REALS4), real);
    assert_eq!(global(&mut b, Global::ConnMiss), 1);
    // Rewritten whole, in the torn entry's place.
    let entry = conn(&mut b, &flow).expect("re-recorded");
    assert_eq!(
        entry.backend_id as u32,
        b.real_backend_id(&svc, real).unwrap()
    );
    assert_eq!(
        b.dataplane()
            .conn_bucket(&key)
            .unwrap()
            .entries
            .iter()
            .filter(|e| e.fingerprint[0] == key.hashes()[0])
            .count(),
        1
    );
}

/// A whole entry that names a real of another service (a fingerprint that matched by chance,
/// or an id since given to another service's real): the real is checked against the flow's
/// service, and the flow re-scheduled through Maglev.
#[test]
fn an_entry_naming_a_real_of_another_service_is_stale_and_rescheduled() {
    let mut b = balancer_with_services();
    let flow = ack(40000);
    let real = sent_to(&mut b, &syn(40000), &REALS4);
    // A flow of the other service, for its real's id and generation.
    let elsewhere = Frame::tcp(CLIENT4, OTHER_VIP4, 40000, 80, SYN);
    sent_to(&mut b, &elsewhere, &OTHER_REALS4);
    let foreign = conn(&mut b, &elsewhere).unwrap();
    b.dataplane()
        .insert_conns(&[(conn_key(&flow), foreign)])
        .unwrap();
    assert_eq!(conn(&mut b, &flow), Some(foreign), "sealed for that real");

    assert_eq!(sent_to(&mut b, &flow, &REALS4), real);
    assert_eq!(global(&mut b, Global::ConnStale), 1);
    assert_eq!(global(&mut b, Global::ConnMiss), 0);
    let svc: ServiceAddr = "198.18.0.100:80/tcp".parse().unwrap();
    assert_eq!(
        conn(&mut b, &flow).unwrap().backend_id as u32,
        b.real_backend_id(&svc, real).unwrap()
    );
}
