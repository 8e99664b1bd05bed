//! End-to-end: the DR lab (scripts/lab dr up) with the real xlb daemon, real HTTP traffic
//! from the client namespace, checks of what each real server saw.
//!
//! One test function runs the scenarios in order: they share one lab (fixed namespace names),
//! so they must not run in parallel.

use std::{
    collections::BTreeMap,
    process::{Command, Output},
    time::{Duration, Instant},
};

use xlb_tests::lab::{
    KillOnDrop, Lab, Load, assert_spread, keepalive, metric, repo, sh, text, wait_for, xlb_bin,
};

const LAB: Lab = Lab::new("dr");

/// The lab's service, as the CLI writes it.
fn service() -> String {
    LAB.topology().service("web").addr4()
}

fn xlb(args: &[&str]) -> Output {
    LAB.xlb().run(args)
}

fn xlb_ok(args: &[&str]) -> String {
    LAB.xlb().ok(args)
}

fn get(url: &str) -> Option<String> {
    LAB.get(url)
}

fn spread(n: usize) -> (BTreeMap<String, usize>, usize, Vec<String>) {
    LAB.spread(&LAB.topology().service("web").url4(), n, String::new)
}

#[test]
fn dr_lab_end_to_end() {
    let _lab = LAB.up();
    let topo = LAB.topology();
    let (service, url) = (service(), topo.service("web").url4());
    let service = service.as_str();
    let (client, dir) = (topo.client.as_str(), topo.director());
    let client_ip = topo.ipv4(client);
    let dir_ip = topo.ipv4(dir);
    let reals = topo.real_ipv4s();

    // 300 requests all succeed, every real gets 20-47 %, and reals see the client's address.
    let (per_real, failed, clients) = spread(300);
    eprintln!("spread over reals: {per_real:?}, failed {failed}");
    assert_eq!(failed, 0, "failed requests: {per_real:?}");
    assert_spread(&per_real, 3, 300);
    assert_eq!(
        clients,
        vec![client_ip.to_string()],
        "DR must keep the client source"
    );

    // Traffic that is not for a service still reaches the director's own stack.
    let ping = sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(client),
            "ping",
            "-c",
            "2",
            "-W",
            "1",
            dir_ip,
        ],
    );
    assert!(ping.status.success(), "ping to the director failed");
    let server = Command::new("ip")
        .args(["netns", "exec", topo.ns(dir), "python3"])
        .arg(repo().join("scripts/lab-http-server.py"))
        .args(["--name", "director", "--port", "8080"])
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(server);
    let dir_url = format!("http://{dir_ip}:8080/");
    wait_for(
        "the director's own HTTP server",
        Duration::from_secs(10),
        || get(&dir_url).is_some(),
    );
    assert_eq!(
        get(&dir_url).as_deref(),
        Some(format!("director {client_ip}").as_str())
    );
    let _ = server.0.kill();

    // After `real remove`, no new connection reaches that real; after `real add`, new ones do.
    let (r2, r2_ip) = (topo.reals[1].as_str(), reals[1]);
    xlb_ok(&["real", "remove", service, r2_ip]);
    let (per_real, failed, _) = spread(60);
    assert_eq!(failed, 0);
    assert!(
        !per_real.contains_key(r2),
        "{r2} still got requests: {per_real:?}"
    );
    xlb_ok(&["real", "add", service, r2_ip]);
    let (per_real, failed, _) = spread(60);
    assert_eq!(failed, 0);
    assert!(
        per_real.contains_key(r2),
        "{r2} got nothing after re-adding: {per_real:?}"
    );

    // A long-lived TCP connection keeps its real while other reals are added, removed and
    // reweighted, and while its own real is reweighted.
    let mut conn = KeepAlive::start();
    let (port, holder) = conn.next_answer();
    let holder_ip = topo.ipv4(&holder).to_string();
    let other = reals.iter().copied().find(|r| *r != holder_ip).unwrap();
    let steps: [&[&str]; 7] = [
        &["real", "weight", service, other, "50"],
        &["real", "remove", service, other],
        &["real", "add", service, other],
        &["real", "add", service, "198.18.0.21"],
        &["real", "remove", service, "198.18.0.21"],
        &["real", "weight", service, &holder_ip, "300"],
        &["real", "weight", service, &holder_ip, "100"],
    ];
    for step in steps {
        xlb_ok(step);
        for _ in 0..5 {
            assert_eq!(
                conn.next_answer(),
                (port.clone(), holder.clone()),
                "the long-lived connection moved or broke after {step:?}"
            );
        }
    }

    // Draining the connection's real: it keeps working, no new connection reaches the real,
    // and wait-drained returns only once the connection has closed.
    xlb_ok(&["real", "drain", service, &holder_ip]);
    assert!(xlb_ok(&["status"]).contains("draining"));
    let (per_real, failed, _) = spread(45);
    assert_eq!(failed, 0, "{per_real:?}");
    assert!(
        !per_real.contains_key(&holder),
        "the draining {holder} got new connections: {per_real:?}"
    );
    for _ in 0..5 {
        assert_eq!(conn.next_answer(), (port.clone(), holder.clone()));
    }
    let early = xlb(&[
        "real",
        "wait-drained",
        service,
        &holder_ip,
        "--timeout",
        "1s",
    ]);
    assert!(
        !early.status.success(),
        "wait-drained returned while the connection was open"
    );
    drop(conn);
    let closed = Instant::now();
    xlb_ok(&[
        "real",
        "wait-drained",
        service,
        &holder_ip,
        "--timeout",
        "20s",
    ]);
    eprintln!(
        "wait-drained returned {:?} after the connection closed",
        closed.elapsed()
    );
    xlb_ok(&["real", "enable", service, &holder_ip]);
    let (per_real, failed, _) = spread(45);
    assert_eq!(failed, 0, "{per_real:?}");
    assert!(
        per_real.contains_key(&holder),
        "{holder} got nothing after enable: {per_real:?}"
    );

    // The metrics endpoint shows the traffic per real.
    let page = sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(dir),
            "curl",
            "-s",
            "--max-time",
            "5",
            &topo.daemon(dir).metrics_url(),
        ],
    );
    let page = String::from_utf8_lossy(&page.stdout);
    // Every real has its series; the long-lived connection's real carried its packets (the
    // others were just re-added, so their counters restarted).
    for &real in &reals {
        let series = format!("xlb_real_packets_total{{real=\"{real}\",service=\"{service}\"}}");
        let value = metric(&page, &series);
        assert!(value.is_some(), "metrics lack {series}:\n{page}");
        if real == holder_ip {
            assert!(value.unwrap() >= 70.0, "{series} {value:?}");
        }
    }
    assert!(
        metric(&page, "xlb_forwarded_packets_total").is_some_and(|v| v > 0.0),
        "{page}"
    );

    // Bad input is refused with one line and changes nothing.
    let before = xlb_ok(&["save"]);
    for bad in [
        vec!["service", "add", "198.18.0.300:80/tcp"],
        vec!["real", "add", "198.18.0.101:80/tcp", reals[0]],
        vec!["real", "add", service, reals[0]],
        vec!["real", "add", service, "198.18.0.21", "--weight", "70000"],
        vec!["real", "add", service, "fd00:18::21"],
        vec!["service", "add", service],
    ] {
        let out = xlb(&bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{bad:?}: not one line: {err}"
        );
    }
    assert_eq!(xlb_ok(&["save"]), before);

    // A second daemon on the same interface is refused.
    let daemon = topo.daemon(dir);
    let second = sh(
        "nsenter",
        &[
            &format!("--net=/run/netns/{}", topo.ns(dir)),
            xlb_bin().to_str().unwrap(),
            "--socket",
            &topo.state_file("second.sock"),
            "daemon",
            "--iface",
            &daemon.iface,
            "--state",
            &topo.state_file("second.json"),
        ],
    );
    assert!(!second.status.success(), "a second daemon attached");
    assert!(
        text(&second).contains("another xlb daemon manages this interface"),
        "{}",
        text(&second)
    );

    // Hitless restart: under continuous load and with a long-lived connection open, the
    // daemon is killed with SIGKILL; the pinned data path keeps forwarding, a new daemon adopts
    // it (same link, its own program swapped in), and a real is changed. Then once more with a
    // different connection-table capacity: that map is recreated, and the connection still
    // reaches its real because the Maglev table did not change.
    let load = Load::start(LAB, LAB.topology().service("web").url4());
    let mut conn = KeepAlive::start();
    let (port, holder) = conn.next_answer();
    for (round, extra) in [(1, None), (2, Some("4096"))] {
        LAB.kill_daemon("KILL");
        // Nobody manages the data path now; it forwards on its own for a second.
        let answered = conn.answers_for(Duration::from_secs(1));
        assert!(
            answered >= 5,
            "round {round}: {answered} answers without a daemon"
        );
        let mut args = vec!["--iface", &daemon.iface, "--state", &daemon.state];
        if let Some(cap) = extra {
            args.extend(["--conn-capacity", cap]);
        }
        let log = topo.state_file(&format!("restart-{round}.log"));
        let restarted = KillOnDrop(
            LAB.daemon_command(&args)
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for("the restarted daemon", Duration::from_secs(10), || {
            xlb(&["status"]).status.success()
        });
        let log_text = std::fs::read_to_string(&log).unwrap();
        assert!(
            log_text.contains("adopting the pinned data path"),
            "{log_text}"
        );
        assert!(
            log_text.contains("program replaced atomically"),
            "{log_text}"
        );
        assert_eq!(
            log_text.contains("map layout changed"),
            extra.is_some(),
            "round {round}: {log_text}"
        );
        assert_eq!(xlb_ok(&["save"]), before, "configuration not restored");
        // A change through the new daemon, applied to the adopted data path.
        xlb_ok(&["real", "weight", service, r2_ip, "60"]);
        xlb_ok(&["real", "weight", service, r2_ip, "100"]);
        for _ in 0..10 {
            assert_eq!(
                conn.next_answer(),
                (port.clone(), holder.clone()),
                "round {round}"
            );
        }
        // The restarted daemon is the lab's daemon from now on (the lab stops it by pid).
        std::fs::write(&daemon.spawned.pid_file, restarted.0.id().to_string()).unwrap();
        std::mem::forget(restarted);
    }
    let (done, failed) = load.stop();
    eprintln!("hitless restarts: {done} requests under load, {failed} failed");
    assert!(done >= 20, "only {done} requests ran");
    assert_eq!(failed, 0, "requests failed across daemon restarts");
    drop(conn);

    // `xlb detach` takes the data path away: no XDP program on the interface, no pins, and
    // the VIP is no longer served.
    LAB.kill_daemon("TERM");
    assert!(
        get(&url).is_some(),
        "a stopped daemon's data path must keep forwarding"
    );
    let detach = LAB.in_dir_netns(&[
        xlb_bin().to_str().unwrap(),
        "detach",
        "--iface",
        &daemon.iface,
    ]);
    assert!(detach.status.success(), "{}", text(&detach));
    // Every pinned map and the interface's XDP link.
    let pins = format!("removed {} pins", xlb::dataplane::PINNED_MAPS.len() + 1);
    assert!(text(&detach).contains(&pins), "{}", text(&detach));
    let link = sh("ip", &["-n", topo.ns(dir), "link", "show", &daemon.iface]);
    assert!(!text(&link).contains("xdp"), "{}", text(&link));
    assert!(get(&url).is_none(), "the VIP is still served after detach");
}

