//! `cargo xtask bench`: throughput and relay CPU per GB for the four relay
//! scenarios, each run alternately with a direct connection to the same
//! sink (A B A B …) so the ratios hold on a noisy machine.
//!
//! Peers (stunnel, haproxy, nginx, socat) run the same scenarios with the
//! same certificate, client and sink when installed. Still to come (issue
//! #6): SMTP and handshake-rate scenarios, latency-bound runs, RSS per
//! idle connection, peer installation, the charts and the VM run.

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

/// What relays in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Tlsrelay,
    Stunnel,
    Haproxy,
    Nginx,
    Socat,
}

impl Peer {
    const ALL: [Peer; 5] = [
        Peer::Tlsrelay,
        Peer::Stunnel,
        Peer::Haproxy,
        Peer::Nginx,
        Peer::Socat,
    ];

    fn name(self) -> &'static str {
        match self {
            Peer::Tlsrelay => "tlsrelay",
            Peer::Stunnel => "stunnel",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
            Peer::Socat => "socat",
        }
    }

    fn installed(self) -> bool {
        let bin = match self {
            Peer::Tlsrelay => return true,
            Peer::Stunnel => "stunnel4",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
            Peer::Socat => "socat",
        };
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Files every peer is configured with.
struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file (haproxy, socat).
    pem: PathBuf,
}

/// The command that runs `peer` for `s` listening on `listen`, relaying to
/// `upstream`; `None` when the peer cannot do the scenario.
fn peer_command(
    peer: Peer,
    s: &Scenario,
    listen: SocketAddr,
    upstream: SocketAddr,
    f: &Files,
) -> anyhow::Result<Option<Command>> {
    let (tls_in, tls_out) = (s.client_tls, s.upstream_tls);
    let config = f.dir.join(format!("{}.conf", peer.name()));
    let cmd = match peer {
        Peer::Tlsrelay => unreachable!("run by relay_run"),
        Peer::Socat => {
            let l = if tls_in {
                format!(
                    "OPENSSL-LISTEN:{},bind=127.0.0.1,fork,reuseaddr,backlog=4096,cert={},verify=0",
                    listen.port(),
                    f.pem.display()
                )
            } else {
                format!(
                    "TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                    listen.port()
                )
            };
            let c = if tls_out {
                format!("OPENSSL:{upstream},verify=0")
            } else {
                format!("TCP:{upstream}")
            };
            let mut cmd = Command::new("socat");
            cmd.args([l, c]);
            cmd
        }
        Peer::Stunnel => {
            if tls_in == tls_out {
                return Ok(None); // one TLS side per service
            }
            std::fs::write(
                &config,
                format!(
                    "foreground = yes\npid =\n[bench]\naccept = {listen}\nconnect = {upstream}\ncert = {}\nkey = {}\n{}",
                    f.cert.display(),
                    f.key.display(),
                    if tls_out { "client = yes\n" } else { "" }
                ),
            )?;
            let mut cmd = Command::new("stunnel4");
            cmd.arg(&config);
            cmd
        }
        Peer::Haproxy => {
            std::fs::write(
                &config,
                format!(
                    "global\n  maxconn 5000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind {listen}{}\n  default_backend b\nbackend b\n  server s {upstream}{}\n",
                    if tls_in { format!(" ssl crt {}", f.pem.display()) } else { String::new() },
                    if tls_out { " ssl verify none" } else { "" }
                ),
            )?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&config);
            cmd
        }
        Peer::Nginx => {
            std::fs::write(
                &config,
                format!(
                    "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nworker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.err;\nevents {{ worker_connections 10000; }}\nstream {{ server {{ listen {listen}{ssl}; {certs} proxy_pass {upstream}; {proxy_ssl} }} }}\n",
                    dir = f.dir.display(),
                    ssl = if tls_in { " ssl" } else { "" },
                    certs = if tls_in {
                        format!("ssl_certificate {}; ssl_certificate_key {};", f.cert.display(), f.key.display())
                    } else {
                        String::new()
                    },
                    proxy_ssl = if tls_out { "proxy_ssl on;" } else { "" },
                ),
            )?;
            let mut cmd = Command::new("nginx");
            cmd.arg("-c")
                .arg(&config)
                .arg("-p")
                .arg(&f.dir)
                .arg("-e")
                .arg(f.dir.join("nginx.err"));
            cmd
        }
    };
    Ok(Some(cmd))
}

/// CPU seconds of a process and its descendants, reaped ones included.
fn tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total = 0.0;
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat[stat.rfind(')').context("stat format")? + 2..]
            .split_whitespace()
            .collect();
        // utime, stime, and (children) cutime, cstime: clock ticks.
        total += fields[11..15]
            .iter()
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .sum::<f64>()
            / 100.0;
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        frontier.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    Ok(total)
}

