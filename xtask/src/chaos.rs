//! `cargo xtask chaos`: SMTP senders with retry queues and TCP echo
//! clients through one relay while the harness kills the next hop, stalls
//! it, makes it refuse connections, and SIGKILLs the relay, each many
//! times. Then every message is reconciled between the senders' journal
//! (each attempt and the reply it got) and the next hop's (each copy it
//! stored): nothing the sender was told 250 may be missing, nothing it
//! was refused may be stored, and every duplicate must lie in the window
//! between the next hop's 250 and the sender's. TCP streams must arrive
//! intact or end in an error, never cut short with a clean end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::free_addr;
use crate::{build_bench_binaries, own_group, root, spawn_load, wait_for_port, Guard};

pub struct ChaosOptions {
    pub quick: bool,
    pub faults: Option<usize>,
}

/// The faults, injected in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL the next hop and start it again at once (mid-DATA for the
    /// transactions under way).
    KillNextHop,
    /// SIGSTOP the next hop for 1 to 2 s.
    StallNextHop,
    /// SIGKILL the next hop and leave it down for a second: connections
    /// refused.
    RefuseNextHop,
    /// SIGKILL the relay under load and start it again.
    KillRelay,
}

const FAULTS: [Fault; 4] = [
    Fault::KillNextHop,
    Fault::StallNextHop,
    Fault::RefuseNextHop,
    Fault::KillRelay,
];

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::KillNextHop => "next hop SIGKILLed and restarted",
            Fault::StallNextHop => "next hop stalled (SIGSTOP) for 1-2 s",
            Fault::RefuseNextHop => "next hop down for 1 s (connections refused)",
            Fault::KillRelay => "relay SIGKILLed under load and restarted",
        }
    }
}

/// A process the harness kills and starts again on the same address.
struct Restartable {
    command: Box<dyn Fn() -> Command>,
    addr: SocketAddr,
    what: &'static str,
    running: Option<Guard>,
}

impl Restartable {
    fn start(&mut self) -> anyhow::Result<()> {
        let mut child = Guard(
            own_group(&mut (self.command)())
                .spawn()
                .with_context(|| format!("starting the {}", self.what))?,
        );
        wait_for_port(self.addr, &mut child.0, self.what)?;
        self.running = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        // Guard's drop: SIGKILL to the group, then reaped.
        self.running = None;
    }

    fn signal(&self, signal: i32) {
        if let Some(guard) = &self.running {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(guard.0.id() as i32, signal) };
        }
    }
}

/// A small deterministic generator for the pauses (the seed is printed).
struct Pauses(u64);

impl Pauses {
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(from + self.0 % (to - from))
    }
}

