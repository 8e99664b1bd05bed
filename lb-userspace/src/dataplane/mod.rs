//! The data-plane handle: loads the embedded XDP object, attaches it, and reads and writes its
//! maps. It knows map layouts, not policy: `control` decides what goes into them. Submodules:
//! `maps` (typed map access), `tables` (the live Maglev tables), `pins` (what outlives the
//! daemon on bpffs), `sys` (the raw bpf(2) calls).

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, ProgramArray},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{Backend, DEFAULT_CONN_CAPACITY, ServiceKey, ServiceValue, conn_buckets};

mod conns;
mod maps;
mod nat;
mod pins;
mod sys;
mod tables;

pub use nat::{NatFlow, ReplyPath};
pub use pins::{DEFAULT_PIN_ROOT, PINNED_MAPS, PinDir};

use self::{
    pins::MapLayout,
    tables::{LiveTable, MaglevTables},
};

/// The compiled eBPF object, built by build.rs with the pinned nightly and bpf-linker.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-ebpf"));

/// A short digest of the embedded eBPF object (FNV-1a, 64 bits): tells which data path a
/// binary carries, so an upgrade that changes the program shows in `xlb_build_info`.
pub fn ebpf_object_digest() -> String {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST
        .get_or_init(|| {
            let hash = EBPF_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            format!("{hash:016x}")
        })
        .clone()
}

pub const BALANCER_PROGRAM: &str = "xlb_balancer";
/// The `tracing` target of the data path's own log records (lb-ebpf's log.rs).
pub const DATAPATH_LOG_TARGET: &str = "xlb_datapath";

/// Reads the data path's log records and hands them to the `log` facade (bridged to tracing).
pub type DatapathLogger = aya_log::EbpfLogger<&'static dyn log::Log>;
pub const PASS_PROGRAM: &str = "xlb_pass";
/// ICMP errors to a VIP, tail-called by the balancer through `ICMP_PROGRAM` slot 0.
pub const ICMP_PROGRAM: &str = "xlb_icmp";
/// Echo replies for VIPs, tail-called by `xlb_icmp` through `ICMP_PROGRAM` slot 1.
pub const ECHO_PROGRAM: &str = "xlb_echo";
/// NAT requests and replies, tail-called by the balancer through `NAT_PROGRAM` slots 0 and 1;
/// ICMP errors about NAT flows, tail-called by `xlb_icmp` through slot 2.
pub const NAT_FORWARD_PROGRAM: &str = "xlb_nat_forward";
pub const NAT_REPLY_PROGRAM: &str = "xlb_nat_reply";
pub const NAT_ICMP_PROGRAM: &str = "xlb_nat_icmp";
/// Tail-called by the balancer to log a drop (`--datapath-log`).
pub const DROP_LOG_PROGRAM: &str = "xlb_drop_log";

/// How the program ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        }
    }
}

/// What the operator asked for with `--xdp-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native (driver) mode, falling back to generic with a warning.
    #[default]
    Auto,
    Native,
    Generic,
}

pub struct LoadOptions {
    /// Flows the connection table holds (rounded up to whole buckets, a power of two of them;
    /// a new flow in a full bucket takes the entry seen least recently).
    pub conn_capacity: u32,
    /// Pin the maps and the link here, adopting what a previous daemon pinned (None: the data
    /// path lives and dies with this process, as in tests and benchmarks).
    pub pins: Option<PinDir>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conn_capacity: DEFAULT_CONN_CAPACITY,
            pins: None,
        }
    }
}

/// How the balancer came to be on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached now, in this mode.
    New(AttachMode),
    /// A previous daemon's pinned link, now running this binary's program (swapped in
    /// atomically: no packet meets a detached interface). Its mode is the link's.
    Adopted,
}

/// What a previous daemon left in the pinned maps, read before anything is rewritten.
#[derive(Default)]
pub struct Inherited {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    /// Backend entries in use: (id, entry).
    pub backends: Vec<(u32, Backend)>,
    /// Per service id, the backend ids its Maglev table hands new flows to.
    pub members: std::collections::HashMap<u32, std::collections::HashSet<u32>>,
}

pub struct Dataplane {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    /// The pins hold a previous daemon's data path (maps, and a link on the first interface):
    /// attaching swaps our program into the links it left.
    adopting: bool,
    /// The pin directory's lock, held while we manage it.
    _pins_lock: Option<std::fs::File>,
    tables: MaglevTables,
    /// The connection table, mapped (see `conns::Mapping`).
    conn_table: std::sync::OnceLock<conns::Mapping>,
}

