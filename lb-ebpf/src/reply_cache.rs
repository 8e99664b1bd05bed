//! The IPv4 NAT reply cache (`NAT_REPLY_CACHE`): copies of IPv4 flows' `NAT_REPLIES` entries in
//! a set-associative table of two 64-byte ways a bucket, so that a reply reads one cache line
//! where the reply table (an LRU hash) costs a bucket and an element elsewhere.
//!
//! `NAT_REPLIES` stays the record: the control plane lists, expires and syncs it, and a reply
//! the cache misses finds its flow there. Copies are written only where reply entries are: by
//! the data path when it schedules a flow (`record`, right after the entry), by the control
//! plane when it installs one (connection sync), which also removes a tuple's copy when it
//! deletes its entry. A reply never copies the reply table (a copy it took could land after a
//! new flow's on the same tuple, and outlive it). Safety of a copy:
//! - a way two CPUs wrote at once is torn; its seal (a hash of the copy) then refuses it, and
//!   its replies take the reply table;
//! - a tuple has at most one way (a copy goes to the way already holding its tuple), and a new
//!   flow on a tuple overwrites its copy;
//! - a flow whose copy lost its way to another flow's takes the reply table from then on.
//!
//! A reply found here refreshes the copy's `last_seen_s`, not the reply table's: the control
//! plane's expiry takes the later of the two.

use lb_common::{FAMILY_V4, NatKey, NatReply, NatReplyBody, NatReplyWay, nat_reply_cache_way};

use crate::{
    maglev,
    maps::{NAT_REPLY_CACHE, NAT_REPLY_COPY, NAT_REPLY_FOUND},
    parse::Packet,
};

#[inline(always)]
fn four(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// The two ways of the bucket of a tuple with these `ConnKey::hashes`.
#[inline(always)]
fn ways(hashes: [u32; 2]) -> Option<[*mut NatReplyWay; 2]> {
    let first = nat_reply_cache_way(hashes);
    Some([
        NAT_REPLY_CACHE.get_ptr_mut(first)?,
        NAT_REPLY_CACHE.get_ptr_mut(first + 1)?,
    ])
}

/// The IPv4 packet's reply translation, if the cache holds a whole copy: its way (whose
/// `last_seen_s` the caller refreshes) and the translation, expanded from the copy as it was
/// checked against its seal (this CPU's, in map memory: the stack has no room).
#[inline(always)]
pub fn find(pkt: &Packet) -> Option<(*mut NatReplyWay, &'static NatReply)> {
    let (src, dst) = (four(&pkt.src), four(&pkt.dst));
    let copy = NAT_REPLY_COPY.get_ptr_mut(0)?;
    let found = NAT_REPLY_FOUND.get_ptr_mut(0)?;
    for way in ways(maglev::conn_hashes(pkt))? {
        // SAFETY: a way of the cache: plain data, which a concurrent writer may tear (the
        // seal then refuses the copy); `copy` and `found` are this CPU's own elements.
        unsafe {
            if !(*way)
                .body
                .is_for(&src, &dst, pkt.sport, pkt.dport, pkt.proto)
            {
                continue;
            }
            let seal = core::ptr::read_volatile(&(*way).seal);
            core::ptr::copy_nonoverlapping(&(*way).body, copy, 1);
            let copy = &*copy;
            if seal != copy.seal() || !copy.is_for(&src, &dst, pkt.sport, pkt.dport, pkt.proto) {
                return None;
            }
            copy.expand(&mut *found);
            return Some((way, &*found));
        }
    }
    None
}

/// Copies the reply entry just written for `key` (an IPv4 flow's; others are not cached).
#[inline(always)]
pub fn record(key: &NatKey, r: &NatReply) {
    if key.family != FAMILY_V4 {
        return;
    }
    let Some(copy) = NAT_REPLY_COPY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own element, which nothing else writes while this program runs.
    let copy = unsafe {
        (*copy).fill(key, r);
        &*copy
    };
    write(key, copy, r.last_seen_s);
}

/// Writes the copy into the way holding its tuple, else into its bucket's way seen least
/// recently (so a tuple has one way at most).
#[inline(always)]
fn write(key: &NatKey, body: &NatReplyBody, last_seen_s: u32) {
    let Some([a, b]) = ways(key.hashes()) else {
        return;
    };
    let (src, dst) = (four(&key.src), four(&key.dst));
    // SAFETY: ways of the cache (see `find`); nothing is read through them but plain data.
    unsafe {
        let holds = |w: *mut NatReplyWay| {
            (*w).body
                .is_for(&src, &dst, key.sport, key.dport, key.proto)
        };
        let way = if holds(a) {
            a
        } else if holds(b) || (*b).last_seen_s < (*a).last_seen_s {
            b
        } else {
            a
        };
        core::ptr::copy_nonoverlapping(body, &mut (*way).body, 1);
        core::ptr::write_volatile(&mut (*way).last_seen_s, last_seen_s);
        core::ptr::write_volatile(&mut (*way).seal, body.seal());
    }
}
