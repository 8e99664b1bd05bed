//! `xlb daemon`: attaches the data path to one interface or several (one program, one set of
//! maps, one connection table for all), restores the saved configuration, keeps reals' links
//! (interface and MAC) current from the kernel's routes and neighbour table, and serves the
//! control API.

mod bgp;
pub mod checks;
pub mod metrics;
mod neighbours;
mod refusals;
mod server;
pub mod sync;
mod uplink;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{net::UnixListener, sync::Notify};

pub use bgp::{BgpOptions, DEFAULT_BIRD_SOCKET};

use self::{bgp::Announcer, checks::Checks, neighbours::NextHop};
use crate::{
    config::ServiceAddr,
    control::{Balancer, active_flows},
    dataplane::{AttachMode, Attachment, Dataplane, LoadOptions, PinDir, XdpModeChoice},
    netlink::Neighbours,
    state,
};

/// How often next hops and their MACs are re-read from the kernel...
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(1);
/// ...and how soon after a change, again, for a MAC the kernel had to resolve (ARP or ND on a
/// LAN answers within a few milliseconds).
const RESOLUTION_WAIT: Duration = Duration::from_millis(50);

pub struct DaemonOptions {
    /// The interfaces to attach to; the first names the pin directory.
    pub ifaces: Vec<String>,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub xdp_mode: XdpModeChoice,
    pub conn_capacity: u32,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where the data path is pinned (per interface below it).
    pub pin_root: PathBuf,
    /// Announce servable VIPs through BIRD, if set.
    pub bgp: Option<BgpOptions>,
    /// Log the data path's rare events (`CONFIG_F_DATAPATH_LOG`).
    pub datapath_log: bool,
    /// Refusals that take a checked real down (0: none).
    pub refusals_down: u32,
    /// Answer pings to VIPs from the data path (`CONFIG_F_VIP_ECHO`).
    pub vip_echo: bool,
    /// Connection sync with peer directors (`--sync-peer`), if any.
    pub sync: Option<sync::SyncOptions>,
}

/// An interface the data path is attached to.
#[derive(Clone, Debug)]
struct Attached {
    name: String,
    index: u32,
    /// `native` or `generic`; empty until attached.
    mode: &'static str,
}

struct Shared {
    balancer: Balancer,
    ifaces: Vec<Attached>,
    state: PathBuf,
    /// Each real's next hop as last looked up (shown by `status`).
    next_hops: HashMap<IpAddr, NextHop>,
    checks: Checks,
    /// Keeps BIRD announcing the VIPs that have a real in their table (`--bgp-config`).
    bgp: Option<Announcer>,
    /// Draining reals whose last flow has ended (logged once; forgotten when enabled).
    drained: HashSet<(ServiceAddr, IpAddr)>,
    /// Wakes the neighbour refresh after a change: a new real's MAC is often known already,
    /// and it should not wait for the next tick.
    resolve_now: Arc<Notify>,
    /// Connection sync's counters, while it is on.
    sync: Option<Arc<sync::SyncStats>>,
}

impl Shared {
    /// An attached interface's name, by index.
    fn iface_name(&self, ifindex: u32) -> Option<&str> {
        self.ifaces
            .iter()
            .find(|i| i.index == ifindex)
            .map(|i| i.name.as_str())
    }

    /// Called after anything that may change which reals are in a Maglev table.
    fn announce(&self) {
        if let Some(bgp) = &self.bgp {
            bgp.update(&self.balancer);
        }
    }
}

/// How often the NAT reply table's timeouts are applied.
const NAT_EXPIRY_EVERY_S: u64 = 5;

