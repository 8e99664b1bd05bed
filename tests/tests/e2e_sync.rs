//! End-to-end: connection sync in the ECMP lab (`XLB_LAB_SYNC=1 scripts/lab ecmp up`: each
//! director's daemon has the other as `--sync-peer`, with a shared key). Long-lived
//! connections are made; then the real set changes on both directors (the third real drained:
//! out of the Maglev tables, its tracked flows go on); then a director goes dark. Every
//! connection keeps its real, those through the lost director included: the other director
//! has their entries (synced), although its Maglev table now sends some of them elsewhere. How
//! many would have moved without sync is counted from that director's own Maglev table, read
//! from the kernel. Then sync datagrams from a stranger's address, with a bad MAC from the
//! peer's address, and replayed, change nothing and are counted.
//!
//! One test function: the lab has fixed namespace names. Run it under the shared lab lock.

use std::time::{Duration, Instant};

use lb_common::CONN_F_ACKED;
use xlb::sync::{Sequencer, SyncEntry, encode, load_key};
use xlb_tests::{
    Frame, conn_key,
    ecmp::*,
    five_tuple_hash,
    lab::{metric, sh, text, wait_for},
};

/// Long-lived connections held across the real-set change and the director's loss.
const LONG_LIVED: usize = 36;

/// A sync counter of director `d`'s metrics page (0 while absent).
fn sync_metric(d: Director, series: &str) -> f64 {
    metric(&LAB.metrics_page_of(d.0), series).unwrap_or(0.0)
}

fn refused(d: Director, reason: &str) -> f64 {
    sync_metric(d, &format!("xlb_sync_refused_total{{reason=\"{reason}\"}}"))
}

