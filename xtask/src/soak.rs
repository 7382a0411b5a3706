//! `cargo xtask soak`: many sessions held through one relay for a long
//! time with periodic traffic — half TLS to an echo, half SMTP over
//! STARTTLS to a sink — while the relay's RSS is sampled every second.
//! Reports RSS per session, its drift over the hold, errors and handshake
//! times under the load; fails on any error or a drift past 5 %.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench::{free_addr, raise_open_files, tree_rss_bytes};
use crate::{build_bench_binaries, own_group, root, spawn_load, wait_for_port, Guard};

/// The most RSS may move over the hold, as a fraction.
const DRIFT_LIMIT: f64 = 0.05;

pub struct SoakOptions {
    pub quick: bool,
    pub connections: Option<usize>,
    pub seconds: Option<f64>,
}

/// One RSS sample: seconds since the load started, bytes.
type Sample = (f64, f64);

pub fn soak(opts: SoakOptions) -> anyhow::Result<()> {
    // The short run CI makes: a debug build, 2,000 sessions for a minute.
    let (connections, seconds, interval) = match opts.quick {
        true => (2_000, 60.0, 10.0),
        false => (10_000, 600.0, 30.0),
    };
    let seconds = opts.seconds.unwrap_or(seconds);
    let files = raise_open_files();
    // The relay holds two sockets a session (client and upstream or next
    // hop), the generator one; the rest is listeners, rings, logs.
    let fits = files.saturating_sub(1000) as usize / 2;
    let connections = match opts.connections {
        Some(n) if n > fits => {
            bail!("the open-file limit ({files}) holds {fits} sessions, not {n}")
        }
        Some(n) => n,
        None if connections > fits => {
            println!("soak: the open-file limit ({files}, and it cannot be raised here) holds {fits} sessions, not {connections}");
            fits
        }
        None => connections,
    };
    let bin = build_bench_binaries(opts.quick)?;
    let dir = root().join("target/soak");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let (echo, sink, tcp, mx) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let mut echo_server = spawn_load(&bin, &["sink", "--listen", &echo.to_string(), "--echo"])?;
    wait_for_port(echo, &mut echo_server.0, "echo server")?;
    let mut smtp_sink = spawn_load(&bin, &["smtp-sink", "--listen", &sink.to_string()])?;
    wait_for_port(sink, &mut smtp_sink.0, "SMTP sink")?;

    let config = dir.join("relay.toml");
    let limit = connections + 1000;
    std::fs::write(
        &config,
        format!(
            r#"# cargo xtask soak: a TLS listener in front of an echo, an SMTP listener
# (STARTTLS with a self-signed certificate) relaying to a sink.
accepted_domains = ["soak.test"]
ebpf.pin_dir = "/sys/fs/bpf/tlsrelay-soak"

[limits]
max_connections = {limit}
max_connections_per_client = {limit}

[[listeners]]
name = "tls"
address = "{tcp}"
upstream = "echo"
tls.mode = "required"

[[upstreams]]
name = "echo"
address = "{echo}"
tls.policy = "plain"

[[listeners]]
name = "mx"
address = "{mx}"
protocol = "smtp"
hostname = "relay.soak.test"
tls.mode = "opportunistic"

[[outbound_connectors]]
name = "sink"
recipient_domains = ["soak.test"]
next_hops = ["{sink}"]
tls.policy = "opportunistic"
"#
        ),
    )?;
    let log = std::fs::File::create(dir.join("relay.log"))?;
    let mut relay = Guard(
        own_group(
            Command::new(bin.join("tlsrelay"))
                .arg("run")
                .arg("--config")
                .arg(&config)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )
        .spawn()
        .context("starting tlsrelay")?,
    );
    wait_for_port(tcp, &mut relay.0, "tlsrelay")?;
    wait_for_port(mx, &mut relay.0, "tlsrelay")?;
    std::thread::sleep(Duration::from_secs(1));
    let pid = relay.0.id();
    let idle_rss = tree_rss_bytes(pid);

    println!(
        "\n=== soak: {connections} sessions ({} TLS to an echo, {} SMTP over STARTTLS to a sink), held {seconds:.0} s, traffic every {interval:.0} s",
        connections.div_ceil(2),
        connections / 2
    );
    let started = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, stop) = (samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let rss = tree_rss_bytes(pid);
                let at = started.elapsed().as_secs_f64();
                samples.lock().expect("not poisoned").push((at, rss));
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let mut load = Guard(
        own_group(
            Command::new(bin.join("tlsrelay-load"))
                .args(["soak", "--tcp", &tcp.to_string(), "--smtp", &mx.to_string()])
                .args(["--connections", &connections.to_string()])
                .args(["--seconds", &seconds.to_string()])
                .args(["--interval", &interval.to_string()])
                .stdout(Stdio::piped()),
        )
        .spawn()
        .context("starting the soak load")?,
    );
    let mut ready: Option<(f64, serde_json::Value)> = None;
    let mut summary = None;
    let stdout = load.0.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let value: serde_json::Value = serde_json::from_str(&line?)?;
        if value.get("ready").is_some() {
            println!(
                "all sessions up after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            ready = Some((started.elapsed().as_secs_f64(), value));
        } else {
            summary = Some(value);
        }
    }
    let status = load.0.wait()?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let relay_alive = relay.0.try_wait()?.is_none();
    let (Some((ready_at, ready)), Some(summary)) = (ready, summary) else {
        bail!("the soak load ended ({status}) without its report");
    };

    // The hold's samples once every session has had a turn: before that,
    // first turns still add buffers.
    let samples = samples.lock().expect("not poisoned").clone();
    let window: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|(at, _)| *at >= ready_at + interval + 1.0 && *at <= ready_at + seconds)
        .collect();
    let (Some(&(_, first)), Some(&(_, last))) = (window.first(), window.last()) else {
        bail!("too short a hold to sample ({} samples)", samples.len());
    };
    let peak = window.iter().map(|s| s.1).fold(0.0, f64::max);
    let drift = (last - first) / first;
    let per_session = (first - idle_rss) / connections as f64;
    let errors = summary["errors"].as_u64().unwrap_or(u64::MAX);
    let mib = |b: f64| b / (1 << 20) as f64;
    let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) / 1000.0;
    println!(
        "\nsoak report ({} build)",
        if opts.quick { "debug" } else { "release" }
    );
    println!(
        "  sessions opened in {:.1} s (64 handshakes at a time): setup p50 {:.1} ms, p99 {:.1} ms",
        ready["opening_s"].as_f64().unwrap_or(f64::NAN),
        ms(&ready["setup"]["p50_us"]),
        ms(&ready["setup"]["p99_us"]),
    );
    println!(
        "  relay RSS: {:.1} MiB idle, {:.1} MiB holding them: {:.1} KiB per session",
        mib(idle_rss),
        mib(first),
        per_session / 1024.0
    );
    println!(
        "  over the hold ({:.0} s sampled): {:.1} -> {:.1} MiB ({:+.2} %, limit ±{:.0} %), peak {:.1} MiB",
        window.len(),
        mib(first),
        mib(last),
        drift * 100.0,
        DRIFT_LIMIT * 100.0,
        mib(peak)
    );
    println!(
        "  traffic: {} echo rounds, {} messages delivered; errors {}{}",
        summary["exchanges"],
        summary["messages"],
        errors,
        if errors > 0 {
            format!(" {}", summary["error_kinds"])
        } else {
            String::new()
        }
    );
    println!(
        "  fresh TLS handshakes under the load: {} (one per 100 ms), p50 {:.1} ms, p99 {:.1} ms",
        summary["probe_handshakes"],
        ms(&summary["probe"]["p50_us"]),
        ms(&summary["probe"]["p99_us"]),
    );
    let report = serde_json::json!({
        "connections": connections,
        "seconds": seconds,
        "interval": interval,
        "release": !opts.quick,
        "idle_rss": idle_rss,
        "held_rss": first,
        "end_rss": last,
        "peak_rss": peak,
        "rss_per_session": per_session,
        "drift": drift,
        "ready": ready,
        "summary": summary,
        "samples": samples,
    });
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    println!(
        "  (samples and totals in {})",
        dir.join("report.json").display()
    );
    if !relay_alive {
        bail!(
            "the relay exited during the soak (see {})",
            dir.join("relay.log").display()
        );
    }
    if errors > 0 || !status.success() {
        bail!("{errors} errors during the soak ({status})");
    }
    if drift.abs() > DRIFT_LIMIT {
        bail!("RSS drifted {:+.2} % over the hold", drift * 100.0);
    }
    println!("soak: passed");
    Ok(())
}
