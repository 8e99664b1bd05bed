//! `xlb realserver setup|teardown|check`: prepares this host to be a real server of a DR or TUN
//! service, undoes exactly that, or reports what is missing. A half-prepared real server is the
//! most common DR/TUN failure, so `check` names each missing piece.
//!
//! Setup puts the VIP on `lo` and hides it from ARP (`arp_ignore=1`, `arp_announce=2` on `all`
//! and the interface, IPv4 only: Linux answers IPv6 neighbour solicitations only for addresses
//! of the receiving interface). TUN also relaxes strict reverse-path filtering to loose (the
//! client's packets arrive inside a tunnel) and attaches xlb's decapsulator to the interface
//! (this kernel, like many, has no ipip module). What setup changed is recorded in a state file,
//! keyed by network namespace, so teardown restores the previous values and removes only what
//! setup added.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, CacheInfo};
use serde::{Deserialize, Serialize};

mod decap;
mod metrics;

pub use decap::{DECAP_PROGRAM, Decapsulator};

use lb_common::{VIP_F_DR, VIP_F_GUE, VIP_F_REFUSE, VipValue};

use crate::{
    config::{Encap, Mode},
    netlink::Neighbours,
    state,
};

pub const DEFAULT_STATE: &str = "/var/lib/xlb/realserver.json";

pub struct Options {
    pub iface: String,
    pub vip: IpAddr,
    pub mode: Mode,
    pub state: PathBuf,
    /// Attach the refusal (the default): SYNs and datagrams for a VIP port with no socket go
    /// back to the director, which re-schedules them, instead of RST / port unreachable.
    pub refuse: bool,
    /// The address DR refusals come from (default: the interface's first address of the VIP's
    /// family). The director recognises a DR refusal by the real's MAC, not by this address.
    pub real_addr: Option<IpAddr>,
    /// TUN: what the director wraps packets in (GUE also needs the decapsulator's port).
    pub encap: Encap,
    /// GUE: its UDP port (None: `DEFAULT_GUE_PORT`).
    pub gue_port: Option<u16>,
}

impl Options {
    /// The GUE port this VIP's packets arrive on (0: not GUE).
    fn gue_port(&self) -> u16 {
        match self.encap {
            Encap::Gue => self.gue_port.unwrap_or(lb_common::DEFAULT_GUE_PORT),
            Encap::Ipip => 0,
        }
    }

    /// What `check` reports the director must send.
    fn encap_name(&self) -> String {
        match self.encap {
            Encap::Gue => format!("GUE on UDP port {}", self.gue_port()),
            Encap::Ipip => "IP-in-IP (IPIP, IP6IP6 or 4in6)".to_string(),
        }
    }
}

/// What one setup changed, so teardown can undo exactly that.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// The network namespace (`/proc/self/ns/net` link text): one state file serves a host
    /// whose namespaces are each a real server (labs).
    netns: String,
    iface: String,
    vip: IpAddr,
    mode: Mode,
    /// Whether setup added the VIP to `lo` (it may have been there already).
    added_vip: bool,
    /// Sysctls setup changed, with the values they had before.
    sysctls: Vec<SysctlChange>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct SysctlChange {
    key: String,
    previous: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    records: Vec<Record>,
}

impl Records {
    /// The record of this VIP on this interface in namespace `netns`.
    fn find(&self, netns: &str, opts: &Options) -> Option<usize> {
        self.records
            .iter()
            .position(|r| r.netns == netns && r.iface == opts.iface && r.vip == opts.vip)
    }
}

fn netns_id() -> Result<String> {
    Ok(std::fs::read_link("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .to_string_lossy()
        .into_owned())
}

fn load(path: &Path) -> Result<Records> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid realserver state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Records::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn read_sysctl(key: &str) -> Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key))
        .with_context(|| format!("reading sysctl {key}"))?
        .trim()
        .to_string())
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    std::fs::write(sysctl_path(key), value).with_context(|| format!("setting {key}={value}"))
}

fn read_sysctl_num(key: &str) -> Result<u32> {
    let text = read_sysctl(key)?;
    text.parse()
        .with_context(|| format!("sysctl {key} is not a number: {text}"))
}

