//! The `xlb` command line: `xlb daemon` runs the director; every other command talks to it.

mod output;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    api::{self, DEFAULT_SOCKET, Request, StatsReport, StatusReport},
    config::{
        Config, DEFAULT_WEIGHT, Encap, HashKind, Mode, OnDown, RealConfig, RealEndpoint,
        ServiceAddr, ServiceConfig, TunnelPrefix, Weights,
    },
    daemon::{self, DaemonOptions},
    dataplane::{self, Dataplane, LoadOptions, PinDir, XdpModeChoice},
    health::{CheckConfig, CheckKind},
    maglev, realserver, state,
};

#[derive(Parser)]
#[command(
    name = "xlb",
    version,
    about = "An XDP L4 load balancer (LVS-style DR and TUN)"
)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "XLB_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to an interface and serve the control API (foreground; logs to stderr).
    Daemon {
        /// An interface to attach the balancer to; repeat it for a two-arm director (clients
        /// on one network, reals on another): one data path and connection table for all, each
        /// real reached through the interface the kernel routes it through. The first names
        /// the pin directory (keep it first across restarts).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// The configuration, saved atomically after every change and restored at start.
        #[arg(long, default_value = state::DEFAULT_STATE)]
        state: PathBuf,
        /// How to attach the XDP program.
        #[arg(long, value_enum, default_value_t = XdpModeChoice::Auto)]
        xdp_mode: XdpModeChoice,
        /// Flows the connection table is sized for: one 64-byte bucket of 3 entries per flow,
        /// rounded up to a power of two (about 98 % of that many flows held at once; a new flow
        /// in a full bucket takes the entry seen least recently).
        #[arg(long, default_value_t = lb_common::DEFAULT_CONN_CAPACITY,
              value_parser = clap::value_parser!(u32).range(1..=lb_common::MAX_CONN_CAPACITY as i64))]
        conn_capacity: u32,
        /// Serve Prometheus metrics on ADDR:PORT (GET /metrics).
        #[arg(long, value_name = "ADDR:PORT")]
        metrics: Option<std::net::SocketAddr>,
        /// Pin the data path under DIR/<iface> (DIR/netns-<inode>/<iface> in another network
        /// namespace): it keeps forwarding when the daemon stops, and the next daemon adopts it.
        #[arg(long, value_name = "DIR", default_value = dataplane::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
        /// Keep this BIRD include file listing the VIPs this director can serve (static
        /// protocols xlb_vips4 and xlb_vips6) and reload BIRD when it changes.
        #[arg(long, value_name = "PATH")]
        bgp_config: Option<PathBuf>,
        /// BIRD's control socket, for the reloads (with --bgp-config).
        #[arg(long, value_name = "PATH", default_value = crate::daemon::DEFAULT_BIRD_SOCKET, requires = "bgp_config")]
        bird_socket: PathBuf,
        /// Log level (default: RUST_LOG's directives if set, else info).
        #[arg(long, value_enum, env = "XLB_LOG_LEVEL")]
        log_level: Option<LogLevel>,
        /// Log every packet the data path drops (no usable real, malformed, too big to tunnel),
        /// with its reason and addresses, at debug level under the target xlb_datapath.
        #[arg(long)]
        datapath_log: bool,
        /// Take a checked real down at once after this many refusals (a SYN or datagram its
        /// xlb_realserver program sent back: no socket on that port); its check brings it back
        /// after `rise` successes. 0: refusals are re-scheduled but take no real down.
        #[arg(long, value_name = "N", default_value_t = 1)]
        refusals_down: u32,
        /// Leave ICMP echo requests to VIPs to the kernel (which answers only for addresses it
        /// holds) instead of answering them from the data path.
        #[arg(long)]
        no_vip_echo: bool,
        /// Connection sync: send this director's new flows to the peer director at ADDR[:PORT]
        /// (port 8848 unless given) and install the flows it sends; repeat it for each peer.
        /// Needs --sync-key-file.
        #[arg(long = "sync-peer", value_name = "ADDR[:PORT]", value_parser = parse_sync_addr)]
        sync_peers: Vec<SocketAddr>,
        /// Connection sync: receive (and send) batches on ADDR[:PORT] (default: every address,
        /// port 8848); only datagrams from a --sync-peer address are looked at.
        #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_sync_addr)]
        sync_listen: Option<SocketAddr>,
        /// Connection sync: the key shared by the peers (at least 16 bytes; trailing
        /// whitespace ignored): every batch carries its HMAC-SHA256, and one without is refused.
        #[arg(long, value_name = "FILE")]
        sync_key_file: Option<PathBuf>,
    },
    /// Remove the data path a daemon left on an interface: detach the program, remove the
    /// pinned links and maps. Stop the daemon first. Runs locally, without the daemon.
    Detach {
        /// The daemon's first `--iface`: the program is detached from every interface it was
        /// attached to.
        #[arg(long)]
        iface: String,
        #[arg(long, value_name = "DIR", default_value = dataplane::DEFAULT_PIN_ROOT)]
        pin_root: PathBuf,
    },
    /// Print a shell completion script (e.g. `xlb completions bash > /etc/bash_completion.d/xlb`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Add, remove and list virtual services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove, reweight and list a service's real servers.
    #[command(subcommand)]
    Real(RealCmd),
    /// Services, reals, weights, MACs, states and active flows.
    Status,
    /// Packets, bytes and new flows per service and real.
    Stats {
        /// Per-second rates over one second instead of totals.
        #[arg(long)]
        rate: bool,
    },
    /// Print the whole configuration as JSON.
    Save,
    /// Replace the whole configuration from a JSON file (`-` for stdin), all or nothing.
    Restore { file: String },
    /// Prepare this host as a real server (VIP on lo, ARP and rp_filter sysctls, TUN
    /// decapsulator), undo that, or report what is missing. Runs locally, without the daemon.
    #[command(subcommand)]
    Realserver(RealserverCmd),
    /// Attach a program that passes every packet, until interrupted. A veth peer needs one
    /// for the director's XDP_TX frames to be delivered (labs).
    #[command(hide = true)]
    XdpPass {
        #[arg(long)]
        iface: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// The whole command line's definition (completions, the man pages of `cargo xtask man`).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Add a service: ADDR:PORT/PROTO, e.g. 198.18.0.100:80/tcp (port 0 = every port).
    Add {
        service: ServiceAddr,
        #[arg(long, value_enum, default_value_t = Mode::Dr)]
        mode: Mode,
        /// Maglev table size (a prime).
        #[arg(long, default_value_t = maglev::DEFAULT_SIZE)]
        ring_size: u32,
        #[arg(long, value_enum, default_value_t = HashKind::FiveTuple)]
        hash: HashKind,
        /// TUN: the outer source address (default: the director interface's own address).
        /// An IPv6 address with IPv6 reals makes an IPv4 service IPv4-in-IPv6 (4in6).
        #[arg(long, value_name = "ADDR")]
        tunnel_src: Option<IpAddr>,
        /// TUN: an outer source per flow from this prefix (1-16 host bits, e.g. 198.18.0.16/28),
        /// so IPIP receivers and routers that hash only addresses see distinct flows; the
        /// prefix must route to the director. The alternative to --encap gue.
        #[arg(long, value_name = "PREFIX", conflicts_with = "tunnel_src")]
        tunnel_src_prefix: Option<TunnelPrefix>,
        /// TUN: bare IP-in-IP, or GUE (IP in UDP, a source port per flow for NICs and ECMP).
        #[arg(long, value_enum, default_value_t = Encap::Ipip)]
        encap: Encap,
        /// GUE: the outer UDP destination port [default: 6080].
        #[arg(long, value_name = "PORT")]
        gue_port: Option<u16>,
        /// A real that fails its checks: its flows move to live reals, or stay (IPVS-like).
        #[arg(long, value_enum, default_value_t = OnDown::Move)]
        on_down: OnDown,
        /// Where new flows go while no real is up (a sorry server); default: dropped.
        #[arg(long, value_name = "REAL_IP")]
        fallback: Option<IpAddr>,
        /// adaptive: weights follow health-check latency (slower reals get fewer new flows).
        #[arg(long, value_enum, default_value_t = Weights::Static)]
        weights: Weights,
        /// Full NAT: the source addresses requests leave with (the director's own, dedicated).
        #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
        snat: Vec<IpAddr>,
        #[command(flatten)]
        check: Box<CheckArgs>,
    },
    Remove {
        service: ServiceAddr,
    },
    List,
}

