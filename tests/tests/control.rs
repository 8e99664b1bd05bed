//! Control-plane failures: what the daemon says when it cannot start, and a configuration
//! replace that the kernel refuses half-way leaving the previous configuration in place.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use lb_common::MAX_BACKENDS;
use xlb::{
    config::{Config, MAX_REALS_PER_SERVICE, RealConfig, ServiceConfig},
    dataplane::BALANCER_PROGRAM,
};
use xlb_tests::*;

fn xlb_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/release/xlb")
}

/// Runs `xlb daemon` with a private socket and state file; it must fail, and its error is
/// returned (after checking it is one line).
fn daemon_error(netns: Option<&str>, args: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("xlb-control-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("xlb.sock");
    let state = dir.join("state.json");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(xlb_bin());
            c
        }
        None => Command::new(xlb_bin()),
    };
    cmd.arg("--socket")
        .arg(&socket)
        .arg("daemon")
        .arg("--state")
        .arg(&state);
    let out: Output = cmd.args(args).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "daemon {args:?} started");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("xlb: ")).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line: {err}");
    lines[0].to_string()
}

#[test]
fn daemon_refuses_an_unknown_interface() {
    assert!(xlb_bin().exists(), "build target/release/xlb first");
    let err = daemon_error(None, &["--iface", "xlb-nosuch0"]);
    assert!(err.contains("xlb-nosuch0"), "{err}");
}

#[test]
fn daemon_refuses_an_interface_given_twice_or_an_unknown_further_one() {
    assert!(xlb_bin().exists(), "build target/release/xlb first");
    let err = daemon_error(None, &["--iface", "lo", "--iface", "lo"]);
    assert!(err.contains("interface lo is given twice"), "{err}");
    let err = daemon_error(None, &["--iface", "lo", "--iface", "xlb-nosuch1"]);
    assert!(err.contains("xlb-nosuch1"), "{err}");
}

#[test]
fn daemon_refuses_a_connection_table_capacity_out_of_range() {
    assert!(xlb_bin().exists(), "build target/release/xlb first");
    let too_big = (lb_common::MAX_CONN_CAPACITY + 1).to_string();
    for bad in ["0", too_big.as_str()] {
        let err = daemon_error(None, &["--iface", "lo", "--conn-capacity", bad]);
        assert!(
            err.contains("--conn-capacity") && err.contains(bad),
            "{err}"
        );
    }
}

#[test]
fn daemon_refuses_connection_sync_without_a_good_key_or_peer() {
    assert!(xlb_bin().exists(), "build target/release/xlb first");
    let key = std::env::temp_dir().join(format!("xlb-control-sync-key-{}", std::process::id()));
    std::fs::write(&key, "too short\n").unwrap();
    let key = key.to_str().unwrap();
    let peer = ["--iface", "lo", "--sync-peer", "198.18.11.2"];
    let err = daemon_error(None, &peer);
    assert!(err.contains("--sync-peer needs --sync-key-file"), "{err}");
    let err = daemon_error(None, &[&peer[..], &["--sync-key-file", key]].concat());
    assert!(err.contains("fewer than 16"), "{err}");
    let err = daemon_error(
        None,
        &[&peer[..], &["--sync-key-file", "/nonexistent/xlb.key"]].concat(),
    );
    assert!(err.contains("/nonexistent/xlb.key"), "{err}");
    let err = daemon_error(None, &["--iface", "lo", "--sync-peer", "director-2"]);
    assert!(err.contains("director-2"), "{err}");
    let err = daemon_error(None, &["--iface", "lo", "--sync-key-file", key]);
    assert!(err.contains("--sync-peer"), "{err}");
    std::fs::remove_file(key).unwrap();
}

#[test]
fn daemon_that_cannot_attach_names_the_mode_it_tried() {
    assert!(xlb_bin().exists(), "build target/release/xlb first");
    // A namespace of our own: its loopback has no native XDP support.
    let ns = format!("xlb-test-attach-{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success()
    );
    let err = daemon_error(Some(&ns), &["--iface", "lo", "--xdp-mode", "native"]);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    assert!(err.contains("native") && err.contains("lo"), "{err}");
}

