//! Connection table and fragment table.
//!
//! A flow is scheduled once (its SYN, or its first packet seen) through Maglev and recorded, so
//! it stays on its real when the set of reals changes. A TCP SYN always re-schedules: a new
//! connection that reuses an old 5-tuple must not inherit a stale entry.
//!
//! The connection table is set-associative (`CONNS`, an array of 64-byte buckets of
//! `CONN_WAYS` entries): a lookup reads one cache line, where a hash map reads a bucket, then
//! an element elsewhere. A flow's bucket and fingerprint come from its 5-tuple hashes
//! (`ConnKey::hashes`: the table's own, cheaper than Maglev's, which a tracked DR flow's packets
//! never compute). A new flow takes its bucket's entry that
//! was seen least recently (an ACKed flow's counts as seen `CONN_ACKED_KEEP_S` later); a flow whose entry was taken, or whose entry is torn (two CPUs
//! wrote it at once), misses and goes through Maglev again, which gives it the same real as
//! long as the service's reals did not change.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, CONFIG_F_SYNC, CONN_BOUNCE_MASK, CONN_BOUNCE_SHIFT, CONN_F_ACKED, CONN_F_CLOSING,
    CONN_F_SNAT, CONN_F_SYNCED, CONN_SNAT_ADDR_SHIFT, CONN_SNAT_BITS, CONN_SYN_FRAC_MASK,
    CONN_SYN_FRAC_SHIFT, ConnBucket, ConnEntry, ConnKey, ConnValue, FragKey, FragValue, Global,
    MAX_BOUNCES, RefusalEvent, SYN_RETRY_MAX_16THS, SYN_RETRY_MIN_16THS, ServiceValue, SyncEvent,
};

use crate::{
    counters, maglev,
    maps::{BACKENDS, CONFIG, CONN_BUCKET_MASK, CONNS, FRAGS, REFUSALS, SYNC_EVENTS},
    parse::Packet,
};

/// A backend the packet may be sent to, and whether this packet starts a new flow.
pub struct Choice {
    pub backend_id: u32,
    /// The real's entry in BACKENDS, not a copy.
    pub backend: &'static Backend,
    pub new_flow: bool,
    /// The bits a TUN service's outer headers take from the flow (`maglev::outer_hash`): the
    /// connection table's hash, computed for the lookup anyway, so a tracked flow's packets
    /// need no second hash.
    pub outer_hash: u32,
    /// A tracked full-NAT flow's source, as its entry holds it (`ConnValue::snat`); 0 if none.
    pub snat: u32,
}

const NS_PER_S: u64 = 1_000_000_000;

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper without arguments; the coarse clock costs no clock-source read.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The coarse clock in whole seconds, as tables record it (once per flow: see `touch`).
#[inline(always)]
pub fn now_s() -> u32 {
    (now_ns() / NS_PER_S) as u32
}

/// Records that a tracked flow was seen at `now_ns`, in whole seconds. The division runs once
/// per flow and second: a 64-bit divide costs more than the rest of this function, and most
/// packets of a flow fall in the second already recorded (a multiply tells). Written at most
/// once a second, so the entry's cache line stays shared otherwise.
#[inline(always)]
pub fn touch(last_seen_s: &mut u32, now_ns: u64) {
    let seen_ns = *last_seen_s as u64 * NS_PER_S;
    if now_ns < seen_ns || now_ns >= seen_ns + NS_PER_S {
        *last_seen_s = (now_ns / NS_PER_S) as u32;
    }
}

#[inline(always)]
fn backend(id: u32) -> Option<&'static Backend> {
    BACKENDS.get(id)
}

/// The flow's bucket in the connection table.
#[inline(always)]
fn bucket(hashes: [u32; 2]) -> Option<*mut ConnBucket> {
    // SAFETY: a read-only global the loader sets (a constant to the verifier).
    let mask = unsafe { core::ptr::read_volatile(&CONN_BUCKET_MASK) };
    CONNS.get_ptr_mut(hashes[1] & mask)
}

/// The flow's entry in its bucket, if whole.
#[inline(always)]
fn find(bucket: *mut ConnBucket, hashes: [u32; 2]) -> Option<*mut ConnEntry> {
    // SAFETY: a bucket of CONNS; entries are plain data, and a concurrent writer can at worst
    // tear one, which `holds` then refuses.
    let entries = unsafe { &mut (*bucket).entries };
    entries
        .iter_mut()
        .find(|e| e.holds(hashes))
        .map(|e| e as *mut ConnEntry)
}

