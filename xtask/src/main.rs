//! `cargo xtask …`: the project's workflows as one command each.
//!
//! - `demo`: build, start the relay on its embedded default with a local
//!   echo upstream, push traffic through each policy, leave it running;
//! - `bench`: tlsrelay against stunnel, haproxy, nginx and socat, side by
//!   side (throughput, latency, handshakes, SMTP, memory per connection);
//! - `build-ebpf`: install the eBPF toolchain if missing, build the program;
//! - `vmtest`: the kernel-TLS tests inside a VM with a kTLS kernel;
//! - `soak`: thousands of sessions held for minutes, RSS watched;
//! - `chaos`: next hops and the relay killed under mail and TCP load, then
//!   every message reconciled;
//! - `ci`: everything CI runs, in CI's order.

mod bench;
mod chaos;
mod chart;
mod deb;
mod docs;
mod ebpf;
mod prereqs;
mod soak;
mod vm;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the relay on its embedded default with a local upstream and show
    /// each policy at work; then leave it running until Ctrl-C.
    Demo {
        /// Exit after the scripted clients instead of waiting for Ctrl-C
        /// (status 0 only if every policy behaved as expected).
        #[arg(long)]
        once: bool,
    },
    /// tlsrelay and its peers on the same work, in alternating rounds:
    /// throughput, latency, handshakes, SMTP, RSS per idle connection.
    Bench {
        /// A one-minute smoke run (debug build, small transfers, one
        /// round): checks the harness, not the numbers.
        #[arg(long)]
        quick: bool,
        /// Inside the kTLS VM instead: the relay with kTLS on and off, its
        /// instructions per GB counted with qemu -icount (repeatable; an
        /// emulated CPU's instructions, not real speeds).
        #[arg(long)]
        vm: bool,
        /// Only the cells whose "table scenario x" contains this text
        /// (case-insensitive), e.g. "latency plaintext relay 16".
        #[arg(long, value_name = "CELLS")]
        only: Option<String>,
        /// Only these cells, tlsrelay alone, recorded with `perf`: a
        /// flamegraph SVG per cell next to the report.
        #[arg(long, value_name = "CELLS", conflicts_with = "only")]
        profile: Option<String>,
    },
    /// Install what building the eBPF program needs (nightly rust-src,
    /// LLVM 22, bpf-linker, bpftool) where missing, then build it.
    BuildEbpf,
    /// Run the kernel-TLS tests in VMs booted from Debian's 6.12 and 6.18
    /// cloud kernels (CONFIG_TLS=m); fetches the kernels and qemu with apt.
    Vmtest {
        /// Only the tests whose name contains this text (a test binary's
        /// filter), e.g. "close_notify".
        #[arg(long, value_name = "TEST")]
        only: Option<String>,
    },
    /// Fuzz every target (fuzz/fuzz_targets) for `minutes` each, in turn,
    /// and print each one's executions; a crash stops with its input.
    Fuzz {
        #[arg(long, default_value_t = 1.0)]
        minutes: f64,
    },
    /// Hold many sessions through one relay (half TLS to an echo, half
    /// SMTP over STARTTLS) with traffic on each every 30 s, sampling the
    /// relay's RSS each second: RSS per session and its drift, errors,
    /// handshake times under the load. Fails on an error or a 5 % drift.
    Soak {
        /// The short run CI makes: debug build, 2,000 sessions, 60 s.
        #[arg(long)]
        quick: bool,
        /// Sessions held (default 10,000; 2,000 with --quick).
        #[arg(long)]
        connections: Option<usize>,
        /// How long they are held (default 600; 60 with --quick).
        #[arg(long)]
        seconds: Option<f64>,
    },
    /// SMTP senders with retry queues and TCP echo clients through the
    /// relay while the next hop is killed, stalled and down and the relay
    /// is SIGKILLed, 100 times each; then every message reconciled (none
    /// lost, none stored that was refused, duplicates explained) and every
    /// TCP stream intact or ended in an error.
    Chaos {
        /// The short run CI makes: debug build, 5 of each fault.
        #[arg(long)]
        quick: bool,
        /// Faults of each kind (default 100; 5 with --quick).
        #[arg(long)]
        faults: Option<usize>,
    },
    /// Build the Debian package (target/deb/tlsrelay_<version>_amd64.deb)
    /// and check it: unpacked into a scratch root, its binary checks its
    /// configuration.
    Deb,
    /// Build the book (mdBook, docs/), the man pages and the shell
    /// completions into target/docs/; any mdBook warning fails it.
    Docs,
    /// Everything CI runs: formatting, lints, the whole test suite, the
    /// kTLS VM tests, fuzzing, short soak and chaos runs, the bench's
    /// smoke runs, the book and man pages, the alerting rules' tests, the
    /// demo.
    Ci {
        /// Run the test suite (`cargo test --workspace`) this many times
        /// in a row, stopping at the first failure: a test that fails one
        /// run in three shows here before it costs a landing.
        #[arg(long, default_value_t = 1, value_name = "N")]
        repeat: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Demo { once } => demo(once),
        Task::BuildEbpf => ebpf::build(),
        Task::Bench {
            quick,
            vm: false,
            only,
            profile,
        } => bench::bench(quick, bench::Select::new(only, profile)),
        Task::Bench {
            quick, vm: true, ..
        } => bench::bench_vm(quick),
        Task::Vmtest { only } => vm::vmtest(only.as_deref()),
        Task::Fuzz { minutes } => fuzz(FUZZ_TARGETS, minutes * 60.0),
        Task::Soak {
            quick,
            connections,
            seconds,
        } => soak::soak(soak::SoakOptions {
            quick,
            connections,
            seconds,
        }),
        Task::Chaos { quick, faults } => chaos::chaos(chaos::ChaosOptions { quick, faults }),
        Task::Deb => deb::build().and_then(|deb| deb::check(&deb)),
        Task::Docs => docs::build(),
        Task::Ci { repeat } => ci(repeat),
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Builds the relay and the load generator for the bench and returns
/// their directory: optimised, or for a smoke run (`quick`) the debug build
/// the tests already made — a smoke run checks the harness, not the numbers.
fn build_bench_binaries(quick: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "-p", "tlsrelay", "-p", "tlsrelay-bench"]);
    if !quick {
        cmd.arg("--release");
    }
    let profile = if quick { "debug" } else { "release" };
    run(
        &format!("build the relay and the load generator ({profile})"),
        &mut cmd,
    )?;
    Ok(root().join("target").join(profile))
}

