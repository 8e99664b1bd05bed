//! Forwarding rate on one core: Mpps through a veth pair, for DR and TUN against a ceiling.
//!
//! Inside a network namespace of its own the bench makes one veth pair, `gen` <-> `fwd`. On
//! `fwd` (native XDP) sits the forwarder under test, which sends each frame back with XDP_TX;
//! on `gen` the bounce program (`xlb_bench_bounce`) counts it, restores the original frame and
//! sends it out of `gen` again (XDP_REDIRECT), while its budget lasts. A burst of frames
//! injected once through a packet socket on `gen` then ping-pongs between the two programs. The
//! veth schedules its peer's NAPI on the sending CPU, so with the process pinned the whole
//! ping-pong runs in softirq on one core. (Not BPF_PROG_RUN's live-frames mode as the
//! generator: some kernels refuse it with EPERM, as this machine kind's does.)
//!
//! The forwarders, in interleaved rounds: `xlb_bench_swap` (swap MACs, XDP_TX: the ceiling of
//! this setup), the balancer on an established DR flow, and on an established TUN flow. Each
//! path's figure is its median over the rounds; its ratio is that over the ceiling's median.
//!
//! Many flows (`_100k`): 100,000 DR flows, or as many TUN flows, are established first in a
//! balancer of their own (its connection table sized for them, as bench_flows.rs does), and the bounce program sends each
//! frame as the next of them, in an order that strides across the whole set (see `flow_step`),
//! so that the balancer pays the table's memory misses. The data path's miss counter tells
//! what share of frames found their flow (`hit_ratio`). The bounce rewrites the source on
//! every path, the ceiling's and one flow's too, so that all pay the same on its side.
//!
//! The NAT paths: the NAT director of bench.rs on `fwd`, on an established NAT and full-NAT
//! flow's requests and on their reals' replies (each translated back and sent out of `fwd`).
//!
//! The redirect path (a two-arm director): a second pair `rdr` <-> `rdrsink`, the DR reals
//! reached through `rdr`. The balancer on `fwd` sends the DR flow's frames by XDP_REDIRECT
//! into `rdr`, and the bounce program on `rdrsink` sends them out of `gen` as it does on `gen`:
//! the same loop with the forwarder's way out changed.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::{BENCH_FRAME_MAX, BenchBounce, Global, bench_flow_source};
use serde_json::{Map, Value, json};
use xlb::{
    control::Balancer,
    dataplane::{BALANCER_PROGRAM, EBPF_OBJECT, XdpModeChoice},
};

use xlb_tests::{ACK, DIRECTOR_MAC, Frame, SYN, XDP_TX};

use crate::bench_setup;

/// The namespace's name is this prefix and the bench's pid, so that two runs never share one.
const NETNS_PREFIX: &str = "xlb-bench-";
const GEN_IF: &str = "gen";
const FWD_IF: &str = "fwd";
const RDR_IF: &str = "rdr";
const RDR_SINK_IF: &str = "rdrsink";
/// Frames injected at the start of a run, in flight together (the veth rings hold 256).
const BURST: u32 = 64;
/// A run's budget is this many times the frames to time: the injection of the burst (whose
/// frames already circulate) must end before the timed part, which runs on what is left.
const BUDGET_FACTOR: u64 = 2;
/// A run that makes no progress for this long has stalled (frames lost).
const STALL: Duration = Duration::from_secs(1);

pub const DEFAULT_FRAMES: u32 = 2_000_000;
pub const QUICK_FRAMES: u32 = 300_000;
const DEFAULT_ROUNDS: usize = 5;
const QUICK_ROUNDS: usize = 3;

/// The flows of the many-flow paths (`_100k`).
const MANY_FLOWS: u32 = 100_000;
/// Flow 0 of the many flows; flow i's source adds `bench_flow_source(i)` to it.
const MANY_CLIENT: [u8; 4] = [198, 19, 0, 1];
const MANY_PORT: u16 = 1024;
/// The DR and TUN VIPs of the data-path bench's services (bench_setup.rs).
const DR_VIP4: &str = "198.18.0.100";
const TUN_VIP4: &str = "198.18.0.101";

