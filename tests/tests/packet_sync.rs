//! Connection sync through the compiled program under BPF_PROG_TEST_RUN: the data path reports
//! exactly one `SyncEvent` per new flow (none for its established packets, none while sync is
//! off); the daemon's sender and receiver (daemon/sync.rs) carry it over a real UDP socket on
//! lo to a second balancer whose backend ids and Maglev table differ, which then sends the
//! flow's next packet to the same real; a NAT or full-NAT flow's peer translates its next
//! request and its replies byte for byte as its director does; a datagram from a stranger,
//! with a bad MAC, or replayed installs nothing and is counted.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use lb_common::{CONN_F_ACKED, ConnValue, SyncEvent};
use xlb::{
    config::{Mode, ServiceAddr, ServiceConfig},
    control::Balancer,
    daemon::sync::{Receiver, Sender, SyncOptions, SyncStats},
    dataplane::{BALANCER_PROGRAM, ring_records},
    sync::{Refusal, SyncEntry, encode},
};
use xlb_tests::*;

const SERVICE: &str = "198.18.0.100:80/tcp";
const UDP_SERVICE: &str = "198.18.0.100:53/udp";
const VIP: &str = "198.18.0.100";
const CLIENT: &str = "198.18.1.1";
const REALS: [&str; 3] = ["198.18.0.11", "198.18.0.12", "198.18.0.13"];
const RING: u32 = 65537;
const KEY: &[u8] = b"a shared key of enough bytes";

/// The director whose flows are synced: the web service and a UDP one.
fn director() -> Balancer {
    let mut b = balancer();
    add_dr_service(&mut b, SERVICE, &REALS);
    add_dr_service(&mut b, UDP_SERVICE, &REALS);
    b
}

/// Its peer: another service first (so its backend ids differ), then the same web service
/// with the last real drained (out of its Maglev table: a real-set change).
fn peer() -> Balancer {
    let mut b = balancer();
    add_dr_service(
        &mut b,
        "198.18.0.110:80/tcp",
        &["198.18.0.21", "198.18.0.22"],
    );
    let web = add_dr_service(&mut b, SERVICE, &REALS);
    b.set_draining(&web, ip(REALS[2]), true).unwrap();
    b
}

/// The real a frame was sent to (its destination MAC).
fn sent_to(b: &mut Balancer, frame: &Frame) -> IpAddr {
    let (verdict, out) = b
        .dataplane()
        .test_run(BALANCER_PROGRAM, &frame.bytes())
        .unwrap();
    assert_eq!(verdict, XDP_TX);
    REALS
        .iter()
        .map(|r| ip(r))
        .find(|&r| out[..6] == real_mac(r))
        .expect("sent to one of the service's reals")
}

fn tcp(sport: u16, flags: u8) -> Frame {
    Frame::tcp(CLIENT, VIP, sport, 80, flags)
}

#[test]
fn one_event_per_new_flow_none_for_established_packets_none_when_off() {
    let mut b = director();
    let mut ring = b.dataplane().take_sync_events().unwrap();
    let web: ServiceAddr = SERVICE.parse().unwrap();

    // Off (the default): new flows are tracked, not reported.
    sent_to(&mut b, &tcp(40000, SYN));
    assert!(
        b.dataplane()
            .conn(&conn_key(&tcp(40000, SYN)))
            .unwrap()
            .is_some()
    );
    assert!(
        ring_records::<SyncEvent>(&mut ring).is_empty(),
        "reported while sync is off"
    );

    b.set_sync(true).unwrap();
    for (i, sport) in (41000..41010).enumerate() {
        let syn = tcp(sport, SYN);
        let real = sent_to(&mut b, &syn);
        let got = ring_records::<SyncEvent>(&mut ring);
        assert_eq!(got.len(), 1, "flow {i}: {got:?}");
        let e = got[0];
        assert_eq!(e.key, conn_key(&syn));
        assert_eq!(Some(e.backend_id), b.real_backend_id(&web, real));
        assert_ne!(e.at_ns, 0);
        // Its established packets: forwarded, never reported.
        for _ in 0..5 {
            assert_eq!(sent_to(&mut b, &tcp(sport, ACK)), real);
        }
        assert!(
            ring_records::<SyncEvent>(&mut ring).is_empty(),
            "an established packet reported"
        );
    }
    // A UDP flow: its first datagram only.
    let dgram = Frame::udp(CLIENT, VIP, 5000, 53);
    for _ in 0..4 {
        sent_to(&mut b, &dgram);
    }
    let got = ring_records::<SyncEvent>(&mut ring);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].key, conn_key(&dgram));
    // Off again: nothing more.
    b.set_sync(false).unwrap();
    sent_to(&mut b, &tcp(42000, SYN));
    assert!(ring_records::<SyncEvent>(&mut ring).is_empty());
}

