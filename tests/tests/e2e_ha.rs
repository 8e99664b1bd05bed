//! End-to-end: the VRRP pair (scripts/lab ha up): two directors on the clients' segment, both
//! running xlb with one configuration, keepalived (from packaging/keepalived) moving the VIP
//! and the full-NAT service's SNAT address; DR reals (also the full-NAT service's). Real HTTP
//! traffic from the client namespace.
//!
//! One test function runs the scenarios in order (they share fixed namespace names): the lab
//! with connection sync (the master goes dark), again with sync (only the master's xlb daemon
//! dies: keepalived's `track_script` hands the VIP over), then the lab without sync
//! (`XLB_LAB_SYNC=0`), to count what sync saves. Run it under the shared lab lock (`flock /tmp/xlb-netns.lock cargo test --release -p
//! xlb-tests --test e2e_ha`): the figures it prints mean little while other labs load the CPUs.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use xlb_tests::lab::{
    Connections, KillOnDrop, Lab, Topology, repo, service_new_flows, sh, text, wait_for,
};

const LAB: Lab = Lab::new("ha");
/// Long-lived connections held across the takeover, to the DR service and the full-NAT one.
const CONNECTIONS: usize = 24;
const NAT_CONNECTIONS: usize = 8;
/// New connections a second from the client while the master dies, and each one's timeout.
const CHURN_RATE: &str = "40";
const CHURN_TIMEOUT_S: f64 = 1.0;

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The director holding the VIP (VRRP master), if any.
fn master(topo: &Topology) -> Option<String> {
    let vip = &topo.vrrp.as_ref().unwrap().vip;
    topo.directors
        .iter()
        .find(|d| {
            let out = sh("ip", &["-n", topo.ns(d), "-4", "addr", "show"]);
            text(&out).contains(&format!("inet {vip}/"))
        })
        .cloned()
}

