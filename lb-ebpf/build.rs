use which::which;

/// Rebuild the object when bpf-linker changes: aya-build does not track the linker itself.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run scripts/setup");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
