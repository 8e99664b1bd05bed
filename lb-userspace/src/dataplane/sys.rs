//! The raw bpf(2) calls aya does not offer: batch lookups and updates of the connection table,
//! deleting from an array of maps, opening a pinned link, reading and detaching it. Every
//! `SYS_bpf` syscall of the crate goes through [`bpf`] here.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result, bail};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(2) with `attr` as the command's `union bpf_attr` member; the syscall's result.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly sized `bpf_attr` member for the duration of the call;
    // the buffers it points to are the caller's and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// `bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

/// BPF_MAP_LOOKUP_BATCH or BPF_MAP_UPDATE_BATCH; the kernel writes back `count`.
pub(super) fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    bpf(cmd, attr).map(drop)
}

/// BPF_MAP_DELETE_ELEM (aya has no delete for arrays of maps, and its hash maps want `&mut`).
pub(super) fn delete_elem<K>(map: BorrowedFd<'_>, key: &K) -> std::io::Result<()> {
    #[repr(C)]
    struct DeleteAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut attr = DeleteAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// Opens a pinned object (aya keeps the fds of its link types private).
pub(super) fn open_pinned(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).context("pin path contains NUL")?;
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = GetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The interface an XDP link is attached to (0 once the interface is gone).
pub(super) fn link_ifindex(fd: BorrowedFd<'_>) -> Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8 whose `xdp` member
    // starts with the ifindex.
    let mut info = [0u32; 16];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("reading a pinned link")?;
    Ok(info[4])
}

/// BPF_LINK_DETACH: takes the program off the interface whoever else holds the link.
pub(super) fn link_detach(fd: BorrowedFd<'_>) -> Result<()> {
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let mut attr = DetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    match bpf(BPF_LINK_DETACH, &mut attr) {
        // Already detached (its interface went away): nothing to do.
        Err(e) if e.raw_os_error() != Some(libc::ENOLINK) => {
            bail!("detaching the pinned link: {e}")
        }
        _ => Ok(()),
    }
}

/// A map's fd (aya has no common accessor; every variant holds a MapData).
pub(super) fn map_fd(map: &aya::maps::Map) -> BorrowedFd<'_> {
    use aya::maps::Map;
    let data = match map {
        Map::Array(m)
        | Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::RingBuf(m)
        | Map::SockHash(m)
        | Map::SockMap(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::Unsupported(m)
        | Map::XskMap(m) => m,
    };
    data.fd().as_fd()
}

/// The `memlock:` line of a map fd's fdinfo: the bytes the kernel charges for the map.
pub(super) fn memlock(fd: BorrowedFd<'_>) -> Result<u64> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock line in {path}"))
}