/// Health-check options, on `service add` (for every real) and `real add` (this real only).
#[derive(clap::Args)]
struct CheckArgs {
    /// How reals are checked; without it they are never checked (always up).
    #[arg(long, value_enum)]
    check: Option<CheckKind>,
    /// Port to check (default: the service port).
    #[arg(long)]
    check_port: Option<u16>,
    /// http: the path to GET (default /).
    #[arg(long)]
    check_path: Option<String>,
    /// http: the status that means healthy (default 200).
    #[arg(long)]
    expect_status: Option<u16>,
    /// udp: the payload to send, hex.
    #[arg(long, value_name = "HEX")]
    check_send: Option<String>,
    /// udp: what the reply must start with, hex (default: any reply).
    #[arg(long, value_name = "HEX")]
    check_expect: Option<String>,
    /// exec: a shell command; exit 0 is healthy. $XLB_REAL, $XLB_REAL_PORT, $XLB_SERVICE set.
    #[arg(long, value_name = "CMD")]
    check_cmd: Option<String>,
    /// Time between checks (e.g. 1s, 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    interval: Option<Duration>,
    /// How long one check may take.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Consecutive successes that bring a down real back.
    #[arg(long)]
    rise: Option<u32>,
    /// Consecutive failures that take a real down.
    #[arg(long)]
    fall: Option<u32>,
}

