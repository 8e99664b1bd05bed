//! `cargo xtask bench --only katran --katran-obj PATH`: xlb's balancer beside Katran's, built
//! from Katran's own sources (BENCHMARKS.md says how), on the same frames.
//!
//! Both are configured alike: one TCP VIP (IPv4 and IPv6) and one UDP VIP (IPv4), three IPIP
//! reals per family, the gateway's MAC. Before any timing, every frame must come back from both
//! as XDP_TX, encapsulated (IPIP or IPv6-in-IPv6) to one of the VIP's reals, towards the
//! gateway: a misconfigured side would otherwise be timed on a cheaper path. Timing is that of
//! bench.rs (repeat = 1 calls in rounds, the empty program `xlb_pass` as the floor); every round
//! also gives a ratio xlb / Katran of the two medians over the floor of that round.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::Global;
use xlb::{
    config::{Mode, RealConfig, ServiceConfig},
    control::Balancer,
    dataplane::{BALANCER_PROGRAM, PASS_PROGRAM, run_once},
};
use xlb_tests::{ACK, Frame, SYN, XDP_PASS, XDP_TX};

use crate::{
    bench_flows::{client, shuffle},
    bench_setup::{
        CLIENT4, CLIENT6, ROUTER_MAC, TUN_REALS4, TUN_REALS6, balancer_with_capacity,
        pin_to_one_cpu, verdict_name,
    },
    bench_stats::{ROUND, Stats, over, stats},
};

const VIP4: &str = "198.18.0.101";
const VIP6: &str = "fd00:18::101";
const UDP_PORT: u16 = 53;
/// Katran's compile-time constants (balancer_consts.h defaults).
const RING_SIZE: u32 = 65537;
const MAX_VIPS: u32 = 512;
const F_IPV6: u8 = 1;
/// `stats` keys: MAX_VIPS + LRU_CNTRS holds (packets, connection-table misses).
const LRU_CNTRS: u32 = MAX_VIPS;
/// Katran's per-CPU connection table (an LRU hash in `lru_mapping`), per CPU: Katran's
/// userspace sizes it in the millions; this is room for every flow of a run with no eviction.
const KATRAN_LRU_SIZE: u32 = 200_000;
const FLOWS: usize = 100_000;

/// Katran's `struct vip_definition`: address (IPv4 in the first word), port, protocol.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u8; 16],
    port: u16,
    proto: u8,
    pad: u8,
}

/// Katran's `struct vip_meta`.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}

/// Katran's `struct real_definition`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    addr: [u8; 16],
    flags: u8,
    pad: [u8; 3],
}

/// Katran's `struct ctl_value`: the gateway's MAC at index 0.
#[repr(C)]
#[derive(Clone, Copy)]
struct CtlValue {
    mac: [u8; 6],
    pad: [u8; 2],
}

// SAFETY: plain repr(C) data, every byte pattern valid, padding named.
unsafe impl aya::Pod for VipDefinition {}
unsafe impl aya::Pod for VipMeta {}
unsafe impl aya::Pod for RealDefinition {}
unsafe impl aya::Pod for CtlValue {}

/// Katran's balancer, loaded and configured.
struct Katran {
    ebpf: Ebpf,
}

