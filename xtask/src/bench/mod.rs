//! `cargo xtask bench`: tlsrelay and its peers (stunnel, haproxy, nginx,
//! socat) on the same work in the same run — same certificates, generator
//! and sinks — in alternating rounds (A B C … A B C …), so the ratios hold
//! on a noisy machine. A direct connection to the sink runs as a pseudo-peer
//! for reference.
//!
//! Tables: stream throughput and relay CPU per GB (scenarios 1–4),
//! request/response latency (1–4), SMTP STARTTLS relay (5), TLS 1.3
//! handshake rate with ECDSA P-256 and RSA 2048 (6), and RSS per idle
//! connection. Output: stdout, `target/bench/report.json`, one SVG chart
//! per table and scenario.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{own_group, root, run, wait_for_port, Guard};

mod measure;
mod peers;
mod postfix;
mod report;
mod scenarios;

use measure::*;
pub(crate) use measure::{free_addr, raise_open_files, tree_rss_bytes};
use peers::*;
use report::*;
use scenarios::*;

/// Two TLS sinks of each kind, the pool a routing cell passes to.
#[derive(Clone, Copy)]
struct RoutingSinks {
    discard: [SocketAddr; 2],
    echo: [SocketAddr; 2],
}

struct Bench {
    relay_bin: PathBuf,
    load: PathBuf,
    dir: PathBuf,
    open_files: u64,
    peers: Vec<Peer>,
    rounds: usize,
    quick: bool,
    discard: SinkPair,
    echo: SinkPair,
    smtp_sink: SocketAddr,
    /// Pools of two TLS sinks for the routing cells.
    routing: RoutingSinks,
    ecdsa: Certs,
    rows: Vec<Row>,
    /// Process groups of the peers started in the current cell.
    groups: std::cell::RefCell<Vec<u32>>,
    select: Select,
    /// The table whose header was printed last.
    headed: std::cell::Cell<Option<&'static str>>,
    /// The file stem of the current cell's profile, when profiling.
    profiling: std::cell::RefCell<Option<String>>,
}

/// Which cells run, and whether tlsrelay is recorded with `perf` in them.
pub struct Select {
    /// Lower-case text a cell's "table scenario x" must contain.
    cells: Option<String>,
    profile: bool,
}

impl Select {
    pub fn new(only: Option<String>, profile: Option<String>) -> Select {
        Select {
            profile: profile.is_some(),
            cells: only.or(profile).map(|c| c.to_lowercase()),
        }
    }

    fn takes(&self, t: &Table, scenario: &str, x: &str) -> bool {
        let name = format!("{} {scenario} {x}", t.name).to_lowercase();
        self.cells
            .as_ref()
            .is_none_or(|c| name.contains(c.as_str()))
    }
}

