//! Connection sync's wire format: batches of flow entries that directors send each other over
//! UDP (`xlb daemon --sync-peer`; the tasks are in daemon/sync.rs).
//!
//! A datagram is a 16-byte header, entries, and an HMAC-SHA256 of everything before it under
//! the peers' shared key:
//!
//! ```text
//! header  "XLBS" | version 2 | 0 | count: u16 | sequence: u64      (big endian)
//! entry   flow family | proto | real family | flags | client port | flow's dest. port
//!         | service port | real's port | client | VIP | real      (4 or 16 bytes each)
//!         [ NAT: neighbour MAC (6) [ full NAT: SNAT port (2) | SNAT address (4 or 16) ] ]
//! trailer HMAC-SHA256(key, header + entries)                       (32 bytes)
//! ```
//!
//! An IPv4 flow to an IPv4 real takes 24 bytes, an IPv6 one 60: a datagram of at most
//! `MAX_DATAGRAM` bytes holds 56 IPv4 entries. A NAT flow adds what its peer needs to
//! translate its replies (`NatState`, flagged in the flags byte): 6 bytes, 12 more for full NAT
//! over IPv4 (36 a flow, 37 a datagram). Backend ids are local to a director, so an entry
//! names its real by service and address (and NAT port), which the receiver maps to its own.
//! The sequence is the sender's wall clock in nanoseconds, strictly increasing: a receiver
//! refuses a batch whose sequence is not above the last it took from that peer, or that is
//! more than `REPLAY_WINDOW` away from its own clock (so a batch recorded long ago cannot be
//! replayed to a receiver that restarted and forgot the sequence).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac as _};
use lb_common::{CONN_F_ACKED, CONN_F_CLOSING, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use sha2::Sha256;

use crate::{
    config::{Proto, ServiceAddr},
    netlink::Mac,
};

/// The sync port when a peer or the listen address names none: IPVS's sync daemon's.
pub const DEFAULT_SYNC_PORT: u16 = 8848;
/// Largest datagram sent: fits a 1500-byte MTU with IPv6 and UDP headers.
pub const MAX_DATAGRAM: usize = 1400;
/// Shortest shared key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// How far a batch's sequence (the sender's clock) may be from the receiver's clock.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(30);

const MAGIC: [u8; 4] = *b"XLBS";
/// 2: NAT state (version 1 had none; a version-1 peer refuses version 2 as malformed).
const VERSION: u8 = 2;
const HEADER_LEN: usize = 16;
const MAC_LEN: usize = 32;
const ENTRY_FIXED_LEN: usize = 12;
/// The connection flags an entry carries (the others are local scheduling state).
const SYNCED_FLAGS: u16 = CONN_F_ACKED | CONN_F_CLOSING;
/// Flags-byte bits (above `SYNCED_FLAGS`): the entry carries NAT state, and an SNAT endpoint.
const WIRE_NAT: u8 = 1 << 7;
const WIRE_SNAT: u8 = 1 << 6;

/// What a peer needs to translate a NAT flow's replies as its director does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatState {
    /// Where replies go: the neighbour the flow's requests come from (the client, or the
    /// router before it; the same for both directors of a VRRP pair, on one segment).
    pub mac: Mac,
    /// Full NAT: the source address and port the flow leaves with towards its real.
    pub snat: Option<(IpAddr, u16)>,
}

/// One flow as directors tell each other about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyncEntry {
    pub client: IpAddr,
    pub client_port: u16,
    /// The service: VIP (the flow's destination), port (0: every port), protocol.
    pub service: ServiceAddr,
    /// The flow's destination port (the service's, unless it serves every port).
    pub dport: u16,
    pub real: IpAddr,
    /// NAT: the real's port (0: the service's), part of the real's identity.
    pub real_port: u16,
    /// `CONN_F_ACKED` and `CONN_F_CLOSING` of the entry.
    pub flags: u16,
    /// NAT and full NAT: the reply translation.
    pub nat: Option<NatState>,
}

