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

/// A stream scenario: what the client speaks and what the upstream speaks.
struct Scenario {
    name: &'static str,
    tls_in: bool,
    tls_out: bool,
}

const STREAMS: [Scenario; 4] = [
    Scenario {
        name: "plaintext relay",
        tls_in: false,
        tls_out: false,
    },
    Scenario {
        name: "TLS termination",
        tls_in: true,
        tls_out: false,
    },
    Scenario {
        name: "TLS origination",
        tls_in: false,
        tls_out: true,
    },
    Scenario {
        name: "TLS bridge",
        tls_in: true,
        tls_out: true,
    },
];

const TERMINATION: &Scenario = &STREAMS[1];

/// What relays in a run; `Direct` is the generator talking to the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Tlsrelay,
    /// tlsrelay with `dataplane.pump = "epoll"` (splicing tables only).
    TlsrelayEpoll,
    Stunnel,
    Haproxy,
    Nginx,
    Socat,
    Direct,
}

const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl Peer {
    const RELAYS: [Peer; 6] = [
        Peer::Tlsrelay,
        Peer::TlsrelayEpoll,
        Peer::Stunnel,
        Peer::Haproxy,
        Peer::Nginx,
        Peer::Socat,
    ];

    fn name(self) -> &'static str {
        match self {
            Peer::Tlsrelay => "tlsrelay",
            Peer::TlsrelayEpoll => "tlsrelay-epoll",
            Peer::Stunnel => "stunnel",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
            Peer::Socat => "socat",
            Peer::Direct => "direct",
        }
    }

    /// Debian packages that provide the peer.
    fn packages(self) -> &'static [&'static str] {
        match self {
            Peer::Stunnel => &["stunnel4"],
            Peer::Haproxy => &["haproxy"],
            Peer::Nginx => &["nginx", "libnginx-mod-stream"],
            Peer::Socat => &["socat"],
            Peer::Tlsrelay | Peer::TlsrelayEpoll | Peer::Direct => &[],
        }
    }

    fn is_tlsrelay(self) -> bool {
        matches!(self, Peer::Tlsrelay | Peer::TlsrelayEpoll)
    }

    fn installed(self) -> bool {
        let bin = match self {
            Peer::Tlsrelay | Peer::TlsrelayEpoll | Peer::Direct => return true,
            Peer::Stunnel => "stunnel4",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
            Peer::Socat => "socat",
        };
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        found && (self != Peer::Nginx || Path::new(NGINX_STREAM).exists())
    }
}

/// Installs the peers Debian has and this machine lacks (as root, with
/// apt-get); otherwise says what is missing and goes on without them.
fn install_missing_peers() {
    let missing: Vec<Peer> = Peer::RELAYS
        .into_iter()
        .filter(|p| !p.installed())
        .collect();
    if missing.is_empty() {
        return;
    }
    let packages: Vec<&str> = missing.iter().flat_map(|p| p.packages()).copied().collect();
    let root_user = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root_user {
        println!(
            "bench: peers not installed and not root to install them: apt-get install {}",
            packages.join(" ")
        );
        return;
    }
    let installed = run(
        "install the missing peers",
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if let Err(e) = installed {
        println!("bench: going on without them: {e:#}");
    }
}

/// Raises the open-file limit as far as allowed (10 000 idle connections
/// take 20 000 descriptors in a relay) and returns the soft limit.
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write `limit`.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        let wanted = libc::rlimit {
            rlim_cur: 1 << 18,
            rlim_max: limit.rlim_max.max(1 << 18),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// A certificate every relay in a run is configured with.
struct Certs {
    label: &'static str,
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file (haproxy, socat).
    pem: PathBuf,
}

impl Certs {
    fn new(dir: &Path, stem: &str, label: &'static str) -> Self {
        Certs {
            label,
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            pem: dir.join(format!("{stem}.pem")),
        }
    }
}

/// A plaintext and a TLS sink of one kind (discarding or echoing).
#[derive(Clone, Copy)]
struct SinkPair {
    plain: SocketAddr,
    tls: SocketAddr,
}

/// One relay's work: the protocol on each side and the sinks behind it.
struct Job<'a> {
    s: &'a Scenario,
    sinks: SinkPair,
    certs: &'a Certs,
}

/// A relay (or the direct pseudo-peer) ready for load at `listen`.
struct Running {
    /// Declared first: stops recording before the relay is killed.
    _profile: Option<Profile>,
    child: Option<Guard>,
    listen: SocketAddr,
    /// tlsrelay's session reports' data paths.
    paths: Option<mpsc::Receiver<String>>,
}

impl Running {
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        match &self.child {
            Some(c) => tree_cpu_seconds(c.0.id()),
            None => Ok(f64::NAN),
        }
    }

    fn rss_bytes(&self) -> f64 {
        self.child
            .as_ref()
            .map_or(f64::NAN, |c| tree_rss_bytes(c.0.id()))
    }

    /// The data path of the last session tlsrelay reported.
    fn path(&self) -> String {
        let Some(rx) = &self.paths else {
            return String::new();
        };
        let mut last = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| "?".into());
        while let Ok(p) = rx.try_recv() {
            last = p;
        }
        last
    }
}

