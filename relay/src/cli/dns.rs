//! `tlsrelay dns records`: what an operator publishes in DNS for the
//! mail edge a configuration describes: MX records naming the SMTP
//! listeners' host names, DANE TLSA 3 1 1 records for every key served on
//! port 25 (and the next key during a rotation), the MTA-STS and TLS-RPT
//! TXT records, and the MTA-STS policy to serve over HTTPS.

use std::path::PathBuf;
use std::process::ExitCode;

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::inspect::sha256;
use tlsrelay_core::config::{Config, Protocol};

#[derive(Debug, clap::Subcommand)]
pub enum DnsCommand {
    /// Print the records to publish (zone-file lines) and the MTA-STS
    /// policy text.
    Records {
        /// TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// A certificate chain going live next: its key gets a TLSA record
        /// too, published before the switch (repeatable).
        #[arg(long)]
        next: Vec<PathBuf>,
        /// MTA-STS mode: `testing` (report only) while starting out, then
        /// `enforce`.
        #[arg(long, default_value = "testing", value_parser = ["testing", "enforce"])]
        sts_mode: String,
        /// Where TLS-RPT reports go (default: mailto:tlsrpt@ each domain).
        #[arg(long)]
        rua: Option<String>,
    },
}

/// What the records are made from.
pub struct EdgeFacts {
    /// Accepted domains that are names (not `.parent` patterns).
    pub domains: Vec<String>,
    /// The SMTP listeners' host names on port 25.
    pub mx_hosts: Vec<String>,
    /// SHA-256 of each key's SubjectPublicKeyInfo, with where it is from.
    pub tlsa: Vec<(Vec<u8>, String)>,
    pub sts_mode: String,
    pub rua: Option<String>,
}

pub fn run(command: DnsCommand) -> ExitCode {
    let DnsCommand::Records {
        config,
        next,
        sts_mode,
        rua,
    } = command;
    match facts(&config, &next, sts_mode, rua) {
        Ok(facts) => {
            print!("{}", records(&facts));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tlsrelay: {e}");
            ExitCode::from(1)
        }
    }
}

fn facts(
    path: &std::path::Path,
    next: &[PathBuf],
    sts_mode: String,
    rua: Option<String>,
) -> Result<EdgeFacts, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let domains: Vec<String> = config
        .accepted_domains
        .iter()
        .map(|d| d.get_ref().to_string())
        .filter(|d| !d.starts_with('.') && d != "*")
        .collect();
    let mut mx_hosts = Vec::new();
    let mut tlsa = Vec::new();
    for l in &config.listeners {
        if l.protocol != Protocol::Smtp || l.address.get_ref().port() != 25 {
            continue;
        }
        let host = l.hostname.clone().unwrap_or_else(crate::tls::hostname);
        if !mx_hosts.contains(&host) {
            mx_hosts.push(host);
        }
        for files in &l.tls.certificates {
            let file = config.source.resolve(files.chain.get_ref());
            tlsa.push((spki_sha256(&file)?, file.display().to_string()));
        }
    }
    for file in next {
        tlsa.push((spki_sha256(file)?, format!("{} (next)", file.display())));
    }
    if mx_hosts.is_empty() {
        return Err(format!(
            "{}: no SMTP listener on port 25 to publish",
            path.display()
        ));
    }
    Ok(EdgeFacts {
        domains,
        mx_hosts,
        tlsa,
        sts_mode,
        rua,
    })
}

/// SHA-256 of the end-entity certificate's SubjectPublicKeyInfo: DANE's
/// selector 1 (SPKI), matching type 1 (SHA2-256).
fn spki_sha256(chain: &std::path::Path) -> Result<Vec<u8>, String> {
    let certs = crate::tls::load_chain(chain).map_err(|e| e.to_string())?;
    let end_entity: &CertificateDer<'_> = certs
        .first()
        .ok_or_else(|| format!("{}: no certificate", chain.display()))?;
    let (_, cert) =
        X509Certificate::from_der(end_entity).map_err(|e| format!("{}: {e}", chain.display()))?;
    Ok(sha256(cert.public_key().raw))
}

/// The records as zone-file lines, then the MTA-STS policy.
pub fn records(facts: &EdgeFacts) -> String {
    let mut out = String::from("; MX: mail for the accepted domains goes to the SMTP listeners\n");
    for domain in &facts.domains {
        for host in &facts.mx_hosts {
            out += &format!("{domain}. IN MX 10 {host}.\n");
        }
    }
    out += "\n; DANE (RFC 7672): TLSA 3 1 1 of every key served on port 25\n";
    for host in &facts.mx_hosts {
        for (digest, from) in &facts.tlsa {
            let hex = tlsrelay_core::hex(digest);
            out += &format!("_25._tcp.{host}. IN TLSA 3 1 1 {hex} ; {from}\n");
        }
    }
    let policy = sts_policy(facts);
    let id = tlsrelay_core::hex(&sha256(policy.as_bytes())[..8]);
    out += "\n; MTA-STS (RFC 8461): the id changes whenever the policy below does\n";
    for domain in &facts.domains {
        out += &format!("_mta-sts.{domain}. IN TXT \"v=STSv1; id={id}\"\n");
    }
    out += "\n; TLS-RPT (RFC 8460): where senders report TLS failures\n";
    for domain in &facts.domains {
        let rua = facts
            .rua
            .clone()
            .unwrap_or_else(|| format!("mailto:tlsrpt@{domain}"));
        out += &format!("_smtp._tls.{domain}. IN TXT \"v=TLSRPTv1; rua={rua}\"\n");
    }
    out += "\n; The MTA-STS policy, served as https://mta-sts.<domain>/.well-known/mta-sts.txt\n; (a certificate for mta-sts.<domain> from a public CA):\n";
    for line in policy.lines() {
        out += &format!("; {line}\n");
    }
    out
}

fn sts_policy(facts: &EdgeFacts) -> String {
    let mut policy = format!("version: STSv1\nmode: {}\n", facts.sts_mode);
    for host in &facts.mx_hosts {
        policy += &format!("mx: {host}\n");
    }
    policy += "max_age: 604800\n";
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(mode: &str) -> EdgeFacts {
        EdgeFacts {
            domains: vec!["example.org".into()],
            mx_hosts: vec!["mx.example.org".into()],
            tlsa: vec![(vec![0xab; 32], "mx.pem".into())],
            sts_mode: mode.into(),
            rua: None,
        }
    }

    #[test]
    fn records_name_every_part_and_the_sts_id_follows_the_policy() {
        let text = records(&facts("testing"));
        assert!(
            text.contains("example.org. IN MX 10 mx.example.org.\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "_25._tcp.mx.example.org. IN TLSA 3 1 1 {} ; mx.pem",
                "ab".repeat(32)
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "_smtp._tls.example.org. IN TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.org\""
            ),
            "{text}"
        );
        assert!(
            text.contains("; mode: testing\n; mx: mx.example.org\n"),
            "{text}"
        );
        let id = |t: &str| {
            t.lines()
                .find(|l| l.starts_with("_mta-sts."))
                .unwrap()
                .to_string()
        };
        assert_ne!(id(&text), id(&records(&facts("enforce"))));
    }
}