pub fn bench(quick: bool, select: Select) -> anyhow::Result<()> {
    let bin = crate::build_bench_binaries(quick)?;
    install_missing_peers();
    if select.profile {
        install_perf()?;
    }
    let open_files = raise_open_files();
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let load = bin.join("tlsrelay-load");
    run(
        "certificates (ECDSA P-256, RSA 2048)",
        Command::new(&load).args(["certs", "--out"]).arg(&dir),
    )?;
    let ecdsa = Certs::new(&dir, "bench", "ECDSA P-256");
    let rsa = Certs::new(&dir, "bench-rsa", "RSA 2048");
    let mut sinks = Vec::new();
    let mut sink = |args: &[&str], tls: bool| -> anyhow::Result<SocketAddr> {
        let addr = free_addr()?;
        let mut cmd = Command::new(&load);
        cmd.args(args)
            .args(["--listen", &addr.to_string()])
            .stdout(Stdio::null());
        if tls {
            cmd.arg("--cert")
                .arg(&ecdsa.cert)
                .arg("--key")
                .arg(&ecdsa.key);
        }
        let mut child = Guard(own_group(&mut cmd).spawn()?);
        wait_for_port(addr, &mut child.0, "sink")?;
        sinks.push(child);
        Ok(addr)
    };
    let discard = SinkPair {
        plain: sink(&["sink"], false)?,
        tls: sink(&["sink"], true)?,
    };
    let echo = SinkPair {
        plain: sink(&["sink", "--echo"], false)?,
        tls: sink(&["sink", "--echo"], true)?,
    };
    let smtp_sink = sink(&["smtp-sink"], true)?;
    let routing = RoutingSinks {
        discard: [discard.tls, sink(&["sink"], true)?],
        echo: [echo.tls, sink(&["sink", "--echo"], true)?],
    };
    let mut peers: Vec<Peer> = Peer::RELAYS.into_iter().filter(|p| p.installed()).collect();
    peers.push(Peer::Direct);
    let mut b = Bench {
        relay_bin: bin.join("tlsrelay"),
        load,
        dir: dir.clone(),
        open_files,
        peers,
        rounds: if quick || select.profile { 1 } else { 3 },
        quick,
        discard,
        echo,
        smtp_sink,
        routing,
        ecdsa,
        rows: Vec::new(),
        groups: Default::default(),
        select,
        headed: Default::default(),
        profiling: Default::default(),
    };
    let concurrencies: &[usize] = if quick { &[16] } else { &[1, 16, 256] };

    let total: u64 = if quick { 32 << 20 } else { 512 << 20 };
    for s in &STREAMS {
        for &conns in concurrencies {
            b.cell(&THROUGHPUT, s.name, conns.to_string(), |b, peer| {
                b.throughput(peer, s, conns, total / conns as u64)
            })?;
        }
    }
    let seconds = if quick { 0.3 } else { 2.0 };
    for s in &STREAMS {
        for &conns in concurrencies {
            b.cell(&LATENCY, s.name, conns.to_string(), |b, peer| {
                b.latency(peer, s, conns, seconds)
            })?;
        }
    }
    for (use_rsa, resume) in [(false, false), (true, false), (false, true)] {
        let label = if use_rsa { rsa.label } else { b.ecdsa.label };
        let kind = if resume { "resumed" } else { "full" };
        let scenario = format!("TLS 1.3 {label} {kind}");
        for &conns in concurrencies {
            b.cell(&HANDSHAKES, &scenario, conns.to_string(), |b, peer| {
                let certs = if use_rsa { &rsa } else { &b.ecdsa };
                b.handshakes(peer, certs, conns, seconds, resume)
            })?;
        }
    }
    for &conns in concurrencies {
        b.cell(
            &ROUTING_THROUGHPUT,
            "SNI passthrough",
            conns.to_string(),
            |b, peer| {
                b.routed(
                    peer,
                    Routed::Throughput {
                        bytes: total / conns as u64,
                    },
                    conns,
                )
            },
        )?;
    }
    for &conns in concurrencies {
        b.cell(
            &ROUTING_LATENCY,
            "SNI passthrough",
            conns.to_string(),
            |b, peer| b.routed(peer, Routed::Latency { seconds }, conns),
        )?;
    }
    for &conns in concurrencies {
        b.cell(
            &ROUTING_HANDSHAKES,
            "SNI passthrough",
            conns.to_string(),
            |b, peer| b.routed(peer, Routed::Handshakes { seconds }, conns),
        )?;
    }
    let failover_seconds = if quick { 2.0 } else { 4.0 };
    b.cell(&FAILOVER, "server killed", "8".into(), |b, peer| {
        b.failover(peer, 8, failover_seconds)
    })?;
    let sizes: &[(usize, &str)] = if quick {
        &[(1 << 10, "1 KiB"), (100 << 10, "100 KiB")]
    } else {
        &[
            (1 << 10, "1 KiB"),
            (100 << 10, "100 KiB"),
            (10 << 20, "10 MiB"),
        ]
    };
    for bdat in [false, true] {
        let scenario = format!("SMTP {}", if bdat { "BDAT" } else { "DATA" });
        for &conns in concurrencies {
            for &(size, label) in sizes {
                // About 128 MiB per cell (16 MiB quick), at least 2
                // messages per connection and at most 200.
                let budget = if quick { 16usize << 20 } else { 128 << 20 };
                let messages = (budget / size / conns).clamp(2, 200);
                if size * messages * conns > 4 << 30 {
                    continue;
                }
                let x = format!("{label} x{conns}");
                let work = SmtpWork {
                    senders: conns,
                    sessions: 1,
                    messages,
                    size,
                    bdat,
                    starttls: true,
                };
                b.cell(&SMTP, &scenario, x, |b, peer| b.smtp(peer, &work))?;
            }
        }
    }
    // A session per message, as most MTAs send to another organisation:
    // the relay's own next-hop connections are what it can save.
    for starttls in [false, true] {
        let x = format!("1 KiB x16 {}", if starttls { "STARTTLS" } else { "plain" });
        let work = SmtpWork {
            senders: 16,
            sessions: if quick { 20 } else { 200 },
            messages: 1,
            size: 1 << 10,
            bdat: false,
            starttls,
        };
        b.cell(&SMTP, "SMTP session per msg", x, |b, peer| {
            b.smtp(peer, &work)
        })?;
    }
    let counts: &[usize] = if quick { &[100] } else { &[1, 1000, 10000] };
    // Two descriptors per relayed connection must fit the open-file limit
    // (a container may not let it be raised): take as many as fit.
    let fit = (b.open_files.saturating_sub(200) / 2) as usize;
    if counts.iter().any(|&c| c > fit) {
        println!(
            "(open-file limit {}: at most {fit} idle connections)",
            b.open_files
        );
    }
    let mut counts: Vec<usize> = counts.iter().map(|&c| c.min(fit)).collect();
    counts.dedup();
    for count in counts {
        b.cell(&IDLE, TERMINATION.name, count.to_string(), |b, peer| {
            b.idle(peer, count)
        })?;
    }
    if let (Some(cells), true) = (&b.select.cells, b.rows.is_empty()) {
        anyhow::bail!(
            "no bench cell is named with {cells:?}: a cell is \"table scenario x\", e.g. \"throughput TLS termination 16\" or \"routing handshakes\""
        );
    }
    b.finish()
}

