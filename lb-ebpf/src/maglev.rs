//! Maglev lookup: the table is built in userspace; here we only index it.

use lb_common::{
    BACKEND_F_FORWARD, Backend, FAMILY_V4, NO_BACKEND, REFUSAL_PROBES, SERVICE_F_HASH_SRC_IP,
    ServiceValue, conn_hash, flow_hash,
};

use crate::{
    maps::{BACKENDS, MAGLEV},
    parse::Packet,
};

/// The flow hash that picks a slot, given the packet's 5-tuple hash: that hash, except for a
/// source-IP service, which hashes the client address alone, so all of a client's connections
/// share a real.
#[inline(always)]
pub fn sched_hash(pkt: &Packet, svc: &ServiceValue, five_tuple: u32) -> u32 {
    if svc.flags & SERVICE_F_HASH_SRC_IP != 0 {
        let src = words(&pkt.src);
        return if pkt.family == FAMILY_V4 {
            flow_hash(&[src[0]])
        } else {
            flow_hash(&src)
        };
    }
    five_tuple
}

/// The hash of addresses, ports (zero when `with_ports` is false) and protocol: Maglev's.
#[inline(always)]
pub fn five_tuple_hash(pkt: &Packet, with_ports: bool) -> u32 {
    over_five_tuple(pkt, with_ports, |w| flow_hash(w), |w| flow_hash(w))
}

/// The hash whose bits a TUN service's outer headers carry (GUE's source port, the IPv6 flow
/// label, tunnel-source host bits): the low half of the connection table's hash, which a whole
/// packet's lookup has already computed (`conn_hashes(pkt)[0]`); ports left out for a fragment,
/// so every fragment of a datagram gets the same outer header.
#[inline(always)]
pub fn outer_hash(pkt: &Packet, with_ports: bool) -> u32 {
    over_five_tuple(pkt, with_ports, |w| conn_hash(w), |w| conn_hash(w))[0]
}

/// The connection table's hashes of the packet's flow: `ConnKey::hashes`.
#[inline(always)]
pub fn conn_hashes(pkt: &Packet) -> [u32; 2] {
    over_five_tuple(pkt, true, |w| conn_hash(w), |w| conn_hash(w))
}

/// `hash` of the 5-tuple's words: addresses (one word each for IPv4, four for IPv6), ports
/// (zero when `with_ports` is false), protocol.
#[inline(always)]
fn over_five_tuple<R>(
    pkt: &Packet,
    with_ports: bool,
    v4: impl FnOnce(&[u32; 4]) -> R,
    v6: impl FnOnce(&[u32; 10]) -> R,
) -> R {
    let src = words(&pkt.src);
    let dst = words(&pkt.dst);
    let ports = if with_ports {
        (pkt.sport as u32) << 16 | pkt.dport as u32
    } else {
        0
    };
    let proto = pkt.proto as u32;
    if pkt.family == FAMILY_V4 {
        v4(&[src[0], dst[0], ports, proto])
    } else {
        v6(&[
            src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], ports, proto,
        ])
    }
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    // SAFETY: [u8; 16] and [u32; 4] have the same size; read_unaligned tolerates alignment.
    unsafe { (addr.as_ptr() as *const [u32; 4]).read_unaligned() }
}

/// Whether a backend entry may take this service's packets: marked for forwarding, and still
/// an entry of this service.
#[inline(always)]
pub fn usable(backend: &Backend, svc: &ServiceValue) -> bool {
    backend.flags & BACKEND_F_FORWARD != 0 && backend.service_id == svc.id
}

/// The backend id in the service's table for this hash, or None when the table is missing or
/// holds no backend in that slot.
#[inline(always)]
pub fn pick(service_id: u32, hash: u32) -> Option<u32> {
    let table = MAGLEV.get(service_id)?;
    let size = table.get(0)?[0];
    if size == 0 {
        return None;
    }
    let slot = hash % size;
    let id = table.get(1 + slot / 2)?[(slot & 1) as usize];
    if id == NO_BACKEND { None } else { Some(id) }
}

/// The first backend other than `not` in the service's table, from the hash's own slot on (at
/// most `REFUSAL_PROBES` slots), if it is usable: where a refused flow goes. Maglev spreads
/// each real's slots evenly, so a few probes find another real; the order depends only on the
/// table, so every director with the same table picks the same one. (Reals that are down or
/// drained hold no slots, so the first other real is the one to take.)
///
/// The loop body has one way on: each probe either ends the loop or moves to the next slot,
/// and the slot is computed without a wrap-around branch, so the verifier walks it once per
/// path (64 short iterations), not once per combination of branches.
#[inline(always)]
pub fn pick_other(svc: &ServiceValue, hash: u32, not: u32) -> Option<(u32, &'static Backend)> {
    let table = MAGLEV.get(svc.id)?;
    let size = table.get(0)?[0] as u64;
    if size == 0 {
        return None;
    }
    let start = hash as u64 % size;
    let mut found = NO_BACKEND;
    for i in 0..REFUSAL_PROBES as u64 {
        let slot = ((start + i) % size) as u32;
        let pair = table.get(1 + slot / 2)?;
        let id = pair[(slot & 1) as usize];
        if id != NO_BACKEND && id != not {
            found = id;
            break;
        }
    }
    let b = BACKENDS.get(found)?;
    if !usable(b, svc) {
        return None;
    }
    Some((found, b))
}
