//! Types shared by the XDP program (lb-ebpf) and the control plane (lb-userspace).
//!
//! Every struct here is a BPF map key or value: `#[repr(C)]`, padding spelled out as
//! explicit fields (so a key never carries uninitialised bytes into a hash lookup), and
//! its size asserted at compile time on both sides.
#![no_std]

/// Most services one director holds (size of the service map and of the Maglev outer map).
pub const MAX_SERVICES: u32 = 4096;
/// Most (service, real) pairs one director holds: the backend array's size.
pub const MAX_BACKENDS: u32 = 65536;
/// Maglev table size used when the operator gives none: a prime, as Katran and Cilium use.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// A Maglev slot that holds no backend (a service with no usable real).
pub const NO_BACKEND: u32 = u32::MAX;
/// Default capacity of the connection table (flows tracked at once; see `conn_buckets`).
pub const DEFAULT_CONN_CAPACITY: u32 = 1 << 20;
/// Largest connection-table capacity accepted: 2^26 buckets, 4 GiB.
pub const MAX_CONN_CAPACITY: u32 = 1 << 26;
/// Capacity of the fragment table (datagrams whose later fragments are still expected).
pub const FRAG_CAPACITY: u32 = 16384;
/// Most VIPs one real server decapsulates for (the decapsulator's `DECAP_VIPS` map).
pub const DECAP_CAPACITY: u32 = 1024;
/// Most interfaces one director's data path is attached to (`xlb daemon --iface` repeated):
/// few, so that `Config` holds them and the ingress check is a scan of a few words rather
/// than a hash lookup on every packet.
pub const MAX_IFACES: u32 = 8;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A virtual service: VIP, port (network byte order; 0 = every port), L4 protocol.
/// An IPv4 VIP sits in the first four bytes of `addr`, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Service flag: forward by IP-in-IP encapsulation (TUN) instead of MAC rewrite (DR).
pub const SERVICE_F_TUN: u32 = 1 << 0;
/// Service flag: schedule on the client address only (LVS persistence, IPVS `sh`).
pub const SERVICE_F_HASH_SRC_IP: u32 = 1 << 1;
/// Service flag (TUN): wrap in GUE (outer IP + UDP to `gue_port`, RFC draft "direct IP
/// encapsulation", as Linux's FOU/GUE and Katran send it) instead of bare IP-in-IP.
pub const SERVICE_F_GUE: u32 = 1 << 2;
/// Service flag (TUN): the outer header is IPv6 (`tunnel_src` and the reals are IPv6). With an
/// IPv4 VIP this is IPv4-in-IPv6 (4in6).
pub const SERVICE_F_OUTER_V6: u32 = 1 << 3;
/// The GUE destination port when the operator gives none: the port Katran and the kernel's
/// FOU examples use.
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Service flag: destination NAT (LVS NAT). The destination becomes the real's address and
/// port (`Backend::port`); the reals route their replies through the director, which rewrites
/// their source back to the VIP and port (nat.rs).
pub const SERVICE_F_NAT: u32 = 1 << 4;
/// Service flag: full NAT (with `SERVICE_F_NAT`): the source also becomes one of the service's
/// SNAT addresses (`SNAT_ADDRS`) and a port the data path allocates, so replies come back to
/// the director wherever the reals are.
pub const SERVICE_F_FULLNAT: u32 = 1 << 5;
/// Most SNAT addresses one full-NAT service has.
pub const MAX_SNAT_ADDRS: usize = 8;
/// SNAT ports: `SNAT_PORT_MIN` and the `SNAT_PORT_COUNT` after it (below it: the director's own
/// well-known and registered-low ports; its own connections' ephemeral ports, 32768-60999 by
/// default on Linux, may collide only on an address they also use, so SNAT addresses should be
/// the director's dedicated ones).
pub const SNAT_PORT_MIN: u16 = 1024;
pub const SNAT_PORT_COUNT: u32 = 65536 - SNAT_PORT_MIN as u32;
/// Ports tried, at random, for a new full-NAT flow before it is refused (`drop_snat_exhausted`).
pub const SNAT_TRIES: u32 = 8;

/// A full-NAT service's SNAT addresses (`SNAT_ADDRS`, by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatAddrs {
    /// How many of `addrs` are in use (1 to `MAX_SNAT_ADDRS`).
    pub count: u32,
    pub _pad: u32,
    /// IPv4 in the first four bytes.
    pub addrs: [[u8; 16]; MAX_SNAT_ADDRS],
}

/// A full-NAT flow's source after translation (`FULLNAT_FLOWS`, by the client's tuple).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SnatEndpoint {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Index into the Maglev outer map and the per-service counters.
    pub id: u32,
    pub flags: u32,
    /// TUN only: the outer source address of encapsulated packets (IPv4 in the first four
    /// bytes). Per service, so a director can tunnel from the address its reals expect.
    pub tunnel_src: [u8; 16],
    /// GUE only: the outer UDP destination port, network byte order.
    pub gue_port: u16,
    /// `--tunnel-src-prefix`: how many low bits of `tunnel_src` are taken from the flow hash
    /// (0: one fixed source), so receivers and routers that hash only outer addresses see
    /// distinct flows. At most 16.
    pub tunnel_src_host_bits: u8,
    pub _pad: u8,
}

/// Backend flag: established flows may be forwarded to it. Cleared when its MAC is unknown or
/// it is failed over; a drained backend keeps it (it only leaves the Maglev table).
pub const BACKEND_F_FORWARD: u8 = 1 << 0;

/// One real server of one service, indexed by backend id. For a TUN service `addr` is the
/// outer destination and `mac` the MAC of the next hop towards it. `ifindex` is the attached
/// interface the kernel routes the real through and `src_mac` that interface's MAC: frames
/// leave by XDP_TX when it is the ingress interface, by XDP_REDIRECT otherwise (egress.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub family: u8,
    pub flags: u8,
    /// NAT only: the real's port, network byte order; 0 keeps the destination port (the
    /// service's, or the client's for an all-ports service).
    pub port: u16,
    pub ifindex: u32,
    /// The service this backend belongs to; a tracked flow whose service differs re-schedules.
    pub service_id: u32,
    /// Bumped each time the id is given to another real, so flows tracked for the previous
    /// holder re-schedule instead of landing on the new one (Katran's index-reuse trap).
    pub generation: u32,
}