fn run(step: &str, cmd: &mut Command) -> anyhow::Result<()> {
    println!("\n=== {step}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start: {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

fn ci(repeat: usize) -> anyhow::Result<()> {
    println!("\n=== prerequisites");
    prereqs::ensure_for_ci()?;
    ebpf::ensure_toolchain()?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    // Offline: the advisory database lives on GitHub, which CI cannot reach.
    run(
        "cargo deny check bans licenses sources",
        cargo().args(["deny", "check", "bans", "licenses", "sources"]),
    )?;
    // cargo-machete takes CARGO_PKG_NAME (cargo sets it for xtask) to mean
    // it runs under `cargo run`, and then reads `machete` as a path.
    run(
        "cargo machete (unused dependencies)",
        cargo().env_remove("CARGO_PKG_NAME").arg("machete"),
    )?;
    run(
        "cargo clippy -D warnings",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    for round in 1..=repeat.max(1) {
        let step = match repeat {
            0 | 1 => "cargo test".to_string(),
            n => format!("cargo test (run {round} of {n})"),
        };
        run(&step, cargo().args(["test", "--workspace"]))?;
    }
    run("kTLS tests in the VM", cargo().args(["xtask", "vmtest"]))?;
    docs::build()?;
    docs::check_alert_rules()?;
    println!("\n=== the Debian package");
    deb::check(&deb::build()?)?;
    fuzz(FUZZ_TARGETS, 10.0)?;
    // Short runs: the harnesses and their verdicts, at a smaller scale.
    run(
        "soak, short (2,000 sessions for 60 s)",
        cargo().args(["xtask", "soak", "--quick"]),
    )?;
    run(
        "chaos, short (5 of each fault)",
        cargo().args(["xtask", "chaos", "--quick"]),
    )?;
    // The harness, not the numbers: every scenario runs once, small.
    run(
        "bench smoke run",
        cargo().args(["xtask", "bench", "--quick"]),
    )?;
    run(
        "bench smoke run in the kTLS VM",
        cargo().args(["xtask", "bench", "--vm", "--quick"]),
    )?;
    run(
        "demo (scripted clients, then exit)",
        cargo().args(["xtask", "demo", "--once"]),
    )?;
    println!("\nci: all steps passed");
    Ok(())
}

/// The fuzz targets: every parser that reads what a peer or an operator
/// wrote.
const FUZZ_TARGETS: &[&str] = &[
    "smtp_server",
    "smtp_replies",
    "smtp_forward",
    "smtp_next_hop",
    "proxy_header",
    "tls_hello",
    "config",
];

/// Runs each fuzz target for `seconds` (cargo fuzz, nightly) and prints
/// how many inputs it ran; the first crash fails.
fn fuzz(targets: &[&str], seconds: f64) -> anyhow::Result<()> {
    let mut executions = Vec::new();
    for target in targets {
        println!("\n=== fuzz {target} for {seconds:.0} s");
        let out = Command::new("cargo")
            .current_dir(root())
            .args([
                "+nightly",
                "fuzz",
                "run",
                "--fuzz-dir",
                "fuzz",
                // The targets are safe Rust: panics are what fuzzing finds,
                // and skipping ASAN saves CI two minutes of building.
                "--sanitizer",
                "none",
                target,
                "--",
            ])
            .arg(format!("-max_total_time={}", seconds.round() as u64))
            .arg(format!("-dict={}", root().join("fuzz/smtp.dict").display()))
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cannot start cargo fuzz for {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            eprintln!("{log}");
            bail!("fuzz {target} failed ({})", out.status);
        }
        // libFuzzer's last line: "Done N runs in S second(s)".
        let runs = log
            .lines()
            .rev()
            .find_map(|l| {
                l.strip_prefix("Done ")?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        executions.push((*target, runs));
    }
    println!("\nfuzz: executions per target, 0 crashes");
    for (target, runs) in executions {
        println!("{target:<14} {runs:>14}");
    }
    Ok(())
}

/// A child process killed when the demo ends, however it ends.
/// Children started by the demo and the bench are each a process group's
/// leader ([`own_group`]), so the group goes with them: nginx's workers
/// outlived a master killed alone.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: signals our child's process group (ESRCH if it has none).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `tlsrelay-load` helper (a sink, a next hop, a peer) in its own
/// process group, its output discarded.
fn spawn_load(bin: &Path, args: &[&str]) -> anyhow::Result<Guard> {
    Ok(Guard(
        own_group(
            Command::new(bin.join("tlsrelay-load"))
                .args(args)
                .stdout(Stdio::null()),
        )
        .spawn()
        .with_context(|| format!("starting tlsrelay-load {}", args[0]))?,
    ))
}

/// Starts a command as the leader of a new process group.
fn own_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
}

fn wait_for_port(addr: SocketAddr, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not listen on {addr} within 30 s")
}

/// The embedded default's addresses (relay/src/default.toml).
const OPPORTUNISTIC: &str = "127.0.0.1:4430";
const REQUIRED: &str = "127.0.0.1:4431";
const UPSTREAM: &str = "127.0.0.1:4432";
const MX: &str = "127.0.0.1:2525";
const MAIL_SINK: &str = "127.0.0.1:2526";

/// The mail edge's cases: a message without and with STARTTLS, and one to
/// a connector that requires TLS its next hop lacks. The number that did
/// not end as the policy says.
fn demo_mail(bin: &Path) -> anyhow::Result<usize> {
    let cases = [
        (
            "mail without STARTTLS -> mx: relayed to the sink, the cleartext recorded as a downgrade",
            false,
            "postmaster@example.org",
            0,
        ),
        (
            "mail over STARTTLS -> mx: relayed (the sink offers no STARTTLS: the opportunistic connector goes on in plaintext and says so)",
            true,
            "postmaster@example.org",
            0,
        ),
        (
            "mail for partner.example, whose connector requires TLS its next hop lacks: 451 4.7.5, the sender keeps it",
            true,
            "someone@partner.example",
            4,
        ),
    ];
    let mut surprises = 0;
    for (title, starttls, rcpt, expected) in cases {
        println!("\n=== {title}");
        let mut mail = Command::new(bin.join("tlsrelay-load"));
        mail.args(["mail", "--to", MX, "--rcpt", rcpt]);
        if starttls {
            mail.arg("--starttls");
        }
        let status = mail.status().context("running the demo mail client")?;
        std::thread::sleep(Duration::from_millis(300));
        if status.code() != Some(expected) {
            surprises += 1;
            println!("!!! unexpected: the message ended with exit {status}, expected {expected}");
        }
    }
    Ok(surprises)
}

fn demo(once: bool) -> anyhow::Result<()> {
    // The wire counters need the eBPF toolchain and root; without either
    // the demo runs on and the relay says the counters are off.
    if let Err(e) = ebpf::ensure_toolchain() {
        println!("demo: building without the eBPF program ({e:#})");
    }
    run(
        "build the relay and the demo peers",
        cargo().args(["build", "-p", "tlsrelay", "-p", "tlsrelay-bench"]),
    )?;
    let bin = root().join("target/debug");
    let state = root().join("target/demo-state");

    println!("\n=== start a local echo upstream on {UPSTREAM}");
    let mut echo = Guard(
        Command::new(bin.join("tlsrelay-load"))
            .args(["echo", "--listen", UPSTREAM])
            .spawn()
            .context("starting the echo upstream")?,
    );
    wait_for_port(UPSTREAM.parse()?, &mut echo.0, "echo upstream")?;
    println!("\n=== start a local SMTP next hop (a sink, no STARTTLS) on {MAIL_SINK}");
    let mut sink = Guard(
        Command::new(bin.join("tlsrelay-load"))
            .args(["smtp-sink", "--listen", MAIL_SINK])
            .spawn()
            .context("starting the SMTP sink")?,
    );
    wait_for_port(MAIL_SINK.parse()?, &mut sink.0, "SMTP sink")?;

    println!("\n=== start tlsrelay on its embedded default (no config file)");
    let mut relay = Guard(
        Command::new(bin.join("tlsrelay"))
            .arg("run")
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .spawn()
            .context("starting tlsrelay")?,
    );
    wait_for_port(OPPORTUNISTIC.parse()?, &mut relay.0, "tlsrelay")?;
    wait_for_port(REQUIRED.parse()?, &mut relay.0, "tlsrelay")?;
    wait_for_port(MX.parse()?, &mut relay.0, "tlsrelay")?;
    // The readiness probes above were sessions too; let their reports print
    // before the scripted clients start.
    std::thread::sleep(Duration::from_millis(300));

    let cases = [
        (
            "TLS client -> opportunistic listener: relayed encrypted",
            OPPORTUNISTIC,
            true,
            true,
        ),
        (
            "plaintext client -> opportunistic listener: relayed in plaintext, downgrade recorded",
            OPPORTUNISTIC,
            false,
            true,
        ),
        (
            "TLS client -> required listener: relayed encrypted",
            REQUIRED,
            true,
            true,
        ),
        (
            "plaintext client -> required listener: refused",
            REQUIRED,
            false,
            false,
        ),
    ];
    let mut surprises = 0;
    for (title, addr, tls, should_relay) in cases {
        println!("\n=== {title}");
        let mut send = Command::new(bin.join("tlsrelay-load"));
        send.args(["send", "--to", addr, "--bytes", "65536"]);
        if tls {
            send.arg("--tls");
        }
        let status = send.status().context("running the demo client")?;
        // Give the relay a moment to print the session report.
        std::thread::sleep(Duration::from_millis(300));
        if status.success() != should_relay {
            surprises += 1;
            println!(
                "!!! unexpected: the client {} an echo",
                if status.success() {
                    "got"
                } else {
                    "did not get"
                }
            );
        }
    }
    surprises += demo_mail(&bin)?;
    if surprises > 0 {
        bail!("{surprises} demo case(s) did not behave as the policy says");
    }
    if Path::new("/sys/fs/bpf/tlsrelay/negotiated").exists() {
        println!("\n=== what the eBPF program saw on the wire (tlsrelay stats)");
        let stats = Command::new(bin.join("tlsrelay")).arg("stats").status()?;
        if stats.code() == Some(3) {
            bail!("the wire and the relay disagree about a demo session (see above)");
        }
    }
    if once {
        println!("\ndemo: every policy behaved as configured");
        return Ok(());
    }
    println!(
        "\n=== tlsrelay is still running; try your own client, e.g.\n\
         \x20   openssl s_client -connect {OPPORTUNISTIC} -quiet     (TLS, echoed)\n\
         \x20   nc 127.0.0.1 4430                                   (plaintext, echoed, downgrade logged)\n\
         \x20   nc 127.0.0.1 4431                                   (plaintext, refused)\n\
         \x20   swaks --server {MX} --to postmaster@example.org --tls   (mail over STARTTLS)\n\
         \x20   openssl s_client -starttls smtp -connect {MX} -quiet (STARTTLS by hand)\n\
         Its self-signed certificate is in {}.\nPress Ctrl-C to stop.",
        state.display()
    );
    let status = relay.0.wait()?;
    println!("tlsrelay exited ({status})");
    Ok(())
}
