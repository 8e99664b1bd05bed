//! Failover with no failed connections, end to end in the DR lab: each real runs xlb_realserver
//! (refusals on, set up by `scripts/lab dr up`), so when a real's server dies its SYNs go back
//! to the director, which re-schedules them to another real and takes the refusing real down
//! at once; its check brings it back after `rise` successes. A refusal forged from the
//! client's segment (wrong MAC) is dropped and takes nothing down.
//!
//! The same in the TUN lab, where the refusal goes back through the real's tunnel and a forged
//! one comes from an address that is not the flow's real.
//!
//! Then the real host goes dark (its link down): nothing refuses, but a client's retransmitted
//! SYN of a connection that never got an answer goes to the next real, so each new connection
//! costs at most one SYN retransmission (~1 s) until the checks take the real down.
//!
//! One sequential test: it owns the DR lab, then the TUN lab (fixed namespace names).

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb_tests::lab::{KillOnDrop, Lab, kill_9, metric, repo, sh};

struct Case {
    lab: Lab,
    vip: &'static str,
    service: &'static str,
    reals: [&'static str; 3],
    client: &'static str,
    metrics_port: u16,
}

const DR: Case = Case {
    lab: Lab::new("dr"),
    vip: "198.18.0.100",
    service: "198.18.0.100:80/tcp",
    reals: ["198.18.0.11", "198.18.0.12", "198.18.0.13"],
    client: "198.18.0.1",
    metrics_port: 9180,
};

const TUN: Case = Case {
    lab: Lab::new("tun"),
    vip: "198.18.0.200",
    service: "198.18.0.200:80/tcp",
    reals: ["198.18.2.11", "198.18.2.12", "198.18.2.13"],
    client: "198.18.1.1",
    metrics_port: 9181,
};
/// The check's own detection window is fall x interval = 3 s: refusals must beat it by far.
const INTERVAL_MS: u64 = 1000;

fn edit_service(c: &Case, edit: impl FnOnce(&mut serde_json::Value)) {
    let xlb_ok = |args: &[&str]| c.lab.xlb().ok(args);
    let mut config: serde_json::Value = serde_json::from_str(&xlb_ok(&["save"])).unwrap();
    let svc = config["services"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["service"] == c.service)
        .unwrap();
    edit(svc);
    let file = format!("{}/failover-config.json", c.lab.state());
    std::fs::write(&file, config.to_string()).unwrap();
    xlb_ok(&["restore", &file]);
}

fn real(c: &Case, real: &str) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&c.lab.xlb().ok(&["--json", "status"])).unwrap();
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == c.service)
        .and_then(|s| {
            s["reals"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["addr"] == real)
        })
        .cloned()
        .unwrap()
}

fn state_of(c: &Case, addr: &str) -> String {
    real(c, addr)["state"].as_str().unwrap().to_string()
}