/// A source port from `from` on whose flow Maglev sends to `real` (all reals in the table).
fn port_to(real: &str, from: u16) -> u16 {
    (from..)
        .find(|&p| {
            predict(
                &equal_weight(&REALS),
                RING,
                five_tuple_hash(&tcp(p, SYN), true),
            ) == ip(real)
        })
        .unwrap()
}

#[test]
fn a_peer_installs_the_flows_and_keeps_them_on_their_real() {
    let mut a = director();
    let mut ring = a.dataplane().take_sync_events().unwrap();
    a.set_sync(true).unwrap();
    let mut b = peer();
    let mut unsynced = peer();

    let listen = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to_b = listen.local_addr().unwrap();
    listen
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let from_a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let opts = |peer: SocketAddr| SyncOptions {
        peers: vec![peer],
        listen: "127.0.0.1:0".parse().unwrap(),
        key: KEY.to_vec(),
    };
    let a_stats = Arc::new(SyncStats::default());
    let mut sender = Sender::new(from_a, &opts(to_b), a_stats.clone()).unwrap();
    let b_stats = Arc::new(SyncStats::default());
    let mut receiver = Receiver::new(&opts("127.0.0.1:1".parse().unwrap()), b_stats.clone());

    // Flows on each real, the drained one's among them.
    let ports: Vec<u16> = REALS
        .iter()
        .flat_map(|r| {
            let first = port_to(r, 43000);
            [first, port_to(r, first + 1)]
        })
        .collect();
    let mut on_a = Vec::new();
    for &p in &ports {
        on_a.push(sent_to(&mut a, &tcp(p, SYN)));
        sent_to(&mut a, &tcp(p, ACK));
    }
    sender.take_events(&a, &ring_records::<SyncEvent>(&mut ring));
    sender.flush(&mut a);
    let mut buf = [0u8; 2048];
    let (len, from) = listen.recv_from(&mut buf).unwrap();
    assert_eq!(
        len,
        16 + 24 * ports.len() + 32,
        "one datagram of 24-byte entries"
    );
    let installed = receiver.take(&mut b, from.ip(), &buf[..len]).unwrap();
    assert_eq!(installed, ports.len());
    assert_eq!(a_stats.entries_sent.load(Relaxed), ports.len() as u64);
    assert_eq!(a_stats.batches_sent.load(Relaxed), 1);
    assert_eq!(b_stats.entries_installed.load(Relaxed), ports.len() as u64);

    // The peer sends each flow's next packet to the real it started on; without sync, the
    // flows of the drained real (and any Maglev moved) would go elsewhere.
    let mut moved_without_sync = 0;
    for (&p, &real) in ports.iter().zip(&on_a) {
        assert_eq!(sent_to(&mut b, &tcp(p, ACK)), real, "port {p}");
        if sent_to(&mut unsynced, &tcp(p, ACK)) != real {
            moved_without_sync += 1;
        }
    }
    println!(
        "{moved_without_sync} of {} flows would move without sync",
        ports.len()
    );
    assert!(
        moved_without_sync >= 2,
        "the drained real's flows move without sync"
    );

    // A refresh re-sends the flows still active (the ACKs were just seen), nothing else.
    sender.refresh(&mut a).unwrap();
    sender.flush(&mut a);
    let (len, from) = listen.recv_from(&mut buf).unwrap();
    assert_eq!(from.ip(), ip("127.0.0.1"));
    let (_, refreshed) = xlb::sync::decode(&buf[..len], KEY).unwrap();
    assert_eq!(refreshed.len(), ports.len());
    assert!(refreshed.iter().all(|e| e.flags & CONN_F_ACKED != 0));
    assert_eq!(sender.announced(), ports.len());
}

