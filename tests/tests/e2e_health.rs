//! End-to-end health checking in the DR lab: a real whose server dies is taken out within its
//! detection window under continuous client load and comes back after `rise` successes; a
//! flapping real is not readmitted early; tcp, http, udp and exec checks each detect a failure.
//!
//! One sequential test: it owns the DR lab (fixed namespace names) while it runs.

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use xlb_tests::lab::{KillOnDrop, Lab, repo};

const INTERVAL_MS: u64 = 300;
const FALL: u64 = 3;

const LAB: Lab = Lab::new("dr");

fn xlb_ok(args: &[&str]) -> String {
    LAB.xlb().ok(args)
}

/// The lab's service, as the CLI writes it.
fn service() -> String {
    LAB.topology().service("web").addr4()
}

/// Another service on the lab's VIP: PORT/PROTO.
fn vip_service(port_proto: &str) -> String {
    format!("{}:{port_proto}", LAB.topology().service("web").vip4)
}

/// Changes the lab service's saved configuration and restores it (`xlb save` | edit |
/// `xlb restore`).
fn edit_service(edit: impl FnOnce(&mut serde_json::Value)) {
    let mut config: serde_json::Value = serde_json::from_str(&xlb_ok(&["save"])).unwrap();
    let svc = config["services"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["service"] == service())
        .unwrap();
    edit(svc);
    let file = LAB.topology().state_file("health-config.json");
    std::fs::write(&file, config.to_string()).unwrap();
    xlb_ok(&["restore", &file]);
}

