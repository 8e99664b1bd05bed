//! Where the data path outlives the daemon: the balancer's maps and its XDP links pinned on
//! bpffs under `/sys/fs/bpf/xlb/<iface>/`, named after the daemon's first `--iface`: `link` is
//! that interface's link, `link-<name>` each further interface's (two-arm directors). A daemon that stops (SIGTERM, crash, `kill -9`) leaves the
//! program forwarding with its connection table; the next one adopts the pins (see
//! `Dataplane::load`), and `xlb detach` removes them.

use std::{
    ffi::CString,
    os::{
        fd::{AsFd, AsRawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::maps::MapInfo;

use super::sys::{link_detach, link_ifindex, open_pinned};

pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/xlb";
/// The pin of the XDP link (bpf_link) that holds the program on the first interface...
pub const LINK_PIN: &str = "link";
/// ...and the prefix of the others' (`link-eth1`).
const EXTRA_LINK_PREFIX: &str = "link-";
/// Maps a restarted daemon keeps: configuration, tables, tracked flows and counters. The
/// decapsulator's maps belong to another program and are not pinned here.
/// The NAT program array and its hand-over are pinned too: a program array that no process
/// holds is emptied by the kernel, and while a new daemon replaces the programs, the old
/// balancer and the new NAT programs (or the reverse) must share the hand-over.
pub const PINNED_MAPS: [&str; 15] = [
    "SERVICES",
    "MAGLEV",
    "BACKENDS",
    "CONNS",
    "FRAGS",
    "CONFIG",
    "SERVICE_STATS",
    "BACKEND_STATS",
    "GLOBAL_STATS",
    "NAT_REPLIES",
    "NAT_REPLY_CACHE",
    "FULLNAT_FLOWS",
    "SNAT_ADDRS",
    "NAT_PROGRAM",
    "NAT_SCRATCH",
];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// One interface's pin directory.
#[derive(Clone, Debug)]
pub struct PinDir {
    pub path: PathBuf,
    /// The interface the pinned link must be attached to; pins of another are stale.
    pub ifindex: u32,
}

impl PinDir {
    /// `ROOT/IFACE` in the host's network namespace; `ROOT/netns-INODE/IFACE` in another, whose
    /// interface names (every lab's `eth0`) are not unique across namespaces.
    pub fn for_iface(root: &Path, iface: &str, ifindex: u32) -> Result<Self> {
        let own = netns_inode("/proc/self/ns/net")?;
        let base = if netns_inode("/proc/1/ns/net").ok() == Some(own) {
            root.to_path_buf()
        } else {
            root.join(format!("netns-{own}"))
        };
        Ok(Self {
            path: base.join(iface),
            ifindex,
        })
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn link(&self) -> PathBuf {
        self.path.join(LINK_PIN)
    }

    /// The pin of the link on `iface`: `link` for the interface the directory is named after,
    /// `link-<iface>` for any other.
    pub fn link_of(&self, iface: &str) -> PathBuf {
        if self.path.file_name().is_some_and(|n| n == iface) {
            self.link()
        } else {
            self.path.join(format!("{EXTRA_LINK_PREFIX}{iface}"))
        }
    }

    /// Whether the link pinned at `path` is attached to `ifindex` and can be adopted. One
    /// attached elsewhere (the interface was re-created) is detached and its pin removed.
    pub fn adoptable_link(&self, path: &Path, ifindex: u32) -> Result<bool> {
        if !path.exists() {
            return Ok(false);
        }
        let link = open_pinned(path)?;
        let attached_to = link_ifindex(link.as_fd())?;
        if attached_to == ifindex {
            return Ok(true);
        }
        tracing::warn!(pin = %path.display(), attached_to, ifindex, "pinned link is not attached to this interface: replacing it");
        link_detach(link.as_fd())?;
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
        Ok(false)
    }

    /// Detaches the links of interfaces a previous daemon was attached to and this one is not
    /// (`ifaces` lists this one's), and removes their pins.
    pub fn drop_unlisted_links(&self, ifaces: &[String]) -> Result<()> {
        for entry in std::fs::read_dir(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?
        {
            let path = entry?.path();
            let Some(iface) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(EXTRA_LINK_PREFIX))
            else {
                continue;
            };
            if ifaces.iter().any(|i| i == iface) {
                continue;
            }
            link_detach(open_pinned(&path)?.as_fd())?;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            tracing::info!(
                iface,
                "interface no longer listed: the data path is detached from it"
            );
        }
        Ok(())
    }

    /// The pin directory of the data path `iface` is a further interface of (`link-<iface>` in
    /// a sibling directory), if any: `xlb detach` names it.
    pub fn holding_extra(&self, iface: &str) -> Option<PathBuf> {
        let base = self.path.parent()?;
        std::fs::read_dir(base)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|dir| dir.join(format!("{EXTRA_LINK_PREFIX}{iface}")).exists())
    }

    /// Makes sure the directory exists on a bpffs, mounting one on /sys/fs/bpf if needed.
    pub fn prepare(&self) -> Result<()> {
        ensure_bpffs()?;
        std::fs::create_dir_all(&self.path)
            .with_context(|| format!("creating pin directory {}", self.path.display()))
    }

    /// Holds the directory's lock for as long as the returned file lives: one daemon manages an
    /// interface's data path at a time, and `xlb detach` does not pull it from under one.
    pub fn lock(&self) -> Result<std::fs::File> {
        let dir = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        // SAFETY: a valid fd.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another xlb daemon manages this interface (its pins are in {})",
                self.path.display()
            );
        }
        Ok(dir)
    }

    /// Whether there is a pinned link attached to our interface to adopt. Anything else in
    /// the directory is stale (the interface was re-created, or a netns inode reused) and is
    /// removed, so that nothing of it is adopted.
    pub fn has_adoptable_link(&self) -> Result<bool> {
        let path = self.link();
        if !path.exists() {
            if self.has_pins()? {
                tracing::warn!(dir = %self.path.display(), "maps pinned without a link: starting afresh");
                self.clear()?;
            }
            return Ok(false);
        }
        let attached_to = link_ifindex(open_pinned(&path)?.as_fd())?;
        if attached_to != self.ifindex {
            tracing::warn!(
                dir = %self.path.display(),
                attached_to,
                ifindex = self.ifindex,
                "pinned link is not attached to this interface: starting afresh"
            );
            self.clear()?;
            return Ok(false);
        }
        Ok(true)
    }

    fn has_pins(&self) -> Result<bool> {
        Ok(match std::fs::read_dir(&self.path) {
            Ok(mut entries) => entries.next().is_some(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        })
    }

    /// Removes the pin of every map whose layout differs from the one this binary's program
    /// declares, so the loader creates it afresh (and says so). The program still attached
    /// keeps using the old map until the link is switched to the new program.
    pub fn drop_changed_layouts(&self, wanted: &[(&str, MapLayout)]) -> Result<()> {
        for (name, want) in wanted {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path)
                .with_context(|| format!("reading pinned map {}", path.display()))?;
            let have = MapLayout {
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
                flags: info.map_flags(),
            };
            if have != *want {
                tracing::warn!(
                    map = name,
                    pinned = ?have,
                    program = ?want,
                    "map layout changed: it starts empty (for CONNS: tracked flows re-hash \
                     through Maglev, which keeps them on their real while the reals are unchanged)"
                );
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// `xlb detach`: detaches the pinned link (even while something still holds it) and
    /// removes every pin and the directory. Returns how many pins there were.
    pub fn remove_all(&self) -> Result<usize> {
        refuse_private_mounts()?;
        if !self.path.exists() {
            return Ok(0);
        }
        let lock = self.lock().context("stop the daemon first")?;
        let removed = self.clear()?;
        drop(lock);
        std::fs::remove_dir(&self.path)
            .with_context(|| format!("removing {}", self.path.display()))?;
        // The netns-INODE level, once its last interface is gone.
        if let Some(parent) = self.path.parent()
            && parent
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("netns-"))
        {
            let _ = std::fs::remove_dir(parent);
        }
        Ok(removed)
    }

    /// Removes what a daemon that could not attach pinned, so nothing of it lingers.
    pub(crate) fn discard(&self) {
        if let Err(e) = self.clear().and_then(|_| {
            std::fs::remove_dir(&self.path)
                .with_context(|| format!("removing {}", self.path.display()))
        }) {
            tracing::warn!("removing the pins of a failed start: {e:#}");
        }
    }

    /// Detaches the pinned links and removes every pin, keeping the directory (and its lock).
    fn clear(&self) -> Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?
        {
            let path = entry?.path();
            let is_link = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == LINK_PIN || n.starts_with(EXTRA_LINK_PREFIX));
            if is_link {
                link_detach(open_pinned(&path)?.as_fd())?;
            }
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// What must match for a pinned map to be adopted by a new program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// Makes sure /sys/fs/bpf is a bpffs, mounting one if not. Refused in a mount namespace of
/// the daemon's own, as `ip netns exec` makes (with a fresh /sys): a bpffs mounted there, and
/// every pin in it, would die with the daemon, and the data path with them.
fn ensure_bpffs() -> Result<()> {
    if is_bpffs(BPFFS_MOUNT) {
        return Ok(());
    }
    refuse_private_mounts()?;
    let src = CString::new("bpf").expect("no NUL");
    let dst = CString::new(BPFFS_MOUNT).expect("no NUL");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mounting bpffs on {BPFFS_MOUNT}: {}",
            std::io::Error::last_os_error()
        );
    }
    tracing::info!("mounted bpffs on {BPFFS_MOUNT}");
    Ok(())
}

/// Fails when /sys/fs/bpf is not a bpffs and this process runs in a mount namespace its
/// parent does not share (`ip netns exec`, `unshare -m`): pins are then out of reach, or
/// would die with the process.
fn refuse_private_mounts() -> Result<()> {
    // SAFETY: getppid has no preconditions.
    let parent = format!("/proc/{}/ns/mnt", unsafe { libc::getppid() });
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    if !is_bpffs(BPFFS_MOUNT) && own != std::fs::read_link(parent).ok() {
        bail!(
            "{BPFFS_MOUNT} here is not the host's bpffs (this process has a mount namespace of \
             its own, as `ip netns exec` makes), so the data path's pins would be lost: run xlb \
             with `nsenter --net=/run/netns/NS` instead"
        );
    }
    Ok(())
}

fn is_bpffs(path: &str) -> bool {
    let Ok(c) = CString::new(Path::new(path).as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

fn netns_inode(path: &str) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {path}"))?
        .ino())
}