/// The rate goal of the issue: DR and TUN at least this share of the ceiling.
pub const GOAL: f64 = 0.85;

/// The measured paths, the ceiling first.
const CEILING: &str = "ceiling";
const PATHS: [&str; 10] = [
    CEILING,
    "dr_established_v4",
    "dr_established_v4_100k",
    "tun_established_v4",
    "tun_established_v4_100k",
    "dr_redirect_v4",
    "nat_established_v4",
    "nat_reply_v4",
    "fullnat_established_v4",
    "fullnat_reply_v4",
];

/// One run of one path, in millions of frames per second.
#[derive(Clone, Copy)]
struct Sample {
    /// The frames bounced after the whole burst was in, over the time the ping-pong had the
    /// CPU meanwhile (the bounce program's clock, gaps where other tasks ran left out).
    mpps: f64,
    /// Every frame of the run over the bench's wall-clock time from injection to the end.
    wall_mpps: f64,
    /// The balancer's connection-table misses over the run, and its frames (paths whose
    /// frames look up the table).
    misses: Option<(u64, u64)>,
}

/// One path's figures.
pub struct Rate {
    pub name: &'static str,
    /// Median over the rounds, in millions of frames per second (the timed part of the run).
    pub mpps: f64,
    /// Each round's figure.
    pub rounds: Vec<f64>,
    /// The median over the ceiling's median.
    pub ratio: f64,
    /// Median over the rounds by the wall clock (lower when other tasks share the CPU).
    pub wall_mpps: f64,
    /// Frames that found their flow in the connection table, of all the rounds' frames (the
    /// DR and TUN paths).
    pub hit_ratio: Option<f64>,
}

pub struct Rates {
    pub frames: u32,
    pub rows: Vec<Rate>,
}

