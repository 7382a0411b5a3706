//! Builds the eBPF program (ebpf/program) for bpfel-unknown-none with
//! aya-build, so the relay embeds it (through this crate). That needs the nightly toolchain with
//! rust-src and bpf-linker (`cargo xtask build-ebpf` installs them). Without
//! them the relay still builds, with an empty program and a warning, and
//! says at run time that the wire counters are off; under CI=true a missing
//! toolchain fails the build instead.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROGRAM: &str = "tlsrelay-ebpf";

fn main() {
    println!("cargo:rerun-if-env-changed=CI");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/program");
    let root = root.canonicalize().expect("ebpf/program exists");
    if let Some(missing) = missing_toolchain() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("cannot build the eBPF program in CI: {missing}");
        }
        println!(
            "cargo:warning=building tlsrelay without its eBPF program: {missing} (run `cargo xtask build-ebpf` to install the toolchain)"
        );
        println!("cargo:rerun-if-changed={}", root.display());
        std::fs::write(out_dir.join(PROGRAM), []).expect("writing the empty program");
        return;
    }
    let package = aya_build::Package {
        name: PROGRAM,
        root_dir: root.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
        .expect("building the eBPF program");
}

/// What is missing to build eBPF, if anything.
fn missing_toolchain() -> Option<String> {
    let bpf_linker = Command::new("bpf-linker").arg("--version").output();
    if !bpf_linker.is_ok_and(|o| o.status.success()) {
        return Some("bpf-linker not found".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    match sysroot {
        None => Some("no nightly toolchain".into()),
        Some(root) if !root.join("lib/rustlib/src/rust/library/core").exists() => {
            Some("nightly lacks rust-src".into())
        }
        Some(_) => None,
    }
}
