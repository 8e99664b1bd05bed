//! `cargo xtask experiment LAB NAME` (what `scripts/lab LAB experiment NAME` runs): a scripted
//! scenario in one of the labs under a bounded client load, with its events at fixed times.
//! It writes to one directory `events.csv` (one row per request and per event),
//! `timeline.png` (experiment_chart.rs) and `summary.txt` (the figures that matter, computed
//! from the rows as they are written, so the CSV can check them).
//!
//! The load is the labs' own: `scripts/lab-churn-load.py` (a GET on a new connection each
//! time, from a client port of its own) and `scripts/lab-http-keepalive.py --timed` (one
//! long-lived connection each). A lab that is not up is brought up, and down at the end; a lab
//! that was up is left up, with what the experiment changed put back.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use xlb::maglev::{self, Member};
use xlb_tests::lab::{Lab, Topology, repo, xlb_bin};

use crate::{
    experiment_chart,
    experiment_rows::{COLUMNS, Kind, Row, failure_window, moved_flows, percentile, round},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Name {
    /// New connections over the reals: shares against weights (dr, tun).
    Spread,
    /// kill -9 one real's HTTP server under load, start it again (dr, tun).
    Failover,
    /// Drain a real holding long-lived connections, wait-drained, restart its server,
    /// enable it (dr, tun).
    Drain,
    /// Double one real's weight: tracked and new flows that moved, against Maglev (dr, tun).
    Reweight,
    /// kill -9 the daemon under load and start it again (dr, tun).
    Restart,
    /// Take one of two directors dark under load and bring it back (ecmp).
    DirectorLoss,
}

impl Name {
    /// As on the command line.
    pub fn as_str(self) -> String {
        use clap::ValueEnum;
        let value = self.to_possible_value().expect("no experiment is hidden");
        value.get_name().to_string()
    }

    fn labs(self) -> &'static [&'static str] {
        match self {
            Name::DirectorLoss => &["ecmp"],
            _ => &["dr", "tun"],
        }
    }
}

#[derive(clap::Args)]
pub struct ExperimentArgs {
    /// The lab: dr, tun or ecmp.
    pub lab: String,
    /// What to do in it.
    #[arg(value_enum)]
    pub name: Name,
    /// Where to write events.csv, timeline.png and summary.txt (default:
    /// target/lab/LAB-NAME-TIMESTAMP).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A short form (seconds instead of tens of seconds), as the test suite runs it.
    #[arg(long)]
    pub quick: bool,
}

fn epoch() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// An experiment under way: the lab, the service it loads, and the clock its rows use.
struct Run {
    topo: Topology,
    /// The service as the CLI names it, e.g. 198.18.0.100:80/tcp.
    service: String,
    vip: String,
    port: u16,
    /// Epoch seconds of time 0 (f64 bits), set by `Run::begin`.
    t0: AtomicU64,
    events: Mutex<Vec<Row>>,
    quick: bool,
}

impl Run {
    fn t0(&self) -> f64 {
        f64::from_bits(self.t0.load(Ordering::Relaxed))
    }

    fn now(&self) -> f64 {
        epoch() - self.t0()
    }

    /// Records an event at the present time, and says it on stderr.
    fn event(&self, what: impl Into<String>) {
        let row = Row {
            time: round(self.now(), 3),
            kind: Kind::Event,
            flow: String::new(),
            real: String::new(),
            latency_ms: None,
            ok: true,
            detail: what.into(),
        };
        eprintln!("  {:7.3} s  {}", row.time, row.detail);
        self.events.lock().unwrap().push(row);
    }

    /// Sleeps until `t` seconds after time 0.
    fn at(&self, t: f64) {
        let wait = t - self.now();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }

    /// Seconds, full or quick.
    fn secs(&self, full: f64, quick: f64) -> f64 {
        if self.quick { quick } else { full }
    }

    fn director(&self) -> &str {
        &self.topo.directors[0]
    }

