//! `cargo xtask bench`: throughput and relay CPU per GB for the four relay
//! scenarios, each run alternately with a direct connection to the same
//! sink (A B A B …) so the ratios hold on a noisy machine.
//!
//! So far tlsrelay against the direct baseline only; the peers (stunnel,
//! haproxy, nginx, socat), latency-bound and handshake scenarios, RSS per
//! idle connection and the charts are issue #6's remaining work.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{cargo, root, run};

struct Scenario {
    name: &'static str,
    client_tls: bool,
    listener_mode: &'static str,
    /// The upstream speaks TLS (route `required`, encryption only).
    upstream_tls: bool,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "plaintext relay",
        client_tls: false,
        listener_mode: "off",
        upstream_tls: false,
    },
    Scenario {
        name: "TLS termination",
        client_tls: true,
        listener_mode: "implicit",
        upstream_tls: false,
    },
    Scenario {
        name: "TLS origination",
        client_tls: false,
        listener_mode: "off",
        upstream_tls: true,
    },
    Scenario {
        name: "TLS bridge",
        client_tls: true,
        listener_mode: "implicit",
        upstream_tls: true,
    },
];

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn wait_port(addr: SocketAddr, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        if let Some(status) = child.try_wait()? {
            bail!("exited ({status}) before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0) // USER_HZ
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn blast(
    load: &Path,
    to: SocketAddr,
    tls: bool,
    connections: usize,
    bytes: u64,
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(load);
    cmd.args([
        "blast",
        "--to",
        &to.to_string(),
        "--connections",
        &connections.to_string(),
    ])
    .args(["--bytes", &bytes.to_string()]);
    if tls {
        cmd.arg("--tls");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("blast failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn bench(quick: bool) -> anyhow::Result<()> {
    run(
        "build the relay and the load generator (release)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "tlsrelay",
            "-p",
            "tlsrelay-bench",
        ]),
    )?;
    let bin = root().join("target/release");
    let (relay_bin, load) = (bin.join("tlsrelay"), bin.join("tlsrelay-load"));
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    run(
        "certificates",
        Command::new(&load).args(["certs", "--out"]).arg(&dir),
    )?;
    let (cert, key) = (dir.join("bench.crt"), dir.join("bench.key"));
    let (plain_sink, tls_sink) = (free_addr()?, free_addr()?);
    let mut sinks = Vec::new();
    for (addr, tls) in [(plain_sink, false), (tls_sink, true)] {
        let mut cmd = Command::new(&load);
        cmd.args(["sink", "--listen", &addr.to_string()])
            .stdout(Stdio::null());
        if tls {
            cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
        let mut child = Guard(cmd.spawn()?);
        wait_port(addr, &mut child.0)?;
        sinks.push(child);
    }
    let total: u64 = if quick { 256 << 20 } else { 2 << 30 };
    let concurrencies: &[usize] = if quick { &[1, 16] } else { &[1, 16, 256] };
    let rounds = if quick { 1 } else { 3 };
    let mut rows = Vec::new();
    let mut samples = Vec::new();
    println!(
        "\n{:<16} {:>5} {:>10} {:>10} {:>22} {:>10}  path",
        "scenario", "conns", "relay", "direct", "ratio min/med/max", "CPU s/GB"
    );
    for s in &SCENARIOS {
        for &conns in concurrencies {
            let bytes = total / conns as u64;
            let (mut relay_g, mut direct_g, mut ratios, mut cpu) = (vec![], vec![], vec![], vec![]);
            let mut path = String::new();
            for _ in 0..rounds {
                let (gbit, cpu_per_gb, p) = relay_run(
                    &relay_bin, &load, &dir, s, plain_sink, tls_sink, conns, bytes, &cert, &key,
                )?;
                let direct = blast(
                    &load,
                    if s.client_tls { tls_sink } else { plain_sink },
                    s.client_tls,
                    conns,
                    bytes,
                )?;
                let direct_gbit = direct["gbit_per_s"].as_f64().unwrap_or(0.0);
                relay_g.push(gbit);
                direct_g.push(direct_gbit);
                ratios.push(gbit / direct_gbit);
                cpu.push(cpu_per_gb);
                path = p;
                samples.push(serde_json::json!({
                    "scenario": s.name, "connections": conns, "relay_gbit_per_s": gbit,
                    "direct_gbit_per_s": direct_gbit, "relay_cpu_s_per_gb": cpu_per_gb, "path": path,
                }));
            }
            let (lo, hi) = (
                ratios.iter().copied().fold(f64::MAX, f64::min),
                ratios.iter().copied().fold(0.0, f64::max),
            );
            let row = format!(
                "{:<16} {:>5} {:>8.2}Gb {:>8.2}Gb {:>6.2}/{:>6.2}/{:>6.2} {:>10.2}  {}",
                s.name,
                conns,
                median(relay_g),
                median(direct_g),
                lo,
                median(ratios),
                hi,
                median(cpu),
                path
            );
            println!("{row}");
            rows.push(row);
        }
    }
    let report = serde_json::json!({ "quick": quick, "samples": samples });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "\nratio = relay / direct connection to the same sink (same client, same bytes), {rounds} alternating round(s).\n\
         Peers (stunnel, haproxy, nginx, socat) are not in this harness yet.\nreport: {}",
        dir.join("report.json").display()
    );
    Ok(())
}

/// One run through the relay: Gbit/s, relay CPU seconds per GB, data path.
#[allow(clippy::too_many_arguments)]
fn relay_run(
    relay: &Path,
    load: &Path,
    dir: &Path,
    s: &Scenario,
    plain_sink: SocketAddr,
    tls_sink: SocketAddr,
    conns: usize,
    bytes: u64,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(f64, f64, String)> {
    let listen = free_addr()?;
    let upstream = if s.upstream_tls { tls_sink } else { plain_sink };
    let route = if s.upstream_tls {
        "tls.policy = \"required\"\ntls.verify = \"encryption-only\""
    } else {
        "tls.policy = \"plain\""
    };
    let config: PathBuf = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\n[limits]\nmax_connections = 100000\n\n[[listeners]]\nname = \"bench\"\naddress = \"{listen}\"\nupstream = \"sink\"\ntls.mode = \"{}\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n\n[[upstreams]]\nname = \"sink\"\naddress = \"{upstream}\"\n{route}\n",
            s.listener_mode,
            cert.display().to_string(),
            key.display().to_string()
        ),
    )?;
    let mut child = Guard(
        Command::new(relay)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .spawn()?,
    );
    wait_port(listen, &mut child.0)?;
    let stdout = child.0.stdout.take().context("relay stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Skip the readiness probe's empty session.
            if line.contains("bytes=0/0") {
                continue;
            }
            if let Some(i) = line.find(" path=") {
                let path: String = line[i + 6..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(path);
            }
        }
    });
    let pid = child.0.id();
    let before = cpu_seconds(pid)?;
    let result = blast(load, listen, s.client_tls, conns, bytes)?;
    let cpu = cpu_seconds(pid)? - before;
    let gb = result["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    let path = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| "?".into());
    Ok((result["gbit_per_s"].as_f64().unwrap_or(0.0), cpu / gb, path))
}