pub async fn run(opts: DaemonOptions) -> Result<()> {
    let config = state::load(&opts.state)?;
    if std::os::unix::net::UnixStream::connect(&opts.socket).is_ok() {
        bail!(
            "another xlb daemon is already serving {}",
            opts.socket.display()
        );
    }
    let metrics_listener = match opts.metrics {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    // Bound before anything is attached, as the metrics address: a bad one changes nothing.
    let sync_socket = match &opts.sync {
        Some(o) => Some(sync::bind(o.listen)?),
        None => None,
    };
    let neighbours = Neighbours::new()?;
    let mut ifaces = Vec::new();
    let mut plans = Vec::new();
    for (i, name) in opts.ifaces.iter().enumerate() {
        if opts.ifaces[..i].contains(name) {
            bail!("interface {name} is given twice");
        }
        ifaces.push(neighbours.interface(name).await?);
        plans.push(uplink::plan(
            name,
            &neighbours.link_kind(name).await?,
            opts.xdp_mode,
        )?);
    }
    let Some(primary) = ifaces.first().copied() else {
        bail!("no interface to attach to (--iface)");
    };
    let pins = PinDir::for_iface(&opts.pin_root, &opts.ifaces[0], primary.index)?;
    let mut dp = Dataplane::load(&LoadOptions {
        conn_capacity: opts.conn_capacity,
        pins: Some(pins.clone()),
    })?;
    let adopting = dp.adopting();
    let inherited = dp.inherited()?;
    if adopting {
        tracing::info!(
            pins = %pins.path.display(),
            services = inherited.services.len(),
            reals = inherited.backends.len(),
            "adopting the pinned data path"
        );
    }
    let datapath_logger = match opts.datapath_log {
        true => Some(on_readable(
            dp.start_datapath_log()?,
            "the data path's log buffer",
            |logger| logger.flush(),
        )?),
        false => None,
    };
    let refusal_events = dp.take_refusals()?;
    let sync_events = dp.take_sync_events()?;
    let mut balancer = Balancer::new(dp);
    balancer.inherit(inherited);
    balancer.set_datapath_log(opts.datapath_log)?;
    balancer.set_sync(opts.sync.is_some())?;
    balancer.set_vip_echo(opts.vip_echo)?;
    // A bond's members carry its MAC: frames arrive on them when the bond runs XDP natively.
    let macs: Vec<_> = ifaces
        .iter()
        .zip(&plans)
        .flat_map(|(i, plan)| {
            std::iter::once(i.index)
                .chain(plan.members.iter().copied())
                .map(|index| (index, i.mac))
        })
        .collect();
    balancer.set_interfaces(&macs)?;
    // The smallest: the real, and so the egress interface, is chosen after the check. No IP
    // packet exceeds 65535 bytes, so a larger MTU (lo's 65536) checks nothing more.
    let mtu = ifaces.iter().map(|i| i.mtu).min().unwrap_or(0);
    balancer.set_mtu(mtu.min(65535))?;
    // The first interface's addresses, else the next one's: what LVS-TUN uses.
    let (mut v4, mut v6) = (None, None);
    for i in &ifaces {
        let (a4, a6) = neighbours.primary_addresses(i.index).await?;
        v4 = v4.or(a4);
        v6 = v6.or(a6);
    }
    balancer.set_default_tunnel_sources(v4, v6);
    balancer
        .replace(&config)
        .context("restoring the state file's configuration")?;
    balancer.finish_inheriting()?;
    tracing::info!(
        services = config.services.len(),
        state = %opts.state.display(),
        "configuration restored"
    );
    let (mut checks, mut reports) = Checks::new(opts.refusals_down);
    checks.reconcile(&balancer);
    let bgp = match opts.bgp {
        Some(bgp) => Some(Announcer::start(bgp, &balancer).context("starting BGP announcements")?),
        None => None,
    };
    let resolve_now = Arc::new(Notify::new());
    let shared = Arc::new(Mutex::new(Shared {
        balancer,
        ifaces: opts
            .ifaces
            .iter()
            .zip(&ifaces)
            .map(|(name, i)| Attached {
                name: name.clone(),
                index: i.index,
                mode: "",
            })
            .collect(),
        state: opts.state.clone(),
        next_hops: HashMap::new(),
        checks,
        bgp,
        drained: Default::default(),
        resolve_now: resolve_now.clone(),
        sync: None,
    }));
    // Links before attaching, so a new program's first packets find reals they may forward to.
    neighbours::refresh(&shared, &neighbours).await;
    pins.drop_unlisted_links(&opts.ifaces)?;
    for (i, name) in opts.ifaces.iter().enumerate() {
        let ifindex = ifaces[i].index;
        if let Some(note) = &plans[i].note {
            tracing::info!(iface = %name, "{note}");
        }
        let attachment = {
            let mut guard = shared.lock().unwrap();
            guard
                .balancer
                .dataplane()
                .attach(name, ifindex, plans[i].mode)?
        };
        let mode = match attachment {
            Attachment::New(mode) => {
                tracing::info!(iface = %name, mode = mode.as_str(), pins = %pins.path.display(), "XDP program attached");
                mode
            }
            Attachment::Adopted => {
                let generic = neighbours
                    .xdp_program(ifindex)
                    .await?
                    .is_some_and(|(_, generic)| generic);
                let mode = if generic {
                    AttachMode::Generic
                } else {
                    AttachMode::Native
                };
                tracing::info!(iface = %name, mode = mode.as_str(), "pinned XDP link adopted; program replaced atomically");
                mode
            }
        };
        shared.lock().unwrap().ifaces[i].mode = mode.as_str();
    }
    let adapter = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut seconds = 0u64;
            loop {
                tick.tick().await;
                seconds += 1;
                let mut guard = shared.lock().unwrap();
                let Shared {
                    checks, balancer, ..
                } = &mut *guard;
                checks.adapt_weights(balancer);
                // Every few seconds: timeouts are seconds to minutes long.
                if seconds.is_multiple_of(NAT_EXPIRY_EVERY_S)
                    && let Err(e) = crate::control::expire_nat_replies(balancer)
                {
                    tracing::warn!("expiring NAT reply entries: {e:#}");
                }
                guard.announce();
                if let Err(e) = watch_drains(&mut guard) {
                    tracing::warn!("counting the flows of draining reals: {e:#}");
                }
            }
        })
    };
    let checker = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(report) = reports.recv().await {
                let mut guard = shared.lock().unwrap();
                let Shared {
                    checks, balancer, ..
                } = &mut *guard;
                checks.apply(balancer, report);
                guard.announce();
            }
        })
    };
    let refusals = refusals::watch(refusal_events, shared.clone())?;
    let mut sync_tasks = Vec::new();
    if let (Some(o), Some(socket)) = (&opts.sync, sync_socket) {
        let stats = Arc::new(sync::SyncStats::default());
        shared.lock().unwrap().sync = Some(stats.clone());
        let sender = Arc::new(Mutex::new(sync::Sender::new(
            socket.try_clone()?,
            o,
            stats.clone(),
        )?));
        let receiver = sync::Receiver::new(o, stats);
        sync_tasks.push(sync::watch_events(
            sync_events,
            shared.clone(),
            sender.clone(),
        )?);
        sync_tasks.push(sync::send_loop(shared.clone(), sender));
        sync_tasks.push(sync::receive_loop(socket, shared.clone(), receiver)?);
        tracing::info!(
            listen = %o.listen,
            peers = ?o.peers,
            "connection sync on"
        );
    }
    let listener = bind_socket(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), "control API listening");
    let resolver = {
        let shared = shared.clone();
        let resolve_now = resolve_now.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(NEIGHBOUR_REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = resolve_now.notified() => {
                        // Once more soon after, for a next hop the kernel had to ask for.
                        tick.reset_after(RESOLUTION_WAIT);
                    }
                }
                neighbours::refresh(&shared, &neighbours).await;
            }
        })
    };
    let metrics_server = metrics_listener.map(|listener| {
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
        let shared = shared.clone();
        let page = Mutex::new(crate::metrics::Page::default());
        let render = Arc::new(move || {
            let mut guard = shared.lock().unwrap();
            let Shared {
                balancer,
                ifaces,
                checks,
                sync,
                ..
            } = &mut *guard;
            let flows = active_flows(balancer)?;
            let attached: Vec<(&str, u32, &str)> = ifaces
                .iter()
                .map(|i| (i.name.as_str(), i.index, i.mode))
                .collect();
            let scrape = metrics::Scrape {
                ifaces: &attached,
                flows: &flows,
                checks,
                sync: sync.as_deref(),
            };
            metrics::render(&mut page.lock().unwrap(), balancer, &scrape)
        });
        tokio::spawn(metrics::serve(listener, render))
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = server::serve(stream, shared).await {
                        tracing::debug!("control connection: {e:#}");
                    }
                });
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    resolver.abort();
    refusals.abort();
    for task in sync_tasks {
        task.abort();
    }
    checker.abort();
    adapter.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    if let Some(logger) = datapath_logger {
        logger.abort();
    }
    // Withdrawn on a clean stop even where the data path outlives the daemon: an operator
    // stopping a director on purpose wants its traffic on the others.
    let bgp = shared.lock().unwrap().bgp.take();
    if let Some(bgp) = bgp {
        bgp.withdraw_all().await;
    }
    let _ = std::fs::remove_file(&opts.socket);
    tracing::info!(
        pins = %pins.path.display(),
        "stopping; the data path keeps forwarding (`xlb detach --iface {}` removes it)",
        opts.ifaces[0]
    );
    Ok(())
}

