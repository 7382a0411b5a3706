//! Finished days of TLS reports sent, gzipped, to the `rua` addresses a
//! domain publishes at `_smtp._tls.<domain>`: by HTTPS POST, or by mail
//! through the relay's own outbound connectors; failures retried with
//! backoff for a day (RFC 8460 5.3).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;

use super::{pending, Pending};
use crate::dns::DnsResolver;
use crate::http_client;
use crate::smtp::client::{establish, MailConnector};
use crate::smtp::hop::OutboundRecord;
use crate::unix_now;
use tlsrelay_core::smtp::address::route;
use tlsrelay_core::smtp::forward::Routing;
use tlsrelay_core::smtp::next_hop::{DotStuffer, SmtpTimeouts, Wait};
use tlsrelay_core::tlsrpt::{report_mail, rua, utc_day, Envelope, Report, Retry};

/// How long one report POST may take, connection to answer: a `rua` that
/// never answers must not hold up the reports after it.
const POST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Why one attempt sent nothing.
enum Unsent {
    NoRua,
    Failed(String),
}

/// Who sends reports, and as whom.
pub struct ReportSender {
    pub dir: PathBuf,
    pub resolver: DnsResolver,
    pub roots: Arc<RootCertStore>,
    /// `organization-name` and the report id's suffix.
    pub organization: String,
    /// `contact-info`.
    pub contact: String,
    /// The relay's own outbound path, for `mailto:` addresses.
    pub mail: MailOut,
}

/// The relay's routes and connectors, as its SMTP sessions use them.
pub struct MailOut {
    pub routing: Arc<Routing>,
    pub connectors: Vec<Arc<MailConnector>>,
    /// EHLO name.
    pub hostname: String,
    pub timeouts: SmtpTimeouts,
}

/// What became of one pending report.
#[derive(Debug)]
pub struct Sent {
    pub day: String,
    pub domain: String,
    /// Where it went, or why it did not.
    pub outcome: Result<Vec<String>, NotSent>,
}

/// Why a pending report was not sent in this run.
#[derive(Debug, thiserror::Error)]
pub enum NotSent {
    /// The domain publishes no `rua`: it gets no report; the results are
    /// dropped.
    #[error("no rua published at _smtp._tls.{0}: dropped")]
    NoRua(String),
    /// No `rua` took it; kept for the next attempt.
    #[error("{why}; tried again after {}", tlsrelay_core::ocsp::format_time(*next_attempt))]
    Failed { why: String, next_attempt: i64 },
    /// No `rua` took it and its 24 hours of retries are over: dropped.
    #[error("{why}; given up {} h after the first failed attempt (RFC 8460 5.3)", tlsrelay_core::tlsrpt::RETRY_WINDOW / 3600)]
    Expired { why: String },
    /// An earlier attempt failed and its backoff has not passed.
    #[error("{failures} attempt(s) failed; next after {}", tlsrelay_core::ocsp::format_time(*next_attempt))]
    Waiting { failures: u32, next_attempt: i64 },
}

impl NotSent {
    /// An attempt was made and no `rua` took the report.
    pub fn is_failure(&self) -> bool {
        matches!(self, NotSent::Failed { .. } | NotSent::Expired { .. })
    }
}

/// The retry record kept beside a report (`<report>.retry`) once an
/// attempt failed.
fn retry_path(report: &Path) -> PathBuf {
    report.with_extension("retry")
}

fn load_retry(report: &Path) -> Option<Retry> {
    serde_json::from_slice(&crate::state::read_file(&retry_path(report)).ok()?).ok()
}

/// Drops a report and its retry record.
fn remove_report(report: &Path) {
    let _ = std::fs::remove_file(report);
    let _ = std::fs::remove_file(retry_path(report));
}

impl ReportSender {
    /// Sends the reports of finished UTC days (and today's too with
    /// `include_today`), removing each once one `rua` took it. A domain
    /// that publishes no `rua` gets none, and its results are dropped. One
    /// that no `rua` took is tried again with backoff for 24 hours
    /// ([`Retry`]), then dropped.
    pub async fn send_due(&self, include_today: bool) -> Vec<Sent> {
        let now = unix_now();
        let today = utc_day(now);
        let mut sent = Vec::new();
        for report in pending(&self.dir) {
            if report.day >= today && !include_today {
                continue;
            }
            let retry = load_retry(&report.path);
            let outcome = match retry {
                Some(r) if !r.due(now) => Err(NotSent::Waiting {
                    failures: r.failures,
                    next_attempt: r.next_attempt,
                }),
                _ => self.attempt(&report, retry, now).await,
            };
            sent.push(Sent {
                day: report.day,
                domain: report.domain,
                outcome,
            });
        }
        sent
    }

    /// Tries `report` now; removes it once taken or given up, else
    /// records when to try again.
    async fn attempt(
        &self,
        report: &Pending,
        retry: Option<Retry>,
        now: i64,
    ) -> Result<Vec<String>, NotSent> {
        let failed = match self.send(report).await {
            Ok(to) => {
                remove_report(&report.path);
                return Ok(to);
            }
            Err(Unsent::NoRua) => {
                remove_report(&report.path);
                return Err(NotSent::NoRua(report.domain.clone()));
            }
            Err(Unsent::Failed(why)) => why,
        };
        match Retry::after_failure(retry, now) {
            Some(next) => {
                let kept = serde_json::to_vec(&next)
                    .map_err(std::io::Error::from)
                    .and_then(|json| crate::state::replace_file(&retry_path(&report.path), &json));
                if let Err(e) = kept {
                    tracing::warn!("TLS report {}: retry time not kept: {e}", report.domain);
                }
                Err(NotSent::Failed {
                    why: failed,
                    next_attempt: next.next_attempt,
                })
            }
            None => {
                remove_report(&report.path);
                Err(NotSent::Expired { why: failed })
            }
        }
    }

