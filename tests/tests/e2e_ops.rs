//! End-to-end, operations: in the DR lab with real traffic, the daemon's metrics pass
//! `promtool check metrics`, say what happened (per service, per real, per drop reason,
//! states, check latency), cover every metric the Grafana dashboard uses; the log has one line
//! per operator event and no packet contents at the default level; `--datapath-log` logs a
//! dropped packet's flow.
//!
//! Uses the DR lab's fixed namespaces: run it holding the lab lock
//! (`flock /tmp/xlb-lab.lock cargo test --test e2e_ops`).

use std::{
    collections::BTreeSet,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use xlb_tests::lab::{KillOnDrop, Lab, metric, promtool_check, repo, sh, text, wait_for};

/// A service on the lab's VIP with no reals: its packets are dropped (`no_backend`).
const EMPTY_PORT: u16 = 81;
/// A checked service on the lab's VIP whose check port nobody listens on: its real goes down.
const CHECKED_PORT: u16 = 8080;
const LAB: Lab = Lab::new("dr");

fn xlb_ok(args: &[&str]) -> String {
    LAB.xlb().ok(args)
}

/// One scrape from inside the director's namespace, and how long the daemon took to answer.
fn scrape() -> (String, Duration) {
    let topo = LAB.topology();
    let dir = topo.director();
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(dir),
            "curl",
            "-s",
            "--max-time",
            "5",
            "-o",
            "/dev/stdout",
            "-w",
            "\n#time_total %{time_total}\n",
            &topo.daemon(dir).metrics_url(),
        ],
    );
    assert!(out.status.success(), "scrape failed: {}", text(&out));
    let body = String::from_utf8(out.stdout).unwrap();
    let (page, time) = body.rsplit_once("\n#time_total ").unwrap();
    let secs: f64 = time.trim().parse().unwrap();
    (format!("{page}\n"), Duration::from_secs_f64(secs))
}

fn daemon_log() -> String {
    let topo = LAB.topology();
    std::fs::read_to_string(&topo.daemon(topo.director()).spawned.log).unwrap_or_default()
}

/// Lines of the log that contain every one of `words`.
fn log_lines(log: &str, words: &[&str]) -> usize {
    log.lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .count()
}

