//! `xlb daemon`: attaches the data path to an interface, restores the saved configuration,
//! keeps reals' MACs current from the kernel's neighbour table, and serves the control API.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{
    api::{MAX_REQUEST_BYTES, Request, Response, decode_request},
    balancer::Balancer,
    bgp::{Announcer, BgpOptions},
    checks::Checks,
    config::{Config, Mode, ServiceAddr},
    dataplane::{AttachMode, Attachment, DatapathLogger, Dataplane, LoadOptions, XdpModeChoice},
    metrics,
    neighbour::{Neighbours, trigger_resolution},
    pins::PinDir,
    state,
};

/// A flow counts as active while it has sent a packet within this many seconds...
pub const ACTIVE_FLOW_IDLE_S: u32 = 60;
/// ...or, once its client sent a FIN or RST, within this many (a half-closed connection that
/// still receives data keeps ACKing, so it stays active).
pub const CLOSING_FLOW_IDLE_S: u32 = 2;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DaemonOptions {
    pub iface: String,
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
}

struct Shared {
    balancer: Balancer,
    iface: String,
    attach_mode: &'static str,
    state: PathBuf,
    /// Each real's next hop as last looked up (shown by `status`).
    next_hops: HashMap<IpAddr, NextHop>,
    checks: Checks,
    /// Keeps BIRD announcing the VIPs that have a real in their table (`--bgp-config`).
    bgp: Option<Announcer>,
    /// Draining reals whose last flow has ended (logged once; forgotten when enabled).
    drained: std::collections::HashSet<(ServiceAddr, IpAddr)>,
}

impl Shared {
    /// Called after anything that may change which reals are in a Maglev table.
    fn announce(&self) {
        if let Some(bgp) = &self.bgp {
            bgp.update(&self.balancer);
        }
    }
}

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
    let neighbours = Neighbours::new()?;
    let iface = neighbours.interface(&opts.iface).await?;
    let ifindex = iface.index;
    let pins = PinDir::for_iface(&opts.pin_root, &opts.iface, ifindex)?;
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
        true => Some(datapath_log_task(dp.start_datapath_log()?)?),
        false => None,
    };
    let mut balancer = Balancer::new(dp);
    balancer.inherit(inherited);
    balancer.set_datapath_log(opts.datapath_log)?;
    balancer.set_iface_mac(iface.mac)?;
    // No IP packet exceeds 65535 bytes, so a larger MTU (lo's 65536) checks nothing more.
    balancer.set_mtu(iface.mtu.min(65535))?;
    let (v4, v6) = neighbours.primary_addresses(ifindex).await?;
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
    let (mut checks, mut reports) = Checks::new();
    checks.reconcile(&balancer);
    let bgp = match opts.bgp {
        Some(bgp) => Some(Announcer::start(bgp, &balancer).context("starting BGP announcements")?),
        None => None,
    };
    let shared = Arc::new(Mutex::new(Shared {
        balancer,
        iface: opts.iface.clone(),
        attach_mode: "",
        state: opts.state.clone(),
        next_hops: HashMap::new(),
        checks,
        bgp,
        drained: Default::default(),
    }));
    // MACs before attaching, so a new program's first packets find reals they may forward to.
    refresh_neighbours(&shared, &neighbours, ifindex).await;
    let attachment = {
        let mut guard = shared.lock().unwrap();
        guard
            .balancer
            .dataplane()
            .attach(&opts.iface, opts.xdp_mode)?
    };
    let mode = match attachment {
        Attachment::New(mode) => {
            tracing::info!(iface = %opts.iface, mode = mode.as_str(), pins = %pins.path.display(), "XDP program attached");
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
            tracing::info!(iface = %opts.iface, mode = mode.as_str(), "pinned XDP link adopted; program replaced atomically");
            mode
        }
    };
    shared.lock().unwrap().attach_mode = mode.as_str();
    let adapter = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let mut guard = shared.lock().unwrap();
                let Shared {
                    checks, balancer, ..
                } = &mut *guard;
                checks.adapt_weights(balancer);
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
    let listener = bind_socket(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), "control API listening");
    let resolver = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                refresh_neighbours(&shared, &neighbours, ifindex).await;
            }
        })
    };
    let metrics_server = metrics_listener.map(|listener| {
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics listening");
        let shared = shared.clone();
        let render = Arc::new(move || {
            let mut guard = shared.lock().unwrap();
            let Shared {
                balancer,
                iface,
                attach_mode,
                checks,
                ..
            } = &mut *guard;
            let flows = active_flows(balancer)?;
            let scrape = metrics::Scrape {
                iface,
                attach_mode,
                flows: &flows,
                checks,
            };
            metrics::render(balancer, &scrape)
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
                    if let Err(e) = serve(stream, shared).await {
                        tracing::debug!("control connection: {e:#}");
                    }
                });
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    resolver.abort();
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
        opts.iface
    );
    Ok(())
}

