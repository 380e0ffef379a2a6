//! Locates the kernel programs built by `cargo xtask build-ebpf`, which the daemon embeds.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = std::env::var_os("TUNNELMESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpf/tunnelmesh.bpf.o"));
    println!("cargo:rerun-if-env-changed=TUNNELMESH_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "the eBPF object {} is missing: run `cargo xtask build-ebpf` first (or `cargo xtask test`, which does)",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=TUNNELMESH_EBPF_OBJECT={}",
        object.canonicalize().expect("exists").display()
    );
}