/// One run through a peer: Gbit/s and its CPU seconds per GB.
fn peer_run(
    peer: Peer,
    load: &Path,
    s: &Scenario,
    sinks: (SocketAddr, SocketAddr),
    conns: usize,
    bytes: u64,
    f: &Files,
) -> anyhow::Result<Option<(f64, f64)>> {
    let listen = free_addr()?;
    let upstream = if s.upstream_tls { sinks.1 } else { sinks.0 };
    let Some(mut cmd) = peer_command(peer, s, listen, upstream, f)? else {
        return Ok(None);
    };
    let mut child = Guard(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", peer.name()))?,
    );
    wait_port(listen, &mut child.0).with_context(|| peer.name())?;
    let before = tree_cpu_seconds(child.0.id())?;
    let result = blast(load, listen, s.client_tls, conns, bytes)
        .with_context(|| format!("{} {} x{conns}", peer.name(), s.name))?;
    let cpu = tree_cpu_seconds(child.0.id())? - before;
    let gb = result["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    Ok(Some((
        result["gbit_per_s"].as_f64().unwrap_or(0.0),
        cpu / gb,
    )))
}

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
    let files = Files {
        dir: dir.clone(),
        cert: cert.clone(),
        key: key.clone(),
        pem: dir.join("bench.pem"),
    };
    let peers: Vec<Peer> = Peer::ALL.into_iter().filter(|p| p.installed()).collect();
    let total: u64 = if quick { 256 << 20 } else { 2 << 30 };
    let concurrencies: &[usize] = if quick { &[1, 16] } else { &[1, 16, 256] };
    let rounds = if quick { 1 } else { 3 };
    let mut samples = Vec::new();
    println!(
        "\n{:<16} {:>5} {:<9} {:>9} {:>9} {:>9} {:>20}  path",
        "scenario",
        "conns",
        "relay",
        "Gbit/s",
        "vs direct",
        "CPU s/GB",
        "tlsrelay/this min/med/max"
    );
    for s in &SCENARIOS {
        for &conns in concurrencies {
            let bytes = total / conns as u64;
            // Per peer: (Gbit/s, CPU s/GB) per round; direct Gbit/s per round.
            let mut results: Vec<Vec<Option<(f64, f64)>>> = vec![Vec::new(); peers.len()];
            let mut direct = Vec::new();
            let mut path = String::new();
            for _ in 0..rounds {
                for (i, &peer) in peers.iter().enumerate() {
                    let r = if peer == Peer::Tlsrelay {
                        let (g, c, p) = relay_run(
                            &relay_bin, &load, &dir, s, plain_sink, tls_sink, conns, bytes, &cert,
                            &key,
                        )?;
                        path = p;
                        Some((g, c))
                    } else {
                        peer_run(peer, &load, s, (plain_sink, tls_sink), conns, bytes, &files)?
                    };
                    results[i].push(r);
                }
                let d = blast(
                    &load,
                    if s.client_tls { tls_sink } else { plain_sink },
                    s.client_tls,
                    conns,
                    bytes,
                )?;
                direct.push(d["gbit_per_s"].as_f64().unwrap_or(0.0));
            }
            let direct_median = median(direct.clone());
            for (i, &peer) in peers.iter().enumerate() {
                let runs: Vec<(f64, f64)> = results[i].iter().flatten().copied().collect();
                if runs.is_empty() {
                    println!(
                        "{:<16} {:>5} {:<9} {:>9}",
                        s.name,
                        conns,
                        peer.name(),
                        "n/a"
                    );
                    continue;
                }
                let gbit = median(runs.iter().map(|r| r.0).collect());
                let cpu = median(runs.iter().map(|r| r.1).collect());
                let ratios: Vec<f64> = results[0]
                    .iter()
                    .zip(&results[i])
                    .filter_map(|(a, b)| Some(a.as_ref()?.0 / b.as_ref()?.0))
                    .collect();
                let ratio = if peer == Peer::Tlsrelay || ratios.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{:.2}/{:.2}/{:.2}",
                        ratios.iter().copied().fold(f64::MAX, f64::min),
                        median(ratios.clone()),
                        ratios.iter().copied().fold(0.0, f64::max)
                    )
                };
                println!(
                    "{:<16} {:>5} {:<9} {:>9.2} {:>9.2} {:>9.2} {:>20}  {}",
                    s.name,
                    conns,
                    peer.name(),
                    gbit,
                    gbit / direct_median,
                    cpu,
                    ratio,
                    if peer == Peer::Tlsrelay {
                        path.as_str()
                    } else {
                        ""
                    }
                );
                samples.push(serde_json::json!({
                    "scenario": s.name, "connections": conns, "peer": peer.name(),
                    "gbit_per_s": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
                    "cpu_s_per_gb": runs.iter().map(|r| r.1).collect::<Vec<_>>(),
                    "direct_gbit_per_s": direct, "tlsrelay_over_peer": ratios,
                    "path": if peer == Peer::Tlsrelay { path.clone() } else { String::new() },
                }));
            }
        }
    }
    let report = serde_json::json!({ "quick": quick, "samples": samples });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let missing: Vec<&str> = Peer::ALL
        .iter()
        .filter(|p| !p.installed())
        .map(|p| p.name())
        .collect();
    println!(
        "\nvs direct = Gbit/s over a direct connection to the same sink; tlsrelay/this = ratio of tlsrelay's\n\
         Gbit/s to this peer's in the same round; {rounds} round(s), peers run in turn (A B C … A B C …).\n\
         CPU s/GB counts the relay process (and its children). n/a: the peer cannot do that scenario.{}\n\
         report: {}",
        if missing.is_empty() { String::new() } else { format!("\nNot installed (apt-get install): {}", missing.join(", ")) },
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
    let result = blast(load, listen, s.client_tls, conns, bytes)
        .with_context(|| format!("tlsrelay {} x{conns}", s.name))?;
    let cpu = cpu_seconds(pid)? - before;
    let gb = result["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    let path = rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| "?".into());
    Ok((result["gbit_per_s"].as_f64().unwrap_or(0.0), cpu / gb, path))
}
