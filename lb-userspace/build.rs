use std::env;

use anyhow::Result;

/// Builds the eBPF object with the pinned nightly (see scripts/setup) and leaves it in OUT_DIR,
/// where `dataplane.rs` embeds it.
fn main() -> Result<()> {
    // aya_build forwards every line the nested cargo prints as a cargo warning, its progress
    // lines ("Compiling ...") included: some fifty on a fresh build. A quiet nested cargo prints
    // only diagnostics, so a warning or an error of the eBPF crate still shows, and nothing
    // else does. Unless verbose output was asked for: cargo refuses both at once.
    if env::var_os("CARGO_TERM_VERBOSE").is_none_or(|v| v != "true") {
        // SAFETY: the build script has a single thread until aya_build spawns cargo, which
        // inherits the variable.
        unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            no_default_features: false,
            features: &[],
        }],
        aya_build::Toolchain::Custom("nightly-2026-05-20"),
    )
}