/// Why a datagram was refused as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not from a configured peer's address.
    NotPeer,
    /// Too short, another magic or version, or entries that do not add up (after a good MAC).
    Malformed,
    /// Its MAC is not the shared key's.
    BadMac,
    /// Its sequence is not above the last one taken from that peer, or outside the window.
    Replay,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::NotPeer,
        Refusal::Malformed,
        Refusal::BadMac,
        Refusal::Replay,
    ];

    /// The `reason` label of `xlb_sync_refused_total`.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotPeer => "not_peer",
            Refusal::Malformed => "malformed",
            Refusal::BadMac => "bad_mac",
            Refusal::Replay => "replay",
        }
    }
}

/// Reads the shared key: the file's bytes, without trailing whitespace; at least
/// `MIN_KEY_LEN` of them.
pub fn load_key(path: &Path) -> Result<Vec<u8>> {
    let mut key = std::fs::read(path)
        .with_context(|| format!("cannot read the sync key file {}", path.display()))?;
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    if key.len() < MIN_KEY_LEN {
        bail!(
            "the sync key file {} holds {} bytes, fewer than {MIN_KEY_LEN} (make one with \
             `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display(),
            key.len()
        );
    }
    Ok(key)
}

fn mac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// `FAMILY_V4` or `FAMILY_V6`.
pub fn family_of(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

fn push_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn addr_len(family: u8) -> Option<usize> {
    match family {
        FAMILY_V4 => Some(4),
        FAMILY_V6 => Some(16),
        _ => None,
    }
}

/// Bytes `entry` takes in a datagram.
pub fn entry_len(entry: &SyncEntry) -> usize {
    let len = |a: IpAddr| if a.is_ipv4() { 4 } else { 16 };
    let nat = match entry.nat {
        None => 0,
        Some(NatState { snat: None, .. }) => 6,
        Some(NatState {
            snat: Some((addr, _)),
            ..
        }) => 6 + 2 + len(addr),
    };
    ENTRY_FIXED_LEN + 2 * len(entry.service.vip) + len(entry.real) + nat
}

fn encode_entry(out: &mut Vec<u8>, e: &SyncEntry) {
    out.push(family_of(e.service.vip));
    out.push(e.service.proto.number());
    out.push(family_of(e.real));
    let wire_flags = match e.nat {
        None => 0,
        Some(NatState { snat: None, .. }) => WIRE_NAT,
        Some(_) => WIRE_NAT | WIRE_SNAT,
    };
    out.push((e.flags & SYNCED_FLAGS) as u8 | wire_flags);
    for port in [e.client_port, e.dport, e.service.port, e.real_port] {
        out.extend_from_slice(&port.to_be_bytes());
    }
    push_addr(out, e.client);
    push_addr(out, e.service.vip);
    push_addr(out, e.real);
    if let Some(nat) = e.nat {
        out.extend_from_slice(&nat.mac);
        if let Some((addr, port)) = nat.snat {
            out.extend_from_slice(&port.to_be_bytes());
            push_addr(out, addr);
        }
    }
}

/// Packs `entries` into as few datagrams of at most `MAX_DATAGRAM` bytes as they fit in, each
/// sealed with the next of `sequences` and the key's MAC.
pub fn encode(
    entries: &[SyncEntry],
    key: &[u8],
    mut sequences: impl FnMut() -> u64,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let mut room = MAX_DATAGRAM - HEADER_LEN - MAC_LEN;
        let n = rest
            .iter()
            .take_while(|e| {
                let fits = entry_len(e) <= room;
                room = room.saturating_sub(entry_len(e));
                fits
            })
            .count()
            .min(u16::MAX as usize);
        let (batch, later) = rest.split_at(n);
        rest = later;
        let mut d = Vec::with_capacity(MAX_DATAGRAM);
        d.extend_from_slice(&MAGIC);
        d.push(VERSION);
        d.push(0);
        d.extend_from_slice(&(batch.len() as u16).to_be_bytes());
        d.extend_from_slice(&sequences().to_be_bytes());
        for e in batch {
            encode_entry(&mut d, e);
        }
        let tag = {
            let mut m = mac(key);
            m.update(&d);
            m.finalize().into_bytes()
        };
        d.extend_from_slice(&tag);
        out.push(d);
    }
    out
}