/// Sends the datagram `bytes` from host `from`'s namespace to `to`:8848 over UDP.
fn send_from(from: &str, bytes: &[u8], to: &str) {
    let topo = LAB.topology();
    let file = topo.state_file("forged.bin");
    std::fs::write(&file, bytes).unwrap();
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(from),
            "python3",
            "-c",
            "import socket, sys; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(\
             open(sys.argv[1], 'rb').read(), (sys.argv[2], 8848))",
            &file,
            to,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn sync_keeps_flows_on_their_real_across_a_real_set_change_and_a_director_loss() {
    let _lab = LAB.up_with(&[("XLB_LAB_SYNC", "1")]);
    let topo = LAB.topology();
    let (dir1, dir2) = directors(&topo);
    let web = topo.service("web");
    let (web_vip, web_addr) = (web.vip4.clone(), web.addr4());
    let drained = &topo.reals[2];
    let real_addr = |name: &str| topo.ipv4(name).to_string();

    // --- Long-lived connections, each a new flow on one director, synced to the other. ---
    let mut conns = open_connections(&web_vip, LONG_LIVED, 60);
    let installed = || {
        sync_metric(dir1, "xlb_sync_entries_installed_total")
            + sync_metric(dir2, "xlb_sync_entries_installed_total")
    };
    wait_for(
        "every long-lived connection's flow installed on the other director",
        Duration::from_secs(10),
        || installed() >= LONG_LIVED as f64,
    );

    // --- The real-set change, on both directors: the third real drained. ---
    for d in [dir1, dir2] {
        director(d).ok(&["real", "drain", &web_addr, &real_addr(drained)]);
    }
    // At least one refresh after the change (every 3 s), and the flows keep going.
    conns.run_for(Duration::from_secs(4));

    // Without sync, a director taking a flow over schedules it through its Maglev table: the
    // flows whose slot in the kept director's table (in the kernel, after the change) names
    // another real than theirs would move.
    let table = kernel_table(dir2, &web_addr);
    let client = topo.ipv4(&topo.client).to_string();
    conns.collect();
    let would_move: Vec<bool> = (0..LONG_LIVED)
        .map(|i| {
            let port: u16 = conns.ports[i].parse().unwrap();
            let hash = five_tuple_hash(&Frame::tcp(&client, &web_vip, port, web.port, 0x10), true);
            let slot = table[(hash % table.len() as u32) as usize].to_string();
            slot != real_addr(&conns.answers[i][0].real)
        })
        .collect();

    // --- d1 goes dark: the connections through it move to d2. ---
    let miss_before = stats(dir2)["global"]["conn_miss"].as_u64().unwrap();
    let t = Instant::now();
    link(dir1, "down");
    let converged = wait_hops(&web_vip, &[dir2.1], Duration::from_secs(10));
    conns.run_for(Duration::from_secs(4));
    let alive = conns.survivors_after(t + converged);
    let stalled: Vec<usize> = conns.stalled_after(t).iter().map(|s| s.0).collect();
    let misses = stats(dir2)["global"]["conn_miss"].as_u64().unwrap() - miss_before;
    let moved_without_sync = stalled.iter().filter(|&&i| would_move[i]).count();
    println!(
        "sync: {} of {LONG_LIVED} long-lived connections survive on their real after a \
         real-set change ({drained} drained) and the loss of {} (router converged in {} ms); \
         {} went through {} and moved to {}, which had them all ({misses} connection-table \
         misses); without sync {moved_without_sync} of those {} would have moved to another \
         real ({} of all {LONG_LIVED}, had their director been lost)",
        alive.len(),
        dir1.0,
        ms(converged),
        stalled.len(),
        dir1.0,
        dir2.0,
        stalled.len(),
        would_move.iter().filter(|&&m| m).count(),
    );
    assert!(conns.errors.is_empty(), "{:?}", conns.errors);
    assert_eq!(alive.len(), LONG_LIVED, "{}", diagnostics());
    assert!(!stalled.is_empty(), "no connection went through {}", dir1.0);
    assert_eq!(misses, 0, "{} found no entry for some flows", dir2.0);
    assert!(
        would_move.iter().any(|&m| m),
        "the real-set change moves no flow in Maglev: the scenario shows nothing"
    );
    drop(conns);
    link(dir1, "up");
    wait_hops(&web_vip, &[dir1.1, dir2.1], Duration::from_secs(20));

    // --- Forged sync datagrams. A flow nobody made, named by real and service as a peer would:
    // well signed from a stranger (the client), signed with another key from d1's address. ---
    let key = load_key(std::path::Path::new(&topo.state_file("sync.key"))).unwrap();
    let flow = SyncEntry {
        client: client.parse().unwrap(),
        client_port: 1,
        service: web_addr.parse().unwrap(),
        dport: web.port,
        real: real_addr(&topo.reals[0]).parse().unwrap(),
        real_port: 0,
        flags: CONN_F_ACKED,
        nat: None,
    };
    let flow_key = conn_key(&Frame::tcp(&client, &web_vip, 1, web.port, 0x10));
    let mut seq = Sequencer::default();
    let (not_peer, bad_mac) = (refused(dir2, "not_peer"), refused(dir2, "bad_mac"));
    send_from(
        &topo.client,
        &encode(&[flow], &key, || seq.advance()).remove(0),
        dir2.1,
    );
    send_from(
        dir1.0,
        &encode(&[flow], b"not the lab's key, 16+ bytes", || seq.advance()).remove(0),
        dir2.1,
    );
    wait_for("both forgeries counted", Duration::from_secs(5), || {
        refused(dir2, "not_peer") == not_peer + 1.0 && refused(dir2, "bad_mac") == bad_mac + 1.0
    });
    assert!(
        !kernel_has_conn(dir2, &flow_key),
        "a forged entry was installed"
    );

    // The same entry, well signed from d1's address, is installed (a fresh sequence: retried
    // should d1's daemon have sent a batch with a later one meanwhile); sent again, refused.
    let mut genuine = Vec::new();
    for _ in 0..3 {
        genuine = encode(&[flow], &key, || seq.advance()).remove(0);
        send_from(dir1.0, &genuine, dir2.1);
        std::thread::sleep(Duration::from_millis(300));
        if kernel_has_conn(dir2, &flow_key) {
            break;
        }
    }
    assert!(
        kernel_has_conn(dir2, &flow_key),
        "a genuine entry was not installed"
    );
    let replays = refused(dir2, "replay");
    send_from(dir1.0, &genuine, dir2.1);
    wait_for("the replay counted", Duration::from_secs(5), || {
        refused(dir2, "replay") >= replays + 1.0
    });
    println!(
        "forged sync datagrams: refused not_peer {}, bad_mac {}, replay {} on {}",
        refused(dir2, "not_peer"),
        refused(dir2, "bad_mac"),
        refused(dir2, "replay"),
        dir2.0
    );
}
