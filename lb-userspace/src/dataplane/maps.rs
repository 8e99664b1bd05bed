//! Typed reads and writes of the program's maps: the configuration, services, backends,
//! counters (the connection table: conns.rs). Layouts only; `control` decides what goes in.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, ArrayOfMaps, DevMapHash, HashMap, MapData, PerCpuArray};
use lb_common::{
    Backend, Config, Counters, Global, MAX_BACKENDS, MAX_IFACES, MAX_SERVICES, MAX_SNAT_ADDRS,
    NatKey, NatReply, ServiceKey, ServiceValue, SnatAddrs, SnatEndpoint, VipKey,
};

use super::{Dataplane, sys};

impl Dataplane {
    pub fn set_config(&mut self, config: Config) -> Result<()> {
        let mut map: Array<_, Config> = Array::try_from(self.map_mut("CONFIG")?)?;
        map.set(0, config, 0)?;
        Ok(())
    }

    /// Makes `REDIRECT_PORTS` hold exactly these interfaces (by ifindex); their MACs go into
    /// `Config::ifaces` (the balancer's `set_interfaces`).
    pub fn set_redirect_ports(&mut self, ifaces: &[u32]) -> Result<()> {
        if ifaces.len() > MAX_IFACES as usize {
            bail!(
                "at most {MAX_IFACES} interfaces can be attached, not {}",
                ifaces.len()
            );
        }
        let wanted: std::collections::HashSet<u32> = ifaces.iter().copied().collect();
        let mut ports: DevMapHash<_> = DevMapHash::try_from(self.map_mut("REDIRECT_PORTS")?)?;
        for ifindex in ports.keys().filter_map(|k| k.ok()).collect::<Vec<_>>() {
            if !wanted.contains(&ifindex) {
                ports.remove(ifindex)?;
            }
        }
        for &ifindex in ifaces {
            ports
                .insert(ifindex, ifindex, None, 0)
                .with_context(|| format!("adding interface {ifindex} to REDIRECT_PORTS"))?;
        }
        Ok(())
    }

    pub fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        if self.tables.deferring {
            // After the tables queued before it (see `defer_publishing`).
            self.tables.new_services.push((key, value));
            return Ok(());
        }
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut("SERVICES")?)?;
        map.insert(key, value, 0)?;
        Ok(())
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.tables.new_services.retain(|(k, _)| k != key);
        let mut map: HashMap<_, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut("SERVICES")?)?;
        // Absent already (a service whose setup failed half-way) is fine: the goal is reached.
        if map.get(key, 0).is_ok() {
            map.remove(key)?;
        }
        Ok(())
    }

    /// A full-NAT service's SNAT addresses (none for the others), by service id.
    pub fn set_snat(&mut self, service_id: u32, addrs: &[[u8; 16]]) -> Result<()> {
        let mut value = SnatAddrs {
            count: addrs.len().min(MAX_SNAT_ADDRS) as u32,
            ..SnatAddrs::default()
        };
        for (slot, a) in value.addrs.iter_mut().zip(addrs) {
            *slot = *a;
        }
        let mut map: Array<_, SnatAddrs> = Array::try_from(self.map_mut("SNAT_ADDRS")?)?;
        let before = map.get(&service_id, 0)?;
        map.set(service_id, value, 0)?;
        // Connection-table entries name their SNAT address by its index in this list: another
        // list (a restart whose state file changed it, the id's previous service) would move
        // them to another address.
        if before.count != 0 && before != value {
            self.forget_every_conn_snat()?;
        }
        Ok(())
    }

    /// Makes `key` a VIP the data path answers pings for, or no longer.
    pub fn set_vip(&mut self, key: VipKey, present: bool) -> Result<()> {
        let mut map: HashMap<_, VipKey, u32> = HashMap::try_from(self.map_mut("VIPS")?)?;
        if present {
            map.insert(key, 0, 0)?;
        } else if map.get(&key, 0).is_ok() {
            map.remove(&key)?;
        }
        Ok(())
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        let mut map: Array<_, Backend> = Array::try_from(self.map_mut("BACKENDS")?)?;
        map.set(id, backend, 0)?;
        Ok(())
    }

    /// Resets one backend's counters (its id is being given to another real).
    pub fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        let mut map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map_mut("BACKEND_STATS")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        map.set(id, vec![Counters::default(); cpus].try_into()?, 0)?;
        Ok(())
    }

    pub fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        let mut map: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map_mut("SERVICE_STATS")?)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        map.set(id, vec![Counters::default(); cpus].try_into()?, 0)?;
        Ok(())
    }

    /// Every backend's counters, indexed by backend id: one batch read of the whole per-CPU
    /// array instead of a syscall per real (10,000 reals: 55 ms of a scrape, now one call).
    pub fn all_backend_counters(&self) -> Result<Vec<Counters>> {
        self.backend_counters(MAX_BACKENDS)
    }

    /// The counters of backend ids `0..ids` (see `all_backend_counters`): a scrape reads the
    /// ids in use, not all 65,536.
    pub fn backend_counters(&self, ids: u32) -> Result<Vec<Counters>> {
        all_counters(self.map("BACKEND_STATS")?, ids.min(MAX_BACKENDS) as usize)
    }

    /// Every service's counters, indexed by service id (see `all_backend_counters`).
    pub fn all_service_counters(&self) -> Result<Vec<Counters>> {
        self.service_counters(MAX_SERVICES)
    }

    /// The counters of service ids `0..ids` (see `backend_counters`).
    pub fn service_counters(&self, ids: u32) -> Result<Vec<Counters>> {
        all_counters(self.map("SERVICE_STATS")?, ids.min(MAX_SERVICES) as usize)
    }

    pub fn global_counter(&self, which: Global) -> Result<u64> {
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map("GLOBAL_STATS")?)?;
        Ok(map.get(&(which as u32), 0)?.iter().sum())
    }

    /// Every entry of the NAT reply table (`NAT_REPLIES`).
    pub fn nat_replies(&self) -> Result<Vec<(NatKey, NatReply)>> {
        self.read_all("NAT_REPLIES", "the NAT reply table")
    }

    /// Deletes NAT reply entries; keys already gone are skipped.
    pub fn delete_nat_replies(&mut self, keys: &[NatKey]) -> Result<()> {
        let fd = sys::map_fd(self.map("NAT_REPLIES")?);
        for key in keys {
            // One at a time: a batch delete stops at the first key the LRU already evicted.
            let _ = sys::delete_elem(fd, key);
        }
        self.forget_cached_replies(keys)
    }

    /// Deletes full-NAT flows (client tuple, SNAT endpoint), each only while it still holds
    /// that endpoint (a new flow on the tuple may have taken another since).
    pub fn delete_fullnat_flows(&mut self, flows: &[(NatKey, SnatEndpoint)]) -> Result<()> {
        let mut map: HashMap<_, NatKey, SnatEndpoint> =
            HashMap::try_from(self.map_mut("FULLNAT_FLOWS")?)?;
        for (k, v) in flows {
            if map.get(k, 0).is_ok_and(|now| now == *v) {
                // Gone already (the LRU evicted it) is as good.
                let _ = map.remove(k);
            }
        }
        Ok(())
    }

    /// Writes NAT reply entries (and their reply cache copies), as the data path records them
    /// (tests fill the table with them).
    pub fn insert_nat_replies(&mut self, entries: &[(NatKey, NatReply)]) -> Result<()> {
        let mut map: HashMap<_, NatKey, NatReply> =
            HashMap::try_from(self.map_mut("NAT_REPLIES")?)?;
        for (k, v) in entries {
            map.insert(k, v, 0)?;
        }
        self.cache_replies(entries)
    }

    /// A whole hash map, with BPF_MAP_LOOKUP_BATCH (a few syscalls instead of two per entry).
    fn read_all<K: Copy + Default, V: Copy + Default>(
        &self,
        map: &str,
        what: &str,
    ) -> Result<Vec<(K, V)>> {
        let fd = sys::map_fd(self.map(map)?).as_raw_fd();
        const CHUNK: usize = 8192;
        let mut keys = vec![K::default(); CHUNK];
        let mut values = vec![V::default(); CHUNK];
        let mut out = Vec::new();
        // The kernel's cursor (a bucket index for hash maps); none on the first call.
        let mut cursor: u32 = 0;
        let mut first = true;
        loop {
            let mut attr = sys::BatchAttr {
                in_batch: if first {
                    0
                } else {
                    &cursor as *const u32 as u64
                },
                out_batch: &mut cursor as *mut u32 as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: CHUNK as u32,
                map_fd: fd as u32,
                ..sys::BatchAttr::default()
            };
            let result = sys::bpf_batch(sys::BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(CHUNK);
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
            match result {
                Ok(()) => first = false,
                // ENOENT: the walk reached the end.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => bail!("reading {what}: {e}"),
            }
        }
    }
}