/// A flow: the 5-tuple as the client sent it. Ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Where a tracked flow goes: the state one connection-table entry holds besides its
/// fingerprint (see `ConnEntry`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnValue {
    /// A backend id fits 16 bits (`MAX_BACKENDS`).
    pub backend_id: u16,
    /// `CONN_F_CLOSING` once the client sent a FIN or RST: the control plane stops counting the
    /// flow as active soon after (`xlb real wait-drained`), while packets still follow it.
    pub flags: u16,
    /// The real's generation (`Backend::generation`), its low 16 bits: an id is given to
    /// another real 65,536 times before an entry could mistake one holder for another.
    pub generation: u16,
    /// Full NAT, with `CONN_F_SNAT`: the source port the flow's requests leave with (network
    /// byte order; its address is `SNAT_ADDRS` entry `CONN_SNAT_ADDR_*` of the flags), so an
    /// established flow needs no `FULLNAT_FLOWS` lookup. 0 otherwise. Where an older build's
    /// 32-bit generation had its high half (0 below 65,536).
    pub snat_port: u16,
    /// Coarse monotonic clock, seconds; refreshed at most once a second per flow. 0: a free
    /// entry (the clock is never 0 after boot).
    pub last_seen_s: u32,
}

/// How much longer than its last-seen second an entry whose flow was ACKed is kept, when a new
/// flow needs an entry of a full bucket: a flood of SYNs (each seen once, never ACKed) then
/// takes the entries of other SYNs before those of connections idle for less than this.
pub const CONN_ACKED_KEEP_S: u32 = 8;

impl ConnValue {
    /// Whether the entry was recorded for the real `Backend::generation` names.
    #[inline(always)]
    pub fn of_generation(&self, generation: u32) -> bool {
        self.generation == generation as u16
    }

    /// The entry's full-NAT source (`CONN_SNAT_BITS` of its flags, `snat_port` above them), 0
    /// if it holds none: what the balancer hands the NAT program (`NatScratch::flow`).
    #[inline(always)]
    pub fn snat(&self) -> u32 {
        if self.flags & CONN_F_SNAT == 0 {
            return 0;
        }
        (self.flags & CONN_SNAT_BITS) as u32 | (self.snat_port as u32) << 16
    }

    /// This entry without its full-NAT source: the flow's next packet finds it in
    /// `FULLNAT_FLOWS` again.
    #[inline(always)]
    pub fn without_snat(self) -> Self {
        Self {
            flags: self.flags & !CONN_SNAT_BITS,
            snat_port: 0,
            ..self
        }
    }

    /// Of a full bucket's entries, a new flow takes the one with the lowest keep score (a free
    /// entry scores 0): its last-seen second, later for an ACKed flow.
    #[inline(always)]
    pub fn keep_score(&self) -> u32 {
        if self.flags & CONN_F_ACKED != 0 {
            self.last_seen_s.saturating_add(CONN_ACKED_KEEP_S)
        } else {
            self.last_seen_s
        }
    }
}

/// Entries per connection-table bucket: three of 20 bytes fill one 64-byte cache line, so a
/// lookup touches one line. (Two ways held 90 % of a million flows in a table of 2^20 buckets
/// in the prototype, three 98 %.)
pub const CONN_WAYS: usize = 3;

/// One tracked flow in the connection table. The flow's key is not stored: a lookup hashes the
/// 5-tuple (`ConnKey::hashes`, `[h1, h2]`), reads bucket `h2 & (buckets - 1)` and takes the
/// entry whose fingerprint is `[h1, h2 ^ conn_seal(value)]`. The seal ties the fingerprint to
/// the real the entry names (and to its full-NAT source), so an entry torn by two CPUs writing
/// it at once (one's fingerprint, the other's real or source) reads as a miss, never as
/// another flow's real or source.
/// Everything in it is computable from the flow key and the real: a peer director can install
/// it (connection sync).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEntry {
    pub fingerprint: [u32; 2],
    pub value: ConnValue,
}

impl ConnEntry {
    /// The entry recording `value` for the flow of `hashes`.
    #[inline(always)]
    pub fn new(hashes: [u32; 2], value: ConnValue) -> Self {
        Self {
            fingerprint: [hashes[0], hashes[1] ^ conn_seal(&value)],
            value,
        }
    }

    /// Whether this entry is the flow of `hashes`, whole (not torn).
    #[inline(always)]
    pub fn holds(&self, hashes: [u32; 2]) -> bool {
        self.fingerprint[0] == hashes[0]
            && self.fingerprint[1] == hashes[1] ^ conn_seal(&self.value)
    }
}

/// What binds an entry's fingerprint to its real and its full-NAT source (see `ConnEntry`).
/// Without a source, the seal of an older build (whose 32-bit generation held the 16 bits of
/// generation and the 16 of port here): its entries stay valid across a restart.
#[inline(always)]
pub fn conn_seal(value: &ConnValue) -> u32 {
    let generation_and_port = (value.snat_port as u32) << 16 | value.generation as u32;
    (value.backend_id as u32)
        ^ generation_and_port.wrapping_mul(0x9e37_79b1)
        ^ ((value.flags & CONN_SNAT_BITS) as u32).wrapping_mul(0x85eb_ca6b)
}

/// One bucket of the connection table: one 64-byte cache line (the array is mmapable, so the
/// kernel starts its elements on a page boundary).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnBucket {
    pub entries: [ConnEntry; CONN_WAYS],
    pub _pad: u32,
}

/// Buckets of a connection table asked to hold `capacity` flows: one per flow, rounded up to
/// a power of two (the bucket is a mask of the hash). Flows hash into buckets at random, so
/// some buckets get more than `CONN_WAYS`: at `capacity` flows the table holds about 98 % of
/// them, at half of it 99.9 % (a flow that lost its entry goes through Maglev again).
pub const fn conn_buckets(capacity: u32) -> u32 {
    if capacity <= 1 {
        1
    } else {
        capacity.next_power_of_two()
    }
}

impl ConnKey {
    /// The flow's two hashes `[h1, h2]`: `conn_hash` of the 5-tuple's words (addresses as
    /// read from the packet, in host order; ports as `sport << 16 | dport`, both in network
    /// order; protocol). Fixed: a peer director computes the same entry.
    pub fn hashes(&self) -> [u32; 2] {
        let w = |a: &[u8; 16], i: usize| {
            u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
        };
        let ports = (self.sport as u32) << 16 | self.dport as u32;
        let proto = self.proto as u32;
        if self.family == FAMILY_V4 {
            conn_hash(&[w(&self.src, 0), w(&self.dst, 0), ports, proto])
        } else {
            conn_hash(&[
                w(&self.src, 0),
                w(&self.src, 1),
                w(&self.src, 2),
                w(&self.src, 3),
                w(&self.dst, 0),
                w(&self.dst, 1),
                w(&self.dst, 2),
                w(&self.dst, 3),
                ports,
                proto,
            ])
        }
    }
}

