//! `cargo xtask bench`: the established paths as traffic looks, with many flows. The hot paths
//! of bench.rs run one flow in a loop, which keeps its connection-table entry in cache; here
//! 100,000 (and 1,000,000) flows are established first, and each call is the next packet of a
//! different flow, in random order, so the table's memory misses are paid as on a busy
//! director.
//!
//! Each (path, flow count) gets a balancer of its own whose connection table is sized for the
//! flows (`--conn-capacity` = flows), and is measured in rounds against the empty program, as
//! bench.rs does. The data path's connection-table miss counter tells what share of calls
//! found their flow (a flow whose bucket overflowed misses, is scheduled again and takes the
//! entry of another).

use anyhow::{Result, bail, ensure};
use lb_common::Global;
use xlb::dataplane::{BALANCER_PROGRAM, PASS_PROGRAM};
use xlb_tests::{ACK, Frame, SYN, XDP_TX};

use crate::{
    bench_setup::{balancer_with_capacity, verdict_name},
    bench_stats::{ROUND, Stats, over, stats},
};

/// The flow counts, as they appear in `summary.json` keys.
pub const COUNTS: [(&str, usize); 2] = [("100k", 100_000), ("1m", 1_000_000)];

/// The established paths of bench.rs: (name, VIP).
const PATHS: [(&str, &str); 4] = [
    ("dr_established_v4", "198.18.0.100"),
    ("dr_established_v6", "fd00:18::100"),
    ("tun_established_v4", "198.18.0.101"),
    ("tun_established_v6", "fd00:18::101"),
];

/// Source ports per client address.
const PORTS: usize = 60_000;

/// One path with many flows.
pub struct FlowsRow {
    /// `dr_established_v4_100k`, ...
    pub name: String,
    pub floor: Stats,
    /// Over the floor.
    pub net: Stats,
    /// Calls that found their flow in the connection table, of all calls.
    pub hit_ratio: f64,
}

/// Measures every established path with each flow count of `counts`, `calls` calls each.
pub fn run(calls: usize, counts: &[(&'static str, usize)]) -> Result<Vec<FlowsRow>> {
    let mut rows = Vec::new();
    for &(label, flows) in counts {
        for (path, vip) in PATHS {
            let row = measure(&format!("{path}_{label}"), vip, flows, calls)?;
            println!(
                "{:<26} {:>8} {:>8} {:>12} {:>12}   {:.4} of calls hit their flow",
                row.name,
                row.floor.median + row.net.median,
                row.floor.p99 + row.net.p99,
                row.net.median,
                row.net.p99,
                row.hit_ratio
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The client of flow `i`: one address per `PORTS` flows, from 198.19.0.0/16 or fd00:19::/64.
fn client(i: usize, v6: bool) -> (String, u16) {
    let host = i / PORTS + 1;
    let port = (1024 + i % PORTS) as u16;
    if v6 {
        (format!("fd00:19::{host:x}"), port)
    } else {
        (format!("198.19.{}.{}", host >> 8, host & 0xff), port)
    }
}

fn measure(name: &str, vip: &str, flows: usize, calls: usize) -> Result<FlowsRow> {
    let v6 = vip.contains(':');
    let capacity = flows as u32;
    let mut b = balancer_with_capacity(capacity)?;
    let dp = b.dataplane();
    eprintln!("{name}: establishing {flows} flows (connection table of {capacity})");
    let mut acks = Vec::with_capacity(flows);
    for i in 0..flows {
        let (addr, port) = client(i, v6);
        let syn = Frame::tcp(&addr, vip, port, 80, SYN).bytes();
        let (verdict, _) = dp.test_run(BALANCER_PROGRAM, &syn)?;
        if verdict != XDP_TX {
            bail!("{name}: SYN {i} returned {}", verdict_name(verdict));
        }
        acks.push(Frame::tcp(&addr, vip, port, 80, ACK).bytes());
    }
    shuffle(&mut acks);
    let floor_frame = acks[0].clone();

    // One unrecorded round each: the programs' own code and the harness warm.
    for ack in acks.iter().take(ROUND) {
        dp.time_run(PASS_PROGRAM, &floor_frame)?;
        dp.time_run(BALANCER_PROGRAM, ack)?;
    }
    let misses_before = dp.global_counter(Global::ConnMiss)?;
    let (mut floor, mut path) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    let mut next = ROUND % flows;
    while path.len() < calls {
        let n = ROUND.min(calls - path.len());
        for _ in 0..n {
            floor.push(dp.time_run(PASS_PROGRAM, &floor_frame)?.as_nanos() as u64);
        }
        for _ in 0..n {
            path.push(dp.time_run(BALANCER_PROGRAM, &acks[next])?.as_nanos() as u64);
            next = (next + 1) % flows;
        }
    }
    let misses = dp.global_counter(Global::ConnMiss)? - misses_before;
    ensure!(misses as usize <= calls, "{name}: more misses than calls");
    let (floor, raw) = (stats(floor), stats(path));
    Ok(FlowsRow {
        name: name.to_string(),
        floor,
        net: over(raw, floor),
        hit_ratio: 1.0 - misses as f64 / calls as f64,
    })
}

/// Fisher-Yates with a fixed-seed xorshift: the same order in every run.
fn shuffle<T>(v: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
