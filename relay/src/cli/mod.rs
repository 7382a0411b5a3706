//! The command line: every subcommand, `cert`, `dns` and `tlsrpt` in
//! modules of their own. Errors are reported here, at the edge, with
//! their context.

mod cert;
mod dns;
mod log_writer;
mod tlsrpt;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tokio::sync::mpsc;

use crate::listeners::Listeners;
use crate::plan::{Plan, SelfSignedSource};
use tlsrelay_core::config::{Config, ConfigError};

#[derive(Debug, Parser)]
#[command(
    name = "tlsrelay",
    version,
    propagate_version = true,
    about = "A TLS relay for Linux edge hosts",
    long_about = "A TLS relay for Linux edge hosts: TCP and TLS relaying (terminate, \
originate, bridge, pass through by SNI) to upstream pools, and a mail edge \
(SMTP with STARTTLS) with forced or opportunistic TLS per connector. After \
the handshakes the session keys go to kernel TLS and the bytes are spliced.",
    after_long_help = "Signals: SIGHUP reloads the configuration and certificates \
(a bad one is refused and the running one kept); SIGTERM drains (listeners \
close, sessions get limits.drain_timeout, then SMTP clients 421 4.3.2).\n\n\
The state directory (--state-dir, else state_dir, $STATE_DIRECTORY, \
$XDG_STATE_HOME/tlsrelay, ~/.local/state/tlsrelay, /var/lib/tlsrelay) holds \
the generated self-signed certificate, fetched MTA-STS policies, pending \
TLS-RPT results and status.sock.\n\n\
The book: docs/ in the source, built by `cargo xtask docs`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (on the embedded loopback default when no --config).
    Run {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where the generated self-signed certificate is kept.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Write each session report as a JSON line to this file (appended),
        /// or to standard output with `-` (logs and the banner then go to
        /// standard error, so the stream is JSON only).
        #[arg(long, value_name = "FILE|-")]
        json_reports: Option<PathBuf>,
        /// Log lines as human text or as JSON objects.
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Print the eBPF wire counters from their pinned maps (no running relay
    /// needed) beside the relay's own view of each socket, flagging every
    /// disagreement. Exit status 0, or 3 when they disagree.
    Stats {
        /// Where the maps are pinned.
        #[arg(long, default_value = tlsrelay_sys::bpf::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Describe and check certificates (for partners, before rotations).
    Cert {
        #[command(subcommand)]
        command: cert::CertCommand,
    },
    /// What to publish in DNS for the mail edge (MX, DANE TLSA, MTA-STS,
    /// TLS-RPT).
    Dns {
        #[command(subcommand)]
        command: dns::DnsCommand,
    },
    /// The TLS reports (RFC 8460) MX delivery gathers: show, send.
    Tlsrpt {
        #[command(subcommand)]
        command: tlsrpt::TlsRptCommand,
    },
    /// Validate a configuration and print the effective policy.
    ///
    /// Exit status 0 when valid, 2 when not.
    Check {
        /// TOML configuration file.
        file: PathBuf,
    },
    /// The running relay's listeners and upstream servers (health,
    /// weight, sessions), read from its status socket; drain or enable a
    /// server.
    Status {
        /// The running relay's state directory (its socket is
        /// status.sock there).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<StatusAction>,
    },
    /// Session-ticket keys shared by a fleet of relays.
    Tickets {
        #[command(subcommand)]
        command: crate::tickets::TicketsCommand,
    },
    /// Print a shell's completion script for tlsrelay.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (tlsrelay.8, one per subcommand, and
    /// tlsrelay.toml.5) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum StatusAction {
    /// No new sessions for this server; those under way go on.
    Drain { upstream: String, server: String },
    /// Sessions for this server again.
    Enable { upstream: String, server: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// tlsrelay(8), and tlsrelay-SUBCOMMAND(8) for each visible subcommand
/// (nested ones too), from the same definitions `--help` prints; and
/// tlsrelay.toml(5) from the configuration's types.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    fn write(cmd: &clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, dir)?;
        }
        let page = clap_mangen::Man::new(cmd.clone()).section("8");
        page.generate_to(dir)
            .with_context(|| format!("writing {}", dir.join(page.get_filename()).display()))?;
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    write(&cli, dir)?;
    let config = dir.join("tlsrelay.toml.5");
    std::fs::write(&config, crate::config_reference::roff())
        .with_context(|| format!("writing {}", config.display()))
}

/// Exit status for an invalid configuration.
pub const EXIT_INVALID_CONFIG: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Cert { command } => cert::run(command),
        Command::Dns { command } => dns::run(command),
        Command::Tlsrpt { command } => tlsrpt::run(command),
        Command::Stats { pin_dir, json } => stats(&pin_dir, json),
        Command::Status {
            state_dir,
            json,
            action,
        } => status(state_dir, json, action),
        Command::Tickets { command } => crate::tickets::run(command),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tlsrelay",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => match write_man_pages(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tlsrelay: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            state_dir,
            json_reports,
            log_format,
        } => {
            let logs_to_stderr = json_reports.as_deref() == Some(std::path::Path::new("-"));
            let _log = init_logging(log_format, logs_to_stderr);
            match run(config, state_dir, json_reports) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let invalid = e.downcast_ref::<ConfigError>().is_some();
                    eprintln!("tlsrelay: {e:#}");
                    ExitCode::from(if invalid { EXIT_INVALID_CONFIG } else { 1 })
                }
            }
        }
    }
}

