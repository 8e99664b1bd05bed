//! The data-plane handle: loads the embedded XDP object, attaches it, and reads and writes its
//! maps. It knows map layouts, not policy: `balancer.rs` decides what goes into them.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, IterableMap, MapData, PerCpuArray, ProgramArray},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    Backend, Config, ConnKey, ConnValue, Counters, DEFAULT_CONN_CAPACITY, Global, ServiceKey,
    ServiceValue,
};

use crate::pins::{MapLayout, PINNED_MAPS, PinDir};

/// The compiled eBPF object, built by build.rs with the pinned nightly and bpf-linker.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb-ebpf"));

pub const BALANCER_PROGRAM: &str = "xlb_balancer";
/// The `tracing` target of the data path's own log records (lb-ebpf's log.rs).
pub const DATAPATH_LOG_TARGET: &str = "xlb_datapath";

/// Reads the data path's log records and hands them to the `log` facade (bridged to tracing).
pub type DatapathLogger = aya_log::EbpfLogger<&'static dyn log::Log>;
pub const PASS_PROGRAM: &str = "xlb_pass";
/// ICMP errors to a VIP, tail-called by the balancer through `ICMP_PROGRAM` slot 0.
pub const ICMP_PROGRAM: &str = "xlb_icmp";
/// Tail-called by the balancer to log a drop (`--datapath-log`).
pub const DROP_LOG_PROGRAM: &str = "xlb_drop_log";

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;
const BPF_F_INNER_MAP: u32 = 1 << 12;

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
    /// Flows the connection table holds before the least recently used is evicted.
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

/// A service's Maglev table: its own kernel map, kept mapped so that a change writes only the
/// slots that differ, in place: no new map, no swap in the outer map, whose every update makes
/// the kernel wait a full RCU grace period (about 10 ms here). Each slot is one aligned u32,
/// so a packet reads a slot's old value or its new one; the balancer writes a real's backend
/// entry before slots point at it and clears it only after they no longer do.
struct LiveTable {
    /// `[size, 0]` then the slots (see lb-ebpf's maps.rs); the mapping keeps the map alive.
    base: NonNull<u32>,
    len: usize,
    slots: usize,
}

// SAFETY: the mapping is owned by this value alone and only written through `&mut self`.
unsafe impl Send for LiveTable {}

impl LiveTable {
    /// Creates an inner map filled with `slots`: the map (to publish) and its live mapping.
    fn create(slots: &[u32]) -> Result<(MapData, Self)> {
        let entries = slots.len().div_ceil(2) as u32 + 1;
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY,
            4,
            8,
            entries,
            BPF_F_INNER_MAP | BPF_F_MMAPABLE,
        );
        let map =
            MapData::create(obj, "xlb_maglev", None).context("creating a Maglev table map")?;
        let len = entries as usize * 8;
        // Unmapped when the LiveTable drops.
        let base = map_table(&map, len, libc::PROT_READ | libc::PROT_WRITE)?;
        let table = Self {
            base,
            len,
            slots: slots.len(),
        };
        // SAFETY: the mapping holds 2 + slots.len() u32s; the map is not published yet.
        unsafe {
            table.base.as_ptr().write(slots.len() as u32);
            std::ptr::copy_nonoverlapping(slots.as_ptr(), table.base.as_ptr().add(2), slots.len());
        }
        Ok((map, table))
    }

    /// Writes the slots that differ from `slots` (same size); how many it wrote.
    fn update(&mut self, slots: &[u32]) -> usize {
        assert_eq!(slots.len(), self.slots, "a live table keeps its size");
        let mut written = 0;
        for (i, &want) in slots.iter().enumerate() {
            // SAFETY: i < self.slots, inside the mapping; volatile, as the data path reads it.
            unsafe {
                let slot = self.base.as_ptr().add(2 + i);
                if slot.read_volatile() != want {
                    slot.write_volatile(want);
                    written += 1;
                }
            }
        }
        written
    }

    /// The slots of a published table (the mapping is read-only and unmapped before return).
    fn read(map: &MapData) -> Result<Vec<u32>> {
        let entries = map.info()?.max_entries() as usize;
        let len = entries * 8;
        let base = map_table(map, len, libc::PROT_READ)?.as_ptr();
        // SAFETY: the mapping holds `entries` 8-byte elements: `[size, 0]`, then the slots.
        unsafe {
            let size = (base.read() as usize).min(entries.saturating_sub(1) * 2);
            let slots = std::slice::from_raw_parts(base.add(2), size).to_vec();
            libc::munmap(base.cast(), len);
            Ok(slots)
        }
    }
}

