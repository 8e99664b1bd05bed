//! `cargo xtask bench`: per-packet cost of the XDP data path under BPF_PROG_TEST_RUN.
//!
//! `repeat = N` would rerun the program on its own output (a DR rewrite turns into a pass from
//! the second run on), so every sample is one call with repeat = 1. The empty program
//! (`xlb_pass`) is measured the same way in the same run and its median is the floor: the
//! syscall and test-run harness cost that every path pays. The real server's program
//! (`xlb_realserver`: decapsulation and refusals) is a second load of the same object, measured
//! against the same floor; its `real_*` paths are a DR real with refusals on, whose socket
//! lookups run in this process's network namespace (where the bench listens on the port).
//!
//! "Over the floor" subtracts the floor's statistic of the same rank: a path's median minus
//! the floor's median, its p99 minus the floor's p99 (the harness has a tail of its own).

use std::{fs, net::TcpListener, path::Path};

use anyhow::{Context, Result, bail};
use lb_common::{DEFAULT_GUE_PORT, VIP_F_DR, VIP_F_REFUSE, VipValue};
use serde_json::{Map, Value, json};
use xlb::{
    control::Balancer,
    dataplane::{BALANCER_PROGRAM, PASS_PROGRAM},
    realserver::{DECAP_PROGRAM, Decapsulator},
};
use xlb_tests::{
    ACK, DIRECTOR_MAC, Frame, SYN, XDP_PASS, XDP_TX, encapsulate, ip_len, outer_header,
    tunnel_header,
};

use crate::{
    bench_flows::{self, FlowsRow},
    bench_setup::{
        CLIENT4, CLIENT6, FULLNAT_VIP4, MTU, NAT_VIP4, ROUTER_MAC, TUN_REALS4, TUN_SRC4,
        balancer_with_services, establish, establish_nat, nat_balancer, pin_to_one_cpu,
        verdict_name,
    },
    bench_stats::{ROUND, Stats, over, stats},
};

pub const DEFAULT_CALLS: usize = 200_000;
pub const QUICK_CALLS: usize = 20_000;

/// One measured path: a program, the frame it runs on every call, and what it must return.
struct BenchPath {
    name: &'static str,
    /// A program of the balancer's load, or `DECAP_PROGRAM` (the decapsulator's load).
    program: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    /// Budget for the median over the floor, in ns.
    target_ns: Option<u64>,
}

/// One path's result.
pub struct Row {
    pub name: &'static str,
    /// As measured, harness included.
    pub raw: Stats,
    /// Over the floor: the program's own cost.
    pub net: Stats,
    pub target_ns: Option<u64>,
}

/// The data-path part of a run: the floor, then every path.
pub struct DataPath {
    pub calls: usize,
    pub cpu: usize,
    pub floor: Stats,
    pub rows: Vec<Row>,
    /// The established paths with many flows (bench_flows.rs).
    pub flows: Vec<FlowsRow>,
    /// The balancer program's size, translated and JIT-ed, in bytes.
    pub prog_xlated_bytes: u32,
    pub prog_jited_bytes: u32,
}

