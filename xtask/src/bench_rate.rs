//! Forwarding rate on one core: Mpps through a veth pair, for DR and TUN against a ceiling.
//!
//! Inside a network namespace of its own the bench makes one veth pair, `gen` <-> `fwd`. The
//! generator (`xlb_bench_gen`) runs in BPF_PROG_RUN's live-frames mode with `gen` as its
//! ingress interface: every frame it returns XDP_TX for really leaves through `gen`. On `fwd`
//! (native XDP) sits the forwarder under test, which sends the frame back with XDP_TX; on
//! `gen` a sink (`xlb_bench_sink`) counts and drops it. The veth hands frames to its peer's
//! NAPI on the sending CPU, so with the process pinned the whole path runs on one core.
//!
//! The forwarders, in interleaved rounds: `xlb_bench_swap` (swap MACs, XDP_TX: the ceiling of
//! this setup), the balancer on an established DR flow, and on an established TUN flow. Each
//! path's figure is its median over the rounds; its ratio is that over the ceiling's median.
//!
//! The NAT paths: the NAT director of bench.rs on `fwd`, on an established NAT and full-NAT
//! flow's requests and on their reals' replies (each translated back and sent out of `fwd`).
//!
//! The redirect path (a two-arm director): a second pair `rdr` <-> `rdrsink`, the DR reals
//! reached through `rdr`. The balancer on `fwd` sends the DR flow's frames by XDP_REDIRECT
//! into `rdr`, and a second sink on `rdrsink` counts them (the peer of a veth a frame is
//! redirected into must run an XDP program for it to be delivered).

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
    maps::PerCpuArray,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
};
use lb_common::Global;
use serde_json::{Map, Value, json};
use xlb::{
    control::Balancer,
    dataplane::{EBPF_OBJECT, XdpModeChoice},
};

use xlb_tests::DIRECTOR_MAC;

use crate::bench_setup;

/// The namespace's name is this prefix and the bench's pid, so that two runs never share one.
const NETNS_PREFIX: &str = "xlb-bench-";
const GEN_IF: &str = "gen";
const FWD_IF: &str = "fwd";
const RDR_IF: &str = "rdr";
const RDR_SINK_IF: &str = "rdrsink";
/// Frames BPF_PROG_RUN hands the generator per batch (the kernel's default).
const BATCH: u32 = 64;

pub const DEFAULT_FRAMES: u32 = 2_000_000;
pub const QUICK_FRAMES: u32 = 300_000;
const DEFAULT_ROUNDS: usize = 5;
const QUICK_ROUNDS: usize = 3;

/// The rate goal of the issue: DR and TUN at least this share of the ceiling.
pub const GOAL: f64 = 0.85;

/// The measured paths, the ceiling first.
const CEILING: &str = "ceiling";
const PATHS: [&str; 8] = [
    CEILING,
    "dr_established_v4",
    "tun_established_v4",
    "dr_redirect_v4",
    "nat_established_v4",
    "nat_reply_v4",
    "fullnat_established_v4",
    "fullnat_reply_v4",
];

/// One run of one path, in millions of frames per second.
#[derive(Clone, Copy)]
struct Sample {
    /// Over the kernel's time in the run.
    mpps: f64,
    /// Over the wall-clock time of the syscall.
    wall_mpps: f64,
}

/// One path's figures.
pub struct Rate {
    pub name: &'static str,
    /// Median over the rounds, in millions of frames per second (kernel time).
    pub mpps: f64,
    /// Each round's figure.
    pub rounds: Vec<f64>,
    /// The median over the ceiling's median.
    pub ratio: f64,
    /// Median over the rounds by the wall clock (lower when other tasks share the CPU).
    pub wall_mpps: f64,
}

pub struct Rates {
    pub frames: u32,
    pub rows: Vec<Rate>,
}