impl Katran {
    fn load(obj: &Path) -> Result<Self> {
        let bytes = std::fs::read(obj).with_context(|| format!("reading {}", obj.display()))?;
        let mut ebpf = EbpfLoader::new()
            .load(&bytes)
            .with_context(|| format!("loading Katran's object {}", obj.display()))?;
        let prog: &mut Xdp = ebpf
            .program_mut("balancer_ingress")
            .context("no balancer_ingress program in the Katran object")?
            .try_into()?;
        prog.load().context("verifying Katran's balancer_ingress")?;
        let mut k = Katran { ebpf };
        k.configure()?;
        Ok(k)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name} in the Katran object"))
    }

    /// VIPs 0 (TCP v4), 1 (TCP v6), 2 (UDP v4); reals 1-3 (IPv4), 4-6 (IPv6); each VIP's ring
    /// spread over its family's reals; the gateway's MAC; one connection table per CPU.
    fn configure(&mut self) -> Result<()> {
        let vips = [
            (VIP4, 80, libc::IPPROTO_TCP, 1),
            (VIP6, 80, libc::IPPROTO_TCP, 4),
            (VIP4, UDP_PORT, libc::IPPROTO_UDP, 1),
        ];
        let mut vip_map: HashMap<_, VipDefinition, VipMeta> =
            HashMap::try_from(self.map("vip_map")?)?;
        for (num, &(addr, port, proto, _)) in vips.iter().enumerate() {
            let key = VipDefinition {
                addr: addr_bytes(addr.parse()?),
                port: port.to_be(),
                proto: proto as u8,
                pad: 0,
            };
            let meta = VipMeta {
                flags: 0,
                vip_num: num as u32,
            };
            vip_map.insert(key, meta, 0)?;
        }
        let mut reals: Array<_, RealDefinition> = Array::try_from(self.map("reals")?)?;
        for (i, real) in TUN_REALS4.iter().chain(&TUN_REALS6).enumerate() {
            let addr: IpAddr = real.parse()?;
            let def = RealDefinition {
                addr: addr_bytes(addr),
                flags: if addr.is_ipv6() { F_IPV6 } else { 0 },
                pad: [0; 3],
            };
            reals.set(i as u32 + 1, def, 0)?;
        }
        let mut rings: Array<_, u32> = Array::try_from(self.map("ch_rings")?)?;
        for (num, &(_, _, _, first_real)) in vips.iter().enumerate() {
            for pos in 0..RING_SIZE {
                rings.set(RING_SIZE * num as u32 + pos, first_real + pos % 3, 0)?;
            }
        }
        let mut ctl: Array<_, CtlValue> = Array::try_from(self.map("ctl_array")?)?;
        ctl.set(
            0,
            CtlValue {
                mac: ROUTER_MAC,
                pad: [0; 2],
            },
            0,
        )?;
        let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
        let mut lru_mapping: ArrayOfMaps<_, MapData> =
            ArrayOfMaps::try_from(self.map("lru_mapping")?)?;
        for cpu in cpus {
            // flow_key (40 bytes) to real_pos_lru (16 bytes), as Katran's userspace creates it.
            let obj = aya_obj_lru(40, 16, KATRAN_LRU_SIZE);
            let lru = MapData::create(obj, "katran_lru", None)?;
            lru_mapping.set(cpu, &lru, 0)?;
        }
        Ok(())
    }

    fn prog(&self) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program("balancer_ingress")
            .context("no balancer_ingress")?
            .try_into()?)
    }

    fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_once(self.prog()?, frame, None)
    }

    fn time_run(&self, frame: &[u8]) -> Result<u64> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::default()
        };
        Ok(self.prog()?.test_run(opts)?.duration.as_nanos() as u64)
    }

    /// Connection-table misses so far, all CPUs.
    fn misses(&mut self) -> Result<u64> {
        let stats: PerCpuArray<_, [u64; 2]> = PerCpuArray::try_from(self.map("stats")?)?;
        Ok(stats.get(&LRU_CNTRS, 0)?.iter().map(|v| v[1]).sum())
    }

    fn sizes(&self) -> Result<(u32, u32)> {
        let info = self.prog()?.info()?;
        Ok((info.size_translated().unwrap_or(0), info.size_jitted()))
    }
}

fn aya_obj_lru(key_size: u32, value_size: u32, max_entries: u32) -> aya_obj::Map {
    aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
        key_size,
        value_size,
        max_entries,
        0,
    )
}

/// An address as the data path holds it: network order, IPv4 in the first 4 bytes.
fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    let mut b = [0; 16];
    match addr {
        IpAddr::V4(a) => b[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => b = a.octets(),
    }
    b
}

/// xlb configured as Katran above: the TUN services of the bench's setup (TCP, both families)
/// and a UDP TUN service on the IPv4 VIP, over the same reals.
fn xlb_balancer(conn_capacity: u32) -> Result<Balancer> {
    let mut b = balancer_with_capacity(conn_capacity)?;
    let mut udp = ServiceConfig::new(format!("{VIP4}:{UDP_PORT}/udp").parse()?);
    udp.mode = Mode::Tun;
    for real in TUN_REALS4 {
        udp.reals.push(RealConfig::new(real.parse()?, 100));
    }
    b.add_service(udp)?;
    Ok(b)
}