/// Logs "drain finished" once for each draining real that has no active flow left. Walks the
/// connection table only while such a real is waiting.
fn watch_drains(s: &mut Shared) -> Result<()> {
    let mut waiting = Vec::new();
    let mut draining = std::collections::HashSet::new();
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

/// Forwards the data path's log records to `tracing` as they arrive.
fn datapath_log_task(logger: DatapathLogger) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the logger owns the ring buffer's fd, which stays open and the same until the
    // AsyncFd (which owns the logger) is dropped.
    let mut logger = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the data path's log buffer: {e}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
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

/// Finds each real's next hop (TUN: the kernel's route to it; DR: the real itself, which must
/// be on-link), reads the neighbour table, and reprograms reals whose MAC appeared, changed or
/// went. A next hop that leaves by another interface is unusable: xlb sends out of its own.
async fn refresh_neighbours(shared: &Arc<Mutex<Shared>>, neighbours: &Neighbours, ifindex: u32) {
    let table = match neighbours.resolved(ifindex).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("reading the neighbour table: {e:#}");
            return;
        }
    };
    let reals = shared.lock().unwrap().balancer.reals_by_mode();
    // Route lookups are netlink round trips: done without holding the lock.
    let mut hops = HashMap::new();
    for (addr, mode) in reals {
        let hop = match mode {
            Mode::Dr => NextHop::Via(addr),
            Mode::Tun => match neighbours.next_hop(addr).await {
                Ok(Some((hop, oif))) if oif == ifindex => NextHop::Via(hop),
                Ok(Some(_)) => NextHop::OtherInterface,
                Ok(None) | Err(_) => NextHop::NoRoute,
            },
        };
        hops.insert(addr, hop);
    }
    let mut guard = shared.lock().unwrap();
    for (&addr, &hop) in &hops {
        if guard.next_hops.get(&addr) != Some(&hop) {
            match hop {
                NextHop::OtherInterface => tracing::warn!(
                    real = %addr,
                    "the route to this real leaves by another interface; not forwarding to it"
                ),
                NextHop::NoRoute => tracing::warn!(real = %addr, "no route to this real"),
                NextHop::Via(_) => {}
            }
        }
        let mac = match hop {
            NextHop::Via(h) => table.get(&h).copied(),
            _ => None,
        };
        match guard.balancer.set_mac(addr, mac) {
            Ok(true) => match mac {
                Some(m) => {
                    tracing::info!(real = %addr, next_hop = %hop, mac = %crate::balancer::format_mac(&m), "next hop resolved")
                }
                None => tracing::warn!(real = %addr, "next hop unresolved; not forwarding to it"),
            },
            Ok(false) => {}
            Err(e) => {
                tracing::error!(real = %addr, "reprogramming after a neighbour change: {e:#}")
            }
        }
        if mac.is_none() && matches!(hop, NextHop::Via(_)) {
            // Sending towards the real makes the kernel resolve whatever its next hop is.
            trigger_resolution(addr);
        }
    }
    guard.next_hops = hops;
    guard.announce();
}

/// How a real is reached, as last looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NextHop {
    Via(IpAddr),
    OtherInterface,
    NoRoute,
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Via(a) => write!(f, "{a}"),
            NextHop::OtherInterface => f.write_str("via another interface"),
            NextHop::NoRoute => f.write_str("no route"),
        }
    }
}