/// The entry a new flow takes: its own (a torn one included), else the one with the lowest
/// keep score (`ConnValue::keep_score`: seen least recently, ACKed flows kept longer).
#[inline(always)]
fn victim(bucket: *mut ConnBucket, hashes: [u32; 2]) -> *mut ConnEntry {
    // SAFETY: as in `find`.
    let entries = unsafe { &mut (*bucket).entries };
    let mut victim = 0;
    let mut lowest = u32::MAX;
    for (i, e) in entries.iter().enumerate() {
        if e.fingerprint[0] == hashes[0] {
            victim = i;
            break;
        }
        let score = e.value.keep_score();
        if score < lowest {
            lowest = score;
            victim = i;
        }
    }
    &mut entries[victim % entries.len()]
}

/// The real a flow's entry names, if it still serves the service as it did when recorded: a
/// fingerprint that matched by chance cannot send a flow to another service's real.
#[inline(always)]
fn tracked(conn: &ConnValue, svc: &ServiceValue, hashes: [u32; 2]) -> Option<Choice> {
    let b = backend(conn.backend_id.into())?;
    if !conn.of_generation(b.generation) || !maglev::usable(b, svc) {
        return None;
    }
    Some(Choice {
        backend_id: conn.backend_id.into(),
        backend: b,
        new_flow: false,
        outer_hash: hashes[0],
        snat: conn.snat(),
    })
}

/// Maglev's real for scheduling hash `hash`, recording nothing.
#[inline(always)]
fn schedule(svc: &ServiceValue, hash: u32, outer_hash: u32) -> Option<Choice> {
    let backend_id = maglev::pick(svc.id, hash)?;
    let b = backend(backend_id)?;
    if !maglev::usable(b, svc) {
        return None;
    }
    Some(Choice {
        backend_id,
        backend: b,
        new_flow: false,
        outer_hash,
        snat: 0,
    })
}

/// The real for a whole (unfragmented) packet: its tracked flow's, or a fresh Maglev choice.
#[inline(always)]
pub fn select(pkt: &Packet, svc: &ServiceValue) -> Option<Choice> {
    let hashes = maglev::conn_hashes(pkt);
    let bucket = bucket(hashes)?;
    let found = find(bucket, hashes);
    let now = now_ns();
    if !pkt.is_tcp_syn() {
        match found {
            Some(entry) => {
                // SAFETY: an entry of CONNS; a concurrent writer of the same flow writes the
                // same fields with equally valid values.
                let conn = unsafe { &mut (*entry).value };
                if let Some(choice) = tracked(conn, svc, hashes) {
                    touch(&mut conn.last_seen_s, now);
                    // Written once per flow: a later SYN is a new connection.
                    if conn.flags & CONN_F_ACKED == 0 {
                        conn.flags |= CONN_F_ACKED;
                    }
                    // Taken over from a peer (written once per synced copy): ours to announce.
                    if conn.flags & CONN_F_SYNCED != 0 {
                        conn.flags &= !CONN_F_SYNCED;
                        announce(pkt, conn);
                    }
                    // Written once per flow, so the cache line stays shared otherwise.
                    if pkt.is_tcp_fin_or_rst() && conn.flags & CONN_F_CLOSING == 0 {
                        conn.flags |= CONN_F_CLOSING;
                    }
                    return Some(choice);
                }
                counters::global(Global::ConnStale);
            }
            None => counters::global(Global::ConnMiss),
        }
    }
    let t16 = now / (NS_PER_S / 16);
    let five_tuple = maglev::five_tuple_hash(pkt, true);
    let sched_hash = maglev::sched_hash(pkt, svc, five_tuple);
    let mut choice = schedule(svc, sched_hash, hashes[0])?;
    if pkt.is_tcp_syn()
        && let Some(entry) = found
        // SAFETY: an entry of CONNS, only read.
        && let Some(moved) = retransmitted_syn(unsafe { &(*entry).value }, svc, &choice, sched_hash, t16)
    {
        choice = moved;
        counters::global(Global::SynRetriesMoved);
    }
    let value = ConnValue {
        // Below MAX_BACKENDS (2^16): BACKENDS held an entry for it.
        backend_id: choice.backend_id as u16,
        generation: choice.backend.generation as u16,
        snat_port: 0,
        last_seen_s: (t16 / 16) as u32,
        flags: if pkt.is_tcp_fin_or_rst() {
            CONN_F_CLOSING
        } else {
            0
        } | (((t16 & 0x0f) as u16) << CONN_SYN_FRAC_SHIFT),
    };
    let entry = found.unwrap_or_else(|| victim(bucket, hashes));
    // SAFETY: an entry of CONNS. A packet of another flow written here at once on another CPU
    // may tear it: `holds` then refuses it and that flow goes through Maglev again.
    unsafe { *entry = ConnEntry::new(hashes, value) };
    announce(pkt, &value);
    choice.new_flow = true;
    Some(choice)
}