/// Maps the first `len` bytes of a Maglev table map (mmapable) shared, with protection `prot`;
/// the caller unmaps it.
fn map_table(map: &MapData, len: usize, prot: libc::c_int) -> Result<NonNull<u32>> {
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh mapping of an mmapable map of at least `len` bytes; no memory of ours is
    // touched.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if addr == libc::MAP_FAILED {
        bail!(
            "mmap of a Maglev table: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(NonNull::new(addr as *mut u32).expect("mmap returned null"))
}

impl Drop for LiveTable {
    fn drop(&mut self) {
        // SAFETY: mapped in create with this length; nothing else refers to it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The Maglev tables this process published (by service id), and, while a bulk change runs,
/// new tables and service entries waiting to be written together.
#[derive(Default)]
struct MaglevTables {
    live: std::collections::HashMap<u32, LiveTable>,
    deferring: bool,
    new_tables: Vec<(u32, MapData)>,
    new_services: Vec<(ServiceKey, ServiceValue)>,
}

/// Queued tables are flushed at this many, so their fds stay well under the fd limit.
const MAX_QUEUED_TABLES: usize = 256;

pub struct Dataplane {
    ebpf: Ebpf,
    attached: Option<(XdpLinkId, Option<AttachMode>)>,
    pins: Option<PinDir>,
    /// The pins hold a link to our interface: attaching swaps our program into it.
    adopting: bool,
    /// The pin directory's lock, held while we manage it.
    _pins_lock: Option<std::fs::File>,
    tables: MaglevTables,
}

impl Dataplane {
    /// Loads the balancer and the pass program into the kernel (nothing is attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("CONNS", opts.conn_capacity);
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
        for name in [BALANCER_PROGRAM, PASS_PROGRAM, ICMP_PROGRAM] {
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
        let icmp: &mut Xdp = ebpf
            .program_mut(ICMP_PROGRAM)
            .ok_or_else(|| anyhow!("program {ICMP_PROGRAM} missing from the object"))?
            .try_into()?;
        let icmp_fd = icmp.fd()?.try_clone()?;
        let slots = ebpf
            .map_mut("ICMP_PROGRAM")
            .ok_or_else(|| anyhow!("map ICMP_PROGRAM missing from the object"))?;
        ProgramArray::try_from(slots)?
            .set(0, &icmp_fd, 0)
            .context("installing the ICMP program")?;
        Ok(Self {
            ebpf,
            attached: None,
            pins: opts.pins.clone(),
            adopting,
            _pins_lock: pins_lock,
            tables: MaglevTables::default(),
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

    /// Attaches the balancer. `Auto` tries native mode and falls back to generic, logging why.
    /// With pins, a previous daemon's link is adopted (our program swapped in atomically), or
    /// the new link is pinned so the data path outlives us.
    pub fn attach(&mut self, iface: &str, choice: XdpModeChoice) -> Result<Attachment> {
        if self.adopting {
            let pins = self.pins.clone().expect("adopting implies pins");
            let link = PinnedLink::from_pin(pins.link())
                .with_context(|| format!("opening {}", pins.link().display()))?;
            let link = XdpLink::try_from(FdLink::from(link))
                .context("the pinned link is not an XDP link")?;
            let prog = self.program(BALANCER_PROGRAM)?;
            let id = prog
                .attach_to_link(link)
                .context("swapping the program into the pinned link")?;
            self.attached = Some((id, None));
            return Ok(Attachment::Adopted);
        }
        let mode = match self.attach_new(iface, choice) {
            Ok(mode) => mode,
            Err(e) => {
                if let Some(pins) = &self.pins {
                    pins.discard();
                }
                return Err(e);
            }
        };
        if let Some(pins) = self.pins.clone() {
            let (id, _) = self.attached.take().expect("just attached");
            let link = self.program(BALANCER_PROGRAM)?.take_link(id)?;
            let link = FdLink::try_from(link)
                .context("the kernel attached XDP without a bpf_link, which cannot be pinned")?;
            // The pin keeps the link (and the program) on the interface after we exit.
            link.pin(pins.link())
                .with_context(|| format!("pinning the XDP link at {}", pins.link().display()))?;
        }
        Ok(Attachment::New(mode))
    }

    fn attach_new(&mut self, iface: &str, choice: XdpModeChoice) -> Result<AttachMode> {
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
        self.attached = Some((link, Some(mode)));
        Ok(mode)
    }

    /// Attaches the pass-everything program (for a veth peer that must receive XDP_TX frames).
    pub fn attach_pass(&mut self, iface: &str) -> Result<()> {
        let prog = self.program(PASS_PROGRAM)?;
        prog.attach(iface, XdpMode::Driver)
            .or_else(|_| prog.attach(iface, XdpMode::Skb))
            .map_err(|e| anyhow!("cannot attach XDP to {iface}: {}", error_chain(&e)))?;
        Ok(())
    }

    pub fn set_config(&mut self, config: Config) -> Result<()> {
        let mut map: Array<_, Config> = Array::try_from(self.map_mut("CONFIG")?)?;
        map.set(0, config, 0)?;
        Ok(())
    }

    pub fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        if self.tables.deferring {
            // After the tables queued before it (see `defer_publishing`).
            self.tables.new_services.push((key, value));
            return Ok(());
        }
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut("SERVICES")?)?;
        map.insert(key, value, 0)?;
        Ok(())
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.tables.new_services.retain(|(k, _)| k != key);
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut("SERVICES")?)?;
        // Absent already (a service whose setup failed half-way) is fine: the goal is reached.
        if map.get(key, 0).is_ok() {
            map.remove(key)?;
        }
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        let mut map: Array<_, Backend> = Array::try_from(self.map_mut("BACKENDS")?)?;
        map.set(id, backend, 0)?;
        Ok(())
    }

    /// Publishes a service's Maglev table. A table of the same size already published by this
    /// process is rewritten in place, only its changed slots (see `LiveTable`); otherwise a new
    /// map is filled completely, then swapped in with one update of the outer map, so packets
    /// see either the old table or the new one.
    pub fn set_maglev(&mut self, service_id: u32, slots: &[u32]) -> Result<()> {
        if let Some(live) = self.tables.live.get_mut(&service_id)
            && live.slots == slots.len()
        {
            live.update(slots);
            return Ok(());
        }
        let (map, live) = LiveTable::create(slots)?;
        if self.tables.deferring {
            self.tables.new_tables.retain(|(id, _)| *id != service_id);
            self.tables.new_tables.push((service_id, map));
            self.tables.live.insert(service_id, live);
            if self.tables.new_tables.len() >= MAX_QUEUED_TABLES {
                self.write_queued()?;
            }
            return Ok(());
        }
        let mut outer: ArrayOfMaps<_, MapData> = ArrayOfMaps::try_from(self.map_mut("MAGLEV")?)?;
        outer
            .set(service_id, &map, 0)
            .context("publishing a Maglev table")?;
        // Our fd is closed here; the kernel keeps the map alive while the outer map refers to
        // it, and our mapping while we keep it.
        self.tables.live.insert(service_id, live);
        Ok(())
    }

    /// From here until `publish_deferred`, new Maglev tables and service entries are queued and
    /// written together: the tables in one batch update of the outer map (one RCU grace period
    /// for all, instead of one each), then the service entries, so no packet meets a service
    /// without its table. Everything else is written at once. For bulk changes (`restore`).
    pub fn defer_publishing(&mut self) {
        self.tables.deferring = true;
    }

    /// Writes what was queued since `defer_publishing` and stops queueing.
    pub fn publish_deferred(&mut self) -> Result<()> {
        let result = self.write_queued();
        self.tables.deferring = false;
        result
    }

    fn write_queued(&mut self) -> Result<()> {
        let tables = std::mem::take(&mut self.tables.new_tables);
        let services = std::mem::take(&mut self.tables.new_services);
        if !tables.is_empty() {
            let ids: Vec<u32> = tables.iter().map(|(id, _)| *id).collect();
            let fds: Vec<u32> = tables
                .iter()
                .map(|(_, m)| m.fd().as_fd().as_raw_fd() as u32)
                .collect();
            let fd = map_fd(self.map("MAGLEV")?).as_raw_fd();
            let mut attr = BatchAttr {
                keys: ids.as_ptr() as u64,
                values: fds.as_ptr() as u64,
                count: ids.len() as u32,
                map_fd: fd as u32,
                ..BatchAttr::default()
            };
            bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr)
                .with_context(|| format!("publishing {} Maglev tables", ids.len()))?;
        }
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut("SERVICES")?)?;
        for (key, value) in services {
            map.insert(key, value, 0)?;
        }
        Ok(())
    }

    /// Drops a service's Maglev table, freeing its memory (its packets then find no backend).
    pub fn clear_maglev(&mut self, service_id: u32) -> Result<()> {
        self.tables.live.remove(&service_id);
        self.tables.new_tables.retain(|(id, _)| *id != service_id);
        let aya::maps::Map::ArrayOfMaps(outer) = self.map("MAGLEV")? else {
            bail!("map MAGLEV is not an array of maps");
        };
        // aya has no delete for map-of-maps arrays; BPF_MAP_DELETE_ELEM clears the slot.
        #[repr(C)]
        struct DeleteAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
        let attr = DeleteAttr {
            map_fd: outer.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: &service_id as *const u32 as u64,
            value: 0,
            flags: 0,
        };
        // SAFETY: attr points to a valid key for the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_DELETE_ELEM,
                &attr as *const DeleteAttr,
                std::mem::size_of::<DeleteAttr>(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOENT) {
                bail!("clearing Maglev table {service_id}: {err}");
            }
        }
        Ok(())
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(self.map("SERVICE_STATS")?, id)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        sum_counters(self.map("BACKEND_STATS")?, id)
    }

    /// Resets one backend's counters (its id is being given to another real).
    pub fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        let mut map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map_mut("BACKEND_STATS")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        map.set(id, vec![Counters::default(); cpus].try_into()?, 0)?;
        Ok(())
    }

    pub fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        let mut map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map_mut("SERVICE_STATS")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        map.set(id, vec![Counters::default(); cpus].try_into()?, 0)?;
        Ok(())
    }

    pub fn global_counter(&self, which: Global) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map("GLOBAL_STATS")?)?;
        Ok(map.get(&(which as u32), 0)?.iter().sum())
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

    /// The connection table's capacity, as the kernel has it.
    pub fn conn_capacity(&self) -> Result<u32> {
        let map: HashMap<_, ConnKey, ConnValue> = HashMap::try_from(self.map("CONNS")?)?;
        Ok(map.map().info()?.max_entries())
    }

    /// Every tracked flow (a walk of the whole table: for status, metrics and tests, not per
    /// packet). Read with BPF_MAP_LOOKUP_BATCH, thousands of flows per syscall: a key-by-key
    /// walk takes two syscalls a flow, about 1 us each, a second per million flows.
    pub fn conns(&self) -> Result<Vec<(ConnKey, ConnValue)>> {
        let fd = map_fd(self.map("CONNS")?).as_raw_fd();
        const CHUNK: usize = 8192;
        let mut keys = vec![ConnKey::default(); CHUNK];
        let mut values = vec![ConnValue::default(); CHUNK];
        let mut out = Vec::new();
        // The kernel's cursor (a bucket index for hash maps); none on the first call.
        let mut cursor: u32 = 0;
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &cursor as *const u32 as u64
                },
                out_batch: &mut cursor as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: CHUNK as u32,
                map_fd: fd as u32,
                ..BatchAttr::default()
            };
            let result = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(CHUNK);
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
            match result {
                Ok(()) => first = false,
                // ENOENT: the walk reached the end.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => bail!("reading the connection table: {e}"),
            }
        }
    }

    /// Runs a program once on `frame` with BPF_PROG_TEST_RUN: the verdict and the frame after.
    pub fn test_run(&mut self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.program(program)?;
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let result = prog.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
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

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }
}