/// Measures every path and prints the table; then the established paths with each flow count
/// of `flow_counts`.
pub fn run(calls: usize, flow_counts: &[(&'static str, usize)]) -> Result<DataPath> {
    let cpu = pin_to_one_cpu()?;
    let mut progs = Programs {
        balancer: balancer_with_services()?,
        decap: Decapsulator::load()?,
        nat: nat_balancer()?,
    };
    progs.decap.add_vip("198.18.0.101".parse()?)?;
    progs.decap.add_vip("198.18.0.102".parse()?)?;
    progs.decap.set_gue_port(DEFAULT_GUE_PORT)?;
    // A DR real of 198.18.0.100 with refusals on, and a server listening on every address.
    let mut real_addr = [0; 16];
    real_addr[..4].copy_from_slice(&[198, 18, 0, 11]);
    progs.decap.add_vip_with(
        "198.18.0.100".parse()?,
        VipValue {
            real_addr,
            flags: VIP_F_REFUSE | VIP_F_DR,
        },
    )?;
    let listener = TcpListener::bind("0.0.0.0:0").context("listening for the real's paths")?;
    let mut paths = bench_paths(&mut progs.balancer, listener.local_addr()?.port())?;
    paths.extend(nat_paths(&mut progs.nat)?);
    check_verdicts(&mut progs, &paths)?;

    eprintln!(
        "measuring {} paths, {calls} calls each, pinned to CPU {cpu}",
        paths.len()
    );
    let samples = measure(&mut progs, &paths, calls)?;
    let stats: Vec<Stats> = samples.into_iter().map(stats).collect();
    let floor = stats[0];
    let rows = paths
        .iter()
        .zip(&stats)
        .skip(1)
        .map(|(p, &raw)| Row {
            name: p.name,
            raw,
            net: over(raw, floor),
            target_ns: p.target_ns,
        })
        .collect();
    let (prog_xlated_bytes, prog_jited_bytes) =
        progs.balancer.dataplane().program_sizes(BALANCER_PROGRAM)?;
    let mut dp = DataPath {
        calls,
        cpu,
        floor,
        rows,
        flows: Vec::new(),
        prog_xlated_bytes,
        prog_jited_bytes,
    };
    print_table(&dp);
    drop(listener);
    drop(progs);
    println!(
        "{BALANCER_PROGRAM}: {prog_xlated_bytes} bytes translated, {prog_jited_bytes} JIT-ed\n\n\
         established paths with many flows, each call a different flow in random order:\n\
         {:<26} {:>8} {:>8} {:>12} {:>12}",
        "path", "median", "p99", "median-floor", "p99-floor"
    );
    dp.flows = bench_flows::run(calls, flow_counts)?;
    print_over_dr(&dp, &NAT_PATHS, "_100k", NAT_GOAL);
    Ok(dp)
}

/// Where `cargo xtask bench` writes its results.
pub fn out_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

/// Writes `summary.json` afresh (later stages of the run add their own keys to it).
pub fn write_summary(dp: &DataPath) -> Result<()> {
    let out = out_dir().join("summary.json");
    fs::create_dir_all(out_dir())?;
    let summary = summary_json(dp)?;
    // Atomic: a reader never sees half a file.
    let tmp = out.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.canonicalize()?.display());
    Ok(())
}

/// The three loads a run measures.
struct Programs {
    balancer: Balancer,
    decap: Decapsulator,
    /// A NAT director (`NAT_DIRECTOR` paths): NAT services only.
    nat: Balancer,
}

/// The balancer program of the NAT director's load, as a `BenchPath::program`.
const NAT_DIRECTOR: &str = "xlb_balancer (NAT director)";

impl Programs {
    fn test_run(&mut self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        match program {
            DECAP_PROGRAM => self.decap.test_run(frame),
            NAT_DIRECTOR => self.nat.dataplane().test_run(BALANCER_PROGRAM, frame),
            _ => self.balancer.dataplane().test_run(program, frame),
        }
    }

    fn time_run(&mut self, program: &str, frame: &[u8]) -> Result<std::time::Duration> {
        match program {
            DECAP_PROGRAM => self.decap.time_run(frame),
            NAT_DIRECTOR => self.nat.dataplane().time_run(BALANCER_PROGRAM, frame),
            _ => self.balancer.dataplane().time_run(program, frame),
        }
    }
}

/// The paths, floor first. Established paths get their flow into the connection table here.
/// `listening`: a port with a listener, for the real's SYN path.
fn bench_paths(b: &mut Balancer, listening: u16) -> Result<Vec<BenchPath>> {
    let pass_v4 = Frame::tcp(CLIENT4, "198.18.0.2", 40000, 22, SYN).bytes();
    let pass_v6 = Frame::tcp(CLIENT6, "fd00:18::2", 40000, 22, SYN).bytes();
    let syn_v4 = Frame::tcp(CLIENT4, "198.18.0.100", 40001, 80, SYN).bytes();
    let established_v4 = establish(b, CLIENT4, "198.18.0.100", 40002)?;
    let established_v6 = establish(b, CLIENT6, "fd00:18::100", 40002)?;
    let tun_syn_v4 = Frame::tcp(CLIENT4, "198.18.0.101", 40001, 80, SYN).bytes();
    let tun_established_v4 = establish(b, CLIENT4, "198.18.0.101", 40002)?;
    let tun_established_v6 = establish(b, CLIENT6, "fd00:18::101", 40002)?;
    let gue_established_v4 = establish(b, CLIENT4, "198.18.0.102", 40002)?;
    let gue_established_v6 = establish(b, CLIENT6, "fd00:18::102", 40002)?;
    let tun4in6_established = establish(b, CLIENT4, "198.18.0.103", 40002)?;
    // Ping a VIP: answered by the data path (xlb_icmp, after the tail call).
    let echo_v4 = Frame::icmp(CLIENT4, "198.18.0.100", 8, 0, [0, 1, 0, 1], &[0x5a; 56]).bytes();
    // A full-size segment of the established TUN flow, with DF: too big once encapsulated, so
    // the director answers with ICMP "fragmentation needed" (before any flow lookup).
    let too_big_v4 = Frame {
        df: true,
        payload: vec![0; MTU as usize - 40 + 1],
        ..Frame::tcp(CLIENT4, "198.18.0.101", 40002, 80, ACK)
    }
    .bytes();
    // What a real server receives for the established IPv4 TUN flow.
    let decap_v4 = {
        let outer = outer_header(
            TUN_SRC4.parse()?,
            TUN_REALS4[0].parse()?,
            0,
            0,
            ip_len(&tun_established_v4[14..]),
        );
        encapsulate(&tun_established_v4, ROUTER_MAC, DIRECTOR_MAC, &outer)
    };
    // The same for the established IPv4 GUE flow.
    let decap_gue_v4 = {
        let l3 = &gue_established_v4[14..];
        let outer = tunnel_header(
            TUN_SRC4.parse()?,
            TUN_REALS4[0].parse()?,
            0,
            0,
            &l3[..ip_len(l3)],
            Some((0xc123, DEFAULT_GUE_PORT)),
        );
        encapsulate(&gue_established_v4, ROUTER_MAC, DIRECTOR_MAC, &outer)
    };
    // What a DR real receives: a SYN to a port with a listener (looked up, passed), a packet of
    // an established connection (passed without a lookup), a SYN to a port without one
    // (refused: back to the director in IPIP), traffic for no VIP.
    let real_syn_listener = Frame::tcp(CLIENT4, "198.18.0.100", 40001, listening, SYN).bytes();
    let real_established = Frame::tcp(CLIENT4, "198.18.0.100", 40002, listening, ACK).bytes();
    let closed = TcpListener::bind("0.0.0.0:0")?.local_addr()?.port();
    let real_refusal = Frame::tcp(CLIENT4, "198.18.0.100", 40003, closed, SYN).bytes();
    let real_non_vip = Frame::tcp(CLIENT4, "198.18.0.11", 40004, 22, ACK).bytes();

    let path = |name, program, frame, verdict, target_ns| BenchPath {
        name,
        program,
        frame,
        verdict,
        target_ns,
    };
    Ok(vec![
        path("floor", PASS_PROGRAM, pass_v4.clone(), XDP_PASS, None),
        path("pass_v4", BALANCER_PROGRAM, pass_v4, XDP_PASS, Some(30)),
        path("pass_v6", BALANCER_PROGRAM, pass_v6, XDP_PASS, Some(30)),
        path("dr_syn_v4", BALANCER_PROGRAM, syn_v4, XDP_TX, Some(150)),
        path(
            "dr_established_v4",
            BALANCER_PROGRAM,
            established_v4,
            XDP_TX,
            Some(80),
        ),
        path(
            "dr_established_v6",
            BALANCER_PROGRAM,
            established_v6,
            XDP_TX,
            Some(80),
        ),
        path(
            "tun_syn_v4",
            BALANCER_PROGRAM,
            tun_syn_v4,
            XDP_TX,
            Some(190),
        ),
        path(
            "tun_established_v4",
            BALANCER_PROGRAM,
            tun_established_v4,
            XDP_TX,
            Some(120),
        ),
        path(
            "tun_established_v6",
            BALANCER_PROGRAM,
            tun_established_v6,
            XDP_TX,
            Some(120),
        ),
        // GUE and 4in6: at most 1.15 times IPIP's budget.
        path(
            "gue_established_v4",
            BALANCER_PROGRAM,
            gue_established_v4,
            XDP_TX,
            Some(138),
        ),
        path(
            "gue_established_v6",
            BALANCER_PROGRAM,
            gue_established_v6,
            XDP_TX,
            Some(138),
        ),
        path(
            "tun4in6_established",
            BALANCER_PROGRAM,
            tun4in6_established,
            XDP_TX,
            Some(138),
        ),
        path("icmp_too_big", BALANCER_PROGRAM, too_big_v4, XDP_TX, None),
        path("echo_v4", BALANCER_PROGRAM, echo_v4, XDP_TX, None),
        path("decap_v4", DECAP_PROGRAM, decap_v4, XDP_PASS, Some(60)),
        path(
            "real_syn_listener_v4",
            DECAP_PROGRAM,
            real_syn_listener,
            XDP_PASS,
            None,
        ),
        path(
            "real_established_v4",
            DECAP_PROGRAM,
            real_established,
            XDP_PASS,
            None,
        ),
        path(
            "real_non_vip_v4",
            DECAP_PROGRAM,
            real_non_vip,
            XDP_PASS,
            None,
        ),
        path("real_refusal_v4", DECAP_PROGRAM, real_refusal, XDP_TX, None),
        path(
            "decap_gue_v4",
            DECAP_PROGRAM,
            decap_gue_v4,
            XDP_PASS,
            Some(69),
        ),
    ])
}

/// The NAT director's paths: requests of an established NAT and full-NAT flow, their replies,
/// and a full-NAT SYN (of a flow whose SNAT source is kept: a test run repeats one frame, so
/// every call after the first is that flow's SYN again, not a new flow's).
fn nat_paths(nat: &mut Balancer) -> Result<Vec<BenchPath>> {
    let (nat_ack, nat_reply) = establish_nat(nat, NAT_VIP4, 40002, None)?;
    let (fullnat_ack, fullnat_reply) = establish_nat(nat, FULLNAT_VIP4, 40002, None)?;
    let fullnat_syn = Frame::tcp(CLIENT4, FULLNAT_VIP4, 40001, 80, SYN).bytes();
    let path = |name, frame| BenchPath {
        name,
        program: NAT_DIRECTOR,
        frame,
        verdict: XDP_TX,
        target_ns: None,
    };
    Ok(vec![
        path("nat_established_v4", nat_ack),
        path("nat_reply_v4", nat_reply),
        path("fullnat_syn_v4", fullnat_syn),
        path("fullnat_established_v4", fullnat_ack),
        path("fullnat_reply_v4", fullnat_reply),
    ])
}

fn check_verdicts(progs: &mut Programs, paths: &[BenchPath]) -> Result<()> {
    for p in paths {
        let (verdict, _) = progs.test_run(p.program, &p.frame)?;
        if verdict != p.verdict {
            bail!(
                "path {}: {} returned {}, expected {}",
                p.name,
                p.program,
                verdict_name(verdict),
                verdict_name(p.verdict)
            );
        }
    }
    Ok(())
}

/// `calls` single-run samples per path (ns), taken in round-robin rounds of `ROUND` calls.
fn measure(progs: &mut Programs, paths: &[BenchPath], calls: usize) -> Result<Vec<Vec<u64>>> {
    // One unrecorded round each, so the first recorded round does not pay for cold caches.
    for p in paths {
        for _ in 0..ROUND {
            progs.time_run(p.program, &p.frame)?;
        }
    }
    let mut samples: Vec<Vec<u64>> = paths.iter().map(|_| Vec::with_capacity(calls)).collect();
    let mut done = 0;
    while done < calls {
        let n = ROUND.min(calls - done);
        for (p, s) in paths.iter().zip(&mut samples) {
            for _ in 0..n {
                s.push(progs.time_run(p.program, &p.frame)?.as_nanos() as u64);
            }
        }
        done += n;
    }
    Ok(samples)
}

fn print_table(dp: &DataPath) {
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>12} {:>8}  status",
        "path", "median ns", "p99 ns", "median-floor", "p99-floor", "target"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "floor", dp.floor.median, dp.floor.p99, 0, 0, "-"
    );
    for r in &dp.rows {
        let (target, status) = match r.target_ns {
            Some(t) if r.net.median <= t && p99_ok(r.net) => (format!("<= {t}"), "ok"),
            Some(t) if r.net.median <= t => (format!("<= {t}"), "p99 > 2x median"),
            Some(t) => (format!("<= {t}"), "MISS"),
            None => ("-".into(), ""),
        };
        println!(
            "{:<20} {:>10} {:>10} {:>12} {:>12} {:>8}  {}",
            r.name, r.raw.median, r.raw.p99, r.net.median, r.net.p99, target, status
        );
    }
    for (paths, goal) in [
        (&REAL_SIDE_PATHS[..], REAL_SIDE_GOAL),
        (&NAT_PATHS[..], NAT_GOAL),
    ] {
        print_over_dr(dp, paths, "", goal);
    }
}

