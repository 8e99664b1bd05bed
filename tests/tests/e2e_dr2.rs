//! End-to-end: the two-arm lab (scripts/lab dr2 up), the kernel IPVS selftest's topology: the
//! client's network on the director's eth0, the reals' on its eth1, one xlb daemon attached to
//! both. Every request arrives on eth0 and leaves by XDP_REDIRECT into eth1 (DR and TUN); the
//! reals answer the client over their own leg on its network.
//!
//! One test function runs the scenarios in order: they share one lab (fixed namespace names).

use std::{path::Path, time::Duration};

use serde_json::Value;
use xlb_tests::lab::{
    Lab, assert_spread, metric, random_bytes, sh, sha256, text, wait_for, xlb_bin,
};

const LAB: Lab = Lab::new("dr2");
/// Each upload: many full-size segments, so path MTU discovery (TUN) and reordering show.
const UPLOAD_BYTES: usize = 300_000;

fn status() -> Value {
    serde_json::from_str(&LAB.xlb().ok(&["status", "--json"])).unwrap()
}

fn diagnostics() -> String {
    LAB.diagnostics()
}

#[test]
fn two_arm_lab_end_to_end() {
    let _lab = LAB.up();
    let topo = LAB.topology();
    let (client, dir) = (topo.client.as_str(), topo.director());
    let client_ip = topo.ipv4(client).to_string();
    let daemon = topo.daemon(dir).clone();
    assert_eq!(daemon.ifaces, ["eth0", "eth1"]);

    // Both arms attached; every real reached through the reals' arm.
    let st = status();
    let arms: Vec<&str> = st["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(arms, daemon.ifaces, "{st}");
    for svc in st["services"].as_array().unwrap() {
        for r in svc["reals"].as_array().unwrap() {
            assert_eq!(r["iface"], "eth1", "{r}");
            assert_eq!(r["state"], "up", "{r}");
        }
    }
    let page = metrics();
    for arm in ["eth0", "eth1"] {
        let series = format!("xlb_xdp_attach_info{{iface=\"{arm}\",mode=\"native\"}}");
        assert_eq!(metric(&page, &series), Some(1.0), "{series}\n{page}");
    }
    for real in topo.real_ipv4s() {
        let series = format!(
            "xlb_real_interface_info{{real=\"{real}\",service=\"{}\",iface=\"eth1\"}}",
            topo.service("web").addr4()
        );
        assert_eq!(metric(&page, &series), Some(1.0), "{series}\n{page}");
    }

    // DR and TUN spread over the three reals, the client's address intact.
    for name in ["web", "tunweb"] {
        let url = topo.service(name).url4();
        let (per_real, failed, clients) = LAB.spread(&url, 150, diagnostics);
        eprintln!("{name}: spread over reals {per_real:?}, failed {failed}");
        assert_eq!(failed, 0, "{name}: failed requests: {per_real:?}");
        assert_spread(&per_real, 3, 150);
        assert_eq!(clients, vec![client_ip.clone()], "{name}");
    }

    // Uploads of random bytes arrive whole and intact, in both modes.
    let file = topo.state_file("upload.bin");
    for round in 0..3 {
        std::fs::write(&file, random_bytes(UPLOAD_BYTES, round)).unwrap();
        let want = sha256(&file);
        for name in ["web", "tunweb"] {
            let url = topo.service(name).url4();
            let data = format!("@{file}");
            let answer = LAB
                .curl("10", &["-H", "Expect:", "--data-binary", &data, &url])
                .unwrap_or_else(|| panic!("{name}: upload {round} failed\n{}", diagnostics()));
            let words: Vec<&str> = answer.split_whitespace().collect();
            assert_eq!(
                words[1..],
                [client_ip.as_str(), &UPLOAD_BYTES.to_string(), &want],
                "{name}: upload {round}: {answer}"
            );
        }
    }

    // Failover: r2's server dies; its refusals move new connections to the others at once,
    // and r2 is taken down.
    let r2 = topo.reals[1].as_str();
    let server = &topo.server_on(r2, 80).spawned;
    let pid = std::fs::read_to_string(&server.pid_file).unwrap();
    assert!(sh("kill", &[pid.trim()]).status.success());
    wait_for("r2's server to stop", Duration::from_secs(5), || {
        !Path::new(&format!("/proc/{}", pid.trim())).exists()
    });
    for name in ["web", "tunweb"] {
        let url = topo.service(name).url4();
        let (per_real, failed, _) = LAB.spread(&url, 60, diagnostics);
        eprintln!("{name} without r2's server: {per_real:?}, failed {failed}");
        assert_eq!(failed, 0, "{name}: {per_real:?}\n{}", diagnostics());
        assert!(!per_real.contains_key(r2), "{name}: {per_real:?}");
    }

    // Restart: the pinned data path keeps forwarding on both arms, and a new daemon adopts
    // both links.
    let web = topo.service("web").url4();
    LAB.kill_daemon("TERM");
    assert!(LAB.get(&web).is_some(), "no forwarding without the daemon");
    let log = LAB.restart(&["--iface", "eth0", "--iface", "eth1"], "restart-both");
    assert_eq!(
        log.matches("program replaced atomically").count(),
        2,
        "{log}"
    );
    wait_for("the reals to resolve", Duration::from_secs(10), || {
        !LAB.xlb().ok(&["status"]).contains("unresolved")
    });
    assert!(LAB.get(&web).is_some(), "{}", diagnostics());

    // An arm left out on restart is detached, and its reals are no longer forwarded to.
    LAB.kill_daemon("TERM");
    let log = LAB.restart(&["--iface", "eth0"], "restart-one");
    assert!(log.contains("interface no longer listed"), "{log}");
    assert!(!has_xdp("eth1"));
    assert!(has_xdp("eth0"));
    wait_for(
        "the reals to go unresolved",
        Duration::from_secs(10),
        || {
            status()["services"][0]["reals"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["state"] == "unresolved")
        },
    );
    let r = &status()["services"][0]["reals"][0];
    assert_eq!(
        r["next_hop"], "via an interface xlb is not attached to",
        "{r}"
    );

    // `xlb detach` names the first arm, and takes the data path off every arm.
    LAB.kill_daemon("TERM");
    let restarted = LAB.restart(&["--iface", "eth0", "--iface", "eth1"], "restart-again");
    assert!(
        restarted.contains("XDP program attached iface=eth1"),
        "{restarted}"
    );
    LAB.kill_daemon("TERM");
    let detach =
        |arm: &str| LAB.in_dir_netns(&[xlb_bin().to_str().unwrap(), "detach", "--iface", arm]);
    let refused = detach("eth1");
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("xlb detach --iface eth0"),
        "{}",
        text(&refused)
    );
    let done = detach("eth0");
    assert!(done.status.success(), "{}", text(&done));
    // Every pinned map and the two arms' XDP links.
    let pins = format!("removed {} pins", xlb::dataplane::PINNED_MAPS.len() + 2);
    assert!(text(&done).contains(&pins), "{}", text(&done));
    assert!(!has_xdp("eth0") && !has_xdp("eth1"));
    assert!(
        LAB.get(&web).is_none(),
        "the VIP is still served after detach"
    );
}

/// The director's /metrics page.
fn metrics() -> String {
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
            "--noproxy",
            "*",
            &topo.daemon(dir).metrics_url(),
        ],
    );
    text(&out)
}

fn has_xdp(arm: &str) -> bool {
    let topo = LAB.topology();
    let link = sh("ip", &["-n", topo.ns(topo.director()), "link", "show", arm]);
    text(&link).contains("xdp")
}