impl Rates {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("frames_per_round".into(), json!(self.frames));
        m.insert(
            "generator".into(),
            json!({
                "kind": "bounce",
                "burst": BURST,
                "budget_per_round": u64::from(self.frames) * BUDGET_FACTOR,
                "many_flows": MANY_FLOWS,
                "flow_step": flow_step(MANY_FLOWS),
            }),
        );
        m.insert("goal_ratio".into(), json!(GOAL));
        for r in &self.rows {
            let mut figures = json!({
                "mpps": round2(r.mpps),
                "ratio": round2(r.ratio),
                "rounds_mpps": r.rounds.iter().map(|&x| round2(x)).collect::<Vec<_>>(),
                "wall_mpps": round2(r.wall_mpps),
            });
            if let Some(hits) = r.hit_ratio {
                figures["hit_ratio"] = json!((hits * 1e4).round() / 1e4);
            }
            m.insert(r.name.into(), figures);
        }
        Value::Object(m)
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn run(quick: bool) -> Result<Rates> {
    let (frames, rounds) = if quick {
        (QUICK_FRAMES, QUICK_ROUNDS)
    } else {
        (DEFAULT_FRAMES, DEFAULT_ROUNDS)
    };
    let cpu = bench_setup::pin_to_one_cpu()?;
    let ns = Netns::create()?;
    eprintln!(
        "forwarding rate: {rounds} rounds of {frames} frames per path over a veth pair in \
         netns {}, pinned to CPU {cpu}",
        ns.name
    );
    let result = measure(frames, rounds);
    // Also removed on a panic (Netns's drop); here its error is reported.
    ns.remove()?;
    let rows = result?;
    let rates = Rates { frames, rows };
    print_table(&rates);
    Ok(rates)
}

/// Runs inside the namespace; everything loaded here is gone (detached) when it returns.
fn measure(frames: u32, rounds: usize) -> Result<Vec<Rate>> {
    let mut bench_progs = BenchPrograms::load()?;
    bench_progs.attach_bounce(GEN_IF)?;
    bench_progs.attach_bounce(RDR_SINK_IF)?;
    let gen_ifindex = ifindex(GEN_IF)?;
    let fwd = ifindex(FWD_IF)?;
    let rdr = ifindex(RDR_IF)?;

    let mut samples: Vec<Vec<Sample>> = PATHS.iter().map(|_| Vec::new()).collect();
    let mut record = |path: &str, sample: Result<Sample>| -> Result<()> {
        let i = PATHS
            .iter()
            .position(|&p| p == path)
            .expect("a path of PATHS");
        samples[i].push(sample.with_context(|| format!("forwarding rate of {path}"))?);
        Ok(())
    };
    for _ in 0..rounds {
        // The data-path bench's services, one established flow per mode. Dropped at the end
        // of the round, which detaches it.
        let mut balancer = bench_setup::balancer_with_services()?;
        let (dr, tun) = frames_of_established_flows(&mut balancer)?;

        // The ceiling and the balancer take turns on the same pair. The ceiling's bounce
        // cycles over the many flows (it pays the same as theirs).
        let link = bench_progs.attach_swap(FWD_IF)?;
        record(
            CEILING,
            bench_progs.rate(gen_ifindex, &many_ack(DR_VIP4, 0), MANY_FLOWS, frames, None),
        )?;
        bench_progs.detach_swap(link)?;

        bench_setup::move_reals(&mut balancer, &[(fwd, DIRECTOR_MAC)], fwd, fwd)?;
        balancer
            .dataplane()
            .attach(FWD_IF, fwd, XdpModeChoice::Native)?;
        for (path, frame) in [("dr_established_v4", &dr), ("tun_established_v4", &tun)] {
            let sample = bench_progs.rate(gen_ifindex, frame, 1, frames, Some(&mut balancer));
            record(path, sample)?;
        }

        let ifaces = [(fwd, DIRECTOR_MAC), (rdr, DIRECTOR_MAC)];
        bench_setup::move_reals(&mut balancer, &ifaces, fwd, rdr)?;
        record(
            "dr_redirect_v4",
            bench_progs.rate(gen_ifindex, &dr, 1, frames, Some(&mut balancer)),
        )?;
        drop(balancer);

        // Many flows: per path a balancer of its own, its table sized for them, as
        // bench_flows.rs has (sharing one, the flows of the path run first, ACKed, would be
        // kept over the other's).
        for (path, vip) in [
            ("dr_established_v4_100k", DR_VIP4),
            ("tun_established_v4_100k", TUN_VIP4),
        ] {
            let mut many = bench_setup::balancer_with_capacity(MANY_FLOWS)?;
            establish_many(&mut many, vip, MANY_FLOWS)?;
            bench_setup::move_reals(&mut many, &[(fwd, DIRECTOR_MAC)], fwd, fwd)?;
            many.dataplane()
                .attach(FWD_IF, fwd, XdpModeChoice::Native)?;
            let sample = bench_progs.rate(
                gen_ifindex,
                &many_ack(vip, 0),
                MANY_FLOWS,
                frames,
                Some(&mut many),
            );
            record(path, sample)?;
        }

        // The NAT director (bench.rs's), its flows started on `fwd` so that their replies
        // leave there too: each flow's requests, then its real's replies.
        let mut nat = bench_setup::nat_balancer()?;
        bench_setup::move_reals(&mut nat, &[(fwd, DIRECTOR_MAC)], fwd, fwd)?;
        let flows = [
            (
                "nat_established_v4",
                "nat_reply_v4",
                bench_setup::establish_nat(&mut nat, bench_setup::NAT_VIP4, 40002, Some(fwd))?,
            ),
            (
                "fullnat_established_v4",
                "fullnat_reply_v4",
                bench_setup::establish_nat(&mut nat, bench_setup::FULLNAT_VIP4, 40002, Some(fwd))?,
            ),
        ];
        nat.dataplane().attach(FWD_IF, fwd, XdpModeChoice::Native)?;
        for (request_path, reply_path, (request, reply)) in &flows {
            record(
                request_path,
                bench_progs.rate(gen_ifindex, request, 1, frames, Some(&mut nat)),
            )?;
            record(
                reply_path,
                bench_progs.rate_replies(gen_ifindex, reply, frames, &mut nat),
            )?;
        }
    }
    let medians: Vec<f64> = samples
        .iter()
        .map(|s| median(s.iter().map(|x| x.mpps)))
        .collect();
    Ok(PATHS
        .iter()
        .zip(samples)
        .zip(&medians)
        .map(|((&name, samples), &mpps)| Rate {
            name,
            mpps,
            rounds: samples.iter().map(|x| x.mpps).collect(),
            ratio: mpps / medians[0],
            wall_mpps: median(samples.iter().map(|x| x.wall_mpps)),
            hit_ratio: hit_ratio(&samples),
        })
        .collect())
}

/// Frames that found their flow, of all the samples' frames (None: no table lookups counted).
fn hit_ratio(samples: &[Sample]) -> Option<f64> {
    let (misses, frames) = samples.iter().try_fold((0, 0), |(m, f), s| {
        s.misses.map(|(sm, sf)| (m + sm, f + sf))
    })?;
    (frames > 0).then(|| 1.0 - misses as f64 / frames as f64)
}

/// Flow `i` of the many flows: its client address and port.
fn many_client(i: u32) -> (String, u16) {
    let (addr_add, port_add) = bench_flow_source(i);
    let addr = std::net::Ipv4Addr::from(u32::from_be_bytes(MANY_CLIENT) + addr_add);
    (addr.to_string(), MANY_PORT + port_add)
}

/// Flow `i`'s ACK to `vip`:80; flow 0's is the frame the bounce program turns into each flow's.
fn many_ack(vip: &str, i: u32) -> Vec<u8> {
    let (client, port) = many_client(i);
    Frame::tcp(&client, vip, port, 80, ACK).bytes()
}

/// Establishes `flows` flows to `vip`:80 (their SYNs, under BPF_PROG_TEST_RUN).
fn establish_many(b: &mut Balancer, vip: &str, flows: u32) -> Result<()> {
    for i in 0..flows {
        let (client, port) = many_client(i);
        let syn = Frame::tcp(&client, vip, port, 80, SYN).bytes();
        let (verdict, _) = b.dataplane().test_run(BALANCER_PROGRAM, &syn)?;
        ensure!(
            verdict == XDP_TX,
            "SYN {client}:{port} -> {vip}:80 returned {}",
            bench_setup::verdict_name(verdict)
        );
    }
    Ok(())
}

/// The bounce's step through `flows` flows: coprime with `flows`, so that a cycle sends each
/// flow once, and near `flows` times the golden ratio's fraction, so that consecutive frames
/// are flows far apart (and their neighbours in the cycle too).
pub fn flow_step(flows: u32) -> u32 {
    if flows <= 1 {
        return 0;
    }
    let mut step = (f64::from(flows) * 0.618_034) as u32;
    while gcd(step, flows) != 1 {
        step += 1;
    }
    step
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// An established DR flow's and an established TUN flow's next frame (IPv4, an ACK). The
/// ceiling runs on the DR frame, which it only needs to bounce.
fn frames_of_established_flows(b: &mut Balancer) -> Result<(Vec<u8>, Vec<u8>)> {
    Ok((
        bench_setup::establish(b, "198.18.1.1", "198.18.0.100", 40002)?,
        bench_setup::establish(b, "198.18.1.1", "198.18.0.101", 40002)?,
    ))
}

fn median(xs: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = xs.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn print_table(rates: &Rates) {
    println!(
        "{:<24} {:>8} {:>10} {:>10} {:>9}  rounds (Mpps)",
        "forwarding", "Mpps", "of ceiling", "wall Mpps", "hit ratio"
    );
    for r in &rates.rows {
        let rounds: Vec<String> = r.rounds.iter().map(|x| format!("{x:.2}")).collect();
        // The goal is DR's and TUN's; NAT's is in ns (bench.rs).
        let status = if r.name == CEILING || r.name.contains("nat") {
            ""
        } else if r.ratio >= GOAL {
            "ok"
        } else {
            "MISS"
        };
        let hits = r.hit_ratio.map_or(String::new(), |h| format!("{h:.4}"));
        println!(
            "{:<24} {:>8.2} {:>10.2} {:>10.2} {hits:>9}  {}  {status}",
            r.name,
            r.mpps,
            r.ratio,
            r.wall_mpps,
            rounds.join(" ")
        );
    }
}

/// The bounce program and the ceiling, from a load of the xlb object of their own.
struct BenchPrograms {
    ebpf: Ebpf,
}

impl BenchPrograms {
    fn load() -> Result<Self> {
        // Small tables: this load's balancer maps are never used.
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("CONNS", 16)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for name in ["xlb_bench_bounce", "xlb_bench_swap"] {
            xdp(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading program {name}"))?;
        }
        Ok(Self { ebpf })
    }

    fn attach_bounce(&mut self, iface: &str) -> Result<()> {
        xdp(&mut self.ebpf, "xlb_bench_bounce")?
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching the bounce program to {iface}"))?;
        Ok(())
    }

    fn attach_swap(&mut self, iface: &str) -> Result<aya::programs::xdp::XdpLinkId> {
        xdp(&mut self.ebpf, "xlb_bench_swap")?
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching the ceiling program to {iface}"))
    }

    fn detach_swap(&mut self, link: aya::programs::xdp::XdpLinkId) -> Result<()> {
        xdp(&mut self.ebpf, "xlb_bench_swap")?.detach(link)?;
        Ok(())
    }

    fn received(&self) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("BENCH_RECEIVED")
                .ok_or_else(|| anyhow!("map BENCH_RECEIVED missing"))?,
        )?;
        Ok(map.get(&0, 0)?.iter().sum())
    }

    fn bounce_run(&self) -> Result<BenchBounce> {
        let map: Array<_, BenchBounce> = Array::try_from(
            self.ebpf
                .map("BENCH_BOUNCE")
                .ok_or_else(|| anyhow!("map BENCH_BOUNCE missing"))?,
        )?;
        Ok(map.get(&0, 0)?)
    }

    fn set_bounce_run(&mut self, run: &BenchBounce) -> Result<()> {
        let mut map: Array<_, BenchBounce> = Array::try_from(
            self.ebpf
                .map_mut("BENCH_BOUNCE")
                .ok_or_else(|| anyhow!("map BENCH_BOUNCE missing"))?,
        )?;
        map.set(0, run, 0)?;
        Ok(())
    }

    /// Ping-pongs `frame` (flow 0's of `flows`) through the forwarder on `fwd` until `frames`
    /// of them have been timed, and returns the rate. Checks that every frame came back (and,
    /// for the balancer, that it forwarded every one of them).
    fn rate(
        &mut self,
        gen_ifindex: u32,
        frame: &[u8],
        flows: u32,
        frames: u32,
        balancer: Option<&mut Balancer>,
    ) -> Result<Sample> {
        self.rate_counted(
            gen_ifindex,
            frame,
            flows,
            frames,
            balancer.map(|b| (b, Global::Forwarded)),
        )
    }

    /// `rate` for NAT replies: the balancer must have translated every one.
    fn rate_replies(
        &mut self,
        gen_ifindex: u32,
        frame: &[u8],
        frames: u32,
        balancer: &mut Balancer,
    ) -> Result<Sample> {
        self.rate_counted(
            gen_ifindex,
            frame,
            1,
            frames,
            Some((balancer, Global::NatReplied)),
        )
    }

    /// `rate`, checking that the balancer's counter `sent` (if any) counted every frame.
    fn rate_counted(
        &mut self,
        gen_ifindex: u32,
        frame: &[u8],
        flows: u32,
        frames: u32,
        balancer: Option<(&mut Balancer, Global)>,
    ) -> Result<Sample> {
        let budget = u64::from(frames) * BUDGET_FACTOR;
        let mut run = bounce_run(frame, flows, budget, gen_ifindex)?;
        self.set_bounce_run(&run)?;
        let mut balancer = balancer;
        let counted_before = match &mut balancer {
            Some((b, counter)) => Some((
                b.dataplane().global_counter(*counter)?,
                b.dataplane().global_counter(Global::ConnMiss)?,
            )),
            None => None,
        };
        let before = self.received()?;
        let start = Instant::now();
        let ran = xlb_tests::inject(gen_ifindex, frame, BURST)
            .context("injecting the burst through a packet socket on gen")
            .and_then(|()| {
                let started = self.bounce_run()?;
                let done = self.wait_for_budget(budget)?;
                Ok((started, done))
            });
        let elapsed = start.elapsed();
        if ran.is_err() {
            // Stop whatever still circulates.
            run.budget = 0;
            self.set_bounce_run(&run)?;
        }
        let (started, done) = ran?;
        let received = self.settled_received(before)?;
        // Every bounced frame comes back once more, and so does every injected one.
        let total = budget + u64::from(BURST);
        ensure!(
            received == total,
            "the bounce program received {received} of {total} frames"
        );
        let mut misses = None;
        if let (Some((b, counter)), Some((before, misses_before))) = (balancer, counted_before) {
            let n = b.dataplane().global_counter(counter)? - before;
            ensure!(
                n == total,
                "the balancer counted {n} of {total} frames in {}",
                counter.name()
            );
            // A NAT reply is looked up in the NAT reply table, not the connection table.
            if counter == Global::Forwarded {
                let n = b.dataplane().global_counter(Global::ConnMiss)? - misses_before;
                misses = Some((n, total));
            }
        }
        let timed = done.busy_frames - started.busy_frames;
        ensure!(
            timed >= u64::from(frames) / 2,
            "only {timed} of {budget} frames timed (the injection took {}, the rest was \
             interrupted)",
            budget - started.budget
        );
        let timed_ns = (done.busy_ns - started.busy_ns) as f64;
        Ok(Sample {
            mpps: timed as f64 * 1e3 / timed_ns,
            wall_mpps: total as f64 / elapsed.as_secs_f64() / 1e6,
            misses,
        })
    }

    /// Waits until the bounce program has spent its budget, and returns its run. A run whose
    /// budget stops moving has lost its frames: an error, not a hang.
    fn wait_for_budget(&self, budget: u64) -> Result<BenchBounce> {
        let mut last = (budget, Instant::now());
        loop {
            std::thread::sleep(Duration::from_millis(2));
            let run = self.bounce_run()?;
            if run.budget == 0 {
                return Ok(run);
            }
            if run.budget != last.0 {
                last = (run.budget, Instant::now());
            } else if last.1.elapsed() > STALL {
                bail!(
                    "the ping-pong stalled after {} of {budget} frames",
                    budget - run.budget
                );
            }
        }
    }

    /// The bounce program's count once it stops moving (the last frames may still be in flight).
    fn settled_received(&self, before: u64) -> Result<u64> {
        let mut last = self.received()?;
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(2));
            let now = self.received()?;
            if now == last {
                break;
            }
            last = now;
        }
        Ok(last - before)
    }
}