/// Connection sync: hands the entry just written for `pkt`'s flow to the daemon, which sends
/// it to the peer directors (`SyncEvent`). Only where an entry is written (never on an
/// established flow's packets, but for the first one forwarded on a flow installed from a
/// peer's sync: `CONN_F_SYNCED`), and only while sync is on.
#[inline(always)]
fn announce(pkt: &Packet, value: &ConnValue) {
    if !CONFIG.get(0).is_some_and(|c| c.flags & CONFIG_F_SYNC != 0) {
        return;
    }
    // Reserved and written in place: no copy on the stack (`xlb_icmp`'s is full).
    let Some(mut event) = SYNC_EVENTS.reserve(0) else {
        counters::global(Global::SyncEventsLost);
        return;
    };
    event.write(SyncEvent {
        key: ConnKey {
            src: pkt.src,
            dst: pkt.dst,
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            family: pkt.family,
            _pad: [0; 2],
        },
        backend_id: value.backend_id as u32,
        generation: value.generation as u32,
        flags: value.flags,
        _pad: [0; 6],
        // SAFETY: a helper without arguments.
        at_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
    });
    event.submit(0);
}

/// A SYN whose flow's entry holds an unanswered SYN (no ACK since) sent to the real Maglev
/// picks again, 0.875-8 s ago: a retransmission, so that real did not answer (its host may be
/// dark). The flow goes to the next other real in Maglev order instead, as a refusal would.
#[inline(always)]
fn retransmitted_syn(
    conn: &ConnValue,
    svc: &ServiceValue,
    fresh: &Choice,
    sched_hash: u32,
    t16: u64,
) -> Option<Choice> {
    if conn.flags & CONN_F_ACKED != 0 {
        return None;
    }
    let then = conn.last_seen_s as u64 * 16
        + ((conn.flags & CONN_SYN_FRAC_MASK) >> CONN_SYN_FRAC_SHIFT) as u64;
    let age = t16.checked_sub(then)?;
    if !(SYN_RETRY_MIN_16THS..=SYN_RETRY_MAX_16THS).contains(&age) {
        return None;
    }
    let unanswered = conn.backend_id as u32;
    let b = backend(unanswered)?;
    // Only when the entry still names the real this SYN would go to again.
    if unanswered != fresh.backend_id || !conn.of_generation(b.generation) {
        return None;
    }
    let (id, next) = maglev::pick_other(svc, sched_hash, unanswered)?;
    Some(Choice {
        backend_id: id,
        backend: next,
        new_flow: true,
        outer_hash: fresh.outer_hash,
        snat: 0,
    })
}

/// The real a flow's next packet would go to, leaving the table as it is (for ICMP errors
/// about the flow, which must neither create it nor keep it alive): its tracked entry's, else
/// Maglev's.
#[inline(always)]
pub fn peek(pkt: &Packet, svc: &ServiceValue) -> Option<Choice> {
    let hashes = maglev::conn_hashes(pkt);
    if let Some(entry) = bucket(hashes).and_then(|b| find(b, hashes)) {
        // SAFETY: an entry of CONNS, only read.
        if let Some(choice) = tracked(unsafe { &(*entry).value }, svc, hashes) {
            return Some(choice);
        }
    }
    let five_tuple = maglev::five_tuple_hash(pkt, true);
    schedule(svc, maglev::sched_hash(pkt, svc, five_tuple), hashes[0])
}

/// Full NAT: records in the flow's entry the source its requests leave with (`CONN_F_SNAT`:
/// address `addr_index` of the service's SNAT addresses, `port` in network byte order), so its
/// next packets need no `FULLNAT_FLOWS` lookup. Only while the entry names `backend_id` (a
/// source is claimed per real); written only if it changes, so the cache line stays shared.
#[inline(always)]
pub fn record_snat(pkt: &Packet, backend_id: u32, addr_index: u32, port: u16) {
    let hashes = maglev::conn_hashes(pkt);
    let Some(entry) = bucket(hashes).and_then(|b| find(b, hashes)) else {
        return;
    };
    // SAFETY: an entry of CONNS; see `select`.
    let entry = unsafe { &mut *entry };
    let conn = entry.value;
    let snat_flags = CONN_F_SNAT | ((addr_index as u16) << CONN_SNAT_ADDR_SHIFT);
    if conn.backend_id as u32 != backend_id
        || (conn.flags & CONN_SNAT_BITS == snat_flags && conn.snat_port == port)
    {
        return;
    }
    let value = ConnValue {
        flags: (conn.flags & !CONN_SNAT_BITS) | snat_flags,
        snat_port: port,
        ..conn
    };
    // Sealed anew: the seal covers the source. A racing writer can at worst tear it (a miss).
    *entry = ConnEntry::new(hashes, value);
}