impl CheckArgs {
    /// The check these options describe (validated with the service by the daemon).
    fn config(self) -> Result<Option<CheckConfig>> {
        let Some(kind) = self.check else {
            let any = self.check_port.is_some()
                || self.check_path.is_some()
                || self.expect_status.is_some()
                || self.check_send.is_some()
                || self.check_expect.is_some()
                || self.check_cmd.is_some()
                || self.interval.is_some()
                || self.timeout.is_some()
                || self.rise.is_some()
                || self.fall.is_some();
            if any {
                bail!("health-check options need --check tcp|http|udp|exec|none");
            }
            return Ok(None);
        };
        let mut c = CheckConfig::new(kind);
        c.port = self.check_port;
        c.path = self.check_path;
        c.expect_status = self.expect_status;
        c.send = self.check_send;
        c.expect = self.check_expect;
        c.cmd = self.check_cmd;
        if let Some(i) = self.interval {
            c.interval_ms = i.as_millis() as u64;
        }
        if let Some(t) = self.timeout {
            c.timeout_ms = t.as_millis() as u64;
        }
        if let Some(r) = self.rise {
            c.rise = r;
        }
        if let Some(f) = self.fall {
            c.fall = f;
        }
        Ok(Some(c))
    }
}

#[derive(clap::Args)]
struct RealserverArgs {
    /// The interface clients' (DR) or tunnelled (TUN) packets arrive on.
    #[arg(long)]
    iface: String,
    /// The service's virtual address.
    #[arg(long)]
    vip: IpAddr,
    #[arg(long, value_enum, default_value_t = Mode::Dr)]
    mode: Mode,
    /// Where setup records what it changed, for teardown.
    #[arg(long, default_value = realserver::DEFAULT_STATE)]
    state: PathBuf,
    /// Do not refuse: let the kernel answer a SYN to a port without a listener with RST (and
    /// a datagram with port unreachable) instead of sending it back to the director, which
    /// re-schedules it to another real. In DR mode no XDP program is attached then.
    #[arg(long)]
    no_refuse: bool,
    /// The real's address that DR refusals are sent from (IPIP / IP6IP6 to the VIP); default:
    /// the interface's first address of the VIP's family.
    #[arg(long)]
    real_addr: Option<IpAddr>,
    /// TUN: the encapsulation the director sends (its service's --encap).
    #[arg(long, value_enum, default_value_t = Encap::Ipip)]
    encap: Encap,
    /// GUE: the UDP port GUE packets arrive on (the service's --gue-port) [default: 6080].
    #[arg(long, value_name = "PORT")]
    gue_port: Option<u16>,
}

