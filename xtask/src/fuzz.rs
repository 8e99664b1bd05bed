//! `cargo xtask fuzz`: the property tests of the XDP programs (tests/tests/fuzz_packets.rs)
//! with more frames. One implementation of the properties: this runs that test binary, built
//! optimised (about 100,000 frames a second here, against some 4,000 in the debug build CI
//! uses), with the number of frames and the seed passed in its environment.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

/// Frames in a default run: what CI runs.
pub const DEFAULT_CASES: u64 = 200_000;
/// Frames in a `--long` run.
pub const LONG_CASES: u64 = 10_000_000;

#[derive(Args)]
pub struct FuzzArgs {
    /// Ten million frames instead of two hundred thousand.
    #[arg(long)]
    long: bool,
    /// Frames in all, over the properties (overrides --long).
    #[arg(long, value_name = "N")]
    cases: Option<u64>,
    /// Replay a run: the seed a run printed (decimal or 0x-hex).
    #[arg(long, value_name = "SEED")]
    seed: Option<String>,
}

pub fn run(args: FuzzArgs) -> Result<()> {
    let cases = match (args.cases, args.long) {
        (Some(n), _) => n,
        (None, true) => LONG_CASES,
        (None, false) => DEFAULT_CASES,
    };
    ensure!(cases > 0, "--cases must be at least 1");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "test",
            "--release",
            "-p",
            "xlb-tests",
            "--test",
            "fuzz_packets",
        ])
        .args(["--", "--nocapture"])
        .env("XLB_FUZZ_CASES", cases.to_string());
    if let Some(seed) = &args.seed {
        cmd.env("XLB_FUZZ_SEED", seed);
    }
    println!("fuzzing the XDP programs with {cases} frames");
    let status = cmd.status().context("running cargo test")?;
    if !status.success() {
        bail!("the fuzz properties failed ({status}); the output above has the seed and frames");
    }
    Ok(())
}
