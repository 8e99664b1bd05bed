//! End-to-end: the NAT labs. `scripts/lab nat up`: the reals have nothing but a default route
//! via the director; every request arrives on the director's eth0 and leaves rewritten into
//! eth1, every reply comes back on eth1 and leaves translated back into eth0, and the
//! director's kernel does not forward, so an answer the client gets went through the data path
//! both ways. `scripts/lab fullnat up`: one arm, the reals see the director's SNAT address and
//! answer it. In both the service's port 80 is mapped to 8080 on the reals (UDP 53 to 5353).
//!
//! Each lab's test runs its scenarios in order (they share the lab); the two tests take turns.

use std::{path::Path, time::Duration};

use serde_json::Value;
use xlb_tests::lab::{Lab, Load, assert_spread, metric, random_bytes, sh, sha256, text, wait_for};

const TRANSFER_BYTES: usize = 200 * 1024;

fn status(lab: Lab) -> Value {
    serde_json::from_str(&lab.xlb().ok(&["status", "--json"])).unwrap()
}

/// The state ("up", "down", ...) of the web service's real `addr` in `xlb status`.
fn real_state(lab: Lab, addr: &str) -> String {
    let st = status(lab);
    st["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"].as_str().unwrap().ends_with("/tcp"))
        .and_then(|s| s["reals"].as_array())
        .and_then(|rs| rs.iter().find(|r| r["addr"] == addr))
        .map(|r| r["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// One lab at a time: the kill -9 under load wants the machine to itself.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn nat_lab_end_to_end() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    end_to_end(Lab::new("nat"));
}

#[test]
fn full_nat_lab_end_to_end() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    end_to_end(Lab::new("fullnat"));
}