/// Sends the TLS reports of finished days every hour (the first a minute
/// after start), logging what became of each.
async fn send_tls_reports(sender: crate::tls_reports::sender::ReportSender) {
    let mut hourly = tokio::time::interval_at(
        tokio::time::Instant::now() + std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(3600),
    );
    loop {
        hourly.tick().await;
        for report in sender.send_due(false).await {
            match report.outcome {
                Ok(to) => tracing::info!(
                    "TLS report {} {} sent to {}",
                    report.day,
                    report.domain,
                    to.join(", ")
                ),
                Err(why) => tracing::info!(
                    "TLS report {} {} not sent: {why}",
                    report.day,
                    report.domain
                ),
            }
        }
    }
}

/// Logs go to standard output (standard error when it carries JSON
/// reports), batched and written by a thread of their own
/// ([`log_writer`]); the guard writes what is left when dropped. Colours
/// only on a terminal: a file or a pipe gets plain text.
fn init_logging(format: LogFormat, to_stderr: bool) -> log_writer::FlushGuard {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (ansi, (writer, guard)) = if to_stderr {
        (
            std::io::stderr().is_terminal(),
            log_writer::batched(Box::new(std::io::stderr())),
        )
    } else {
        (
            std::io::stdout().is_terminal(),
            log_writer::batched(Box::new(std::io::stdout())),
        )
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Human => fmt.init(),
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
    guard
}

fn check(file: &std::path::Path) -> ExitCode {
    let result = Config::load(file).and_then(|config| {
        Plan::build(&config, SelfSignedSource::Ephemeral).map(|plan| (config, plan))
    });
    match result {
        Ok((config, plan)) => {
            println!("{}: valid", file.display());
            for line in &plan.description {
                println!("  {line}");
            }
            for warning in crate::privileges::warnings(&config) {
                println!("  warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tlsrelay: {e}");
            ExitCode::from(EXIT_INVALID_CONFIG)
        }
    }
}

fn status(state_dir: Option<PathBuf>, json: bool, action: Option<StatusAction>) -> ExitCode {
    let socket = crate::status::socket_path(&crate::state::state_dir(state_dir));
    let request = match (&action, json) {
        (Some(StatusAction::Drain { upstream, server }), _) => format!("drain {upstream} {server}"),
        (Some(StatusAction::Enable { upstream, server }), _) => {
            format!("enable {upstream} {server}")
        }
        (None, true) => "show json".into(),
        (None, false) => "show".into(),
    };
    match crate::status::ask(&socket, &request) {
        Ok(answer) => {
            print!("{answer}");
            if answer.starts_with("error:") {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!(
                "tlsrelay: {}: {e} (is the relay running with this state directory?)",
                socket.display()
            );
            ExitCode::from(1)
        }
    }
}

fn stats(pin_dir: &std::path::Path, json: bool) -> ExitCode {
    let snapshot = match tlsrelay_sys::bpf::snapshot(pin_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tlsrelay: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&snapshot).expect("serializable")
        );
    } else {
        let line = |title: &str, counts: &std::collections::BTreeMap<&str, u64>| {
            let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("{title}: {}", parts.join(", "));
        };
        println!("eBPF wire counters pinned in {}", pin_dir.display());
        line("connections by negotiated version", &snapshot.negotiated.0);
        line("downgrades", &snapshot.downgrades.0);
        line("parser", &snapshot.parser.0);
        println!("connections (wire | relay):");
        for c in &snapshot.connections {
            let wire = match (c.wire.negotiated_version, c.wire.plaintext) {
                (Some(v), _) => format!(
                    "{v} suite {:#06x}{}",
                    c.wire.cipher_suite,
                    c.wire
                        .key_exchange
                        .map_or(String::new(), |g| format!(" {g}"))
                ),
                (None, true) => "plaintext".to_string(),
                (None, false) if c.wire.unparsed => "unparsed hello".to_string(),
                (None, false) => "no hello".to_string(),
            };
            let relay = match &c.relay {
                Some(r) => format!(
                    "{} {}{}{}{}{}{}",
                    r.leg,
                    r.negotiated_version.unwrap_or("plaintext"),
                    r.key_exchange.map_or(String::new(), |g| format!(" {g}")),
                    if r.downgraded { " (downgraded)" } else { "" },
                    if r.tls_off { " (TLS off)" } else { "" },
                    if r.refused { " (refused)" } else { "" },
                    if r.passthrough { " (passthrough)" } else { "" }
                ),
                None => "-".to_string(),
            };
            let flag = if c.disagreements.is_empty() {
                String::new()
            } else {
                format!("   DISAGREE: {}", c.disagreements.join("; "))
            };
            println!(
                "  {:>20} :{:<5} <-> :{:<5} {wire:<32} | {relay}{flag}",
                c.cookie, c.local_port, c.remote_port
            );
        }
        println!(
            "unaccounted: {} (wire records without a relay view: a session still open, or not this relay's socket)",
            snapshot.unaccounted
        );
        println!("disagreements: {}", snapshot.disagreements);
    }
    if snapshot.disagreements > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn run(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    json_reports: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config_path = config;
    let config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(),
    };
    let state_dir = crate::state::state_dir(state_dir.or_else(|| config.state_dir.clone()));
    crate::pump::set_uring_workers(config.dataplane.workers());
    let pools = crate::upstreams::Pools::default();
    let mut plan = Plan::build_with(
        &config,
        SelfSignedSource::StateDir(state_dir.clone()),
        &pools,
    )?;
    let report_sender = plan.report_sender.take();
    // Before any socket exists: sockets belong to their creator's cgroup.
    let wire = start_wire_counters(&config);
    // Everything that needs privileges happens before the runtime's
    // threads exist: binding (port 25), attaching, opening files. Then the
    // relay gives them up, and every thread it starts inherits that.
    let description = plan.description.clone();
    let mut relay = Listeners::bind(plan)?;
    let wire_line = attach_wire_counters(&mut relay, &wire, &config);
    let metrics = match config.metrics.address {
        Some(address) => {
            let (listener, metrics) = bind_metrics(&mut relay, address, &wire)?;
            metrics.watch_pools(pools.clone());
            Some((listener, metrics))
        }
        None => None,
    };
    if let Some(dest) = &json_reports {
        write_json_reports(&mut relay, dest)?;
    }
    let status_socket = crate::status::bind(&state_dir).with_context(|| {
        format!(
            "status: cannot listen on {}",
            crate::status::socket_path(&state_dir).display()
        )
    })?;
    let user = config.user.as_ref().map(|u| u.get_ref().as_str());
    let privileges = crate::privileges::give_up(user, &state_dir)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        let banner = Banner {
            to_stderr: json_reports.as_deref() == Some(std::path::Path::new("-")),
        };
        let metrics_at = match metrics {
            Some((listener, metrics)) => Some(serve_metrics(listener, metrics, &config)?),
            None => None,
        };
        tokio::spawn(crate::status::serve(
            status_socket,
            status_source(&pools, &relay),
        ));
        banner.announce(&Started {
            config: &config,
            relay: &relay,
            description: &description,
            wire_line: &wire_line,
            metrics_at,
            privileges: &privileges,
            state_dir: &state_dir,
        });
        if let Some(sender) = report_sender {
            tokio::spawn(send_tls_reports(sender));
        }
        let reloader = crate::reload::Reloader::new(
            config_path,
            &config,
            state_dir,
            relay.plan_switch(),
            pools,
        );
        serve_until_stopped(relay, reloader, config.limits.drain_timeout).await
    })
}