/// Metric families a page declares (`# TYPE NAME KIND`).
fn families(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn metrics_logs_and_dashboard_in_the_dr_lab() {
    let _lab = LAB.up();
    let topo = LAB.topology();
    let web = topo.service("web");
    let vip = web.vip4.as_str();
    let service = web.addr4();
    let service = service.as_str();
    let empty_service = format!("{vip}:{EMPTY_PORT}/tcp");
    let empty_service = empty_service.as_str();
    let checked_service = format!("{vip}:{CHECKED_PORT}/tcp");
    let checked_service = checked_service.as_str();
    let client_ip = topo.ipv4(&topo.client);
    let [r1, r2, r3] = topo.real_ipv4s()[..] else {
        panic!("the dr lab has three reals: {:?}", topo.reals)
    };
    let daemon = topo.daemon(topo.director());

    // Traffic: IPv4 and IPv6 requests through the balancer, and packets for a service with no
    // real (dropped).
    let (per_real, failed, _) = LAB.spread(&web.url4(), 30, String::new);
    assert_eq!(failed, 0, "{per_real:?}");
    assert!(LAB.get(&web.url6()).is_some(), "IPv6 request failed");
    xlb_ok(&["service", "add", empty_service]);
    let empty_url = format!("http://{vip}:{EMPTY_PORT}/");
    assert!(LAB.curl("1", &[&empty_url]).is_none());

    // A checked real that fails its check goes down, with the check's reason in the log.
    xlb_ok(&[
        "service",
        "add",
        checked_service,
        "--check",
        "tcp",
        "--interval",
        "200ms",
        "--timeout",
        "200ms",
        "--fall",
        "1",
    ]);
    xlb_ok(&["real", "add", checked_service, r1]);
    wait_for(
        "the checked real to go down",
        Duration::from_secs(10),
        || log_lines(&daemon_log(), &["real down", r1, "refused"]) == 1,
    );

    // Draining a real with no open connection finishes at once; the log says so once.
    xlb_ok(&["real", "drain", service, r2]);
    wait_for("drain finished in the log", Duration::from_secs(10), || {
        log_lines(&daemon_log(), &["drain finished", r2]) == 1
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        log_lines(&daemon_log(), &["drain finished"]),
        1,
        "drain finished logged more than once:\n{}",
        daemon_log()
    );

    // A refused request: one log line with the request and the reason.
    let unknown_service = format!("{vip}:82/tcp");
    let bad = LAB.xlb().run(&["real", "add", &unknown_service, r1]);
    assert!(!bad.status.success());

    // The scrape: promtool finds no problem.
    let (page, took) = scrape();
    eprintln!(
        "scrape: {} bytes, {} lines, {took:?}",
        page.len(),
        page.lines().count()
    );
    promtool_check(&page);

    // What the page says matches what happened.
    let real = |name: &str, service: &str, real: &str| {
        metric(
            &page,
            &format!("{name}{{real=\"{real}\",service=\"{service}\"}}"),
        )
    };
    let state = |service: &str, real: &str, state: &str| {
        metric(
            &page,
            &format!("xlb_real_state{{real=\"{real}\",service=\"{service}\",state=\"{state}\"}}"),
        )
    };
    for r in [r1, r2, r3] {
        assert!(
            real("xlb_real_packets_total", service, r).is_some_and(|v| v > 0.0),
            "{r} carried no packets:\n{page}"
        );
        assert!(real("xlb_real_new_flows_total", service, r).is_some_and(|v| v > 0.0));
        assert_eq!(real("xlb_real_weight", service, r), Some(100.0));
    }
    assert_eq!(state(service, r2, "draining"), Some(1.0));
    assert_eq!(state(service, r2, "up"), None);
    assert_eq!(state(service, r1, "up"), Some(1.0));
    assert_eq!(state(checked_service, r1, "down"), Some(1.0));
    // One series per real, its current state.
    let states: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("xlb_real_state{"))
        .collect();
    assert_eq!(states.len(), 7, "3 + 3 IPv6 + 1 checked reals:\n{page}");
    assert!(states.iter().all(|l| l.ends_with("} 1")), "{states:?}");
    assert_eq!(real("xlb_real_in_table", service, r2), Some(0.0));
    let latency = real("xlb_real_check_latency_seconds", checked_service, r1);
    assert!(
        latency.is_some_and(|l| (0.0..1.0).contains(&l)),
        "{latency:?}"
    );
    assert!(
        metric(
            &page,
            &format!("xlb_service_packets_total{{service=\"{empty_service}\"}}")
        )
        .is_some_and(|v| v >= 1.0)
    );
    assert!(
        metric(&page, "xlb_dropped_packets_total{reason=\"no_backend\"}").is_some_and(|v| v >= 1.0),
        "{page}"
    );
    assert!(metric(&page, "xlb_forwarded_packets_total").is_some_and(|v| v >= 60.0));
    assert!(metric(&page, "xlb_passed_packets_total").is_some_and(|v| v > 0.0));
    // TCP SYNs schedule without a lookup: a miss is a non-SYN packet without an entry.
    assert!(metric(&page, "xlb_conntrack_misses_total").is_some());
    assert!(metric(&page, "xlb_conntrack_stale_total").is_some());
    assert!(metric(&page, "xlb_conntrack_entries").is_some_and(|v| v >= 31.0));
    assert_eq!(
        metric(&page, "xlb_conntrack_capacity"),
        Some(f64::from(lb_common::DEFAULT_CONN_CAPACITY))
    );
    assert!(
        ["native", "generic"]
            .iter()
            .any(|mode| page.contains(&format!(
                "xlb_xdp_attach_info{{iface=\"{}\",mode=\"{mode}\"}} 1",
                daemon.iface
            ))),
        "{page}"
    );
    assert!(
        page.contains(&format!(
            "xlb_build_info{{ebpf_object=\"{}\",version=\"{}\"}} 1",
            xlb::dataplane::ebpf_object_digest(),
            env!("CARGO_PKG_VERSION")
        )),
        "{page}"
    );

    // Every metric the Grafana dashboard queries exists.
    let dashboard = repo().join("packaging/grafana/xlb-dashboard.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&json, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");
    let declared = families(&page);
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("xlb_") {
                used.insert(word.to_string());
            }
        }
    }
    let missing: Vec<_> = used.difference(&declared).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses metrics the daemon does not serve: {missing:?}"
    );
    eprintln!(
        "dashboard: {} queries over {} metrics",
        exprs.len(),
        used.len()
    );

    // The log: one line per event, none with packet contents at the default level.
    let log = daemon_log();
    for (words, n) in [
        (&["XDP program attached", "mode="][..], 1),
        (&["service added", empty_service][..], 1),
        (&["real added", checked_service, r1][..], 1),
        (&["next hop resolved", r3, "mac="][..], 1),
        (&["real draining", r2][..], 1),
        (&["refused", "real-add", &unknown_service][..], 1),
    ] {
        assert_eq!(log_lines(&log, words), n, "{words:?} in the log:\n{log}");
    }
    assert!(
        !log.contains("xlb_datapath") && !log.contains(&format!("{client_ip}:")),
        "packet contents at the default level:\n{log}"
    );

    // --datapath-log: the daemon restarted with it logs a dropped packet's flow.
    let pid = std::fs::read_to_string(&daemon.spawned.pid_file).unwrap();
    let pid = pid.trim().to_string();
    assert!(sh("kill", &[&pid]).status.success());
    wait_for("the daemon to exit", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(&pid)
    });
    let log_path = topo.state_file("xlb-datapath.log");
    // It adopts the data path the stopped daemon left pinned.
    let restarted = LAB
        .daemon_command(&[
            "--iface",
            &daemon.iface,
            "--state",
            &daemon.state,
            "--datapath-log",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let _restarted = KillOnDrop(restarted);
    wait_for("the restarted daemon", Duration::from_secs(10), || {
        LAB.xlb().run(&["status"]).status.success()
    });
    let start = Instant::now();
    let mut logged = String::new();
    while start.elapsed() < Duration::from_secs(10) {
        let _ = LAB.curl("1", &[&empty_url]);
        logged = std::fs::read_to_string(&log_path).unwrap();
        if logged.contains("xlb_datapath") {
            break;
        }
    }
    assert_eq!(
        log_lines(
            &logged,
            &[
                "DEBUG",
                "xlb_datapath",
                &format!("drop_no_backend proto 6 {client_ip}:"),
                &format!("-> {vip}:{EMPTY_PORT}"),
            ]
        ),
        logged.matches("xlb_datapath").count(),
        "{logged}"
    );
    assert!(
        logged.contains("xlb_datapath"),
        "no data-path log:\n{logged}"
    );
    // Forwarded packets are not logged.
    assert!(LAB.get(&web.url4()).is_some());
    std::thread::sleep(Duration::from_millis(300));
    let after = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !after.contains(&format!("-> {vip}:{}", web.port)),
        "a forwarded packet was logged:\n{after}"
    );
}

/// Every `expr` string of a Grafana dashboard.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn is_zombie(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}
