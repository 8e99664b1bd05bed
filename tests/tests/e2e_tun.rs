//! End-to-end: the TUN lab (scripts/lab tun up) with the real xlb daemon and the reals'
//! XDP decapsulator, real HTTP traffic from the client namespace through the router and the
//! director, checks of what each real server saw and of what crossed the real segment.
//!
//! One test function runs the scenarios in order: they share one lab (fixed namespace names),
//! so they must not run in parallel.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Output,
};

use xlb_tests::lab::{
    Lab, Topology, assert_spread, metric, promtool_check, repo, sh, text, xlb_bin,
};

/// The path-MTU upload: far more than one full-size segment.
const POST_BYTES: usize = 204_800;

const LAB: Lab = Lab::new("tun");

fn lab_script() -> String {
    repo().join("scripts/lab").display().to_string()
}

fn xlb_ok(args: &[&str]) -> String {
    LAB.xlb().ok(args)
}

/// `xlb realserver VERB --iface eth0 --vip VIP --mode tun` inside the real's namespace (with
/// the lab's state file for setup and teardown), bounded by `timeout 30`.
fn realserver(real: &str, verb: &str, vip: &str) -> Output {
    let topo = LAB.topology();
    let host = topo.host(real);
    let state = host.realserver_state.clone().unwrap();
    let bin = xlb_bin();
    let mut args = vec!["30", "ip", "netns", "exec", &host.ns, bin.to_str().unwrap()];
    args.extend([
        "realserver",
        verb,
        "--iface",
        host.main_name(),
        "--vip",
        vip,
        "--mode",
        &topo.service("web").mode,
    ]);
    if verb != "check" {
        args.extend(["--state", &state]);
    }
    sh("timeout", &args)
}

fn realserver_ok(real: &str, verb: &str, vip: &str) {
    let out = realserver(real, verb, vip);
    assert!(
        out.status.success(),
        "xlb realserver {verb} --vip {vip} on {real} failed: {}",
        text(&out)
    );
}

fn curl(max_time: &str, args: &[&str]) -> Option<String> {
    LAB.curl(max_time, args)
}

/// POSTs `file` (no `Expect: 100-continue` round trip) and returns the answer.
fn post(url: &str, file: &Path) -> Option<String> {
    let data = format!("@{}", file.display());
    curl("10", &["-H", "Expect:", "--data-binary", &data, url])
}

fn spread(url: &str, n: usize) -> (BTreeMap<String, usize>, usize, Vec<String>) {
    LAB.spread(url, n, diagnostics)
}

fn diagnostics() -> String {
    LAB.diagnostics()
}

/// Packets matching `filter` on the router's real-facing interface while `traffic` runs.
fn capture_real_segment(filter: &str, count: usize, traffic: impl FnOnce()) -> Vec<String> {
    LAB.capture_real_segment(filter, count, traffic)
}

/// The captured lines that show a tunnelled request: outer `src > one of reals`, inner
/// `client.PORT > vip.80`, as tcpdump prints IPIP and IP6IP6 ("IP a > b: IP c.p > d.80: ...",
/// "IP6 a > b: IP6 c.p > d.80: ..."; an extension header may sit between the two).
fn tunnelled(lines: &[String], src: &str, reals: &[&str], client: &str, vip: &str) -> usize {
    lines
        .iter()
        .filter(|line| {
            let Some((_, outer)) = line.split_once(&format!(" {src} > ")) else {
                return false;
            };
            let Some((dst, inner)) = outer.split_once(": ") else {
                return false;
            };
            reals.contains(&dst)
                && inner.contains(&format!(" {client}."))
                && inner.contains(&format!(" > {vip}.80: "))
        })
        .count()
}

