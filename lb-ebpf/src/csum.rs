//! Internet checksum (RFC 1071) pieces for the headers the data path writes.
//!
//! Sums are taken over 16-bit words as they lie in memory (native order): one's complement
//! addition commutes with byte swapping, so a checksum summed and stored in native order is
//! right on the wire, and it mixes with `bpf_csum_diff`, which sums packet memory the same way
//! (`diff` computes what that helper returns for a few words, without the call).

use aya_ebpf::helpers::bpf_csum_diff;

/// `sum` plus the 16-bit words of `bytes` (N even).
#[inline(always)]
pub fn add<const N: usize>(sum: u64, bytes: &[u8; N]) -> u64 {
    let mut s = sum;
    let mut i = 0;
    while i + 1 < N {
        s += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    s
}

/// `sum` plus the 16-bit words of `bytes[from..to]` (`from` and `to` even).
#[inline(always)]
pub fn add_words<const N: usize>(sum: u64, bytes: &[u8; N], from: usize, to: usize) -> u64 {
    let mut s = sum;
    let mut i = from;
    while i + 1 < to && i + 1 < N {
        s += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    s
}

/// Folds a sum to 16 bits and complements it: the value to store in a checksum field.
/// Four folds bring any sum of up to 2^32 words below 2^16, without a loop.
#[inline(always)]
pub fn finish(sum: u64) -> [u8; 2] {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    (!(s as u16)).to_ne_bytes()
}

/// The partial sum of `N` bytes of packet memory (N a multiple of 4, at most 512: the
/// helper's limit), or None if the helper refuses.
#[inline(always)]
pub fn packet<const N: usize>(bytes: *mut [u8; N]) -> Option<u64> {
    // SAFETY: the caller bounds-checked the N bytes; the helper only reads them.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, bytes as *mut u32, N as u32, 0) };
    if sum < 0 {
        return None;
    }
    Some(sum as u32 as u64)
}

/// How a sum changes when the `N` bytes at `old` become `new` (N a multiple of 4, both at even
/// offsets of what the checksum covers): the sum of the old words complemented and the new
/// words, as `bpf_csum_diff` returns it, modulo 0xffff. An IPv4 address's is computed here:
/// the helper call costs more than its sum. Read a byte at a time (the packet's words may be
/// unaligned, which the BPF target reads bytewise anyway): a word is its even byte plus its
/// odd byte times 256 (native order), so the bytes of each parity are summed apart and ~w is
/// 0xffff - w. Longer ranges (an IPv6 address) go to the helper: summed inline, their bytes
/// need more registers than the NAT programs have left, and spill onto a full stack.
///
/// # Safety
/// Both pointers must be valid for `N` bytes (bounds-checked packet or map memory).
#[inline(always)]
pub unsafe fn diff<const N: usize>(old: *const [u8; N], new: *const [u8; N]) -> Option<u64> {
    if N > 4 {
        // SAFETY: both ranges are N bytes the caller vouches for; the helper only reads them.
        let sum = unsafe { bpf_csum_diff(old as *mut u32, N as u32, new as *mut u32, N as u32, 0) };
        return (sum >= 0).then_some(sum as u32 as u64);
    }
    let (old, new) = (old as *const u8, new as *const u8);
    let (mut even, mut odd) = (0u64, 0u64);
    let mut i = 0;
    while i + 1 < N {
        // SAFETY: bytes i and i + 1 of N the caller vouches for.
        unsafe {
            even += *new.add(i) as u64 + 0xff - *old.add(i) as u64;
            odd += *new.add(i + 1) as u64 + 0xff - *old.add(i + 1) as u64;
        }
        i += 2;
    }
    Some(even + (odd << 8))
}

/// A checksum after one 16-bit word of the header changed from `old` to `new` (RFC 1624,
/// eqn. 3): HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace(check: [u8; 2], old: [u8; 2], new: [u8; 2]) -> [u8; 2] {
    add_partial(check, change(old, new))
}

/// How a sum changes when one 16-bit word changes from `old` to `new`: ~m + m' (RFC 1624).
#[inline(always)]
pub fn change(old: [u8; 2], new: [u8; 2]) -> u64 {
    (!u16::from_ne_bytes(old)) as u64 + u16::from_ne_bytes(new) as u64
}

/// A checksum after the data it covers changed by `diff` (what `bpf_csum_diff` returns for the
/// old and new bytes; RFC 1624, eqn. 3): how NAT updates IP and TCP/UDP checksums for
/// rewritten addresses without summing the packet again.
#[inline(always)]
pub fn add_partial(check: [u8; 2], diff: u64) -> [u8; 2] {
    finish((!u16::from_ne_bytes(check)) as u64 + diff)
}