impl Dataplane {
    /// Loads the balancer and the pass program into the kernel (nothing is attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let conn_buckets = conn_buckets(opts.conn_capacity);
        let conn_bucket_mask = conn_buckets - 1;
        loader
            .map_max_entries("CONNS", conn_buckets)
            .override_global("CONN_BUCKET_MASK", &conn_bucket_mask, true);
        let mut adopting = false;
        let mut pins_lock = None;
        if let Some(pins) = &opts.pins {
            pins.prepare()?;
            pins_lock = Some(pins.lock()?);
            adopting = pins.has_adoptable_link()?;
            pins.drop_changed_layouts(&map_layouts(opts.conn_capacity)?)?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for name in [
            BALANCER_PROGRAM,
            PASS_PROGRAM,
            ICMP_PROGRAM,
            ECHO_PROGRAM,
            NAT_FORWARD_PROGRAM,
            NAT_REPLY_PROGRAM,
            NAT_ICMP_PROGRAM,
        ] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .map_err(verifier_error)
                .with_context(|| format!("loading program {name}"))?;
        }
        // The map stays open with `ebpf`: the kernel empties a program array once no process
        // holds it (ICMP errors then pass to the kernel until the next daemon loads).
        install_tail_calls(&mut ebpf, "ICMP_PROGRAM", &[ICMP_PROGRAM, ECHO_PROGRAM])?;
        install_tail_calls(
            &mut ebpf,
            "NAT_PROGRAM",
            &[NAT_FORWARD_PROGRAM, NAT_REPLY_PROGRAM, NAT_ICMP_PROGRAM],
        )?;
        Ok(Self {
            ebpf,
            pins: opts.pins.clone(),
            adopting,
            _pins_lock: pins_lock,
            tables: MaglevTables::default(),
            conn_table: std::sync::OnceLock::new(),
        })
    }

    /// Whether `load` found a previous daemon's pins to adopt.
    pub fn adopting(&self) -> bool {
        self.adopting
    }

    /// The previous daemon's services, backends and table members (empty unless adopting).
    pub fn inherited(&self) -> Result<Inherited> {
        let mut inherited = Inherited::default();
        if !self.adopting {
            return Ok(inherited);
        }
        let services: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map("SERVICES")?)?;
        inherited.services = services.iter().filter_map(|r| r.ok()).collect();
        let backends: Array<_, Backend> = Array::try_from(self.map("BACKENDS")?)?;
        inherited.backends = backends
            .iter()
            .filter_map(|r| r.ok())
            .enumerate()
            .filter(|(_, b)| b.family != 0)
            .map(|(id, b)| (id as u32, b))
            .collect();
        let outer: ArrayOfMaps<_, MapData> = ArrayOfMaps::try_from(self.map("MAGLEV")?)?;
        for (_, value) in &inherited.services {
            // Opening an inner map goes by its id, which needs CAP_SYS_ADMIN (the systemd
            // unit does not grant it): without the tables, checked reals start `checking`.
            match outer.get(&value.id, 0) {
                Ok(table) => {
                    let slots = LiveTable::read(&table)?;
                    inherited
                        .members
                        .insert(value.id, slots.into_iter().collect());
                }
                Err(e) => {
                    tracing::warn!(
                        "reading the pinned Maglev tables: {e}; checked reals start checking"
                    );
                    break;
                }
            }
        }
        Ok(inherited)
    }

    fn program(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// Attaches the balancer to one interface (called for each: one program, one set of maps).
    /// `Auto` tries native mode and falls back to generic, logging why. With pins, a previous
    /// daemon's link on the interface is adopted (our program swapped in atomically), or the
    /// new link is pinned so the data path outlives us.
    pub fn attach(
        &mut self,
        iface: &str,
        ifindex: u32,
        choice: XdpModeChoice,
    ) -> Result<Attachment> {
        let link_pin = self.pins.as_ref().map(|p| p.link_of(iface));
        if let (Some(pins), Some(path)) = (&self.pins, &link_pin)
            && self.adopting
            && pins.adoptable_link(path, ifindex)?
        {
            let link = PinnedLink::from_pin(path)
                .with_context(|| format!("opening {}", path.display()))?;
            let link = XdpLink::try_from(FdLink::from(link))
                .context("the pinned link is not an XDP link")?;
            self.program(BALANCER_PROGRAM)?
                .attach_to_link(link)
                .context("swapping the program into the pinned link")?;
            return Ok(Attachment::Adopted);
        }
        let (id, mode) = match self.attach_new(iface, choice) {
            Ok(attached) => attached,
            Err(e) => {
                // A fresh data path that cannot attach leaves nothing behind; an adopted one
                // keeps forwarding on the interfaces it had.
                if let Some(pins) = self.pins.as_ref().filter(|_| !self.adopting) {
                    pins.discard();
                }
                return Err(e);
            }
        };
        if let Some(path) = link_pin {
            let link = self.program(BALANCER_PROGRAM)?.take_link(id)?;
            let link = FdLink::try_from(link)
                .context("the kernel attached XDP without a bpf_link, which cannot be pinned")?;
            // The pin keeps the link (and the program) on the interface after we exit.
            link.pin(&path)
                .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
        }
        Ok(Attachment::New(mode))
    }

    fn attach_new(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
    ) -> Result<(XdpLinkId, AttachMode)> {
        let prog = self.program(BALANCER_PROGRAM)?;
        let attempt = |prog: &mut Xdp, mode: AttachMode| {
            let flags = match mode {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Generic => XdpMode::Skb,
            };
            prog.attach(iface, flags).map_err(|e| {
                anyhow!(
                    "cannot attach XDP to {iface} in {} mode: {}",
                    mode.as_str(),
                    error_chain(&e)
                )
            })
        };
        let (link, mode) = match choice {
            XdpModeChoice::Native => (attempt(prog, AttachMode::Native)?, AttachMode::Native),
            XdpModeChoice::Generic => (attempt(prog, AttachMode::Generic)?, AttachMode::Generic),
            XdpModeChoice::Auto => match attempt(prog, AttachMode::Native) {
                Ok(link) => (link, AttachMode::Native),
                Err(native_err) => {
                    tracing::warn!("{native_err:#}; falling back to generic mode");
                    (attempt(prog, AttachMode::Generic)?, AttachMode::Generic)
                }
            },
        };
        Ok((link, mode))
    }

    /// Attaches the pass-everything program (for a veth peer that must receive XDP_TX frames).
    pub fn attach_pass(&mut self, iface: &str) -> Result<()> {
        let prog = self.program(PASS_PROGRAM)?;
        prog.attach(iface, XdpMode::Driver)
            .or_else(|_| prog.attach(iface, XdpMode::Skb))
            .map_err(|e| anyhow!("cannot attach XDP to {iface}: {}", error_chain(&e)))?;
        Ok(())
    }

    /// Turns on the data path's drop log: loads `xlb_drop_log` into the slot the balancer
    /// tail-calls, and takes the log ring buffer, whose records go to `tracing` (through the
    /// `log` bridge) on `flush`. The balancer calls it only while the control plane sets
    /// `CONFIG_F_DATAPATH_LOG`.
    pub fn start_datapath_log(&mut self) -> Result<DatapathLogger> {
        let prog = self.program(DROP_LOG_PROGRAM)?;
        prog.load()
            .map_err(verifier_error)
            .with_context(|| format!("loading program {DROP_LOG_PROGRAM}"))?;
        let fd = prog.fd()?.try_clone()?;
        let mut slots = ProgramArray::try_from(self.map_mut("DROP_LOG_PROGRAM")?)?;
        slots.set(0, &fd, 0)?;
        aya_log::EbpfLogger::init(&mut self.ebpf).context("opening the data path's log buffer")
    }

    /// The ring buffer of refusals the data path honoured (one `RefusalEvent` each), for the
    /// daemon to take refusing reals down at once. Taken once.
    pub fn take_refusals(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        self.take_ring("REFUSALS")
    }

    /// The ring buffer of new flows' entries (one `SyncEvent` each, while `CONFIG_F_SYNC` is
    /// on), for the daemon to send to its peer directors. Taken once.
    pub fn take_sync_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        self.take_ring("SYNC_EVENTS")
    }

    fn take_ring(&mut self, name: &str) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object (or taken)"))?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    pub(super) fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    pub(super) fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    /// Runs a program once on `frame` with BPF_PROG_TEST_RUN: the verdict and the frame after.
    /// The frame arrives on lo.
    pub fn test_run(&mut self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.test_run_on(program, frame, None)
    }

    /// `test_run`, the frame arriving on the interface `ingress` (lo if None).
    pub fn test_run_on(
        &mut self,
        program: &str,
        frame: &[u8],
        ingress: Option<u32>,
    ) -> Result<(u32, Vec<u8>)> {
        run_once(self.program(program)?, frame, ingress)
    }

    /// Runs `program` on CPU i over `frames[i]`, every CPU at once, one thread each
    /// (BPF_PROG_TEST_RUN runs an XDP program on the calling thread's CPU): how tests make
    /// CPUs race for shared state. Verdicts and output frames, by CPU.
    pub fn test_run_on_cpus(
        &mut self,
        program: &str,
        frames: &[Vec<Vec<u8>>],
    ) -> Result<Vec<Vec<TestRunOutput>>> {
        let prog: &Xdp = self.program(program)?;
        std::thread::scope(|scope| {
            let threads: Vec<_> = frames
                .iter()
                .enumerate()
                .map(|(cpu, frames)| {
                    scope.spawn(move || {
                        pin_to_cpu(cpu)?;
                        frames
                            .iter()
                            .map(|f| run_once(prog, f, None))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .map_err(|_| anyhow!("a test-run thread panicked"))?
                })
                .collect()
        })
    }

    /// A loaded program's size: translated (after the verifier) and JIT-ed, in bytes.
    pub fn program_sizes(&mut self, program: &str) -> Result<(u32, u32)> {
        let info = self.program(program)?.info()?;
        Ok((info.size_translated().unwrap_or(0), info.size_jitted()))
    }

    /// Runs a program once and returns the kernel-measured duration (for benchmarks).
    pub fn time_run(&mut self, program: &str, frame: &[u8]) -> Result<std::time::Duration> {
        let prog = self.program(program)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::default()
        };
        Ok(prog.test_run(opts)?.duration)
    }
}

