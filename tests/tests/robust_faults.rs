//! Faults under load in the DR lab (scripts/lab dr; run under the lab lock): a flood of new
//! flows filling a small connection table while long-lived connections keep their real, and
//! reals added, removed, drained and failed in a loop for a minute under client load, where
//! no request to a healthy real may fail. Every figure is printed.
//!
//! The tests share the lab's fixed namespaces, so they take turns (LAB_TURN).

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use xlb_tests::lab::{KillOnDrop, Lab, Service, keepalive, kill_9, repo, sh, text, wait_for};

const LAB: Lab = Lab::new("dr");

/// The lab's service.
fn web() -> Service {
    LAB.topology().service("web").clone()
}

static LAB_TURN: Mutex<()> = Mutex::new(());

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn stats() -> Value {
    serde_json::from_str(&LAB.xlb().ok(&["stats", "--json"])).unwrap()
}

fn global(stats: &Value, name: &str) -> u64 {
    stats["global"][name].as_u64().unwrap()
}

/// One long-lived HTTP/1.1 connection from the client (scripts/lab-http-keepalive.py): a GET
/// every `interval` seconds; its answer lines arrive on a channel.
struct KeepAlive {
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
}

impl KeepAlive {
    fn start(interval: &str, seconds: &str) -> KeepAlive {
        let (tx, lines) = mpsc::channel();
        let web = web();
        let child = keepalive(
            &LAB.ns("client"),
            &[
                &web.vip4,
                &web.port.to_string(),
                "--interval",
                interval,
                "--max-seconds",
                seconds,
            ],
            move |line| tx.send(line).is_ok(),
        );
        KeepAlive { child, lines }
    }

    /// Waits for the connection to end by itself: (answers per real, broken?).
    fn finish(mut self) -> (BTreeMap<String, usize>, Option<String>) {
        let status = self.child.0.wait().unwrap();
        let mut reals = BTreeMap::new();
        let mut error = None;
        for line in self.lines.try_iter() {
            if line.starts_with("error:") {
                error = Some(line);
                continue;
            }
            let real = line.split_whitespace().nth(1).unwrap_or("").to_string();
            *reals.entry(real).or_insert(0) += 1;
        }
        if !status.success() && error.is_none() {
            error = Some(format!("exited {status}"));
        }
        (reals, error)
    }
}

