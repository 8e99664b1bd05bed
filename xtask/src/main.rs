//! Developer tasks for the xlb workspace: `cargo xtask <task>`.

mod bench;
mod bench_charts;
mod bench_control;
mod bench_flows;
mod bench_katran;
mod bench_lab;
mod bench_rate;
mod bench_setup;
mod bench_stats;
mod bench_sync;
mod experiment;
mod experiment_chart;
mod experiment_rows;
mod fuzz;
mod man;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Developer tasks for xlb")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Measure the XDP data path (ns per packet under BPF_PROG_TEST_RUN, Mpps over a veth
    /// pair), the control plane and the DR lab (needs root). Writes target/bench/summary.json
    /// and charts.
    Bench(BenchArgs),
    /// Write man pages generated from the CLI definitions (xlb.1, xlb-SUBCOMMAND.1).
    Man {
        /// Where to write them.
        #[arg(long, default_value = "target/man")]
        out: std::path::PathBuf,
    },
    /// Fuzz the XDP programs with random and mutated frames (needs root): the properties of
    /// tests/tests/fuzz_packets.rs, 200,000 frames, or ten million with --long.
    Fuzz(fuzz::FuzzArgs),
    /// Run a scripted experiment in a lab under client load (needs root; what `scripts/lab
    /// LAB experiment NAME` runs): events.csv, timeline.png and summary.txt in one directory.
    Experiment(experiment::ExperimentArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// A shorter run (under a minute) for a quick look.
    #[arg(long)]
    quick: bool,
    /// Calls per path (overrides --quick).
    #[arg(long, value_name = "N")]
    calls: Option<usize>,
    /// Leave out the end-to-end part in the DR lab (wrk, health-check detection).
    #[arg(long)]
    skip_lab: bool,
    /// Run one part only.
    #[arg(long, value_enum, conflicts_with = "skip_lab")]
    only: Option<BenchPart>,
    /// Katran's balancer object, built from its sources (BENCHMARKS.md says how): with
    /// `--only katran`, xlb and Katran side by side on the same frames.
    #[arg(long, value_name = "PATH")]
    katran_obj: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    /// Per-packet cost under BPF_PROG_TEST_RUN, its chart.
    Datapath,
    /// Forwarding rate: Mpps over a veth pair, one flow and 100,000, its chart.
    Rate,
    /// Maglev builds, real changes, restore, map memory, /metrics scrapes.
    Control,
    /// HTTP through the VIP vs. direct, health-check detection window (DR lab).
    Lab,
    /// Connection sync: bytes per new flow, first-packet-to-peer delay, data-path cost on/off.
    Sync,
    /// xlb beside Katran's balancer on the same frames (needs --katran-obj; only when asked).
    Katran,
}

fn main() -> ExitCode {
    // One line with the whole context chain, never a backtrace (even with RUST_BACKTRACE set).
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::Bench(args) => {
            // Loading XDP programs and running BPF_PROG_TEST_RUN needs CAP_BPF/CAP_SYS_ADMIN.
            if unsafe { libc::geteuid() } != 0 {
                bail!("cargo xtask bench must run as root (it loads XDP programs)");
            }
            let calls = match (args.calls, args.quick) {
                (Some(n), _) => n,
                (None, true) => bench::QUICK_CALLS,
                (None, false) => bench::DEFAULT_CALLS,
            };
            if calls == 0 {
                bail!("--calls must be at least 1");
            }
            let part = |p: BenchPart| args.only.is_none_or(|only| only == p);
            let start = std::time::Instant::now();
            if part(BenchPart::Datapath) {
                // --quick: 100,000 flows only (establishing 1,000,000 per path takes a while).
                let flow_counts = if args.quick {
                    &bench_flows::COUNTS[..1]
                } else {
                    &bench_flows::COUNTS[..]
                };
                let datapath = bench::run(calls, flow_counts)?;
                bench::write_summary(&datapath)?;
                bench_charts::render_datapath(&datapath, &bench::out_dir())?;
            }
            if part(BenchPart::Rate) {
                let rates = bench_rate::run(args.quick)?;
                add_to_summary("rate", rates.to_json())?;
                bench_charts::render_rate(&rates, &bench::out_dir())?;
            }
            if part(BenchPart::Control) {
                add_to_summary("control", bench_control::run(args.quick)?)?;
            }
            if part(BenchPart::Sync) {
                add_to_summary("sync", bench_sync::run(args.quick)?)?;
            }
            if args.only == Some(BenchPart::Katran) {
                let Some(obj) = &args.katran_obj else {
                    bail!("--only katran needs --katran-obj PATH");
                };
                bench_katran::run(obj, calls)?;
            }
            if part(BenchPart::Lab) && !args.skip_lab {
                add_to_summary("lab", bench_lab::run(args.quick)?)?;
            }
            eprintln!("bench took {:.0} s", start.elapsed().as_secs_f64());
            Ok(())
        }
        Task::Man { out } => {
            let pages = man::write(&out)?;
            println!("{} man pages in {}", pages.len(), out.display());
            Ok(())
        }
        Task::Fuzz(args) => {
            if unsafe { libc::geteuid() } != 0 {
                bail!("cargo xtask fuzz must run as root (it loads XDP programs)");
            }
            fuzz::run(args)
        }
        Task::Experiment(args) => {
            if unsafe { libc::geteuid() } != 0 {
                bail!("cargo xtask experiment must run as root (network namespaces)");
            }
            experiment::run(args).map(|_| ())
        }
    }
}

/// Adds one part's figures to `target/bench/summary.json` (created if the data path part did
/// not run), written atomically.
fn add_to_summary(key: &str, figures: serde_json::Value) -> Result<()> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/summary.json");
    let mut summary = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => bail!("reading {}: {e}", path.display()),
    };
    let serde_json::Value::Object(map) = &mut summary else {
        bail!("{} does not hold a JSON object", path.display());
    };
    map.insert(key.to_string(), figures);
    std::fs::create_dir_all(path.parent().expect("a file in target/bench"))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&summary)? + "\n")?;
    std::fs::rename(&tmp, &path)?;
    eprintln!("added \"{key}\" to {}", path.display());
    Ok(())
}