/// Connection flag: the client has sent a FIN or RST.
pub const CONN_F_CLOSING: u16 = 1 << 0;
/// Connection flags, bits 8-11: how many times the flow's packet was refused by a real and
/// re-scheduled to another (a TCP SYN starts the count again at 0).
pub const CONN_BOUNCE_SHIFT: u16 = 8;
pub const CONN_BOUNCE_MASK: u16 = 0x0f << CONN_BOUNCE_SHIFT;
/// Connection flag: a packet other than a SYN was seen (the client's ACK): a later SYN is a new
/// connection, not a retransmission.
pub const CONN_F_ACKED: u16 = 1 << 1;
/// Connection flag: installed from a peer director's connection sync. The data path clears it
/// on the first packet it forwards on the flow and announces the flow as its own (a takeover),
/// so its new director keeps the peers' copies fresh.
pub const CONN_F_SYNCED: u16 = 1 << 2;
/// Connection flag: the entry holds its full-NAT flow's source, `ConnValue::snat_port` and the
/// index of its address in the service's `SNAT_ADDRS` (bits 4-6), written by `xlb_nat_forward`
/// once the flow's source is claimed. Cleared with the flow's reply entry (the daemon's expiry),
/// never synced (a peer finds the source in `FULLNAT_FLOWS`, which sync fills).
pub const CONN_F_SNAT: u16 = 1 << 3;
pub const CONN_SNAT_ADDR_SHIFT: u16 = 4;
pub const CONN_SNAT_ADDR_MASK: u16 = 0x07 << CONN_SNAT_ADDR_SHIFT;
/// Every flag bit of the full-NAT source (covered by the entry's seal).
pub const CONN_SNAT_BITS: u16 = CONN_F_SNAT | CONN_SNAT_ADDR_MASK;
/// Connection flags, bits 12-15: sixteenths of a second of the time the SYN was scheduled (with
/// `last_seen_s`), so a retransmitted SYN is told from a duplicate by its age.
pub const CONN_SYN_FRAC_SHIFT: u16 = 12;
pub const CONN_SYN_FRAC_MASK: u16 = 0x0f << CONN_SYN_FRAC_SHIFT;
/// A SYN for a flow whose SYN (and no ACK) was seen this many sixteenths of a second ago or
/// more, up to `SYN_RETRY_MAX_16THS`, is a retransmission: the real did not answer, so it is
/// moved to another real (`syn_retries_moved`). Linux retransmits after 1 s, then 2 s, 4 s.
pub const SYN_RETRY_MIN_16THS: u64 = 14;
pub const SYN_RETRY_MAX_16THS: u64 = 16 * 8;
/// Most refusals one flow is re-scheduled after; the next one is dropped
/// (`drop_refusal_bounced`), so reals that all refuse cannot bounce a packet forever.
pub const MAX_BOUNCES: u16 = 3;
/// Maglev slots probed after a flow's own slot for a real other than the refusing one.
pub const REFUSAL_PROBES: u32 = 64;

/// A fragmented datagram: addresses, IP identification, protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// The ports of a fragmented datagram, learnt from its first fragment so that the later ones
/// (which carry no L4 header) find their service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FragValue {
    pub sport: u16,
    pub dport: u16,
}

/// Per-service and per-backend traffic counters (per-CPU; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// Per backend: refusals from this real (a SYN or datagram for a port it has no socket on,
    /// sent back by its `xlb_realserver` program) that the director honoured. 0 per service.
    pub refusals: u64,
}

/// Capacity of the NAT reply table: the flows whose replies a NAT director translates back.
pub const NAT_CAPACITY: u32 = 1 << 18;

/// A flow as one side of the director sees it, in the connection table's 5-tuple layout: the
/// reply table's key is a NAT flow's tuple as its real sends replies (source = the real).
pub type NatKey = ConnKey;

/// How a NAT flow's replies are translated back and where they go: the source becomes
/// `vip`:`vport`, the destination `client`:`client_port` (NAT: unchanged), and the frame leaves
/// for `mac` from `src_mac` on `ifindex`: the neighbour the flow's first packet came from, out
/// of the interface it came in on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatReply {
    pub vip: [u8; 16],
    pub client: [u8; 16],
    pub vport: u16,
    pub client_port: u16,
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    /// Coarse monotonic clock, seconds, of the last reply (or of the flow's first packet).
    pub last_seen_s: u32,
    /// `CONN_F_CLOSING` once the real sent a FIN or RST (or the flow's first packet was one).
    pub flags: u16,
    pub _pad: [u8; 2],
}

/// Ways of the IPv4 NAT reply cache (`NAT_REPLY_CACHE`), two per bucket: as many as the reply
/// table holds flows.
pub const NAT_REPLY_CACHE_WAYS: u32 = NAT_CAPACITY;
pub const NAT_REPLY_CACHE_BUCKETS: u32 = NAT_REPLY_CACHE_WAYS / 2;

/// One way of the IPv4 NAT reply cache: a copy of an IPv4 flow's `NAT_REPLIES` entry (key and
/// translation) in one 64-byte cache line, where the reply table costs a bucket and an element
/// elsewhere. `NAT_REPLIES` stays the record (the control plane lists, expires and syncs it);
/// a reply found here refreshes `last_seen_s` here only, which the control plane's expiry also
/// reads. `seal` is a hash of `body`: a way two CPUs wrote at once (torn) does not match it,
/// and its reply takes the reply table instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatReplyWay {
    pub seal: u32,
    /// Coarse monotonic clock, seconds, of the last reply found here (or of the copy).
    pub last_seen_s: u32,
    pub body: NatReplyBody,
    pub _pad: [u8; 12],
}

