//! `cargo xtask bench`, control plane: Maglev table builds, one real change applied to a live
//! service, a `restore` of 1,000 services x 10 reals, the kernel memory the maps take, and a
//! `/metrics` scrape of that configuration.
//!
//! Everything goes through the code the daemon runs (`Balancer` over a real `Dataplane` loaded
//! in the kernel), without a daemon or an interface: the program need not be attached for its
//! maps to be written and read.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_common::{ConnEntry, ConnKey, ConnValue, DEFAULT_CONN_CAPACITY, FAMILY_V4, PROTO_TCP};
use serde_json::{Value, json};
use xlb::{
    config::{Config, Proto, RealConfig, ServiceAddr, ServiceConfig},
    control::{Balancer, active_flows},
    daemon::{checks::Checks, metrics},
    dataplane::{BALANCER_PROGRAM, Dataplane, LoadOptions},
    maglev::{self, Member},
};
use xlb_tests::{DIRECTOR_MAC, Frame, SYN, TEST_IFINDEX, XDP_TX, link, real_mac};

/// The largest ring `--ring-size` accepts: above 100 x 1,000 reals, as Maglev's paper advises.
const LARGE_RING: u32 = maglev::MAX_SIZE;
const SERVICES: usize = 1_000;
const REALS_PER_SERVICE: usize = 10;
/// Flows in the connection table while scraping (every one recent, so all are counted).
const SCRAPE_FLOWS: usize = 100_000;
/// SYNs sent to each service before every scrape (always the same flows), so that a scrape
/// reads counters that moved since the last one, as under production traffic: about 88 % of
/// the reals get at least one (1 - 0.9^20).
const TRAFFIC_SYNS_PER_SERVICE: usize = 20;
const CONN_FLOWS: usize = 1 << 20;

const TARGET_CHANGE_MS: f64 = 10.0;
const TARGET_RESTORE_S: f64 = 5.0;
const TARGET_CONNS_MIB: f64 = 128.0;
const TARGET_SCRAPE_MS: f64 = 100.0;

pub fn run(quick: bool) -> Result<Value> {
    let reps = if quick { 3 } else { 11 };
    println!("\ncontrol plane{}", if quick { " (quick)" } else { "" });
    // One CPU, as the data-path part does: CPU times are then one CPU's.
    crate::bench_setup::pin_to_one_cpu()?;
    // The connection table first: its memory cross-check reads /proc/meminfo, which the maps
    // of the later steps would still move while the kernel frees them.
    let conns = conn_table_memory()?;
    let builds = maglev_builds(reps)?;
    let changes = live_changes(if quick { 10 } else { 50 })?;
    let (restore, memory, scrape) = restore_memory_scrape(if quick { 1 } else { 7 })?;
    Ok(json!({
        "maglev_build_ms": builds,
        "real_change_ms": changes,
        "restore": restore,
        "memory": memory,
        "conn_table": conns,
        "scrape": scrape,
    }))
}

/// How long something took: on the wall clock, and on this thread's CPU clock (user and
/// kernel time, syscalls included). The CPU figure is what the work costs; the wall figure
/// also holds the time other processes had the CPU, which on a busy 2-core machine can be
/// several times more. Targets are judged on the CPU figure.
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Took)> {
    let (wall, cpu) = (Instant::now(), thread_cpu());
    let out = f()?;
    let took = Took {
        wall: wall.elapsed(),
        cpu: thread_cpu() - cpu,
    };
    Ok((out, took))
}

/// Medians (CPU, wall) of a few timings, in ms with 3 decimals.
fn medians_ms(samples: &[Took]) -> (f64, f64) {
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        ms(v[v.len() / 2])
    };
    (
        median(samples.iter().map(|t| t.cpu).collect()),
        median(samples.iter().map(|t| t.wall).collect()),
    )
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "MISS" }
}

/// Real number `i` (0-based) of the bench's 198.19.0.0/16.
fn real_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 19, (i / 256) as u8, (i % 256) as u8))
}

