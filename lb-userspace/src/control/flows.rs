//! Flow accounting: one walk of the connection table, counting each real's active flows (for
//! `status`, `wait-drained`, metrics and the "drain finished" log); and the NAT reply table's
//! timeouts.

use std::collections::HashMap;

use anyhow::Result;
use lb_common::{NatKey, NatReply, SnatEndpoint};

use super::Balancer;

/// A flow counts as active while it has sent a packet within this many seconds...
pub const ACTIVE_FLOW_IDLE_S: u32 = 60;
/// ...or, once its client sent a FIN or RST, within this many (a half-closed connection that
/// still receives data keeps ACKing, so it stays active).
pub const CLOSING_FLOW_IDLE_S: u32 = 2;

/// Monotonic coarse seconds: the clock the data path stamps flows with.
pub fn now_coarse_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// One walk of the connection table: flows per backend id that sent a packet recently (see
/// `ACTIVE_FLOW_IDLE_S`), and every entry.
#[derive(Default)]
pub struct Flows {
    pub active: HashMap<u32, u64>,
    pub entries: u64,
}

pub fn active_flows(b: &mut Balancer) -> Result<Flows> {
    let now = now_coarse_s();
    // Counted by index (a backend id is 16 bits) rather than a hash-map update per flow, then
    // kept where non-zero.
    let mut active = vec![0u64; lb_common::MAX_BACKENDS as usize];
    let mut entries = 0;
    b.dataplane().for_each_conn(|v| {
        entries += 1;
        if is_active(v, now) {
            active[usize::from(v.backend_id)] += 1;
        }
    })?;
    Ok(Flows {
        active: (0u32..).zip(active).filter(|&(_, n)| n != 0).collect(),
        entries,
    })
}

/// Whether a tracked flow sent a packet recently at `now` (`now_coarse_s`): see
/// `ACTIVE_FLOW_IDLE_S` and `CLOSING_FLOW_IDLE_S`.
pub fn is_active(v: &lb_common::ConnValue, now: u32) -> bool {
    let idle_limit = if v.flags & lb_common::CONN_F_CLOSING != 0 {
        CLOSING_FLOW_IDLE_S
    } else {
        ACTIVE_FLOW_IDLE_S
    };
    now.saturating_sub(v.last_seen_s) <= idle_limit
}

/// NAT reply entries idle this long are deleted (IPVS's defaults for established TCP and for
/// UDP)...
pub const NAT_TCP_IDLE_S: u32 = 900;
pub const NAT_UDP_IDLE_S: u32 = 300;
/// ...and TCP ones this long after the real's FIN or RST (the last ACKs are through).
pub const NAT_CLOSING_IDLE_S: u32 = 10;

/// Deletes the NAT reply entries past their timeout; how many. An entry is refreshed by its
/// flow's replies (once a second); a flow that is idle in both directions beyond its timeout
/// loses its translation, as it would lose its IPVS connection entry.
pub fn expire_nat_replies(b: &mut Balancer) -> Result<usize> {
    let now = now_coarse_s();
    let dp = b.dataplane();
    let mut expired: Vec<(NatKey, NatReply)> = Vec::new();
    for (k, v) in dp.nat_replies()? {
        let limit = if k.proto == lb_common::PROTO_UDP {
            NAT_UDP_IDLE_S
        } else if v.flags & lb_common::CONN_F_CLOSING != 0 {
            NAT_CLOSING_IDLE_S
        } else {
            NAT_TCP_IDLE_S
        };
        let idle = |seen: u32| now.saturating_sub(seen) > limit;
        // Replies found in the reply cache refresh its copy only.
        if idle(v.last_seen_s) && dp.cached_reply_seen(&k)?.is_none_or(idle) {
            expired.push((k, v));
        }
    }
    let keys: Vec<NatKey> = expired.iter().map(|(k, _)| *k).collect();
    b.dataplane().delete_nat_replies(&keys)?;
    // A full-NAT flow's SNAT port goes with its reply entry: its established packets trust
    // `FULLNAT_FLOWS` (lb-ebpf's nat.rs), which must not keep naming a port another flow may
    // now take. Full NAT's entries are those whose reply goes to another address or port than
    // the client's.
    let fullnat: Vec<(NatKey, SnatEndpoint)> = expired
        .iter()
        .filter(|(k, v)| k.dst != v.client || k.dport != v.client_port)
        .map(|(k, v)| {
            let flow = NatKey {
                src: v.client,
                dst: v.vip,
                sport: v.client_port,
                dport: v.vport,
                ..*k
            };
            let snat = SnatEndpoint {
                addr: k.dst,
                port: k.dport,
                _pad: [0; 2],
            };
            (flow, snat)
        })
        .collect();
    b.dataplane().delete_fullnat_flows(&fullnat)?;
    // The connection table's copy of that source too (`CONN_F_SNAT`), which its established
    // packets trust first.
    let sources: Vec<(NatKey, u16)> = fullnat.iter().map(|(f, s)| (*f, s.port)).collect();
    b.dataplane().forget_conn_snat(&sources)?;
    Ok(expired.len())
}