#[test]
fn strangers_forgeries_and_replays_change_nothing() {
    let mut b = peer();
    let stats = Arc::new(SyncStats::default());
    let peer_addr: IpAddr = ip("198.18.11.1");
    let mut receiver = Receiver::new(
        &SyncOptions {
            peers: vec![SocketAddr::new(peer_addr, 8848)],
            listen: "127.0.0.1:0".parse().unwrap(),
            key: KEY.to_vec(),
        },
        stats.clone(),
    );
    let flow = SyncEntry {
        client: ip(CLIENT),
        client_port: 44000,
        service: SERVICE.parse().unwrap(),
        dport: 80,
        real: ip(REALS[2]),
        real_port: 0,
        flags: CONN_F_ACKED,
        nat: None,
    };
    let key = conn_key(&tcp(44000, ACK));
    let mut seq = xlb::sync::Sequencer::default();
    let good = encode(&[flow], KEY, || seq.advance()).remove(0);
    let forged = encode(&[flow], b"not the shared key at all", || seq.advance()).remove(0);
    let refused = |why: Refusal| {
        stats.refused[Refusal::ALL.iter().position(|&r| r == why).unwrap()].load(Relaxed)
    };

    // Well signed, from a stranger; signed with another key, from the peer's address.
    assert_eq!(receiver.take(&mut b, ip("198.18.10.1"), &good).unwrap(), 0);
    assert_eq!(refused(Refusal::NotPeer), 1);
    assert_eq!(receiver.take(&mut b, peer_addr, &forged).unwrap(), 0);
    assert_eq!(refused(Refusal::BadMac), 1);
    assert_eq!(
        receiver.take(&mut b, peer_addr, b"XLBS garbage").unwrap(),
        0
    );
    assert_eq!(refused(Refusal::Malformed), 1);
    assert_eq!(b.dataplane().conn(&key).unwrap(), None::<ConnValue>);
    assert_eq!(stats.entries_installed.load(Relaxed), 0);

    // The genuine batch, then the same again.
    assert_eq!(receiver.take(&mut b, peer_addr, &good).unwrap(), 1);
    let web: ServiceAddr = SERVICE.parse().unwrap();
    let entry = b.dataplane().conn(&key).unwrap().expect("installed");
    assert_eq!(
        Some(u32::from(entry.backend_id)),
        b.real_backend_id(&web, ip(REALS[2]))
    );
    assert_eq!(receiver.take(&mut b, peer_addr, &good).unwrap(), 0);
    assert_eq!(refused(Refusal::Replay), 1);
    assert_eq!(stats.entries_installed.load(Relaxed), 1);

    // An entry naming a real (or service) this director does not have: counted, skipped.
    let stranger_real = SyncEntry {
        real: ip("198.18.0.99"),
        ..flow
    };
    let unknown_service = SyncEntry {
        service: "198.18.0.120:80/tcp".parse().unwrap(),
        ..flow
    };
    let batch = encode(&[stranger_real, unknown_service], KEY, || seq.advance()).remove(0);
    assert_eq!(receiver.take(&mut b, peer_addr, &batch).unwrap(), 0);
    assert_eq!(stats.entries_unknown.load(Relaxed), 2);
}

const NAT_VIP: &str = "198.18.0.110";
const FULLNAT_VIP: &str = "198.18.0.111";
const SNAT: &str = "198.18.0.50";
/// The port the NAT services' reals serve on.
const MAPPED: u16 = 8080;

/// A director with a NAT and a full-NAT service over the reals (at `MAPPED`); `other_first`:
/// after another service, so its backend ids differ from the first director's.
fn nat_director(other_first: bool) -> Balancer {
    let mut b = balancer();
    if other_first {
        add_dr_service(&mut b, "198.18.0.120:80/tcp", &["198.18.0.21"]);
    }
    for (vip, mode) in [(NAT_VIP, Mode::Nat), (FULLNAT_VIP, Mode::Fullnat)] {
        let mut cfg = ServiceConfig::new(format!("{vip}:80/tcp").parse().unwrap());
        cfg.mode = mode;
        if mode == Mode::Fullnat {
            cfg.snat = vec![ip(SNAT)];
        }
        add_service_with_reals(&mut b, cfg, &REALS, MAPPED);
    }
    b
}