/// A per-interface IPv4 sysctl the real server needs. The kernel applies the larger of the
/// `all` and the interface's value (for arp_ignore, arp_announce and rp_filter alike).
struct Knob {
    name: &'static str,
    /// Set where a scope's value is not `ok`.
    want: u32,
    ok: fn(u32) -> bool,
    /// What is wrong while the effective value is not `ok`.
    what: &'static str,
}

/// The sysctls a real server of this mode and VIP family needs.
fn knobs(vip: IpAddr, mode: Mode) -> Vec<Knob> {
    if vip.is_ipv6() {
        return Vec::new();
    }
    let mut v = vec![
        Knob {
            name: "arp_ignore",
            want: 1,
            ok: |n| n >= 1,
            what: "this host answers ARP for the VIP",
        },
        Knob {
            name: "arp_announce",
            want: 2,
            ok: |n| n >= 2,
            what: "this host may announce the VIP in its ARP requests",
        },
    ];
    if mode == Mode::Tun {
        v.push(Knob {
            name: "rp_filter",
            want: 2,
            ok: |n| n != 1,
            what: "strict reverse-path filtering drops tunnelled clients' packets",
        });
    }
    v
}

fn knob_key(scope: &str, name: &str) -> String {
    format!("net.ipv4.conf.{scope}.{name}")
}

/// The VIP's address entry on lo, if it is there.
async fn lo_address(nl: &Neighbours, lo: u32, vip: IpAddr) -> Result<Option<AddressMessage>> {
    let mut stream = nl
        .handle()
        .address()
        .get()
        .set_link_index_filter(lo)
        .execute();
    while let Some(msg) = stream.try_next().await.context("dumping lo's addresses")? {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(x) if *x == vip))
        {
            return Ok(Some(msg));
        }
    }
    Ok(None)
}

fn vip_prefix(vip: IpAddr) -> u8 {
    if vip.is_ipv4() { 32 } else { 128 }
}

/// What every verb starts from: netlink, the interfaces involved, this namespace's identity.
struct Host {
    nl: Neighbours,
    ifindex: u32,
    lo: u32,
    netns: String,
}

impl Host {
    async fn open(opts: &Options) -> Result<Host> {
        validate(opts)?;
        let nl = Neighbours::new()?;
        let ifindex = nl.interface(&opts.iface).await?.index;
        let lo = nl.interface_index("lo").await?;
        Ok(Host {
            nl,
            ifindex,
            lo,
            netns: netns_id()?,
        })
    }
}

pub async fn setup(opts: &Options) -> Result<()> {
    let Host {
        nl,
        ifindex,
        lo,
        netns,
    } = Host::open(opts).await?;
    let mut records = load(&opts.state)?;
    let existing = records.find(&netns, opts);
    if let Some(i) = existing
        && records.records[i].mode != opts.mode
    {
        bail!(
            "{} is already set up for {} mode on {}; tear it down first",
            opts.vip,
            mode_name(records.records[i].mode),
            opts.iface
        );
    }

    let mut record = Record {
        netns: netns.clone(),
        iface: opts.iface.clone(),
        vip: opts.vip,
        mode: opts.mode,
        added_vip: false,
        sysctls: Vec::new(),
    };
    // Decide every change before making any, so a failed sysctl read changes nothing.
    let mut changes = Vec::new();
    for knob in knobs(opts.vip, opts.mode) {
        for scope in ["all", opts.iface.as_str()] {
            let key = knob_key(scope, knob.name);
            let current = read_sysctl_num(&key)?;
            if !(knob.ok)(current) {
                changes.push((key, knob.want, current.to_string()));
            }
        }
    }
    for (key, want, previous) in changes {
        write_sysctl(&key, &want.to_string())?;
        record.sysctls.push(SysctlChange { key, previous });
    }
    if lo_address(&nl, lo, opts.vip).await?.is_none() {
        let mut add = nl
            .handle()
            .address()
            .add(lo, opts.vip, vip_prefix(opts.vip));
        if opts.vip.is_ipv6() {
            // No duplicate detection (every real holds the VIP), and deprecated (preferred
            // lifetime 0) so the host never picks the VIP as the source of its own traffic.
            let msg = add.message_mut();
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            let mut lifetimes = CacheInfo::default();
            lifetimes.ifa_preferred = 0;
            lifetimes.ifa_valid = u32::MAX;
            msg.attributes.push(AddressAttribute::CacheInfo(lifetimes));
        }
        add.execute()
            .await
            .with_context(|| format!("adding {} to lo", opts.vip))?;
        record.added_vip = true;
    }
    if opts.mode == Mode::Tun || opts.refuse {
        let value = vip_value(&nl, ifindex, opts).await?;
        decap::attach_vip(&nl, ifindex, &opts.iface, opts.vip, value, opts.gue_port()).await?;
    }
    match existing {
        // Set up again: keep what the first setup recorded, add what this one changed.
        Some(i) => {
            let r = &mut records.records[i];
            r.added_vip |= record.added_vip;
            r.sysctls.extend(record.sysctls);
        }
        None => records.records.push(record),
    }
    state::write_atomically(&opts.state, &serde_json::to_vec_pretty(&records)?)
}