/// Prints `paths` (with `suffix`, a flow count) against the DR established path.
fn print_over_dr(dp: &DataPath, paths: &[&str], suffix: &str, goal: f64) {
    for (path, ratio) in over_dr_established(dp, paths, suffix) {
        let status = if ratio <= goal { "ok" } else { "MISS" };
        println!(
            "{path} / dr_established_v4{suffix} (over the floor): {ratio:.2} (goal <= {goal:.2})  {status}"
        );
    }
}

/// The real server's paths on traffic it does not refuse, against the director's DR
/// established path: the goal is at most 0.3 (the real's program must cost next to nothing on
/// the traffic it serves).
const REAL_SIDE_PATHS: [&str; 2] = ["real_established_v4", "real_non_vip_v4"];
const REAL_SIDE_GOAL: f64 = 0.3;
/// Each established NAT path, either direction, on a NAT director, against a DR-only
/// director's established path of the same run: the goal is at most 1.3.
const NAT_PATHS: [&str; 4] = [
    "nat_established_v4",
    "nat_reply_v4",
    "fullnat_established_v4",
    "fullnat_reply_v4",
];
const NAT_GOAL: f64 = 1.3;

/// `paths` against the DR established path, both over the floor, two decimals; with a flow
/// count's `suffix` ("_100k"), both with that many flows (bench_flows.rs).
fn over_dr_established(dp: &DataPath, paths: &[&str], suffix: &str) -> Vec<(String, f64)> {
    let net = |name: &str| {
        let hot = dp.rows.iter().find(|r| r.name == name).map(|r| r.net);
        let flows = dp.flows.iter().find(|f| f.name == name).map(|f| f.net);
        hot.or(flows).map(|net| net.median)
    };
    let Some(dr) = net(&format!("dr_established_v4{suffix}")).filter(|&ns| ns > 0) else {
        return Vec::new();
    };
    paths
        .iter()
        .filter_map(|path| {
            let name = format!("{path}{suffix}");
            let ratio = (net(&name)? as f64 / dr as f64 * 100.0).round() / 100.0;
            Some((name, ratio))
        })
        .collect()
}