fn end_to_end(lab: Lab) {
    let _running = lab.up();
    let diagnostics = || lab.diagnostics();
    let topo = lab.topology();
    let name = topo.lab.clone();
    let client_ip = topo.ipv4(&topo.client).to_string();
    let web = topo.service("web").clone();
    let dns = topo.service("dns").clone();
    assert_eq!(
        (web.mode.as_str(), web.real_port),
        (name.as_str(), Some(8080))
    );
    // What the reals see as the client: the client (NAT), the SNAT address (full NAT).
    let seen = web.snat.clone().unwrap_or(client_ip.clone());
    let real_iface = topo
        .iface_towards(topo.director(), &topo.reals[0])
        .to_string();
    let (svc, url) = (web.addr4(), web.url4());

    // Status, real list and save show each real's mapped port.
    let st = status(lab);
    for s in st["services"].as_array().unwrap() {
        assert_eq!(s["mode"], name.as_str(), "{s}");
        for r in s["reals"].as_array().unwrap() {
            assert_eq!(r["state"], "up", "{r}");
            assert_eq!(r["iface"], real_iface.as_str(), "{r}");
        }
    }
    let human = lab.xlb().ok(&["status"]);
    let list = lab.xlb().ok(&["real", "list", &svc]);
    let saved = lab.xlb().ok(&["save"]);
    for real in topo.real_ipv4s() {
        let endpoint = format!("{real}:8080");
        assert!(human.contains(&endpoint), "{human}");
        assert!(list.contains(&format!("{endpoint} weight 100")), "{list}");
    }
    assert!(saved.contains("\"port\": 8080"), "{saved}");
    assert!(saved.contains("\"port\": 5353"), "{saved}");

    // 300 requests spread over the three reals, each of which sees the client's address (NAT)
    // or the SNAT address (full NAT).
    let (per_real, failed, clients) = lab.spread(&url, 300, diagnostics);
    eprintln!("{name}: spread over reals {per_real:?}, failed {failed}");
    assert_eq!(
        failed,
        0,
        "failed requests: {per_real:?}\n{}",
        diagnostics()
    );
    assert_spread(&per_real, 3, 300);
    assert_eq!(clients, vec![seen.clone()]);

    // A 200 KB upload and a 200 KB download arrive whole and intact.
    let file = topo.state_file("upload.bin");
    std::fs::write(&file, random_bytes(TRANSFER_BYTES, 1)).unwrap();
    let want = sha256(&file);
    let answer = lab
        .curl(
            "10",
            &["-H", "Expect:", "--data-binary", &format!("@{file}"), &url],
        )
        .unwrap_or_else(|| panic!("upload failed\n{}", diagnostics()));
    let words: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(
        words[1..],
        [seen.as_str(), &TRANSFER_BYTES.to_string(), &want],
        "upload: {answer}"
    );
    let download = topo.state_file("download.bin");
    lab.curl(
        "10",
        &["-o", &download, &format!("{url}bytes?n={TRANSFER_BYTES}")],
    )
    .unwrap_or_else(|| panic!("download failed\n{}", diagnostics()));
    let got = std::fs::read(&download).unwrap();
    assert_eq!(got.len(), TRANSFER_BYTES);
    assert!(got.iter().enumerate().all(|(i, b)| *b as usize == i % 251));

    path_mtu_discovery(lab, &url, &seen);

    // UDP: datagrams from 90 source ports, answered from the VIP's port 53 by all three reals,
    // each of which sees the client's (or the SNAT) address.
    let udp = sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(&topo.client),
            "python3",
            "-c",
            UDP_CLIENT,
            &dns.vip4,
            &dns.port.to_string(),
            "90",
        ],
    );
    let mut udp_per_real = std::collections::BTreeMap::new();
    for line in text(&udp).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.len(), 3, "udp: {}", text(&udp));
        assert_eq!(words[1], seen, "udp: {line}");
        assert_eq!(
            words[2],
            format!("{}:{}", dns.vip4, dns.port),
            "udp: {line}"
        );
        *udp_per_real.entry(words[0].to_string()).or_insert(0) += 1;
    }
    eprintln!("{name} udp: {udp_per_real:?}");
    assert_eq!(udp_per_real.values().sum::<usize>(), 90, "{}", text(&udp));
    assert_spread(&udp_per_real, 3, 90);

    // The replies went through the data path.
    let page = lab.metrics_page();
    let replies = metric(&page, "xlb_nat_replies_total").unwrap_or(0.0);
    assert!(replies > 600.0, "xlb_nat_replies_total {replies}\n{page}");

    // A port on a DR real is refused with one line, and nothing changes.
    let dr_svc = format!("{}:81/tcp", web.vip4);
    lab.xlb().ok(&["service", "add", &dr_svc]);
    let real = format!("{}:8080", topo.real_ipv4s()[0]);
    let out = lab.xlb().run(&["real", "add", &dr_svc, &real]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.trim().lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("needs a NAT service"), "{err}");
    lab.xlb().ok(&["service", "remove", &dr_svc]);
    assert_eq!(lab.xlb().ok(&["save"]), saved);

    // Hitless restart: under continuous load, the daemon is killed with SIGKILL; the pinned
    // data path (NAT reply table and NAT programs included) goes on translating both ways,
    // and a new daemon adopts it.
    let load = Load::start(lab, url.clone());
    std::thread::sleep(Duration::from_millis(500));
    lab.kill_daemon("KILL");
    std::thread::sleep(Duration::from_secs(1));
    let daemon = topo.daemon(topo.director()).clone();
    let ifaces = if daemon.ifaces.is_empty() {
        vec![daemon.iface.clone()]
    } else {
        daemon.ifaces.clone()
    };
    let mut args = Vec::new();
    for iface in &ifaces {
        args.extend(["--iface", iface.as_str()]);
    }
    let log = lab.restart(&args, "restart");
    assert!(log.contains("adopting the pinned data path"), "{log}");
    std::thread::sleep(Duration::from_millis(500));
    let (done, failed) = load.stop();
    eprintln!("{name}: kill -9 under load: {done} requests, {failed} failed");
    assert!(done >= 20, "only {done} requests ran");
    assert_eq!(
        failed,
        0,
        "requests failed across the daemon's kill -9\n{}",
        diagnostics()
    );
    assert_eq!(lab.xlb().ok(&["save"]), saved, "configuration not restored");
    wait_for("the reals to be up again", Duration::from_secs(10), || {
        topo.real_ipv4s().iter().all(|r| real_state(lab, r) == "up")
    });

    // Drain: no new flows for r1, and wait-drained sees its flows end.
    let (r1, r1_ip) = (topo.reals[0].as_str(), topo.real_ipv4s()[0]);
    lab.xlb().ok(&["real", "drain", &svc, r1_ip]);
    let (per_real, failed, _) = lab.spread(&url, 60, diagnostics);
    assert_eq!(failed, 0, "{per_real:?}");
    assert!(
        !per_real.contains_key(r1),
        "drained r1 got new flows: {per_real:?}"
    );
    lab.xlb()
        .ok(&["real", "wait-drained", &svc, r1_ip, "--timeout", "30s"]);
    lab.xlb().ok(&["real", "enable", &svc, r1_ip]);

    // Failover: r2's server dies; its HTTP checks (on the mapped port) take it down, and
    // requests go on to the others without a failure.
    let (r2, r2_ip) = (topo.reals[1].as_str(), topo.real_ipv4s()[1]);
    let server = &topo.server_on(r2, 8080).spawned;
    let pid = std::fs::read_to_string(&server.pid_file).unwrap();
    assert!(sh("kill", &[pid.trim()]).status.success());
    wait_for("r2's server to stop", Duration::from_secs(5), || {
        !Path::new(&format!("/proc/{}", pid.trim())).exists()
    });
    wait_for("r2 to be taken down", Duration::from_secs(10), || {
        real_state(lab, r2_ip) == "down"
    });
    let (per_real, failed, _) = lab.spread(&url, 60, diagnostics);
    eprintln!("{name} without r2's server: {per_real:?}, failed {failed}");
    assert_eq!(failed, 0, "{per_real:?}\n{}", diagnostics());
    assert!(!per_real.contains_key(r2), "{per_real:?}");
    assert_eq!(per_real.len(), 2, "{per_real:?}");
}