/// Serves the metrics endpoint; where it listens.
fn serve_metrics(
    listener: std::net::TcpListener,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    config: &Config,
) -> std::io::Result<std::net::SocketAddr> {
    let bound = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let allow = config.metrics.allow_from.clone();
    tokio::spawn(crate::metrics::serve(listener, metrics, allow));
    Ok(bound)
}

/// What `tlsrelay status` reads: the pools and where each listener is.
fn status_source(pools: &crate::upstreams::Pools, relay: &Listeners) -> crate::status::Source {
    crate::status::Source {
        pools: pools.clone(),
        listeners: relay
            .local_addrs()
            .into_iter()
            .map(|(name, address)| crate::status::ListenerView { name, address })
            .collect(),
        started: std::time::Instant::now(),
    }
}

/// Serves until SIGTERM (then drains), reloading at SIGHUP, and tells
/// systemd when it is ready and when it stops.
async fn serve_until_stopped(
    relay: Listeners,
    reloader: crate::reload::Reloader,
    drain: std::time::Duration,
) -> anyhow::Result<()> {
    // Both handlers exist before READY=1: a reload or stop systemd sends
    // right after it must not meet the default action (exit).
    use tokio::signal::unix::{signal, SignalKind};
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let reloader = std::sync::Arc::new(reloader);
    tokio::spawn(async move { reloader.run(hup, RELOAD_POLL).await });
    tlsrelay_sys::notify::notify("READY=1");
    relay.serve(shutdown_signal(term), drain).await;
    tlsrelay_sys::notify::notify("STOPPING=1");
    tracing::info!("shutting down");
    Ok(())
}