/// Service number `i`: VIPs in 198.18.0.0/16 (from .1.0 up), port 80/tcp.
fn service_addr(i: usize) -> ServiceAddr {
    let host = 256 + i;
    ServiceAddr {
        vip: IpAddr::V4(Ipv4Addr::new(
            198,
            18,
            (host / 256) as u8,
            (host % 256) as u8,
        )),
        port: 80,
        proto: Proto::Tcp,
    }
}

fn maglev_builds(reps: usize) -> Result<Value> {
    println!(
        "{:<34} {:>12} {:>12}",
        "Maglev table build (CPU)", "ring 65537", "ring 1048573"
    );
    let mut out = serde_json::Map::new();
    for reals in [10, 100, 1_000] {
        let members: Vec<Member> = (0..reals)
            .map(|i| Member {
                addr: real_addr(i),
                weight: 100,
                id: i as u32,
            })
            .collect();
        let mut row = serde_json::Map::new();
        for size in [maglev::DEFAULT_SIZE, LARGE_RING] {
            let samples: Vec<Took> = (0..reps)
                .map(|_| timed(|| Ok(std::hint::black_box(maglev::build_table(&members, size)))))
                .map(|r| r.map(|(_, took)| took))
                .collect::<Result<_>>()?;
            row.insert(size.to_string(), json!(medians_ms(&samples).0));
        }
        println!(
            "{:<34} {:>9} ms {:>9} ms",
            format!("  {reals} reals"),
            row["65537"],
            row[&LARGE_RING.to_string()]
        );
        out.insert(format!("{reals}_reals"), Value::Object(row));
    }
    Ok(Value::Object(out))
}

/// A balancer on a freshly loaded program, every real of the bench's range with a MAC (so all
/// of them get slots).
fn loaded_balancer(conn_capacity: u32, reals: usize) -> Result<Balancer> {
    let dp = Dataplane::load(&LoadOptions {
        conn_capacity,
        ..LoadOptions::default()
    })?;
    let mut b = Balancer::new(dp);
    b.set_interfaces(&[(TEST_IFINDEX, DIRECTOR_MAC)])?;
    for i in 0..reals {
        b.set_link(real_addr(i), Some(link(real_mac(real_addr(i)))))?;
    }
    Ok(b)
}

/// One real added, reweighted and removed, `reps` times each, on a live 65537-slot service of
/// 10 reals: what `xlb real add|weight|remove` costs the daemon.
fn live_changes(reps: usize) -> Result<Value> {
    let mut b = loaded_balancer(DEFAULT_CONN_CAPACITY, REALS_PER_SERVICE + 1)?;
    let svc = service_addr(0);
    let mut cfg = ServiceConfig::new(svc);
    cfg.reals = (0..REALS_PER_SERVICE)
        .map(|i| RealConfig::new(real_addr(i), 100))
        .collect();
    b.add_service(cfg)?;
    let extra = real_addr(REALS_PER_SERVICE);
    let (mut add, mut weight, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        add.push(timed(|| b.add_real(&svc, RealConfig::new(extra, 100)))?.1);
        weight.push(timed(|| b.set_weight(&svc, extra, 50))?.1);
        remove.push(timed(|| b.remove_real(&svc, extra))?.1);
    }
    let mut out = json!({
        "ring_size": maglev::DEFAULT_SIZE,
        "reals": REALS_PER_SERVICE,
        "target_ms": TARGET_CHANGE_MS,
    });
    let mut worst: f64 = 0.0;
    let mut line = String::new();
    for (name, samples) in [("add", &add), ("weight", &weight), ("remove", &remove)] {
        let (cpu, wall) = medians_ms(samples);
        let max_wall = ms(samples.iter().map(|t| t.wall).max().expect("reps > 0"));
        out[format!("{name}_cpu_ms")] = json!(cpu);
        out[format!("{name}_wall_ms")] = json!(wall);
        out[format!("{name}_wall_max_ms")] = json!(max_wall);
        worst = worst.max(cpu);
        line += &format!(" {name} {cpu} ({wall}, max {max_wall})");
    }
    println!(
        "{:<34}{line} ms  target <= {TARGET_CHANGE_MS} ms  {}",
        "one real change, 65537 slots: CPU (wall)",
        verdict(worst <= TARGET_CHANGE_MS)
    );
    Ok(out)
}

