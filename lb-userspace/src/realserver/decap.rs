//! A real server's XDP program (`xlb_realserver`: the TUN decapsulator and the refusal of
//! packets for ports without a socket, DR and TUN) and its VIP map.
//!
//! It comes from the same object as the balancer, whose big maps are shrunk to one entry at
//! load: a real server needs only `DECAP_VIPS` and `DECAP_STATS`.

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    DECAP_CAPACITY, Decap, DecapConfig, FAMILY_V4, FAMILY_V6, VIP_F_GUE, VIP_F_REFUSE, VipKey,
    VipValue,
};

use rtnetlink::{
    LinkUnspec,
    packet_route::link::{LinkAttribute, LinkXdp},
};

use crate::{
    dataplane::{EBPF_OBJECT, verifier_error},
    netlink::Neighbours,
};

pub const DECAP_PROGRAM: &str = "xlb_realserver";

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

/// The addresses in a `DECAP_VIPS` map, sorted.
fn sorted_vips<T: std::borrow::Borrow<MapData>>(map: &HashMap<T, VipKey, VipValue>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter_map(|k| vip_addr(&k))
        .collect();
    v.sort();
    v
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

    fn vips_map(&mut self) -> Result<HashMap<&mut aya::maps::MapData, VipKey, VipValue>> {
        let map = self
            .ebpf
            .map_mut("DECAP_VIPS")
            .ok_or_else(|| anyhow!("map DECAP_VIPS missing from the object"))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Tunnelled packets for `vip` are decapsulated from now on (no refusals). Adding a VIP
    /// twice is fine.
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<()> {
        self.add_vip_with(vip, VipValue::default())
    }

    /// As `add_vip`, and packets for `vip` are refused as `value` says (the later value wins).
    pub fn add_vip_with(&mut self, vip: IpAddr, value: VipValue) -> Result<()> {
        if vip.is_unspecified() || vip.is_multicast() {
            bail!("{vip} cannot be a VIP");
        }
        self.vips_map()?
            .insert(vip_key(vip), value, 0)
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

    /// GUE packets to UDP `port` are unwrapped from now on (0: none are).
    pub fn set_gue_port(&mut self, port: u16) -> Result<()> {
        let map = self
            .ebpf
            .map_mut("DECAP_CONFIG")
            .ok_or_else(|| anyhow!("map DECAP_CONFIG missing from the object"))?;
        let mut map: Array<_, DecapConfig> = Array::try_from(map)?;
        map.set(
            0,
            DecapConfig {
                gue_port: port.to_be(),
                _pad: [0; 2],
            },
            0,
        )?;
        Ok(())
    }

    /// The VIPs decapsulated here, sorted.
    pub fn vips(&mut self) -> Result<Vec<IpAddr>> {
        Ok(sorted_vips(&self.vips_map()?))
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

// --- Attaching on a real server --------------------------------------------------------------
//
// `xlb realserver setup` is a one-shot command, so the decapsulator is attached through
// netlink (as `ip link set dev IF xdp ...` does), not through a bpf_link owned by the process:
// it stays attached after the command exits, until `teardown` removes its last VIP. Later
// commands find it again by the program id the kernel reports for the interface.

/// XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE (linux/if_link.h).
const XDP_FLAGS_UPDATE_IF_NOEXIST: u32 = 1 << 0;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The XDP program attached to an interface: its id and the mode flag to detach it with.
async fn attached_program(nl: &Neighbours, ifindex: u32) -> Result<Option<(u32, u32)>> {
    Ok(nl.xdp_program(ifindex).await?.map(|(id, generic)| {
        (
            id,
            if generic {
                XDP_FLAGS_SKB_MODE
            } else {
                XDP_FLAGS_DRV_MODE
            },
        )
    }))
}

/// A map of an attached decapsulator, or None if the program is not xlb's decapsulator.
fn map_of(prog_id: u32, name: &str) -> Result<Option<MapData>> {
    let Some(info) = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .find(|p| p.id() == prog_id)
    else {
        return Ok(None);
    };
    if info.name_as_str() != Some(DECAP_PROGRAM) {
        return Ok(None);
    }
    for map_id in info.map_ids()?.unwrap_or_default() {
        let map = MapData::from_id(map_id)?;
        if map.info()?.name_as_str() == Some(name) {
            return Ok(Some(map));
        }
    }
    Ok(None)
}

async fn set_xdp(nl: &Neighbours, ifindex: u32, fd: i32, flags: u32) -> Result<()> {
    let msg = LinkUnspec::new_with_index(ifindex)
        .append_extra_attribute(LinkAttribute::Xdp(vec![
            LinkXdp::Fd(fd),
            LinkXdp::Flags(flags),
        ]))
        .build();
    nl.handle().link().set(msg).execute().await?;
    Ok(())
}

/// The GUE port (host order, 0: none) in an attached decapsulator's `DECAP_CONFIG`.
fn gue_port_of(map: MapData) -> Result<(u16, Array<MapData, DecapConfig>)> {
    let config: Array<MapData, DecapConfig> = Array::try_from(aya::maps::Map::Array(map))?;
    Ok((u16::from_be(config.get(&0, 0)?.gue_port), config))
}

/// Makes the decapsulator on `iface` accept `vip`, attaching it first if needed (native mode,
/// else generic), and unwrap GUE on `gue_port` (0: the VIP's packets are bare IP-in-IP).
/// Refuses to replace another XDP program, or to move the GUE port other VIPs use.
pub async fn attach_vip(
    nl: &Neighbours,
    ifindex: u32,
    iface: &str,
    vip: IpAddr,
    value: VipValue,
    gue_port: u16,
) -> Result<()> {
    if let Some((prog_id, _)) = attached_program(nl, ifindex).await? {
        let (Some(map), Some(config)) = (
            map_of(prog_id, "DECAP_VIPS")?,
            map_of(prog_id, "DECAP_CONFIG")?,
        ) else {
            bail!(
                "{iface} already has another XDP program (id {prog_id}); xlb will not replace it"
            );
        };
        let (current, mut config) = gue_port_of(config)?;
        if gue_port != 0 && current != 0 && current != gue_port {
            bail!(
                "the decapsulator on {iface} already unwraps GUE on port {current}; one port per \
                 interface"
            );
        }
        if gue_port != 0 && current == 0 {
            config.set(
                0,
                DecapConfig {
                    gue_port: gue_port.to_be(),
                    _pad: [0; 2],
                },
                0,
            )?;
        }
        let mut vips: HashMap<MapData, VipKey, VipValue> =
            HashMap::try_from(aya::maps::Map::HashMap(map))?;
        vips.insert(vip_key(vip), value, 0)
            .with_context(|| format!("adding {vip} to the real-server program on {iface}"))?;
        return Ok(());
    }
    let mut decap = Decapsulator::load()?;
    decap.add_vip_with(vip, value)?;
    decap.set_gue_port(gue_port)?;
    let fd = decap.program()?.fd()?.as_fd().as_raw_fd();
    let native = set_xdp(
        nl,
        ifindex,
        fd,
        XDP_FLAGS_UPDATE_IF_NOEXIST | XDP_FLAGS_DRV_MODE,
    )
    .await;
    if let Err(native_err) = native {
        set_xdp(nl, ifindex, fd, XDP_FLAGS_UPDATE_IF_NOEXIST | XDP_FLAGS_SKB_MODE)
            .await
            .with_context(|| {
                format!("attaching the decapsulator to {iface} (native mode failed: {native_err:#}; generic too)")
            })?;
    }
    // Dropping `decap` closes our fds; the attachment keeps the program and its maps alive.
    Ok(())
}

/// Stops decapsulating for `vip` on `iface`; detaches the program when no VIP is left.
pub async fn detach_vip(nl: &Neighbours, ifindex: u32, iface: &str, vip: IpAddr) -> Result<()> {
    let Some((prog_id, mode)) = attached_program(nl, ifindex).await? else {
        return Ok(());
    };
    let Some(map) = map_of(prog_id, "DECAP_VIPS")? else {
        return Ok(());
    };
    let mut vips: HashMap<MapData, VipKey, VipValue> =
        HashMap::try_from(aya::maps::Map::HashMap(map))?;
    let _ = vips.remove(&vip_key(vip));
    if vips.keys().next().is_none() {
        set_xdp(nl, ifindex, -1, mode)
            .await
            .with_context(|| format!("detaching the decapsulator from {iface}"))?;
    }
    Ok(())
}

/// What the decapsulator attached to an interface does: its VIPs and counters.
pub struct Attached {
    pub vips: Vec<IpAddr>,
    /// The VIPs that refuse (SYNs and datagrams for ports without a socket go back to the
    /// director), with the real's address a DR refusal comes from.
    pub refusing: Vec<(IpAddr, IpAddr)>,
    /// The VIPs set up for GUE, and the port GUE is unwrapped on (0: none).
    pub gue_vips: Vec<IpAddr>,
    pub gue_port: u16,
    pub counters: Vec<(Decap, u64)>,
}

/// The decapsulator attached to the interface, if any.
pub async fn attached(nl: &Neighbours, ifindex: u32) -> Result<Option<Attached>> {
    let Some((prog_id, _)) = attached_program(nl, ifindex).await? else {
        return Ok(None);
    };
    let (Some(vips), Some(stats), Some(config)) = (
        map_of(prog_id, "DECAP_VIPS")?,
        map_of(prog_id, "DECAP_STATS")?,
        map_of(prog_id, "DECAP_CONFIG")?,
    ) else {
        return Ok(None);
    };
    let (gue_port, _) = gue_port_of(config)?;
    let vips: HashMap<MapData, VipKey, VipValue> =
        HashMap::try_from(aya::maps::Map::HashMap(vips))?;
    let mut refusing: Vec<(IpAddr, IpAddr)> = vips
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(_, v)| v.flags & VIP_F_REFUSE != 0)
        .filter_map(|(k, v)| {
            let vip = vip_addr(&k)?;
            let real = vip_addr(&VipKey {
                addr: v.real_addr,
                family: k.family,
                _pad: [0; 3],
            })?;
            Some((vip, real))
        })
        .collect();
    refusing.sort();
    let mut gue_vips: Vec<IpAddr> = vips
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(_, v)| v.flags & VIP_F_GUE != 0)
        .filter_map(|(k, _)| vip_addr(&k))
        .collect();
    gue_vips.sort();
    let vips = sorted_vips(&vips);
    let stats: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(stats))?;
    let counters = Decap::ALL
        .iter()
        .map(|&d| Ok((d, stats.get(&(d as u32), 0)?.iter().sum())))
        .collect::<Result<_>>()?;
    Ok(Some(Attached {
        vips,
        refusing,
        gue_vips,
        gue_port,
        counters,
    }))
}