/// The bounce program's run: `budget` frames out of `out_ifindex`, each the next of `flows`
/// flows whose flow 0 sends `frame`. Refuses what the program cannot restore or rewrite.
fn bounce_run(frame: &[u8], flows: u32, budget: u64, out_ifindex: u32) -> Result<BenchBounce> {
    ensure!(
        frame.len() <= BENCH_FRAME_MAX,
        "a {}-byte frame: the bounce program restores at most {BENCH_FRAME_MAX}",
        frame.len()
    );
    // Ethernet, IPv4 without options, TCP without options: where the program rewrites the
    // source.
    ensure!(
        frame.len() >= 54 && frame[12..14] == [0x08, 0x00] && frame[14] == 0x45 && frame[23] == 6,
        "the bounce program rewrites IPv4/TCP frames without options only"
    );
    ensure!(flows >= 1, "the bounce program needs at least one flow");
    let mut run = BenchBounce {
        budget,
        last_ns: 0,
        busy_ns: 0,
        busy_frames: 0,
        out_ifindex,
        len: frame.len() as u32,
        flows,
        flow_step: flow_step(flows),
        flow: 0,
        _pad: 0,
        frame: [0; BENCH_FRAME_MAX],
    };
    run.frame[..frame.len()].copy_from_slice(frame);
    Ok(run)
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()?)
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name}: {}", std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// The bench's network namespace, entered by this thread while it exists. Removed by
/// `remove`, or when dropped (a panic on the way).
struct Netns {
    name: String,
    home: File,
    removed: bool,
}