/// `ip route get` (or `ip -6 route get`) from the client, with any cached path MTU.
fn client_route(family: &str, dst: &str) -> String {
    let topo = LAB.topology();
    let out = sh(
        "ip",
        &[
            "netns",
            "exec",
            topo.ns(&topo.client),
            "ip",
            family,
            "route",
            "get",
            dst,
        ],
    );
    assert!(out.status.success(), "ip route get {dst}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Whether the real's eth0 carries an XDP program.
fn real_has_xdp(real: &str) -> bool {
    let topo = LAB.topology();
    let host = topo.host(real);
    let out = sh(
        "ip",
        &[
            "-n",
            &host.ns,
            "-d",
            "link",
            "show",
            "dev",
            host.main_name(),
        ],
    );
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

/// Whether the real's lo holds `addr`.
fn real_has_vip(real: &str, addr: &str) -> bool {
    let out = sh("ip", &["-n", &LAB.ns(real), "addr", "show", "dev", "lo"]);
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/"))
}

fn tun_namespaces(topo: &Topology) -> Vec<String> {
    let out = sh("ip", &["netns", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&topo.ns_prefix))
        .map(str::to_string)
        .collect()
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn tun_lab_end_to_end() {
    assert!(
        xlb_bin().exists(),
        "build target/release/xlb first (scripts/test does)"
    );
    let lab = LAB.up();
    let topo = LAB.topology();
    let web = topo.service("web");
    let (vip4, vip6) = (web.vip4.as_str(), web.vip6());
    let (service4, service6) = (web.addr4(), web.addr6());
    let (url4, url6) = (web.url4(), web.url6());
    let (url4, url6) = (url4.as_str(), url6.as_str());
    let (client4, client6) = (topo.ipv4(&topo.client), topo.ipv6(&topo.client));
    // The director's own addresses: the tunnels' outer source.
    let dir = topo.director();
    let (tunnel_src4, tunnel_src6) = (topo.ipv4(dir), topo.ipv6(dir));
    // (name, IPv4, IPv6) of each real server.
    let reals: Vec<(&str, &str, &str)> = topo
        .reals
        .iter()
        .map(|r| (r.as_str(), topo.ipv4(r), topo.ipv6(r)))
        .collect();

    // The lab's own view: every process alive, every real prepared for both VIPs.
    let status = text(&sh(&lab_script(), &["tun", "status"]));
    for name in ["xlb", "xdp-pass", "http-r1", "http-r2", "http-r3"] {
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name) && l.ends_with("alive")),
            "{name} not alive:\n{status}"
        );
    }
    assert!(!status.contains("NOT prepared"), "{status}");

    // 1. 300 IPv4 requests all succeed, every real gets 20-47 %, and the reals see the
    // client's own address (the tunnel carries the client's packet unchanged).
    let (per_real, failed, clients) = spread(url4, 300);
    eprintln!("IPv4 spread over reals: {per_real:?}, failed {failed}");
    assert_eq!(
        failed,
        0,
        "failed requests: {per_real:?}\n{}",
        diagnostics()
    );
    assert_spread(&per_real, 3, 300);
    assert_eq!(
        clients,
        vec![client4.to_string()],
        "TUN must keep the client source"
    );

    // 2. The same over IPv6 (IP6IP6), with fewer requests.
    let (per_real, failed, clients) = spread(url6, 90);
    eprintln!("IPv6 spread over reals: {per_real:?}, failed {failed}");
    assert_eq!(
        failed,
        0,
        "failed requests: {per_real:?}\n{}",
        diagnostics()
    );
    assert_eq!(per_real.len(), 3, "every real answers: {per_real:?}");
    assert_eq!(clients, vec![client6.to_string()]);

    // 3. On the real segment the requests travel encapsulated: protocol 4 (IPIP) from the
    // director's tunnel source to a real, carrying the client's packet to the VIP; likewise
    // IPv6 in IPv6. Captured on the router's real-facing interface; at least 5 of the first
    // 10 packets captured must be such tunnelled requests (10 GETs make dozens).
    let reals4: Vec<&str> = reals.iter().map(|r| r.1).collect();
    let reals6: Vec<&str> = reals.iter().map(|r| r.2).collect();
    let lines = capture_real_segment(
        &format!("ip proto 4 and src host {tunnel_src4}"),
        10,
        || {
            spread(url4, 10);
        },
    );
    assert!(
        tunnelled(&lines, tunnel_src4, &reals4, client4, vip4) >= 5,
        "no IPIP packets {tunnel_src4} -> real on the real segment: {lines:#?}"
    );
    // Any IPv6 from the director: `ip6 proto 41` would miss a tunnel whose outer header
    // carries an extension header (RFC 2473's encapsulation limit), `tunnelled` reads past it.
    let lines = capture_real_segment(&format!("ip6 and src host {tunnel_src6}"), 10, || {
        spread(url6, 10);
    });
    assert!(
        tunnelled(&lines, tunnel_src6, &reals6, client6, vip6) >= 5,
        "no IP6IP6 packets {tunnel_src6} -> real on the real segment: {lines:#?}"
    );

    // 4. Path MTU: full-size client segments plus the tunnel header do not fit the
    // director's 1500-byte link. A 200 KB upload arrives whole only if the director's ICMP
    // "fragmentation needed" (IPv4, MTU 1480) / "packet too big" (IPv6, MTU 1460) reaches
    // the client and its TCP lowers its segment size; the client then caches that MTU.
    let file =
        TempFile(std::env::temp_dir().join(format!("xlb-tun-post-{}.bin", std::process::id())));
    let body: Vec<u8> = (0..POST_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file.0, body).unwrap();
    // The director's link MTU less the IPIP (20 bytes) or IP6IP6 (40 bytes) header.
    let dir_mtu = topo
        .host(dir)
        .main()
        .mtu
        .expect("the lab sets the director's MTU");
    let (mtu4, mtu6) = (
        format!("mtu {}", dir_mtu - 20),
        format!("mtu {}", dir_mtu - 40),
    );
    for (family, url, vip, client, mtu) in [
        ("-4", url4, vip4, client4, mtu4.as_str()),
        ("-6", url6, vip6, client6, mtu6.as_str()),
    ] {
        let before = client_route(family, vip);
        assert!(
            !before.contains("mtu"),
            "a path MTU is cached before the upload: {before}"
        );
        let answer = post(url, &file.0).unwrap_or_else(|| {
            panic!(
                "POST of {POST_BYTES} bytes to {url} failed\n{}",
                diagnostics()
            )
        });
        let words: Vec<&str> = answer.split_whitespace().collect();
        assert!(
            words.len() == 4
                && reals.iter().any(|r| r.0 == words[0])
                && words[1] == client
                && words[2] == POST_BYTES.to_string(),
            "POST to {url}: answer {answer:?}, want \"rN {client} {POST_BYTES}\""
        );
        let after = client_route(family, vip);
        assert!(
            after.contains(mtu),
            "the client has no cached {mtu} towards {vip}: {after}"
        );
    }
    drop(file);

    // 5. `xlb realserver check` passes on every prepared real. Taking r3 out of both
    // services and tearing it down leaves it unprepared (the check names each missing piece
    // on its own line) while the other reals keep answering; set up and added again, it
    // answers again.
    for &(real, _, _) in &reals {
        for vip in [vip4, vip6] {
            realserver_ok(real, "check", vip);
        }
        // Its report shows the decapsulator at work: every real took part of the traffic.
        let report = text(&realserver(real, "check", vip4));
        let decapsulated: u64 = report
            .split("decapsulated ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no decapsulated count in check on {real}: {report}"));
        assert!(decapsulated > 0, "{real} decapsulated nothing: {report}");
        // The same counters for Prometheus (node_exporter's textfile collector).
        let bin = xlb_bin();
        let iface = topo.host(real).main_name();
        let args = [
            "netns",
            "exec",
            topo.ns(real),
            bin.to_str().unwrap(),
            "realserver",
            "metrics",
            "--iface",
            iface,
        ];
        let page = text(&sh("ip", &args));
        promtool_check(&page);
        let series =
            format!("xlb_decap_packets_total{{iface=\"{iface}\",result=\"decapsulated\"}}");
        assert!(
            metric(&page, &series).is_some_and(|n| n >= decapsulated as f64),
            "{real}: {page}"
        );
        assert_eq!(
            metric(&page, &format!("xlb_decap_vips{{iface=\"{iface}\"}}")),
            Some(2.0)
        );
    }
    let (r3, r3_v4, r3_v6) = reals[2];
    xlb_ok(&["real", "remove", &service4, r3_v4]);
    xlb_ok(&["real", "remove", &service6, r3_v6]);
    realserver_ok(r3, "teardown", vip4);
    realserver_ok(r3, "teardown", vip6);
    assert!(
        !real_has_vip(r3, vip4),
        "{vip4} still on {r3}'s lo after teardown"
    );
    assert!(
        !real_has_vip(r3, vip6),
        "{vip6} still on {r3}'s lo after teardown"
    );
    assert!(
        !real_has_xdp(r3),
        "the decapsulator is still on {r3}'s eth0 after teardown"
    );
    for vip in [vip4, vip6] {
        let out = realserver(r3, "check", vip);
        let said = text(&out);
        let missing: Vec<&str> = said.lines().filter(|l| !l.trim().is_empty()).collect();
        eprintln!("check on torn-down {r3} for {vip}:\n{said}");
        assert!(
            !out.status.success(),
            "check passed on torn-down {r3} for {vip}"
        );
        // At least the VIP on lo and the decapsulator are gone, one line each.
        assert!(
            missing.len() >= 2,
            "check on torn-down {r3} for {vip}: want one line per missing piece, got: {said}"
        );
    }
    for url in [url4, url6] {
        let (per_real, failed, _) = spread(url, 60);
        assert_eq!(failed, 0, "{url}: {per_real:?}\n{}", diagnostics());
        assert!(
            !per_real.contains_key(r3),
            "{r3} still got requests: {per_real:?}"
        );
    }
    realserver_ok(r3, "setup", vip4);
    realserver_ok(r3, "setup", vip6);
    realserver_ok(r3, "check", vip4);
    realserver_ok(r3, "check", vip6);
    assert!(
        real_has_vip(r3, vip4) && real_has_xdp(r3),
        "{r3} not set up again"
    );
    xlb_ok(&["real", "add", &service4, r3_v4]);
    xlb_ok(&["real", "add", &service6, r3_v6]);
    for url in [url4, url6] {
        let (per_real, failed, _) = spread(url, 60);
        assert_eq!(failed, 0, "{url}: {per_real:?}\n{}", diagnostics());
        assert!(
            per_real.contains_key(r3),
            "{r3} got nothing after re-adding: {per_real:?}"
        );
    }

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
    for &(_, real, _) in &reals {
        let series = format!("xlb_real_packets_total{{real=\"{real}\",service=\"{service4}\"}}");
        assert!(
            metric(&page, &series).is_some_and(|v| v > 0.0),
            "metrics lack traffic on {series}:\n{page}"
        );
    }
    // The upload got ICMP "too big" answers, and the page passes promtool.
    assert!(
        metric(&page, "xlb_icmp_too_big_sent_total").is_some_and(|v| v > 0.0),
        "{page}"
    );
    promtool_check(&page);

    // 6. `down` leaves no namespace and no state behind.
    drop(lab);
    let left = tun_namespaces(&topo);
    assert!(left.is_empty(), "lab tun down left namespaces: {left:?}");
    assert!(
        !Path::new(&topo.state_dir).exists(),
        "lab tun down left {}",
        topo.state_dir
    );
}