/// `SERVICES` x `REALS_PER_SERVICE`, as a `restore` file would hold them.
fn big_config() -> Config {
    Config {
        services: (0..SERVICES)
            .map(|s| {
                let mut cfg = ServiceConfig::new(service_addr(s));
                cfg.reals = (0..REALS_PER_SERVICE)
                    .map(|r| RealConfig::new(real_addr(s * REALS_PER_SERVICE + r), 100))
                    .collect();
                cfg
            })
            .collect(),
    }
}

/// Loads 1,000 services x 10 reals with `Balancer::replace` (what `xlb restore` runs), reads
/// the maps' kernel memory, then times `/metrics` scrapes of it with flows tracked.
fn restore_memory_scrape(scrapes: usize) -> Result<(Value, Value, Value)> {
    let config = big_config();
    let mut b = loaded_balancer(DEFAULT_CONN_CAPACITY, SERVICES * REALS_PER_SERVICE)?;
    let empty = map_memory(b.dataplane())?;
    let ((), took) = timed(|| b.replace(&config))?;
    ensure!(
        b.config().services.len() == SERVICES,
        "the restore left {} services",
        b.config().services.len()
    );
    let restore = json!({
        "services": SERVICES,
        "reals_per_service": REALS_PER_SERVICE,
        "ring_size": maglev::DEFAULT_SIZE,
        "cpu_s": (took.cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "wall_s": (took.wall.as_secs_f64() * 1000.0).round() / 1000.0,
        "target_s": TARGET_RESTORE_S,
    });
    println!(
        "{:<34} {:.3} s CPU ({:.3} s wall)  target <= {TARGET_RESTORE_S} s  {}",
        format!("restore {SERVICES} services x {REALS_PER_SERVICE} reals"),
        took.cpu.as_secs_f64(),
        took.wall.as_secs_f64(),
        verdict(took.cpu.as_secs_f64() <= TARGET_RESTORE_S)
    );

    // Per service: its Maglev table (its own map); the other maps are sized up front. Every
    // table has the same size, and each look-up in the outer map waits for an RCU grace
    // period, so a sample of them is read.
    let sample = 10;
    let mut tables = 0u64;
    for s in (0..SERVICES).step_by(SERVICES / sample) {
        let id = b
            .service_id(&service_addr(s))
            .context("a restored service")?;
        tables += b.dataplane().maglev_memory(id)?;
    }
    let tables = tables / sample as u64 * SERVICES as u64;
    let per_service = tables / SERVICES as u64;
    let fixed: u64 = empty.iter().map(|(_, m)| m).sum();
    let conns = empty
        .iter()
        .find(|(n, _)| n == "CONNS")
        .map(|(_, m)| *m)
        .context("no CONNS map")?;
    let memory = json!({
        "per_service_bytes": per_service,
        "maglev_tables_bytes_all_services": tables,
        "fixed_maps_bytes": fixed,
        "fixed_maps_without_conns_bytes": fixed - conns,
        "maps": empty.iter().map(|(n, m)| (n.clone(), json!(m))).collect::<serde_json::Map<_, _>>(),
    });
    println!(
        "{:<34} {:.1} KiB (its 65537-slot Maglev table); all maps but the connection table {:.1} MiB, sized up front",
        "kernel memory per service",
        per_service as f64 / 1024.0,
        (fixed - conns) as f64 / MIB
    );

    // Scrapes: the active-flow walk plus the page, as the daemon's /metrics handler does (its
    // checks have no tasks here: the reals are unchecked). Traffic goes through the program
    // before each one, outside the timing.
    let (checks, _reports) = Checks::new(1);
    let mut page = xlb::metrics::Page::default();
    let traffic = traffic_frames();
    let mut scrape_with =
        |b: &mut Balancer, flows: usize, n: usize| -> Result<((f64, f64), usize)> {
            let mut bytes = 0;
            let mut samples = Vec::new();
            for _ in 0..n {
                for frame in &traffic {
                    let (verdict, _) = b.dataplane().test_run(BALANCER_PROGRAM, frame)?;
                    ensure!(
                        verdict == XDP_TX,
                        "a traffic SYN was not forwarded: {verdict}"
                    );
                }
                let ((counts, page), took) = timed(|| {
                    let counts = active_flows(b)?;
                    let scrape = metrics::Scrape {
                        ifaces: &[("bench", 0, "none")],
                        flows: &counts,
                        checks: &checks,
                        sync: None,
                    };
                    let page = metrics::render(&mut page, b, &scrape)?;
                    Ok((counts, page))
                })?;
                let counted: u64 = counts.active.values().sum();
                let flows = flows + traffic.len();
                // A few of the flows written share a full bucket and are not held (see
                // `lb_common::conn_buckets`).
                ensure!(
                    counted as usize <= flows && counted as usize >= flows * 999 / 1000,
                    "the scrape counted {counted} flows, {flows} written or sent"
                );
                bytes = page.len();
                samples.push(took);
            }
            Ok((medians_ms(&samples), bytes))
        };
    // The first scrape builds the page's series; the next ones reuse them (`metrics::Page`).
    let ((first_ms, first_wall_ms), _) = scrape_with(&mut b, 0, 1)?;
    let ((no_flows_ms, no_flows_wall_ms), page_bytes) = scrape_with(&mut b, 0, scrapes)?;
    let ids: Vec<u32> = (0..SERVICES * REALS_PER_SERVICE)
        .map(|i| {
            b.real_backend_id(&service_addr(i / REALS_PER_SERVICE), real_addr(i))
                .context("a restored real")
        })
        .collect::<Result<_>>()?;
    b.dataplane().insert_conns(&flows(SCRAPE_FLOWS, &ids))?;
    let ((with_flows_ms, with_flows_wall_ms), _) = scrape_with(&mut b, SCRAPE_FLOWS, scrapes)?;
    let scrape = json!({
        "services": SERVICES,
        "reals_per_service": REALS_PER_SERVICE,
        "page_bytes": page_bytes,
        "first_cpu_ms": first_ms,
        "first_wall_ms": first_wall_ms,
        "no_flows_cpu_ms": no_flows_ms,
        "no_flows_wall_ms": no_flows_wall_ms,
        "traffic_flows": SERVICES * TRAFFIC_SYNS_PER_SERVICE,
        "tracked_flows": SCRAPE_FLOWS,
        "with_flows_cpu_ms": with_flows_ms,
        "with_flows_wall_ms": with_flows_wall_ms,
        "target_ms": TARGET_SCRAPE_MS,
    });
    println!(
        "{:<34} {no_flows_ms} ms CPU ({no_flows_wall_ms} wall) with traffic's {} flows, {with_flows_ms} ({with_flows_wall_ms}) with {SCRAPE_FLOWS} more tracked, first scrape {first_ms} ({first_wall_ms}), {} KiB page  target <= {TARGET_SCRAPE_MS} ms  {}",
        format!("/metrics, {SERVICES} x {REALS_PER_SERVICE}"),
        SERVICES * TRAFFIC_SYNS_PER_SERVICE,
        page_bytes / 1024,
        verdict(with_flows_ms <= TARGET_SCRAPE_MS)
    );
    Ok((restore, memory, scrape))
}

const MIB: f64 = 1024.0 * 1024.0;

fn map_memory(dp: &mut Dataplane) -> Result<Vec<(String, u64)>> {
    let mut maps = dp.map_memory()?;
    maps.sort();
    Ok(maps)
}

/// `n` distinct IPv4 TCP flows spread over `backends`, all seen just now.
fn flows(n: usize, backends: &[u32]) -> Vec<(ConnKey, ConnValue)> {
    let now = coarse_now_s();
    (0..n)
        .map(|i| {
            let mut key = ConnKey {
                sport: (1024 + i % 60_000) as u16,
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                ..ConnKey::default()
            };
            // Clients in 198.18.128.0/17 and beyond: one address per 60,000 ports.
            let client = (198u32 << 24 | 18 << 16 | 128 << 8) + (i / 60_000) as u32;
            key.src[..4].copy_from_slice(&client.to_be_bytes());
            key.dst[..4].copy_from_slice(&[198, 18, 1, 0]);
            let value = ConnValue {
                backend_id: backends[i % backends.len()] as u16,
                generation: 1,
                last_seen_s: now,
                ..ConnValue::default()
            };
            (key, value)
        })
        .collect()
}

/// `TRAFFIC_SYNS_PER_SERVICE` SYNs to each service, each from its own client in
/// 198.18.160.0/19 and up (below the lab range's end, apart from the VIPs and `flows`'
/// clients).
fn traffic_frames() -> Vec<Vec<u8>> {
    (0..SERVICES)
        .flat_map(|s| {
            let vip = service_addr(s).vip.to_string();
            (0..TRAFFIC_SYNS_PER_SERVICE).map(move |i| {
                let n = s * TRAFFIC_SYNS_PER_SERVICE + i;
                let client = format!("198.18.{}.{}", 160 + n / 256, n % 256);
                Frame::tcp(&client, &vip, 10_000 + i as u16, 80, SYN).bytes()
            })
        })
        .collect()
}

/// The clock the data path stamps flows with (CLOCK_MONOTONIC_COARSE, seconds).
fn coarse_now_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// The connection table at its default capacity (1,048,576 flows), filled: what the kernel
/// charges for it (memlock), and how much memory the machine lost loading and filling it.
fn conn_table_memory() -> Result<Value> {
    let before = kernel_used()?;
    let mut dp = Dataplane::load(&LoadOptions {
        conn_capacity: CONN_FLOWS as u32,
        ..LoadOptions::default()
    })?;
    let loaded = kernel_used()?;
    let flows = flows(CONN_FLOWS, &[0]);
    let ((), fill) = timed(|| dp.insert_conns(&flows))?;
    let filled = kernel_used()?;
    let memlock = |dp: &Dataplane| -> Result<u64> {
        dp.map_memory()?
            .into_iter()
            .find(|(n, _)| n == "CONNS")
            .map(|(_, m)| m)
            .context("no CONNS map")
    };
    let charged = memlock(&dp)?;
    let (tracked, walk) = timed(|| Ok(dp.conns()?.len()))?;
    // Set-associative: buckets that draw more flows than entries keep the newest.
    ensure!(
        tracked >= CONN_FLOWS * 97 / 100,
        "{tracked} flows tracked after writing {CONN_FLOWS} (less than 97 %)"
    );
    let mib = charged as f64 / MIB;
    let out = json!({
        "flows": CONN_FLOWS,
        "tracked": tracked,
        "entry_bytes": size_of::<ConnEntry>(),
        "memlock_bytes": charged,
        "memlock_mib": (mib * 1000.0).round() / 1000.0,
        "bytes_per_flow": charged / CONN_FLOWS as u64,
        "kernel_growth_on_load_mib": ((loaded - before) as f64 / MIB).round(),
        "kernel_growth_on_fill_mib": ((filled - loaded) as f64 / MIB).round(),
        "fill_cpu_s": (fill.cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "walk_cpu_ms": ms(walk.cpu),
        "target_mib": TARGET_CONNS_MIB,
    });
    println!(
        "{:<34} {mib:.3} MiB charged ({} B per flow), {tracked} held; machine: +{} MiB at load, +{} MiB filling; reading all flows {} ms CPU  target <= {TARGET_CONNS_MIB} MiB  {}",
        format!("connection table, {CONN_FLOWS} flows"),
        out["bytes_per_flow"],
        out["kernel_growth_on_load_mib"],
        out["kernel_growth_on_fill_mib"],
        out["walk_cpu_ms"],
        verdict(mib <= TARGET_CONNS_MIB)
    );
    Ok(out)
}

/// Memory the kernel holds outside the page cache and user pages: vmalloc, slab and per-CPU
/// areas (where BPF maps live), from /proc/meminfo, in bytes. A cross-check of memlock; noisy
/// when other work runs.
fn kernel_used() -> Result<i64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Result<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no {name} in /proc/meminfo"))
    };
    Ok(field("VmallocUsed:")? + field("Slab:")? + field("Percpu:")?)
}