/// The state word `status --json` gives a real of a service.
fn state_of(service: &str, real: &str) -> String {
    let status: serde_json::Value = serde_json::from_str(&xlb_ok(&["--json", "status"])).unwrap();
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service)
        .and_then(|s| {
            s["reals"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["addr"] == real)
        })
        .map(|r| r["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

fn wait_state(service: &str, real: &str, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if state_of(service, real) == want {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{real} of {service} is {} after {timeout:?}, not {want}",
        state_of(service, real)
    );
}

/// One GET to the VIP on a new connection: the answering real's name, or None.
fn get() -> Option<String> {
    LAB.curl("1", &[&LAB.topology().service("web").url4()])
        .map(|body| body.split_whitespace().next().unwrap_or("").to_string())
}

fn kill_server(real: &str) {
    let topo = LAB.topology();
    let server = topo.server_on(real, topo.service("web").port);
    let pid = std::fs::read_to_string(&server.spawned.pid_file).unwrap();
    assert!(
        Command::new("kill")
            .arg(pid.trim())
            .status()
            .unwrap()
            .success()
    );
}

/// Starts a lab HTTP server in a real's namespace, in place of the lab's.
fn start_server(real: &str) -> KillOnDrop {
    let port = LAB.topology().service("web").port.to_string();
    let child = Command::new("ip")
        .args(["netns", "exec", &LAB.ns(real), "python3"])
        .arg(repo().join("scripts/lab-http-server.py"))
        .args(["--name", real, "--port", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// A UDP echo server in a real's namespace.
fn udp_echo(real: &str) -> KillOnDrop {
    let script = "import socket\n\
                      s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                      s.bind(('0.0.0.0', 5353))\n\
                      while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d, a)\n";
    KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &LAB.ns(real), "python3", "-c"])
            .arg(script)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn health_checks_in_the_dr_lab() {
    let _lab = LAB.up();
    let topo = LAB.topology();
    let service = service();
    let service = service.as_str();
    // (name, address) of each real.
    let reals = topo.reals_with_ipv4();
    let [(r1, r1_ip), (r2, r2_ip), (r3, r3_ip)] = reals[..] else {
        panic!("the dr lab has three reals: {reals:?}")
    };
    let state = &topo.state_dir;
    let web_port = topo.service("web").port.to_string();
    let (tcp_svc, exec_svc, udp_svc) = (
        vip_service("8082/tcp"),
        vip_service("8083/tcp"),
        vip_service("5353/udp"),
    );
    let (tcp_svc, exec_svc, udp_svc) = (tcp_svc.as_str(), exec_svc.as_str(), udp_svc.as_str());

    // The lab's service gets an HTTP check on /healthz.
    edit_service(|svc| {
        svc["check"] = serde_json::json!({
            "kind": "http", "path": "/healthz",
            "interval_ms": INTERVAL_MS, "timeout_ms": INTERVAL_MS, "rise": 2, "fall": FALL,
        });
    });
    for &(_, addr) in &reals {
        wait_state(service, addr, "up", Duration::from_secs(5));
    }

    // Under continuous load, kill r1's server: requests fail only until the checks take r1
    // out, then all succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let start = Instant::now();
                log.push((start, get()));
            }
            log
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    kill_server(r1);
    let detected = wait_state(service, r1_ip, "down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let log = load.join().unwrap();
    // Requests that started a full curl timeout before the kill cannot have met it.
    let before: Vec<_> = log
        .iter()
        .filter(|(t, _)| *t + Duration::from_secs(1) < killed)
        .collect();
    let failed_before = before.iter().filter(|(_, r)| r.is_none()).count();
    assert_eq!(
        failed_before,
        0,
        "{failed_before} of {} requests failed before the kill",
        before.len()
    );
    assert!(before.len() >= 5, "too little load before the kill");
    let last_failure = log
        .iter()
        .filter(|(t, r)| *t >= killed && r.is_none())
        .map(|(t, _)| t.duration_since(killed))
        .max()
        .unwrap_or_default();
    let after_detection: Vec<_> = log
        .iter()
        .filter(|(t, _)| t.duration_since(killed) > detected)
        .collect();
    let failed_after = after_detection.iter().filter(|(_, r)| r.is_none()).count();
    let budget = Duration::from_millis(FALL * INTERVAL_MS);
    eprintln!(
        "detection: status showed r1 down {detected:?} after the kill; last failed request \
         started {last_failure:?} after it (fall x interval = {budget:?}); {} requests during \
         the test, {failed_after} failed of {} after detection",
        log.len(),
        after_detection.len()
    );
    assert_eq!(failed_after, 0, "requests failed after r1 was taken out");
    assert!(
        after_detection.len() >= 10,
        "too little load after detection"
    );
    assert!(
        last_failure <= budget + Duration::from_millis(400),
        "requests failed for {last_failure:?}, beyond fall x interval {budget:?}"
    );

    // r1's server back: up after `rise` successes, new connections reach it again.
    let _r1_server = start_server(r1);
    wait_state(service, r1_ip, "up", Duration::from_secs(5));
    assert!(
        (0..30).any(|_| get().as_deref() == Some(r1)),
        "r1 got nothing after coming back up"
    );

    // tcp: a second service checks port 80 by connecting; killing r3's server takes r3 down
    // there too.
    xlb_ok(&[
        "service",
        "add",
        tcp_svc,
        "--mode",
        "dr",
        "--check",
        "tcp",
        "--check-port",
        &web_port,
        "--interval",
        "300ms",
        "--timeout",
        "300ms",
    ]);
    // exec: a third service's reals are healthy while a marker file exists; r2 flaps.
    let marker = |real: &str| format!("{state}/health-ok-{real}");
    xlb_ok(&[
        "service",
        "add",
        exec_svc,
        "--mode",
        "dr",
        "--check",
        "exec",
        "--check-cmd",
        &format!("test -e {state}/health-ok-$XLB_REAL"),
        "--interval",
        "200ms",
        "--timeout",
        "200ms",
        "--rise",
        "3",
        "--fall",
        "1",
    ]);
    // udp: a fourth service's reals run an echo server on 5353.
    let echo: Vec<KillOnDrop> = reals.iter().map(|(r, _)| udp_echo(r)).collect();
    xlb_ok(&[
        "service",
        "add",
        udp_svc,
        "--mode",
        "dr",
        "--check",
        "udp",
        "--check-send",
        "70696e67",
        "--check-expect",
        "70696e67",
        "--interval",
        "300ms",
        "--timeout",
        "300ms",
    ]);
    for &(_, addr) in &reals {
        std::fs::write(marker(addr), "").unwrap();
        for svc in [tcp_svc, exec_svc, udp_svc] {
            xlb_ok(&["real", "add", svc, addr]);
        }
    }
    for &(_, addr) in &reals {
        for svc in [tcp_svc, exec_svc, udp_svc] {
            wait_state(svc, addr, "up", Duration::from_secs(5));
        }
    }
    kill_server(r3);
    wait_state(tcp_svc, r3_ip, "down", Duration::from_secs(5));
    wait_state(service, r3_ip, "down", Duration::from_secs(5));
    drop(echo);
    wait_state(udp_svc, r1_ip, "down", Duration::from_secs(5));

    // exec and flapping: r2's marker goes, r2 is down; it comes back for less than `rise`
    // checks twice and stays down; steady, it is readmitted.
    std::fs::remove_file(marker(r2_ip)).unwrap();
    wait_state(exec_svc, r2_ip, "down", Duration::from_secs(5));
    for _ in 0..2 {
        std::fs::write(marker(r2_ip), "").unwrap();
        let flap = Instant::now();
        while flap.elapsed() < Duration::from_millis(350) {
            assert_eq!(state_of(exec_svc, r2_ip), "down", "readmitted early");
            std::thread::sleep(Duration::from_millis(30));
        }
        std::fs::remove_file(marker(r2_ip)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(state_of(exec_svc, r2_ip), "down");
    }
    std::fs::write(marker(r2_ip), "").unwrap();
    let back = wait_state(exec_svc, r2_ip, "up", Duration::from_secs(5));
    eprintln!("steady r2 readmitted after {back:?} (rise 3 x 200 ms)");
    assert!(
        back >= Duration::from_millis(400),
        "readmitted after {back:?}"
    );

    // Adaptive weights: r1's health endpoint answers 100 ms late, so its weight drops to a
    // quarter and it gets about 25/125 of new connections beside r2 (r3's server is dead).
    edit_service(|svc| {
        svc["weights"] = "adaptive".into();
        for real in svc["reals"].as_array_mut().unwrap() {
            if real["addr"] == r1_ip {
                real["check"] = serde_json::json!({
                    "kind": "http", "path": "/healthz?delay=0.1",
                    "interval_ms": INTERVAL_MS, "timeout_ms": INTERVAL_MS,
                });
            }
        }
    });
    let weights = || -> Vec<u64> {
        let status: serde_json::Value =
            serde_json::from_str(&xlb_ok(&["--json", "status"])).unwrap();
        let svc = status["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == service)
            .unwrap()
            .clone();
        [r1_ip, r2_ip]
            .iter()
            .map(|a| {
                svc["reals"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["addr"] == *a)
                    .unwrap()["effective_weight"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let adapted = Instant::now();
    while weights() != [25, 100] {
        assert!(
            adapted.elapsed() < Duration::from_secs(10),
            "weights {:?}, not [25, 100]\n{}",
            weights(),
            xlb_ok(&["status"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let adapted = adapted.elapsed();
    let total = 150;
    let to_r1 = (0..total)
        .filter(|_| match get().as_deref() {
            Some(r) if r == r1 => true,
            Some(r) if r == r2 => false,
            other => panic!("unexpected answer {other:?}"),
        })
        .count();
    let share = to_r1 as f64 / total as f64;
    eprintln!(
        "adaptive: r1 (checks 100 ms slower) at weight 25 after {adapted:?}, got {share:.3} of \
         new connections (25/125 = 0.2 expected)"
    );
    assert!((0.08..=0.32).contains(&share), "r1 got {share:.3}");
}