/// Takes director `d`'s switch port down: it is dark (as after a crash or a power loss), its
/// processes still running but cut off.
fn cut_off(topo: &Topology, d: &str) {
    let (sw, port) = topo.switch_port(d, &topo.daemon(d).iface);
    let out = sh("ip", &["-n", sw, "link", "set", port, "down"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// New flows director `d`'s data path took for `service` so far.
fn new_flows(topo: &Topology, d: &str, service: &str) -> u64 {
    let stats: Value = serde_json::from_str(&topo.xlb(d).ok(&["--json", "stats"])).unwrap();
    service_new_flows(&stats, service)
}

fn diagnostics() -> String {
    let topo = LAB.topology();
    let vrrp = topo.vrrp.as_ref().unwrap();
    let logs = topo
        .directors
        .iter()
        .flat_map(|d| [&topo.daemon(d).spawned.log, &vrrp.keepalived[d].spawned.log]);
    LAB.status_and_logs(logs)
}

/// A steady stream of new connections from the client (scripts/lab-churn-load.py): each row
/// (start, end, ok) in wall-clock seconds, once it has run for `seconds`.
fn churn(topo: &Topology, seconds: u32) -> std::thread::JoinHandle<Vec<(f64, f64, bool)>> {
    let web = topo.service("web");
    let client = topo.host(&topo.client);
    let mut load = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &client.ns, "python3"])
            .arg(repo().join("scripts/lab-churn-load.py"))
            .args([&web.vip4, &web.port.to_string(), "--iface"])
            .args([client.main_name(), "--workers", "2", "--rate", CHURN_RATE])
            .args(["--timeout", &CHURN_TIMEOUT_S.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = load.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        let out = std::io::read_to_string(stdout).unwrap();
        drop(load);
        out.lines()
            .map(|l| {
                let r: Value = serde_json::from_str(l).unwrap();
                let f = |k: &str| r[k].as_f64().unwrap();
                (f("start"), f("end"), r["ok"].as_bool().unwrap())
            })
            .collect()
    })
}

/// What a takeover did.
struct Takeover {
    /// Long-lived connections still answering from the real they started on (DR, full NAT).
    kept: usize,
    nat_kept: usize,
    /// From the master's links going down to the VIP on the other director (polled).
    vip_moved: Duration,
    /// New connections that failed, of how many made while the master died.
    failed: usize,
    made: usize,
    /// From the kill to the first new connection started after it that answered within
    /// 200 ms (no retransmitted SYN): how long new connections could not get through.
    window: Duration,
}

/// The scenario: long-lived connections and a steady stream of new ones; the spare real added
/// and the last real drained (out of the table, its flows kept) on both directors after the
/// connections were made; then the master's links go down. Returns what happened.
fn takeover(topo: &Topology) -> Takeover {
    let web = topo.service("web");
    let svc = web.addr4();
    let first = master(topo).expect("a VRRP master");
    let other = topo.directors.iter().find(|d| **d != first).unwrap();
    let mut conns = Connections::open(topo.ns(&topo.client), &web.vip4, web.port, CONNECTIONS, 40);
    let mut nat_conns = fullnat_connections(topo);
    let load = churn(topo, 10);
    std::thread::sleep(Duration::from_secs(1));
    let spare = topo.ipv4(&topo.spares[0]);
    let drained = topo.ipv4(topo.reals.last().unwrap());
    for d in &topo.directors {
        topo.xlb(d).ok(&["real", "add", &svc, spare]);
        topo.xlb(d).ok(&["real", "drain", &svc, drained]);
    }
    for d in &topo.directors {
        wait_for("the spare real resolved", Duration::from_secs(10), || {
            !topo.xlb(d).ok(&["status"]).contains("unresolved")
        });
    }
    std::thread::sleep(Duration::from_secs(1));

    let kill = Instant::now();
    let killed_at = now();
    cut_off(topo, &first);
    let mut vip_moved = None;
    wait_for(
        "the other director to take the VIP",
        Duration::from_secs(15),
        || {
            vip_moved = Some(kill.elapsed());
            master(topo).as_deref() == Some(other.as_str())
        },
    );
    let vip_moved = vip_moved.unwrap();
    // TCP retransmits with backoff (0.2, 0.4, 0.8, 1.6, 3.2 s): the one due 6.2 s after the
    // kill comes after the takeover (about 3.5 s).
    conns.run_for(Duration::from_secs(5));
    let kept = conns.survivors_after(kill + vip_moved).len();
    let nat_kept = nat_conns.survivors_after(kill + vip_moved).len();
    let rows = load.join().unwrap();
    let after: Vec<&(f64, f64, bool)> = rows.iter().filter(|r| r.0 >= killed_at).collect();
    let failed: Vec<&(f64, f64, bool)> = rows.iter().filter(|r| !r.2).collect();
    let back = after
        .iter()
        .find(|r| r.2 && r.1 - r.0 < 0.2)
        .map(|r| r.0 - killed_at)
        .unwrap_or(f64::NAN);
    println!(
        "takeover: VIP on {other} {} ms after {first}'s links went down; {} of {} new \
         connections failed; new connections through again {:.0} ms after the kill; {} of \
         {CONNECTIONS} long-lived connections kept their real, {} of {NAT_CONNECTIONS} full-NAT \
         ones ({} errors: {:?})",
        vip_moved.as_millis(),
        failed.len(),
        rows.len(),
        back * 1000.0,
        kept,
        nat_kept,
        conns.errors.len(),
        conns.errors.iter().take(3).collect::<Vec<_>>()
    );
    // New connections fail only around the takeover: none started before the kill (less one
    // timeout) or well after the VIP moved.
    let moved_at = killed_at + vip_moved.as_secs_f64();
    for r in &failed {
        assert!(
            r.0 >= killed_at - CHURN_TIMEOUT_S && r.0 <= moved_at + 2.0,
            "a new connection failed outside the takeover: started {:.3} s after the kill, \
             the VIP moved after {:.3} s\n{}",
            r.0 - killed_at,
            vip_moved.as_secs_f64(),
            diagnostics()
        );
    }
    assert!(
        after.iter().any(|r| r.2),
        "no new connection got through after the takeover\n{}",
        diagnostics()
    );
    // The new master's xlb took the new connections.
    assert!(new_flows(topo, other, &svc) > 0, "{}", diagnostics());
    Takeover {
        kept,
        nat_kept,
        vip_moved,
        failed: failed.len(),
        made: rows.len(),
        window: Duration::from_secs_f64(back.max(0.0)),
    }
}

/// Long-lived connections to the full-NAT service (its SNAT address on the VRRP master).
fn fullnat_connections(topo: &Topology) -> Connections {
    let fullnat = topo.service("fullnat");
    Connections::open(
        topo.ns(&topo.client),
        &fullnat.vip4,
        fullnat.port,
        NAT_CONNECTIONS,
        40,
    )
}

/// The bound on a takeover after the master's daemon dies: keepalived's `track_script` fails
/// twice a second apart (`fall 2`, `interval 1`, a `timeout` of 2 s each at worst), and the
/// backup takes over at the latest when it misses the master's adverts (3.6 s; at once when
/// the master's priority-0 advert says it gave up): docs/operations.md.
const DAEMON_DEATH_WINDOW: Duration = Duration::from_secs(2 * 2 + 4);

/// Only the master's xlb daemon dies (SIGKILL; keepalived and the pinned data path stay): the
/// `track_script` takes the VIP (and the SNAT address) to the backup, whose synced copies keep
/// the long-lived connections on their reals, DR and full NAT.
fn daemon_dies(topo: &Topology) {
    let web = topo.service("web");
    let first = master(topo).expect("a VRRP master");
    let other = topo.directors.iter().find(|d| **d != first).unwrap();
    let mut conns = Connections::open(topo.ns(&topo.client), &web.vip4, web.port, CONNECTIONS, 30);
    let mut nat_conns = fullnat_connections(topo);
    // Synced (every 20 ms) before the kill.
    std::thread::sleep(Duration::from_secs(1));
    let pid = std::fs::read_to_string(&topo.daemon(&first).spawned.pid_file).unwrap();
    let kill = Instant::now();
    assert!(sh("kill", &["-KILL", pid.trim()]).status.success());
    let mut moved = Duration::ZERO;
    wait_for(
        "the backup to take the VIP after the master's daemon died",
        DAEMON_DEATH_WINDOW,
        || {
            moved = kill.elapsed();
            master(topo).as_deref() == Some(other.as_str())
        },
    );
    conns.run_for(Duration::from_secs(6));
    let kept = conns.survivors_after(kill + moved).len();
    let nat_kept = nat_conns.survivors_after(kill + moved).len();
    println!(
        "{first}'s xlb daemon killed: VIP on {other} after {} ms; {kept} of {CONNECTIONS} \
         long-lived connections kept their real, {nat_kept} of {NAT_CONNECTIONS} full-NAT ones \
         ({:?})",
        moved.as_millis(),
        conns
            .errors
            .iter()
            .chain(&nat_conns.errors)
            .take(3)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        (kept, nat_kept),
        (CONNECTIONS, NAT_CONNECTIONS),
        "connections lost when the master's daemon died\n{}",
        diagnostics()
    );
}

#[test]
fn vrrp_pair() {
    let with_sync = {
        let _lab = LAB.up();
        let topo = LAB.topology();
        let web = topo.service("web");
        let svc = web.addr4();
        let vrrp = topo.vrrp.as_ref().unwrap();
        let first = master(&topo).expect("a VRRP master after up");
        assert_eq!(
            first, topo.directors[0],
            "the higher priority wins the first election"
        );
        let backup = topo.directors[1].clone();
        for d in &topo.directors {
            let conf = std::fs::read_to_string(&vrrp.keepalived[d].config).unwrap();
            assert!(conf.contains("track_script") && conf.contains("nopreempt"));
        }

        // --- The backup's xlb is attached and configured, yet takes no flow: only the master
        // answers ARP for the VIP, and the backup passes frames not sent to its MAC. ---
        let before = new_flows(&topo, &backup, &svc);
        let (per_real, failed, _) = LAB.spread(&web.url4(), 30, diagnostics);
        assert_eq!(failed, 0, "{per_real:?}\n{}", diagnostics());
        assert_eq!(per_real.len(), topo.reals.len(), "{per_real:?}");
        assert_eq!(
            new_flows(&topo, &backup, &svc),
            before,
            "the backup forwarded"
        );
        let status = topo.xlb(&backup).ok(&["status"]);
        assert!(
            status.contains("native") || status.contains("generic"),
            "{status}"
        );

        // --- The master dies. ---
        takeover(&topo)
    };

    {
        let _lab = LAB.up();
        daemon_dies(&LAB.topology());
    }

    let without_sync = {
        let _lab = LAB.up_with(&[("XLB_LAB_SYNC", "0")]);
        takeover(&LAB.topology())
    };

    let figures: BTreeMap<&str, String> =
        [("with sync", &with_sync), ("without sync", &without_sync)]
            .into_iter()
            .map(|(name, t)| {
                (
                    name,
                    format!(
                        "{} of {CONNECTIONS} long-lived connections kept their real, {} of \
                 {NAT_CONNECTIONS} full-NAT ones; VIP moved in {} ms; {} of {} new connections \
                 failed, new connections back after {} ms",
                        t.kept,
                        t.nat_kept,
                        t.vip_moved.as_millis(),
                        t.failed,
                        t.made,
                        t.window.as_millis()
                    ),
                )
            })
            .collect();
    println!("{figures:#?}");
    assert_eq!(
        (with_sync.kept, with_sync.nat_kept),
        (CONNECTIONS, NAT_CONNECTIONS),
        "with sync, every long-lived connection keeps its real (full NAT: and its SNAT source)"
    );
    // Without sync, the new master places the flows it never saw by its table, which changed
    // since they were made (a real added, one drained): some move and break.
    assert!(
        without_sync.kept < CONNECTIONS,
        "without sync no connection moved: the scenario does not exercise sync"
    );
    // Without sync, the new master gives a full-NAT flow it never saw a new SNAT source: its
    // real, which knows no such connection, resets it.
    assert!(
        without_sync.nat_kept < NAT_CONNECTIONS,
        "without sync every full-NAT connection survived: the scenario does not exercise NAT sync"
    );
}
