//! `tlsrelay tlsrpt show|send`: the TLS reports (RFC 8460) MX delivery has
//! gathered in the state directory, as an operator reads them, as the JSON
//! the domains will get, and sent now.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::plan::{Plan, SelfSignedSource};
use crate::tls_reports::pending;
use tlsrelay_core::config::Config;
use tlsrelay_core::tlsrpt::Report;

#[derive(Debug, clap::Subcommand)]
pub enum TlsRptCommand {
    /// Print the results waiting to be reported, per day and domain.
    Show {
        /// The relay's state directory (default: as `run` chooses it).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print each report as the JSON a domain receives (RFC 8460 4.4).
        #[arg(long)]
        json: bool,
    },
    /// Send the reports of finished UTC days to each domain's `rua` now
    /// (`run` does so every hour).
    Send {
        /// TOML configuration file (for the resolver and trust anchors).
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Send today's results too (its report is then partial).
        #[arg(long)]
        include_today: bool,
    },
}

pub fn run(command: TlsRptCommand) -> ExitCode {
    match command {
        TlsRptCommand::Show { state_dir, json } => {
            show(crate::state::state_dir(state_dir).join("tlsrpt"), json)
        }
        TlsRptCommand::Send {
            config,
            state_dir,
            include_today,
        } => send(config, state_dir, include_today),
    }
}

fn show(dir: PathBuf, json: bool) -> ExitCode {
    let all = pending(&dir);
    if json {
        let reports: Vec<Report> = all
            .into_iter()
            .map(|p| Report::new("(sender)", "(contact)", &p.day, &p.domain, p.results))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    if all.is_empty() {
        println!("no TLS reports pending in {}", dir.display());
    }
    for p in all {
        println!("{} {}", p.day, p.domain);
        for policy in &p.results.policies {
            println!(
                "  policy {}: {} successful, {} failed",
                policy.policy.policy_type, policy.summary.successful, policy.summary.failed
            );
            for f in &policy.failure_details {
                println!(
                    "    {} x{} mx {} ip {}: {}",
                    f.result_type,
                    f.failed_session_count,
                    f.receiving_mx_hostname.as_deref().unwrap_or("-"),
                    f.receiving_ip.map_or("-".into(), |ip| ip.to_string()),
                    f.failure_reason_code.as_deref().unwrap_or("")
                );
            }
        }
    }
    ExitCode::SUCCESS
}

fn send(config: PathBuf, state_dir: Option<PathBuf>, include_today: bool) -> ExitCode {
    let built = Config::load(&config)
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            let dir = crate::state::state_dir(state_dir.or_else(|| config.state_dir.clone()));
            Ok(Plan::build(&config, SelfSignedSource::StateDir(dir))?)
        });
    let sender = match built {
        Ok(plan) => plan.report_sender,
        Err(e) => {
            eprintln!("tlsrelay: {e:#}");
            return ExitCode::from(super::EXIT_INVALID_CONFIG);
        }
    };
    let Some(sender) = sender else {
        eprintln!("tlsrelay: no outbound connector delivers by MX: no TLS reports to send");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tlsrelay: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sent = runtime.block_on(sender.send_due(include_today));
    let mut failed = false;
    for report in sent {
        match report.outcome {
            Ok(to) => println!(
                "{} {}: sent to {}",
                report.day,
                report.domain,
                to.join(", ")
            ),
            Err(why) => {
                failed |= why.is_failure();
                println!("{} {}: not sent: {why}", report.day, report.domain);
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