/// Checks one program's answer to `frame`: PASS as asked, or XDP_TX with the frame
/// encapsulated (one more IPv4 or IPv6 header) to one of `reals`, towards the gateway.
fn check_forward(
    who: &str,
    path: &str,
    frame: &[u8],
    out: (u32, Vec<u8>),
    pass: bool,
) -> Result<()> {
    let (verdict, sent) = out;
    if pass {
        ensure!(
            verdict == XDP_PASS,
            "{path}: {who} returned {}, expected XDP_PASS",
            verdict_name(verdict)
        );
        return Ok(());
    }
    ensure!(
        verdict == XDP_TX,
        "{path}: {who} returned {}, expected XDP_TX",
        verdict_name(verdict)
    );
    ensure!(
        sent[..6] == ROUTER_MAC,
        "{path}: {who} did not send to the gateway's MAC"
    );
    let v6 = frame[12..14] == [0x86, 0xdd];
    let (outer_len, dst, proto) = if v6 {
        let a: [u8; 16] = sent[38..54].try_into()?;
        (40, IpAddr::from(a), sent[20])
    } else {
        let a: [u8; 4] = sent[30..34].try_into()?;
        (20, IpAddr::from(a), sent[23])
    };
    let reals = if v6 { &TUN_REALS6[..] } else { &TUN_REALS4[..] };
    ensure!(
        reals.iter().any(|r| r.parse::<IpAddr>().ok() == Some(dst)),
        "{path}: {who} encapsulated to {dst}, not one of the VIP's reals"
    );
    ensure!(
        proto == if v6 { 41 } else { 4 },
        "{path}: {who} used outer protocol {proto}, not IPIP"
    );
    ensure!(
        sent.len() == frame.len() + outer_len && sent[14 + outer_len..] == frame[14..],
        "{path}: {who} did not send the client's packet whole inside one outer header"
    );
    Ok(())
}

/// One path: its median and p99 over the floor on each side, the per-round ratios of the
/// medians, and each side's connection-table hit ratio (flows paths only).
struct Compared {
    name: String,
    xlb: Stats,
    katran: Stats,
    ratios: Vec<f64>,
    hits: Option<(f64, f64)>,
}

/// Measures `frames` (cycled, one per call) on the floor, xlb and Katran in interleaved rounds.
fn measure(
    name: &str,
    b: &mut Balancer,
    k: &Katran,
    frames: &[Vec<u8>],
    calls: usize,
) -> Result<Compared> {
    let floor_frame = &frames[0];
    let dp = b.dataplane();
    for f in frames.iter().take(ROUND) {
        dp.time_run(PASS_PROGRAM, floor_frame)?;
        dp.time_run(BALANCER_PROGRAM, f)?;
        k.time_run(f)?;
    }
    let (mut all_floor, mut all_x, mut all_k) = (Vec::new(), Vec::new(), Vec::new());
    let mut ratios = Vec::new();
    // The flows after the warm-up's, as bench_flows.rs does.
    let mut next = ROUND % frames.len();
    while all_x.len() < calls {
        let n = ROUND.min(calls - all_x.len());
        let (mut fl, mut x, mut kt) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            fl.push(dp.time_run(PASS_PROGRAM, floor_frame)?.as_nanos() as u64);
        }
        let start = next;
        for _ in 0..n {
            x.push(dp.time_run(BALANCER_PROGRAM, &frames[next])?.as_nanos() as u64);
            next = (next + 1) % frames.len();
        }
        next = start;
        for _ in 0..n {
            kt.push(k.time_run(&frames[next])?);
            next = (next + 1) % frames.len();
        }
        let floor = stats(fl.clone());
        let (xn, kn) = (
            over(stats(x.clone()), floor),
            over(stats(kt.clone()), floor),
        );
        ratios.push(xn.median as f64 / kn.median.max(1) as f64);
        all_floor.extend(fl);
        all_x.extend(x);
        all_k.extend(kt);
    }
    let floor = stats(all_floor);
    Ok(Compared {
        name: name.to_string(),
        xlb: over(stats(all_x), floor),
        katran: over(stats(all_k), floor),
        ratios,
        hits: None,
    })
}