impl Netns {
    fn create() -> Result<Self> {
        remove_stale_namespaces()?;
        let name = format!("{NETNS_PREFIX}{}", std::process::id());
        let home = File::open("/proc/self/ns/net").context("opening this netns")?;
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            home,
            removed: false,
        };
        let setup = || -> Result<()> {
            setns(&File::open(format!("/run/netns/{}", ns.name))?)?;
            // No IPv6 on the pair: its neighbour and router traffic would reach the sink too.
            for conf in ["all", "default"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                std::fs::write(&knob, "1").with_context(|| format!("writing {knob}"))?;
            }
            // `ip` runs in this thread's namespace, now the bench's.
            for (a, b) in [(GEN_IF, FWD_IF), (RDR_IF, RDR_SINK_IF)] {
                ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
            }
            for dev in [GEN_IF, FWD_IF, RDR_IF, RDR_SINK_IF] {
                ip(&["link", "set", dev, "up"])?;
            }
            Ok(())
        };
        setup()?;
        Ok(ns)
    }

    /// Returns to the original namespace and deletes this one (and its veths).
    fn remove(mut self) -> Result<()> {
        self.removed = true;
        setns(&self.home)?;
        ip(&["netns", "del", &self.name])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.removed {
            // Nothing to report to: the bench is failing already.
            let _ = setns(&self.home);
            let _ = ip(&["netns", "del", &self.name]);
        }
    }
}

