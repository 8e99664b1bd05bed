//! End-to-end: the ECMP lab (scripts/lab ecmp up): a router running BIRD spreads the VIPs over
//! two directors, each running the xlb daemon with `--bgp-config` and its own BIRD; TUN to
//! three reals. Real HTTP traffic from the client namespace; the router's routes read from its
//! kernel; each director's share read from its own `xlb stats`.
//!
//! One test function runs the scenarios in order: they share one lab (fixed namespace names).
//! Run it under the shared lab lock (`flock /tmp/xlb-lab.lock cargo test --test e2e_ecmp`):
//! the recovery times it prints mean little while other labs load the CPUs.

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use xlb_tests::{
    ecmp::*,
    lab::{KillOnDrop, repo, sh, text, wait_for},
};

fn include_file(d: Director) -> String {
    let topo = LAB.topology();
    let file = topo.daemon(d.0).bgp_config.clone().unwrap();
    std::fs::read_to_string(file).unwrap_or_default()
}

fn announces(d: Director, vip: &str) -> bool {
    include_file(d).contains(&format!("route {vip}/32 blackhole;"))
}

fn pid(pid_file: &str) -> String {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .to_string()
}

/// `n` GETs, each on a new connection (a new client port): answers per real, failures.
fn requests(vip: &str, n: usize) -> (BTreeMap<String, usize>, usize) {
    let (per_real, failed, _) = LAB.spread(&url(vip), n, diagnostics);
    (per_real, failed)
}

/// A command to one of the lab's BIRDs (rt, d1, d2) over its own control socket; its output.
fn birdc(name: &str, cmd: &str) -> String {
    let topo = LAB.topology();
    let sock = &topo.bgp.as_ref().unwrap().birds[name].socket;
    let mut args = vec!["5", "birdc", "-s", sock];
    args.extend(cmd.split_whitespace());
    let out = sh("timeout", &args);
    assert!(
        out.status.success(),
        "birdc {cmd} on {name}: {}",
        text(&out)
    );
    text(&out)
}

