use anyhow::Result;

/// Builds the eBPF object with the pinned nightly (see scripts/setup) and leaves it in OUT_DIR,
/// where `dataplane.rs` embeds it.
fn main() -> Result<()> {
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