impl RealserverArgs {
    fn options(self) -> realserver::Options {
        realserver::Options {
            iface: self.iface,
            vip: self.vip,
            mode: self.mode,
            state: self.state,
            refuse: !self.no_refuse,
            real_addr: self.real_addr,
            encap: self.encap,
            gue_port: self.gue_port,
        }
    }
}

#[derive(Subcommand)]
enum RealserverCmd {
    /// Put the VIP on lo, hide it from ARP, for TUN relax rp_filter, and attach the real-server
    /// XDP program (TUN: the decapsulator; both modes: refusals of SYNs and datagrams for ports
    /// without a socket, unless --no-refuse). It stays attached after this command exits.
    Setup(RealserverArgs),
    /// Undo exactly what setup changed (previous sysctl values come back).
    Teardown(RealserverArgs),
    /// Report each missing piece; exit 1 if anything is missing.
    Check(RealserverArgs),
    /// Print the decapsulator's counters in the Prometheus text format (e.g. for
    /// node_exporter's textfile collector).
    Metrics {
        /// The interface the decapsulator is attached to.
        #[arg(long)]
        iface: String,
    },
}

#[derive(Subcommand)]
enum RealCmd {
    /// Add a real: ADDR, or ADDR:PORT in a NAT service (the port it serves the service on).
    Add {
        service: ServiceAddr,
        #[arg(value_name = "REAL")]
        real: RealEndpoint,
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
        #[command(flatten)]
        check: CheckArgs,
    },
    Remove {
        service: ServiceAddr,
        real: IpAddr,
    },
    Weight {
        service: ServiceAddr,
        real: IpAddr,
        weight: u32,
    },
    List {
        service: ServiceAddr,
    },
    /// No new flows for the real; its established flows go on until they end.
    Drain {
        service: ServiceAddr,
        real: IpAddr,
    },
    /// Give the real new flows again (undoes drain).
    Enable {
        service: ServiceAddr,
        real: IpAddr,
    },
    /// Wait until the real has no active flows (seen in the last 60 s, or 2 s after the
    /// client's FIN/RST); exit 1 on timeout.
    WaitDrained {
        service: ServiceAddr,
        real: IpAddr,
        /// e.g. 30s, 5m.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
        timeout: Duration,
    },
}

pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with success; usage errors are one line.
            if !e.use_stderr() {
                let _ = e.print();
                return std::process::ExitCode::SUCCESS;
            }
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("invalid command line");
            eprintln!("xlb: {}", first.trim_start_matches("error: "));
            return std::process::ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (journald keeps it under systemd). `--log-level` wins over RUST_LOG, which