/// `perf record` of one relay process, turned into a flamegraph when
/// dropped.
struct Profile {
    perf: std::process::Child,
    data: PathBuf,
    stem: PathBuf,
}

impl Profile {
    fn record(pid: u32, dir: &Path, stem: &str) -> anyhow::Result<Profile> {
        let data = dir.join(format!("{stem}.data"));
        let perf = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-o"])
            .arg(&data)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        // perf attaches to the threads after it starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Profile {
            perf,
            data,
            stem: dir.join(stem),
        })
    }

    /// Stops recording and writes `<stem>.svg` and `<stem>.folded`; prints
    /// the frames where most samples were taken.
    fn finish(&mut self) -> anyhow::Result<()> {
        // SAFETY: signals our own perf child.
        unsafe { libc::kill(self.perf.id() as i32, libc::SIGINT) };
        self.perf.wait()?;
        let script = Command::new("perf")
            .args(["script", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("perf script")?;
        use inferno::collapse::Collapse;
        let mut folded = Vec::new();
        inferno::collapse::perf::Folder::from(inferno::collapse::perf::Options::default())
            .collapse(&script.stdout[..], &mut folded)?;
        std::fs::write(self.stem.with_extension("folded"), &folded)?;
        let svg = self.stem.with_extension("svg");
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!(
            "tlsrelay: {}",
            self.stem.file_name().unwrap_or_default().to_string_lossy()
        );
        inferno::flamegraph::from_reader(&mut options, &folded[..], std::fs::File::create(&svg)?)?;
        println!("flamegraph: {}", svg.display());
        for (frame, share) in hottest(&String::from_utf8_lossy(&folded), 12) {
            println!("  {share:5.1} %  {frame}");
        }
        Ok(())
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            println!("profile {}: {e:#}", self.stem.display());
        }
    }
}

/// The frames with the most samples on top (self time), with their share.
fn hottest(folded: &str, n: usize) -> Vec<(String, f64)> {
    let mut by_frame: BTreeMap<&str, u64> = BTreeMap::new();
    let mut total = 0;
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        let top = stack.rsplit(';').next().unwrap_or(stack);
        *by_frame.entry(top).or_default() += count;
        total += count;
    }
    let mut v: Vec<(String, f64)> = by_frame
        .into_iter()
        .map(|(f, c)| (f.to_string(), 100.0 * c as f64 / total.max(1) as f64))
        .collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.truncate(n);
    v
}

/// Debian's linux-perf, for `--profile`.
fn install_perf() -> anyhow::Result<()> {
    let found = Command::new("perf")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        run(
            "install perf (linux-perf)",
            Command::new("apt-get").args([
                "install",
                "-y",
                "--no-install-recommends",
                "linux-perf",
            ]),
        )?;
    }
    Ok(())
}