#[test]
fn ecmp_directors() {
    let _lab = LAB.up();
    let topo = LAB.topology();
    let (dir1, dir2) = directors(&topo);
    let (d1, d2) = (director(dir1), director(dir2));
    let (web_vip, alt_vip) = (&topo.service("web").vip4, &topo.service("alt").vip4);
    let (web, alt) = (&topo.service("web").addr4(), &topo.service("alt").addr4());
    let alt_check_port = topo.service("alt").check_port.unwrap();

    // --- The lab's starting point: one configuration on both directors, every VIP announced
    // by both and routed over both. ---
    let config1: Value = serde_json::from_str(&d1.ok(&["--json", "save"])).unwrap();
    let config2: Value = serde_json::from_str(&d2.ok(&["--json", "save"])).unwrap();
    assert_eq!(config1, config2, "xlb restore on d2 did not reproduce d1");
    for vip in [web_vip, alt_vip] {
        assert!(
            announces(dir1, vip) && announces(dir2, vip),
            "{}",
            diagnostics()
        );
        assert_eq!(router_hops(vip), [dir1.1, dir2.1], "{}", diagnostics());
    }
    // The kernel's own tables, slot by slot: d1 was configured through the CLI, d2 restored
    // d1's saved configuration (their backend ids may differ; the reals per slot may not).
    for service in [web, alt] {
        let (t1, t2) = (kernel_table(dir1, service), kernel_table(dir2, service));
        let mut per_real = BTreeMap::new();
        for a in &t1 {
            *per_real.entry(a.to_string()).or_insert(0) += 1;
        }
        let differing = t1.iter().zip(&t2).filter(|(a, b)| a != b).count();
        println!(
            "{service}: Maglev tables of d1 and d2 in the kernel: {} slots, {differing} differ; \
             slots per real {per_real:?}",
            t1.len()
        );
        assert_eq!(t1.len(), 65537);
        assert_eq!(per_real.len(), topo.reals.len(), "{per_real:?}");
        assert!(
            t1 == t2,
            "{differing} slots differ between d1 and d2 for {service}"
        );
    }

    // --- Spread: new connections from many client ports land on both directors. ---
    let (before1, before2) = (stats(dir1), stats(dir2));
    let (per_real, failed) = requests(web_vip, SPREAD_REQUESTS);
    let new1 = service_new_flows(&stats(dir1), web) - service_new_flows(&before1, web);
    let new2 = service_new_flows(&stats(dir2), web) - service_new_flows(&before2, web);
    println!(
        "spread: {SPREAD_REQUESTS} connections, {failed} failed; new flows d1 {new1}, d2 {new2}; reals {per_real:?}"
    );
    assert_eq!(failed, 0, "{per_real:?}\n{}", diagnostics());
    assert_eq!(per_real.len(), topo.reals.len(), "{per_real:?}");
    // Every connection is one new flow on exactly one director (a retransmitted SYN may
    // count twice).
    let total = (new1 + new2) as usize;
    assert!(
        (SPREAD_REQUESTS..SPREAD_REQUESTS + 10).contains(&total),
        "new flows d1 {new1} + d2 {new2} for {SPREAD_REQUESTS} connections"
    );
    for (name, n) in [("d1", new1), ("d2", new2)] {
        let share = n as f64 / total as f64;
        assert!(
            (0.3..=0.7).contains(&share),
            "{name} got {share:.2} of the connections (d1 {new1}, d2 {new2})"
        );
    }

    // --- Director loss: d1 goes dark (its switch port down: no packet in or out, no BGP
    // NOTIFICATION, no TCP FIN; the router learns it only from BFD). Long-lived connections
    // through it move to d2 and reach the same real: identical Maglev tables, no shared
    // connection state. ---
    let mut conns = open_connections(web_vip, CONNECTIONS, 40);
    lose_director(
        &mut conns,
        dir1,
        dir2,
        "director loss (BFD)",
        Duration::from_secs(4),
    );

    // d1 comes back: it announces again once its checks pass; the connections ECMP moves back
    // to it keep their real too.
    let back = Instant::now();
    link(dir1, "up");
    let returned = wait_hops(web_vip, &[dir1.1, dir2.1], Duration::from_secs(20));
    conns.run_for(Duration::from_secs(2));
    let alive = conns.survivors_after(back + returned);
    println!(
        "director back: routed over both again after {} ms; {} of {CONNECTIONS} connections \
         still on their real",
        ms(returned),
        alive.len()
    );
    assert!(conns.errors.is_empty(), "{:?}", conns.errors);
    assert_eq!(alive.len(), CONNECTIONS, "{}", diagnostics());
    drop(conns);

    // --- The same loss with BGP's hold timer (3 s) as the only detector: BFD off on every
    // BIRD (the sessions restart), then d2 goes dark. ---
    let birds = &topo.bgp.as_ref().unwrap().birds;
    for name in std::iter::once(topo.router()).chain(topo.directors.iter().map(String::as_str)) {
        let path = &birds[name].config;
        let conf = std::fs::read_to_string(path).unwrap();
        assert!(conf.contains("bfd on;"), "{conf}");
        std::fs::write(path, conf.replace("bfd on;", "")).unwrap();
        birdc(name, "configure");
    }
    wait_for("BGP sessions without BFD", Duration::from_secs(20), || {
        birdc(topo.router(), "show protocols")
            .matches("Established")
            .count()
            == topo.directors.len()
            && birdc(topo.router(), "show bfd sessions")
                .matches("Up")
                .count()
                == 0
    });
    wait_hops(web_vip, &[dir1.1, dir2.1], Duration::from_secs(20));
    let mut conns = open_connections(web_vip, CONNECTIONS, 40);
    lose_director(
        &mut conns,
        dir2,
        dir1,
        "director loss (hold timer only)",
        Duration::from_secs(8),
    );
    drop(conns);
    link(dir2, "up");
    wait_hops(web_vip, &[dir1.1, dir2.1], Duration::from_secs(20));
    wait_hops(alt_vip, &[dir1.1, dir2.1], Duration::from_secs(20));

    // --- Every real of a VIP down (alt's check port closed on every real): both directors
    // withdraw it, the router has no route left for it; web is untouched. ---
    for r in &topo.reals {
        let out = sh(
            "kill",
            &[
                "-TERM",
                &pid(&topo.server_on(r, alt_check_port).spawned.pid_file),
            ],
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let withdrawn = wait_hops(alt_vip, &[], Duration::from_secs(10));
    println!(
        "all reals of {alt} down: withdrawn from the router after {} ms",
        ms(withdrawn)
    );
    assert!(!announces(dir1, alt_vip) && !announces(dir2, alt_vip));
    assert_eq!(router_hops(web_vip), [dir1.1, dir2.1]);
    assert!(
        LAB.curl("1", &[&url(alt_vip)]).is_none(),
        "{alt} still answers"
    );
    let mut restarted = Vec::new();
    for r in &topo.reals {
        let child = Command::new("ip")
            .args(["netns", "exec", topo.ns(r), "python3"])
            .arg(repo().join("scripts/lab-http-server.py"))
            .args(["--name", r, "--port", &alt_check_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        restarted.push(KillOnDrop(child));
    }
    let announced = wait_hops(alt_vip, &[dir1.1, dir2.1], Duration::from_secs(10));
    println!(
        "{alt}'s reals back: routed over both directors again {} ms after the servers restarted",
        ms(announced)
    );
    let (per_real, failed) = requests(alt_vip, 30);
    assert_eq!(failed, 0, "{per_real:?}");

    // --- A service removed on one director: that director withdraws its VIP, the other keeps
    // serving all of it. ---
    d2.ok(&["service", "remove", alt]);
    wait_hops(alt_vip, &[dir1.1], Duration::from_secs(10));
    assert!(
        announces(dir2, web_vip) && !announces(dir2, alt_vip),
        "{}",
        include_file(dir2)
    );
    let before = service_new_flows(&stats(dir1), alt);
    let (per_real, failed) = requests(alt_vip, 30);
    let through_d1 = service_new_flows(&stats(dir1), alt) - before;
    println!("{alt} removed on d2: 30 connections, {failed} failed, {through_d1} through d1");
    assert_eq!(failed, 0, "{per_real:?}");
    assert_eq!(through_d1, 30);
    d2.ok(&["restore", topo.saved_config.as_ref().unwrap()]);
    wait_hops(alt_vip, &[dir1.1, dir2.1], Duration::from_secs(10));

    // --- A clean stop (SIGTERM) of d2's daemon: it withdraws every VIP before it exits;
    // connections through d2 move to d1 and keep their real. ---
    let mut conns = open_connections(web_vip, CONNECTIONS, 30);
    let stopped = Instant::now();
    let out = sh(
        "kill",
        &["-TERM", &pid(&topo.daemon(dir2.0).spawned.pid_file)],
    );
    assert!(out.status.success(), "{}", text(&out));
    let withdrawn = wait_hops(web_vip, &[dir1.1], Duration::from_secs(10));
    wait_hops(alt_vip, &[dir1.1], Duration::from_secs(10));
    conns.run_for(Duration::from_secs(3));
    let alive = conns.survivors_after(stopped + withdrawn);
    let stalled: Vec<Duration> = conns.stalled_after(stopped).iter().map(|s| s.1).collect();
    println!(
        "clean stop of d2's daemon: withdrawn from the router after {} ms; {} of {CONNECTIONS} \
         connections survive on their real; {} stalled{}",
        ms(withdrawn),
        alive.len(),
        stalled.len(),
        match stalled.iter().max() {
            Some(worst) => format!(", answering again after {} ms at worst", ms(*worst)),
            None => String::new(),
        }
    );
    assert!(
        !announces(dir2, web_vip) && !announces(dir2, alt_vip),
        "{}",
        include_file(dir2)
    );
    assert!(conns.errors.is_empty(), "{:?}", conns.errors);
    assert_eq!(alive.len(), CONNECTIONS, "{}", diagnostics());
}

/// Takes director `lost` dark under the long-lived connections, waits for the router to
/// route the web VIP over `kept` alone, lets the connections run for `settle`, prints the
/// figures, and checks that every connection survived on its real and that `kept` took over
/// each one that stalled (those through `lost`) as a flow it had never seen.
fn lose_director(
    conns: &mut Connections,
    lost: Director,
    kept: Director,
    what: &str,
    settle: Duration,
) {
    let web_vip = LAB.topology().service("web").vip4.clone();
    let miss_before = stats(kept)["global"]["conn_miss"].as_u64().unwrap();
    let t = Instant::now();
    link(lost, "down");
    let converged = wait_hops(&web_vip, &[kept.1], Duration::from_secs(10));
    conns.run_for(settle);
    let alive = conns.survivors_after(t + converged);
    let stalled: Vec<Duration> = conns.stalled_after(t).iter().map(|s| s.1).collect();
    let picked_up = stats(kept)["global"]["conn_miss"].as_u64().unwrap() - miss_before;
    println!(
        "{what}: {} of {CONNECTIONS} connections survive on their real; the router converged \
         in {} ms; {} connections stalled (those through {}) and answered again after {} ms \
         (median) / {} ms (worst); {} took over {picked_up} flows it had never seen",
        alive.len(),
        ms(converged),
        stalled.len(),
        lost.0,
        ms(median_of(&stalled)),
        ms(stalled.iter().max().copied().unwrap_or_default()),
        kept.0,
    );
    assert!(conns.errors.is_empty(), "{:?}", conns.errors);
    assert_eq!(alive.len(), CONNECTIONS, "{}", diagnostics());
    assert!(!stalled.is_empty(), "no connection went through {}", lost.0);
    assert!(
        picked_up >= stalled.len() as u64,
        "{} saw {picked_up} unknown flows, {} moved to it",
        kept.0,
        stalled.len()
    );
}