/// One HTTP/1.1 connection from the client namespace, kept open with a request every 50 ms
/// (scripts/lab-http-keepalive.py); its answers arrive on a channel.
struct KeepAlive {
    _child: KillOnDrop,
    answers: std::sync::mpsc::Receiver<String>,
}

impl KeepAlive {
    fn start() -> KeepAlive {
        let (tx, answers) = std::sync::mpsc::channel();
        let topo = LAB.topology();
        let web = topo.service("web");
        let child = keepalive(
            topo.ns(&topo.client),
            &[&web.vip4, &web.port.to_string(), "--max-seconds", "60"],
            move |line| tx.send(line).is_ok(),
        );
        KeepAlive {
            _child: child,
            answers,
        }
    }

    /// How many answers arrive within `d` (each checked as `next_answer` does).
    fn answers_for(&mut self, d: Duration) -> usize {
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < d {
            self.next_answer();
            n += 1;
        }
        n
    }

    /// The next answer as (local port, real name); panics on an error or a 5 s silence.
    fn next_answer(&mut self) -> (String, String) {
        let line = self
            .answers
            .recv_timeout(Duration::from_secs(5))
            .expect("the long-lived connection went silent");
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            words.len() == 3 && words[0] != "error:",
            "long-lived connection: {line}"
        );
        (words[0].to_string(), words[1].to_string())
    }
}