impl Rates {
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("frames_per_round".into(), json!(self.frames));
        m.insert("goal_ratio".into(), json!(GOAL));
        for r in &self.rows {
            m.insert(
                r.name.into(),
                json!({
                    "mpps": round2(r.mpps),
                    "ratio": round2(r.ratio),
                    "rounds_mpps": r.rounds.iter().map(|&x| round2(x)).collect::<Vec<_>>(),
                    "wall_mpps": round2(r.wall_mpps),
                }),
            );
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
    ns.remove()?;
    let rows = result?;
    let rates = Rates { frames, rows };
    print_table(&rates);
    Ok(rates)
}

/// Runs inside the namespace; everything loaded here is gone (detached) when it returns.
fn measure(frames: u32, rounds: usize) -> Result<Vec<Rate>> {
    let mut bench_progs = BenchPrograms::load()?;
    bench_progs.attach_sink(GEN_IF)?;
    bench_progs.attach_sink(RDR_SINK_IF)?;
    let gen_ifindex = ifindex(GEN_IF)?;
    let fwd = ifindex(FWD_IF)?;
    let rdr = ifindex(RDR_IF)?;

    let mut samples: Vec<Vec<Sample>> = PATHS.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        // The data-path bench's services, one established flow per mode. Dropped at the end
        // of the round, which detaches it.
        let mut balancer = bench_setup::balancer_with_services()?;
        let (dr, tun) = frames_of_established_flows(&mut balancer)?;

        // The ceiling and the balancer take turns on the same pair.
        let link = bench_progs.attach_swap(FWD_IF)?;
        samples[0].push(bench_progs.rate(gen_ifindex, &dr, frames, None)?);
        bench_progs.detach_swap(link)?;

        bench_setup::move_reals(&mut balancer, &[(fwd, DIRECTOR_MAC)], fwd, fwd)?;
        balancer
            .dataplane()
            .attach(FWD_IF, fwd, XdpModeChoice::Native)?;
        samples[1].push(bench_progs.rate(gen_ifindex, &dr, frames, Some(&mut balancer))?);
        samples[2].push(bench_progs.rate(gen_ifindex, &tun, frames, Some(&mut balancer))?);

        let ifaces = [(fwd, DIRECTOR_MAC), (rdr, DIRECTOR_MAC)];
        bench_setup::move_reals(&mut balancer, &ifaces, fwd, rdr)?;
        samples[3].push(bench_progs.rate(gen_ifindex, &dr, frames, Some(&mut balancer))?);
        drop(balancer);

        // The NAT director (bench.rs's), its flows started on `fwd` so that their replies
        // leave there too: each flow's requests, then its real's replies.
        let mut nat = bench_setup::nat_balancer()?;
        bench_setup::move_reals(&mut nat, &[(fwd, DIRECTOR_MAC)], fwd, fwd)?;
        let flows = [
            bench_setup::establish_nat(&mut nat, bench_setup::NAT_VIP4, 40002, Some(fwd))?,
            bench_setup::establish_nat(&mut nat, bench_setup::FULLNAT_VIP4, 40002, Some(fwd))?,
        ];
        nat.dataplane().attach(FWD_IF, fwd, XdpModeChoice::Native)?;
        for (i, (request, reply)) in flows.iter().enumerate() {
            samples[4 + 2 * i].push(bench_progs.rate(
                gen_ifindex,
                request,
                frames,
                Some(&mut nat),
            )?);
            samples[5 + 2 * i].push(bench_progs.rate_replies(
                gen_ifindex,
                reply,
                frames,
                &mut nat,
            )?);
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
        })
        .collect())
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
        "{:<20} {:>8} {:>10} {:>10}  rounds (Mpps)",
        "forwarding", "Mpps", "of ceiling", "wall Mpps"
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
        println!(
            "{:<20} {:>8.2} {:>10.2} {:>10.2}  {}  {status}",
            r.name,
            r.mpps,
            r.ratio,
            r.wall_mpps,
            rounds.join(" ")
        );
    }
}

/// The generator, the sink and the ceiling, from a load of the xlb object of their own.
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
        for name in ["xlb_bench_gen", "xlb_bench_sink", "xlb_bench_swap"] {
            xdp(&mut ebpf, name)?
                .load()
                .with_context(|| format!("loading program {name}"))?;
        }
        Ok(Self { ebpf })
    }

    fn attach_sink(&mut self, iface: &str) -> Result<()> {
        xdp(&mut self.ebpf, "xlb_bench_sink")?
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching the sink to {iface}"))?;
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

    /// Sends `frames` copies of `frame` out of the generator's interface and returns the rate. Checks that every frame came back to the
    /// sink (and, for the balancer, that it forwarded every one of them).
    fn rate(
        &mut self,
        gen_ifindex: u32,
        frame: &[u8],
        frames: u32,
        balancer: Option<&mut Balancer>,
    ) -> Result<Sample> {
        self.rate_counted(
            gen_ifindex,
            frame,
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
            frames,
            Some((balancer, Global::NatReplied)),
        )
    }

    /// `rate`, checking that the balancer's counter `sent` (if any) counted every frame.
    fn rate_counted(
        &mut self,
        gen_ifindex: u32,
        frame: &[u8],
        frames: u32,
        balancer: Option<(&mut Balancer, Global)>,
    ) -> Result<Sample> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. Live frames enter as if received on `gen`.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&gen_ifindex.to_ne_bytes());
        let mut balancer = balancer;
        let counted_before = match &mut balancer {
            Some((b, counter)) => Some(b.dataplane().global_counter(*counter)?),
            None => None,
        };
        let before = self.received()?;
        let prog = xdp(&mut self.ebpf, "xlb_bench_gen")?;
        let start = Instant::now();
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx),
                repeat: frames,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
            .context("running the generator in live-frames mode")?;
        let elapsed = start.elapsed();
        let received = self.settled_received(before)?;
        ensure!(
            result.return_value == 0,
            "the generator's run returned {}",
            result.return_value
        );
        ensure!(
            received == frames as u64,
            "the sink received {received} of {frames} frames"
        );
        if let (Some((b, counter)), Some(before)) = (balancer, counted_before) {
            let n = b.dataplane().global_counter(counter)? - before;
            ensure!(
                n == frames as u64,
                "the balancer counted {n} of {frames} frames in {}",
                counter.name()
            );
        }
        // The kernel's figure is its time in the loop per frame: on this CPU, the frames'
        // whole trip included (the softirqs run as the loop re-enables them), the time other
        // tasks had the CPU excluded. The wall clock includes that time.
        let kernel_ns = result.duration.as_nanos() as f64;
        ensure!(kernel_ns > 0.0, "the kernel reported no run time");
        Ok(Sample {
            mpps: 1e3 / kernel_ns,
            wall_mpps: frames as f64 / elapsed.as_secs_f64() / 1e6,
        })
    }

    /// The sink's count once it stops moving (the last frames may still be in flight).
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

/// The bench's network namespace, entered by this thread while it exists.
struct Netns {
    name: String,
    home: File,
}

impl Netns {
    fn create() -> Result<Self> {
        remove_stale_namespaces()?;
        let name = format!("{NETNS_PREFIX}{}", std::process::id());
        let home = File::open("/proc/self/ns/net").context("opening this netns")?;
        ip(&["netns", "add", &name])?;
        let ns = Self { name, home };
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
        if let Err(e) = setup() {
            let _ = ns.remove();
            return Err(e);
        }
        Ok(ns)
    }

    /// Returns to the original namespace and deletes this one (and its veths).
    fn remove(self) -> Result<()> {
        setns(&self.home)?;
        ip(&["netns", "del", &self.name])
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