/// Figures of one run, by name.
type Sample = BTreeMap<&'static str, f64>;

/// A table of figures: which ones, and the one ratios are taken of.
struct Table {
    name: &'static str,
    /// Its bytes go through the splice pump: both pumps get a row.
    splices: bool,
    x: &'static str,
    columns: &'static [(&'static str, &'static str)],
    primary: &'static str,
    note: &'static str,
}

const THROUGHPUT: Table = Table {
    name: "throughput",
    splices: true,
    x: "conns",
    columns: &[
        ("gbit_per_s", "Gbit/s"),
        ("cpu_s_per_gb", "CPU s/GB"),
        ("machine_cpu_s_per_gb", "all CPU s/GB"),
        ("p99_ms", "p99 ms"),
    ],
    primary: "gbit_per_s",
    note: "Gbit/s pushed through to a discarding sink; CPU s/GB of the relay's process tree, and of the whole machine (generator, relay, sink, kernel); p99 ms = transfer completion time",
};

const LATENCY: Table = Table {
    name: "latency",
    splices: true,
    x: "conns",
    columns: &[
        ("requests_per_s", "req/s"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("p999_us", "p99.9 µs"),
        ("cpu_us_per_req", "CPU µs/req"),
        ("machine_cpu_us_per_req", "all µs/req"),
    ],
    primary: "requests_per_s",
    note: "1 KiB request, 1 KiB echoed response, one outstanding per connection; CPU µs per request of the relay's process tree and of the whole machine",
};

const HANDSHAKES: Table = Table {
    name: "handshakes",
    splices: false,
    x: "conns",
    columns: &[
        ("handshakes_per_s", "hs/s"),
        ("cpu_ms_per_handshake", "CPU ms/hs"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("resumed", "resumed %"),
    ],
    primary: "handshakes_per_s",
    note: "new TLS 1.3 sessions (TLS in, plaintext out), each proven by one echoed byte; full: the client never resumes; resumed: it offers its last session's ticket",
};

const SMTP: Table = Table {
    name: "smtp",
    splices: false,
    x: "message",
    columns: &[
        ("messages_per_s", "msg/s"),
        ("gbit_per_s", "Gbit/s"),
        ("cpu_s_per_gb", "CPU s/GB"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("p999_us", "p99.9 µs"),
    ],
    primary: "messages_per_s",
    note: "STARTTLS both legs; latency = MAIL to the final reply (the next hop's 250)",
};

const IDLE: Table = Table {
    name: "idle",
    splices: false,
    x: "idle conns",
    columns: &[("kib_per_connection", "KiB/conn"), ("rss_mib", "RSS MiB")],
    primary: "kib_per_connection",
    note: "RSS growth of the relay's process tree per idle established TLS connection (lower is better)",
};

/// One printed row: a peer's runs of one cell.
struct Row {
    table: &'static str,
    scenario: String,
    x: String,
    peer: Peer,
    runs: Vec<Sample>,
    ratios: Vec<f64>,
    path: String,
    failed: Option<String>,
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
                b.cell(&SMTP, &scenario, x, |b, peer| {
                    b.smtp(peer, conns, messages, size, bdat)
                })?;
            }
        }
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
    b.finish()
}

impl Bench {
    /// Prints `t`'s header before its first cell.
    fn header(&self, t: &Table) {
        if self.headed.replace(Some(t.name)) == Some(t.name) {
            return;
        }
        print!(
            "\n== {} ({})\n{:<18} {:>12} {:<14}",
            t.name, t.note, "scenario", t.x, "relay"
        );
        for (_, head) in t.columns {
            print!(" {head:>10}");
        }
        println!(" {:>20}  path", "tlsrelay/this");
    }

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

    fn print(&self, t: &Table, row: &Row) {
        print!("{:<18} {:>12} {:<14}", row.scenario, row.x, row.peer.name());
        if let Some(why) = &row.failed {
            println!(" failed: {}", why.lines().next().unwrap_or(""));
            return;
        }
        if row.runs.is_empty() {
            println!(" {:>10}", "n/a");
            return;
        }
        for (key, _) in t.columns {
            let v = median(row.runs.iter().map(|r| r[key]).collect());
            if v.is_nan() {
                print!(" {:>10}", "-");
            } else if v >= 100.0 {
                print!(" {v:>10.0}");
            } else {
                print!(" {v:>10.2}");
            }
        }
        let ratio = match row.peer {
            Peer::Tlsrelay => String::new(),
            _ => {
                let r = &row.ratios;
                let (lo, hi) = r
                    .iter()
                    .fold((f64::MAX, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                format!("{lo:.2}/{:.2}/{hi:.2}", median(r.clone()))
            }
        };
        println!(" {ratio:>20}  {}", row.path);
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

    /// Starts recording tlsrelay's process `pid` when this cell is profiled.
    fn profile(&self, peer: Peer, pid: u32) -> anyhow::Result<Option<Profile>> {
        match &*self.profiling.borrow() {
            Some(stem) if peer == Peer::Tlsrelay => {
                Ok(Some(Profile::record(pid, &self.dir, stem)?))
            }
            _ => Ok(None),
        }
    }

    /// Starts `peer` for `job`; `None` when the peer cannot do it.
    fn start(&self, peer: Peer, job: &Job) -> anyhow::Result<Option<Running>> {
        let (tls_in, tls_out) = (job.s.tls_in, job.s.tls_out);
        let upstream = if tls_out {
            job.sinks.tls
        } else {
            job.sinks.plain
        };
        if peer == Peer::Direct {
            if tls_in && !std::ptr::eq(job.certs, &self.ecdsa) {
                return Ok(None); // the sinks serve the ECDSA certificate
            }
            let listen = if tls_in {
                job.sinks.tls
            } else {
                job.sinks.plain
            };
            return Ok(Some(Running {
                _profile: None,
                child: None,
                listen,
                paths: None,
            }));
        }
        let listen = free_addr()?;
        let Some(mut cmd) = self.command(peer, job, listen, upstream)? else {
            return Ok(None);
        };
        let tlsrelay = peer.is_tlsrelay();
        let mut child = Guard(
            own_group(&mut cmd)
                .stdout(if tlsrelay {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", peer.name()))?,
        );
        self.groups.borrow_mut().push(child.0.id());
        wait_for_port(listen, &mut child.0, peer.name())?;
        let paths = if tlsrelay {
            Some(session_paths(
                child.0.stdout.take().context("relay stdout")?,
            ))
        } else {
            None
        };
        Ok(Some(Running {
            _profile: self.profile(peer, child.0.id())?,
            child: Some(child),
            listen,
            paths,
        }))
    }

    /// The command that runs `peer` for `job`; `None` when it can't.
    fn command(
        &self,
        peer: Peer,
        job: &Job,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<Option<Command>> {
        let (tls_in, tls_out, f) = (job.s.tls_in, job.s.tls_out, job.certs);
        let config = self.dir.join(format!("{}.conf", peer.name()));
        // Each relayed connection takes two descriptors.
        let maxconn = (self.open_files.saturating_sub(200) / 2).min(20000);
        let cmd = match peer {
            Peer::Direct => unreachable!("no process"),
            Peer::Tlsrelay | Peer::TlsrelayEpoll => {
                let route = if tls_out {
                    "tls.policy = \"required\"\ntls.verify = \"encryption-only\""
                } else {
                    "tls.policy = \"plain\""
                };
                std::fs::write(
                    &config,
                    format!(
                        "ebpf.enabled = false\n[limits]\nmax_connections = {maxconn}\n[dataplane]\npump = \"{}\"\n\n[[listeners]]\nname = \"bench\"\naddress = \"{listen}\"\nupstream = \"sink\"\ntls.mode = \"{}\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n\n[[upstreams]]\nname = \"sink\"\naddress = \"{upstream}\"\n{route}\n",
                        if peer == Peer::TlsrelayEpoll { "epoll" } else { "io-uring" },
                        if tls_in { "implicit" } else { "off" },
                        f.cert.display().to_string(),
                        f.key.display().to_string()
                    ),
                )?;
                self.tlsrelay(&config)
            }
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
                        "global\n  maxconn {maxconn}\ndefaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind {listen}{}\n  default_backend b\nbackend b\n  server s {upstream}{}\n",
                        if tls_in { format!(" ssl crt {}", f.pem.display()) } else { String::new() },
                        if tls_out { " ssl verify none" } else { "" }
                    ),
                )?;
                let mut cmd = Command::new("haproxy");
                cmd.arg("-db").arg("-f").arg(&config);
                cmd
            }
            Peer::Nginx => {
                let dir = self.dir.display();
                std::fs::write(
                    &config,
                    format!(
                        "load_module {NGINX_STREAM};\ndaemon off;\nworker_processes 2;\nworker_rlimit_nofile {};\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.err;\nevents {{ worker_connections {}; }}\nstream {{ ssl_protocols TLSv1.2 TLSv1.3; proxy_ssl_protocols TLSv1.2 TLSv1.3; server {{ listen {listen}{ssl}; {certs} proxy_pass {upstream}; {proxy_ssl} }} }}\n",
                        self.open_files,
                        maxconn * 2,
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
                    .arg(&self.dir)
                    .arg("-e")
                    .arg(self.dir.join("nginx.err"));
                cmd
            }
        };
        Ok(Some(cmd))
    }

    fn tlsrelay(&self, config: &Path) -> Command {
        let mut cmd = Command::new(&self.relay_bin);
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env("RUST_LOG", "info");
        cmd
    }

    /// Runs `tlsrelay-load <command> --to <to> --connections <conns>`
    /// with `extra` arguments; its one JSON line.
    fn load(
        &self,
        command: &str,
        to: SocketAddr,
        conns: usize,
        extra: &[&str],
    ) -> anyhow::Result<serde_json::Value> {
        let (to, conns) = (to.to_string(), conns.to_string());
        let out = Command::new(&self.load)
            .args([command, "--to", &to, "--connections", &conns])
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!(
                "tlsrelay-load {command}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn throughput(
        &self,
        peer: Peer,
        s: &Scenario,
        conns: usize,
        bytes: u64,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let job = Job {
            s,
            sinks: self.discard,
            certs: &self.ecdsa,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        let (before, machine) = (relay.cpu_seconds()?, machine_cpu_seconds());
        let bytes = bytes.to_string();
        let mut extra = vec!["--bytes", &bytes];
        if s.tls_in {
            extra.push("--tls");
        }
        let r = self.load("blast", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let machine = machine_cpu_seconds() - machine;
        let gb = r["bytes"].as_f64().unwrap_or(0.0) / 1e9;
        let sample = Sample::from([
            ("gbit_per_s", r["gbit_per_s"].as_f64().unwrap_or(0.0)),
            ("cpu_s_per_gb", cpu / gb),
            ("machine_cpu_s_per_gb", machine / gb),
            ("p99_ms", r["p99_ms"].as_f64().unwrap_or(0.0)),
        ]);
        Ok(Some((sample, relay.path())))
    }

    fn latency(
        &self,
        peer: Peer,
        s: &Scenario,
        conns: usize,
        seconds: f64,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let job = Job {
            s,
            sinks: self.echo,
            certs: &self.ecdsa,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        let (before, machine) = (relay.cpu_seconds()?, machine_cpu_seconds());
        let secs = seconds.to_string();
        let mut extra = vec!["--seconds", &secs];
        if s.tls_in {
            extra.push("--tls");
        }
        let r = self.load("rr", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let machine = machine_cpu_seconds() - machine;
        let mut sample = pick(&r, &["requests_per_s", "p50_us", "p99_us", "p999_us"]);
        let requests = sample["requests_per_s"] * seconds;
        sample.insert("cpu_us_per_req", cpu * 1e6 / requests);
        sample.insert("machine_cpu_us_per_req", machine * 1e6 / requests);
        Ok(Some((sample, relay.path())))
    }

    fn handshakes(
        &self,
        peer: Peer,
        certs: &Certs,
        conns: usize,
        seconds: f64,
        resume: bool,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let job = Job {
            s: TERMINATION,
            sinks: self.echo,
            certs,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        let before = relay.cpu_seconds()?;
        let secs = seconds.to_string();
        let mut extra = vec!["--seconds", &secs];
        if resume {
            extra.push("--resume");
        }
        let r = self.load("handshakes", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let mut sample = pick(&r, &["handshakes_per_s", "p50_us", "p99_us", "resumed"]);
        sample.insert("resumed", 100.0 * sample["resumed"]);
        sample.insert(
            "cpu_ms_per_handshake",
            cpu * 1000.0 / (sample["handshakes_per_s"] * seconds),
        );
        Ok(Some((sample, relay.path())))
    }

    /// SMTP through tlsrelay (STARTTLS in, STARTTLS to the next hop). The
    /// stream relays can't speak SMTP; Postfix (store and forward, a
    /// different job) is checked for interop by the tests, not timed here.
    fn smtp(
        &self,
        peer: Peer,
        conns: usize,
        messages: usize,
        size: usize,
        bdat: bool,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let relay = match peer {
            Peer::Tlsrelay => {
                let listen = free_addr()?;
                let config = self.dir.join("smtp.toml");
                std::fs::write(
                    &config,
                    format!(
                        "ebpf.enabled = false\naccepted_domains = [\"bench.test\"]\n[limits]\nmax_connections = 20000\n\n[[listeners]]\nname = \"mx\"\naddress = \"{listen}\"\nprotocol = \"smtp\"\nhostname = \"relay.bench.test\"\nmax_message_size = {}\ntls.mode = \"opportunistic\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n\n[[outbound_connectors]]\nname = \"sink\"\nrecipient_domains = [\"bench.test\"]\nnext_hops = [\"{}\"]\ntls.policy = \"required\"\ntls.verify = \"encryption-only\"\n",
                        64 << 20,
                        self.ecdsa.cert.display().to_string(),
                        self.ecdsa.key.display().to_string(),
                        self.smtp_sink,
                    ),
                )?;
                let mut child = Guard(
                    own_group(&mut self.tlsrelay(&config))
                        .stdout(Stdio::null())
                        .spawn()
                        .context("starting tlsrelay")?,
                );
                self.groups.borrow_mut().push(child.0.id());
                wait_for_port(listen, &mut child.0, "tlsrelay")?;
                Running {
                    _profile: self.profile(peer, child.0.id())?,
                    child: Some(child),
                    listen,
                    paths: None,
                }
            }
            Peer::Direct => Running {
                _profile: None,
                child: None,
                listen: self.smtp_sink,
                paths: None,
            },
            _ => return Ok(None),
        };
        let before = relay.cpu_seconds()?;
        let (messages, size) = (messages.to_string(), size.to_string());
        let mut extra = vec!["--messages", &messages, "--size", &size];
        if bdat {
            extra.push("--bdat");
        }
        let r = self.load("smtp", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let mut sample = pick(
            &r,
            &[
                "messages_per_s",
                "gbit_per_s",
                "p50_us",
                "p99_us",
                "p999_us",
            ],
        );
        sample.insert(
            "cpu_s_per_gb",
            cpu / (r["bytes"].as_f64().unwrap_or(0.0) / 1e9),
        );
        let path = if peer == Peer::Tlsrelay {
            "userspace (SMTP body)"
        } else {
            ""
        };
        Ok(Some((sample, path.into())))
    }

    /// RSS growth per idle established TLS connection.
    fn idle(&self, peer: Peer, count: usize) -> anyhow::Result<Option<(Sample, String)>> {
        if peer == Peer::Direct || (peer == Peer::Socat && count > 1000) {
            return Ok(None); // socat forks a process per connection
        }
        // The relay, the echo sink and the holder: two descriptors a
        // connection in the relay, one in each of the others.
        if count as u64 * 2 + 200 > self.open_files {
            bail!(
                "{count} idle connections need {} open files, the limit is {}",
                count * 2 + 200,
                self.open_files
            );
        }
        let job = Job {
            s: TERMINATION,
            sinks: self.echo,
            certs: &self.ecdsa,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        std::thread::sleep(Duration::from_millis(200));
        let before = relay.rss_bytes();
        let mut holder = Guard(
            Command::new(&self.load)
                .args(["hold", "--tls", "--to", &relay.listen.to_string()])
                .args(["--connections", &count.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        );
        let stdout = holder.0.stdout.take().context("holder stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(120))
            .context("idle connections not open within 120 s")?;
        if !ready.contains("ready") {
            let mut err = String::new();
            if let Some(mut e) = holder.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("holding {count} connections: {}", err.trim());
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = relay.rss_bytes();
        if let Some(mut stdin) = holder.0.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = holder.0.wait();
        let sample = Sample::from([
            (
                "kib_per_connection",
                (after - before) / count as f64 / 1024.0,
            ),
            ("rss_mib", after / (1 << 20) as f64),
        ]);
        Ok(Some((sample, relay.path())))
    }

    fn finish(self) -> anyhow::Result<()> {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "table": r.table, "scenario": r.scenario, "x": r.x, "peer": r.peer.name(),
                    "runs": r.runs, "tlsrelay_over_peer": r.ratios, "path": r.path,
                    "failed": r.failed,
                })
            })
            .collect();
        let report = serde_json::json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "rows": rows,
        });
        let json = self.dir.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
        let charts = crate::chart::write_all(&self.dir, &self.rows_for_charts())?;
        let missing: Vec<&str> = Peer::RELAYS
            .iter()
            .filter(|p| !p.installed())
            .map(|p| p.name())
            .collect();
        println!(
            "\ntlsrelay/this = tlsrelay's figure over this relay's for the table's first column, per round:\n\
             min/median/max over {} round(s), peers run in turn (A B C … A B C …); the other columns are medians.\n\
             direct = the generator straight to the sink. n/a: the relay can't do that scenario.{}\n\
             report: {}\ncharts: {} SVG files in {}",
            self.rounds,
            if missing.is_empty() { String::new() } else { format!("\nNot installed: {}", missing.join(", ")) },
            json.display(),
            charts,
            self.dir.display()
        );
        Ok(())
    }

    /// Per table and scenario: the x labels and each peer's medians of the
    /// table's first column.
    fn rows_for_charts(&self) -> Vec<crate::chart::Chart> {
        let mut charts: Vec<crate::chart::Chart> = Vec::new();
        for r in &self.rows {
            let t = [&THROUGHPUT, &LATENCY, &HANDSHAKES, &SMTP, &IDLE]
                .into_iter()
                .find(|t| t.name == r.table)
                .expect("known table");
            let title = format!("{}: {}", t.name, r.scenario);
            let i = match charts.iter().position(|c| c.title == title) {
                Some(i) => i,
                None => {
                    let unit = t.columns[0].1;
                    charts.push(crate::chart::Chart {
                        title,
                        x_label: t.x.to_string(),
                        y_label: unit.to_string(),
                        xs: Vec::new(),
                        series: Vec::new(),
                    });
                    charts.len() - 1
                }
            };
            let c = &mut charts[i];
            let xi = match c.xs.iter().position(|x| *x == r.x) {
                Some(xi) => xi,
                None => {
                    c.xs.push(r.x.clone());
                    c.xs.len() - 1
                }
            };
            let si = match c.series.iter().position(|(n, _)| n == r.peer.name()) {
                Some(si) => si,
                None => {
                    c.series.push((r.peer.name().to_string(), Vec::new()));
                    c.series.len() - 1
                }
            };
            let values = &mut c.series[si].1;
            values.resize(xi + 1, None);
            if !r.runs.is_empty() {
                values[xi] = Some(median(r.runs.iter().map(|s| s[t.primary]).collect()));
            }
        }
        charts
    }
}

fn pick(v: &serde_json::Value, keys: &[&'static str]) -> Sample {
    keys.iter()
        .map(|&k| (k, v[k].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

/// Reads tlsrelay's session reports and sends each one's data path.
fn session_paths(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // Skip the readiness probe's empty session.
            if line.contains("bytes=0/0") {
                continue;
            }
            if let Some(i) = line.find(" path=") {
                let path = line[i + 6..].split_whitespace().next().unwrap_or("");
                let _ = tx.send(path.to_string());
            }
        }
    });
    rx
}

/// The processes of a tree: `pid` and its descendants.
/// Processes still in one of these process groups (the peers' groups,
/// whose leaders the bench has already ended).
fn leftovers(groups: &[u32]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After "(comm)": state, ppid, pgrp. A zombie is gone already
            // (waiting for init to reap it), not left behind.
            let mut fields = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace());
            let state = fields.as_mut().and_then(Iterator::next);
            let group = fields
                .as_mut()
                .and_then(|f| f.nth(1))
                .and_then(|g| g.parse::<u32>().ok());
            state != Some("Z") && group.is_some_and(|g| groups.contains(&g))
        })
        .map(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("{pid} ({})", comm.trim())
        })
        .collect()
}

fn tree(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        all.push(p);
        let children =
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).unwrap_or_default();
        frontier.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    all
}

/// CPU seconds of a process tree, reaped children included.
/// CPU seconds the whole machine has spent busy (every process and the
/// kernel's softirqs): on loopback a sender's CPU also carries its
/// receiver's TCP work, so the relay's own figure alone can mislead.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return f64::NAN;
    };
    // user nice system idle iowait irq softirq steal: clock ticks.
    let t: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    if t.len() < 8 {
        return f64::NAN;
    }
    (t[0] + t[1] + t[2] + t[5] + t[6] + t[7]) / 100.0
}

fn tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for p in tree(pid) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat[stat.rfind(')').context("stat format")? + 2..]
            .split_whitespace()
            .collect();
        // utime, stime, cutime, cstime: clock ticks (USER_HZ).
        total += fields[11..15]
            .iter()
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .sum::<f64>()
            / 100.0;
    }
    Ok(total)
}

/// Resident bytes of a process tree.
fn tree_rss_bytes(pid: u32) -> f64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum::<f64>()
        * 1024.0
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `cargo xtask bench --vm`: kTLS against userspace for tlsrelay on the
/// VM's kernel, the same blast alternating between the two.
pub fn bench_vm(quick: bool) -> anyhow::Result<()> {
    let runs = crate::vm::bench(quick)?;
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    println!(
        "\n== kTLS in the VM (TCG-emulated CPU: these figures compare data paths, they are not real speeds)\n{:<12} {:>5} {:<6} {:>9} {:>16}  path",
        "scenario", "conns", "kTLS", "Gbit/s", "kTLS/userspace"
    );
    let gbit = |r: &serde_json::Value| r["result"]["gbit_per_s"].as_f64().unwrap_or(f64::NAN);
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
            .map(|(a, b)| gbit(a) / gbit(b))
            .collect();
        for (ktls, set) in [(true, &on), (false, &off)] {
            let ratio = if ktls {
                let (lo, hi) = ratios
                    .iter()
                    .fold((f64::MAX, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                format!("{lo:.2}/{:.2}/{hi:.2}", median(ratios.clone()))
            } else {
                String::new()
            };
            println!(
                "{:<12} {:>5} {:<6} {:>9.3} {:>16}  {}",
                scenario,
                conns,
                if ktls { "on" } else { "off" },
                median(set.iter().map(|r| gbit(r)).collect()),
                ratio,
                set.last().and_then(|r| r["path"].as_str()).unwrap_or("")
            );
        }
    }
    let json = dir.join("vm-report.json");
    std::fs::write(&json, serde_json::to_string_pretty(&runs)?)?;
    println!(
        "\nkTLS/userspace = Gbit/s with kTLS over without, per round: min/median/max.\nreport: {}",
        json.display()
    );
    Ok(())
}
