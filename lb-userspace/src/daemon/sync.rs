//! Connection sync between directors (`xlb daemon --sync-peer`), as IPVS's sync daemon: each
//! director sends the entries of its new flows to its peers and installs theirs, so a peer
//! that takes a flow over (ECMP moved it, or VRRP moved the VIP) finds the real it was on.
//!
//! - The data path writes one `SyncEvent` to the `SYNC_EVENTS` ring buffer per entry it writes
//!   for a new flow (only while `CONFIG_F_SYNC` is on); `Sender::take_events` names each
//!   flow's real by service and address (`sync::SyncEntry`: backend ids are local) and queues
//!   it; `Sender::flush`, every `FLUSH_EVERY`, packs the queue into datagrams (the wire format:
//!   crate::sync) and sends them to every peer.
//! - Every `REFRESH_EVERY`, `Sender::refresh` re-sends the flows it announced that are still in
//!   the table and sent a packet within the last two refresh periods, and forgets those gone
//!   or idle: a lost datagram is repaired by the next refresh (UDP, no retransmission), and a
//!   peer's copy of an active flow never ages out of its table.
//! - `Receiver::take` accepts a datagram only from a peer's address, with the shared key's MAC
//!   and a fresh sequence; it maps each entry's (service, real) to its own backend and writes
//!   the entry into its connection table, marked `CONN_F_SYNCED`. Anything refused changes
//!   nothing and is counted.
//! - NAT flows carry what their replies need (`sync::NatState`), read from the data path's NAT
//!   tables at `flush`; the receiver installs the reply translation (dataplane/nat.rs), its
//!   reply leaving by the interface of its own route to the client (looked up by the receive
//!   loop, cached).
//! - Takeover: the first packet a director forwards on a flow marked `CONN_F_SYNCED` clears
//!   the mark and is announced as a new flow's (lb-ebpf's conntrack.rs), so the director now
//!   forwarding the flow refreshes it for the others (a restarted old master learns it back).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use lb_common::{
    CONN_F_CLOSING, CONN_F_SYNCED, CONN_SNAT_BITS, ConnKey, ConnValue, SnatEndpoint, SyncEvent,
};

use super::Shared;
use crate::{
    config::Mode,
    control::{Balancer, addr_bytes, addr_of, is_active, now_coarse_s},
    dataplane::{NatFlow, ReplyPath, ring_records},
    netlink::Neighbours,
    sync::{self, NatState, Refusal, ReplayGuard, Sequencer, SyncEntry},
};

/// How often queued entries are sent: the most a new flow waits before its datagram leaves.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// How often the flows a director announced are sent again while active.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);

/// What `xlb daemon --sync-peer` configures.
pub struct SyncOptions {
    pub peers: Vec<SocketAddr>,
    /// The address batches are received on and sent from.
    pub listen: SocketAddr,
    /// The peers' shared key (`sync::load_key`).
    pub key: Vec<u8>,
}

/// The `xlb_sync_*` counters.
#[derive(Default)]
pub struct SyncStats {
    pub entries_sent: AtomicU64,
    pub batches_sent: AtomicU64,
    /// Datagrams the kernel would not take (socket buffer full, no route).
    pub send_errors: AtomicU64,
    pub batches_received: AtomicU64,
    pub entries_received: AtomicU64,
    pub entries_installed: AtomicU64,
    /// Entries naming a service or real this director does not have.
    pub entries_unknown: AtomicU64,
    /// NAT flows installed without their reply translation (see `Receiver::install_nat`).
    pub nat_skipped: AtomicU64,
    /// Datagrams refused, by `Refusal` (in `Refusal::ALL`'s order).
    pub refused: [AtomicU64; 4],
}

impl SyncStats {
    fn refuse(&self, why: Refusal) {
        let i = Refusal::ALL
            .iter()
            .position(|&r| r == why)
            .expect("every refusal is listed");
        self.refused[i].fetch_add(1, Relaxed);
    }
}

