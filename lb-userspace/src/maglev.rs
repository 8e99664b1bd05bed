//! Maglev consistent-hashing lookup table (Eisenbud et al., NSDI 2016).
//!
//! The table for one virtual service is built here, in userspace; the XDP
//! program only does `table[flow_hash % size]`. Several directors may serve
//! the same VIP behind ECMP, so a flow must land on the same real no matter
//! which director receives it. Hence the table is a pure function of the reals'
//! addresses and weights: it never depends on input order, on the `id` labels,
//! on the process or machine, or on Rust's randomized `HashMap` hashers.
//!
//! # Cross-director contract (do not change without versioning)
//!
//! * **Key**: an address is hashed as a family tag byte followed by its
//!   network-order bytes: `[4, a, b, c, d]` for IPv4 (5 bytes),
//!   `[6, b0, .., b15]` for IPv6 (17 bytes). The tag keeps `1.2.3.4` and
//!   `::ffff:1.2.3.4` (or `::1.2.3.4`) apart; no mapping between families is
//!   done here.
//! * **Hash**: reference MurmurHash3_x64_128 (Austin Appleby, SMHasher),
//!   taking the first 64-bit output word (`h1`; the same value as Python's
//!   `mmh3.hash64(key, seed, signed=False)[0]`). It is run twice with fixed
//!   seeds: `OFFSET_SEED` (0x6D61676C) for the offset, `SKIP_SEED`
//!   (0x65763031) for the skip.
//!   `offset = h1(OFFSET_SEED) % size`,
//!   `skip = h1(SKIP_SEED) % (size - 1) + 1`, and the member's preference list
//!   is `(offset + j * skip) % size` for `j = 0, 1, ..`.
//! * **Order**: members with weight 0 are dropped; the rest are sorted by key
//!   (so all IPv4 before all IPv6, each in numeric order).
//! * **Weights**: population runs in passes `p = 0, 1, ..`. With `W` the
//!   largest weight, member `i` takes a turn in pass `p` iff
//!   `floor((p + 1) * w_i / W) > floor(p * w_i / W)`; within a pass turns go in
//!   sorted order. Equivalently, its `k`-th turn (from 0) is in pass
//!   `((k + 1) * W - 1) / w_i`. A turn claims the member's next preferred
//!   slot that is still free. Population stops as soon as every slot is
//!   taken. With equal weights this is exactly the original Maglev algorithm.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;

/// Slot value meaning "no real" (no reals, or all weights 0).
pub const EMPTY: u32 = u32::MAX;
/// Default table size (a prime, as in Katran).
pub const DEFAULT_SIZE: u32 = 65537;
/// Largest accepted table size.
pub const MAX_SIZE: u32 = 1_048_573; // a prime below 2^20

/// MurmurHash3 seed for the offset hash (ASCII "magl"). Part of the contract.
const OFFSET_SEED: u32 = 0x6D61_676C;
/// MurmurHash3 seed for the skip hash (ASCII "ev01"). Part of the contract.
const SKIP_SEED: u32 = 0x6576_3031;

/// Family tag prepended to IPv4 address bytes before hashing.
const FAMILY_V4: u8 = 4;
/// Family tag prepended to IPv6 address bytes before hashing.
const FAMILY_V6: u8 = 6;

/// One real server of a virtual service, as seen by the table builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Address of the real; the only input to its position in the table.
    pub addr: IpAddr,
    /// Relative share of slots; 0 means "gets no slot".
    pub weight: u32,
    /// Opaque label copied into the slots this member wins.
    pub id: u32,
}