pub async fn teardown(opts: &Options) -> Result<()> {
    let Host {
        nl,
        ifindex,
        lo,
        netns,
    } = Host::open(opts).await?;
    let mut records = load(&opts.state)?;
    let Some(i) = records.find(&netns, opts) else {
        bail!(
            "{} on {} was not set up by xlb realserver setup (no record in {})",
            opts.vip,
            opts.iface,
            opts.state.display()
        );
    };
    let record = records.records.remove(i);
    // DR attaches the program too (for refusals) unless --no-refuse: detach whatever is there.
    decap::detach_vip(&nl, ifindex, &opts.iface, opts.vip).await?;
    if record.added_vip
        && let Some(msg) = lo_address(&nl, lo, opts.vip).await?
    {
        nl.handle()
            .address()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing {} from lo", opts.vip))?;
    }
    // Another VIP set up in this namespace still needs the sysctls: it inherits the record of
    // their previous values instead of having them restored under it.
    match records.records.iter_mut().find(|r| r.netns == netns) {
        Some(other) => other.sysctls.extend(record.sysctls),
        None => {
            for change in record.sysctls.iter().rev() {
                write_sysctl(&change.key, &change.previous)?;
            }
        }
    }
    state::write_atomically(&opts.state, &serde_json::to_vec_pretty(&records)?)
}

/// What `check` found.
pub struct Check {
    /// What this host lacks to be a real server for the VIP in this mode: one line each.
    pub missing: Vec<String>,
    /// What is in place worth showing (the decapsulator's VIPs and counters).
    pub report: Vec<String>,
}

pub async fn check(opts: &Options) -> Result<Check> {
    let Host {
        nl, ifindex, lo, ..
    } = Host::open(opts).await?;
    let mut missing = Vec::new();
    let mut report = Vec::new();
    if lo_address(&nl, lo, opts.vip).await?.is_none() {
        missing.push(format!("the VIP {} is not on lo", opts.vip));
    }
    for knob in knobs(opts.vip, opts.mode) {
        let all = read_sysctl_num(&knob_key("all", knob.name))?;
        let on_iface = read_sysctl_num(&knob_key(&opts.iface, knob.name))?;
        if !(knob.ok)(all.max(on_iface)) {
            missing.push(format!(
                "{}: {} (all = {all}, {} = {on_iface}; want {})",
                knob.name, knob.what, opts.iface, knob.want
            ));
        }
    }
    if opts.mode == Mode::Tun || opts.refuse {
        match decap::attached(&nl, ifindex).await? {
            None if opts.mode == Mode::Tun => missing.push(format!(
                "no xlb decapsulator on {}: tunnelled packets are not decapsulated",
                opts.iface
            )),
            None => missing.push(format!(
                "no {DECAP_PROGRAM} program on {}: a SYN to a port without a listener is answered \
                 with RST instead of being re-scheduled by the director (or use --no-refuse)",
                opts.iface
            )),
            Some(d) => {
                match d.refusing.iter().find(|(v, _)| *v == opts.vip) {
                    Some((_, from)) => report.push(format!(
                        "{DECAP_PROGRAM} on {}: refuses for {} (DR refusals from {from})",
                        opts.iface, opts.vip
                    )),
                    None if opts.refuse => missing.push(format!(
                        "{DECAP_PROGRAM} on {} does not refuse for {}: set it up again (or use \
                         --no-refuse)",
                        opts.iface, opts.vip
                    )),
                    None => {}
                }
                if opts.mode == Mode::Tun && !d.vips.contains(&opts.vip) {
                    missing.push(format!(
                        "the decapsulator on {} does not accept {}",
                        opts.iface, opts.vip
                    ));
                }
                if opts.mode == Mode::Tun {
                    let gue = d.gue_vips.contains(&opts.vip);
                    if gue != (opts.encap == Encap::Gue) || (gue && d.gue_port != opts.gue_port()) {
                        missing.push(format!(
                            "the decapsulator on {} is not set up to expect {} for {}: set it up \
                             again with --encap",
                            opts.iface,
                            opts.encap_name(),
                            opts.vip
                        ));
                    } else {
                        report.push(format!(
                            "decapsulator on {}: expects {} for {}",
                            opts.iface,
                            opts.encap_name(),
                            opts.vip
                        ));
                    }
                }
                let counts: Vec<String> = d
                    .counters
                    .iter()
                    .map(|(c, n)| format!("{} {n}", c.name()))
                    .collect();
                report.push(format!(
                    "decapsulator on {}: VIPs {}; packets {}",
                    opts.iface,
                    d.vips
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    counts.join(", ")
                ));
            }
        }
    }
    Ok(Check { missing, report })
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Dr => "DR",
        Mode::Tun => "TUN",
        Mode::Nat => "NAT",
        Mode::Fullnat => "full-NAT",
    }
}