/// Logs "drain finished" once for each draining real that has no active flow left. Walks the
/// connection table only while such a real is waiting.
fn watch_drains(s: &mut Shared) -> Result<()> {
    let mut waiting = Vec::new();
    let mut draining = HashSet::new();
    for svc in s.balancer.config().services {
        for r in s.balancer.real_status(&svc.service) {
            if r.draining {
                draining.insert((svc.service, r.addr));
                if !s.drained.contains(&(svc.service, r.addr)) {
                    waiting.push((svc.service, r.addr, r.backend_id));
                }
            }
        }
    }
    s.drained.retain(|k| draining.contains(k));
    if waiting.is_empty() {
        return Ok(());
    }
    let flows = active_flows(&mut s.balancer)?;
    for (service, real, id) in waiting {
        if !flows.active.contains_key(&id) {
            tracing::info!(%service, %real, "drain finished: no active flows left");
            s.drained.insert((service, real));
        }
    }
    Ok(())
}

/// Runs `drain` on `source` (a ring buffer's reader) in a task of its own, each time its fd
/// becomes readable: the data path's log records and its refusal events arrive this way.
/// `what` names the buffer in the error.
fn on_readable<T>(
    source: T,
    what: &str,
    mut drain: impl FnMut(&mut T) + Send + 'static,
) -> Result<tokio::task::JoinHandle<()>>
where
    T: std::os::fd::AsRawFd + Send + 'static,
{
    // SAFETY: `source` owns its fd, which stays open and the same until the AsyncFd (which
    // owns `source`) is dropped.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(source, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching {what}: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            drain(guard.get_inner_mut());
            guard.clear_ready();
        }
    }))
}

fn bind_socket(path: &PathBuf) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Nobody answered on it (checked at start): a leftover of a daemon that died.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