async fn serve(stream: UnixStream, shared: Arc<Mutex<Shared>>) -> Result<()> {
    let cred = stream.peer_cred()?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let (read, mut write) = stream.into_split();
    if cred.uid() != 0 && cred.uid() != me {
        let e = anyhow::anyhow!("permission denied: uid {} may not control xlb", cred.uid());
        write_response(&mut write, &Response::error(&e)).await?;
        return Ok(());
    }
    let mut reader = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let response = match read {
        Err(_) => Response::error(&anyhow::anyhow!(
            "no complete request within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(read) => {
            read?;
            match decode_request(&line) {
                Ok(req) => {
                    let what = request_name(&req);
                    let mut guard = shared.lock().unwrap();
                    match handle(&mut guard, req) {
                        Ok(data) => Response::ok(data),
                        Err(e) => {
                            tracing::warn!(request = what, "refused: {e:#}");
                            Response::error(&e)
                        }
                    }
                }
                Err(e) => Response::error(&e),
            }
        }
    };
    // One request per connection.
    write_response(&mut write, &response).await?;
    if !line.ends_with(b"\n") {
        // An oversized or unfinished request: its client may still be sending, and closing on
        // unread data would reset the connection, which can discard our answer before the
        // client reads it. Read on for a bounded while (a lingering close), then close.
        write.shutdown().await?;
        let mut rest = reader
            .into_inner()
            .into_inner()
            .take(MAX_REQUEST_BYTES as u64);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
    }
    Ok(())
}

async fn write_response(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> Result<()> {
    let mut out = serde_json::to_vec(response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// The request's name as on the wire, for the log.
fn request_name(req: &Request) -> &'static str {
    match req {
        Request::ServiceAdd { .. } => "service-add",
        Request::ServiceRemove { .. } => "service-remove",
        Request::ServiceList {} => "service-list",
        Request::RealAdd { .. } => "real-add",
        Request::RealRemove { .. } => "real-remove",
        Request::RealWeight { .. } => "real-weight",
        Request::RealList { .. } => "real-list",
        Request::RealDrain { .. } => "real-drain",
        Request::RealEnable { .. } => "real-enable",
        Request::Status {} => "status",
        Request::Stats {} => "stats",
        Request::Save {} => "save",
        Request::Restore { .. } => "restore",
    }
}

/// Applies one request. Mutations are validated before anything changes and saved after; a
/// change that cannot be saved (disk full, read-only) is rolled back, so the running
/// configuration always matches the state file: bad circumstances change nothing either.
fn handle(s: &mut Shared, req: Request) -> Result<serde_json::Value> {
    let before = match req {
        Request::ServiceList {}
        | Request::Save {}
        | Request::RealList { .. }
        | Request::Status {}
        | Request::Stats {} => None,
        _ => Some(s.balancer.config()),
    };
    let data = apply(s, req)?;
    let Some(before) = before else {
        return Ok(data);
    };
    s.checks.reconcile(&s.balancer);
    if let Err(e) = state::save(&s.state, &s.balancer.config()) {
        match s.balancer.replace(&before) {
            Ok(()) => tracing::warn!("change rolled back: {e:#}"),
            Err(back) => tracing::error!("rolling back a change that was not saved: {back:#}"),
        }
        s.checks.reconcile(&s.balancer);
        s.announce();
        return Err(e.context("change refused and rolled back"));
    }
    s.announce();
    Ok(data)
}

fn apply(s: &mut Shared, req: Request) -> Result<serde_json::Value> {
    let b = &mut s.balancer;
    match req {
        Request::ServiceAdd { config } => {
            b.add_service(config.clone())?;
            tracing::info!(service = %config.service, "service added");
        }
        Request::ServiceRemove { service } => {
            b.remove_service(&service)?;
            tracing::info!(%service, "service removed");
        }
        Request::RealAdd { service, real } => {
            let addr = real.addr;
            b.add_real(&service, real)?;
            trigger_resolution(addr);
            tracing::info!(%service, real = %addr, "real added");
        }
        Request::RealRemove { service, addr } => {
            b.remove_real(&service, addr)?;
            tracing::info!(%service, real = %addr, "real removed");
        }
        Request::RealWeight {
            service,
            addr,
            weight,
        } => {
            b.set_weight(&service, addr, weight)?;
            tracing::info!(%service, real = %addr, weight, "weight changed");
        }
        Request::RealDrain { service, addr } => {
            b.set_draining(&service, addr, true)?;
            tracing::info!(%service, real = %addr, "real draining");
        }
        Request::RealEnable { service, addr } => {
            b.set_draining(&service, addr, false)?;
            tracing::info!(%service, real = %addr, "real enabled");
        }
        Request::Restore { config } => {
            b.replace(&config)?;
            for addr in b.reals_by_mode().into_keys() {
                trigger_resolution(addr);
            }
            tracing::info!(services = config.services.len(), "configuration restored");
        }
        Request::ServiceList {} | Request::Save {} => {
            return Ok(serde_json::to_value(b.config())?);
        }
        Request::RealList { service } => {
            let config = b.config();
            let Some(svc) = config.services.iter().find(|c| c.service == service) else {
                bail!("service {service} does not exist");
            };
            return Ok(serde_json::to_value(&svc.reals)?);
        }
        Request::Status {} => return status(s),
        Request::Stats {} => return stats(s),
    }
    Ok(serde_json::Value::Null)
}

/// Monotonic coarse seconds: the clock the data path stamps flows with.
fn now_coarse_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u32
}

/// One walk of the connection table: flows per backend id that sent a packet recently (see
/// `ACTIVE_FLOW_IDLE_S`), and every entry.
#[derive(Default)]
pub struct Flows {
    pub active: HashMap<u32, u64>,
    pub entries: u64,
}

pub fn active_flows(b: &mut Balancer) -> Result<Flows> {
    let now = now_coarse_s();
    let mut flows = Flows::default();
    for (_, v) in b.dataplane().conns()? {
        flows.entries += 1;
        let idle_limit = if v.flags & lb_common::CONN_F_CLOSING != 0 {
            CLOSING_FLOW_IDLE_S
        } else {
            ACTIVE_FLOW_IDLE_S
        };
        if now.saturating_sub(v.last_seen_s) <= idle_limit {
            *flows.active.entry(u32::from(v.backend_id)).or_insert(0u64) += 1;
        }
    }
    Ok(flows)
}

fn status(s: &mut Shared) -> Result<serde_json::Value> {
    let config: Config = s.balancer.config();
    let flows = active_flows(&mut s.balancer)?;
    let services: Vec<serde_json::Value> = config
        .services
        .iter()
        .map(|svc| {
            let reals: Vec<serde_json::Value> = s
                .balancer
                .real_status(&svc.service)
                .into_iter()
                .map(|r| {
                    json!({
                        "addr": r.addr,
                        "weight": r.weight,
                        "effective_weight": r.effective_weight,
                        "mac": r.mac,
                        "next_hop": s.next_hops.get(&r.addr).map(|h| h.to_string()),
                        "state": r.state(),
                        "health": r.health,
                        "draining": r.draining,
                        "fallback": r.fallback,
                        "check": s.checks.last(&svc.service, r.addr),
                        "in_table": r.in_table,
                        "active_flows": flows.active.get(&r.backend_id).copied().unwrap_or(0),
                    })
                })
                .collect();
            json!({
                "service": svc.service,
                "mode": svc.mode,
                "hash": svc.hash,
                "ring_size": svc.ring_size,
                "weights": svc.weights,
                "reals": reals,
            })
        })
        .collect();
    Ok(json!({
        "iface": s.iface,
        "attach_mode": s.attach_mode,
        "services": services,
    }))
}

fn stats(s: &mut Shared) -> Result<serde_json::Value> {
    let config = s.balancer.config();
    let mut services = Vec::new();
    for svc in &config.services {
        let id = s.balancer.service_id(&svc.service).unwrap_or_default();
        let c = s.balancer.dataplane().service_counters(id)?;
        let mut reals = Vec::new();
        for r in &svc.reals {
            let Some(bid) = s.balancer.real_backend_id(&svc.service, r.addr) else {
                continue;
            };
            let rc = s.balancer.dataplane().backend_counters(bid)?;
            reals.push(json!({
                "addr": r.addr, "packets": rc.packets, "bytes": rc.bytes, "new_flows": rc.new_flows,
            }));
        }
        services.push(json!({
            "service": svc.service, "packets": c.packets, "bytes": c.bytes,
            "new_flows": c.new_flows, "reals": reals,
        }));
    }
    let mut global = serde_json::Map::new();
    for g in lb_common::Global::ALL {
        global.insert(
            g.name().into(),
            s.balancer.dataplane().global_counter(g)?.into(),
        );
    }
    Ok(json!({ "services": services, "global": global }))
}
