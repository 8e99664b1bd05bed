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
//!
//! The NAT paths (100,000 flows only) run on the NAT director of bench.rs, sized likewise:
//! requests of NAT and full-NAT flows, and their reals' replies (a reply found its flow unless
//! it passed untranslated).

use anyhow::{Result, bail, ensure};
use lb_common::Global;
use xlb::dataplane::{BALANCER_PROGRAM, PASS_PROGRAM};
use xlb_tests::{ACK, Frame, SYN, XDP_TX};

use crate::{
    bench_setup::{
        FULLNAT_VIP4, NAT_VIP4, balancer_with_capacity, nat_balancer_with_capacity, reply_to,
        verdict_name,
    },
    bench_stats::{ROUND, Stats, over, stats},
};

/// The flow counts, as they appear in `summary.json` keys.
pub const COUNTS: [(&str, usize); 2] = [("100k", 100_000), ("1m", 1_000_000)];

/// Which director a path runs on, and what its calls send.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The data-path bench's DR/TUN director: each flow's next request.
    Request,
    /// The NAT director: each flow's next request...
    NatRequest,
    /// ...or its real's reply.
    NatReply,
}

/// The established paths of bench.rs: (name, VIP, kind).
const PATHS: [(&str, &str, Kind); 8] = [
    ("dr_established_v4", "198.18.0.100", Kind::Request),
    ("dr_established_v6", "fd00:18::100", Kind::Request),
    ("tun_established_v4", "198.18.0.101", Kind::Request),
    ("tun_established_v6", "fd00:18::101", Kind::Request),
    ("nat_established_v4", NAT_VIP4, Kind::NatRequest),
    ("nat_reply_v4", NAT_VIP4, Kind::NatReply),
    ("fullnat_established_v4", FULLNAT_VIP4, Kind::NatRequest),
    ("fullnat_reply_v4", FULLNAT_VIP4, Kind::NatReply),
];

/// The NAT paths run at this many flows at most: the NAT reply table holds 262,144 (an LRU
/// beyond that evicts flows, which is not what these paths measure).
const NAT_MAX_FLOWS: usize = 100_000;

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
        for (path, vip, kind) in PATHS {
            if kind != Kind::Request && flows > NAT_MAX_FLOWS {
                continue;
            }
            let row = measure(&format!("{path}_{label}"), vip, kind, flows, calls)?;
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
pub fn client(i: usize, v6: bool) -> (String, u16) {
    let host = i / PORTS + 1;
    let port = (1024 + i % PORTS) as u16;
    if v6 {
        (format!("fd00:19::{host:x}"), port)
    } else {
        (format!("198.19.{}.{}", host >> 8, host & 0xff), port)
    }
}

fn measure(name: &str, vip: &str, kind: Kind, flows: usize, calls: usize) -> Result<FlowsRow> {
    let v6 = vip.contains(':');
    let capacity = flows as u32;
    let mut b = match kind {
        Kind::Request => balancer_with_capacity(capacity)?,
        Kind::NatRequest | Kind::NatReply => nat_balancer_with_capacity(capacity)?,
    };
    let dp = b.dataplane();
    eprintln!("{name}: establishing {flows} flows (connection table of {capacity})");
    let mut acks = Vec::with_capacity(flows);
    for i in 0..flows {
        let (addr, port) = client(i, v6);
        let syn = Frame::tcp(&addr, vip, port, 80, SYN).bytes();
        let (verdict, sent) = dp.test_run(BALANCER_PROGRAM, &syn)?;
        if verdict != XDP_TX {
            bail!(
                "{name}: SYN {i} returned {} ({})",
                verdict_name(verdict),
                drop_counts(dp)?
            );
        }
        acks.push(match kind {
            Kind::NatReply => reply_to(&sent),
            _ => Frame::tcp(&addr, vip, port, 80, ACK).bytes(),
        });
    }
    shuffle(&mut acks);
    let floor_frame = acks[0].clone();

    // One unrecorded round each: the programs' own code and the harness warm.
    for ack in acks.iter().take(ROUND) {
        dp.time_run(PASS_PROGRAM, &floor_frame)?;
        dp.time_run(BALANCER_PROGRAM, ack)?;
    }
    // A reply does not use the connection table: it misses when it finds no translation (and
    // passes).
    let miss = if kind == Kind::NatReply {
        Global::Passed
    } else {
        Global::ConnMiss
    };
    let misses_before = dp.global_counter(miss)?;
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
    let misses = dp.global_counter(miss)? - misses_before;
    ensure!(misses as usize <= calls, "{name}: more misses than calls");
    let (floor, raw) = (stats(floor), stats(path));
    Ok(FlowsRow {
        name: name.to_string(),
        floor,
        net: over(raw, floor),
        hit_ratio: 1.0 - misses as f64 / calls as f64,
    })
}

/// The data path's drop counters that are not 0 (`drop_snat_exhausted 1`, ...): why a frame
/// was dropped.
fn drop_counts(dp: &xlb::dataplane::Dataplane) -> Result<String> {
    let mut counts = Vec::new();
    for g in Global::ALL {
        if g.name().starts_with("drop_") {
            let n = dp.global_counter(g)?;
            if n != 0 {
                counts.push(format!("{} {n}", g.name()));
            }
        }
    }
    Ok(counts.join(", "))
}

/// Fisher-Yates with a fixed-seed xorshift: the same order in every run.
pub fn shuffle<T>(v: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