/// A bound sync socket: batches leave from it and arrive on it.
pub fn bind(listen: SocketAddr) -> Result<UdpSocket> {
    let socket = UdpSocket::bind(listen)
        .with_context(|| format!("cannot listen for connection sync on {listen}"))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A peer's address as `socket` can send to it (an IPv4 peer from an IPv6 socket: mapped).
fn reachable(socket: &UdpSocket, peer: SocketAddr) -> SocketAddr {
    match (socket.local_addr(), peer) {
        (Ok(SocketAddr::V6(_)), SocketAddr::V4(v4)) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        _ => peer,
    }
}

/// A flow's connection-table key, from its synced entry.
pub fn conn_key(e: &SyncEntry) -> ConnKey {
    let (src, family) = addr_bytes(e.client);
    ConnKey {
        src,
        dst: addr_bytes(e.service.vip).0,
        sport: e.client_port.to_be(),
        dport: e.dport.to_be(),
        proto: e.service.proto.number(),
        family,
        _pad: [0; 2],
    }
}

/// The entry of a flow whose table entry names backend `id` of `generation` here, if that
/// backend is still that real.
fn entry_of(
    b: &Balancer,
    key: &ConnKey,
    id: u32,
    generation: u32,
    flags: u16,
) -> Option<SyncEntry> {
    let (service, real, real_port) = b.synced_real(id, generation)?;
    Some(SyncEntry {
        client: addr_of(&key.src, key.family)?,
        client_port: u16::from_be(key.sport),
        service,
        dport: u16::from_be(key.dport),
        real,
        real_port,
        flags: flags & !CONN_SNAT_BITS,
        nat: None,
    })
}

/// A synced flow's NAT ends, as the data path keys them.
fn nat_flow(e: &SyncEntry) -> NatFlow {
    let real_port = if e.real_port != 0 {
        e.real_port
    } else {
        e.dport
    };
    NatFlow {
        flow: conn_key(e),
        real: addr_bytes(e.real).0,
        real_port: real_port.to_be(),
    }
}

/// The NAT state of a flow of a NAT service, as this director's data path holds it.
fn nat_state(b: &mut Balancer, e: &SyncEntry) -> Option<NatState> {
    let mode = b.service_mode(&e.service).filter(|m| m.is_nat())?;
    let state = b
        .dataplane()
        .nat_state(&nat_flow(e), mode == Mode::Fullnat)
        .inspect_err(|err| tracing::debug!("reading a NAT flow's state: {err:#}"))
        .ok()??;
    let (mac, snat) = state;
    Some(NatState {
        mac,
        snat: match snat {
            Some(s) => Some((
                addr_of(&s.addr, sync::family_of(e.client))?,
                u16::from_be(s.port),
            )),
            None => None,
        },
    })
}

/// What a director announced and still sends: its own new flows and those it took over (not
/// those it installed for a peer and does not forward, which that peer refreshes).
pub struct Sender {
    socket: UdpSocket,
    peers: Vec<SocketAddr>,
    key: Vec<u8>,
    sequences: Sequencer,
    queue: Vec<SyncEntry>,
    /// Flows announced, with the backend (id, generation) their entry names here.
    announced: HashMap<ConnKey, (SyncEntry, u32, u32)>,
    stats: Arc<SyncStats>,
}

impl Sender {
    pub fn new(socket: UdpSocket, opts: &SyncOptions, stats: Arc<SyncStats>) -> Result<Self> {
        let peers = opts.peers.iter().map(|&p| reachable(&socket, p)).collect();
        Ok(Self {
            socket,
            peers,
            key: opts.key.clone(),
            sequences: Sequencer::default(),
            queue: Vec::new(),
            announced: HashMap::new(),
            stats,
        })
    }

    /// Queues the flows of the data path's events (those whose real is still known).
    pub fn take_events(&mut self, b: &Balancer, events: &[SyncEvent]) {
        for e in events {
            let Some(entry) = entry_of(b, &e.key, e.backend_id, e.generation, e.flags) else {
                continue;
            };
            self.queue.push(entry);
            self.announced
                .insert(e.key, (entry, e.backend_id, e.generation));
        }
    }

    /// Sends the queue to every peer, in as few datagrams as it fits in; NAT flows with the
    /// state their replies need, read now (the data path records it after it announced the
    /// flow, in the NAT program it tail-calls).
    pub fn flush(&mut self, b: &mut Balancer) {
        if self.queue.is_empty() {
            return;
        }
        let mut entries = std::mem::take(&mut self.queue);
        for e in &mut entries {
            e.nat = nat_state(b, e);
        }
        let datagrams = sync::encode(&entries, &self.key, || self.sequences.advance());
        for peer in &self.peers {
            for d in &datagrams {
                match self.socket.send_to(d, peer) {
                    Ok(_) => {
                        self.stats.batches_sent.fetch_add(1, Relaxed);
                    }
                    Err(e) => {
                        self.stats.send_errors.fetch_add(1, Relaxed);
                        tracing::debug!(%peer, "sending a sync batch: {e}");
                    }
                }
            }
            self.stats
                .entries_sent
                .fetch_add(entries.len() as u64, Relaxed);
        }
    }

    /// Queues again the announced flows still in the table that sent a packet within two
    /// refresh periods; forgets those no longer in it (or on another real), or no longer
    /// active.
    pub fn refresh(&mut self, b: &mut Balancer) -> Result<()> {
        let keys: Vec<ConnKey> = self.announced.keys().copied().collect();
        let values = b.dataplane().conns_of(&keys)?;
        let now = now_coarse_s();
        let recent = 2 * REFRESH_EVERY.as_secs() as u32;
        for (key, value) in keys.iter().zip(values) {
            let (entry, id, generation) = self.announced[key];
            let same = value.filter(|v| {
                u32::from(v.backend_id) == id && v.of_generation(generation) && is_active(v, now)
            });
            match same {
                None => {
                    self.announced.remove(key);
                }
                Some(v) if now.saturating_sub(v.last_seen_s) <= recent => {
                    self.queue.push(SyncEntry {
                        // Its full-NAT source is this director's to hold (see `install`).
                        flags: v.flags & !CONN_SNAT_BITS,
                        ..entry
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Flows announced and remembered for refreshes.
    pub fn announced(&self) -> usize {
        self.announced.len()
    }
}

/// Clients whose interface is remembered, at most: the cache is emptied when full.
const ROUTES_CACHED: usize = 65536;

/// The receiving side: which addresses are peers, the key, the sequences seen, and by which
/// interface NAT flows' clients are reached here.
pub struct Receiver {
    peers: Vec<IpAddr>,
    key: Vec<u8>,
    guard: ReplayGuard,
    /// Client address -> the interface its route leaves by (the kernel's FIB, looked up by
    /// the receive loop before a batch is installed).
    routes: HashMap<IpAddr, u32>,
    stats: Arc<SyncStats>,
}

impl Receiver {
    pub fn new(opts: &SyncOptions, stats: Arc<SyncStats>) -> Self {
        Self {
            peers: opts.peers.iter().map(|p| p.ip().to_canonical()).collect(),
            key: opts.key.clone(),
            guard: ReplayGuard::default(),
            routes: HashMap::new(),
            stats,
        }
    }

    /// Takes a datagram from `from`: `check`, then `install`. Returns the entries installed.
    pub fn take(&mut self, b: &mut Balancer, from: IpAddr, datagram: &[u8]) -> Result<usize> {
        match self.check(from, datagram) {
            Some(entries) => self.install(b, &entries),
            None => Ok(0),
        }
    }

    /// The entries of a datagram from `from`, unless it is refused as a whole (and counted):
    /// it must come from a peer, with the key's MAC and a fresh sequence.
    pub fn check(&mut self, from: IpAddr, datagram: &[u8]) -> Option<Vec<SyncEntry>> {
        let from = from.to_canonical();
        let checked = if !self.peers.contains(&from) {
            Err(Refusal::NotPeer)
        } else {
            sync::decode(datagram, &self.key).and_then(|(sequence, entries)| {
                match self.guard.accept(from, sequence, sync::wall_clock_ns()) {
                    true => Ok(entries),
                    false => Err(Refusal::Replay),
                }
            })
        };
        match checked {
            Ok(entries) => {
                self.stats.batches_received.fetch_add(1, Relaxed);
                self.stats
                    .entries_received
                    .fetch_add(entries.len() as u64, Relaxed);
                Some(entries)
            }
            Err(why) => {
                self.stats.refuse(why);
                tracing::debug!(%from, reason = why.name(), "sync batch refused");
                None
            }
        }
    }

    /// The clients of these entries' NAT flows whose interface is not known yet.
    pub fn unrouted(&self, entries: &[SyncEntry]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = entries
            .iter()
            .filter(|e| e.nat.is_some() && !self.routes.contains_key(&e.client))
            .map(|e| e.client)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Remembers that `client` is reached through interface `ifindex`.
    pub fn set_route(&mut self, client: IpAddr, ifindex: u32) {
        if self.routes.len() >= ROUTES_CACHED {
            self.routes.clear();
        }
        self.routes.insert(client, ifindex);
    }

    /// Writes each entry whose service and real this director has into its connection table,
    /// with a NAT flow's reply translation (and full NAT's source) where its service here is
    /// of the same mode. Returns the entries installed.
    pub fn install(&mut self, b: &mut Balancer, entries: &[SyncEntry]) -> Result<usize> {
        let now = now_coarse_s();
        let known: Vec<(&SyncEntry, ConnKey, ConnValue)> = entries
            .iter()
            .filter_map(|e| {
                let (id, generation) = b.synced_backend(&e.service, e.real, e.real_port)?;
                let value = ConnValue {
                    // Below MAX_BACKENDS (2^16).
                    backend_id: id as u16,
                    // Never a full-NAT source in the entry (a peer's, or an older build's
                    // bits): the flow's comes from `FULLNAT_FLOWS`, installed below.
                    flags: (e.flags & !CONN_SNAT_BITS) | CONN_F_SYNCED,
                    generation: generation as u16,
                    snat_port: 0,
                    last_seen_s: now,
                };
                Some((e, conn_key(e), value))
            })
            .collect();
        self.stats
            .entries_unknown
            .fetch_add((entries.len() - known.len()) as u64, Relaxed);
        let flows: Vec<(ConnKey, ConnValue)> = known.iter().map(|(_, k, v)| (*k, *v)).collect();
        b.dataplane().insert_conns(&flows)?;
        self.stats
            .entries_installed
            .fetch_add(flows.len() as u64, Relaxed);
        for (e, _, _) in &known {
            if let Some(nat) = e.nat
                && !self.install_nat(b, e, nat, now)?
            {
                self.stats.nat_skipped.fetch_add(1, Relaxed);
            }
        }
        Ok(flows.len())
    }

    /// A NAT flow's reply translation: false if it cannot be installed here (the service is
    /// not of the same NAT mode, the client's route leaves by an interface xlb is not attached
    /// to, or the reply tuple is another flow's).
    fn install_nat(
        &self,
        b: &mut Balancer,
        e: &SyncEntry,
        nat: NatState,
        now: u32,
    ) -> Result<bool> {
        let fullnat = nat.snat.is_some();
        let same_mode =
            b.service_mode(&e.service) == Some(if fullnat { Mode::Fullnat } else { Mode::Nat });
        let Some(&ifindex) = self.routes.get(&e.client) else {
            return Ok(false);
        };
        let (true, Some(src_mac)) = (same_mode, b.interface_mac(ifindex)) else {
            return Ok(false);
        };
        let snat = nat.snat.map(|(addr, port)| SnatEndpoint {
            addr: addr_bytes(addr).0,
            port: port.to_be(),
            _pad: [0; 2],
        });
        let path = ReplyPath {
            ifindex,
            src_mac,
            mac: nat.mac,
        };
        b.dataplane()
            .install_nat_flow(&nat_flow(e), snat, path, now, e.flags & CONN_F_CLOSING)
    }
}

/// Reads the data path's events as they come (see refusals.rs for the pattern).
pub(super) fn watch_events(
    ring: RingBuf<MapData>,
    shared: Arc<Mutex<Shared>>,
    sender: Arc<Mutex<Sender>>,
) -> Result<tokio::task::JoinHandle<()>> {
    super::on_readable(ring, "the sync event buffer", move |ring| {
        let events = ring_records::<SyncEvent>(ring);
        if events.is_empty() {
            return;
        }
        let s = shared.lock().unwrap();
        sender.lock().unwrap().take_events(&s.balancer, &events);
    })
}

/// Sends the queue every `FLUSH_EVERY` and refreshes every `REFRESH_EVERY`.
pub(super) fn send_loop(
    shared: Arc<Mutex<Shared>>,
    sender: Arc<Mutex<Sender>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        let mut refresh = tokio::time::interval(REFRESH_EVERY);
        loop {
            tokio::select! {
                _ = flush.tick() => {}
                _ = refresh.tick() => {
                    let mut s = shared.lock().unwrap();
                    if let Err(e) = sender.lock().unwrap().refresh(&mut s.balancer) {
                        tracing::warn!("refreshing synced flows: {e:#}");
                    }
                }
            }
            let mut s = shared.lock().unwrap();
            sender.lock().unwrap().flush(&mut s.balancer);
        }
    })
}

/// Takes in the peers' batches as they arrive.
pub(super) fn receive_loop(
    socket: UdpSocket,
    shared: Arc<Mutex<Shared>>,
    mut receiver: Receiver,
) -> Result<tokio::task::JoinHandle<()>> {
    let socket = tokio::net::UdpSocket::from_std(socket)?;
    let routes = Neighbours::new()?;
    Ok(tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let (len, from) = match socket.recv_from(&mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    tracing::warn!("receiving sync batches: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(entries) = receiver.check(from.ip(), &buf[..len]) else {
                continue;
            };
            for client in receiver.unrouted(&entries) {
                match routes.next_hop(client).await {
                    Ok(Some((_, ifindex))) => receiver.set_route(client, ifindex),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(%client, "route lookup: {e:#}"),
                }
            }
            let mut s = shared.lock().unwrap();
            if let Err(e) = receiver.install(&mut s.balancer, &entries) {
                tracing::warn!("installing synced flows: {e:#}");
            }
        }
    }))
}