#[test]
fn a_replace_the_kernel_cannot_hold_leaves_the_previous_configuration() {
    let mut b = balancer();
    let reals = ["198.18.0.11", "198.18.0.12"];
    let mut svc = ServiceConfig::new("198.18.0.100:80/tcp".parse().unwrap());
    for r in reals {
        let addr: IpAddr = r.parse().unwrap();
        b.set_link(addr, Some(link(real_mac(addr)))).unwrap();
        svc.reals.push(RealConfig::new(addr, 100));
    }
    let before = Config {
        services: vec![svc],
    };
    b.replace(&before).unwrap();
    let syn = Frame::tcp("198.18.1.1", "198.18.0.100", 40000, 80, SYN).bytes();
    let (verdict, out) = b.dataplane().test_run(BALANCER_PROGRAM, &syn).unwrap();
    assert_eq!(verdict, XDP_TX);
    let chosen_mac = out[..6].to_vec();

    // Full services whose reals together exceed the backend table: valid on its own, but
    // the last service cannot be placed after the others.
    let per_service = MAX_REALS_PER_SERVICE as u32;
    let services = MAX_BACKENDS / per_service + 1;
    let big = |i: u32| {
        let mut s = ServiceConfig::new(format!("198.18.1.{}:80/tcp", i + 1).parse().unwrap());
        s.ring_size = 7;
        let base = u32::from_be_bytes([10, i as u8, 0, 0]);
        s.reals = (0..per_service)
            .map(|j| RealConfig::new(IpAddr::V4((base + j).into()), 1))
            .collect();
        s
    };
    let too_big = Config {
        services: (0..services).map(big).collect(),
    };
    too_big.validate().unwrap();
    let err = b.replace(&too_big).unwrap_err();
    assert!(format!("{err:#}").contains("no room"), "{err:#}");

    let after = b.config();
    let services: Vec<String> = after
        .services
        .iter()
        .map(|s| s.service.to_string())
        .collect();
    assert!(
        after == before,
        "the previous configuration is not back: {services:?}"
    );
    let (verdict, out) = b.dataplane().test_run(BALANCER_PROGRAM, &syn).unwrap();
    assert_eq!(verdict, XDP_TX, "the restored service does not forward");
    assert_eq!(out[..6], chosen_mac[..], "the flow moved to another real");
    let other = Frame::tcp("198.18.2.1", "198.18.1.1", 40000, 80, SYN).bytes();
    let (verdict, _) = b.dataplane().test_run(BALANCER_PROGRAM, &other).unwrap();
    assert_eq!(
        verdict, XDP_PASS,
        "a service of the refused configuration is live"
    );
}

/// The connection table as the control plane sees it through its mapping: flows written come
/// back by their keys; a bucket that gets more flows than it has entries keeps the ones seen
/// most recently, as the data path does.
#[test]
fn connection_table_round_trip_keeps_the_most_recent_flows_of_a_full_bucket() {
    use lb_common::{CONN_WAYS, ConnKey, ConnValue, FAMILY_V4, PROTO_TCP};
    use xlb::dataplane::{Dataplane, LoadOptions};
    let mut dp = Dataplane::load(&LoadOptions {
        conn_capacity: 16384,
        ..LoadOptions::default()
    })
    .unwrap();
    assert!(dp.conns().unwrap().is_empty());
    let buckets = dp.conn_capacity().unwrap() as usize;
    assert_eq!(buckets, 16384, "one bucket per flow asked");
    let flows: Vec<(ConnKey, ConnValue)> = (0..30_000u32)
        .map(|i| {
            let mut key = ConnKey {
                sport: (i as u16).to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                ..ConnKey::default()
            };
            key.src[..4].copy_from_slice(&[198, 18, 128, (i >> 16) as u8 + 1]);
            key.dst[..4].copy_from_slice(&[198, 18, 0, 100]);
            let value = ConnValue {
                backend_id: i as u16,
                generation: 1,
                last_seen_s: i + 1,
                ..ConnValue::default()
            };
            (key, value)
        })
        .collect();
    dp.insert_conns(&flows).unwrap();
    // Written in order of last_seen: each bucket keeps its last CONN_WAYS flows.
    let mut per_bucket = std::collections::HashMap::<usize, Vec<usize>>::new();
    for (i, (key, _)) in flows.iter().enumerate() {
        per_bucket
            .entry(key.hashes()[1] as usize & (buckets - 1))
            .or_default()
            .push(i);
    }
    let mut kept = vec![false; flows.len()];
    for members in per_bucket.values() {
        for &i in members.iter().rev().take(CONN_WAYS) {
            kept[i] = true;
        }
    }
    let held = kept.iter().filter(|&&k| k).count();
    assert!(
        (25_000..29_000).contains(&held),
        "{held} of 30000 flows fit (many buckets overflow at twice the capacity asked)"
    );
    assert_eq!(dp.conns().unwrap().len(), held);
    for ((key, value), kept) in flows.iter().zip(kept) {
        let back = dp.conn(key).unwrap();
        if kept {
            assert_eq!(back, Some(*value), "flow {}", u16::from_be(key.sport));
        } else {
            assert_eq!(
                back,
                None,
                "flow {} kept in a full bucket",
                u16::from_be(key.sport)
            );
        }
    }
}