/// The real's answer (an ACK) to a request the director sent it (`sent`: IPv4, no options),
/// as it reaches the director: from the real to the request's source, ports swapped.
fn answer_to(sent: &[u8]) -> Vec<u8> {
    let h = xlb_tests::wellformed::ip(sent).unwrap();
    let port = |at: usize| u16::from_be_bytes([sent[at], sent[at + 1]]);
    let mut f = Frame::tcp(
        &h.dst.to_string(),
        &h.src.to_string(),
        port(36),
        port(34),
        ACK,
    )
    .bytes();
    f[..6].copy_from_slice(&DIRECTOR_MAC);
    f[6..12].copy_from_slice(&real_mac(h.dst));
    f
}

/// Also: the peer announces each flow it takes over (its first packet there), and a third
/// director learns the flows, NAT state included, from it.
#[test]
fn a_peer_translates_synced_nat_flows_as_their_director_does() {
    let mut a = nat_director(false);
    let mut ring = a.dataplane().take_sync_events().unwrap();
    a.set_sync(true).unwrap();
    let mut b = nat_director(true);
    let mut unsynced = nat_director(true);
    let mut c = nat_director(true);
    let mut d = nat_director(false);

    let listen = UdpSocket::bind("127.0.0.1:0").unwrap();
    listen
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let opts = |peer: SocketAddr| SyncOptions {
        peers: vec![peer],
        listen: "127.0.0.1:0".parse().unwrap(),
        key: KEY.to_vec(),
    };
    let mut sender = Sender::new(
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        &opts(listen.local_addr().unwrap()),
        Arc::new(SyncStats::default()),
    )
    .unwrap();
    let b_stats = Arc::new(SyncStats::default());
    let mut receiver = Receiver::new(&opts("127.0.0.1:1".parse().unwrap()), b_stats.clone());

    // Flows through A: for each, the ACK after its SYN, and what A sends for it and for the
    // real's answer.
    let mut flows = Vec::new();
    for vip in [NAT_VIP, FULLNAT_VIP] {
        for sport in 45000..45003 {
            let (verdict, _) = a
                .dataplane()
                .test_run(
                    BALANCER_PROGRAM,
                    &Frame::tcp(CLIENT, vip, sport, 80, SYN).bytes(),
                )
                .unwrap();
            assert_eq!(verdict, XDP_TX);
            let ack = Frame::tcp(CLIENT, vip, sport, 80, ACK).bytes();
            let (_, request) = a.dataplane().test_run(BALANCER_PROGRAM, &ack).unwrap();
            let answer = answer_to(&request);
            let (verdict, reply) = a.dataplane().test_run(BALANCER_PROGRAM, &answer).unwrap();
            assert_eq!(verdict, XDP_TX, "{vip}:{sport}: A translates the answer");
            flows.push((vip, sport, ack, request, answer, reply));
        }
    }
    sender.take_events(&a, &ring_records::<SyncEvent>(&mut ring));
    sender.flush(&mut a);
    let mut buf = [0u8; 2048];
    let (len, from) = listen.recv_from(&mut buf).unwrap();
    // NAT entries carry the client's neighbour MAC, full NAT's the SNAT port and address too.
    assert_eq!(len, 16 + 3 * (24 + 6) + 3 * (24 + 6 + 2 + 4) + 32);
    receiver.set_route(ip(CLIENT), TEST_IFINDEX);
    assert_eq!(receiver.take(&mut b, from.ip(), &buf[..len]).unwrap(), 6);
    assert_eq!(b_stats.nat_skipped.load(Relaxed), 0);

    // The peer sends the next request exactly as A did, and translates the real's answer
    // exactly as A did; the peer without sync cannot translate the answers at all. The peer
    // (syncing too) announces each flow it takes over on its first packet, once.
    let mut b_ring = b.dataplane().take_sync_events().unwrap();
    b.set_sync(true).unwrap();
    let mut taken_over = Vec::new();
    for (vip, sport, ack, request, answer, reply) in &flows {
        assert_eq!(
            b.dataplane().test_run(BALANCER_PROGRAM, ack).unwrap(),
            (XDP_TX, request.clone()),
            "{vip}:{sport}: request"
        );
        let events = ring_records::<SyncEvent>(&mut b_ring);
        assert_eq!(events.len(), 1, "{vip}:{sport}: announced on takeover");
        taken_over.extend(events);
        assert_eq!(
            b.dataplane().test_run(BALANCER_PROGRAM, answer).unwrap(),
            (XDP_TX, reply.clone()),
            "{vip}:{sport}: reply"
        );
        assert_eq!(
            unsynced
                .dataplane()
                .test_run(BALANCER_PROGRAM, answer)
                .unwrap()
                .0,
            XDP_PASS,
            "{vip}:{sport}: translated without sync"
        );
    }
    for (_, _, ack, _, _, _) in &flows {
        b.dataplane().test_run(BALANCER_PROGRAM, ack).unwrap();
    }
    assert!(
        ring_records::<SyncEvent>(&mut b_ring).is_empty(),
        "a taken-over flow announced twice"
    );
    // What it announces carries the NAT state it installed: a third director (or the old
    // master, restarted) learns the flows back from it and translates them as A did.
    let mut b_sender = Sender::new(
        UdpSocket::bind("127.0.0.1:0").unwrap(),
        &opts(listen.local_addr().unwrap()),
        Arc::new(SyncStats::default()),
    )
    .unwrap();
    b_sender.take_events(&b, &taken_over);
    b_sender.flush(&mut b);
    let (len, from) = listen.recv_from(&mut buf).unwrap();
    let mut third = Receiver::new(&opts(from), Arc::new(SyncStats::default()));
    third.set_route(ip(CLIENT), TEST_IFINDEX);
    assert_eq!(third.take(&mut d, from.ip(), &buf[..len]).unwrap(), 6);
    for (vip, sport, ack, request, answer, reply) in &flows {
        assert_eq!(
            d.dataplane().test_run(BALANCER_PROGRAM, ack).unwrap(),
            (XDP_TX, request.clone()),
            "{vip}:{sport}: request through the third"
        );
        assert_eq!(
            d.dataplane().test_run(BALANCER_PROGRAM, answer).unwrap(),
            (XDP_TX, reply.clone()),
            "{vip}:{sport}: reply through the third"
        );
    }

    // The full-NAT flows' reply tuples are held on the peer: its allocator, which claims an
    // SNAT port by inserting its reply tuple where none is, cannot hand them to another flow.
    let held = b.dataplane().nat_replies().unwrap();
    for (vip, _, _, request, _, _) in &flows {
        let h = xlb_tests::wellformed::ip(request).unwrap();
        if *vip == FULLNAT_VIP {
            assert_eq!(h.src, ip(SNAT));
            let snat_port = [request[34], request[35]];
            assert!(
                held.iter()
                    .any(|(k, _)| k.dst[..4] == ip_octets(SNAT)
                        && k.dport.to_ne_bytes() == snat_port),
                "{vip}: SNAT port {snat_port:?} not held"
            );
        }
    }

    // A NAT flow whose client's route leaves by an interface xlb is not on: the connection
    // entry is installed, its translation is not (and counted). (The refresh sends the flows
    // seen lately: seen again now, whatever the time the test took so far.)
    for (_, _, ack, _, _, _) in &flows {
        a.dataplane().test_run(BALANCER_PROGRAM, ack).unwrap();
    }
    let mut lost = Receiver::new(&opts("127.0.0.1:1".parse().unwrap()), b_stats.clone());
    lost.set_route(ip(CLIENT), 4242);
    sender.refresh(&mut a).unwrap();
    sender.flush(&mut a);
    let (len, from) = listen.recv_from(&mut buf).unwrap();
    assert_eq!(lost.take(&mut c, from.ip(), &buf[..len]).unwrap(), 6);
    assert_eq!(b_stats.nat_skipped.load(Relaxed), 6);
    assert!(c.dataplane().nat_replies().unwrap().is_empty());
}

fn ip_octets(a: &str) -> [u8; 4] {
    match ip(a) {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => unreachable!("IPv4 here"),
    }
}
