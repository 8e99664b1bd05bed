//! End-to-end: the TUN lab as real fabrics use it, with the real xlb daemon and the reals' XDP
//! decapsulator: `scripts/lab tun up --encap gue` (GUE over IPv4 and IPv6), `--4in6` (the IPv4
//! service reaching IPv6 reals) and `--4in6 --encap gue`. Real HTTP traffic from the client
//! namespace, what crossed the real segment (captured on the router), a 200 KB upload that
//! arrives whole only through path-MTU discovery over the larger header, pings of the VIPs
//! answered by the director's data path, and a GUE real's refusals re-scheduled.
//!
//! One test function runs the variants in order: they share one lab (fixed namespace names).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use xlb_tests::lab::{Lab, metric, sh, sha256, text, xlb_bin};

/// The path-MTU upload: far more than one full-size segment.
const POST_BYTES: usize = 204_800;
const GUE_PORT: u16 = 6080;

const LAB: Lab = Lab::new("tun");

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `n` GETs to `url`: every one answered, by every real.
fn all_answer(url: &str, n: usize) {
    let (per_real, failed, _) = LAB.spread(url, n, || LAB.diagnostics());
    eprintln!("{url}: {per_real:?}, failed {failed}");
    assert_eq!(
        failed,
        0,
        "{url}: failed requests {per_real:?}\n{}",
        LAB.diagnostics()
    );
    assert_eq!(per_real.len(), 3, "{url}: every real answers: {per_real:?}");
}

/// POSTs 200 KB to `url` from the client, checks the answer ("rN CLIENT BYTES SHA256") and that the
/// client cached the path MTU the director advertised (`mtu`).
fn upload(url: &str, family: &str, vip: &str, client: &str, mtu: u32, file: &Path) {
    let data = format!("@{}", file.display());
    let answer = LAB
        .curl("10", &["-H", "Expect:", "--data-binary", &data, url])
        .unwrap_or_else(|| {
            panic!(
                "POST of {POST_BYTES} bytes to {url} failed\n{}",
                LAB.diagnostics()
            )
        });
    let words: Vec<&str> = answer.split_whitespace().collect();
    let want = [client, &POST_BYTES.to_string(), &sha256(file)];
    assert!(
        words.len() == 4 && words[1..] == want,
        "POST to {url}: answer {answer:?}, want \"rN {}\"",
        want.join(" ")
    );
    let topo = LAB.topology();
    let route = text(&sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(&topo.client),
            "ip",
            family,
            "route",
            "get",
            vip,
        ],
    ));
    assert!(
        route.contains(&format!("mtu {mtu}")),
        "{url}: the client has no cached mtu {mtu} towards {vip}: {route}"
    );
}

/// The GUE source ports in tcpdump lines "IP[6] SRC.SPORT > REAL.6080: UDP, length N" from
/// `src` to one of `reals`.
fn gue_source_ports(lines: &[String], src: &str, reals: &[&str]) -> BTreeSet<u16> {
    lines
        .iter()
        .filter_map(|line| {
            let (_, rest) = line.split_once(&format!(" {src}."))?;
            let (sport, rest) = rest.split_once(" > ")?;
            let (dst, _) = rest.split_once(&format!(".{GUE_PORT}: UDP"))?;
            reals.contains(&dst).then(|| sport.parse().ok())?
        })
        .collect()
}

/// Runs `traffic` while capturing `filter` on the real segment; at least 5 of the packets
/// must be GUE from `src` to a real, from at least 4 source ports, all ephemeral.
fn check_gue_on_the_wire(filter: &str, src: &str, reals: &[&str], traffic: impl FnOnce()) {
    let lines = LAB.capture_real_segment(filter, 40, traffic);
    let ports = gue_source_ports(&lines, src, reals);
    eprintln!(
        "GUE from {src}: {} source ports in {} packets",
        ports.len(),
        lines.len()
    );
    assert!(
        ports.len() >= 4 && ports.iter().all(|p| *p >= 0xc000),
        "GUE source ports from {src}: {ports:?} in {lines:#?}"
    );
}

fn ping(family: &str, vip: &str) -> bool {
    let topo = LAB.topology();
    sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(&topo.client),
            "ping",
            family,
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            vip,
        ],
    )
    .status
    .success()
}

fn realserver_check(real: &str, vip: &str, encap: &str) -> String {
    let topo = LAB.topology();
    let host = topo.host(real);
    let bin = xlb_bin();
    let out = sh(
        "timeout",
        &[
            "30",
            "ip",
            "netns",
            "exec",
            &host.ns,
            bin.to_str().unwrap(),
            "realserver",
            "check",
            "--iface",
            host.main_name(),
            "--vip",
            vip,
            "--mode",
            "tun",
            "--encap",
            encap,
        ],
    );
    assert!(
        out.status.success(),
        "check on {real} for {vip}: {}",
        text(&out)
    );
    text(&out)
}