/// A datagram's sequence and entries, if its MAC is the key's and it is well formed. Replay is
/// the caller's to check (`ReplayGuard`), with the sequence.
pub fn decode(datagram: &[u8], key: &[u8]) -> Result<(u64, Vec<SyncEntry>), Refusal> {
    if datagram.len() < HEADER_LEN + MAC_LEN || datagram[..4] != MAGIC {
        return Err(Refusal::Malformed);
    }
    let (body, tag) = datagram.split_at(datagram.len() - MAC_LEN);
    let mut m = mac(key);
    m.update(body);
    m.verify_slice(tag).map_err(|_| Refusal::BadMac)?;
    if body[4] != VERSION {
        return Err(Refusal::Malformed);
    }
    let count = u16::from_be_bytes([body[6], body[7]]) as usize;
    let sequence = u64::from_be_bytes(body[8..16].try_into().expect("8 bytes"));
    let mut rest = &body[HEADER_LEN..];
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let (entry, len) = decode_entry(rest).ok_or(Refusal::Malformed)?;
        entries.push(entry);
        rest = &rest[len..];
    }
    if !rest.is_empty() {
        return Err(Refusal::Malformed);
    }
    Ok((sequence, entries))
}

fn decode_entry(b: &[u8]) -> Option<(SyncEntry, usize)> {
    let fixed = b.get(..ENTRY_FIXED_LEN)?;
    let flow_len = addr_len(fixed[0])?;
    let real_len = addr_len(fixed[2])?;
    let proto = match fixed[1] {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let port = |i: usize| u16::from_be_bytes([fixed[4 + 2 * i], fixed[5 + 2 * i]]);
    let mut len = ENTRY_FIXED_LEN + 2 * flow_len + real_len;
    let addrs = b.get(ENTRY_FIXED_LEN..len)?;
    let addr = |bytes: &[u8]| -> IpAddr {
        match bytes.len() {
            4 => Ipv4Addr::from(<[u8; 4]>::try_from(bytes).expect("4 bytes")).into(),
            _ => Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes")).into(),
        }
    };
    let nat = if fixed[3] & WIRE_NAT != 0 {
        let mac: Mac = b.get(len..len + 6)?.try_into().expect("6 bytes");
        len += 6;
        let snat = if fixed[3] & WIRE_SNAT != 0 {
            // Of the flow's family: an SNAT address is the VIP's.
            let end = b.get(len..len + 2 + flow_len)?;
            len += 2 + flow_len;
            Some((addr(&end[2..]), u16::from_be_bytes([end[0], end[1]])))
        } else {
            None
        };
        Some(NatState { mac, snat })
    } else if fixed[3] & WIRE_SNAT != 0 {
        return None;
    } else {
        None
    };
    let entry = SyncEntry {
        client: addr(&addrs[..flow_len]),
        client_port: port(0),
        dport: port(1),
        service: ServiceAddr {
            vip: addr(&addrs[flow_len..2 * flow_len]),
            port: port(2),
            proto,
        },
        real_port: port(3),
        real: addr(&addrs[2 * flow_len..]),
        flags: u16::from(fixed[3]) & SYNCED_FLAGS,
        nat,
    };
    Some((entry, len))
}

/// The last sequence taken from each peer: a batch is taken once, and only while fresh.
#[derive(Default)]
pub struct ReplayGuard {
    last: std::collections::HashMap<IpAddr, u64>,
}

impl ReplayGuard {
    /// Whether a batch from `peer` with `sequence` is new, `now_ns` being the receiver's wall
    /// clock; if so, it is remembered.
    pub fn accept(&mut self, peer: IpAddr, sequence: u64, now_ns: u64) -> bool {
        if sequence.abs_diff(now_ns) > REPLAY_WINDOW.as_nanos() as u64 {
            return false;
        }
        if self.last.get(&peer).is_some_and(|&last| sequence <= last) {
            return false;
        }
        self.last.insert(peer, sequence);
        true
    }
}

/// The wall clock in nanoseconds since the epoch: the sequence of a batch.
pub fn wall_clock_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Sequences for `encode`: the wall clock, made strictly increasing.
#[derive(Default)]
pub struct Sequencer {
    last: u64,
}

impl Sequencer {
    pub fn advance(&mut self) -> u64 {
        self.last = wall_clock_ns().max(self.last + 1);
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn v4(n: u8) -> SyncEntry {
        SyncEntry {
            client: IpAddr::from([198, 18, 10, n]),
            client_port: 40000 + n as u16,
            service: "198.18.0.100:80/tcp".parse().unwrap(),
            dport: 80,
            real: IpAddr::from([198, 18, 12, 11]),
            real_port: 0,
            flags: CONN_F_ACKED,
            nat: None,
        }
    }

    fn v6() -> SyncEntry {
        SyncEntry {
            client: "fd00::10:1".parse().unwrap(),
            client_port: 51000,
            service: "[fd00::100]:0/udp".parse().unwrap(),
            dport: 5353,
            // 4in6 the other way round is allowed too: an IPv6 flow to an IPv6 real here.
            real: "fd00::12:11".parse().unwrap(),
            real_port: 8080,
            flags: CONN_F_CLOSING,
            nat: None,
        }
    }

    /// A full-NAT flow over IPv4 (`snat`) or a NAT one.
    fn nat(n: u8, snat: bool) -> SyncEntry {
        SyncEntry {
            nat: Some(NatState {
                mac: [2, 0, 0xc6, 0x12, 0, n],
                snat: snat.then(|| (IpAddr::from([198, 18, 14, 200]), 1024 + n as u16)),
            }),
            real_port: 8080,
            ..v4(n)
        }
    }

    fn seq() -> impl FnMut() -> u64 {
        let mut s = Sequencer::default();
        move || s.advance()
    }

    #[test]
    fn entries_come_back_as_sent() {
        let mut entries: Vec<_> = (1..=10).map(v4).collect();
        entries.push(v6());
        let mut mixed = v4(200);
        mixed.real = "fd00::12:13".parse().unwrap(); // 4in6
        entries.push(mixed);
        let datagrams = encode(&entries, KEY, seq());
        assert_eq!(datagrams.len(), 1);
        let (_, back) = decode(&datagrams[0], KEY).unwrap();
        assert_eq!(back, entries);
        assert_eq!(datagrams[0].len(), HEADER_LEN + 10 * 24 + 60 + 36 + MAC_LEN);
    }

    #[test]
    fn batches_split_at_the_datagram_size_and_amortise_under_64_bytes() {
        let entries: Vec<_> = (0..1000).map(|i| v4((i % 250) as u8)).collect();
        let datagrams = encode(&entries, KEY, seq());
        assert!(datagrams.iter().all(|d| d.len() <= MAX_DATAGRAM));
        // 56 IPv4 entries a datagram.
        assert_eq!(datagrams.len(), 1000usize.div_ceil(56));
        let mut back = Vec::new();
        let mut last = 0;
        for d in &datagrams {
            let (s, e) = decode(d, KEY).unwrap();
            assert!(s > last, "sequences increase");
            last = s;
            back.extend(e);
        }
        assert_eq!(back, entries);
        // With IPv4 and UDP headers (28 bytes) per datagram.
        let wire: usize = datagrams.iter().map(|d| d.len() + 28).sum();
        assert!(wire / entries.len() <= 64, "{} bytes a flow", wire / 1000);
        assert!(encode(&[], KEY, seq()).is_empty());
    }

    #[test]
    fn nat_state_comes_back_as_sent_within_the_budget() {
        let mut entries: Vec<_> = (0..100).map(|i| nat(i, i % 2 == 0)).collect();
        let mut v6_fullnat = v6();
        v6_fullnat.nat = Some(NatState {
            mac: [2, 0, 0, 0, 0, 1],
            snat: Some(("fd00::14:200".parse().unwrap(), 65535)),
        });
        entries.push(v6_fullnat);
        entries.push(v4(7));
        let datagrams = encode(&entries, KEY, seq());
        let back: Vec<SyncEntry> = datagrams
            .iter()
            .flat_map(|d| decode(d, KEY).unwrap().1)
            .collect();
        assert_eq!(back, entries);
        assert_eq!(entry_len(&nat(1, false)), 30);
        assert_eq!(entry_len(&nat(1, true)), 36);
        assert_eq!(entry_len(&v6_fullnat), 60 + 6 + 18);
        // Full NAT over IPv4 only, with IPv4 and UDP headers: within 64 bytes a flow.
        let fullnat: Vec<_> = (0..1000).map(|i| nat((i % 250) as u8, true)).collect();
        let datagrams = encode(&fullnat, KEY, seq());
        assert_eq!(datagrams.len(), 1000usize.div_ceil(37));
        let wire: usize = datagrams.iter().map(|d| d.len() + 28).sum();
        assert!(wire / fullnat.len() <= 64, "{} bytes a flow", wire / 1000);
    }

    #[test]
    fn an_snat_endpoint_without_nat_state_or_cut_short_is_malformed() {
        let mut d = encode(&[nat(1, true)], KEY, seq()).remove(0);
        d.truncate(d.len() - MAC_LEN);
        let reseal = |mut d: Vec<u8>| {
            let mut m = mac(KEY);
            m.update(&d);
            let tag = m.finalize().into_bytes();
            d.extend_from_slice(&tag);
            d
        };
        let mut no_nat = d.clone();
        no_nat[HEADER_LEN + 3] &= !WIRE_NAT;
        assert_eq!(decode(&reseal(no_nat), KEY), Err(Refusal::Malformed));
        let mut short = d.clone();
        short.pop();
        assert_eq!(decode(&reseal(short), KEY), Err(Refusal::Malformed));
        assert!(decode(&reseal(d), KEY).is_ok());
    }

    #[test]
    fn a_wrong_key_or_any_changed_byte_fails_the_mac() {
        let d = encode(&[v4(1), v6()], KEY, seq()).remove(0);
        assert_eq!(
            decode(&d, b"another key of 16+ bytes"),
            Err(Refusal::BadMac)
        );
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x01;
            let got = decode(&bad, KEY);
            assert!(
                got == Err(Refusal::BadMac) || (i < 4 && got == Err(Refusal::Malformed)),
                "byte {i}: {got:?}"
            );
        }
        // Truncated: too short for a MAC, or the MAC no longer matches.
        for len in 0..d.len() {
            assert!(decode(&d[..len], KEY).is_err(), "{len} bytes accepted");
        }
    }

    #[test]
    fn a_well_signed_but_inconsistent_batch_is_malformed() {
        let mut d = encode(&[v4(1)], KEY, seq()).remove(0);
        d.truncate(d.len() - MAC_LEN);
        d[7] = 2; // claims two entries, holds one
        let mut m = mac(KEY);
        m.update(&d);
        let tag = m.finalize().into_bytes();
        d.extend_from_slice(&tag);
        assert_eq!(decode(&d, KEY), Err(Refusal::Malformed));
    }

    #[test]
    fn a_replayed_or_stale_batch_is_refused() {
        let mut guard = ReplayGuard::default();
        let peer: IpAddr = [198, 18, 11, 2].into();
        let other: IpAddr = [198, 18, 11, 3].into();
        let now = wall_clock_ns();
        assert!(guard.accept(peer, now, now));
        assert!(!guard.accept(peer, now, now), "the same batch twice");
        assert!(!guard.accept(peer, now - 1, now), "an older batch");
        assert!(guard.accept(peer, now + 1, now));
        assert!(guard.accept(other, now, now), "sequences are per peer");
        let window = REPLAY_WINDOW.as_nanos() as u64;
        let mut fresh = ReplayGuard::default();
        assert!(
            !fresh.accept(peer, now - window - 1, now),
            "recorded long ago"
        );
        assert!(
            !fresh.accept(peer, now + window + 1, now),
            "from the future"
        );
    }

    #[test]
    fn short_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("xlb-sync-key-{}", std::process::id()));
        std::fs::write(&dir, "short\n").unwrap();
        let e = load_key(&dir).unwrap_err().to_string();
        assert!(e.contains("fewer than 16"), "{e}");
        std::fs::write(&dir, "0123456789abcdef0123\n").unwrap();
        assert_eq!(load_key(&dir).unwrap(), b"0123456789abcdef0123");
        std::fs::remove_file(&dir).unwrap();
        assert!(load_key(&dir).is_err());
    }
}