/// Returns `size` slots, each holding the `id` of a member (or [`EMPTY`]
/// when no member has weight > 0).
///
/// Members with weight 0 get no slot. `size` must be prime (the caller
/// validates with [`is_prime`]) for the result to follow the Maglev contract
/// described in the module docs. Other sizes do not panic: the skip is then
/// bumped to the next value coprime with `size` so every preference list is
/// still a full permutation, but such tables are outside the contract and
/// may balance worse. The table is allocated with `size` entries, so callers
/// should also enforce `size <= MAX_SIZE`. An `id` equal to [`EMPTY`] is
/// accepted but indistinguishable from "no real" in the result.
pub fn build_table(members: &[Member], size: u32) -> Vec<u32> {
    let slots = size as usize;
    let mut table = vec![EMPTY; slots];
    if slots == 0 {
        return table;
    }

    // Slots temporarily hold a member's sorted index, so there can be at
    // most `EMPTY` members; far beyond anything a service has, but keep the
    // index space sound anyway.
    let members = &members[..members.len().min(EMPTY as usize)];
    let mut reals: Vec<Real> = members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| Real::new(m, size))
        .collect();
    if reals.is_empty() {
        return table;
    }
    // Addresses are unique per call; weight and id only break ties for
    // malformed input so the result still never depends on input order.
    reals.sort_unstable_by(|a, b| {
        a.key()
            .cmp(b.key())
            .then(a.weight.cmp(&b.weight))
            .then(a.id.cmp(&b.id))
    });
    if reals.iter().all(|r| r.weight == reals[0].weight) {
        populate_round_robin(&mut table, &mut reals, size);
    } else {
        populate_by_passes(&mut table, &mut reals, size);
    }

    // Slots were claimed with sorted indices so that a member whose id
    // happens to equal EMPTY cannot make its slots look free; swap in ids.
    for entry in &mut table {
        if let Some(real) = reals.get(*entry as usize) {
            *entry = real.id;
        }
    }
    table
}

/// Takes turns until every slot is claimed, in the order the weights set (module docs).
fn populate_by_passes(table: &mut [u32], reals: &mut [Real], size: u32) {
    let w_max = reals.iter().map(|r| r.weight).max().unwrap_or(1);
    // Each real sits in the heap keyed by (pass of its next turn, sorted
    // index): popping the minimum replays the pass-by-pass round robin
    // without visiting members that have no turn in a pass, so skewed
    // weights cost O(size * log n), not O(passes * n).
    let mut turns: BinaryHeap<Reverse<(u64, usize)>> = reals
        .iter()
        .enumerate()
        .map(|(i, r)| Reverse((turn_pass(0, r.weight, w_max), i)))
        .collect();
    let mut filled = 0usize;
    while filled < table.len() {
        let Some(Reverse((_, i))) = turns.pop() else {
            break;
        };
        let Some(real) = reals.get_mut(i) else {
            break;
        };
        if !claim(table, real, i as u32, size) {
            break;
        }
        filled += 1;
        real.turns += 1;
        turns.push(Reverse((turn_pass(real.turns, real.weight, w_max), i)));
    }
}

/// Equal weights: every member has a turn in every pass, so the order of turns is plain round
/// robin in sorted order. The same table as [`populate_by_passes`] without the heap, which
/// costs about as much as the probing (the usual case: every real at the default weight).
fn populate_round_robin(table: &mut [u32], reals: &mut [Real], size: u32) {
    let mut filled = 0usize;
    while filled < table.len() {
        for (i, real) in reals.iter_mut().enumerate() {
            if filled == table.len() {
                return;
            }
            if !claim(table, real, i as u32, size) {
                return;
            }
            filled += 1;
        }
    }
}

/// One turn: member `i` claims its next preferred slot that is still free. The preference
/// list is a full permutation of the slots, so while one is free this finds it within
/// `size` probes; the bound only guards against an impossible infinite loop.
fn claim(table: &mut [u32], real: &mut Real, i: u32, size: u32) -> bool {
    let size = u64::from(size);
    for _ in 0..table.len() {
        let slot = real.next as usize;
        real.next += real.skip;
        if real.next >= size {
            real.next -= size;
        }
        if let Some(entry) = table.get_mut(slot)
            && *entry == EMPTY
        {
            *entry = i;
            return true;
        }
    }
    false
}

/// Deterministic primality test by trial division (6k ± 1); at most ~22k
/// divisions for any `u32`, which is negligible next to building a table.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n < 4 {
        return true;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// Per-member population state.