/// The tail target: p99 within twice the median (both over the floor).
fn p99_ok(net: Stats) -> bool {
    net.p99 <= 2 * net.median
}

fn summary_json(dp: &DataPath) -> Result<Value> {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading the kernel release")?
        .trim()
        .to_string();
    let stats_json = |s: Stats| json!({ "median_ns": s.median, "p99_ns": s.p99 });
    let mut summary = Map::new();
    summary.insert("floor_ns".into(), json!(dp.floor.median));
    summary.insert("floor_p99_ns".into(), json!(dp.floor.p99));
    let (mut raw, mut ratios) = (Map::new(), Map::new());
    raw.insert("floor".into(), stats_json(dp.floor));
    for r in &dp.rows {
        summary.insert(r.name.into(), stats_json(r.net));
        raw.insert(r.name.into(), stats_json(r.raw));
        // Two decimals: the samples are whole nanoseconds.
        let ratio = (r.raw.median as f64 / dp.floor.median as f64 * 100.0).round() / 100.0;
        ratios.insert(r.name.into(), json!(ratio));
    }
    for f in &dp.flows {
        let mut figures = stats_json(f.net);
        figures["floor_ns"] = json!(f.floor.median);
        figures["hit_ratio"] = json!((f.hit_ratio * 1e4).round() / 1e4);
        summary.insert(f.name.clone(), figures);
    }
    summary.insert("prog_xlated_bytes".into(), json!(dp.prog_xlated_bytes));
    summary.insert("prog_jited_bytes".into(), json!(dp.prog_jited_bytes));
    summary.insert("ratios".into(), Value::Object(ratios));
    for (paths, suffix) in [
        (&REAL_SIDE_PATHS[..], ""),
        (&NAT_PATHS[..], ""),
        (&NAT_PATHS[..], "_100k"),
    ] {
        for (path, ratio) in over_dr_established(dp, paths, suffix) {
            summary.insert(format!("{path}_over_dr_established{suffix}"), json!(ratio));
        }
    }
    summary.insert("raw".into(), Value::Object(raw));
    summary.insert("calls_per_path".into(), json!(dp.calls));
    summary.insert("cpu".into(), json!(dp.cpu));
    summary.insert("kernel".into(), json!(kernel));
    summary.insert("cpu_model".into(), json!(cpu_model()));
    Ok(Value::Object(summary))
}

/// The CPU's model name from /proc/cpuinfo, for the record.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
