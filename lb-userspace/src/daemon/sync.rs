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
//!   the entry into its connection table. Anything refused changes nothing and is counted.

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
use lb_common::{ConnKey, ConnValue, SyncEvent};

use super::Shared;
use crate::{
    control::{Balancer, addr_bytes, addr_of, is_active, now_coarse_s},
    dataplane::ring_records,
    sync::{self, Refusal, ReplayGuard, Sequencer, SyncEntry},
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
        flags,
    })
}

/// What a director announced and still sends: its own new flows (not those it installed for a
/// peer, which that peer refreshes).
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

    /// Sends the queue to every peer, in as few datagrams as it fits in.
    pub fn flush(&mut self) {
        if self.queue.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.queue);
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
                u32::from(v.backend_id) == id && v.generation == generation && is_active(v, now)
            });
            match same {
                None => {
                    self.announced.remove(key);
                }
                Some(v) if now.saturating_sub(v.last_seen_s) <= recent => {
                    self.queue.push(SyncEntry {
                        flags: v.flags,
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

/// The receiving side: which addresses are peers, the key, the sequences seen.
pub struct Receiver {
    peers: Vec<IpAddr>,
    key: Vec<u8>,
    guard: ReplayGuard,
    stats: Arc<SyncStats>,
}

impl Receiver {
    pub fn new(opts: &SyncOptions, stats: Arc<SyncStats>) -> Self {
        Self {
            peers: opts.peers.iter().map(|p| p.ip().to_canonical()).collect(),
            key: opts.key.clone(),
            guard: ReplayGuard::default(),
            stats,
        }
    }

    /// Takes a datagram from `from`: refused as a whole (and counted) unless a peer sent it
    /// with the key's MAC and a fresh sequence; then each entry whose service and real this
    /// director has is written into its connection table. Returns the entries installed.
    pub fn take(&mut self, b: &mut Balancer, from: IpAddr, datagram: &[u8]) -> Result<usize> {
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
        let entries = match checked {
            Ok(entries) => entries,
            Err(why) => {
                self.stats.refuse(why);
                tracing::debug!(%from, reason = why.name(), "sync batch refused");
                return Ok(0);
            }
        };
        self.stats.batches_received.fetch_add(1, Relaxed);
        self.stats
            .entries_received
            .fetch_add(entries.len() as u64, Relaxed);
        let now = now_coarse_s();
        let flows: Vec<(ConnKey, ConnValue)> = entries
            .iter()
            .filter_map(|e| {
                let (id, generation) = b.synced_backend(&e.service, e.real, e.real_port)?;
                Some((
                    conn_key(e),
                    ConnValue {
                        // Below MAX_BACKENDS (2^16).
                        backend_id: id as u16,
                        flags: e.flags,
                        generation,
                        last_seen_s: now,
                    },
                ))
            })
            .collect();
        self.stats
            .entries_unknown
            .fetch_add((entries.len() - flows.len()) as u64, Relaxed);
        b.dataplane().insert_conns(&flows)?;
        self.stats
            .entries_installed
            .fetch_add(flows.len() as u64, Relaxed);
        Ok(flows.len())
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
            sender.lock().unwrap().flush();
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
            let mut s = shared.lock().unwrap();
            if let Err(e) = receiver.take(&mut s.balancer, from.ip(), &buf[..len]) {
                tracing::warn!("installing synced flows: {e:#}");
            }
        }
    }))
}