    async fn send(&self, pending: &Pending) -> Result<Vec<String>, Unsent> {
        let txt = self
            .resolver
            .txt(&format!("_smtp._tls.{}", pending.domain))
            .await
            .map_err(|e| Unsent::Failed(e.to_string()))?;
        let destinations = rua(&txt.records);
        if destinations.is_empty() {
            return Err(Unsent::NoRua);
        }
        let report = Report::new(
            &self.organization,
            &self.contact,
            &pending.day,
            &pending.domain,
            pending.results.clone(),
        );
        let gzipped = serde_json::to_vec(&report)
            .map_err(std::io::Error::from)
            .and_then(|json| gzip(&json))
            .map_err(|e| Unsent::Failed(e.to_string()))?;
        let mut delivered = Vec::new();
        let mut problems = Vec::new();
        for uri in destinations {
            let sent = match uri.strip_prefix("mailto:") {
                Some(to) => {
                    let envelope = Envelope {
                        from: self.sender_address(),
                        to: to.to_string(),
                        now: unix_now(),
                    };
                    let message = report_mail(&report, &pending.domain, &gzipped, &envelope);
                    self.mail(&envelope, &message).await
                }
                None => self.post(&uri, &gzipped).await,
            };
            match sent {
                Ok(()) => delivered.push(uri),
                Err(why) => problems.push(format!("{uri}: {why}")),
            }
        }
        if delivered.is_empty() {
            Err(Unsent::Failed(problems.join("; ")))
        } else {
            Ok(delivered)
        }
    }

    /// The envelope sender of report mail: the contact when it is an
    /// address, else postmaster of the organization.
    fn sender_address(&self) -> String {
        let contact = self.contact.trim_start_matches("mailto:");
        if contact.contains('@') && !contact.contains(char::is_whitespace) {
            contact.to_string()
        } else {
            format!("postmaster@{}", self.organization)
        }
    }

    /// RFC 8460 5.3: the report as mail, through the relay's own route for
    /// the address's domain (an MX connector's DANE and MTA-STS included).
    async fn mail(&self, envelope: &Envelope, message: &[u8]) -> Result<(), String> {
        let out = &self.mail;
        let (_, domain) = envelope
            .to
            .rsplit_once('@')
            .ok_or_else(|| format!("'{}' is not an address", envelope.to))?;
        let domain = domain.to_ascii_lowercase();
        let connector = route(&domain, &out.routing.routes)
            .ok_or_else(|| format!("no outbound connector routes {domain}"))?;
        let per_domain = out.routing.connectors[connector].per_domain;
        let (mut sockets, mut policy_sessions) = (Vec::new(), Vec::new());
        let record = OutboundRecord {
            sockets: &mut sockets,
            policy_sessions: &mut policy_sessions,
        };
        let destination = per_domain.then_some(domain.as_str());
        let plan = &out.connectors[connector];
        let established = establish(0, plan, destination, &out.hostname, out.timeouts, record)
            .await
            .map_err(|reply| reply.to_string().trim_end().to_string())?;
        let mut hop = established.hop;
        let mut body = Vec::new();
        let mut stuffer = DotStuffer::new();
        stuffer.stuff(message, &mut body);
        body.extend(stuffer.finish());
        let steps: [(Vec<u8>, Wait, u16); 4] = [
            (
                format!("MAIL FROM:<{}>\r\n", envelope.from).into_bytes(),
                Wait::Command,
                250,
            ),
            (
                format!("RCPT TO:<{}>\r\n", envelope.to).into_bytes(),
                Wait::Command,
                250,
            ),
            (b"DATA\r\n".to_vec(), Wait::DataInit, 354),
            (body, Wait::DataEnd, 250),
        ];
        for (bytes, wait, want) in steps {
            hop.send(&bytes).await.map_err(|e| e.to_string())?;
            let reply = hop.reply(wait).await.map_err(|e| e.to_string())?;
            if reply.code / 100 != want / 100 || (want == 354 && reply.code != 354) {
                return Err(format!("next hop replied {}", reply.to_string().trim_end()));
            }
        }
        hop.quit().await;
        Ok(())
    }

    /// RFC 8460 5.4: POST with `application/tlsrpt+gzip`; any 2xx is taken.
    async fn post(&self, uri: &str, gzipped: &[u8]) -> Result<(), String> {
        let Some(("https", host, port, path)) = http_client::split_url(uri) else {
            return Err("not an https: or mailto: address".into());
        };
        let request = http_client::Request {
            host,
            port,
            path,
            method: "POST",
            headers: &[("Content-Type", "application/tlsrpt+gzip")],
            body: gzipped,
        };
        let response = http_client::request(
            http_client::Names::Relay(&self.resolver),
            http_client::Transport::Tls(&self.roots),
            &request,
            64 * 1024,
            POST_DEADLINE,
        )
        .await
        .map_err(|e| e.to_string())?;
        match response.status {
            200..=299 => Ok(()),
            status => Err(format!("HTTP status {status}")),
        }
    }
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    encoder.finish()
}