/// What a `NatReplyWay` seals: the reply tuple (IPv4) and how it is translated back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatReplyBody {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub vip: [u8; 4],
    pub client: [u8; 4],
    pub vport: u16,
    pub client_port: u16,
    pub mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl NatReplyBody {
    /// The cached copy of an IPv4 reply entry.
    #[inline(always)]
    pub fn of(key: &NatKey, r: &NatReply) -> Self {
        let mut body = Self::default();
        body.fill(key, r);
        body
    }

    /// Makes this the cached copy of an IPv4 reply entry, field by field: in place (the data
    /// path fills map memory, its NAT programs' stacks being full).
    #[inline(always)]
    pub fn fill(&mut self, key: &NatKey, r: &NatReply) {
        copy_bytes(&mut self.src, &key.src);
        copy_bytes(&mut self.dst, &key.dst);
        self.sport = key.sport;
        self.dport = key.dport;
        copy_bytes(&mut self.vip, &r.vip);
        copy_bytes(&mut self.client, &r.client);
        self.vport = r.vport;
        self.client_port = r.client_port;
        copy_bytes(&mut self.mac, &r.mac);
        copy_bytes(&mut self.src_mac, &r.src_mac);
        self.ifindex = r.ifindex;
        self.proto = key.proto;
        copy_bytes(&mut self._pad, &[0; 3]);
    }

    /// Writes the translation this copies into `r`, whose addresses' last 12 bytes must be
    /// zero (IPv4; a zeroed element's, where only this writes): only their first 4 are
    /// written. `last_seen_s` and `flags` are left as they are.
    #[inline(always)]
    pub fn expand(&self, r: &mut NatReply) {
        // By words: both structs are 4-aligned, and each array starts at the same offset
        // modulo 4 in both (asserted below): the MAC at 0, the source MAC at 2.
        // SAFETY: every access is within its array (4 + 2 or 2 + 4 bytes of 6, or 4 of 4 or
        // 16), and aligned for its width.
        unsafe {
            let word = |a: *const u8| (a as *const u32).read();
            let half = |a: *const u8| (a as *const u16).read();
            let put_word = |a: *mut u8, v: u32| (a as *mut u32).write_volatile(v);
            let put_half = |a: *mut u8, v: u16| (a as *mut u16).write_volatile(v);
            put_word(r.vip.as_mut_ptr(), word(self.vip.as_ptr()));
            put_word(r.client.as_mut_ptr(), word(self.client.as_ptr()));
            r.vport = self.vport;
            r.client_port = self.client_port;
            put_word(r.mac.as_mut_ptr(), word(self.mac.as_ptr()));
            put_half(r.mac.as_mut_ptr().add(4), half(self.mac.as_ptr().add(4)));
            put_half(r.src_mac.as_mut_ptr(), half(self.src_mac.as_ptr()));
            put_word(
                r.src_mac.as_mut_ptr().add(2),
                word(self.src_mac.as_ptr().add(2)),
            );
            r.ifindex = self.ifindex;
        }
    }

    /// The seal of this body (never 0, so an empty way seals nothing).
    #[inline(always)]
    pub fn seal(&self) -> u32 {
        // SAFETY: 44 bytes of plain data, 4-aligned, read as 11 words.
        let w = |i: usize| unsafe { (self as *const Self as *const u32).add(i).read() };
        conn_hash(&[
            w(0),
            w(1),
            w(2),
            w(3),
            w(4),
            w(5),
            w(6),
            w(7),
            w(8),
            w(9),
            w(10),
        ])[0]
            | 1
    }

    /// Whether this is the reply tuple's copy.
    #[inline(always)]
    pub fn is_for(&self, src: &[u8; 4], dst: &[u8; 4], sport: u16, dport: u16, proto: u8) -> bool {
        self.src == *src
            && self.dst == *dst
            && self.sport == sport
            && self.dport == dport
            && self.proto == proto
    }
}

/// Copies the first `min(N, M)` bytes of `from` over `to`, one volatile store each: LLVM would
/// otherwise make a short array copy a call to `memmove`, a byte loop on the BPF target.
#[inline(always)]
fn copy_bytes<const N: usize, const M: usize>(to: &mut [u8; N], from: &[u8; M]) {
    let mut i = 0;
    while i < N && i < M {
        // SAFETY: `i` is within both arrays.
        unsafe { core::ptr::write_volatile(to.as_mut_ptr().add(i), from[i]) };
        i += 1;
    }
}

/// The first way of a reply tuple's bucket in the reply cache, from its `ConnKey::hashes`.
#[inline(always)]
pub fn nat_reply_cache_way(hashes: [u32; 2]) -> u32 {
    (hashes[1] & (NAT_REPLY_CACHE_BUCKETS - 1)) * 2
}

/// What the balancer hands the NAT programs it tail-calls (`NAT_SCRATCH`, per CPU: a frame is
/// processed on one CPU from the balancer to the end of its tail calls). Kernel-only, but
/// pinned (a restarted daemon's programs share it with the old ones), so its layout is fixed
/// here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatScratch {
    /// The real chosen for a request.
    pub backend_id: u32,
    /// `NAT_FLOW_NEW` if the request started its flow; for a flow whose connection-table
    /// entry holds its full-NAT source, that source as `ConnValue::snat` gives it (bits 3-6
    /// and 16-31: an older balancer, which set 0 or 1 here, never sets `CONN_F_SNAT`).
    pub flow: u32,
    /// The request's service: its id (for its SNAT addresses) and `SERVICE_F_*` flags.
    pub service_id: u32,
    pub service_flags: u32,
}

/// `NatScratch::flow`: the request started its flow.
pub const NAT_FLOW_NEW: u32 = 1;

/// Director-wide settings the control plane writes once at attach.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// `CONFIG_F_*` switches.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// How many all-ports (port 0) services exist: while none does, a packet that misses the
    /// exact (VIP, port, proto) lookup passes without a second lookup.
    pub all_ports_services: u32,
    /// The smallest MTU of the attached interfaces: a TUN packet that no longer fits once
    /// encapsulated is answered with ICMP "too big" (or dropped), before the real (and so the
    /// egress interface) is chosen. 0 disables the check.
    pub mtu: u32,
    /// The interfaces the balancer is attached to; unused entries have ifindex 0.
    pub ifaces: [Iface; MAX_IFACES as usize],
}

