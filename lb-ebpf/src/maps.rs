//! Every map the data path uses, in one place: the control plane finds them by these names.

use aya_ebpf::{
    bindings::{BPF_F_INNER_MAP, BPF_F_MMAPABLE},
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf,
    },
    macros::btf_map,
};
use lb_common::{
    Backend, Config, ConnBucket, Counters, DECAP_CAPACITY, DEFAULT_CONN_CAPACITY,
    DEFAULT_RING_SIZE, Decap, DecapConfig, FRAG_CAPACITY, FragKey, FragValue, Global, MAX_BACKENDS,
    MAX_IFACES, MAX_SERVICES, NAT_CAPACITY, NAT_REPLY_CACHE_WAYS, NatKey, NatReply, NatReplyBody,
    NatReplyWay, NatScratch, RefusalEvent, ServiceKey, ServiceValue, SnatAddrs, SnatEndpoint,
    SyncEvent, VipKey, VipValue, conn_buckets,
};

/// Inner Maglev table. Array elements are 8 bytes apart in the kernel whatever the value size,
/// so each element packs two slots: element 0 holds `[M, 0]`, element 1 + i/2 holds slot i in
/// half i % 2. Userspace creates one per service with its own M (BPF_F_INNER_MAP lets sizes
/// differ), fills it through mmap and swaps it into `MAGLEV` in one update, so the kernel never
/// sees a half-built table; later changes rewrite single slots in place through the mmap.
pub type MaglevTable = Array<
    [u32; 2],
    { DEFAULT_RING_SIZE.div_ceil(2) as usize + 1 },
    { (BPF_F_INNER_MAP | BPF_F_MMAPABLE) as usize },
>;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
pub static MAGLEV: ArrayOfMaps<MaglevTable, { MAX_SERVICES as usize }> = ArrayOfMaps::new();