#[test]
fn a_flood_of_new_flows_does_not_move_established_ones() {
    let _turn = LAB_TURN.lock().unwrap_or_else(|e| e.into_inner());
    const CAPACITY: u64 = 512;
    const FLOWS: u64 = 100_000;
    let _lab = LAB.up_with(&[("XLB_LAB_CONN_CAPACITY", &CAPACITY.to_string())]);
    let web = web();
    // Busy connections (a request every 0.2 s throughout) and quiet ones (the same, but
    // paused during the flood). The flood's flows each send a SYN and an ACK, so the table
    // cannot favour the real connections for having been ACKed: theirs are taken too, and
    // their next packet misses.
    let busy: Vec<KeepAlive> = (0..6).map(|_| KeepAlive::start("0.2", "20")).collect();
    let quiet: Vec<KeepAlive> = (0..6).map(|_| KeepAlive::start("0.2", "20")).collect();
    std::thread::sleep(Duration::from_secs(1));
    // The quiet ones pause (SIGSTOP) for the whole flood: their connections stay open, idle.
    let signal = |conns: &[KeepAlive], sig: &str| {
        for ka in conns {
            // `ip netns exec` runs python3 as its child.
            let parent = ka.child.0.id().to_string();
            let out = sh("ps", &["--ppid", &parent, "-o", "pid="]);
            let children = String::from_utf8_lossy(&out.stdout).to_string();
            for pid in [parent.as_str()]
                .into_iter()
                .chain(children.split_whitespace())
            {
                // A pid may be gone already (a short-lived helper): nothing to pause then.
                let _ = sh("kill", &[sig, pid]);
            }
        }
    };
    signal(&quiet, "-STOP");
    std::thread::sleep(Duration::from_millis(300));
    for ka in &quiet {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", ka.child.0.id())).unwrap();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        assert_eq!(state, "T", "a quiet connection did not pause: {stat}");
    }
    let before = stats();

    // New connections during the flood, one after another.
    let (done_tx, done_rx) = mpsc::channel();
    let url = web.url4();
    let prober = std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, 0);
        while done_rx.try_recv().is_err() {
            match LAB.curl("2", &[&url]) {
                Some(_) => ok += 1,
                None => failed += 1,
            }
        }
        (ok, failed)
    });
    let flood = sh(
        "ip",
        &[
            "netns",
            "exec",
            &LAB.ns("client"),
            "python3",
            repo().join("scripts/lab-syn-flood.py").to_str().unwrap(),
            &web.vip4,
            &web.port.to_string(),
            "--count",
            &FLOWS.to_string(),
            "--max-seconds",
            "10",
            "--ack",
        ],
    );
    assert!(flood.status.success(), "{}", text(&flood));
    done_tx.send(()).unwrap();
    let (probe_ok, probe_failed) = prober.join().unwrap();
    let after = stats();
    // The flood is over and the quiet connections resume: a miss now can only be a
    // long-lived connection whose entry the flood evicted (probes start with a SYN, which
    // never counts as a miss; busy connections were re-tracked during the flood).
    signal(&quiet, "-CONT");
    std::thread::sleep(Duration::from_secs(1));
    let quiet_misses = global(&stats(), "conn_miss") - global(&after, "conn_miss");
    let (after_ok, after_failed) = {
        let (per_real, failed, _) = LAB.spread(&web.url4(), 100, String::new);
        (per_real.values().sum::<usize>(), failed)
    };

    let mut broken = 0;
    let mut moved = 0;
    let mut answers = 0;
    for (group, conns) in [("busy", busy), ("quiet", quiet)] {
        for (i, ka) in conns.into_iter().enumerate() {
            let (reals, error) = ka.finish();
            answers += reals.values().sum::<usize>();
            eprintln!("{group} connection {i}: answers {reals:?}, error {error:?}");
            broken += error.is_some() as usize;
            moved += (reals.len() > 1) as usize;
        }
    }
    let delta = |name| global(&after, name) - global(&before, name);
    let new_flows = after["services"][0]["new_flows"].as_u64().unwrap()
        - before["services"][0]["new_flows"].as_u64().unwrap();
    eprintln!(
        "flood: {} | table capacity {CAPACITY} | new flows {new_flows} (at least {} evictions) | \
         conn_miss {} conn_stale {} forwarded {} drop_no_backend {} | misses as the 6 paused \
         connections resumed {quiet_misses} | 12 long-lived connections, {answers} answers: {broken} broken, {moved} moved to another real | \
         requests during the flood {probe_ok} ok {probe_failed} failed, after it {after_ok} ok \
         {after_failed} failed",
        String::from_utf8_lossy(&flood.stdout).trim(),
        new_flows.saturating_sub(CAPACITY),
        delta("conn_miss"),
        delta("conn_stale"),
        delta("forwarded"),
        delta("drop_no_backend"),
    );
    assert!(
        new_flows >= FLOWS / 2,
        "the flood did not reach the director"
    );
    assert!(
        quiet_misses > 0,
        "no long-lived connection was evicted: the test proves nothing"
    );
    assert_eq!(broken, 0, "long-lived connections broke");
    assert_eq!(moved, 0, "long-lived connections changed real");
    assert_eq!(
        probe_failed + after_failed,
        0,
        "the director stopped forwarding"
    );
    assert!(probe_ok > 0);
}