fn sum_counters(map: &aya::maps::Map, id: u32) -> Result<Counters> {
    let map: PerCpuArray<_, Counters> = PerCpuArray::try_from(map)?;
    let mut total = Counters::default();
    for c in map.get(&id, 0)?.iter() {
        total.packets += c.packets;
        total.bytes += c.bytes;
        total.new_flows += c.new_flows;
    }
    Ok(total)
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
                        conn_capacity
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

/// Bulk access for measuring and large tables: what the kernel charges for each map, and batch
/// updates of the connection table. Kept apart from the per-item calls above.
impl Dataplane {
    /// Kernel memory of each of the program's maps, as the kernel accounts it (`memlock` in the
    /// map fd's fdinfo), by map name. The Maglev tables are maps of their own: see
    /// [`Dataplane::maglev_memory`].
    pub fn map_memory(&self) -> Result<Vec<(String, u64)>> {
        self.ebpf
            .maps()
            .map(|(name, map)| {
                let fd = map_fd(map);
                Ok((name.to_string(), memlock(fd.as_raw_fd())?))
            })
            .collect()
    }

    /// Kernel memory of one service's Maglev table (0 when it has none).
    pub fn maglev_memory(&self, service_id: u32) -> Result<u64> {
        let outer: ArrayOfMaps<_, MapData> = ArrayOfMaps::try_from(self.map("MAGLEV")?)?;
        match outer.get(&service_id, 0) {
            Ok(table) => memlock(table.fd().as_fd().as_raw_fd()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes many connection-table entries with BPF_MAP_UPDATE_BATCH (a few syscalls instead
    /// of one per flow).
    pub fn insert_conns(&mut self, flows: &[(ConnKey, ConnValue)]) -> Result<()> {
        let fd = map_fd(self.map("CONNS")?).as_raw_fd();
        let keys: Vec<ConnKey> = flows.iter().map(|(k, _)| *k).collect();
        let values: Vec<ConnValue> = flows.iter().map(|(_, v)| *v).collect();
        // The kernel copies in chunks of this many; bounded so one call stays short.
        const CHUNK: usize = 65536;
        for start in (0..flows.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(flows.len());
            let mut attr = BatchAttr {
                keys: keys[start..].as_ptr() as u64,
                values: values[start..].as_ptr() as u64,
                count: (end - start) as u32,
                map_fd: fd as u32,
                ..BatchAttr::default()
            };
            bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr).with_context(|| {
                format!("writing {} flows to the connection table", end - start)
            })?;
            if attr.count as usize != end - start {
                bail!("the kernel wrote {} of {} flows", attr.count, end - start);
            }
        }
        Ok(())
    }
}

/// `bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: attr and the buffers it points to outlive the call; the kernel writes `count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn map_fd(map: &aya::maps::Map) -> std::os::fd::BorrowedFd<'_> {
    // aya has no common accessor for a map's fd; every variant holds a MapData.
    use aya::maps::Map;
    let data = match map {
        Map::Array(m)
        | Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::RingBuf(m)
        | Map::SockHash(m)
        | Map::SockMap(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::Unsupported(m)
        | Map::XskMap(m) => m,
    };
    data.fd().as_fd()
}

/// The `memlock:` line of a map fd's fdinfo: the bytes the kernel charges for the map.
fn memlock(fd: i32) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{fd}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock line in {path}"))
}
