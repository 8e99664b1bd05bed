//! The connection table, read and written through a mapping of its array (`CONNS` is
//! mmapable): a walk of a million flows is a scan of memory, not thousands of syscalls. Layout
//! and hashing: lb-common's `ConnBucket`, `ConnEntry` and `ConnKey::hashes`.

use std::{os::fd::AsRawFd, ptr::NonNull};

use anyhow::{Result, bail};
use lb_common::{CONN_WAYS, ConnBucket, ConnEntry, ConnKey, ConnValue, conn_seal};

use super::{Dataplane, sys};

/// A shared mapping of the whole connection table, unmapped on drop. The `Dataplane` keeps one
/// (`conn_table`): mapping the table inserts every page (64 MiB at the default capacity), which
/// cost each walk, so each scrape, about 10 ms.
pub(super) struct Mapping {
    base: NonNull<ConnBucket>,
    buckets: usize,
}

impl Mapping {
    fn of(dp: &Dataplane) -> Result<Self> {
        let map = dp.map("CONNS")?;
        let buckets = dp.conn_buckets()? as usize;
        let len = buckets * size_of::<ConnBucket>();
        let fd = sys::map_fd(map).as_raw_fd();
        // SAFETY: a fresh shared mapping of an mmapable array of `buckets` 64-byte elements;
        // no memory of ours is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            bail!(
                "mmap of the connection table: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            base: NonNull::new(addr.cast()).expect("mmap returned null"),
            buckets,
        })
    }

    /// Bucket `i`, copied with volatile reads (the data path writes it meanwhile).
    fn read(&self, i: usize) -> ConnBucket {
        assert!(i < self.buckets);
        // SAFETY: inside the mapping; ConnBucket is plain data, any bytes are a value.
        unsafe { self.base.as_ptr().add(i).read_volatile() }
    }

    fn write(&self, i: usize, bucket: ConnBucket) {
        assert!(i < self.buckets);
        // SAFETY: as in `read`.
        unsafe { self.base.as_ptr().add(i).write_volatile(bucket) }
    }

    /// Writes entry `way` of bucket `i` alone (20 bytes): the data path may write the bucket's
    /// other entries meanwhile.
    fn write_entry(&self, i: usize, way: usize, entry: ConnEntry) {
        assert!(i < self.buckets && way < CONN_WAYS);
        // SAFETY: inside the mapping; a racing writer of the same entry can at worst tear it,
        // which `ConnEntry::holds` then refuses.
        unsafe {
            let bucket = self.base.as_ptr().add(i);
            std::ptr::addr_of_mut!((*bucket).entries[way]).write_volatile(entry)
        }
    }
}

// SAFETY: the mapping is plain shared memory, read and written with volatile accesses whatever
// the thread (the data path writes it concurrently anyway).
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: mapped in `of` with this length; nothing refers to it any more.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.buckets * size_of::<ConnBucket>(),
            )
        };
    }
}

/// The bucket of a flow with hashes `hashes` in a table of `buckets` (a power of two).
fn bucket_of(hashes: [u32; 2], buckets: usize) -> usize {
    (hashes[1] as usize) & (buckets - 1)
}

/// The entry of `bucket` a new flow with hashes `hashes` takes, as the data path chooses it:
/// its own, else the one with the lowest keep score (`ConnValue::keep_score`).
fn way_for(bucket: &ConnBucket, hashes: [u32; 2]) -> usize {
    bucket
        .entries
        .iter()
        .position(|e| e.fingerprint[0] == hashes[0])
        .unwrap_or_else(|| {
            (0..CONN_WAYS)
                .min_by_key(|&w| bucket.entries[w].value.keep_score())
                .expect("a bucket has entries")
        })
}

impl Dataplane {
    /// The connection table's mapping, made on first use and kept.
    fn conn_table(&self) -> Result<&Mapping> {
        if let Some(table) = self.conn_table.get() {
            return Ok(table);
        }
        let table = Mapping::of(self)?;
        Ok(self.conn_table.get_or_init(|| table))
    }

    /// Buckets of the connection table, as the kernel has it.
    fn conn_buckets(&self) -> Result<u32> {
        let map: aya::maps::Array<_, ConnBucket> = aya::maps::Array::try_from(self.map("CONNS")?)?;
        Ok(map.len())
    }

    /// Flows the connection table is sized for: its buckets (`lb_common::conn_buckets`).
    pub fn conn_capacity(&self) -> Result<u32> {
        self.conn_buckets()
    }