struct Real {
    /// Family tag + address bytes; hash input and sort key.
    key: [u8; 17],
    /// Number of meaningful bytes in `key` (5 or 17).
    key_len: usize,
    weight: u64,
    id: u32,
    /// Next slot of this member's preference list to try.
    next: u64,
    /// Step between consecutive preferences; coprime with the table size.
    skip: u64,
    /// Turns taken so far.
    turns: u64,
}

impl Real {
    fn new(member: &Member, size: u32) -> Self {
        let mut key = [0u8; 17];
        let key_len = match member.addr {
            IpAddr::V4(a) => {
                key[0] = FAMILY_V4;
                key[1..5].copy_from_slice(&a.octets());
                5
            }
            IpAddr::V6(a) => {
                key[0] = FAMILY_V6;
                key[1..17].copy_from_slice(&a.octets());
                17
            }
        };
        let (offset, skip) = offset_skip(&key[..key_len], size);
        Real {
            key,
            key_len,
            weight: u64::from(member.weight),
            id: member.id,
            next: offset,
            skip,
            turns: 0,
        }
    }

    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// Maglev offset and skip for a hash key (see the module docs).
fn offset_skip(key: &[u8], size: u32) -> (u64, u64) {
    let size = u64::from(size);
    if size <= 1 {
        return (0, 1);
    }
    let offset = murmur3_x64_128(key, OFFSET_SEED).0 % size;
    let mut skip = murmur3_x64_128(key, SKIP_SEED).0 % (size - 1) + 1;
    // No-op for prime sizes (every skip in 1..size is coprime). For other
    // sizes, walk 1..size cyclically; 1 is always coprime, so this ends.
    while gcd(skip, size) != 1 {
        skip = skip % (size - 1) + 1;
    }
    (offset, skip)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Pass in which a member of weight `w` takes its `k`-th turn (from 0):
/// the smallest `p` with `floor((p + 1) * w / w_max) >= k + 1`, i.e.
/// `ceil((k + 1) * w_max / w) - 1`. `w` is in `1..=w_max`.
fn turn_pass(k: u64, w: u64, w_max: u64) -> u64 {
    (k + 1).saturating_mul(w_max).saturating_sub(1) / w.max(1)
}

/// Reference MurmurHash3_x64_128 (Austin Appleby, public domain), returning
/// `(h1, h2)`; as a byte string the C version writes `h1` then `h2`,
/// little-endian. Verified against SMHasher's verification value below.
fn murmur3_x64_128(data: &[u8], seed: u32) -> (u64, u64) {
    const C1: u64 = 0x87c3_7b91_1142_53d5;
    const C2: u64 = 0x4cf5_ad43_2745_937f;

    fn mix_k1(k1: u64) -> u64 {
        k1.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2)
    }
    fn mix_k2(k2: u64) -> u64 {
        k2.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1)
    }

    let mut h1 = u64::from(seed);
    let mut h2 = u64::from(seed);

    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        let (lo, hi) = block.split_at(8);
        h1 ^= mix_k1(read_le(lo));
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix_k2(read_le(hi));
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }

    let tail = blocks.remainder();
    if tail.len() > 8 {
        h2 ^= mix_k2(read_le(&tail[8..]));
    }
    if !tail.is_empty() {
        h1 ^= mix_k1(read_le(&tail[..tail.len().min(8)]));
    }

    let len = data.len() as u64;
    h1 ^= len;
    h2 ^= len;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (h1, h2)
}