/// An interface the balancer is attached to: frames for a service are taken only when sent to
/// its MAC, and replies sent back out of it come from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Iface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Config flag: log the data path's rare events (drops, ICMP too big, untracked fragments)
/// through aya-log (`xlb daemon --datapath-log`). Read only on those rare paths.
pub const CONFIG_F_DATAPATH_LOG: u8 = 1 << 0;
/// Config flag: answer ICMP echo requests to a VIP (the `VIPS` map) from the data path. On
/// unless `xlb daemon --no-vip-echo`.
pub const CONFIG_F_VIP_ECHO: u8 = 1 << 1;
/// Config flag: some service is in NAT mode, so frames are looked up in the NAT reply table
/// (before the service lookup). Without it, a DR/TUN director pays nothing for NAT.
pub const CONFIG_F_NAT: u8 = 1 << 2;
/// Config flag: connection sync is on (`xlb daemon --sync-peer`): each new flow's entry is
/// also written to the `SYNC_EVENTS` ring buffer (`SyncEvent`) for the daemon to send to its
/// peers. Read only when a flow's entry is written, never on an established flow's packets.
pub const CONFIG_F_SYNC: u8 = 1 << 3;

/// Indexes of the global per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    /// Frames handed to the kernel untouched (not for a service, or not parseable).
    Passed = 0,
    /// Frames forwarded to a real.
    Forwarded = 1,
    /// Packets for a service whose Maglev table has no usable real.
    DropNoBackend = 2,
    /// Later fragments whose first fragment was not seen (reordered or aged out) and whose VIP
    /// has no port-0 service: passed to the kernel, which cannot reassemble them either.
    FragUntracked = 3,
    /// Packets for a service that could not be parsed far enough to schedule them.
    DropMalformed = 4,
    /// Flows that missed the connection table and were scheduled through Maglev.
    ConnMiss = 5,
    /// Tracked flows whose backend went away or changed, re-scheduled.
    ConnStale = 6,
    /// TUN packets too big for the egress MTU once encapsulated, answered with ICMP
    /// "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big".
    IcmpTooBigSent = 7,
    /// TUN packets too big for the egress MTU that may not be answered: IPv4 without DF
    /// (fragmenting is the kernel's job, not ours), a corrupt IPv4 header, a later fragment,
    /// a source that is no single host, or too short to quote; and ICMP errors too big to
    /// forward through the tunnel (never answered: no ICMP about ICMP).
    DropTooBig = 8,
    /// ICMP errors to a VIP (unreachable, too big, time exceeded) quoting a service's flow,
    /// forwarded to that flow's real so its path MTU discovery works; and errors about NAT
    /// flows, translated and sent to the other side.
    IcmpErrorForwarded = 9,
    /// Refusals (a real sent a SYN or datagram back: no socket on that port) re-scheduled to
    /// another real of the service.
    RefusalRescheduled = 10,
    /// Refusals not re-scheduled: the flow was bounced `MAX_BOUNCES` times already, or the
    /// service has no other usable real. Dropped.
    DropRefusalBounced = 11,
    /// Tunnel packets that look like a refusal but do not come from the real their flow is
    /// tracked to (or whose flow is not tracked): dropped, never honoured.
    DropRefusalForged = 12,
    /// Retransmitted SYNs of flows whose real never saw the client's ACK, moved to another
    /// real (the real did not answer: its host may be dark).
    SynRetriesMoved = 13,
    /// ICMP echo requests to a VIP answered by the data path (`xlb daemon --no-vip-echo`
    /// turns this off: they then pass to the kernel, which answers only for local addresses).
    EchoReplied = 14,
    /// Replies of NAT flows from their real, translated back (source = VIP) and sent on.
    NatReplied = 15,
    /// New full-NAT flows refused: no free SNAT port found in `SNAT_TRIES` random tries (or the
    /// reply table refused the entry). Never a shared port.
    DropSnatExhausted = 16,
    /// New flows whose `SyncEvent` did not fit in the `SYNC_EVENTS` ring buffer (the daemon
    /// fell behind): not sent to the peers at once (a refresh sends them later, if still
    /// active).
    SyncEventsLost = 17,
}

impl Global {
    pub const COUNT: u32 = 18;
    pub const ALL: [Global; Self::COUNT as usize] = [
        Global::Passed,
        Global::Forwarded,
        Global::DropNoBackend,
        Global::FragUntracked,
        Global::DropMalformed,
        Global::ConnMiss,
        Global::ConnStale,
        Global::IcmpTooBigSent,
        Global::DropTooBig,
        Global::IcmpErrorForwarded,
        Global::RefusalRescheduled,
        Global::DropRefusalBounced,
        Global::DropRefusalForged,
        Global::SynRetriesMoved,
        Global::EchoReplied,
        Global::NatReplied,
        Global::DropSnatExhausted,
        Global::SyncEventsLost,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Global::Passed => "passed",
            Global::Forwarded => "forwarded",
            Global::DropNoBackend => "drop_no_backend",
            Global::FragUntracked => "frag_untracked",
            Global::DropMalformed => "drop_malformed",
            Global::ConnMiss => "conn_miss",
            Global::ConnStale => "conn_stale",
            Global::IcmpTooBigSent => "icmp_too_big_sent",
            Global::DropTooBig => "drop_too_big",
            Global::IcmpErrorForwarded => "icmp_error_forwarded",
            Global::RefusalRescheduled => "refusal_rescheduled",
            Global::DropRefusalBounced => "drop_refusal_bounced",
            Global::DropRefusalForged => "drop_refusal_forged",
            Global::SynRetriesMoved => "syn_retries_moved",
            Global::EchoReplied => "echo_replied",
            Global::NatReplied => "nat_replied",
            Global::DropSnatExhausted => "drop_snat_exhausted",
            Global::SyncEventsLost => "sync_events_lost",
        }
    }
}

/// A VIP a real server accepts tunnelled traffic for: the key of the decapsulator's
/// `DECAP_VIPS` map. An IPv4 address fills the first four bytes, the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// What a real server does for one VIP (the value of `DECAP_VIPS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipValue {
    /// The real's own address of the VIP's family (IPv4 in the first four bytes): the outer
    /// source of a DR refusal, so the director sees which real refused.
    pub real_addr: [u8; 16],
    /// `VIP_F_*`.
    pub flags: u32,
}

/// VIP flag: send SYNs and UDP datagrams for a port with no socket back to the director
/// (a refusal) instead of letting the kernel answer RST / port unreachable.
pub const VIP_F_REFUSE: u32 = 1 << 0;
/// VIP flag: the VIP is served in DR mode (a refusal is wrapped in IPIP / IP6IP6 from
/// `real_addr` to the VIP); without it, TUN (a refusal goes back in its own tunnel).
pub const VIP_F_DR: u32 = 1 << 1;
/// VIP flag: the director sends this VIP's packets in GUE (`xlb realserver setup --encap gue`):
/// what `xlb realserver check` reports. The decapsulator unwraps GUE on `DecapConfig::gue_port`.
pub const VIP_F_GUE: u32 = 1 << 2;