fn status_state(name: &str) -> String {
    let addr = LAB.topology().ipv4(name).to_string();
    let status: Value = serde_json::from_str(&LAB.xlb().ok(&["status", "--json"])).unwrap();
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == web().addr4())
        .flat_map(|s| s["reals"].as_array().unwrap())
        .find(|r| r["addr"] == addr)
        .map(|r| r["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| "absent".into())
}

fn pid_file(name: &str) -> String {
    let topo = LAB.topology();
    topo.server_on(name, topo.service("web").port)
        .spawned
        .pid_file
        .clone()
}

/// Kills a real's HTTP server (SIGKILL: its connections get RSTs, new ones are refused).
fn kill_server(name: &str, restarted: &mut BTreeMap<String, KillOnDrop>) {
    if let Some(mut child) = restarted.remove(name) {
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        return;
    }
    let pid = std::fs::read_to_string(pid_file(name)).unwrap();
    kill_9(pid.trim().parse().unwrap()).unwrap();
}

fn start_server(name: &str, restarted: &mut BTreeMap<String, KillOnDrop>) {
    let child = Command::new("ip")
        .args(["netns", "exec", &LAB.ns(name), "python3"])
        .arg(repo().join("scripts/lab-http-server.py"))
        .args(["--name", name, "--port", &web().port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(pid_file(name), child.id().to_string()).unwrap();
    restarted.insert(name.to_string(), KillOnDrop(child));
    wait_for(&format!("{name}'s server"), Duration::from_secs(10), || {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &LAB.ns(name),
                "curl",
                "-fs",
                "--max-time",
                "1",
                "http://127.0.0.1/healthz",
            ],
        )
        .status
        .success()
    });
}

/// 60 s of ~200 new connections a second while each real in turn is drained and enabled,
/// removed and added, and has its server killed and restarted. A killed server's real refuses
/// (xlb_realserver) and the director moves those connections, so the only requests that may
/// fail are those on a real while it was removed and those already established on a real
/// when its server was killed.
#[test]
fn churning_reals_fails_only_connections_on_removed_reals_or_killed_servers() {
    let _turn = LAB_TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _lab = LAB.up();
    let xlb = LAB.xlb();
    let topo = LAB.topology();
    let web = topo.service("web");
    let service = web.addr4();
    let service = service.as_str();
    // (name, address) of each real.
    let reals = topo.reals_with_ipv4();
    // The lab's service, with health checks: a killed server must be noticed.
    xlb.ok(&["service", "remove", service]);
    xlb.ok(&[
        "service",
        "add",
        service,
        "--check",
        "http",
        "--check-path",
        "/healthz",
        "--interval",
        "250ms",
        "--timeout",
        "250ms",
        "--rise",
        "1",
        "--fall",
        "3",
    ]);
    for &(_, addr) in &reals {
        xlb.ok(&["real", "add", service, addr]);
    }
    for &(name, _) in &reals {
        wait_for(&format!("{name} up"), Duration::from_secs(10), || {
            status_state(name) == "up"
        });
    }
    // Each real by its MAC, as the load generator's sniffer reports the answering one.
    let macs: BTreeMap<String, String> = reals
        .iter()
        .map(|&(name, _)| (topo.host(name).main().mac.clone(), name.to_string()))
        .collect();
    let client = topo.host(&topo.client);

    const SECONDS: f64 = 60.0;
    let load = Command::new("ip")
        .args(["netns", "exec", &client.ns, "python3"])
        .arg(repo().join("scripts/lab-churn-load.py"))
        .args([
            &web.vip4,
            &web.port.to_string(),
            "--iface",
            client.main_name(),
            "--workers",
            "4",
            "--rate",
            "200",
            "--timeout",
            "2",
        ])
        .args(["--seconds", &SECONDS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut load = KillOnDrop(load);
    let stdout = load.0.stdout.take().unwrap();
    let results = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    std::thread::sleep(Duration::from_millis(800));

    // (real, what, from, to): the times a real was removed or failed.
    let mut windows: Vec<(String, &str, f64, f64)> = Vec::new();
    // (real, from, to): the moments a real's server was killed.
    let mut kills: Vec<(String, f64, f64)> = Vec::new();
    let mut restarted = BTreeMap::new();
    let mut events: BTreeMap<&str, usize> = BTreeMap::new();
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed().as_secs_f64() < SECONDS - 8.0 {
        let (name, addr) = reals[i % reals.len()];
        i += 1;
        xlb.ok(&["real", "drain", service, addr]);
        std::thread::sleep(Duration::from_millis(800));
        xlb.ok(&["real", "enable", service, addr]);
        *events.entry("drained and enabled").or_default() += 1;
        std::thread::sleep(Duration::from_millis(800));

        let from = now();
        xlb.ok(&["real", "remove", service, addr]);
        std::thread::sleep(Duration::from_millis(800));
        xlb.ok(&["real", "add", service, addr]);
        windows.push((name.to_string(), "removed", from, now()));
        *events.entry("removed and added").or_default() += 1;
        wait_for(&format!("{name} up again"), Duration::from_secs(10), || {
            status_state(name) == "up"
        });
        std::thread::sleep(Duration::from_millis(500));

        let from = now();
        kill_server(name, &mut restarted);
        kills.push((name.to_string(), from, now()));
        wait_for(&format!("{name} down"), Duration::from_secs(10), || {
            status_state(name) == "down"
        });
        let down_after = now() - from;
        std::thread::sleep(Duration::from_millis(500));
        start_server(name, &mut restarted);
        wait_for(&format!("{name} up again"), Duration::from_secs(10), || {
            status_state(name) == "up"
        });
        windows.push((name.to_string(), "failed", from, now()));
        *events.entry("failed and restarted").or_default() += 1;
        eprintln!("{name}: down {down_after:.2} s after its server was killed (status polled)");
        std::thread::sleep(Duration::from_millis(800));
    }
    let results = results.join().unwrap();
    let status = load.0.wait().unwrap();
    let requests: Vec<Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        status.success() && !requests.is_empty(),
        "the load generator failed ({status})"
    );

    // A failed request is excused only if the real that took it (the MAC of its first
    // answer) was removed or failed while it ran (give or take 0.2 s / 0.5 s).
    let mut ok = 0;
    let mut ok_without_mac = 0;
    let mut mac_mismatch = 0;
    let mut excused: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unexcused = Vec::new();
    for r in &requests {
        let real = r["mac"].as_str().and_then(|m| macs.get(m)).cloned();
        if r["ok"] == true {
            ok += 1;
            match &real {
                None => ok_without_mac += 1,
                Some(name) if Some(name.as_str()) != r["real"].as_str() => mac_mismatch += 1,
                Some(_) => {}
            }
            continue;
        }
        let (s, e) = (r["start"].as_f64().unwrap(), r["end"].as_f64().unwrap());
        let overlaps = |from: f64, to: f64| s <= to + 0.5 && e >= from - 0.2;
        let why = windows
            .iter()
            .find(|(name, _, from, to)| Some(name) == real.as_ref() && overlaps(*from, *to));
        // A killed real refuses new connections and the director moves them: only a
        // connection already established there when its server died may fail.
        let killed_in_flight = || {
            kills
                .iter()
                .any(|(name, from, to)| Some(name) == real.as_ref() && s <= *to && e >= *from)
        };
        match why {
            Some((_, "failed", _, _)) if killed_in_flight() => {
                *excused.entry("killed in flight").or_default() += 1
            }
            Some((_, "failed", _, _)) => unexcused.push(r.clone()),
            Some((_, what, _, _)) => *excused.entry(what).or_default() += 1,
            // The sniffer saw no answer at all (it may miss frames under load): excused only
            // while some real was removed or failed, and counted apart.
            None if real.is_none() && windows.iter().any(|(_, _, f, t)| overlaps(*f, *t)) => {
                *excused.entry("unattributed").or_default() += 1
            }
            None => unexcused.push(r.clone()),
        }
    }
    let per_real = requests.iter().fold(BTreeMap::new(), |mut m, r| {
        if let Some(name) = r["real"].as_str() {
            *m.entry(name.to_string()).or_insert(0usize) += 1;
        }
        m
    });
    eprintln!(
        "churn for {SECONDS} s: events {events:?} | {} requests ({:.0}/s): {ok} ok {per_real:?}, \
         failed to a removed real {}, in flight on a real when its server was killed {}, with \
         no answer seen during a fault {}, any other {} | ok requests \
         whose answer the sniffer missed {ok_without_mac}, whose MAC disagreed with the body \
         {mac_mismatch}",
        requests.len(),
        requests.len() as f64 / SECONDS,
        excused.get("removed").unwrap_or(&0),
        excused.get("killed in flight").unwrap_or(&0),
        excused.get("unattributed").unwrap_or(&0),
        unexcused.len(),
    );
    for r in &unexcused {
        eprintln!("unexcused failure: {r}");
    }
    assert_eq!(mac_mismatch, 0, "the sniffer names the wrong reals");
    assert!(
        unexcused.is_empty(),
        "requests failed that were not on a removed real or in flight on a killed one"
    );
    assert!(
        events.values().all(|&n| n >= 3),
        "too few rounds: {events:?}"
    );
    assert!(
        *excused.get("unattributed").unwrap_or(&0) * 10 <= requests.len() - ok,
        "the sniffer missed too many failed requests' answers"
    );
    let last = requests
        .iter()
        .map(|r| r["end"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(last >= now() - 10.0, "the load stopped early");
    assert!(
        per_real.len() == 3 && ok > 5000,
        "too little load: {per_real:?}"
    );
}