/// wins over the default `info`; `--datapath-log` lets the data path's debug events through.
fn init_logging(level: Option<LogLevel>, datapath_log: bool) {
    use tracing_subscriber::EnvFilter;
    let base = match level {
        Some(l) => EnvFilter::new(format!("{},netlink_packet_route=error", l.name())),
        None => EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,netlink_packet_route=error")),
    };
    let filter = if datapath_log {
        base.add_directive(
            format!("{}=debug", crate::dataplane::DATAPATH_LOG_TARGET)
                .parse()
                .expect("a valid directive"),
        )
    } else {
        base
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

impl LogLevel {
    fn name(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let request = match cli.command {
        Command::Daemon {
            ifaces,
            state,
            xdp_mode,
            refusals_down,
            conn_capacity,
            metrics,
            pin_root,
            bgp_config,
            bird_socket,
            log_level,
            datapath_log,
            no_vip_echo,
            sync_peers,
            sync_listen,
            sync_key_file,
        } => {
            let sync = sync_options(sync_peers, sync_listen, sync_key_file.as_deref())?;
            init_logging(log_level, datapath_log);
            let rt = tokio::runtime::Runtime::new()?;
            return rt.block_on(daemon::run(DaemonOptions {
                ifaces,
                socket: cli.socket,
                state,
                xdp_mode,
                conn_capacity,
                metrics,
                pin_root,
                bgp: bgp_config.map(|include| crate::daemon::BgpOptions {
                    include,
                    bird_socket,
                }),
                datapath_log,
                refusals_down,
                vip_echo: !no_vip_echo,
                sync,
            }));
        }
        Command::Detach { iface, pin_root } => {
            let pins = PinDir::for_iface(&pin_root, &iface, 0)?;
            if !pins.path.exists()
                && let Some(dir) = pins.holding_extra(&iface)
            {
                bail!(
                    "{iface} is a further interface of the data path pinned in {}: detach its first interface (`xlb detach --iface {}`)",
                    dir.display(),
                    dir.file_name().unwrap_or_default().to_string_lossy()
                );
            }
            let removed = pins.remove_all()?;
            if removed == 0 {
                println!("nothing pinned for {iface} ({})", pins.path.display());
            } else {
                println!(
                    "detached xlb from {iface}: removed {removed} pins in {}",
                    pins.path.display()
                );
            }
            return Ok(());
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "xlb", &mut std::io::stdout());
            return Ok(());
        }
        Command::XdpPass { iface } => return xdp_pass(&iface),
        Command::Realserver(cmd) => return realserver_cmd(cmd),
        Command::Service(ServiceCmd::Add {
            service,
            mode,
            ring_size,
            hash,
            tunnel_src,
            tunnel_src_prefix,
            encap,
            gue_port,
            on_down,
            fallback,
            weights,
            snat,
            check,
        }) => Request::ServiceAdd {
            config: ServiceConfig {
                mode,
                ring_size,
                hash,
                tunnel_src,
                tunnel_src_prefix,
                encap,
                gue_port,
                on_down,
                fallback,
                weights,
                snat,
                check: check.config()?,
                ..ServiceConfig::new(service)
            },
        },
        Command::Service(ServiceCmd::Remove { service }) => Request::ServiceRemove { service },
        Command::Service(ServiceCmd::List) => Request::ServiceList {},
        Command::Real(RealCmd::Add {
            service,
            real,
            weight,
            check,
        }) => Request::RealAdd {
            service,
            real: RealConfig {
                port: real.port,
                check: check.config()?,
                ..RealConfig::new(real.addr, weight)
            },
        },
        Command::Real(RealCmd::Remove { service, real }) => Request::RealRemove {
            service,
            addr: real,
        },
        Command::Real(RealCmd::Weight {
            service,
            real,
            weight,
        }) => Request::RealWeight {
            service,
            addr: real,
            weight,
        },
        Command::Real(RealCmd::List { service }) => Request::RealList { service },
        Command::Real(RealCmd::Drain { service, real }) => Request::RealDrain {
            service,
            addr: real,
        },
        Command::Real(RealCmd::Enable { service, real }) => Request::RealEnable {
            service,
            addr: real,
        },
        Command::Real(RealCmd::WaitDrained {
            service,
            real,
            timeout,
        }) => return wait_drained(&cli.socket, &service, real, timeout),
        Command::Status => Request::Status {},
        Command::Stats { rate } => {
            return stats(&cli.socket, cli.json, rate);
        }
        Command::Save => Request::Save {},
        Command::Restore { file } => {
            let text = if file == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let config: Config = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{file} is not a valid configuration: {e}"))?;
            config.validate()?;
            Request::Restore { config }
        }
    };
    match request {
        Request::Status {} => output::status(&api::ask(&cli.socket, &request)?, cli.json),
        Request::ServiceList {} => output::services(&api::ask(&cli.socket, &request)?, cli.json),
        Request::RealList { .. } => output::reals(
            &api::ask::<Vec<RealConfig>>(&cli.socket, &request)?,
            cli.json,
        ),
        Request::Save {} => output::json(&api::ask::<Config>(&cli.socket, &request)?),
        // Changes answer nothing but their success.
        _ => api::ask::<()>(&cli.socket, &request),
    }
}

/// `stats`, or with `rate` what was counted over the next second.
fn stats(socket: &Path, json: bool, rate: bool) -> Result<()> {
    let mut report: StatsReport = api::ask(socket, &Request::Stats {})?;
    if rate {
        std::thread::sleep(Duration::from_secs(1));
        let later: StatsReport = api::ask(socket, &Request::Stats {})?;
        report = later.since(&report);
    }
    output::stats(&report, json, rate)
}

/// Polls the daemon until the real has no active flows left.
fn wait_drained(
    socket: &Path,
    service: &ServiceAddr,
    real: IpAddr,
    timeout: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let status: StatusReport = api::ask(socket, &Request::Status {})?;
        let svc = status
            .services
            .iter()
            .find(|s| s.service == *service)
            .with_context(|| format!("service {service} does not exist"))?;
        let r = svc
            .reals
            .iter()
            .find(|r| r.addr == real)
            .with_context(|| format!("real {real} is not in service {service}"))?;
        if r.active_flows == 0 {
            println!("{real} has no active flows in {service}");
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!(
                "{real} still has {} active flows in {service} after {}",
                r.active_flows,
                humantime::format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn realserver_cmd(cmd: RealserverCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            RealserverCmd::Setup(args) => {
                let opts = args.options();
                realserver::setup(&opts).await?;
                println!(
                    "{} ready as a {} real server on {}",
                    opts.vip,
                    realserver::mode_name(opts.mode),
                    opts.iface
                );
            }
            RealserverCmd::Teardown(args) => {
                let opts = args.options();
                realserver::teardown(&opts).await?;
                println!("{} no longer set up on {}", opts.vip, opts.iface);
            }
            RealserverCmd::Metrics { iface } => {
                print!("{}", realserver::metrics(&iface).await?);
            }
            RealserverCmd::Check(args) => {
                let opts = args.options();
                let check = realserver::check(&opts).await?;
                for line in &check.report {
                    println!("{line}");
                }
                let missing = check.missing;
                if !missing.is_empty() {
                    for m in &missing {
                        println!("missing: {m}");
                    }
                    bail!(
                        "{} is not ready as a {} real server on {}: {} missing",
                        opts.vip,
                        realserver::mode_name(opts.mode),
                        opts.iface,
                        missing.len()
                    );
                }
                println!(
                    "{} ready as a {} real server on {}",
                    opts.vip,
                    realserver::mode_name(opts.mode),
                    opts.iface
                );
            }
        }
        anyhow::Ok(())
    })
}

fn xdp_pass(iface: &str) -> Result<()> {
    let mut dp = Dataplane::load(&LoadOptions {
        conn_capacity: 1024,
        ..LoadOptions::default()
    })?;
    dp.attach_pass(iface)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })
}

