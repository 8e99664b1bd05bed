//! Developer tasks for the xlb workspace: `cargo xtask <task>`.

mod bench;
mod bench_charts;
mod bench_rate;
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
    /// Measure the XDP data path: ns per packet (BPF_PROG_TEST_RUN) and Mpps over a veth pair
    /// (needs root). Writes target/bench/summary.json and charts.
    Bench(BenchArgs),
    /// Write man pages generated from the CLI definitions (xlb.1, xlb-SUBCOMMAND.1).
    Man {
        /// Where to write them.
        #[arg(long, default_value = "target/man")]
        out: std::path::PathBuf,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// A shorter run (under a minute) for a quick look.
    #[arg(long)]
    quick: bool,
    /// Calls per path (overrides --quick).
    #[arg(long, value_name = "N")]
    calls: Option<usize>,
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
            let datapath = bench::run(calls)?;
            let rates = bench_rate::run(args.quick)?;
            bench::write_summary(&datapath, &rates)?;
            bench_charts::render(&datapath, &rates, &bench::out_dir())
        }
        Task::Man { out } => {
            let pages = man::write(&out)?;
            println!("{} man pages in {}", pages.len(), out.display());
            Ok(())
        }
    }
}