pub fn chaos(opts: ChaosOptions) -> anyhow::Result<()> {
    let each = opts.faults.unwrap_or(if opts.quick { 5 } else { 100 });
    let bin = build_bench_binaries(opts.quick)?;
    let dir = root().join("target/chaos");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (store_addr, peer, dead) = (free_addr()?, free_addr()?, dead_addr()?);
    let (mx, tcp, tcp_dead) = (free_addr()?, free_addr()?, free_addr()?);
    let stored = dir.join("stored.txt");
    let sent = dir.join("sent.jsonl");
    let uploads = dir.join("uploads.txt");

    let mut tcp_peer = spawn_load(
        &bin,
        &[
            "tcp-peer",
            "--listen",
            &peer.to_string(),
            "--journal",
            &uploads.display().to_string(),
        ],
    )?;
    wait_for_port(peer, &mut tcp_peer.0, "TCP peer")?;
    let mut store = Restartable {
        command: {
            let (bin, stored) = (bin.clone(), stored.clone());
            Box::new(move || {
                let mut c = Command::new(bin.join("tlsrelay-load"));
                c.args(["smtp-store", "--listen", &store_addr.to_string()])
                    .arg("--journal")
                    .arg(&stored)
                    .stdout(Stdio::null());
                c
            })
        },
        addr: store_addr,
        what: "next hop",
        running: None,
    };
    store.start()?;

    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"# cargo xtask chaos: an SMTP listener relaying to the recording next
# hop, a TCP listener (TLS when the client starts it) in front of a peer
# serving downloads and taking uploads, and one in front of an address
# where nothing listens.
accepted_domains = ["chaos.test"]
# Restarted hundreds of times: the wire counters are not under test here.
ebpf.enabled = false

[limits]
max_connections_per_client = 1000

[[listeners]]
name = "mx"
address = "{mx}"
protocol = "smtp"
hostname = "relay.chaos.test"
tls.mode = "opportunistic"

[[outbound_connectors]]
name = "store"
recipient_domains = ["chaos.test"]
next_hops = ["{store_addr}"]
tls.policy = "opportunistic"

[[listeners]]
name = "tcp"
address = "{tcp}"
upstream = "peer"
tls.mode = "opportunistic"

[[upstreams]]
name = "peer"
address = "{peer}"
tls.policy = "plain"

[[listeners]]
name = "tcp-dead"
address = "{tcp_dead}"
upstream = "dead"
tls.mode = "opportunistic"

[[upstreams]]
name = "dead"
address = "{dead}"
tls.policy = "plain"
"#
        ),
    )?;
    let log = std::fs::File::create(dir.join("relay.log"))?;
    let mut relay = Restartable {
        command: {
            let (bin, config, state) = (bin.clone(), config.clone(), dir.join("state"));
            Box::new(move || {
                let mut c = Command::new(bin.join("tlsrelay"));
                c.arg("run")
                    .arg("--config")
                    .arg(&config)
                    .arg("--state-dir")
                    .arg(&state)
                    .env("RUST_LOG", "warn")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().expect("log file"))
                    .stderr(log.try_clone().expect("log file"));
                c
            })
        },
        addr: mx,
        what: "relay",
        running: None,
    };
    relay.start()?;
    wait_for_port(
        tcp,
        &mut relay.running.as_mut().expect("started").0,
        "relay",
    )?;

    let mut senders = Guard(
        own_group(
            Command::new(bin.join("tlsrelay-load"))
                .args(["chaos-send", "--smtp", &mx.to_string()])
                .args(["--tcp", &tcp.to_string(), "--tcp", &tcp_dead.to_string()])
                .arg("--journal")
                .arg(&sent)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )
        .spawn()
        .context("starting the senders")?,
    );

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let mut pauses = Pauses(seed);
    println!("\n=== chaos: {each} of each fault, in turn, 0.2-0.7 s apart (pause seed {seed})");
    let started = Instant::now();
    let mut injected: BTreeMap<Fault, usize> = BTreeMap::new();
    for round in 0..each * FAULTS.len() {
        if senders.0.try_wait()?.is_some() {
            bail!("the senders exited during the faults");
        }
        std::thread::sleep(pauses.millis(200, 700));
        let fault = FAULTS[round % FAULTS.len()];
        match fault {
            Fault::KillNextHop => {
                store.kill();
                store.start()?;
            }
            Fault::StallNextHop => {
                store.signal(libc::SIGSTOP);
                std::thread::sleep(pauses.millis(1000, 2000));
                store.signal(libc::SIGCONT);
            }
            Fault::RefuseNextHop => {
                store.kill();
                std::thread::sleep(Duration::from_secs(1));
                store.start()?;
            }
            Fault::KillRelay => {
                relay.kill();
                relay.start()?;
            }
        }
        *injected.entry(fault).or_default() += 1;
        if (round + 1) % 40 == 0 {
            println!(
                "{} faults in {:.0} s",
                round + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let faulting = started.elapsed().as_secs_f64();
    // No new messages; the queue drains against a healthy relay.
    drop(senders.0.stdin.take());
    let stdout = senders.0.stdout.take().expect("piped");
    let mut totals = String::new();
    for line in BufReader::new(stdout).lines() {
        totals = line?;
    }
    let status = senders.0.wait()?;
    if !status.success() {
        bail!("the senders failed ({status})");
    }
    let totals: serde_json::Value = serde_json::from_str(&totals).context("the senders' totals")?;
    let mail = reconcile(&sent, &stored)?;

    println!(
        "\nchaos report ({} build)",
        if opts.quick { "debug" } else { "release" }
    );
    println!("  faults over {faulting:.0} s:");
    for (fault, n) in &injected {
        println!("    {n:>5}  {}", fault.describe());
    }
    let ok = mail.print();
    let cut_uploads = std::fs::read_to_string(&uploads).unwrap_or_default();
    let tcp_ok = print_tcp(&totals["tcp"], tcp, tcp_dead, &cut_uploads);
    let report = serde_json::json!({
        "faults": injected.iter().map(|(f, n)| (format!("{f:?}"), n)).collect::<BTreeMap<_, _>>(),
        "seconds_faulting": faulting,
        "senders": totals,
        "mail": mail.json(),
        "release": !opts.quick,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    println!("  (journals and totals in {})", dir.display());
    if !(ok && tcp_ok) {
        bail!("chaos: the reconciliation failed (see above)");
    }
    println!("chaos: passed");
    Ok(())
}

/// An address where nothing listens, outside the ephemeral port range
/// where it can be had (as root): a connect to a free ephemeral port on
/// loopback now and then picks that very port as its source and connects
/// to itself, which would look like an upstream answering.
fn dead_addr() -> anyhow::Result<SocketAddr> {
    let privileged = (900..1024).rev().find_map(|port| {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::net::TcpListener::bind(addr).ok().map(|_| addr)
    });
    privileged.map_or_else(free_addr, Ok)
}

/// One message's history from both journals.
#[derive(Default)]
struct History {
    /// Attempt number -> the outcome the sender saw.
    attempts: BTreeMap<u64, String>,
    /// Attempt numbers of the copies the next hop stored.
    stored: Vec<u64>,
}

/// What the reconciliation found.
#[derive(Default)]
struct Mail {
    messages: usize,
    attempts: usize,
    accepted: usize,
    refused: usize,
    unsettled: usize,
    /// Outcomes of the attempts that were retried.
    retried: BTreeMap<String, usize>,
    /// Attempts the sender got a 2xx for that the next hop never stored.
    lost: Vec<String>,
    /// Copies stored from an attempt the sender was refused.
    stored_refused: Vec<String>,
    /// Extra copies, by what the sender saw for the attempt that made
    /// them (it retried because it never got the 250).
    duplicates: BTreeMap<String, usize>,
    /// Copies no attempt explains (stored twice, or never sent).
    unexplained: Vec<String>,
}

fn reconcile(sent: &Path, stored: &Path) -> anyhow::Result<Mail> {
    let mut messages: HashMap<String, History> = HashMap::new();
    for line in std::fs::read_to_string(sent)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let id = v["id"].as_str().context("id")?.to_string();
        let attempt = v["attempt"].as_u64().context("attempt")?;
        let outcome = v["outcome"].as_str().context("outcome")?.to_string();
        messages
            .entry(id)
            .or_default()
            .attempts
            .insert(attempt, outcome);
    }
    let store_log = std::fs::read_to_string(stored).unwrap_or_default();
    for line in store_log.lines() {
        let (id, attempt) = line.split_once(' ').context("a stored line")?;
        let attempt = attempt.parse().unwrap_or(0);
        messages
            .entry(id.to_string())
            .or_default()
            .stored
            .push(attempt);
    }
    let mut mail = Mail {
        messages: messages.len(),
        ..Mail::default()
    };
    for (id, h) in &messages {
        mail.attempts += h.attempts.len();
        let last = h.attempts.values().last().map(String::as_str).unwrap_or("");
        match last.as_bytes().first() {
            Some(b'2') => mail.accepted += 1,
            Some(b'5') => mail.refused += 1,
            _ => mail.unsettled += 1,
        }
        for (attempt, outcome) in &h.attempts {
            if !(outcome.starts_with('2') || outcome.starts_with('5')) {
                *mail.retried.entry(outcome.clone()).or_default() += 1;
            }
            if outcome.starts_with('2') && !h.stored.contains(attempt) {
                mail.lost.push(format!("{id} attempt {attempt}"));
            }
        }
        let accepted = h.attempts.values().any(|o| o.starts_with('2'));
        let refused = last.starts_with('5');
        let mut seen = HashSet::new();
        for attempt in &h.stored {
            let name = format!("{id} attempt {attempt}");
            let first_copy = seen.is_empty();
            let outcome = match h.attempts.get(attempt) {
                Some(outcome) if seen.insert(*attempt) => outcome,
                // Stored twice from one attempt, or from none sent.
                _ => {
                    mail.unexplained.push(name);
                    continue;
                }
            };
            if outcome.starts_with('2') {
                continue; // the delivery the sender was told of
            }
            if refused || outcome.starts_with('5') {
                mail.stored_refused.push(name);
            } else if !accepted && first_copy {
                // Stored, but the sender never heard: it is still queued
                // (and counted unsettled), not duplicated.
            } else {
                *mail.duplicates.entry(outcome.clone()).or_default() += 1;
            }
        }
    }
    Ok(mail)
}

impl Mail {
    /// Prints the mail half of the report; whether it passed.
    fn print(&self) -> bool {
        let duplicates: usize = self.duplicates.values().sum();
        println!(
            "  mail: {} messages in {} attempts: {} accepted (250), {} refused by the next hop (550), {} unsettled",
            self.messages, self.attempts, self.accepted, self.refused, self.unsettled
        );
        println!("    attempts retried, by what the sender saw:");
        for (outcome, n) in &self.retried {
            println!("    {n:>6}  {outcome}");
        }
        println!(
            "    lost (250 to the sender, not stored): {}{}",
            self.lost.len(),
            listing(&self.lost)
        );
        println!(
            "    stored though the sender was refused: {}{}",
            self.stored_refused.len(),
            listing(&self.stored_refused)
        );
        println!(
            "    duplicates: {duplicates}, each stored by the next hop from an attempt whose 250 never reached the sender, which saw:"
        );
        for (outcome, n) in &self.duplicates {
            println!("    {n:>6}  {outcome}");
        }
        println!(
            "    copies no attempt explains: {}{}",
            self.unexplained.len(),
            listing(&self.unexplained)
        );
        let _ = std::io::stdout().flush();
        self.lost.is_empty()
            && self.stored_refused.is_empty()
            && self.unexplained.is_empty()
            && self.unsettled == 0
            && self.accepted > 0
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "messages": self.messages,
            "attempts": self.attempts,
            "accepted": self.accepted,
            "refused": self.refused,
            "unsettled": self.unsettled,
            "retried": self.retried,
            "lost": self.lost,
            "stored_refused": self.stored_refused,
            "duplicates": self.duplicates,
            "unexplained": self.unexplained,
        })
    }
}

fn listing(items: &[String]) -> String {
    match items {
        [] => String::new(),
        _ => format!(
            " ({}{})",
            items.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
            if items.len() > 5 { ", …" } else { "" }
        ),
    }
}

/// Prints the TCP half; whether every transfer arrived intact or ended in
/// an error its client could see (the dead upstream's always so), and the
/// peer never took a cut upload for whole.
fn print_tcp(
    tally: &serde_json::Value,
    tcp: SocketAddr,
    dead: SocketAddr,
    cut_uploads: &str,
) -> bool {
    let mut ok = true;
    let mut intact = 0;
    println!("  tcp transfers (1 MiB down or up, plaintext and TLS in turn):");
    for (key, n) in tally.as_object().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        let words: Vec<&str> = key.split(' ').collect();
        let [to, kind, direction, end] = words[..] else {
            continue;
        };
        let dead_end = to == dead.to_string();
        let through = if dead_end {
            "to an upstream where nothing listens"
        } else if to == tcp.to_string() {
            "to the peer"
        } else {
            to
        };
        println!("    {n:>6}  {kind:<5} {direction:<8} {through}: {end}");
        ok &= match end {
            "intact" => !dead_end,
            "reset" | "unconfirmed" => true,
            _ => false,
        };
        if end == "intact" {
            intact += n;
        }
    }
    let truncated: Vec<&str> = cut_uploads
        .lines()
        .filter(|l| !l.starts_with("reset"))
        .collect();
    println!(
        "    uploads the peer saw end cleanly but short (or corrupted): {}{}",
        truncated.len(),
        listing(&truncated.iter().map(|l| l.to_string()).collect::<Vec<_>>())
    );
    ok && intact > 0 && truncated.is_empty()
}
