//! What the test suite needs on the machine, checked and (as root)
//! installed where missing, so that `cargo xtask ci` works on a fresh
//! Debian machine by itself: quick when everything is there, a message
//! naming the missing packages when not root.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::bail;

use crate::run;

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether `cmd` runs and exits 0 (its output discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `program` is on the PATH.
pub fn found(program: &str) -> bool {
    succeeds(Command::new("sh").args(["-c", &format!("command -v {program}")]))
}

/// Installs Debian packages with apt (as root), or says which are missing.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing {}; install them as root: apt-get install {}",
            packages.join(", "),
            packages.join(" ")
        );
    }
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    run(
        &format!("apt-get install {}", packages.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The suite's packages: each check, and what to install when it fails.
fn missing_packages() -> Vec<&'static str> {
    let busybox_static =
        Path::new("/bin/busybox").exists() && !succeeds(Command::new("ldd").arg("/bin/busybox"));
    let checks: [(bool, &[&str]); 18] = [
        (found("cc"), &["gcc"]),
        // SMTP interop: swaks (with Net::SSLeay for its TLS) and Postfix
        // (the tests run private instances; the system one is not started).
        (found("swaks"), &["swaks"]),
        (Path::new("/usr/sbin/postfix").exists(), &["postfix"]),
        (
            succeeds(Command::new("perl").args(["-MNet::SSLeay", "-e1"])),
            &["libnet-ssleay-perl"],
        ),
        // The kTLS VM: qemu, a static busybox, objcopy, xz.
        (found("qemu-system-x86_64"), &["qemu-system-x86"]),
        (busybox_static, &["busybox-static"]),
        (found("objcopy"), &["binutils"]),
        (found("xz"), &["xz-utils"]),
        // ss shows a listener's accept queue (relay_data's backlog test).
        (found("ss"), &["iproute2"]),
        // The bench's peers (its smoke run runs them side by side).
        (found("stunnel4"), &["stunnel4"]),
        (found("haproxy"), &["haproxy"]),
        (
            Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists(),
            &["nginx", "libnginx-mod-stream"],
        ),
        (found("socat"), &["socat"]),
        (found("openssl"), &["openssl"]),
        // Delivery by MX: an authoritative DNS server and zone signing
        // (the tests serve their own DNSSEC-signed zones).
        (found("nsd"), &["nsd"]),
        (found("ldns-signzone"), &["ldnsutils"]),
        // promtool checks and unit-tests the shipped alerting rules.
        (found("promtool"), &["prometheus"]),
        // The book's pages rendered as a reader sees them (xtask docs).
        (
            found("chromium-headless-shell"),
            &["chromium-headless-shell"],
        ),
    ];
    checks
        .into_iter()
        .filter(|(present, _)| !present)
        .flat_map(|(_, packages)| packages.iter().copied())
        .collect()
}

/// What `cargo xtask ci` needs besides the eBPF toolchain (`ebpf`
/// installs that): rustfmt and clippy, the packages above, cargo-deny,
/// cargo-machete, cargo-fuzz, and bpffs mounted.
pub fn ensure_for_ci() -> anyhow::Result<()> {
    for component in ["rustfmt", "clippy"] {
        let tool = if component == "rustfmt" {
            "fmt"
        } else {
            "clippy"
        };
        if !succeeds(Command::new("cargo").args([tool, "--version"])) {
            run(
                &format!("rustup component add {component}"),
                Command::new("rustup").args(["component", "add", component]),
            )?;
        }
    }
    apt_install(&missing_packages())?;
    // Dependency policy (licenses, bans, sources; deny.toml) and unused
    // dependencies.
    for (tool, krate) in [("deny", "cargo-deny"), ("machete", "cargo-machete")] {
        // Without the CARGO_PKG_NAME cargo set for xtask: cargo-machete
        // would misparse its arguments (see ci()).
        if !succeeds(
            Command::new("cargo")
                .env_remove("CARGO_PKG_NAME")
                .args([tool, "--version"]),
        ) {
            run(
                &format!("cargo install {krate}"),
                Command::new("cargo").args(["install", "--locked", krate]),
            )?;
        }
    }
    if !succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        run(
            "cargo install cargo-fuzz",
            Command::new("cargo").args(["install", "cargo-fuzz"]),
        )?;
    }
    // bpffs for the pinned maps (the relay mounts it too when it can).
    if is_root() && !succeeds(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
        run(
            "mount bpffs on /sys/fs/bpf",
            Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
        )?;
    }
    Ok(())
}