/// The decapsulator's settings (`DECAP_CONFIG`, one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapConfig {
    /// UDP port GUE packets arrive on, network byte order; 0: GUE is not unwrapped.
    pub gue_port: u16,
    pub _pad: [u8; 2],
}

/// The longest frame the forwarding-rate bench's bounce program restores.
pub const BENCH_FRAME_MAX: usize = 128;
/// The bounce program reads the clock every this many frames.
pub const BENCH_SAMPLE: u64 = 64;
/// A gap between two readings longer than this had the CPU taken away (64 frames at 0.25 Mpps):
/// not counted as the ping-pong's time.
pub const BENCH_GAP_MAX_NS: u64 = 250_000;

/// The forwarding-rate bench's bounce program's run (`BENCH_BOUNCE`, one element): set by the
/// bench before a run, counted down and time-stamped by the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchBounce {
    /// Frames still to send back; at 0 every arriving frame is dropped (a counting sink).
    pub budget: u64,
    /// The time the ping-pong ran: `bpf_ktime_get_ns` every `BENCH_SAMPLE` frames, the last
    /// reading, and the sum of the gaps between readings (and the frames they cover) short
    /// enough that nothing else had the CPU between them.
    pub last_ns: u64,
    pub busy_ns: u64,
    pub busy_frames: u64,
    /// Where the frames are sent back out of (XDP_REDIRECT).
    pub out_ifindex: u32,
    /// The frame restored before each send: `frame[..len]` (IPv4 and TCP without options:
    /// flow 0's frame, whose source each send changes to the flow's).
    pub len: u32,
    /// The flows the sends cycle over (at least 1); each send is flow `flow`'s frame (see
    /// [`bench_flow_source`]), and `flow` then steps by `flow_step` modulo `flows` (coprime
    /// with `flows`: every flow once per cycle, neighbours far apart).
    pub flows: u32,
    pub flow_step: u32,
    pub flow: u32,
    pub _pad: u32,
    pub frame: [u8; BENCH_FRAME_MAX],
}

/// Source ports per source address in the forwarding-rate bench's flows.
pub const BENCH_FLOW_PORT_BITS: u32 = 14;

/// Flow `flow` of the forwarding-rate bench: what its source address and source port add to
/// flow 0's (the low bits go to the port, the rest to the address).
pub const fn bench_flow_source(flow: u32) -> (u32, u16) {
    (
        flow >> BENCH_FLOW_PORT_BITS,
        (flow & ((1 << BENCH_FLOW_PORT_BITS) - 1)) as u16,
    )
}

/// Indexes of the decapsulator's per-CPU counter array (`DECAP_STATS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decap {
    /// Tunnel packets for a local VIP: outer header stripped, inner packet passed to the stack.
    Decapsulated = 0,
    /// Tunnel packets whose inner destination is not a local VIP: passed untouched.
    Refused = 1,
    /// Tunnel packets too short for their inner header (or whose inner header is not of the
    /// outer family): passed untouched.
    Malformed = 2,
    /// Fragmented tunnel packets (the director sets DF, so something on the path fragmented
    /// them): passed untouched, since a fragment cannot be decapsulated on its own.
    Fragment = 3,
    /// SYNs and UDP datagrams for a VIP port with no socket, sent back to the director
    /// (refusals) instead of being answered with RST / port unreachable.
    Refusal = 4,
}

impl Decap {
    pub const COUNT: u32 = 5;
    pub const ALL: [Decap; Self::COUNT as usize] = [
        Decap::Decapsulated,
        Decap::Refused,
        Decap::Malformed,
        Decap::Fragment,
        Decap::Refusal,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Decap::Decapsulated => "decapsulated",
            Decap::Refused => "refused",
            Decap::Malformed => "malformed",
            Decap::Fragment => "fragment",
            Decap::Refusal => "refusals",
        }
    }
}

/// One honoured refusal, sent by the director's data path to the daemon through the
/// `REFUSALS` ring buffer so that the real is taken down within milliseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RefusalEvent {
    /// The refusing real's backend id.
    pub backend_id: u32,
    /// Its generation (an event for a previous holder of the id is ignored).
    pub generation: u32,
    /// When the data path honoured the refusal: `bpf_ktime_get_ns`, CLOCK_MONOTONIC. The
    /// daemon reports how long after it the real was taken down.
    pub refused_at_ns: u64,
}

/// One flow whose connection-table entry the data path has just written (a new flow, or one
/// moved to another real), sent to the daemon through the `SYNC_EVENTS` ring buffer while
/// `CONFIG_F_SYNC` is on, for connection sync between directors (daemon/sync.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SyncEvent {
    /// The flow as the client sent it.
    pub key: ConnKey,
    /// The entry's real (local to this director: the daemon names it by address on the wire).
    pub backend_id: u32,
    pub generation: u32,
    /// The entry's `ConnValue::flags`.
    pub flags: u16,
    pub _pad: [u8; 6],
    /// When the entry was written: `bpf_ktime_get_ns`, CLOCK_MONOTONIC (for the bench's
    /// first-packet-to-peer delay).
    pub at_ns: u64,
}

/// Seed of the flow hash. Fixed: every director must pick the same slot for the same flow.
pub const FLOW_HASH_SEED: u32 = 0x786c_6231; // "xlb1"

/// Seed of the connection table's own hash (`conn_hash`).
pub const CONN_HASH_SEED: u64 = 0x786c_6232_786c_6232; // "xlb2xlb2"

/// MurmurHash3 (x86, 32-bit) over whole words: the flow hash that indexes a Maglev table.
/// Shared so the control plane and tests can predict where a flow lands; part of the contract
/// between directors behind one ECMP group, so changing it moves flows.
#[inline(always)]
pub fn flow_hash<const N: usize>(words: &[u32; N]) -> u32 {
    murmur3(FLOW_HASH_SEED, words)
}