/// What the real-server program does for this VIP: refuse or not, from which address.
async fn vip_value(nl: &Neighbours, ifindex: u32, opts: &Options) -> Result<VipValue> {
    let mut value = VipValue::default();
    if opts.encap == Encap::Gue {
        value.flags |= VIP_F_GUE;
    }
    if !opts.refuse {
        return Ok(value);
    }
    value.flags |= VIP_F_REFUSE;
    if opts.mode == Mode::Dr {
        value.flags |= VIP_F_DR;
    }
    let real = match opts.real_addr {
        Some(a) => Some(a),
        None => {
            let (v4, v6) = nl.primary_addresses(ifindex).await?;
            match opts.vip {
                IpAddr::V4(_) => v4.map(IpAddr::V4),
                IpAddr::V6(_) => v6.map(IpAddr::V6),
            }
        }
    };
    match real {
        Some(a) => value.real_addr = decap::vip_key(a).addr,
        None if opts.mode == Mode::Dr => bail!(
            "{} has no {} address to send refusals from: give --real-addr (or --no-refuse)",
            opts.iface,
            if opts.vip.is_ipv4() { "IPv4" } else { "IPv6" }
        ),
        None => {}
    }
    Ok(value)
}

fn validate(opts: &Options) -> Result<()> {
    let v = opts.vip;
    if opts.mode.is_nat() {
        bail!(
            "a NAT real needs no setup (NAT: only its route back to clients through the \
             director; full NAT: nothing)"
        );
    }
    if opts.encap == Encap::Gue && opts.mode != Mode::Tun {
        bail!("--encap gue needs --mode tun");
    }
    if opts.gue_port.is_some() && opts.encap != Encap::Gue {
        bail!("--gue-port needs --encap gue");
    }
    if opts.gue_port == Some(0) {
        bail!("--gue-port 0 is not a port");
    }
    if v.is_unspecified() || v.is_multicast() || v.is_loopback() {
        bail!("{v} cannot be a VIP");
    }
    if opts.iface == "lo" {
        bail!("--iface is the interface clients' packets arrive on, not lo");
    }
    if let Some(a) = opts.real_addr {
        if a.is_ipv4() != v.is_ipv4() {
            bail!("--real-addr {a} is not of the VIP's family ({v})");
        }
        if a.is_unspecified() || a.is_multicast() || a.is_loopback() || a == v {
            bail!("--real-addr {a} cannot be the real's address");
        }
    }
    Ok(())
}

/// The decapsulator's counters on `iface` in the Prometheus text format (`xlb realserver
/// metrics`, for node_exporter's textfile collector: real servers run no daemon).
pub async fn metrics(iface: &str) -> Result<String> {
    let nl = Neighbours::new()?;
    let ifindex = nl.interface(iface).await?.index;
    let Some(d) = decap::attached(&nl, ifindex).await? else {
        anyhow::bail!("no xlb decapsulator on {iface}");
    };
    metrics::render_decap(iface, &d)
}
