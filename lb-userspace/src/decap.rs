//! A real server's side of TUN: the decapsulator program (`xlb_decap`) and its VIP map.
//!
//! It comes from the same object as the balancer, whose big maps are shrunk to one entry at
//! load: a real server needs only `DECAP_VIPS` and `DECAP_STATS`. Attaching is the caller's.

use std::net::IpAddr;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapError, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{DECAP_CAPACITY, Decap, FAMILY_V4, FAMILY_V6, VipKey};

use crate::dataplane::{EBPF_OBJECT, verifier_error};

pub const DECAP_PROGRAM: &str = "xlb_decap";

/// The balancer's maps, unused by the decapsulator: one entry each instead of megabytes.
const BALANCER_MAPS: [&str; 7] = [
    "SERVICES",
    "MAGLEV",
    "BACKENDS",
    "CONNS",
    "FRAGS",
    "SERVICE_STATS",
    "BACKEND_STATS",
];

pub fn vip_key(addr: IpAddr) -> VipKey {
    let mut key = VipKey::default();
    match addr {
        IpAddr::V4(a) => {
            key.addr[..4].copy_from_slice(&a.octets());
            key.family = FAMILY_V4;
        }
        IpAddr::V6(a) => {
            key.addr = a.octets();
            key.family = FAMILY_V6;
        }
    }
    key
}

fn vip_addr(key: &VipKey) -> Option<IpAddr> {
    match key.family {
        FAMILY_V4 => {
            let o: [u8; 4] = key.addr[..4].try_into().ok()?;
            Some(IpAddr::from(o))
        }
        FAMILY_V6 => Some(IpAddr::from(key.addr)),
        _ => None,
    }
}

pub struct Decapsulator {
    ebpf: Ebpf,
}

impl Decapsulator {
    /// Loads the decapsulator into the kernel (not attached).
    pub fn load() -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for name in BALANCER_MAPS {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(DECAP_PROGRAM)
            .ok_or_else(|| anyhow!("program {DECAP_PROGRAM} missing from the object"))?
            .try_into()?;
        prog.load()
            .map_err(verifier_error)
            .with_context(|| format!("loading program {DECAP_PROGRAM}"))?;
        Ok(Self { ebpf })
    }

    /// The loaded program, for the caller to attach.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(DECAP_PROGRAM)
            .ok_or_else(|| anyhow!("program {DECAP_PROGRAM} missing"))?
            .try_into()?)
    }

    fn vips_map(&mut self) -> Result<HashMap<&mut aya::maps::MapData, VipKey, u32>> {
        let map = self
            .ebpf
            .map_mut("DECAP_VIPS")
            .ok_or_else(|| anyhow!("map DECAP_VIPS missing from the object"))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Tunnelled packets for `vip` are decapsulated from now on. Adding a VIP twice is fine.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<()> {
        if vip.is_unspecified() || vip.is_multicast() {
            bail!("{vip} cannot be a VIP");
        }
        self.vips_map()?
            .insert(vip_key(vip), 0, 0)
            .map_err(|e| match e {
                MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    anyhow!("VIP {vip}: no room (at most {DECAP_CAPACITY} VIPs)")
                }
                e => anyhow!("VIP {vip}: {e}"),
            })
    }

    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<()> {
        self.vips_map()?.remove(&vip_key(vip)).map_err(|e| match e {
            MapError::KeyNotFound => anyhow!("VIP {vip} is not decapsulated here"),
            MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => {
                anyhow!("VIP {vip} is not decapsulated here")
            }
            e => anyhow!("VIP {vip}: {e}"),
        })
    }

    /// The VIPs decapsulated here, sorted.
    pub fn vips(&mut self) -> Result<Vec<IpAddr>> {
        let map = self.vips_map()?;
        let mut v: Vec<IpAddr> = map
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| vip_addr(&k))
            .collect();
        v.sort();
        Ok(v)
    }

    /// One counter, summed over the CPUs.
    pub fn counter(&self, which: Decap) -> Result<u64> {
        let map = self
            .ebpf
            .map("DECAP_STATS")
            .ok_or_else(|| anyhow!("map DECAP_STATS missing from the object"))?;
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(map.get(&(which as u32), 0)?.iter().sum())
    }

    /// Every counter, in `Decap::ALL` order.
    pub fn counters(&self) -> Result<Vec<(Decap, u64)>> {
        Decap::ALL
            .iter()
            .map(|&d| Ok((d, self.counter(d)?)))
            .collect()
    }

    /// Runs the program once on `frame` with BPF_PROG_TEST_RUN: the verdict and the frame after.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let result = self.program()?.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs the program once and returns the kernel-measured duration (for benchmarks).
    pub fn time_run(&mut self, frame: &[u8]) -> Result<std::time::Duration> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::default()
        };
        Ok(self.program()?.test_run(opts)?.duration)
    }
}
