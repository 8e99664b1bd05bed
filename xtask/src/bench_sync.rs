//! `cargo xtask bench --only sync`: connection sync's figures, in one process, no lab.
//!
//! - The data path's cost with sync on against off, in the same run, interleaved round by
//!   round: a new flow (a SYN, whose entry is written, and with sync on reported) and an
//!   established flow's packet (never reported), each over the empty program's floor.
//! - Bandwidth and delay: new flows at 1,000 a second through director A's program
//!   (BPF_PROG_TEST_RUN); the daemon's own sender (daemon/sync.rs) turns A's events into
//!   datagrams every `FLUSH_EVERY` and sends them over UDP on lo to the daemon's receiver,
//!   which installs them in director B's connection table. Bytes on the wire per new flow
//!   (UDP payload plus IPv4 and UDP headers), and the delay from the data path's event (its
//!   `bpf_ktime_get_ns`) to the entry written on B (CLOCK_MONOTONIC): p50 and p99. The same
//!   again for full-NAT flows (`fullnat`): each entry then carries its NAT state (the reply
//!   neighbour's MAC and the SNAT endpoint), which B installs in its NAT tables too.

use std::{
    collections::HashMap,
    net::UdpSocket,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use lb_common::{ConnKey, SyncEvent};
use serde_json::{Value, json};
use xlb::{
    control::Balancer,
    daemon::{
        checks::monotonic_ns,
        sync::{FLUSH_EVERY, Receiver, Sender, SyncOptions, SyncStats, conn_key},
    },
    dataplane::{BALANCER_PROGRAM, PASS_PROGRAM, ring_records},
};
use xlb_tests::{Frame, SYN};

use crate::{
    bench_setup::{
        CLIENT4, FULLNAT_VIP4, balancer_with_services, establish, nat_balancer, pin_to_one_cpu,
    },
    bench_stats::{ROUND, Stats, over, stats},
};

const VIP4: &str = "198.18.0.100";
/// IPv4 and UDP headers, per datagram.
const HEADERS: usize = 28;
const KEY: &[u8] = b"the bench's shared sync key";

/// A new flow's SYN to `vip`: flow `n` of the run, each from its own client address and port.
fn new_flow(vip: &str, n: u32) -> Vec<u8> {
    let client = format!("198.19.{}.{}", (n >> 8) & 0xff, n & 0xff);
    Frame::tcp(&client, vip, 10000 + (n >> 16) as u16, 80, SYN).bytes()
}

pub fn run(quick: bool) -> Result<Value> {
    pin_to_one_cpu()?;
    let calls = if quick { 20_000 } else { 100_000 };
    let cost = datapath_cost(calls)?;
    let seconds = if quick { 2 } else { 5 };
    let wire = bandwidth_and_delay(1000, seconds, false)?;
    let mut out = cost;
    for (k, v) in wire.as_object().expect("an object") {
        out[k] = v.clone();
    }
    out["fullnat"] = bandwidth_and_delay(1000, seconds, true)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(out)
}

/// Median and p99 over the floor of a SYN (new flow) and an established packet, sync off and
/// on, taken round by round in turn.
fn datapath_cost(calls: usize) -> Result<Value> {
    let mut b = balancer_with_services()?;
    let mut ring = b.dataplane().take_sync_events()?;
    let syn = Frame::tcp(CLIENT4, VIP4, 40001, 80, SYN).bytes();
    let established = establish(&mut b, CLIENT4, VIP4, 40002)?;
    let pass = Frame::tcp(CLIENT4, "198.18.0.2", 40000, 22, SYN).bytes();
    // floor, syn off, established off, syn on, established on.
    let mut samples: Vec<Vec<u64>> = (0..5).map(|_| Vec::with_capacity(calls)).collect();
    let mut done = 0;
    let mut warm = true;
    while done < calls {
        for (i, (on, program, frame)) in [
            (false, PASS_PROGRAM, &pass),
            (false, BALANCER_PROGRAM, &syn),
            (false, BALANCER_PROGRAM, &established),
            (true, BALANCER_PROGRAM, &syn),
            (true, BALANCER_PROGRAM, &established),
        ]
        .into_iter()
        .enumerate()
        {
            b.set_sync(on)?;
            for _ in 0..ROUND {
                let ns = b.dataplane().time_run(program, frame)?.as_nanos() as u64;
                if !warm {
                    samples[i].push(ns);
                }
            }
            // A round of SYNs fills a quarter of the buffer: emptied after each, as the daemon
            // does, so every reported SYN pays for a record written.
            ring_records::<SyncEvent>(&mut ring);
        }
        if warm {
            warm = false;
        } else {
            done += ROUND;
        }
    }
    let lost = b
        .dataplane()
        .global_counter(lb_common::Global::SyncEventsLost)?;
    ensure!(lost == 0, "{lost} sync events lost in the cost bench");
    let s: Vec<Stats> = samples.into_iter().map(stats).collect();
    let floor = s[0];
    let net: Vec<Stats> = s[1..].iter().map(|&r| over(r, floor)).collect();
    let ratio = |on: Stats, off: Stats| {
        (on.median as f64 / off.median.max(1) as f64 * 100.0).round() / 100.0
    };
    let figures = |st: Stats| json!({ "median_ns": st.median, "p99_ns": st.p99 });
    Ok(json!({
        "floor_ns": floor.median,
        "new_flow_sync_off": figures(net[0]),
        "new_flow_sync_on": figures(net[2]),
        "established_sync_off": figures(net[1]),
        "established_sync_on": figures(net[3]),
        "new_flow_on_over_off": ratio(net[2], net[0]),
        "established_on_over_off": ratio(net[3], net[1]),
    }))
}

/// `rate` new flows a second for `seconds` on A, synced to B: bytes per flow and the delay.
/// `fullnat`: full-NAT flows (NAT directors), else DR ones.
fn bandwidth_and_delay(rate: u32, seconds: u32, fullnat: bool) -> Result<Value> {
    let (director, vip) = match fullnat {
        true => (nat_balancer as fn() -> Result<Balancer>, FULLNAT_VIP4),
        false => (balancer_with_services as fn() -> Result<Balancer>, VIP4),
    };
    let mut a = director()?;
    let mut ring = a.dataplane().take_sync_events()?;
    a.set_sync(true)?;
    let mut b = director()?;
    let inbox = UdpSocket::bind("127.0.0.1:0")?;
    inbox.set_nonblocking(true)?;
    let opts = SyncOptions {
        peers: vec![inbox.local_addr()?],
        listen: "127.0.0.1:0".parse()?,
        key: KEY.to_vec(),
    };
    let a_stats = Arc::new(SyncStats::default());
    let mut sender = Sender::new(UdpSocket::bind("127.0.0.1:0")?, &opts, a_stats.clone())?;
    let b_stats = Arc::new(SyncStats::default());
    let mut receiver = Receiver::new(&opts, b_stats.clone());

    let flows = rate * seconds;
    let every = Duration::from_secs(1) / rate;
    let start = Instant::now();
    let mut next_flush = start + FLUSH_EVERY;
    let mut at_ns: HashMap<ConnKey, u64> = HashMap::new();
    let (mut delays, mut wire, mut datagrams) = (Vec::new(), 0usize, 0usize);
    let mut with_nat = 0;
    let mut buf = [0u8; 2048];
    let mut n = 0;
    // Until a flush after the last flow found every event's entry on the peer.
    let mut drained_after_last = false;
    while !(drained_after_last && at_ns.is_empty()) {
        let now = Instant::now();
        if n < flows && now >= start + every * n {
            a.dataplane()
                .test_run(BALANCER_PROGRAM, &new_flow(vip, n))?;
            n += 1;
        }
        if now >= next_flush {
            next_flush += FLUSH_EVERY;
            drained_after_last = n == flows;
            let events = ring_records::<SyncEvent>(&mut ring);
            at_ns.extend(events.iter().map(|e| (e.key, e.at_ns)));
            sender.take_events(&a, &events);
            sender.flush(&mut a);
            while let Ok((len, from)) = inbox.recv_from(&mut buf) {
                let entries = receiver
                    .check(from.ip(), &buf[..len])
                    .ok_or_else(|| anyhow::anyhow!("our own batch refused"))?;
                // The clients reached by the interface the test runs take.
                for client in receiver.unrouted(&entries) {
                    receiver.set_route(client, xlb_tests::TEST_IFINDEX);
                }
                receiver.install(&mut b, &entries)?;
                let installed = monotonic_ns();
                with_nat += entries.iter().filter(|e| e.nat.is_some()).count();
                for e in &entries {
                    if let Some(t) = at_ns.remove(&conn_key(e)) {
                        delays.push(installed.saturating_sub(t));
                    }
                }
                wire += len + HEADERS;
                datagrams += 1;
            }
        }
        ensure!(
            start.elapsed() < Duration::from_secs(seconds as u64 + 10),
            "{} flows never reached the peer",
            at_ns.len()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    ensure!(
        delays.len() == flows as usize,
        "{} of {flows} flows reached the peer",
        delays.len()
    );
    if fullnat {
        use std::sync::atomic::Ordering::Relaxed;
        ensure!(
            with_nat == flows as usize && b_stats.nat_skipped.load(Relaxed) == 0,
            "{with_nat} of {flows} full-NAT flows synced with their NAT state, {} not installed",
            b_stats.nat_skipped.load(Relaxed)
        );
    }
    let d = stats(delays);
    let per_flow = wire as f64 / flows as f64;
    let what = if fullnat { "full-NAT" } else { "DR" };
    println!(
        "sync: {flows} new {what} flows at {rate}/s: {datagrams} datagrams, {per_flow:.1} bytes \
         on the wire a flow; first packet to the peer's entry: p50 {:.1} ms, p99 {:.1} ms",
        d.median as f64 / 1e6,
        d.p99 as f64 / 1e6
    );
    Ok(json!({
        "new_flows_per_s": rate,
        "flows": flows,
        "datagrams": datagrams,
        "wire_bytes_per_new_flow": (per_flow * 10.0).round() / 10.0,
        "wire_bytes_per_s_per_1000_new_flows_per_s": (per_flow * 1000.0).round(),
        "delay_p50_ms": (d.median as f64 / 1e4).round() / 100.0,
        "delay_p99_ms": (d.p99 as f64 / 1e4).round() / 100.0,
        "flush_every_ms": FLUSH_EVERY.as_millis() as u64,
    }))
}