/// `cargo xtask bench --vm`: kTLS against userspace for tlsrelay on the
/// VM's kernel, the same blast alternating between the two. The guest's
/// clock counts instructions (qemu -icount), so the relay's time on the
/// CPU is its instruction count (kernel TLS work in its syscalls
/// included): per GB relayed, it is a cost figure the host's load does not
/// move.
pub fn bench_vm(quick: bool) -> anyhow::Result<()> {
    let (runs, crypto) = crate::vm::bench(quick)?;
    println!("\n== the guest kernel's AEAD implementations (algorithm, driver, priority)");
    for line in &crypto {
        println!("{line}");
    }
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    println!(
        "\n== kTLS in the VM: the relay's instructions per GB relayed (qemu -icount; an emulated CPU's instructions, not host time)\n{:<21} {:>5} {:<5} {:>14} {:>16}  path",
        "scenario", "conns", "kTLS", "Ginstr/GB", "kTLS/userspace"
    );
    let bytes = |r: &serde_json::Value| r["result"]["bytes"].as_f64().unwrap_or(f64::NAN);
    // A guest nanosecond is an instruction: ns per byte is Ginstr per GB.
    let relay = |r: &serde_json::Value| r["relay_ns"].as_f64().unwrap_or(f64::NAN) / bytes(r);
    let mut cells: Vec<(String, u64)> = Vec::new();
    for r in &runs {
        let cell = (
            r["scenario"].as_str().unwrap_or("?").to_string(),
            r["connections"].as_u64().unwrap_or(0),
        );
        if !cells.contains(&cell) {
            cells.push(cell);
        }
    }
    let spread = |ratios: Vec<f64>| {
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        format!("{lo:.2}/{:.2}/{hi:.2}", median(ratios))
    };
    for (scenario, conns) in &cells {
        let of = |ktls: bool| -> Vec<&serde_json::Value> {
            runs.iter()
                .filter(|r| {
                    r["scenario"] == scenario.as_str()
                        && r["connections"] == *conns
                        && r["ktls"] == ktls
                })
                .collect()
        };
        let (on, off) = (of(true), of(false));
        let ratios: Vec<f64> = on
            .iter()
            .zip(&off)
            .map(|(a, b)| relay(a) / relay(b))
            .collect();
        for (ktls, set) in [(true, &on), (false, &off)] {
            println!(
                "{:<21} {:>5} {:<5} {:>14.2} {:>16}  {}",
                scenario,
                conns,
                if ktls { "on" } else { "off" },
                median(set.iter().map(|r| relay(r)).collect()),
                if ktls {
                    spread(ratios.clone())
                } else {
                    String::new()
                },
                set.last().and_then(|r| r["path"].as_str()).unwrap_or("")
            );
        }
    }
    let json = dir.join("vm-report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&runs)?)?;
    println!(
        "\nGinstr/GB: billions of guest instructions the relay process ran (all threads, kernel work in its syscalls included) per GB relayed, median of rounds.\nkTLS/userspace: with kTLS over without, per round: min/median/max (below 1: kTLS costs fewer).\nreport: {}",
        json.display()
    );
    Ok(())
}

impl Bench {
    /// Runs every peer in turn, `rounds` times, and prints a row per peer.
    /// A peer that fails is shown as failed; tlsrelay failing stops the
    /// bench.
    fn cell(
        &mut self,
        t: &'static Table,
        scenario: &str,
        x: String,
        mut one: impl FnMut(&Bench, Peer) -> anyhow::Result<Option<(Sample, String)>>,
    ) -> anyhow::Result<()> {
        if !self.select.takes(t, scenario, &x) {
            return Ok(());
        }
        self.header(t);
        let profile = self.select.profile;
        if profile {
            let stem: String = format!("profile-{} {scenario} {x}", t.name)
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect();
            *self.profiling.borrow_mut() = Some(stem);
        }
        let mut rows: Vec<Row> = self
            .peers
            .iter()
            .filter(|&&peer| t.splices || peer != Peer::TlsrelayEpoll)
            .filter(|&&peer| peer != Peer::Postfix || t.name == SMTP.name)
            .filter(|&&peer| !profile || peer == Peer::Tlsrelay)
            .map(|&peer| Row {
                table: t.name,
                scenario: scenario.to_string(),
                x: x.clone(),
                peer,
                runs: Vec::new(),
                ratios: Vec::new(),
                path: String::new(),
                failed: None,
            })
            .collect();
        for _ in 0..self.rounds {
            for row in rows.iter_mut() {
                if row.failed.is_some() {
                    continue;
                }
                match one(self, row.peer) {
                    Ok(Some((sample, path))) => {
                        row.runs.push(sample);
                        row.path = path;
                    }
                    Ok(None) => {}
                    Err(e) if row.peer.is_tlsrelay() => {
                        return Err(e.context(format!(
                            "{} {} {scenario} {x}",
                            row.peer.name(),
                            t.name
                        )))
                    }
                    Err(e) => row.failed = Some(format!("{e:#}")),
                }
            }
        }
        let ours: Vec<f64> = rows[0].runs.iter().map(|r| r[t.primary]).collect();
        for row in rows.iter_mut() {
            let theirs = row.runs.iter().map(|r| r[t.primary]);
            row.ratios = ours.iter().zip(theirs).map(|(a, b)| a / b).collect();
            self.print(t, row);
        }
        self.rows.extend(rows);
        self.nothing_left(t.name, scenario, &x)
    }

    /// Fails when a process the bench started outlived its cell (a
    /// peer's workers surviving their master).
    fn nothing_left(&self, table: &str, scenario: &str, x: &str) -> anyhow::Result<()> {
        let groups = std::mem::take(&mut *self.groups.borrow_mut());
        // A killed group's members may take a moment to go, and a child
        // forked while the group was being killed (an nginx master
        // replacing a worker) escapes that kill: kill the groups again.
        let mut left = leftovers(&groups);
        if !left.is_empty() {
            println!(
                "(ending processes that outlived their peer: {})",
                left.join(", ")
            );
        }
        for _ in 0..20 {
            if left.is_empty() {
                break;
            }
            for &g in &groups {
                // SAFETY: signals a process group this bench created.
                unsafe { libc::kill(-(g as i32), libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
            left = leftovers(&groups);
        }
        if left.is_empty() {
            return Ok(());
        }
        bail!(
            "{table} {scenario} {x}: processes left behind: {}",
            left.join(", ")
        )
    }
}