/// Deletes the namespaces of bench runs that were interrupted (their process is gone).
fn remove_stale_namespaces() -> Result<()> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            ip(&["netns", "del", &name])?;
        }
    }
    Ok(())
}

fn setns(ns: &File) -> Result<()> {
    // SAFETY: a namespace file descriptor; this thread changes network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_step_visits_every_flow_once_per_cycle() {
        for flows in [1, 2, 7, 1000, MANY_FLOWS] {
            let step = flow_step(flows);
            assert!(step < flows, "{flows} flows: step {step}");
            let mut seen = vec![false; flows as usize];
            let mut flow = 0;
            for _ in 0..flows {
                assert!(!seen[flow as usize], "{flows} flows: {flow} twice");
                seen[flow as usize] = true;
                // As the bounce program steps.
                flow = (flow + step) % flows;
            }
            assert_eq!(flow, 0, "{flows} flows: the cycle closes");
        }
        // Consecutive frames are flows far apart, not neighbours in a bucket order.
        assert!(flow_step(MANY_FLOWS) > MANY_FLOWS / 2);
    }

    #[test]
    fn the_many_clients_are_distinct_lab_addresses() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..MANY_FLOWS {
            let (addr, port) = many_client(i);
            assert!(addr.starts_with("198.19.0."), "flow {i}: {addr}");
            assert!(port >= MANY_PORT, "flow {i}: port {port}");
            assert!(seen.insert((addr, port)), "flow {i} repeats another");
        }
        assert_eq!(many_client(0), ("198.19.0.1".to_string(), MANY_PORT));
        assert_eq!(many_client(1 << 14), ("198.19.0.2".to_string(), MANY_PORT));
    }

    #[test]
    fn the_bounce_run_refuses_what_it_cannot_rewrite() {
        let v4 = Frame::tcp("198.18.1.1", DR_VIP4, 40002, 80, ACK).bytes();
        let run = bounce_run(&v4, MANY_FLOWS, 10, 3).unwrap();
        assert_eq!(
            (run.flows, run.flow_step, run.flow),
            (MANY_FLOWS, flow_step(MANY_FLOWS), 0)
        );
        assert_eq!(&run.frame[..v4.len()], &v4[..]);
        let v6 = Frame::tcp("fd00:18:1::1", "fd00:18::100", 40002, 80, ACK).bytes();
        let udp = Frame::udp("198.18.1.1", DR_VIP4, 40002, 80).bytes();
        for (frame, flows) in [(&v6, 1), (&udp, 1), (&v4, 0), (&vec![0u8; 200], 1)] {
            assert!(bounce_run(frame, flows, 10, 3).is_err());
        }
    }
}