/// The side-by-side run: hot loops, then 100,000 flows per family.
pub fn run(obj: &Path, calls: usize) -> Result<()> {
    let cpu = pin_to_one_cpu()?;
    let tcp = |src: &str, dst: &str, sport, flags| Frame::tcp(src, dst, sport, 80, flags).bytes();
    let mut rows = Vec::new();
    {
        let mut b = xlb_balancer(xlb_tests::BALANCER_CONN_CAPACITY)?;
        let k = Katran::load(obj)?;
        let udp = Frame::udp(CLIENT4, VIP4, 40002, UDP_PORT).bytes();
        let hot = [
            (
                "pass_v4",
                Frame::tcp(CLIENT4, "198.18.0.2", 40000, 22, SYN).bytes(),
                true,
            ),
            ("tun_established_v4", tcp(CLIENT4, VIP4, 40002, ACK), false),
            ("tun_established_v6", tcp(CLIENT6, VIP6, 40002, ACK), false),
            ("udp_established_v4", udp, false),
            ("tun_syn_v4", tcp(CLIENT4, VIP4, 40001, SYN), false),
        ];
        // Established flows: their first packet (a SYN for TCP) records them on both sides.
        for (src, dst) in [(CLIENT4, VIP4), (CLIENT6, VIP6)] {
            let syn = tcp(src, dst, 40002, SYN);
            b.dataplane().test_run(BALANCER_PROGRAM, &syn)?;
            k.test_run(&syn)?;
        }
        for (name, frame, pass) in &hot {
            b.dataplane().test_run(BALANCER_PROGRAM, frame)?;
            k.test_run(frame)?;
            let x = b.dataplane().test_run(BALANCER_PROGRAM, frame)?;
            check_forward("xlb", name, frame, x, *pass)?;
            check_forward("Katran", name, frame, k.test_run(frame)?, *pass)?;
        }
        let (xs, ks) = (b.dataplane().program_sizes(BALANCER_PROGRAM)?, k.sizes()?);
        println!(
            "program sizes, translated / JIT-ed bytes: xlb {} / {}, Katran {} / {}",
            xs.0, xs.1, ks.0, ks.1
        );
        eprintln!("hot loops: {calls} calls per path and side, pinned to CPU {cpu}");
        for (name, frame, _) in &hot {
            rows.push(measure(
                name,
                &mut b,
                &k,
                std::slice::from_ref(frame),
                calls,
            )?);
        }
    }
    for (name, v6) in [
        ("established_v4_100k", false),
        ("established_v6_100k", true),
    ] {
        let mut b = xlb_balancer(FLOWS as u32)?;
        let mut k = Katran::load(obj)?;
        let vip = if v6 { VIP6 } else { VIP4 };
        eprintln!("{name}: establishing {FLOWS} flows on both sides");
        let mut acks = Vec::with_capacity(FLOWS);
        for i in 0..FLOWS {
            let (addr, port) = client(i, v6);
            let syn = tcp(&addr, vip, port, SYN);
            let x = b.dataplane().test_run(BALANCER_PROGRAM, &syn)?;
            check_forward("xlb", name, &syn, x, false)?;
            check_forward("Katran", name, &syn, k.test_run(&syn)?, false)?;
            acks.push(tcp(&addr, vip, port, ACK));
        }
        shuffle(&mut acks);
        let (x_before, k_before) = (b.dataplane().global_counter(Global::ConnMiss)?, k.misses()?);
        let mut row = measure(name, &mut b, &k, &acks, calls)?;
        // Warm-up plus measured calls, on each side.
        let sent = (calls + ROUND.min(acks.len())) as f64;
        let x_miss = (b.dataplane().global_counter(Global::ConnMiss)? - x_before) as f64;
        let k_miss = (k.misses()? - k_before) as f64;
        if x_miss > sent || k_miss > sent {
            bail!("{name}: more misses than calls");
        }
        row.hits = Some((1.0 - x_miss / sent, 1.0 - k_miss / sent));
        rows.push(row);
    }
    print_rows(&rows);
    Ok(())
}

fn print_rows(rows: &[Compared]) {
    println!(
        "\nns over the empty program (median / p99); xlb / Katran: median of the per-round \
         ratios (their p10-p90)\n{:<22} {:>13} {:>13} {:>17}   hit ratio xlb / Katran",
        "path", "Katran", "xlb", "xlb / Katran"
    );
    for r in rows {
        let mut ratios = r.ratios.clone();
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| ratios[((q * ratios.len() as f64) as usize).min(ratios.len() - 1)];
        let hits = r
            .hits
            .map(|(x, k)| format!("{x:.4} / {k:.4}"))
            .unwrap_or_default();
        println!(
            "{:<22} {:>5} / {:<5} {:>5} / {:<5} {:>5.2} ({:.2}-{:.2})   {hits}",
            r.name,
            r.katran.median,
            r.katran.p99,
            r.xlb.median,
            r.xlb.p99,
            at(0.5),
            at(0.1),
            at(0.9)
        );
    }
}