#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// The connection table (conntrack.rs): shared, not per-CPU, so a flow stays on its real
/// even when its packets arrive on another CPU (RSS changes, generic XDP). Mmapable: the
/// kernel then starts the elements on a page, so each bucket is one cache line, and the
/// control plane reads (and, in tests and benchmarks, writes) it through a mapping. Its size
/// is set by the loader, with `CONN_BUCKET_MASK`.
#[btf_map]
pub static CONNS: Array<
    ConnBucket,
    { conn_buckets(DEFAULT_CONN_CAPACITY) as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// `CONNS`'s buckets minus one, set by the loader. A read-only global: the verifier knows its
/// value, so masking the hash costs no load. 0 (one bucket) unless set.
#[unsafe(no_mangle)]
pub static CONN_BUCKET_MASK: u32 = 0;

/// NAT flows by the tuple their real replies with: how each reply is translated back and
/// where it goes (nat.rs). Shared, as `CONNS`, so a reply on any CPU finds its flow.
#[btf_map]
pub static NAT_REPLIES: LruHashMap<NatKey, NatReply, { NAT_CAPACITY as usize }> = LruHashMap::new();

/// IPv4 NAT replies' translations, copied from `NAT_REPLIES` into a set-associative table of
/// two 64-byte ways a bucket (reply_cache.rs): a reply reads one cache line. Mmapable, so that
/// the kernel starts it on a page and each way is one line.
#[btf_map]
pub static NAT_REPLY_CACHE: Array<
    NatReplyWay,
    { NAT_REPLY_CACHE_WAYS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// Where a reply cache copy is made before it is written into its way, and read into before
/// its seal is checked; and the translation a reply found there, expanded (reply_cache.rs):
/// not on the stack, which the NAT programs have no room left on.
#[btf_map]
pub static NAT_REPLY_COPY: PerCpuArray<NatReplyBody, 1> = PerCpuArray::new();
#[btf_map]
pub static NAT_REPLY_FOUND: PerCpuArray<NatReply, 1> = PerCpuArray::new();

/// Full-NAT flows by the client's tuple: the SNAT address and port their requests leave with.
/// A flow the connection table holds trusts its entry; a (re)scheduled one only while
/// `NAT_REPLIES` holds its reply tuple for the same client (nat.rs).
#[btf_map]
pub static FULLNAT_FLOWS: LruHashMap<NatKey, SnatEndpoint, { NAT_CAPACITY as usize }> =
    LruHashMap::new();

/// Each full-NAT service's SNAT addresses, by service id.
#[btf_map]
pub static SNAT_ADDRS: Array<SnatAddrs, { MAX_SERVICES as usize }> = Array::new();

/// Slot 0: `xlb_nat_forward`, slot 1: `xlb_nat_reply`, tail-called by the balancer (nat.rs);
/// slot 2: `xlb_nat_icmp`, tail-called by `xlb_icmp` (nat_icmp.rs).
/// Pinned, unlike the other program arrays: the kernel empties a program array when no process
/// and no pin holds it, and NAT flows must go on while the daemon restarts.
#[btf_map]
pub static NAT_PROGRAM: ProgramArray<3> = ProgramArray::new();

/// The balancer's hand-over to the NAT programs (nat.rs).
#[btf_map]
pub static NAT_SCRATCH: PerCpuArray<NatScratch, 1> = PerCpuArray::new();

#[btf_map]
pub static FRAGS: LruHashMap<FragKey, FragValue, { FRAG_CAPACITY as usize }> = LruHashMap::new();

#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// The attached interfaces (`Config::ifaces`) as XDP_REDIRECT targets, key = value = ifindex: a frame for a real
/// routed through another attached interface than the one it came in on leaves through it.
#[btf_map]
pub static REDIRECT_PORTS: DevMapHash<{ MAX_IFACES as usize }> = DevMapHash::new();

#[btf_map]
pub static SERVICE_STATS: PerCpuArray<Counters, { MAX_SERVICES as usize }> = PerCpuArray::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<Counters, { MAX_BACKENDS as usize }> = PerCpuArray::new();

#[btf_map]
pub static GLOBAL_STATS: PerCpuArray<u64, { Global::COUNT as usize }> = PerCpuArray::new();

/// Real servers: the VIPs whose tunnelled packets are unwrapped here, and whether (and how)
/// they refuse (`VipValue`); a hash map rather than an LPM trie, since VIPs are single
/// addresses.
#[btf_map]
pub static DECAP_VIPS: HashMap<VipKey, VipValue, { DECAP_CAPACITY as usize }> = HashMap::new();

/// The decapsulator's settings (the GUE port), written by `xlb realserver setup`.
#[btf_map]
pub static DECAP_CONFIG: Array<DecapConfig, 1> = Array::new();

/// The director's VIPs (every address with a service), for echo replies (echo.rs); the value
/// is unused.
#[btf_map]
pub static VIPS: HashMap<VipKey, u32, { MAX_SERVICES as usize }> = HashMap::new();

#[btf_map]
pub static DECAP_STATS: PerCpuArray<u64, { Decap::COUNT as usize }> = PerCpuArray::new();

/// `xlb_drop_log`, tail-called on drops while the data path log is on (log.rs); the control
/// plane fills slot 0.
#[btf_map]
pub static DROP_LOG_PROGRAM: ProgramArray<1> = ProgramArray::new();

/// Slot 0: `xlb_icmp`, tail-called by the balancer for frames that are not TCP or UDP; slot 1:
/// `xlb_echo`, tail-called by `xlb_icmp` for echo requests (a program of its own: `xlb_icmp`'s
/// stack is full). Set at load; while a slot is empty, its frames pass.
#[btf_map]
pub static ICMP_PROGRAM: ProgramArray<2> = ProgramArray::new();

/// The reason of the drop being logged, handed from the balancer to `xlb_drop_log`.
#[btf_map]
pub static DROP_REASON: PerCpuArray<u32, 1> = PerCpuArray::new();

/// One record per honoured refusal, for the daemon to take the refusing real down within
/// milliseconds (daemon/refusals.rs). 64 KiB: thousands of records before the reader wakes.
#[btf_map]
pub static REFUSALS: RingBuf<RefusalEvent, { 64 * 1024 }> = RingBuf::new();

/// One record per connection-table entry written for a new flow while connection sync is on
/// (`CONFIG_F_SYNC`), for the daemon to send to its peer directors (daemon/sync.rs). 256 KiB:
/// 4,096 records before the reader wakes; a record that does not fit is counted
/// (`sync_events_lost`) and left to the daemon's refreshes.
#[btf_map]
pub static SYNC_EVENTS: RingBuf<SyncEvent, { 256 * 1024 }> = RingBuf::new();
