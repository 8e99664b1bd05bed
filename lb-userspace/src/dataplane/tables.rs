//! The live Maglev tables: each service's table is a kernel map of its own, published into
//! the `MAGLEV` array of maps and rewritten in place when its reals change.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
};

use anyhow::{Context, Result, bail};
use aya::maps::{ArrayOfMaps, HashMap, MapData};
use lb_common::{ServiceKey, ServiceValue};

use super::{Dataplane, sys};

const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_F_MMAPABLE: u32 = 1 << 10;
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// A service's Maglev table: its own kernel map, kept mapped so that a change writes only the
/// slots that differ, in place: no new map, no swap in the outer map, whose every update makes
/// the kernel wait a full RCU grace period (about 10 ms here). Each slot is one aligned u32,
/// so a packet reads a slot's old value or its new one; the balancer writes a real's backend
/// entry before slots point at it and clears it only after they no longer do.
pub(super) struct LiveTable {
    /// `[size, 0]` then the slots (see lb-ebpf's maps.rs); the mapping keeps the map alive.
    base: NonNull<u32>,
    len: usize,
    slots: usize,
}

// SAFETY: the mapping is owned by this value alone and only written through `&mut self`.
unsafe impl Send for LiveTable {}

impl LiveTable {
    /// Creates an inner map filled with `slots`: the map (to publish) and its live mapping.
    fn create(slots: &[u32]) -> Result<(MapData, Self)> {
        let entries = slots.len().div_ceil(2) as u32 + 1;
        let obj = aya_obj::Map::new_from_params(
            BPF_MAP_TYPE_ARRAY,
            4,
            8,
            entries,
            BPF_F_INNER_MAP | BPF_F_MMAPABLE,
        );
        let map =
            MapData::create(obj, "xlb_maglev", None).context("creating a Maglev table map")?;
        let len = entries as usize * 8;
        // Unmapped when the LiveTable drops.
        let base = map_table(&map, len, libc::PROT_READ | libc::PROT_WRITE)?;
        let table = Self {
            base,
            len,
            slots: slots.len(),
        };
        // SAFETY: the mapping holds 2 + slots.len() u32s; the map is not published yet.
        unsafe {
            table.base.as_ptr().write(slots.len() as u32);
            std::ptr::copy_nonoverlapping(slots.as_ptr(), table.base.as_ptr().add(2), slots.len());
        }
        Ok((map, table))
    }

    /// Writes the slots that differ from `slots` (same size); how many it wrote.
    fn update(&mut self, slots: &[u32]) -> usize {
        assert_eq!(slots.len(), self.slots, "a live table keeps its size");
        let mut written = 0;
        for (i, &want) in slots.iter().enumerate() {
            // SAFETY: i < self.slots, inside the mapping; volatile, as the data path reads it.
            unsafe {
                let slot = self.base.as_ptr().add(2 + i);
                if slot.read_volatile() != want {
                    slot.write_volatile(want);
                    written += 1;
                }
            }
        }
        written
    }

    /// The slots of a published table (the mapping is read-only and unmapped before return).
    pub(super) fn read(map: &MapData) -> Result<Vec<u32>> {
        let entries = map.info()?.max_entries() as usize;
        let len = entries * 8;
        let base = map_table(map, len, libc::PROT_READ)?.as_ptr();
        // SAFETY: the mapping holds `entries` 8-byte elements: `[size, 0]`, then the slots.
        unsafe {
            let size = (base.read() as usize).min(entries.saturating_sub(1) * 2);
            let slots = std::slice::from_raw_parts(base.add(2), size).to_vec();
            libc::munmap(base.cast(), len);
            Ok(slots)
        }
    }
}