/// `ADDR[:PORT]` (an IPv6 address with a port in brackets), port `DEFAULT_SYNC_PORT` if none.
fn parse_sync_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, crate::sync::DEFAULT_SYNC_PORT))
        })
        .map_err(|_| format!("{s:?} is not an address, with or without a port"))
}

/// Connection sync's options, checked: peers need the key (a stranger must not be able to
/// write flows into the connection table), and the default listen address is of the peers'
/// family.
fn sync_options(
    peers: Vec<SocketAddr>,
    listen: Option<SocketAddr>,
    key_file: Option<&Path>,
) -> Result<Option<crate::daemon::sync::SyncOptions>> {
    if peers.is_empty() {
        if listen.is_some() || key_file.is_some() {
            bail!("--sync-listen and --sync-key-file need --sync-peer");
        }
        return Ok(None);
    }
    let Some(key_file) = key_file else {
        bail!(
            "--sync-peer needs --sync-key-file: sync batches are authenticated with a shared key"
        );
    };
    let key = crate::sync::load_key(key_file)?;
    let any: IpAddr = if peers.iter().all(|p| p.is_ipv4()) {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    Ok(Some(crate::daemon::sync::SyncOptions {
        peers,
        listen: listen.unwrap_or(SocketAddr::new(any, crate::sync::DEFAULT_SYNC_PORT)),
        key,
    }))
}
