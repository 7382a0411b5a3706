//! Decides which integration tests this machine can run. A test that needs
//! a tool or a privilege the machine lacks is marked
//! `#[cfg_attr(missing_X, ignore = "needs X")]`: libtest then lists it as
//! ignored with the reason, instead of a pass that ran nothing. Under
//! `CI=true` nothing is ignored, so a missing prerequisite fails the test
//! that needs it (each also checks at run time and says what is missing).

use std::path::Path;
use std::process::Command;

/// Each cfg, and whether what it names is here.
fn prerequisites() -> Vec<(&'static str, bool)> {
    let root = unsafe_free_is_root();
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    vec![
        ("missing_root", root),
        (
            "missing_postfix",
            root && Path::new("/usr/sbin/postfix").exists(),
        ),
        ("missing_swaks", runs("swaks", "--version")),
        (
            "missing_dns_tools",
            runs("ldns-signzone", "-v") && runs("/usr/sbin/nsd", "-v"),
        ),
        ("missing_nginx", root && runs("nginx", "-v")),
        ("missing_ebpf", root && runs("bpf-linker", "--version")),
        (
            "missing_systemd_analyze",
            runs("systemd-analyze", "--version"),
        ),
        ("missing_ss", runs("ss", "-V")),
        ("missing_openssl", runs("openssl", "version")),
        ("missing_haproxy", runs("haproxy", "-v")),
        (
            "missing_ipv6",
            std::net::TcpListener::bind("[::1]:0").is_ok(),
        ),
    ]
}

/// Root, read from /proc (no libc in a build script's dependencies).
fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn main() {
    println!("cargo:rerun-if-env-changed=CI");
    // Installing a tool changes these directories (a path that does not
    // exist would make cargo run this script, and rebuild, every time).
    for dir in ["/usr/bin", "/usr/sbin"] {
        println!("cargo:rerun-if-changed={dir}");
    }
    let ci = std::env::var("CI").as_deref() == Ok("true");
    for (cfg, present) in prerequisites() {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        if !present && !ci {
            println!("cargo::rustc-cfg={cfg}");
        }
    }
}