/// A per-CPU array of `Counters`, whole, summed over the CPUs, with BPF_MAP_LOOKUP_BATCH.
/// The kernel lays out each element's values as one per possible CPU, each rounded up to 8
/// bytes (`Counters` is 32).
fn all_counters(map: &aya::maps::Map, entries: usize) -> Result<Vec<Counters>> {
    const _: () = assert!(size_of::<Counters>().is_multiple_of(8));
    if entries == 0 {
        return Ok(Vec::new());
    }
    let fd = sys::map_fd(map);
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let mut keys = vec![0u32; entries];
    let mut values = vec![Counters::default(); entries * cpus];
    let mut cursor: u32 = 0;
    let mut attr = sys::BatchAttr {
        out_batch: &mut cursor as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: entries as u32,
        map_fd: fd.as_raw_fd() as u32,
        ..sys::BatchAttr::default()
    };
    match sys::bpf_batch(sys::BPF_MAP_LOOKUP_BATCH, &mut attr) {
        // ENOENT: the whole array fit in this one call.
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => bail!("reading the counters: {e}"),
        _ => {}
    }
    let read = (attr.count as usize).min(entries);
    let mut totals = vec![Counters::default(); entries];
    for (key, per_cpu) in keys[..read].iter().zip(values.chunks_exact(cpus)) {
        let t = &mut totals[*key as usize % entries];
        for c in per_cpu {
            t.packets += c.packets;
            t.bytes += c.bytes;
            t.new_flows += c.new_flows;
            t.refusals += c.refusals;
        }
    }
    Ok(totals)
}

/// Bulk access for measuring and large tables: what the kernel charges for each map. Kept apart
/// from the per-item calls above.
impl Dataplane {
    /// Kernel memory of each of the program's maps, as the kernel accounts it (`memlock` in the
    /// map fd's fdinfo), by map name. The Maglev tables are maps of their own: see
    /// [`Dataplane::maglev_memory`].
    pub fn map_memory(&self) -> Result<Vec<(String, u64)>> {
        self.ebpf
            .maps()
            .map(|(name, map)| {
                let fd = sys::map_fd(map);
                Ok((name.to_string(), sys::memlock(fd)?))
            })
            .collect()
    }

    /// Kernel memory of one service's Maglev table (0 when it has none).
    pub fn maglev_memory(&self, service_id: u32) -> Result<u64> {
        let outer: ArrayOfMaps<_, MapData> = ArrayOfMaps::try_from(self.map("MAGLEV")?)?;
        match outer.get(&service_id, 0) {
            Ok(table) => sys::memlock(table.fd().as_fd()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }
}