    /// Every entry in use (for status and tests, not per packet): one scan of the mapped
    /// table.
    pub fn conns(&self) -> Result<Vec<ConnValue>> {
        let mut out = Vec::new();
        self.for_each_conn(|v| out.push(*v))?;
        Ok(out)
    }

    /// Hands every entry in use to `visit`, in one scan of the mapped table, without collecting
    /// them: what a scrape does, which only counts them.
    pub fn for_each_conn(&self, mut visit: impl FnMut(&ConnValue)) -> Result<()> {
        let table = self.conn_table()?;
        for i in 0..table.buckets {
            let bucket = table.read(i);
            for e in bucket.entries.iter().filter(|e| e.value.last_seen_s != 0) {
                visit(&e.value);
            }
        }
        Ok(())
    }

    /// The entry of the flow `key`, if the table holds it (whole).
    pub fn conn(&self, key: &ConnKey) -> Result<Option<ConnValue>> {
        Ok(self.conns_of(std::slice::from_ref(key))?[0])
    }

    /// The bucket the flow `key` hashes to, as it is: for tests that age or tear entries.
    pub fn conn_bucket(&self, key: &ConnKey) -> Result<ConnBucket> {
        let table = self.conn_table()?;
        Ok(table.read(bucket_of(key.hashes(), table.buckets)))
    }

    /// Overwrites the bucket the flow `key` hashes to (see `conn_bucket`).
    pub fn set_conn_bucket(&mut self, key: &ConnKey, bucket: ConnBucket) -> Result<()> {
        let table = self.conn_table()?;
        let i = bucket_of(key.hashes(), table.buckets);
        table.write(i, bucket);
        Ok(())
    }

    /// Writes these flows' entries as the data path records a new flow: into the flow's own
    /// entry, else its bucket's with the lowest keep score (`ConnValue::keep_score`). One entry
    /// is written at a time, so it is safe while the data path runs (connection sync installs
    /// a peer director's flows with it; tests and benchmarks fill tables with it).
    pub fn insert_conns(&mut self, flows: &[(ConnKey, ConnValue)]) -> Result<()> {
        let table = self.conn_table()?;
        for (key, value) in flows {
            let hashes = key.hashes();
            let i = bucket_of(hashes, table.buckets);
            let way = way_for(&table.read(i), hashes);
            table.write_entry(i, way, ConnEntry::new(hashes, *value));
        }
        Ok(())
    }

    /// Takes a full-NAT source (`CONN_F_SNAT`) out of these flows' entries, each only while it
    /// still names that port (network byte order): the flow's next packet then finds its source
    /// in `FULLNAT_FLOWS`, or claims a new one. Resealed; one entry written at a time, so safe
    /// while the data path runs (a racing write tears the entry, which then reads as a miss).
    pub fn forget_conn_snat(&mut self, flows: &[(ConnKey, u16)]) -> Result<()> {
        let table = self.conn_table()?;
        for (key, port) in flows {
            let hashes = key.hashes();
            let i = bucket_of(hashes, table.buckets);
            let bucket = table.read(i);
            let Some(way) = bucket.entries.iter().position(|e| e.holds(hashes)) else {
                continue;
            };
            let value = bucket.entries[way].value;
            if value.snat() == 0 || value.snat_port != *port {
                continue;
            }
            table.write_entry(i, way, ConnEntry::new(hashes, value.without_snat()));
        }
        Ok(())
    }

    /// Takes the full-NAT source out of every entry that holds one (one scan of the table):
    /// those flows' next packets find theirs in `FULLNAT_FLOWS`, and record it anew.
    pub fn forget_every_conn_snat(&mut self) -> Result<()> {
        let table = self.conn_table()?;
        for i in 0..table.buckets {
            let bucket = table.read(i);
            for (way, e) in bucket.entries.iter().enumerate() {
                if e.value.snat() == 0 {
                    continue;
                }
                // Resealed as the fingerprint's hashes were: h2 = fingerprint ^ old seal.
                let hashes = [e.fingerprint[0], e.fingerprint[1] ^ conn_seal(&e.value)];
                table.write_entry(i, way, ConnEntry::new(hashes, e.value.without_snat()));
            }
        }
        Ok(())
    }

    /// The entries of these flows, where the table holds them (whole): one mapping for all.
    pub fn conns_of(&self, keys: &[ConnKey]) -> Result<Vec<Option<ConnValue>>> {
        let table = self.conn_table()?;
        Ok(keys
            .iter()
            .map(|key| {
                let hashes = key.hashes();
                table
                    .read(bucket_of(hashes, table.buckets))
                    .entries
                    .iter()
                    .find(|e| e.holds(hashes))
                    .map(|e| e.value)
            })
            .collect())
    }
}