    fn xlb(&self, args: &[&str]) -> Result<String> {
        let socket = &self.topo.daemon(self.director()).socket;
        let out = Command::new(xlb_bin())
            .args(["--socket", socket])
            .args(args)
            .output()
            .context("running xlb")?;
        ensure!(
            out.status.success(),
            "xlb {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn real_addr(&self, real: &str) -> &str {
        self.topo.ipv4(real)
    }

    /// (real name, state, weight) of each real of the service, from `xlb --json status`.
    fn reals(&self) -> Result<Vec<(String, String, u32)>> {
        let status: Value = serde_json::from_str(&self.xlb(&["--json", "status"])?)?;
        let svc = status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["service"] == self.service.as_str()))
            .with_context(|| format!("service {} not in xlb status", self.service))?;
        let mut out = Vec::new();
        for r in svc["reals"].as_array().into_iter().flatten() {
            let addr = r["addr"].as_str().unwrap_or_default();
            let Some(name) = self.topo.real_by_addr(addr) else {
                continue;
            };
            out.push((
                name.to_string(),
                r["state"].as_str().unwrap_or("?").to_string(),
                r["weight"].as_u64().unwrap_or(1) as u32,
            ));
        }
        Ok(out)
    }

    fn wait_state(&self, real: &str, want: &str, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let reals = self.reals()?;
            if reals.iter().any(|(n, s, _)| n == real && s == want) {
                return Ok(());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{real} not {want} after {timeout:?}: {reals:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// New connections from the client for `seconds` at `rate` a second (lab-churn-load.py,
    /// client ports from 20000 up in every run): one row each, when the load has ended.
    fn churn(&self, seconds: f64, rate: f64) -> JoinHandle<Result<Vec<Row>>> {
        let client = self.topo.client.clone();
        let ns = self.topo.ns(&client).to_string();
        let iface = self.topo.host(&client).main_name().to_string();
        let macs: BTreeMap<String, String> = self
            .topo
            .reals
            .iter()
            .flat_map(|r| {
                self.topo
                    .host(r)
                    .ifaces
                    .values()
                    .map(|i| (i.mac.to_lowercase(), r.clone()))
            })
            .collect();
        let (vip, port, t0) = (self.vip.clone(), self.port.to_string(), self.t0());
        std::thread::spawn(move || {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "python3"])
                .arg(repo().join("scripts/lab-churn-load.py"))
                .args([&vip, &port, "--iface", &iface, "--workers", "2"])
                .args([
                    "--rate",
                    &rate.to_string(),
                    "--seconds",
                    &seconds.to_string(),
                ])
                .args(["--timeout", "2"])
                .output()
                .context("running lab-churn-load.py")?;
            ensure!(
                out.status.success(),
                "lab-churn-load.py failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            let mut rows = Vec::new();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let r: Value = serde_json::from_str(line).context("lab-churn-load.py output")?;
                let start = r["start"].as_f64().unwrap_or(t0);
                let end = r["end"].as_f64().unwrap_or(start);
                // The answer names its real; a refused or reset connection only has the MAC
                // of its first reply (in DR, the real's own).
                let real = r["real"]
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| r["mac"].as_str().and_then(|m| macs.get(m).cloned()))
                    .unwrap_or_default();
                rows.push(Row {
                    time: round(start - t0, 3),
                    kind: Kind::Request,
                    flow: r["port"].as_u64().unwrap_or(0).to_string(),
                    real,
                    latency_ms: Some(round((end - start) * 1000.0, 1)),
                    ok: r["ok"].as_bool().unwrap_or(false),
                    detail: r["error"].as_str().unwrap_or("").to_string(),
                });
            }
            Ok(rows)
        })
    }

    /// `n` long-lived connections, a GET on each every 100 ms for `seconds`
    /// (lab-http-keepalive.py --timed): one row per answer, and one failed row when a
    /// connection breaks. Returns once each has answered (or after 5 s), with the real each
    /// connection is on.
    fn keepalives(&self, n: usize, seconds: f64) -> Result<LongLived> {
        let on: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
        let handles = (0..n)
            .map(|i| {
                let ns = self.topo.ns(&self.topo.client).to_string();
                let (vip, port, t0) = (self.vip.clone(), self.port.to_string(), self.t0());
                let on = Arc::clone(&on);
                std::thread::spawn(move || {
                    let mut child = Command::new("ip")
                        .args(["netns", "exec", &ns, "python3"])
                        .arg(repo().join("scripts/lab-http-keepalive.py"))
                        .args([
                            &vip,
                            &port,
                            "--interval",
                            "0.1",
                            "--timed",
                            "--timeout",
                            "3",
                        ])
                        .args(["--max-seconds", &seconds.to_string()])
                        .stdout(Stdio::piped())
                        .spawn()
                        .context("running lab-http-keepalive.py")?;
                    let stdout = child.stdout.take().expect("piped");
                    let flow = format!("conn{}", i + 1);
                    let mut rows = Vec::new();
                    let mut last = None;
                    for line in BufReader::new(stdout).lines() {
                        let line = line?;
                        let now = epoch();
                        if let Some(error) = line.strip_prefix("error: ") {
                            let since = last.unwrap_or(now);
                            rows.push(Row {
                                time: round(since - t0, 3),
                                kind: Kind::Keepalive,
                                flow: flow.clone(),
                                real: String::new(),
                                latency_ms: Some(round((now - since) * 1000.0, 1)),
                                ok: false,
                                detail: error.to_string(),
                            });
                            continue;
                        }
                        // "<local-port> <real> <client-ip> <sent> <answered>"
                        let w: Vec<&str> = line.split_whitespace().collect();
                        let [_, real, _, sent, answered] = w[..] else {
                            bail!("lab-http-keepalive.py printed {line:?}");
                        };
                        let (sent, answered): (f64, f64) = (sent.parse()?, answered.parse()?);
                        last = Some(answered);
                        on.lock().unwrap().insert(flow.clone(), real.to_string());
                        rows.push(Row {
                            time: round(sent - t0, 3),
                            kind: Kind::Keepalive,
                            flow: flow.clone(),
                            real: real.to_string(),
                            latency_ms: Some(round((answered - sent) * 1000.0, 1)),
                            ok: true,
                            detail: String::new(),
                        });
                    }
                    child.wait()?;
                    Ok(rows)
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while on.lock().unwrap().len() < n {
            ensure!(
                std::time::Instant::now() < deadline,
                "only {} of {n} long-lived connections answered within 5 s",
                on.lock().unwrap().len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let on = on.lock().unwrap().clone();
        Ok(LongLived { handles, on })
    }

    /// Time 0: the watcher (the daemon's view, or in a lab of several directors the router's
    /// route to the VIP), then the long-lived connections (once each has answered), then the
    /// new connections.
    fn begin(self: &Arc<Self>, plan: Plan) -> Result<Under> {
        self.t0.store(epoch().to_bits(), Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = if self.topo.directors.len() == 1 {
            self.watch_daemon(stop.clone())
        } else {
            self.watch_router(stop.clone())
        };
        let mut what = format!("new connections for {} s", plan.seconds);
        if plan.conns > 0 {
            let _ = write!(what, "; {} long-lived ones for {} s", plan.conns, plan.held);
        }
        self.event(what);
        let long = self.keepalives(plan.conns, plan.held)?;
        let churn = Some(self.churn(plan.seconds, plan.rate));
        Ok(Under {
            churn,
            long,
            stop,
            watcher,
        })
    }

    /// Until `stop`: every 50 ms, how many next hops the router's route to the VIP has, an
    /// event at each change.
    fn watch_router(self: &Arc<Self>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let run = Arc::clone(self);
        std::thread::spawn(move || {
            let router = run.topo.ns(run.topo.router()).to_string();
            let mut hops = route_hops(&router, &run.vip);
            while !stop.load(Ordering::Relaxed) {
                let now = route_hops(&router, &run.vip);
                if now != hops {
                    run.event(format!("router: {now} next hop(s) for the VIP"));
                    hops = now;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    }

    /// Until `stop`: every 100 ms, the daemon's view (each real's state, whether its control
    /// socket answers), an event at each change.
    fn watch_daemon(self: &Arc<Self>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let run = Arc::clone(self);
        std::thread::spawn(move || {
            let mut seen: Option<BTreeMap<String, String>> = None;
            let mut answering = true;
            while !stop.load(Ordering::Relaxed) {
                match run.reals() {
                    Ok(reals) => {
                        if !answering {
                            run.event("daemon: control socket answers again");
                            answering = true;
                        }
                        let now: BTreeMap<String, String> =
                            reals.into_iter().map(|(n, s, _)| (n, s)).collect();
                        if let Some(before) = &seen {
                            for (real, state) in &now {
                                if before.get(real) != Some(state) {
                                    run.event(format!("daemon: {real} {state}"));
                                }
                            }
                        }
                        seen = Some(now);
                    }
                    Err(_) if answering => {
                        run.event("daemon: control socket does not answer");
                        answering = false;
                    }
                    Err(_) => {}
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    }
}

/// The load an experiment runs under, from time 0.
struct Plan {
    /// New connections (lab-churn-load.py) for this long, at `rate` a second.
    seconds: f64,
    rate: f64,
    /// Long-lived connections (lab-http-keepalive.py), held for `held` seconds.
    conns: usize,
    held: f64,
}

/// An experiment's load and its watcher, under way since `Run::begin`.
struct Under {
    churn: Option<JoinHandle<Result<Vec<Row>>>>,
    long: LongLived,
    stop: Arc<AtomicBool>,
    watcher: JoinHandle<()>,
}

impl Under {
    /// Waits for the new connections to end: their rows (once; empty after).
    fn new_conns(&mut self) -> Result<Vec<Row>> {
        match self.churn.take() {
            Some(h) => h.join().expect("the load thread panicked"),
            None => Ok(Vec::new()),
        }
    }

    /// Waits for the whole load to end and stops the watcher: every request's row, and the
    /// long-lived connections' rows alone.
    fn end(mut self) -> Result<(Vec<Row>, Vec<Row>)> {
        let mut rows = self.new_conns()?;
        let kept = join_all(self.long.handles)?;
        rows.extend(kept.iter().cloned());
        self.stop.store(true, Ordering::Relaxed);
        self.watcher.join().expect("the watcher panicked");
        Ok((rows, kept))
    }
}

/// Long-lived connections under way.
struct LongLived {
    handles: Vec<JoinHandle<Result<Vec<Row>>>>,
    /// The real each connection answered from first, by flow.
    on: BTreeMap<String, String>,
}

impl LongLived {
    /// The real holding the most connections (the first of them on a tie).
    fn busiest(&self, reals: &[String]) -> String {
        let count = |r: &String| self.on.values().filter(|v| *v == r).count();
        let mut best = reals[0].clone();
        for r in reals {
            if count(r) > count(&best) {
                best = r.clone();
            }
        }
        best
    }
}

/// The process whose pid `pid_file` holds: its command line, then SIGKILL; returns once it is
/// gone.
fn kill_9(pid_file: &str) -> Result<Vec<String>> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .with_context(|| format!("reading {pid_file}"))?
        .trim()
        .parse()
        .with_context(|| format!("{pid_file} holds no pid"))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("process {pid} of {pid_file} is gone"))?;
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    xlb_tests::lab::kill_9(pid)?;
    Ok(argv)
}

/// Starts `argv` again in namespace `ns` as scripts/lab does (its own session, output appended
/// to `log`, pid to `pid_file`): network namespace only (nsenter), so a daemon still sees the
/// host's bpffs.
fn respawn(ns: &str, argv: &[String], log: &str, pid_file: &str) -> Result<()> {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)?;
    let child = Command::new("setsid")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", argv.join(" ")))?;
    // setsid execs (the process is not a group leader), so this is the program's own pid.
    std::fs::write(pid_file, format!("{}\n", child.id()))?;
    Ok(())
}

pub fn run(args: ExperimentArgs) -> Result<PathBuf> {
    let labs = args.name.labs();
    if !labs.contains(&args.lab.as_str()) {
        bail!(
            "experiment {} runs in lab {}, not {:?}",
            args.name.as_str(),
            labs.join(" or "),
            args.lab
        );
    }
    let lab = Lab::new(Box::leak(args.lab.clone().into_boxed_str()));
    let _running = if lab.topology_path().exists() {
        None
    } else {
        eprintln!("experiment: lab {} is not up: bringing it up", args.lab);
        Some(lab.up())
    };
    let topo = lab.topology();
    let web = topo.service("web").clone();
    let out = match args.out {
        Some(dir) => dir,
        None => {
            let stamp = Command::new("date")
                .arg("-u")
                .arg("+%Y%m%d-%H%M%S")
                .output()?;
            repo().join("target/lab").join(format!(
                "{}-{}-{}",
                args.lab,
                args.name.as_str(),
                String::from_utf8_lossy(&stamp.stdout).trim()
            ))
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let run = Arc::new(Run {
        service: format!("{}:{}/tcp", web.vip4, web.port),
        vip: web.vip4.clone(),
        port: web.port,
        topo,
        t0: AtomicU64::new(0),
        events: Mutex::default(),
        quick: args.quick,
    });
    eprintln!(
        "experiment {} in lab {}{}:",
        args.name.as_str(),
        args.lab,
        if args.quick { " (quick)" } else { "" }
    );
    let (rows, extra) = match args.name {
        Name::Spread => spread(run.clone())?,
        Name::Failover => failover(run.clone())?,
        Name::Drain => drain(run.clone())?,
        Name::Reweight => reweight(run.clone())?,
        Name::Restart => restart(run.clone())?,
        Name::DirectorLoss => director_loss(run.clone())?,
    };
    let mut rows = rows;
    rows.extend(run.events.lock().unwrap().drain(..));
    rows.sort_by(|a, b| a.time.total_cmp(&b.time));

    let mut csv = String::from(COLUMNS);
    csv.push('\n');
    for r in &rows {
        csv.push_str(&r.csv());
        csv.push('\n');
    }
    std::fs::write(out.join("events.csv"), csv)?;
    let title = format!(
        "{} in the {} lab{}",
        args.name.as_str(),
        args.lab,
        if args.quick { " (quick)" } else { "" }
    );
    let mut summary = format!("experiment: {title}\n");
    summary.push_str(&common_figures(&rows, &run.topo.reals));
    summary.push_str(&extra.text);
    std::fs::write(out.join("summary.txt"), &summary)?;
    experiment_chart::timeline(&out.join("timeline.png"), &title, &rows, &run.topo.reals)?;
    if let Some(shares) = &extra.shares {
        experiment_chart::shares(&out.join("shares.png"), &title, shares)?;
    }
    print!("{summary}");
    eprintln!("wrote {}", out.display());
    Ok(out)
}

/// What an experiment adds to the common figures.
#[derive(Default)]
struct Extra {
    text: String,
    /// (real, measured share, weight share), for shares.png.
    shares: Option<Vec<(String, f64, f64)>>,
}

/// The lines every summary has: requests, failures and their window, answers per real,
/// latency percentiles. Each is "name: value", computed from the rows as written.
fn common_figures(rows: &[Row], reals: &[String]) -> String {
    let requests: Vec<&Row> = rows.iter().filter(|r| r.is_request()).collect();
    let failed: Vec<&Row> = requests.iter().copied().filter(|r| !r.ok).collect();
    let new_conns = requests.iter().filter(|r| r.kind == Kind::Request).count();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "requests: {} ({} on new connections, {} on long-lived ones)",
        requests.len(),
        new_conns,
        requests.len() - new_conns
    );
    let _ = writeln!(s, "failed: {}", failed.len());
    match failure_window(rows) {
        Some((from, to)) => {
            let _ = writeln!(
                s,
                "failure window: {from:.3} s to {to:.3} s ({:.3} s)",
                to - from
            );
        }
        None => {
            let _ = writeln!(s, "failure window: none");
        }
    }
    let answers: Vec<String> = reals
        .iter()
        .map(|real| {
            let n = requests.iter().filter(|r| r.ok && &r.real == real).count();
            format!("{real} {n}")
        })
        .collect();
    let _ = writeln!(s, "answers per real: {}", answers.join(", "));
    let mut lat: Vec<f64> = requests
        .iter()
        .filter(|r| r.ok)
        .filter_map(|r| r.latency_ms)
        .collect();
    lat.sort_by(f64::total_cmp);
    let _ = writeln!(
        s,
        "latency ms p50 p90 p99 max: {:.1} {:.1} {:.1} {:.1}",
        percentile(&lat, 50.0),
        percentile(&lat, 90.0),
        percentile(&lat, 99.0),
        lat.last().copied().unwrap_or(0.0)
    );
    s
}

fn join_all(handles: Vec<JoinHandle<Result<Vec<Row>>>>) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for h in handles {
        rows.extend(h.join().expect("a load thread panicked")?);
    }
    Ok(rows)
}

fn event_time(rows: &[Row], run: &Run, prefix: &str) -> Option<f64> {
    run.events
        .lock()
        .unwrap()
        .iter()
        .chain(rows.iter())
        .filter(|r| r.kind == Kind::Event && r.detail.starts_with(prefix))
        .map(|r| r.time)
        .next()
}

// ---------------------------------------------------------------------------------------------
// The experiments
// ---------------------------------------------------------------------------------------------

fn spread(run: Arc<Run>) -> Result<(Vec<Row>, Extra)> {
    let weights: BTreeMap<String, u32> = run.reals()?.into_iter().map(|(n, _, w)| (n, w)).collect();
    let under = run.begin(Plan {
        seconds: run.secs(20.0, 4.0),
        rate: 150.0,
        conns: 0,
        held: 0.0,
    })?;
    let (rows, _) = under.end()?;
    run.event("load ends");
    let ok: Vec<&Row> = rows.iter().filter(|r| r.ok).collect();
    let total_weight: u32 = weights.values().sum();
    let mut text = String::new();
    let mut shares = Vec::new();
    let mut worst: f64 = 0.0;
    for real in &run.topo.reals {
        let n = ok.iter().filter(|r| &r.real == real).count();
        let share = n as f64 / ok.len().max(1) as f64;
        let w = weights.get(real).copied().unwrap_or(0);
        let ideal = w as f64 / total_weight.max(1) as f64;
        worst = worst.max((share - ideal).abs());
        let _ = writeln!(
            text,
            "share {real}: {:.1} % (weight {w}: {:.1} %)",
            share * 100.0,
            ideal * 100.0
        );
        shares.push((real.clone(), share, ideal));
    }
    let _ = writeln!(
        text,
        "largest deviation from the weights: {:.1} percentage points over {} answers",
        worst * 100.0,
        ok.len()
    );
    Ok((
        rows,
        Extra {
            text,
            shares: Some(shares),
        },
    ))
}

/// Adds an HTTP check to the service (so a refusing real goes down at once and comes back
/// after `rise` successes); returns the saved configuration to restore.
fn with_check(run: &Run) -> Result<String> {
    let saved = run.xlb(&["save"])?;
    let mut config: Value = serde_json::from_str(&saved)?;
    let svc = config["services"]
        .as_array_mut()
        .and_then(|s| s.iter_mut().find(|s| s["service"] == run.service.as_str()))
        .context("the service is not in xlb save")?;
    svc["check"] = serde_json::json!({
        "kind": "http", "path": "/healthz",
        "interval_ms": 500, "timeout_ms": 400, "rise": 2, "fall": 3,
    });
    restore(run, &config.to_string())?;
    for real in &run.topo.reals {
        run.wait_state(real, "up", Duration::from_secs(10))?;
    }
    Ok(saved)
}

fn restore(run: &Run, config: &str) -> Result<()> {
    let file = format!("{}/experiment-config.json", run.topo.state_dir);
    std::fs::write(&file, config)?;
    run.xlb(&["restore", &file])?;
    Ok(())
}

fn server_of<'a>(run: &'a Run, real: &str) -> &'a xlb_tests::lab::Server {
    run.topo.server_on(real, run.port)
}

fn restart_server(run: &Run, real: &str, argv: &[String]) -> Result<()> {
    let server = server_of(run, real);
    respawn(
        run.topo.ns(real),
        argv,
        &server.spawned.log,
        &server.spawned.pid_file,
    )
}

fn failover(run: Arc<Run>) -> Result<(Vec<Row>, Extra)> {
    let saved = with_check(&run)?;
    let victim = run.topo.reals[0].clone();
    let (seconds, kill_at, back_at) = if run.quick {
        (6.0, 1.5, 3.5)
    } else {
        (30.0, 8.0, 18.0)
    };
    let under = run.begin(Plan {
        seconds,
        rate: 150.0,
        conns: 0,
        held: 0.0,
    })?;
    run.at(kill_at);
    let argv = kill_9(&server_of(&run, &victim).spawned.pid_file)?;
    run.event(format!("kill -9 the HTTP server on {victim}"));
    run.at(back_at);
    restart_server(&run, &victim, &argv)?;
    run.event(format!("HTTP server on {victim} started again"));
    let (rows, _) = under.end()?;
    restore(&run, &saved)?;

    let kill = event_time(&rows, &run, "kill -9").context("no kill event")?;
    let back = event_time(&rows, &run, "HTTP server on").context("no restart event")?;
    let mut text = String::new();
    let from_victim = |r: &&Row| r.ok && r.real == victim;
    let last_before = rows
        .iter()
        .filter(from_victim)
        .filter(|r| r.time >= kill && r.time < back)
        .map(|r| r.end())
        .fold(None, |m: Option<f64>, t| Some(m.map_or(t, |m| m.max(t))));
    match last_before {
        Some(t) => {
            let _ = writeln!(
                text,
                "last answer from {victim} after the kill: {:.3} s after it",
                t - kill
            );
        }
        None => {
            let _ = writeln!(text, "last answer from {victim} after the kill: none");
        }
    }
    // A request in flight on the killed server's connection cannot be saved; one sent after
    // the kill can.
    let failed = |r: &&Row| r.is_request() && !r.ok && r.end() >= kill;
    let in_flight = rows.iter().filter(failed).filter(|r| r.time < kill).count();
    let sent_after = rows
        .iter()
        .filter(failed)
        .filter(|r| r.time >= kill)
        .count();
    let _ = writeln!(text, "failed, sent after the kill: {sent_after}");
    let _ = writeln!(text, "failed, in flight at the kill: {in_flight}");
    let first_back = rows
        .iter()
        .filter(from_victim)
        .filter(|r| r.time >= back)
        .map(|r| r.time)
        .next();
    let _ = writeln!(
        text,
        "first new connection to {victim} after its server started again: {}",
        first_back.map_or("none".into(), |t| format!("{:.3} s after it", t - back))
    );
    for e in run.events.lock().unwrap().iter() {
        if e.detail.starts_with("daemon:") {
            let _ = writeln!(text, "{} at {:.3} s", e.detail, e.time);
        }
    }
    Ok((rows, Extra { text, shares: None }))
}

fn drain(run: Arc<Run>) -> Result<(Vec<Row>, Extra)> {
    let (seconds, conns, held, drain_at) = if run.quick {
        (9.0, 6, 3.0, 1.0)
    } else {
        (30.0, 9, 12.0, 4.0)
    };
    let under = run.begin(Plan {
        seconds,
        rate: 100.0,
        conns,
        held,
    })?;
    // The real that holds the most long-lived connections is the one drained.
    let victim = under.long.busiest(&run.topo.reals);
    let addr = run.real_addr(&victim).to_string();
    run.at(drain_at);
    run.xlb(&["real", "drain", &run.service, &addr])?;
    run.event(format!("xlb real drain {victim}"));
    run.xlb(&[
        "real",
        "wait-drained",
        &run.service,
        &addr,
        "--timeout",
        "60s",
    ])?;
    run.event(format!("xlb real wait-drained {victim} returns"));
    let argv = kill_9(&server_of(&run, &victim).spawned.pid_file)?;
    restart_server(&run, &victim, &argv)?;
    run.event(format!("HTTP server on {victim} restarted"));
    std::thread::sleep(Duration::from_millis(300));
    // Stamped before the command: a new connection may land on the real as soon as it runs
    // (the drain is stamped after its command, once no new connection can).
    run.event(format!("xlb real enable {victim}"));
    run.xlb(&["real", "enable", &run.service, &addr])?;
    let (rows, kept) = under.end()?;

    let t_drain = event_time(&rows, &run, "xlb real drain").context("no drain event")?;
    let t_drained = event_time(&rows, &run, "xlb real wait-drained").context("no drained")?;
    let t_enable = event_time(&rows, &run, "xlb real enable").context("no enable event")?;
    let mut text = String::new();
    let new_while = rows
        .iter()
        .filter(|r| r.kind == Kind::Request && r.ok && r.real == victim)
        .filter(|r| r.time > t_drain && r.time < t_enable)
        .count();
    let _ = writeln!(
        text,
        "new connections to {victim} between drain and enable: {new_while}"
    );
    let held_on = kept
        .iter()
        .filter(|r| r.ok && r.real == victim && r.time > t_drain)
        .count();
    let broken = kept.iter().filter(|r| !r.ok).count();
    let _ = writeln!(
        text,
        "answers on long-lived connections to {victim} after the drain: {held_on}"
    );
    let _ = writeln!(text, "long-lived connections broken: {broken}");
    let last_kept = kept
        .iter()
        .filter(|r| r.real == victim)
        .map(|r| r.end())
        .max_by(f64::total_cmp);
    let _ = writeln!(
        text,
        "wait-drained returned: {:.3} s after the drain, {} after the last answer on a \
         long-lived connection to {victim}",
        t_drained - t_drain,
        last_kept.map_or("n/a".into(), |t| format!("{:.3} s", t_drained - t))
    );
    let first_back = rows
        .iter()
        .filter(|r| r.kind == Kind::Request && r.ok && r.real == victim && r.time >= t_enable)
        .map(|r| r.time)
        .next();
    let _ = writeln!(
        text,
        "first new connection to {victim} after enable: {}",
        first_back.map_or("none".into(), |t| format!("{:.3} s after it", t - t_enable))
    );
    Ok((rows, Extra { text, shares: None }))
}

fn reweight(run: Arc<Run>) -> Result<(Vec<Row>, Extra)> {
    let victim = run.topo.reals[0].clone();
    let addr = run.real_addr(&victim).to_string();
    let before = run.reals()?;
    let old = before
        .iter()
        .find(|(n, _, _)| *n == victim)
        .map(|r| r.2)
        .context("the real is not in xlb status")?;
    let new = old * 2;
    let config: Value = serde_json::from_str(&run.xlb(&["save"])?)?;
    let ring = config["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == run.service.as_str()))
        .and_then(|s| s["ring_size"].as_u64())
        .map_or(maglev::DEFAULT_SIZE, |n| n as u32);
    let members = |w_victim: u32| -> Vec<Member> {
        before
            .iter()
            .enumerate()
            .map(|(i, (n, _, w))| Member {
                addr: run.real_addr(n).parse().expect("an address"),
                weight: if *n == victim { w_victim } else { *w },
                id: i as u32,
            })
            .collect()
    };
    let (t_old, t_new) = (
        maglev::build_table(&members(old), ring),
        maglev::build_table(&members(new), ring),
    );
    let ideal = t_old.iter().zip(&t_new).filter(|(a, b)| a != b).count() as f64 / ring as f64;

    // New connections from client ports 20000 up, twice: before and after the change.
    let phase = run.secs(10.0, 2.5);
    let mut under = run.begin(Plan {
        seconds: phase,
        rate: 150.0,
        conns: if run.quick { 6 } else { 12 },
        held: 2.0 * phase + 3.0,
    })?;
    let mut rows = under.new_conns()?;
    run.xlb(&["real", "weight", &run.service, &addr, &new.to_string()])?;
    run.event(format!("xlb real weight {victim} {new} (was {old})"));
    std::thread::sleep(Duration::from_millis(200));
    run.event(format!(
        "new connections for {phase} s from the same client ports"
    ));
    rows.extend(
        run.churn(phase, 150.0)
            .join()
            .expect("the load thread panicked")?,
    );
    let (kept_rows, kept) = under.end()?;
    rows.extend(kept_rows);
    run.xlb(&["real", "weight", &run.service, &addr, &old.to_string()])?;
    run.event(format!("xlb real weight {victim} {old} (put back)"));

    let t_w = event_time(&rows, &run, "xlb real weight").context("no weight event")?;
    let (new_moved, new_common) = moved_flows(&rows, Kind::Request, t_w);
    let (tracked_moved, tracked) = moved_flows(&rows, Kind::Keepalive, t_w);
    let broken = kept.iter().filter(|r| !r.ok).count();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "tracked flows moved: {tracked_moved} of {tracked} (broken: {broken})"
    );
    let _ = writeln!(
        text,
        "new flows moved: {new_moved} of {new_common} ({:.1} %), same client port before and \
         after",
        100.0 * new_moved as f64 / new_common.max(1) as f64
    );
    let _ = writeln!(
        text,
        "maglev ideal: {:.1} % of {ring} slots change owner when {victim}'s weight goes {old} \
         -> {new}",
        100.0 * ideal
    );
    Ok((rows, Extra { text, shares: None }))
}

fn restart(run: Arc<Run>) -> Result<(Vec<Row>, Extra)> {
    let dir = run.director().to_string();
    let daemon = run.topo.daemon(&dir).clone();
    let (seconds, kill_at, back_at, conns) = if run.quick {
        (6.0, 1.5, 3.5, 4)
    } else {
        (30.0, 8.0, 18.0, 6)
    };
    let under = run.begin(Plan {
        seconds,
        rate: 150.0,
        conns,
        held: seconds,
    })?;
    run.at(kill_at);
    let argv = kill_9(&daemon.spawned.pid_file)?;
    run.event("kill -9 the xlb daemon");
    run.at(back_at);
    respawn(
        run.topo.ns(&dir),
        &argv,
        &daemon.spawned.log,
        &daemon.spawned.pid_file,
    )?;
    run.event("xlb daemon started again");
    let (rows, kept) = under.end()?;

    let t_kill = event_time(&rows, &run, "kill -9").context("no kill event")?;
    let t_back = event_time(&rows, &run, "xlb daemon started").context("no start event")?;
    let mut text = String::new();
    let while_dead: Vec<&Row> = rows
        .iter()
        .filter(|r| r.is_request() && r.time >= t_kill && r.end() < t_back)
        .collect();
    let _ = writeln!(
        text,
        "while the daemon was dead: {} answered, {} failed",
        while_dead.iter().filter(|r| r.ok).count(),
        while_dead.iter().filter(|r| !r.ok).count()
    );
    let answering = event_time(&rows, &run, "daemon: control socket answers again");
    let _ = writeln!(
        text,
        "control socket answering again: {}",
        answering.map_or("not seen".into(), |t| format!(
            "{:.3} s after the start",
            t - t_back
        ))
    );
    let (moved, tracked) = moved_flows(&kept, Kind::Keepalive, t_kill);
    let broken = kept.iter().filter(|r| !r.ok).count();
    let _ = writeln!(
        text,
        "long-lived connections across the restart: {tracked}, moved {moved}, broken {broken}"
    );
    Ok((rows, Extra { text, shares: None }))
}

/// The number of next hops the router's route to `vip` has.
fn route_hops(router_ns: &str, vip: &str) -> usize {
    let out = Command::new("ip")
        .args(["-n", router_ns, "route", "show", vip])
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    let nexthops = text.matches("nexthop").count();
    if nexthops > 0 {
        nexthops
    } else {
        text.matches(" via ").count()
    }
}

fn director_loss(run: Arc<Run>) -> Result<(Vec<Row>, Extra)> {
    let lost = run.topo.directors[0].clone();
    let iface = run.topo.daemon(&lost).iface.clone();
    let (switch, port) = {
        let (s, p) = run.topo.switch_port(&lost, &iface);
        (s.to_string(), p.to_string())
    };
    let link = |state: &str| -> Result<()> {
        let ok = Command::new("ip")
            .args(["-n", &switch, "link", "set", &port, state])
            .status()?
            .success();
        ensure!(ok, "ip link set {port} {state} in {switch} failed");
        Ok(())
    };
    let (seconds, lose_at, back_at, conns) = if run.quick {
        (8.0, 1.5, 4.5, 6)
    } else {
        (30.0, 8.0, 18.0, 12)
    };
    let under = run.begin(Plan {
        seconds,
        rate: 100.0,
        conns,
        held: seconds,
    })?;
    run.at(lose_at);
    link("down")?;
    run.event(format!("{lost} dark (its switch port down)"));
    run.at(back_at);
    link("up")?;
    run.event(format!("{lost} back (its switch port up)"));
    let (rows, kept) = under.end()?;

    let t_lost = event_time(&rows, &run, &format!("{lost} dark")).context("no loss event")?;
    let mut text = String::new();
    let converged = run
        .events
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.detail.starts_with("router:") && e.time >= t_lost)
        .map(|e| e.time - t_lost);
    let _ = writeln!(
        text,
        "router routes around {lost}: {}",
        converged.map_or("not seen".into(), |t| format!(
            "{t:.3} s after it went dark"
        ))
    );
    // A SYN sent to the dark director is lost; the client sends it again after 1 s.
    let retried = rows
        .iter()
        .filter(|r| r.kind == Kind::Request && r.ok && r.latency_ms.unwrap_or(0.0) > 500.0)
        .count();
    let _ = writeln!(
        text,
        "new connections answered after more than 500 ms (a SYN sent again): {retried}"
    );
    // A long-lived connection through the lost director stalls until the router moves it.
    let mut stalls: Vec<f64> = Vec::new();
    let mut by_conn: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in kept.iter().filter(|r| r.ok) {
        by_conn.entry(&r.flow).or_default().push(r);
    }
    for answers in by_conn.values() {
        let gap = answers
            .windows(2)
            .filter(|w| w[1].time >= t_lost)
            .map(|w| w[1].time - w[0].time)
            .fold(0.0, f64::max);
        // Asked every 100 ms: a gap of 2.5 intervals is a stall.
        if gap > 0.25 {
            stalls.push(gap);
        }
    }
    let broken = kept.iter().filter(|r| !r.ok).count();
    let (moved, tracked) = moved_flows(&kept, Kind::Keepalive, t_lost);
    let _ = writeln!(
        text,
        "long-lived connections: {tracked}, stalled {} (longest gap {:.3} s), moved to another \
         real {moved}, broken {broken}",
        stalls.len(),
        stalls.iter().copied().fold(0.0, f64::max)
    );
    Ok((rows, Extra { text, shares: None }))
}