/// A test run's verdict and output frame.
pub type TestRunOutput = (u32, Vec<u8>);

/// Runs `prog` once on `frame`, arriving on the interface `ingress` (lo if None). Public for
/// benches that load other XDP programs (bench_katran.rs).
pub fn run_once(prog: &Xdp, frame: &[u8], ingress: Option<u32>) -> Result<TestRunOutput> {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = ingress.map(|i| xdp_md(frame, i));
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx.as_ref().map(|c| &c[..]),
        repeat: 1,
        ..TestRunOptions::default()
    };
    let result = prog.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "pinning a thread to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Every record waiting in a ring buffer the data path writes `T`s to (`REFUSALS`,
/// `SYNC_EVENTS`), in order; records of another size are skipped.
pub fn ring_records<T: aya::Pod>(ring: &mut aya::maps::RingBuf<MapData>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() == size_of::<T>() {
            // SAFETY: T is plain data of that size; read unaligned.
            out.push(unsafe { (item.as_ptr() as *const T).read_unaligned() });
        }
    }
    out
}

/// Puts `programs` in the program array `map`, slot by slot.
fn install_tail_calls(ebpf: &mut aya::Ebpf, map: &str, programs: &[&str]) -> Result<()> {
    let mut fds = Vec::new();
    for name in programs {
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        fds.push(prog.fd()?.try_clone()?);
    }
    let slots = ebpf
        .map_mut(map)
        .ok_or_else(|| anyhow!("map {map} missing from the object"))?;
    let mut slots = ProgramArray::try_from(slots)?;
    for (slot, fd) in fds.iter().enumerate() {
        slots
            .set(slot as u32, fd, 0)
            .with_context(|| format!("installing {} in {map}", programs[slot]))?;
    }
    Ok(())
}

/// A `struct xdp_md` for BPF_PROG_TEST_RUN: data 0, data_end the frame's length, data_meta 0,
/// then the ingress interface (rx queue 0, egress 0).
fn xdp_md(frame: &[u8], ingress: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
    ctx
}

/// The layouts this binary's program declares for the pinned maps (CONNS at the capacity asked).
fn map_layouts(conn_capacity: u32) -> Result<Vec<(&'static str, MapLayout)>> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    PINNED_MAPS
        .iter()
        .map(|&name| {
            let map = object
                .maps
                .get(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))?;
            Ok((
                name,
                MapLayout {
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries: if name == "CONNS" {
                        conn_buckets(conn_capacity)
                    } else {
                        map.max_entries()
                    },
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
}

/// The verifier's log is long; keep its last lines, which say what failed.
pub(crate) fn verifier_error(e: ProgramError) -> anyhow::Error {
    let text = format!("{e:?}");
    let tail: Vec<&str> = text.lines().rev().take(400).collect();
    anyhow!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