/// Little-endian value of up to 8 bytes (missing high bytes are zero).
fn read_le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// MurmurHash3 64-bit finalizer.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    const M: u32 = DEFAULT_SIZE;

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn v6(i: u32) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16))
    }

    fn equal(n: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                addr: v4(i + 1),
                weight: 100,
                id: i,
            })
            .collect()
    }

    /// Slot count per id, indexed by id (ids are 0..n in these tests).
    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &v in table {
            assert_ne!(v, EMPTY, "table has an empty slot");
            c[v as usize] += 1;
        }
        c
    }

    fn max_min(c: &[usize]) -> f64 {
        let max = *c.iter().max().unwrap() as f64;
        let min = *c.iter().min().unwrap() as f64;
        max / min
    }

    fn changed(a: &[u32], b: &[u32]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    /// Small deterministic xorshift so tests need no external crate.
    fn shuffle<T>(v: &mut [T], mut seed: u64) {
        for i in (1..v.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.swap(i, (seed % (i as u64 + 1)) as usize);
        }
    }

    #[test]
    fn murmur3_matches_smhasher_verification() {
        // SMHasher VerificationTest: hash {}, {0}, {0,1}, .. {0..254} with
        // seed 256 - len, hash the 256 concatenated outputs with seed 0; the
        // first 4 bytes (LE) must be 0x6384BA69 for MurmurHash3_x64_128.
        let mut key = [0u8; 256];
        let mut hashes = Vec::with_capacity(256 * 16);
        for i in 0..256usize {
            key[i] = i as u8;
            let (h1, h2) = murmur3_x64_128(&key[..i], 256 - i as u32);
            hashes.extend_from_slice(&h1.to_le_bytes());
            hashes.extend_from_slice(&h2.to_le_bytes());
        }
        let (h1, _) = murmur3_x64_128(&hashes, 0);
        assert_eq!(h1 as u32, 0x6384_BA69);
        assert_eq!(murmur3_x64_128(&[], 0), (0, 0));
    }

    #[test]
    fn equal_weights_balanced() {
        for n in [1u32, 2, 3, 7, 10, 50, 100] {
            let table = build_table(&equal(n), M);
            assert_eq!(table.len(), M as usize);
            let c = counts(&table, n as usize);
            let r = max_min(&c);
            println!(
                "equal n={n}: max/min = {r:.5} (counts {:?}..)",
                &c[..c.len().min(4)]
            );
            assert!(r <= 1.01, "n={n} max/min {r}");
        }
    }

    #[test]
    fn unequal_weights_honoured() {
        for weights in [
            &[100u32, 200, 300, 400][..],
            &[1, 10, 100],
            &[3, 5, 7, 65535],
        ] {
            let members: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Member {
                    addr: v4(i as u32 * 7 + 3),
                    weight: w,
                    id: i as u32,
                })
                .collect();
            let c = counts(&build_table(&members, M), weights.len());
            let sum: u32 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let ideal = f64::from(w) / f64::from(sum);
                let share = c[i] as f64 / f64::from(M);
                let err = (share - ideal).abs() / ideal;
                println!("weight {w}: {} slots, rel err {err:.5}", c[i]);
                // Members below ~100 ideal slots cannot be within 1%
                // by rounding alone; check them to within one slot.
                if ideal * f64::from(M) >= 100.0 {
                    assert!(err <= 0.01, "weights {weights:?} member {i}: {err}");
                } else {
                    assert!((c[i] as f64 - ideal * f64::from(M)).abs() <= 1.0);
                }
            }
        }
    }

    fn worst_removal(n: u32) -> f64 {
        let all = equal(n);
        let full = build_table(&all, M);
        let ideal = f64::from(M) / f64::from(n);
        let mut worst = 0f64;
        for skip in 0..n as usize {
            let mut rest = all.clone();
            rest.remove(skip);
            let ratio = changed(&full, &build_table(&rest, M)) as f64 / ideal;
            worst = worst.max(ratio);
        }
        worst
    }

    #[test]
    fn removal_disruption_small() {
        let w10 = worst_removal(10);
        let w100 = worst_removal(100);
        println!("removal: worst changed/ideal n=10 {w10:.4}, n=100 {w100:.4}");
        assert!(w10 <= 1.05, "n=10: {w10}");
        assert!(w100 <= 1.7, "n=100: {w100}");
    }

    #[test]
    fn order_and_ids_do_not_matter() {
        let base: Vec<Member> = (0..40u32)
            .map(|i| Member {
                addr: if i % 3 == 0 { v6(i) } else { v4(i * 13) },
                weight: 10 + (i % 5) * 10,
                id: i,
            })
            .collect();
        let by_addr = |members: &[Member], table: &[u32]| -> Vec<IpAddr> {
            let map: HashMap<u32, IpAddr> = members.iter().map(|m| (m.id, m.addr)).collect();
            table.iter().map(|id| map[id]).collect()
        };
        let reference = by_addr(&base, &build_table(&base, M));
        for seed in 1..8u64 {
            let mut perm = base.clone();
            shuffle(&mut perm, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // Relabel ids as well (consistently mapped to addresses).
            for (j, m) in perm.iter_mut().enumerate() {
                m.id = 1000 + j as u32 * 3;
            }
            assert_eq!(by_addr(&perm, &build_table(&perm, M)), reference);
        }
        let mut rev = base.clone();
        rev.reverse();
        assert_eq!(by_addr(&rev, &build_table(&rev, M)), reference);
    }

    #[test]
    fn zero_weights_and_empty() {
        assert!(build_table(&[], M).iter().all(|&v| v == EMPTY));
        assert_eq!(build_table(&[], 7).len(), 7);
        let mut members = equal(5);
        for m in &mut members {
            m.weight = 0;
        }
        assert!(build_table(&members, M).iter().all(|&v| v == EMPTY));
        members[1].weight = 1;
        members[3].weight = 1;
        let table = build_table(&members, M);
        assert!(table.iter().all(|&v| v == 1 || v == 3));
        let c = counts(&table, 5);
        assert_eq!((c[0], c[2], c[4]), (0, 0, 0));
    }

    #[test]
    fn one_member_and_tiny_sizes() {
        let one = [Member {
            addr: v4(9),
            weight: 7,
            id: 42,
        }];
        assert!(build_table(&one, M).iter().all(|&v| v == 42));
        for size in [2u32, 3] {
            let t = build_table(&equal(3), size);
            assert_eq!(t.len(), size as usize);
            assert!(t.iter().all(|&v| v < 3));
            assert!(build_table(&one, size).iter().all(|&v| v == 42));
        }
        // Out-of-contract sizes must not panic and must fill every slot.
        for size in [0u32, 1, 4, 12, 65536] {
            let t = build_table(&equal(5), size);
            assert_eq!(t.len(), size as usize);
            assert!(t.iter().all(|&v| v < 5));
        }
    }

    #[test]
    fn id_equal_to_empty_does_not_corrupt() {
        let mut members = equal(4);
        members[2].id = EMPTY;
        let mut expected = build_table(&equal(4), M);
        for v in &mut expected {
            if *v == 2 {
                *v = EMPTY;
            }
        }
        assert_eq!(build_table(&members, M), expected);
    }

    #[test]
    fn mixed_families() {
        let members: Vec<Member> = (0..10u32)
            .map(|i| Member {
                addr: if i % 2 == 0 { v4(i) } else { v6(i) },
                weight: 5,
                id: i,
            })
            .collect();
        let c = counts(&build_table(&members, M), 10);
        let r = max_min(&c);
        println!("mixed v4/v6: max/min = {r:.5}");
        assert!(r <= 1.01);

        // The family tag separates an IPv4 address from its mapped forms.
        let a = Ipv4Addr::new(1, 2, 3, 4);
        let keys = [
            Real::new(
                &Member {
                    addr: IpAddr::V4(a),
                    weight: 1,
                    id: 0,
                },
                M,
            ),
            Real::new(
                &Member {
                    addr: IpAddr::V6(a.to_ipv6_mapped()),
                    weight: 1,
                    id: 0,
                },
                M,
            ),
            Real::new(
                &Member {
                    addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0x0102, 0x0304)),
                    weight: 1,
                    id: 0,
                },
                M,
            ),
        ];
        for (i, x) in keys.iter().enumerate() {
            for y in &keys[i + 1..] {
                assert_ne!((x.next, x.skip), (y.next, y.skip));
            }
        }
    }

    /// Pins the cross-director contract: these values were cross-checked
    /// against an independent implementation (Python `mmh3.hash64`, whose
    /// first word is MurmurHash3_x64_128's `h1`, plus a literal transcription
    /// of the pass-by-pass population loop). If this fails, the table format
    /// changed and all directors must be upgraded together.
    #[test]
    fn golden_table() {
        let key = [FAMILY_V4, 198, 18, 0, 11];
        assert_eq!(murmur3_x64_128(&key, OFFSET_SEED).0, 0x15c7_baf1_d47d_f25a);
        assert_eq!(murmur3_x64_128(&key, SKIP_SEED).0, 0xcd05_6611_dbdd_ca33);
        let mut key6 = [FAMILY_V6; 17];
        for (b, i) in key6[1..].iter_mut().zip(0u8..) {
            *b = i;
        }
        assert_eq!(
            murmur3_x64_128(&key6, OFFSET_SEED),
            (0x54ef_8300_707e_8f1c, 0xf92c_8be8_3f07_fdf3)
        );

        let mut members: Vec<Member> = [11u8, 12, 13]
            .iter()
            .zip(0u32..)
            .map(|(&last, id)| Member {
                addr: IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)),
                weight: 100,
                id,
            })
            .collect();
        assert_eq!(build_table(&members, 7), [2, 0, 0, 0, 2, 1, 1]);
        assert_eq!(
            build_table(&members, 13),
            [1, 0, 0, 0, 1, 2, 0, 1, 2, 2, 1, 2, 0]
        );
        for (m, w) in members.iter_mut().zip([1, 2, 3]) {
            m.weight = w;
        }
        assert_eq!(
            build_table(&members, 13),
            [1, 1, 0, 0, 1, 2, 2, 1, 2, 2, 2, 2, 2]
        );
    }

    /// Equal weights take the round-robin path; it must claim exactly what the pass-by-pass
    /// heap claims.
    #[test]
    fn round_robin_matches_passes() {
        for (n, size) in [
            (1u32, 13u32),
            (3, 7),
            (10, M),
            (100, M),
            (1000, M),
            (7, 1_048_573),
        ] {
            let members = equal(n);
            let reals = || -> Vec<Real> { members.iter().map(|m| Real::new(m, size)).collect() };
            let (mut by_passes, mut round_robin) = (reals(), reals());
            let mut a = vec![EMPTY; size as usize];
            let mut b = vec![EMPTY; size as usize];
            populate_by_passes(&mut a, &mut by_passes, size);
            populate_round_robin(&mut b, &mut round_robin, size);
            assert!(a == b, "{n} members, size {size}: the tables differ");
            assert!(!a.contains(&EMPTY));
        }
    }

    #[test]
    fn primes() {
        for n in [2u32, 3, 5, 7, 13, 65537, 1_048_573, 4_294_967_291] {
            assert!(is_prime(n), "{n}");
        }
        for n in [0u32, 1, 4, 9, 25, 65536, 1_048_575, u32::MAX] {
            assert!(!is_prime(n), "{n}");
        }
        assert!(is_prime(DEFAULT_SIZE) && is_prime(MAX_SIZE));
    }

    #[test]
    fn timing() {
        for n in [10u32, 100, 1000] {
            let members = equal(n);
            let start = Instant::now();
            let t = build_table(&members, M);
            println!("build n={n} size={M}: {:?}", start.elapsed());
            assert_eq!(t.len(), M as usize);
        }
        // Heavily skewed weights must not degrade to passes * n.
        let mut skewed = equal(1000);
        skewed[0].weight = 65535;
        for m in &mut skewed[1..] {
            m.weight = 1;
        }
        let start = Instant::now();
        let t = build_table(&skewed, M);
        println!("build skewed n=1000 size={M}: {:?}", start.elapsed());
        assert_eq!(t.len(), M as usize);
        let start = Instant::now();
        let t = build_table(&equal(1000), MAX_SIZE);
        println!("build n=1000 size={MAX_SIZE}: {:?}", start.elapsed());
        assert_eq!(t.len(), MAX_SIZE as usize);
    }
}
