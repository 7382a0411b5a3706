//! TLS-RPT (RFC 8460) on disk and on the wire: each delivery attempt's
//! result added to its policy domain's aggregate for the UTC day, kept in
//! `<state_dir>/tlsrpt/<day>/<domain>.json` (written through, so a crash
//! or restart loses nothing), and finished days sent, gzipped, to the
//! `rua` addresses the domain publishes at `_smtp._tls.<domain>`: by
//! HTTPS POST, or by mail through the relay's own outbound connectors.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::RootCertStore;

use crate::dns::DnsResolver;
use crate::http_client;
use crate::smtp::address::{is_hostname, route};
use crate::smtp::client::{establish, MailConnector, OutboundRecord};
use crate::smtp::forward::Routing;
use crate::smtp::next_hop::{DotStuffer, SmtpTimeouts, Wait};
use crate::tlsrpt::{
    report_mail, rua, utc_day, DayResults, Envelope, PolicyDescriptor, Report, SessionResult,
};
use crate::unix_now;

/// The day's results, as sessions add to them.
pub struct TlsReports {
    dir: Option<PathBuf>,
    days: Mutex<HashMap<(String, String), DayResults>>,
}

impl TlsReports {
    /// Results kept in `dir` (none: in memory only, as for `check`).
    pub fn new(dir: Option<PathBuf>) -> TlsReports {
        TlsReports {
            dir,
            days: Mutex::new(HashMap::new()),
        }
    }

    /// Adds one session's result to today's report for `domain`.
    pub fn record(&self, domain: &str, policy: &PolicyDescriptor, result: SessionResult) {
        let day = utc_day(unix_now());
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_hostname(&domain) {
            return; // it names a file: nothing but a host name may
        }
        let mut days = self.days.lock().unwrap();
        let key = (day.clone(), domain.clone());
        let results = days.entry(key).or_insert_with(|| {
            self.dir
                .as_ref()
                .and_then(|dir| load(&dir.join(&day).join(format!("{domain}.json"))))
                .unwrap_or_default()
        });
        results.record(policy, result);
        if let Some(dir) = &self.dir {
            if let Err(e) = store(&dir.join(&day), &domain, results) {
                tracing::warn!("TLS report for {domain} not kept in {}: {e}", dir.display());
            }
        }
    }
}

fn load(path: &Path) -> Option<DayResults> {
    serde_json::from_slice(&crate::state::read_file(path).ok()?).ok()
}

fn store(dir: &Path, domain: &str, results: &DayResults) -> std::io::Result<()> {
    crate::state::create_dir(dir)?;
    let json = serde_json::to_vec_pretty(results)?;
    crate::state::replace_file(&dir.join(format!("{domain}.json")), &json)
}

/// How long one report POST may take, connection to answer: a `rua` that
/// never answers must not hold up the reports after it.
const POST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// One day's results for one domain, waiting to be sent.
pub struct Pending {
    pub day: String,
    pub domain: String,
    pub results: DayResults,
    path: PathBuf,
}

/// Every report kept in `dir` (`<state_dir>/tlsrpt`), oldest first.
pub fn pending(dir: &Path) -> Vec<Pending> {
    let mut all = Vec::new();
    let Ok(days) = std::fs::read_dir(dir) else {
        return all;
    };
    for day in days.flatten() {
        let day_name = day.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(day.path()) else {
            continue;
        };
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let Some(domain) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(results) = load(&file.path()) {
                all.push(Pending {
                    day: day_name.clone(),
                    domain: domain.to_string(),
                    results,
                    path: file.path(),
                });
            }
        }
    }
    all.sort_by(|a, b| (&a.day, &a.domain).cmp(&(&b.day, &b.domain)));
    all
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
    pub outcome: Result<Vec<String>, String>,
}

impl ReportSender {
    /// Sends the reports of finished UTC days (and today's too with
    /// `include_today`), removing each once one `rua` took it. A domain
    /// that publishes no `rua` gets none, and its results are dropped.
    pub async fn send_due(&self, include_today: bool) -> Vec<Sent> {
        let today = utc_day(unix_now());
        let mut sent = Vec::new();
        for report in pending(&self.dir) {
            if report.day >= today && !include_today {
                continue;
            }
            let outcome = self.send(&report).await;
            let keep = match &outcome {
                Ok(_) => false,
                Err(why) => !why.starts_with("no rua"),
            };
            if !keep {
                let _ = std::fs::remove_file(&report.path);
            }
            sent.push(Sent {
                day: report.day,
                domain: report.domain,
                outcome,
            });
        }
        sent
    }

    async fn send(&self, pending: &Pending) -> Result<Vec<String>, String> {
        let txt = self
            .resolver
            .txt(&format!("_smtp._tls.{}", pending.domain))
            .await
            .map_err(|e| e.to_string())?;
        let destinations = rua(&txt.records);
        if destinations.is_empty() {
            return Err(format!("no rua published at _smtp._tls.{}", pending.domain));
        }
        let report = Report::new(
            &self.organization,
            &self.contact,
            &pending.day,
            &pending.domain,
            pending.results.clone(),
        );
        let gzipped = gzip(&serde_json::to_vec(&report).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
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
            Err(problems.join("; "))
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
        let Some(rest) = uri.strip_prefix("https://") else {
            return Err("not an https: or mailto: address".into());
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let request = http_client::Request {
            host,
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