/// Where the startup banner goes: standard output, unless that carries
/// the JSON reports.
struct Banner {
    to_stderr: bool,
}

/// What the banner tells of a relay that has started.
struct Started<'a> {
    config: &'a Config,
    relay: &'a Listeners,
    description: &'a [String],
    wire_line: &'a str,
    metrics_at: Option<std::net::SocketAddr>,
    privileges: &'a str,
    state_dir: &'a std::path::Path,
}

impl Banner {
    fn say(&self, line: std::fmt::Arguments<'_>) {
        if self.to_stderr {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }

    /// The startup banner; its last line names the state directory (what
    /// scripts and tests wait for).
    fn announce(&self, s: &Started<'_>) {
        self.say(format_args!(
            "tlsrelay {} running ({})",
            env!("CARGO_PKG_VERSION"),
            s.config.source.name
        ));
        for (name, addr) in s.relay.local_addrs() {
            self.say(format_args!("  listener {name} listening on {addr}"));
        }
        for line in s.description {
            self.say(format_args!("  {line}"));
        }
        self.say(format_args!("  {}", s.wire_line));
        if let Some(bound) = s.metrics_at {
            self.say(format_args!("  metrics on http://{bound}/metrics"));
        }
        self.say(format_args!("  {}", s.privileges));
        self.say(format_args!(
            "  status on {} (tlsrelay status)",
            crate::status::socket_path(s.state_dir).display()
        ));
        self.say(format_args!("  state directory {}", s.state_dir.display()));
    }
}

type Wire = Result<std::sync::Arc<tlsrelay_sys::bpf::WireCounters>, String>;

/// Loads and attaches the eBPF program, or says why the counters are off.
fn start_wire_counters(config: &Config) -> Wire {
    if !config.ebpf.enabled {
        return Err("eBPF wire counters off (ebpf.enabled = false)".to_string());
    }
    let mut settings = config.ebpf.settings();
    // SMTP is read on the SMTP listeners' ports and the next hops'.
    settings.smtp_ports.extend(
        config
            .listeners
            .iter()
            .filter(|l| l.protocol == tlsrelay_core::config::Protocol::Smtp)
            .map(|l| l.address.get_ref().port()),
    );
    settings.smtp_ports.extend(
        config
            .outbound_connectors
            .iter()
            .flat_map(|c| &c.next_hops)
            .map(|h| match h.get_ref() {
                tlsrelay_core::config::NextHop::Fixed(address) => address.port,
                tlsrelay_core::config::NextHop::Mx { port } => *port,
            }),
    );
    match tlsrelay_sys::bpf::WireCounters::start(&settings) {
        Ok(w) => Ok(std::sync::Arc::new(w)),
        Err(e) => Err(format!("eBPF wire counters off: {e}")),
    }
}

/// Points the wire counters at the bound listeners; the banner's line.
fn attach_wire_counters(relay: &mut Listeners, wire: &Wire, config: &Config) -> String {
    let w = match wire {
        Ok(w) => w,
        Err(why) => return why.clone(),
    };
    relay.record_wire_views(w.clone());
    let smtp = |name: &str| {
        config.listeners.iter().any(|l| {
            l.name.get_ref() == name && l.protocol == tlsrelay_core::config::Protocol::Smtp
        })
    };
    for (name, addr) in relay.local_addrs() {
        if smtp(&name) {
            if let Err(e) = w.read_as_smtp(addr.port()) {
                tracing::warn!("eBPF: SMTP on port {} not read: {e}", addr.port());
            }
        }
    }
    format!(
        "eBPF wire counters on the sockets of cgroup {}, maps pinned in {}",
        w.cgroup.display(),
        w.pin_dir.display()
    )
}

/// Binds the metrics listener (served once the runtime runs) and counts
/// every session into its metrics.
fn bind_metrics(
    relay: &mut Listeners,
    address: std::net::SocketAddr,
    wire: &Wire,
) -> anyhow::Result<(
    std::net::TcpListener,
    std::sync::Arc<crate::metrics::Metrics>,
)> {
    let listener = std::net::TcpListener::bind(address)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("metrics: cannot listen on {address}"))?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new(wire.as_ref().ok().cloned()));
    relay.count_into(metrics.clone());
    let bound = listener.local_addr().unwrap_or(address);
    // Scrapes are no relay sessions: the wire program skips them.
    if let Ok(w) = wire {
        if let Err(e) = w.ignore_local_port(bound.port()) {
            tracing::warn!("eBPF: metrics scrapes will be counted: {e}");
        }
    }
    Ok((listener, metrics))
}

/// Each session report as a JSON line, on stdout (`-`) or appended to a
/// file, from a thread of its own.
fn write_json_reports(relay: &mut Listeners, dest: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out: Box<dyn Write + Send> = if dest == std::path::Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dest)
            .with_context(|| format!("--json-reports: cannot open {}", dest.display()))?;
        Box::new(std::io::LineWriter::new(file))
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    relay.send_reports_to(tx);
    std::thread::spawn(move || {
        while let Some(report) = rx.blocking_recv() {
            if let Ok(line) = serde_json::to_string(&report) {
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    });
    Ok(())
}

/// How often the configuration's files are looked at for changes.
const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(2);

async fn shutdown_signal(mut term: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