/// The connection table's hash of a flow's words (`ConnKey::hashes`), 64 bits as `[low,
/// high]`: each pair of words taken as one 64-bit word, mixed in by a multiply and a fold of
/// the high half onto the low, then MurmurHash3's 64-bit finaliser. Every packet of a tracked
/// flow computes it, so it is cheap: 64-bit arithmetic, which the BPF ISA has natively, where
/// two 32-bit MurmurHash3s (what it replaced) need a mask after every shift and twice the
/// rounds. The fold matters: with a rotate in its place, the high bits of a pair (an IPv4
/// address's last byte) reached few bits of the state and the next pair's ports could cancel
/// them (one client's flows to neighbouring VIPs shared hashes).
#[inline(always)]
pub fn conn_hash<const N: usize>(words: &[u32; N]) -> [u32; 2] {
    let mut h = CONN_HASH_SEED;
    let mut i = 0;
    while i < N {
        let high = if i + 1 < N { words[i + 1] as u64 } else { 0 };
        h = (h ^ (words[i] as u64 | high << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // A multiply carries only upward: fold the high half down, so that the high bits of
        // this pair reach the low half, which the next pair's multiply spreads up again.
        h ^= h >> 32;
        i += 2;
    }
    let h = fmix64(h);
    [h as u32, (h >> 32) as u32]
}

/// MurmurHash3's 64-bit finaliser: a bijection in which every input bit reaches every output
/// bit.
#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
fn murmur3<const N: usize>(seed: u32, words: &[u32; N]) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < N {
        let mut k = words[i].wrapping_mul(0xcc9e_2d51);
        k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= (N as u32) * 4;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

const _: () = {
    assert!(core::mem::size_of::<ServiceKey>() == 20);
    assert!(core::mem::size_of::<ServiceValue>() == 28);
    assert!(core::mem::size_of::<Backend>() == 44);
    assert!(core::mem::size_of::<ConnKey>() == 40);
    assert!(core::mem::size_of::<ConnValue>() == 12);
    assert!(core::mem::size_of::<ConnEntry>() == 20);
    assert!(core::mem::size_of::<ConnBucket>() == 64);
    // Every backend id fits ConnValue's 16 bits.
    assert!(MAX_BACKENDS <= 1 << 16);
    assert!(core::mem::size_of::<FragKey>() == 40);
    assert!(core::mem::size_of::<FragValue>() == 4);
    assert!(core::mem::size_of::<Counters>() == 32);
    assert!(core::mem::size_of::<Config>() == 12 + 12 * MAX_IFACES as usize);
    assert!(core::mem::size_of::<Iface>() == 12);
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::size_of::<VipValue>() == 20);
    assert!(core::mem::size_of::<DecapConfig>() == 4);
    assert!(core::mem::size_of::<BenchBounce>() == 56 + BENCH_FRAME_MAX);
    assert!(core::mem::size_of::<RefusalEvent>() == 16);
    assert!(core::mem::size_of::<SyncEvent>() == 64);
    assert!(core::mem::size_of::<NatReply>() == 60);
    assert!(core::mem::size_of::<NatReplyWay>() == 64);
    assert!(core::mem::size_of::<NatReplyBody>() == 44);
    assert!(core::mem::offset_of!(NatReply, vip) % 4 == 0);
    assert!(core::mem::offset_of!(NatReply, client) % 4 == 0);
    assert!(core::mem::offset_of!(NatReply, mac) % 4 == 0);
    assert!(core::mem::offset_of!(NatReply, src_mac) % 4 == 2);
    assert!(core::mem::offset_of!(NatReplyBody, vip) % 4 == 0);
    assert!(core::mem::offset_of!(NatReplyBody, client) % 4 == 0);
    assert!(core::mem::offset_of!(NatReplyBody, mac) % 4 == 0);
    assert!(core::mem::offset_of!(NatReplyBody, src_mac) % 4 == 2);
    assert!(NAT_REPLY_CACHE_BUCKETS.is_power_of_two());
    assert!(core::mem::size_of::<SnatAddrs>() == 8 + 16 * MAX_SNAT_ADDRS);
    assert!(core::mem::size_of::<SnatEndpoint>() == 20);
    assert!(core::mem::size_of::<NatScratch>() == 16);
    assert!(MAX_BOUNCES <= CONN_BOUNCE_MASK >> CONN_BOUNCE_SHIFT);
    // A SNAT address index fits its flag bits, which no other flag and not NAT_FLOW_NEW uses.
    assert!(MAX_SNAT_ADDRS <= (CONN_SNAT_ADDR_MASK >> CONN_SNAT_ADDR_SHIFT) as usize + 1);
    assert!(
        CONN_SNAT_BITS
            & (CONN_F_CLOSING
                | CONN_F_ACKED
                | CONN_F_SYNCED
                | CONN_BOUNCE_MASK
                | CONN_SYN_FRAC_MASK)
            == 0
    );
    assert!(CONN_SNAT_BITS as u32 & NAT_FLOW_NEW == 0);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain #[repr(C)] data with every padding byte an explicit field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnValue {}
    unsafe impl aya::Pod for ConnEntry {}
    unsafe impl aya::Pod for ConnBucket {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Iface {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for DecapConfig {}
    unsafe impl aya::Pod for BenchBounce {}
    unsafe impl aya::Pod for RefusalEvent {}
    unsafe impl aya::Pod for SyncEvent {}
    unsafe impl aya::Pod for NatReply {}
    unsafe impl aya::Pod for NatReplyWay {}
    unsafe impl aya::Pod for SnatAddrs {}
    unsafe impl aya::Pod for SnatEndpoint {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{collections::HashSet, vec, vec::Vec};

    use super::*;

    #[test]
    fn flow_hash_is_stable() {
        // Pinned values: a change here moves flows between reals on every director.
        assert_eq!(flow_hash(&[0u32; 0]), flow_hash(&[]));
        assert_eq!(flow_hash(&[1, 2, 3]), flow_hash(&[1, 2, 3]));
        assert_ne!(flow_hash(&[1, 2, 3]), flow_hash(&[3, 2, 1]));
        assert_eq!(flow_hash(&[0xc612_0001]), GOLDEN_ONE_WORD);
    }

    // MurmurHash3_x86_32 of the little-endian bytes 01 00 12 c6 with seed "xlb1".
    const GOLDEN_ONE_WORD: u32 = 0x19fd_d5de;

    #[test]
    fn conn_hashes_are_stable() {
        // 198.18.1.1:40000 -> 198.18.0.100:80/tcp. Pinned: a change here moves every tracked
        // flow's entry (a table kept across an upgrade then misses, and its flows go through
        // Maglev again).
        let mut key = ConnKey {
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..ConnKey::default()
        };
        key.src[..4].copy_from_slice(&[198, 18, 1, 1]);
        key.dst[..4].copy_from_slice(&[198, 18, 0, 100]);
        assert_eq!(key.hashes(), [0xec18_7e79, 0x28a8_ec77]);
        let value = ConnValue {
            backend_id: 7,
            generation: 3,
            ..ConnValue::default()
        };
        let entry = ConnEntry::new(key.hashes(), value);
        assert!(entry.holds(key.hashes()));
        let torn = ConnEntry {
            value: ConnValue {
                backend_id: 8,
                ..value
            },
            ..entry
        };
        assert!(!torn.holds(key.hashes()));
    }

    #[test]
    fn the_seal_covers_the_full_nat_source_and_keeps_older_entries() {
        let hashes = [0x5161_319e, 0xb048_7c80];
        let plain = ConnValue {
            backend_id: 7,
            generation: 3,
            last_seen_s: 100,
            ..ConnValue::default()
        };
        // An older build sealed backend_id ^ generation * 0x9e3779b1 (32-bit generation).
        let older = [hashes[0], hashes[1] ^ (7 ^ 3u32.wrapping_mul(0x9e37_79b1))];
        assert_eq!(ConnEntry::new(hashes, plain).fingerprint, older);
        let snat = ConnValue {
            flags: CONN_F_SNAT | 2 << CONN_SNAT_ADDR_SHIFT,
            snat_port: 40000u16.to_be(),
            ..plain
        };
        assert_eq!(
            snat.snat(),
            (CONN_F_SNAT | 2 << CONN_SNAT_ADDR_SHIFT) as u32 | (40000u16.to_be() as u32) << 16
        );
        assert_eq!(plain.snat(), 0);
        let entry = ConnEntry::new(hashes, snat);
        assert!(entry.holds(hashes));
        // Torn: another writer's port, address index, or no source at all.
        for value in [
            ConnValue {
                snat_port: 40001u16.to_be(),
                ..snat
            },
            ConnValue {
                flags: CONN_F_SNAT | 3 << CONN_SNAT_ADDR_SHIFT,
                ..snat
            },
            ConnValue {
                flags: 0,
                snat_port: 0,
                ..snat
            },
        ] {
            assert!(!ConnEntry { value, ..entry }.holds(hashes));
        }
        // The data path's own flag updates keep it whole.
        let acked = ConnValue {
            flags: snat.flags | CONN_F_ACKED | CONN_F_CLOSING,
            ..snat
        };
        assert!(
            ConnEntry {
                value: acked,
                ..entry
            }
            .holds(hashes)
        );
    }

    #[test]
    fn conn_hash_spreads_neighbouring_flows_over_buckets() {
        // 65,536 flows of one client differing only in the source port, into as many
        // buckets: random placement leaves e^-1 (36.8 %) of the buckets empty and puts at
        // most 8 or 9 flows in any bucket. A hash that kept the ports' structure would leave
        // either far more or far fewer empty.
        const FLOWS: u32 = 1 << 16;
        let mut load = [0u8; FLOWS as usize];
        for port in 0..FLOWS {
            let ports = port << 16 | 80u16.to_be() as u32;
            let h = conn_hash(&[0x0101_12c6, 0x6400_12c6, ports, PROTO_TCP as u32]);
            load[(h[1] & (FLOWS - 1)) as usize] += 1;
        }
        let empty = load.iter().filter(|&&n| n == 0).count() as f64 / FLOWS as f64;
        assert!(
            (0.36..0.376).contains(&empty),
            "{empty} of the buckets empty"
        );
        assert!(
            load.iter().all(|&n| n <= 10),
            "a bucket holds over 10 flows"
        );
    }

    /// Keys of `flows` flows: for each of `vips` consecutive VIPs (IPv4 198.18.x.y or IPv6
    /// fd00::x:y), `ports` source ports of one client, all to port 80.
    fn one_client_to_many_vips(family: u8, vips: u16, ports: u16) -> Vec<ConnKey> {
        let mut keys = Vec::new();
        for vip in 0..vips {
            for port in 0..ports {
                let mut key = ConnKey {
                    sport: (40000 + port).to_be(),
                    dport: 80u16.to_be(),
                    proto: PROTO_TCP,
                    family,
                    ..ConnKey::default()
                };
                let [hi, lo] = vip.to_be_bytes();
                if family == FAMILY_V4 {
                    key.src[..4].copy_from_slice(&[198, 19, 0, 1]);
                    key.dst[..4].copy_from_slice(&[198, 18, hi, lo]);
                } else {
                    key.src[..2].copy_from_slice(&[0xfd, 0]);
                    key.src[15] = 1;
                    key.dst[..2].copy_from_slice(&[0xfd, 0]);
                    key.dst[14] = hi;
                    key.dst[15] = lo;
                }
                keys.push(key);
            }
        }
        keys
    }

    #[test]
    fn conn_hash_tells_apart_one_clients_flows_to_many_vips() {
        // A hash whose multiplies only carry upward gave 20,000 such flows (1,000 VIPs, 20
        // ports) 2,048 distinct hashes: flows sharing one entry evict each other.
        for family in [FAMILY_V4, FAMILY_V6] {
            let keys = one_client_to_many_vips(family, 1000, 20);
            let hashes: HashSet<[u32; 2]> = keys.iter().map(ConnKey::hashes).collect();
            assert_eq!(
                hashes.len(),
                keys.len(),
                "family {family}: colliding hashes"
            );
            // And they spread over buckets as random placement would: 20,000 flows in 32,768
            // buckets leave e^-0.61 (54 %) of the buckets empty.
            let mut load = vec![0u8; 1 << 15];
            for h in &hashes {
                load[(h[1] & ((1 << 15) - 1)) as usize] += 1;
            }
            let empty = load.iter().filter(|&&n| n == 0).count() as f64 / load.len() as f64;
            assert!(
                (0.53..0.555).contains(&empty),
                "family {family}: {empty} empty"
            );
        }
    }

    #[test]
    fn one_bucket_per_flow_asked_rounded_to_a_power_of_two() {
        assert_eq!(conn_buckets(0), 1);
        assert_eq!(conn_buckets(1), 1);
        assert_eq!(conn_buckets(100_000), 131_072);
        assert_eq!(conn_buckets(DEFAULT_CONN_CAPACITY), DEFAULT_CONN_CAPACITY);
        assert_eq!(conn_buckets(MAX_CONN_CAPACITY), MAX_CONN_CAPACITY);
    }
}