/// The real for a fragment: scheduled on addresses only (never on ports, which later fragments
/// lack), so every fragment of a datagram reaches the same real without any shared state.
#[inline(always)]
pub fn select_fragment(pkt: &Packet, svc: &ServiceValue) -> Option<Choice> {
    let five_tuple = maglev::five_tuple_hash(pkt, false);
    schedule(
        svc,
        maglev::sched_hash(pkt, svc, five_tuple),
        maglev::outer_hash(pkt, false),
    )
}

#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// The first fragment tells which ports (hence which service) its datagram is for.
#[inline(always)]
pub fn remember_fragment_ports(pkt: &Packet) {
    let value = FragValue {
        sport: pkt.sport,
        dport: pkt.dport,
    };
    let _ = FRAGS.insert(frag_key(pkt), value, 0);
}

/// The ports a later fragment's datagram was sent to, if its first fragment was seen.
#[inline(always)]
pub fn fragment_ports(pkt: &Packet) -> Option<FragValue> {
    FRAGS.get_ptr(frag_key(pkt)).map(|v| unsafe { *v })
}

/// Who sent a refusal: what the director can check it against.
pub enum Sender {
    /// DR: the frame's source MAC.
    Mac([u8; 6]),
    /// TUN: the outer source address (IPv4 in the first four bytes).
    Addr([u8; 16]),
}

/// What becomes of a refusal.
pub enum Refused {
    /// Re-scheduled: the flow's entry now names this real.
    Moved(Choice),
    /// Bounced too often already, or no other real: drop.
    Bounced,
    /// Not from the real the flow is tracked to (or no such flow): drop, never honour.
    Forged,
}

/// A refusal of `pkt` (a TCP SYN or UDP datagram the director forwarded) from `from`: accepted
/// only from the real the flow's entry names, then re-scheduled to another usable real of the
/// service, the first in Maglev order from the flow's own slot that is not the refusing one
/// (every director picks the same), and the entry rewritten.
#[inline(always)]
pub fn refused(pkt: &Packet, svc: &ServiceValue, from: &Sender) -> Refused {
    let hashes = maglev::conn_hashes(pkt);
    let Some(entry) = bucket(hashes).and_then(|b| find(b, hashes)) else {
        return Refused::Forged;
    };
    // SAFETY: an entry of CONNS; see `select`.
    let entry = unsafe { &mut *entry };
    let conn = &entry.value;
    let refusing = conn.backend_id as u32;
    // The real the entry names, usable or not: it may have been taken down since it refused.
    let Some(b) = backend(refusing) else {
        return Refused::Forged;
    };
    if !conn.of_generation(b.generation) || b.service_id != svc.id {
        return Refused::Forged;
    }
    let genuine = match from {
        Sender::Mac(mac) => *mac == b.mac,
        Sender::Addr(addr) => u128::from_ne_bytes(*addr) == u128::from_ne_bytes(b.addr),
    };
    if !genuine {
        return Refused::Forged;
    }
    counters::refusal(refusing);
    let _ = REFUSALS.output(
        RefusalEvent {
            backend_id: refusing,
            generation: b.generation,
            // SAFETY: a helper without arguments.
            refused_at_ns: unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() },
        },
        0,
    );
    let bounces = (conn.flags & CONN_BOUNCE_MASK) >> CONN_BOUNCE_SHIFT;
    if bounces >= MAX_BOUNCES {
        return Refused::Bounced;
    }
    let five_tuple = maglev::five_tuple_hash(pkt, true);
    let hash = maglev::sched_hash(pkt, svc, five_tuple);
    let Some((id, next)) = maglev::pick_other(svc, hash, refusing) else {
        return Refused::Bounced;
    };
    // A full-NAT source is claimed per real: the new real's is claimed again.
    let kept = conn.flags & !(CONN_BOUNCE_MASK | CONN_SNAT_BITS);
    let mut moved = ConnValue {
        backend_id: id as u16,
        generation: next.generation as u16,
        flags: kept | ((bounces + 1) << CONN_BOUNCE_SHIFT),
        snat_port: 0,
        last_seen_s: conn.last_seen_s,
    };
    touch(&mut moved.last_seen_s, now_ns());
    // Sealed anew: the fingerprint names the new real.
    *entry = ConnEntry::new(hashes, moved);
    announce(pkt, &moved);
    Refused::Moved(Choice {
        backend_id: id,
        backend: next,
        new_flow: true,
        outer_hash: hashes[0],
        snat: 0,
    })
}