#[test]
fn tun_lab_over_gue_and_4in6() {
    assert!(
        xlb_bin().exists(),
        "build target/release/xlb first (scripts/test does)"
    );
    let file =
        TempFile(std::env::temp_dir().join(format!("xlb-gue-post-{}.bin", std::process::id())));
    let body: Vec<u8> = (0..POST_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file.0, body).unwrap();

    // 1. GUE over IPv4 and IPv6.
    let lab = LAB.up_options(&["--encap", "gue"]);
    let topo = LAB.topology();
    let web = topo.service("web");
    assert_eq!(web.encap.as_deref(), Some("gue"));
    let (vip4, vip6) = (web.vip4.as_str(), web.vip6());
    let (url4, url6) = (web.url4(), web.url6());
    let (client4, client6) = (topo.ipv4(&topo.client), topo.ipv6(&topo.client));
    let dir = topo.director();
    let (dir4, dir6) = (topo.ipv4(dir), topo.ipv6(dir));
    let reals4: Vec<&str> = topo.reals.iter().map(|r| topo.ipv4(r)).collect();
    let reals6: Vec<&str> = topo.reals.iter().map(|r| topo.ipv6(r)).collect();
    let dir_mtu = topo
        .host(dir)
        .main()
        .mtu
        .expect("the lab sets the director's MTU");
    all_answer(&url4, 150);
    all_answer(&url6, 60);
    // On the wire: UDP to the GUE port, one source port per flow (each GET a new connection).
    check_gue_on_the_wire(
        &format!("udp dst port {GUE_PORT} and src host {dir4}"),
        dir4,
        &reals4,
        || {
            LAB.spread(&url4, 20, || LAB.diagnostics());
        },
    );
    check_gue_on_the_wire(
        &format!("ip6 and udp dst port {GUE_PORT} and src host {dir6}"),
        dir6,
        &reals6,
        || {
            LAB.spread(&url6, 20, || LAB.diagnostics());
        },
    );
    // Path MTU through the larger header: 20 + 8 and 40 + 8 bytes.
    upload(&url4, "-4", vip4, client4, dir_mtu - 28, &file.0);
    upload(&url6, "-6", vip6, client6, dir_mtu - 48, &file.0);
    for real in &topo.reals {
        for vip in [vip4, vip6] {
            let report = realserver_check(real, vip, "gue");
            assert!(
                report.contains(&format!("expects GUE on UDP port {GUE_PORT} for {vip}")),
                "{real}: {report}"
            );
        }
    }
    // Pings of the VIPs, answered by the director's data path (no VIP on its stack).
    assert!(ping("-4", vip4), "ping {vip4}\n{}", LAB.diagnostics());
    assert!(ping("-6", vip6), "ping {vip6}\n{}", LAB.diagnostics());
    let page = LAB.metrics_page();
    assert!(
        metric(&page, "xlb_echo_replies_total").is_some_and(|n| n >= 6.0),
        "{page}"
    );
    // A GUE real whose server is gone refuses (in bare IP-in-IP); the director moves each
    // refused SYN to another real: no request fails.
    let pid = std::fs::read_to_string(&topo.servers["http-r1"].spawned.pid_file).unwrap();
    assert!(
        Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap()
            .success()
    );
    let (per_real, failed, _) = LAB.spread(&url4, 40, || LAB.diagnostics());
    assert_eq!(
        failed,
        0,
        "with r1's server gone: {per_real:?}\n{}",
        LAB.diagnostics()
    );
    assert!(!per_real.contains_key("r1"), "{per_real:?}");
    let page = LAB.metrics_page();
    assert!(
        metric(&page, "xlb_refusals_rescheduled_total").is_some_and(|n| n >= 1.0),
        "{page}"
    );
    drop(lab);

    // 2. The IPv4 service over IPv6 reals (4in6), bare and in GUE.
    for (options, gue) in [
        (&["--4in6"][..], false),
        (&["--4in6", "--encap", "gue"][..], true),
    ] {
        let lab = LAB.up_options(options);
        let topo = LAB.topology();
        assert_eq!(topo.service("web").tunnel4.as_deref(), Some("ipv6"));
        all_answer(&url4, 90);
        let (filter, overhead) = if gue {
            (
                format!("ip6 and udp dst port {GUE_PORT} and src host {dir6}"),
                48,
            )
        } else {
            (format!("ip6 proto 4 and src host {dir6}"), 40)
        };
        let lines = LAB.capture_real_segment(&filter, 20, || {
            LAB.spread(&url4, 10, || LAB.diagnostics());
        });
        if gue {
            let ports = gue_source_ports(&lines, dir6, &reals6);
            assert!(
                ports.len() >= 2,
                "4in6 GUE source ports {ports:?}: {lines:#?}"
            );
        } else {
            // tcpdump shows the inner IPv4 packet: "IP6 DIR6 > REAL6: IP CLIENT.P > VIP.80: ...".
            let inner = lines
                .iter()
                .filter(|l| {
                    l.contains(&format!("IP6 {dir6} > "))
                        && l.contains(&format!(": IP {client4}."))
                        && l.contains(&format!(" > {vip4}.80: "))
                })
                .count();
            assert!(
                inner >= 5,
                "no 4in6 packets on the real segment: {lines:#?}"
            );
        }
        upload(&url4, "-4", vip4, client4, dir_mtu - overhead, &file.0);
        drop(lab);
    }
    let left = text(&sh("ip", &["netns", "list"]));
    assert!(
        !left.contains(&topo.ns_prefix),
        "lab tun down left namespaces: {left}"
    );
}