fn wait_state(c: &Case, addr: &str, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if state_of(c, addr) == want {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!(
        "{addr} is {} after {timeout:?}, not {want}",
        state_of(c, addr)
    );
}

fn metrics(c: &Case) -> String {
    let url = format!("http://127.0.0.1:{}/metrics", c.metrics_port);
    let out = c.lab.in_dir_netns(&["curl", "-s", &url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bounded steady load of new connections: one GET on a new connection every `period`
/// (start to start) until `stop`; each request's start, end and result (answering real or
/// None).
fn load(
    lab: Lab,
    vip: &'static str,
    period: Duration,
    max_time: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, Instant, Option<String>)>> {
    std::thread::spawn(move || {
        let mut results = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let start = Instant::now();
            let got = lab
                .curl(max_time, &[&format!("http://{vip}/")])
                .map(|b| b.split_whitespace().next().unwrap_or("").to_string());
            results.push((start, Instant::now(), got));
            next += period;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        results
    })
}

/// An IPIP packet from the client's namespace to the VIP whose inner packet is a SYN of a
/// service flow: a refusal forged from the client's MAC and address.
fn forge_refusal(c: &Case) {
    let script = r#"
import sys
import socket, struct
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b)//2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
tcp = struct.pack('!HHIIBBHHH', 41000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
for _ in range(20):
    s.sendto(ip + tcp, (sys.argv[2], 0))
"#;
    let ns = c.lab.ns("client");
    let ok = Command::new("ip")
        .args([
            "netns", "exec", &ns, "python3", "-c", script, c.client, c.vip,
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "sending the forged refusals");
}

#[test]
fn a_real_whose_server_dies_costs_no_failed_connection() {
    for c in [DR, TUN] {
        let _lab = c.lab.up();
        let _r1_server = failover(&c);
        dark_host(&c);
    }
}

/// Returns r1's restarted server.
fn failover(c: &Case) -> KillOnDrop {
    let name = c.lab.topology().ns_prefix;
    edit_service(c, |svc| {
        svc["check"] = serde_json::json!({
            "kind": "http", "path": "/healthz",
            "interval_ms": INTERVAL_MS, "timeout_ms": 500, "rise": 2, "fall": 3,
        });
    });
    for r in c.reals {
        wait_state(c, r, "up", Duration::from_secs(5));
    }

    // Forged refusals from the client (its MAC and address are no real's): dropped, counted,
    // nothing taken down.
    forge_refusal(c);
    std::thread::sleep(Duration::from_millis(200));
    let page = metrics(c);
    let forged = metric(
        &page,
        "xlb_dropped_packets_total{reason=\"refusal_forged\"}",
    );
    assert!(
        forged.unwrap_or(0.0) >= 1.0,
        "{name}: forged refusals counted: {forged:?}"
    );
    for r in c.reals {
        assert_eq!(state_of(c, r), "up", "{name}: {r} after forged refusals");
    }

    // ~50 new connections a second for ~10 s; r1's server is killed (-9) after 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(c.lab, c.vip, Duration::from_millis(20), "2", stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    let pid = std::fs::read_to_string(format!("{}/http-r1.pid", c.lab.state())).unwrap();
    let killed = Instant::now();
    kill_9(pid.trim().parse().unwrap()).unwrap();
    let gone = Instant::now();
    let to_down = wait_state(c, c.reals[0], "down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, Ordering::Relaxed);
    let results = loader.join().unwrap();
    // A request in flight on r1 when its server is killed cannot survive (its connection is
    // established there, or its listener accepts it while the process exits): counted apart.
    // Every other request must succeed.
    let in_kill = |s: &Instant, e: &Instant| *s <= gone && killed <= *e;
    let in_flight = results
        .iter()
        .filter(|(s, e, r)| r.is_none() && in_kill(s, e))
        .count();
    let failed = results
        .iter()
        .filter(|(s, e, r)| r.is_none() && !in_kill(s, e))
        .count();
    let refusals = real(c, c.reals[0])["refusals"].as_u64().unwrap();
    // The daemon's own measure: from the data path honouring the refusal to the real out of
    // the Maglev table.
    let refusal_to_down = metric(
        &metrics(c),
        &format!(
            "xlb_real_refusal_down_seconds{{real=\"{}\",service=\"{}\"}}",
            c.reals[0], c.service
        ),
    );
    eprintln!(
        "{name}failover: {} requests, {failed} failed (+{in_flight} in flight at the kill); r1 \
         down {:.1} ms after kill -9 (status polled), {:.2} ms after its refusal (daemon); r1 \
         refused {refusals}",
        results.len(),
        to_down.as_secs_f64() * 1000.0,
        refusal_to_down.unwrap_or(f64::NAN) * 1000.0
    );
    // ~500 planned; spawning curl in a namespace slows down on a loaded machine.
    assert!(
        results.len() >= 150,
        "{name}: too little load: {}",
        results.len()
    );
    assert_eq!(failed, 0, "{name}: requests failed");
    assert!(in_flight <= 1, "{name}: one request at a time is in flight");
    assert!(refusals >= 1, "{name}: r1 refused nothing");
    assert!(
        refusal_to_down.is_some_and(|d| (0.0..1.0).contains(&d)),
        "{name}: refusal to down {refusal_to_down:?} s"
    );
    // Well inside the check's own window (fall x interval = 3 s).
    assert!(
        to_down < Duration::from_millis(1000),
        "{name}: r1 down only after {to_down:?}"
    );
    let log = std::fs::read_to_string(format!("{}/xlb.log", c.lab.state())).unwrap();
    assert_eq!(
        log.matches("real down: it refused connections").count(),
        1,
        "{name}: one log line for the transition"
    );

    // Its server back: the check brings r1 up again after `rise` successes.
    let server = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &c.lab.ns("r1"), "python3"])
            .arg(repo().join("scripts/lab-http-server.py"))
            .args(["--name", "r1", "--port", "80"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_state(c, c.reals[0], "up", Duration::from_secs(10));
    server
}

/// r1's link goes down under load (its switch port): no refusal comes back, the client retransmits its SYN after
/// 1 s and the director moves that retransmission (`syn_retries_moved`). No new connection
/// fails; none waits for more than one retransmission.
fn dark_host(c: &Case) {
    let name = c.lab.topology().ns_prefix;
    let topo = c.lab.topology();
    // Pulled at the switch, as a cable would be: r1 keeps its addresses and routes.
    let (switch, port) = topo.switch_port("r1", topo.host("r1").main_name());
    let link = |state: &str| {
        let out = sh("ip", &["-n", switch, "link", "set", port, state]);
        assert!(out.status.success(), "{name}: r1's switch port {state}");
    };
    let moved_before = metric(&metrics(c), "xlb_syn_retries_moved_total").unwrap_or(0.0);

    let before = real(c, c.reals[0]);
    let stop = Arc::new(AtomicBool::new(false));
    // A longer --max-time than one retransmission needs, so a second one would show as a
    // slow request rather than a timeout.
    let loader = load(c.lab, c.vip, Duration::from_millis(20), "4", stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let dark = Instant::now();
    link("down");
    let to_down = wait_state(c, c.reals[0], "down", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let results = loader.join().unwrap();
    link("up");

    // The request in flight on r1 when its link went down is established there: apart.
    let in_dark = |s: &Instant, e: &Instant| *s <= dark && dark <= *e;
    let after: Vec<_> = results.iter().filter(|(s, e, _)| !in_dark(s, e)).collect();
    let failed = after.iter().filter(|(_, _, r)| r.is_none()).count();
    let slowest = after
        .iter()
        .map(|(s, e, _)| e.duration_since(*s))
        .max()
        .unwrap();
    let delayed = after
        .iter()
        .filter(|(s, e, _)| e.duration_since(*s) > Duration::from_millis(500))
        .count();
    let moved = metric(&metrics(c), "xlb_syn_retries_moved_total").unwrap_or(0.0) - moved_before;
    eprintln!(
        "{name}dark host: {} requests, {failed} failed, {delayed} delayed by a SYN \
         retransmission (slowest {:.0} ms), {moved} SYN retries moved; r1 down {:.1} s after \
         its link went down (by its check)",
        after.len(),
        slowest.as_secs_f64() * 1000.0,
        to_down.as_secs_f64()
    );
    assert_eq!(
        failed, 0,
        "{name}: new connections failed while r1 was dark"
    );
    assert!(
        delayed >= 1,
        "{name}: no connection went to r1 while dark; r1 before: {before}, after: {}",
        real(c, c.reals[0])
    );
    // (A retransmission that arrives after r1 is down moves as any flow of a down real does.)
    assert!(
        moved >= 1.0,
        "{name}: no retransmitted SYN moved by the director"
    );
    // One retransmission is 1 s; a second would be 3 s after the first SYN.
    assert!(
        slowest < Duration::from_millis(2500),
        "{name}: a connection waited {slowest:?}: more than one SYN retransmission"
    );
    wait_state(c, c.reals[0], "up", Duration::from_secs(10));
}
