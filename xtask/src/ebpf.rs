//! The eBPF toolchain: nightly with rust-src, LLVM 22 (Debian's
//! llvm-22-dev) for bpf-linker, and bpftool to inspect the pinned maps.
//! `ensure_toolchain` installs what is missing; installing needs root.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context;

use crate::prereqs::{apt_install, succeeds};
use crate::{cargo, run};

fn nightly_has_rust_src() -> bool {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    out.ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .is_some_and(|root| root.join("lib/rustlib/src/rust/library/core").exists())
}

/// Installs nightly rust-src, bpf-linker (built against LLVM 22) and
/// bpftool where missing.
pub fn ensure_toolchain() -> anyhow::Result<()> {
    if !nightly_has_rust_src() {
        run(
            "rustup component add rust-src --toolchain nightly",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }
    let need_linker = !succeeds(Command::new("bpf-linker").arg("--version"));
    let need_bpftool = !succeeds(Command::new("bpftool").arg("version"));
    let need_llvm = need_linker && !PathBuf::from("/usr/lib/llvm-22/bin/llvm-config").exists();
    let mut packages = Vec::new();
    if need_llvm {
        packages.extend(["llvm-22-dev", "libpolly-22-dev"]);
    }
    if need_bpftool {
        packages.push("bpftool");
    }
    apt_install(&packages)?;
    if need_linker {
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(
            "cargo install bpf-linker (LLVM 22)",
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path),
        )?;
    }
    Ok(())
}

/// `cargo xtask build-ebpf`: the toolchain, then the program (through the
/// relay's build, which embeds it).
pub fn build() -> anyhow::Result<()> {
    ensure_toolchain().context("installing the eBPF toolchain")?;
    run(
        "build the relay with its eBPF program",
        cargo().args(["build", "-p", "tlsrelay"]).env("CI", "true"),
    )?;
    println!("build-ebpf: the eBPF program is built and embedded in target/debug/tlsrelay");
    Ok(())
}
