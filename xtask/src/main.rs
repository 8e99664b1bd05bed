//! Developer tasks for the xlb workspace: `cargo xtask <task>`.

mod bench;
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
    /// Measure the XDP data path per packet with BPF_PROG_TEST_RUN (needs root).
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
    /// A shorter run (20,000 calls per path) for a quick look.
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
            bench::run(calls)
        }
        Task::Man { out } => {
            let pages = man::write(&out)?;
            println!("{} man pages in {}", pages.len(), out.display());
            Ok(())
        }
    }
}
