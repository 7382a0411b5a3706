//! `tlsrelay cert info|check`: the certificates a configuration serves (or
//! PEM files named on the command line), described for partners and checked
//! before they go live.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use rustls::pki_types::UnixTime;

use crate::inspect::{self, CertificateInfo, CheckInput, Finding, Level};
use crate::revocation;
use tlsrelay_core::config::{CertificateFiles, Config, Protocol};

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Print what partners ask for about each certificate the relay serves:
    /// root issuer, names, organisation, key, validity, fingerprints.
    Info {
        #[command(flatten)]
        which: Which,
        /// Machine-readable output.
        #[arg(long, conflicts_with = "markdown")]
        json: bool,
        /// A Markdown table per certificate, to paste into a message.
        #[arg(long)]
        markdown: bool,
    },
    /// Check each certificate (current or candidate) before it goes live:
    /// chain to the trust store, expiry, names, key strength, and the
    /// revocation and issuer endpoints. Exit status 0, or 3 on any error.
    Check {
        #[command(flatten)]
        which: Which,
        /// Trust anchors (PEM) to validate against (default: the system
        /// trust store).
        #[arg(long)]
        trust_anchors: Option<PathBuf>,
        /// A name the certificate must cover (repeatable); SMTP listeners'
        /// hostnames are checked without asking.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Try a connection to every CRL, OCSP and CA-issuer endpoint (and
        /// fetch http CRLs): will the firewall let peers validate it?
        #[arg(long)]
        reach: bool,
        /// Per-endpoint timeout for --reach (`3s`, `500ms`, or seconds).
        #[arg(long, default_value = "3s", value_parser = tlsrelay_core::config::parse_duration)]
        timeout: Duration,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// The certificates to look at: a configuration's, or PEM files.
#[derive(Debug, Args)]
pub struct Which {
    /// Every certificate this configuration serves or presents.
    #[arg(long, short, conflicts_with = "files")]
    config: Option<PathBuf>,
    /// PEM chain files (end-entity certificate first).
    #[arg(required_unless_present = "config")]
    files: Vec<PathBuf>,
    /// The private key of a single chain file, to check they match.
    #[arg(long, requires = "files")]
    key: Option<PathBuf>,
}

/// A chain to describe or check, with who uses it.
struct Subject {
    role: String,
    chain: PathBuf,
    key: Option<PathBuf>,
    /// Names it must cover, with who needs them.
    names: Vec<(String, String)>,
    /// The OCSP response stapled with it.
    ocsp: Option<PathBuf>,
}

fn subjects(which: &Which) -> Result<Vec<Subject>, String> {
    let Some(path) = &which.config else {
        return Ok(which
            .files
            .iter()
            .map(|f| Subject {
                role: "file".into(),
                chain: f.clone(),
                key: which.key.clone(),
                names: Vec::new(),
                ocsp: None,
            })
            .collect());
    };
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let src = &config.source;
    let subject = |role: String, files: &CertificateFiles, names| Subject {
        role,
        chain: src.resolve(files.chain.get_ref()),
        key: Some(src.resolve(files.key.get_ref())),
        names,
        ocsp: files
            .ocsp_response
            .as_ref()
            .map(|o| src.resolve(o.get_ref())),
    };
    let mut out = Vec::new();
    for l in &config.listeners {
        let names: Vec<(String, String)> = match (&l.protocol, &l.hostname) {
            (Protocol::Smtp, Some(host)) => {
                vec![(
                    host.clone(),
                    format!("listener {} hostname", l.name.get_ref()),
                )]
            }
            _ => Vec::new(),
        };
        for (j, files) in l.tls.certificates.iter().enumerate() {
            out.push(subject(
                format!("listener {} certificate {j}", l.name.get_ref()),
                files,
                names.clone(),
            ));
        }
    }
    for u in &config.upstreams {
        if let Some(files) = &u.tls.client_certificate {
            out.push(subject(
                format!("upstream {} client certificate", u.name.get_ref()),
                files,
                Vec::new(),
            ));
        }
    }
    for c in &config.outbound_connectors {
        if let Some(files) = &c.tls.client_certificate {
            out.push(subject(
                format!("outbound connector {} client certificate", c.name.get_ref()),
                files,
                Vec::new(),
            ));
        }
    }
    if out.is_empty() {
        return Err(format!(
            "{}: no certificate files configured (listeners without certificates serve a generated self-signed one)",
            path.display()
        ));
    }
    Ok(out)
}

fn load(
    s: &Subject,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        CertificateInfo,
    ),
    String,
> {
    let chain = crate::tls::load_chain(&s.chain).map_err(|e| e.to_string())?;
    let info =
        CertificateInfo::of_chain(&chain).map_err(|e| format!("{}: {e}", s.chain.display()))?;
    Ok((chain, info))
}

pub fn run(command: CertCommand) -> ExitCode {
    match command {
        CertCommand::Info {
            which,
            json,
            markdown,
        } => info(&which, json, markdown),
        CertCommand::Check {
            which,
            trust_anchors,
            names,
            reach,
            timeout,
            json,
        } => check(
            &which,
            trust_anchors.as_deref(),
            &names,
            reach,
            timeout,
            json,
        ),
    }
}

fn info(which: &Which, json: bool, markdown: bool) -> ExitCode {
    let subjects = match subjects(which) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let mut all = Vec::new();
    for s in &subjects {
        let (chain, info) = match load(s) {
            Ok(loaded) => loaded,
            Err(e) => return fail(&e),
        };
        let staple = staple_finding(s, &chain).map(|f| f.what);
        let mut rows = info.rows();
        rows.extend(staple.clone().map(|what| ("OCSP staple", what)));
        if json {
            all.push(serde_json::json!({
                "role": s.role, "file": s.chain, "certificate": info, "ocsp_staple": staple,
            }));
        } else if markdown {
            println!(
                "### {} (`{}`)\n\n| Field | Value |\n|---|---|",
                s.role,
                s.chain.display()
            );
            for (field, value) in &rows {
                println!("| {field} | {} |", value.replace('|', "\\|"));
            }
            println!();
        } else {
            println!("{}: {}", s.role, s.chain.display());
            for (field, value) in &rows {
                println!("  {field:<26} {value}");
            }
            println!();
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("serializable")
        );
    }
    ExitCode::SUCCESS
}

fn check(
    which: &Which,
    trust_anchors: Option<&Path>,
    extra_names: &[String],
    reach: bool,
    timeout: Duration,
    json: bool,
) -> ExitCode {
    let subjects = match subjects(which) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let roots = match trust_anchors {
        Some(path) => crate::tls::load_roots(path),
        None => crate::tls::system_roots(),
    };
    let roots = match roots {
        Ok(r) => r,
        Err(e) => return fail(&e.to_string()),
    };
    let now = UnixTime::now();
    let mut worst = Level::Ok;
    let mut reports = Vec::new();
    for s in &subjects {
        let mut endpoints = Vec::new();
        let findings = match load(s) {
            Err(e) => vec![Finding {
                level: Level::Error,
                what: e,
            }],
            Ok((chain, info)) => {
                let mut names = s.names.clone();
                names.extend(
                    extra_names
                        .iter()
                        .map(|n| (n.clone(), "--name".to_string())),
                );
                let input = CheckInput {
                    chain: &chain,
                    roots: &roots,
                    names: &names,
                    now,
                };
                let mut findings = key_finding(s).into_iter().collect::<Vec<_>>();
                findings.extend(inspect::check(&input, &info));
                findings.extend(staple_finding(s, &chain));
                if reach {
                    let subject = revocation::Subject {
                        chain: &chain,
                        roots: &roots,
                        crl_urls: &info.crl_urls,
                        ocsp_urls: &info.ocsp_urls,
                        ca_issuer_urls: &info.ca_issuer_urls,
                    };
                    endpoints = revocation::reach(&subject, timeout);
                    findings.extend(endpoints.iter().map(reach_finding));
                } else {
                    findings.push(listed_endpoints(&info));
                }
                findings
            }
        };
        worst = findings.iter().map(|f| f.level).fold(worst, Level::max);
        if json {
            reports.push(serde_json::json!({
                "role": s.role, "file": s.chain, "findings": findings, "endpoints": endpoints,
            }));
        } else {
            print_findings(s, &findings);
        }
    }
    print_verdict(worst, json, reports);
    if worst == Level::Error {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

/// Whether the configured key belongs to the certificate.
fn key_finding(s: &Subject) -> Option<Finding> {
    let key = s.key.as_ref()?;
    Some(match crate::tls::load_certified_key(&s.chain, key) {
        Ok(_) => Finding {
            level: Level::Ok,
            what: format!("key {} matches the certificate", key.display()),
        },
        Err(e) => Finding {
            level: Level::Error,
            what: e.to_string(),
        },
    })
}

/// The stapled OCSP response: for this certificate, good and current, or
/// why the relay would refuse it.
fn staple_finding(s: &Subject, chain: &[rustls::pki_types::CertificateDer<'_>]) -> Option<Finding> {
    let path = s.ocsp.as_ref()?;
    let checked = crate::tls::load_ocsp_staple(path, chain).and_then(|der| {
        let serial = chain
            .first()
            .map(crate::tls::certificate_serial)
            .transpose()
            .map_err(crate::tls::TlsError::Rustls)?
            .unwrap_or_default();
        tlsrelay_core::ocsp::status_for(&der, &serial)
            .map_err(|e| crate::tls::TlsError::Rustls(e.to_string()))
    });
    Some(match checked {
        Ok(status) => Finding {
            level: Level::Ok,
            what: format!(
                "OCSP response {}: {}, this update {}, next update {}",
                path.display(),
                status.status,
                tlsrelay_core::ocsp::format_time(status.this_update),
                status
                    .next_update
                    .map_or("none".into(), tlsrelay_core::ocsp::format_time)
            ),
        },
        Err(e) => Finding {
            level: Level::Error,
            what: format!("OCSP response refused: {e}"),
        },
    })
}

fn reach_finding(r: &revocation::Reach) -> Finding {
    Finding {
        level: if r.reachable { Level::Ok } else { Level::Error },
        what: format!("{} {}: {}", r.kind, r.url, r.detail),
    }
}

/// The certificate's revocation and issuer endpoints, not contacted.
fn listed_endpoints(info: &CertificateInfo) -> Finding {
    let listed: Vec<String> = info
        .crl_urls
        .iter()
        .map(|u| format!("CRL {u}"))
        .chain(info.ocsp_urls.iter().map(|u| format!("OCSP {u}")))
        .chain(info.ca_issuer_urls.iter().map(|u| format!("CA issuer {u}")))
        .collect();
    Finding {
        level: Level::Ok,
        what: if listed.is_empty() {
            "no revocation or issuer endpoints in the certificate".into()
        } else {
            format!("endpoints (try them with --reach): {}", listed.join(", "))
        },
    }
}

fn print_findings(s: &Subject, findings: &[Finding]) {
    println!("{}: {}", s.role, s.chain.display());
    for f in findings {
        let level = match f.level {
            Level::Ok => "ok",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
        };
        println!("  {level:<8} {}", f.what);
    }
    println!();
}

fn print_verdict(worst: Level, json: bool, reports: Vec<serde_json::Value>) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "worst": worst, "certificates": reports })
            )
            .expect("serializable")
        );
    } else {
        println!(
            "{}",
            match worst {
                Level::Ok => "all checks passed",
                Level::Warning => "passed with warnings",
                Level::Error => "FAILED: see the errors above",
            }
        );
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("tlsrelay: {message}");
    ExitCode::from(1)
}
