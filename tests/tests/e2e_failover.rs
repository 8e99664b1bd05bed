//! Failover with no failed connections, end to end in the DR lab: each real runs xlb_realserver
//! (refusals on, set up by `scripts/lab dr up`), so when a real's server dies its SYNs go back
//! to the director, which re-schedules them to another real and takes the refusing real down
//! at once; its check brings it back after `rise` successes. A refusal forged from the
//! client's segment (wrong MAC) is dropped and takes nothing down.
//!
//! One sequential test: it owns the DR lab (fixed namespace names) while it runs.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb_tests::lab::{KillOnDrop, Lab, metric, repo};

const VIP: &str = "198.18.0.100";
const SERVICE: &str = "198.18.0.100:80/tcp";
const STATE: &str = "/run/xlb-lab/dr";
const R1: &str = "198.18.0.11";
const LAB: Lab = Lab::new("dr");
/// The check's own detection window is fall x interval = 3 s: refusals must beat it by far.
const INTERVAL_MS: u64 = 1000;

fn xlb_ok(args: &[&str]) -> String {
    LAB.xlb().ok(args)
}

fn edit_service(edit: impl FnOnce(&mut serde_json::Value)) {
    let mut config: serde_json::Value = serde_json::from_str(&xlb_ok(&["save"])).unwrap();
    let svc = config["services"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["service"] == SERVICE)
        .unwrap();
    edit(svc);
    let file = format!("{STATE}/failover-config.json");
    std::fs::write(&file, config.to_string()).unwrap();
    xlb_ok(&["restore", &file]);
}

fn real(real: &str) -> serde_json::Value {
    let status: serde_json::Value = serde_json::from_str(&xlb_ok(&["--json", "status"])).unwrap();
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == SERVICE)
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

fn state_of(addr: &str) -> String {
    real(addr)["state"].as_str().unwrap().to_string()
}

fn wait_state(addr: &str, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if state_of(addr) == want {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("{addr} is {} after {timeout:?}, not {want}", state_of(addr));
}

fn metrics() -> String {
    let out = LAB.in_dir_netns(&["curl", "-s", "http://127.0.0.1:9180/metrics"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bounded steady load of new connections: one GET on a new connection every `period`
/// (start to start) until `stop`; each result (answering real or None).
fn load(period: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Option<String>>> {
    std::thread::spawn(move || {
        let mut results = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            results.push(
                LAB.curl("2", &[&format!("http://{VIP}/")])
                    .map(|b| b.split_whitespace().next().unwrap_or("").to_string()),
            );
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
fn forge_refusal() {
    let script = r#"
import socket, struct
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b)//2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
src, dst = socket.inet_aton('198.18.0.1'), socket.inet_aton('198.18.0.100')
tcp = struct.pack('!HHIIBBHHH', 41000, 80, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst)
ip = ip[:10] + struct.pack('!H', csum(ip)) + ip[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
for _ in range(20):
    s.sendto(ip + tcp, ('198.18.0.100', 0))
"#;
    let ok = Command::new("ip")
        .args(["netns", "exec", "xlb-dr-client", "python3", "-c", script])
        .status()
        .unwrap()
        .success();
    assert!(ok, "sending the forged refusals");
}

#[test]
fn a_real_whose_server_dies_costs_no_failed_connection() {
    let _lab = LAB.up();
    edit_service(|svc| {
        svc["check"] = serde_json::json!({
            "kind": "http", "path": "/healthz",
            "interval_ms": INTERVAL_MS, "timeout_ms": 500, "rise": 2, "fall": 3,
        });
    });
    for r in ["198.18.0.11", "198.18.0.12", "198.18.0.13"] {
        wait_state(r, "up", Duration::from_secs(5));
    }

    // Forged refusals from the client (its MAC is no real's): dropped, counted, nothing down.
    forge_refusal();
    std::thread::sleep(Duration::from_millis(200));
    let page = metrics();
    let forged = metric(
        &page,
        "xlb_dropped_packets_total{reason=\"refusal_forged\"}",
    );
    assert!(
        forged.unwrap_or(0.0) >= 1.0,
        "forged refusals counted: {forged:?}"
    );
    for r in ["198.18.0.11", "198.18.0.12", "198.18.0.13"] {
        assert_eq!(state_of(r), "up", "{r} after forged refusals");
    }

    // ~50 new connections a second for ~10 s; r1's server is killed (-9) after 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(Duration::from_millis(20), stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    let pid = std::fs::read_to_string(format!("{STATE}/http-r1.pid")).unwrap();
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
    let to_down = wait_state(R1, "down", Duration::from_secs(5));
    let _ = killed;
    std::thread::sleep(Duration::from_secs(7));
    stop.store(true, Ordering::Relaxed);
    let results = loader.join().unwrap();
    let failed = results.iter().filter(|r| r.is_none()).count();
    let refusals = real(R1)["refusals"].as_u64().unwrap();
    eprintln!(
        "failover: {} requests, {failed} failed; r1 down {:.1} ms after kill -9; r1 refused {refusals}",
        results.len(),
        to_down.as_secs_f64() * 1000.0
    );
    assert!(results.len() >= 300, "too little load: {}", results.len());
    assert_eq!(failed, 0, "requests failed");
    assert!(refusals >= 1, "r1 refused nothing");
    // Well inside the check's own window (fall x interval = 3 s).
    assert!(
        to_down < Duration::from_millis(1000),
        "r1 down only after {to_down:?}"
    );
    let log = std::fs::read_to_string(format!("{STATE}/xlb.log")).unwrap();
    assert_eq!(
        log.matches("real down: it refused connections").count(),
        1,
        "one log line for the transition"
    );

    // Its server back: the check brings r1 up again after `rise` successes.
    let _server = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", "xlb-dr-r1", "python3"])
            .arg(repo().join("scripts/lab-http-server.py"))
            .args(["--name", "r1", "--port", "80"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_state(R1, "up", Duration::from_secs(10));
}