/// Maps the first `len` bytes of a Maglev table map (mmapable) shared, with protection `prot`;
/// the caller unmaps it.
fn map_table(map: &MapData, len: usize, prot: libc::c_int) -> Result<NonNull<u32>> {
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh mapping of an mmapable map of at least `len` bytes; no memory of ours is
    // touched.
    let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if addr == libc::MAP_FAILED {
        bail!(
            "mmap of a Maglev table: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(NonNull::new(addr as *mut u32).expect("mmap returned null"))
}

impl Drop for LiveTable {
    fn drop(&mut self) {
        // SAFETY: mapped in create with this length; nothing else refers to it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The Maglev tables this process published (by service id), and, while a bulk change runs,
/// new tables and service entries waiting to be written together.
#[derive(Default)]
pub(super) struct MaglevTables {
    pub(super) live: std::collections::HashMap<u32, LiveTable>,
    pub(super) deferring: bool,
    pub(super) new_tables: Vec<(u32, MapData)>,
    pub(super) new_services: Vec<(ServiceKey, ServiceValue)>,
}

/// Queued tables are flushed at this many, so their fds stay well under the fd limit.
const MAX_QUEUED_TABLES: usize = 256;

impl Dataplane {
    /// Publishes a service's Maglev table. A table of the same size already published by this
    /// process is rewritten in place, only its changed slots (see `LiveTable`); otherwise a new
    /// map is filled completely, then swapped in with one update of the outer map, so packets
    /// see either the old table or the new one.
    pub fn set_maglev(&mut self, service_id: u32, slots: &[u32]) -> Result<()> {
        if let Some(live) = self.tables.live.get_mut(&service_id)
            && live.slots == slots.len()
        {
            live.update(slots);
            return Ok(());
        }
        let (map, live) = LiveTable::create(slots)?;
        if self.tables.deferring {
            self.tables.new_tables.retain(|(id, _)| *id != service_id);
            self.tables.new_tables.push((service_id, map));
            self.tables.live.insert(service_id, live);
            if self.tables.new_tables.len() >= MAX_QUEUED_TABLES {
                self.write_queued()?;
            }
            return Ok(());
        }
        let mut outer: ArrayOfMaps<_, MapData> = ArrayOfMaps::try_from(self.map_mut("MAGLEV")?)?;
        outer
            .set(service_id, &map, 0)
            .context("publishing a Maglev table")?;
        // Our fd is closed here; the kernel keeps the map alive while the outer map refers to
        // it, and our mapping while we keep it.
        self.tables.live.insert(service_id, live);
        Ok(())
    }

    /// From here until `publish_deferred`, new Maglev tables and service entries are queued and
    /// written together: the tables in one batch update of the outer map (one RCU grace period
    /// for all, instead of one each), then the service entries, so no packet meets a service
    /// without its table. Everything else is written at once. For bulk changes (`restore`).
    pub fn defer_publishing(&mut self) {
        self.tables.deferring = true;
    }

    /// Writes what was queued since `defer_publishing` and stops queueing.
    pub fn publish_deferred(&mut self) -> Result<()> {
        let result = self.write_queued();
        self.tables.deferring = false;
        result
    }

    fn write_queued(&mut self) -> Result<()> {
        let tables = std::mem::take(&mut self.tables.new_tables);
        let services = std::mem::take(&mut self.tables.new_services);
        if !tables.is_empty() {
            let ids: Vec<u32> = tables.iter().map(|(id, _)| *id).collect();
            let fds: Vec<u32> = tables
                .iter()
                .map(|(_, m)| m.fd().as_fd().as_raw_fd() as u32)
                .collect();
            let fd = sys::map_fd(self.map("MAGLEV")?).as_raw_fd();
            let mut attr = sys::BatchAttr {
                keys: ids.as_ptr() as u64,
                values: fds.as_ptr() as u64,
                count: ids.len() as u32,
                map_fd: fd as u32,
                ..sys::BatchAttr::default()
            };
            sys::bpf_batch(sys::BPF_MAP_UPDATE_BATCH, &mut attr)
                .with_context(|| format!("publishing {} Maglev tables", ids.len()))?;
        }
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut("SERVICES")?)?;
        for (key, value) in services {
            map.insert(key, value, 0)?;
        }
        Ok(())
    }

    /// Drops a service's Maglev table, freeing its memory (its packets then find no backend).
    pub fn clear_maglev(&mut self, service_id: u32) -> Result<()> {
        self.tables.live.remove(&service_id);
        self.tables.new_tables.retain(|(id, _)| *id != service_id);
        let aya::maps::Map::ArrayOfMaps(outer) = self.map("MAGLEV")? else {
            bail!("map MAGLEV is not an array of maps");
        };
        // aya has no delete for map-of-maps arrays; BPF_MAP_DELETE_ELEM clears the slot.
        match sys::delete_elem(outer.fd().as_fd(), &service_id) {
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                bail!("clearing Maglev table {service_id}: {e}")
            }
            _ => Ok(()),
        }
    }
}