/// ADDR PORT N: N datagrams, each from a socket of its own (a source port each); prints one
/// line per answer: the answer's two words and the address it came from.
/// Path MTU discovery through the director: the far client sits behind a router whose link
/// to it has MTU 1400 but advertises an MSS of 1460, so the real's full-size segments of a
/// download do not fit that link. The router answers "fragmentation needed" to the VIP (the
/// segments' source); the download completes only if the director translates that error back
/// to the real (NAT: about the real's own flow; full NAT: about its flow with the SNAT address),
/// which then lowers its path MTU: linux's TCP does no MTU probing by default, so without the
/// translation the transfer stalls until curl gives up.
fn path_mtu_discovery(lab: Lab, url: &str, seen_by_reals: &str) {
    let topo = lab.topology();
    let far = topo.ipv4("far").to_string();
    // What a real's reply is addressed to: the client itself (NAT), the SNAT address (full NAT).
    let reply_to = if seen_by_reals == topo.ipv4(&topo.client) {
        far.clone()
    } else {
        seen_by_reals.to_string()
    };
    let learned = |real: &str| {
        let route = text(&sh("ip", &["-n", topo.ns(real), "route", "get", &reply_to]));
        route.contains("mtu 1400")
    };
    assert!(
        topo.reals.iter().all(|r| !learned(r)),
        "a real knows the far path's MTU before any traffic"
    );
    let download = topo.state_file("far-download.bin");
    lab.curl_from(
        "far",
        "10",
        &["-o", &download, &format!("{url}bytes?n={TRANSFER_BYTES}")],
    )
    .unwrap_or_else(|| {
        panic!(
            "download to the far client (path MTU 1400) failed\n{}",
            lab.diagnostics()
        )
    });
    let got = std::fs::read(&download).unwrap();
    assert_eq!(got.len(), TRANSFER_BYTES);
    assert!(got.iter().enumerate().all(|(i, b)| *b as usize == i % 251));
    let learned_by: Vec<&String> = topo.reals.iter().filter(|r| learned(r)).collect();
    eprintln!("path MTU 1400 towards {reply_to} learned by {learned_by:?}");
    assert_eq!(learned_by.len(), 1, "{learned_by:?}");
}

const UDP_CLIENT: &str = r#"
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"q%d" % i, (addr, port))
    try:
        data, peer = s.recvfrom(1000)
        print(data.decode().strip(), "%s:%d" % peer)
    except socket.timeout:
        print("timeout")
    s.close()
"#;
