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
use crate::unix_now;
use tlsrelay_core::tlsrpt::{
    report_mail, rua, utc_day, DayResults, Envelope, PolicyDescriptor, Report, Retry, SessionResult,
};

/// Today's results, as sessions add to them. One per state directory in
/// the process: a reload's new plan shares the store its draining sessions
/// still write to, so no increment is lost between two copies of a file.
pub struct TlsReports {
    dir: Option<PathBuf>,
    /// Today's aggregates by domain, also on disk; earlier days are on disk
    /// only.
    days: Mutex<HashMap<(String, String), DayResults>>,
}

/// Domains held in memory at once; past it they are dropped and read back
/// from disk as sessions come (a bound on what a day's deliveries hold).
const MAX_DOMAINS_IN_MEMORY: usize = 10_000;

/// A file name holds 255 octets: a domain longer than this is named by a
/// prefix and a digest, and kept inside the file.
const MAX_NAME_IN_FILE_NAME: usize = 200;

impl TlsReports {
    /// Results kept in `dir` (none: in memory only, as for `check`): the
    /// store the process already has for `dir`, else a new one.
    pub fn shared(dir: Option<PathBuf>) -> Arc<TlsReports> {
        type Stores = Mutex<HashMap<PathBuf, std::sync::Weak<TlsReports>>>;
        static STORES: std::sync::OnceLock<Stores> = std::sync::OnceLock::new();
        let new = |dir| {
            Arc::new(TlsReports {
                dir,
                days: Mutex::new(HashMap::new()),
            })
        };
        let Some(path) = dir else {
            return new(None);
        };
        let mut stores = STORES.get_or_init(Default::default).lock().unwrap();
        stores.retain(|_, store| store.strong_count() > 0);
        if let Some(store) = stores.get(&path).and_then(|s| s.upgrade()) {
            return store;
        }
        let store = new(Some(path.clone()));
        stores.insert(path, Arc::downgrade(&store));
        store
    }

    /// Adds one session's result to today's report for `domain`.
    pub fn record(&self, domain: &str, policy: &PolicyDescriptor, result: SessionResult) {
        let day = utc_day(unix_now());
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_hostname(&domain) {
            return; // it names a file: nothing but a host name may
        }
        let mut days = self.days.lock().unwrap();
        // A new day: the ones before it are on disk, to be sent.
        if days.keys().next().is_some_and(|(d, _)| *d != day) {
            days.retain(|(d, _), _| *d == day);
        }
        if days.len() >= MAX_DOMAINS_IN_MEMORY {
            days.clear();
        }
        let key = (day.clone(), domain.clone());
        let results = days.entry(key).or_insert_with(|| {
            self.dir
                .as_ref()
                .and_then(|dir| load(&dir.join(&day).join(file_name(&domain))))
                .unwrap_or_default()
        });
        results.record(policy, result);
        if let Some(dir) = &self.dir {
            let written = crate::state::blocking(|| store(&dir.join(&day), &domain, results));
            if let Err(e) = written {
                tracing::warn!("TLS report for {domain} not kept in {}: {e}", dir.display());
            }
        }
    }
}

/// `<domain>.json`, or for a long domain `<prefix>~<digest>.json`.
fn file_name(domain: &str) -> String {
    if domain.len() <= MAX_NAME_IN_FILE_NAME {
        return format!("{domain}.json");
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, domain.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}~{hex}.json", &domain[..MAX_NAME_IN_FILE_NAME])
}

fn load(path: &Path) -> Option<DayResults> {
    serde_json::from_slice(&crate::state::read_file(path).ok()?).ok()
}

fn store(dir: &Path, domain: &str, results: &DayResults) -> std::io::Result<()> {
    crate::state::create_dir(dir)?;
    let name = file_name(domain);
    let json = if name == format!("{domain}.json") {
        serde_json::to_vec_pretty(results)?
    } else {
        let mut named = results.clone();
        named.domain = Some(domain.to_string());
        serde_json::to_vec_pretty(&named)?
    };
    crate::state::replace_file(&dir.join(name), &json)
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
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(mut results) = load(&file.path()) {
                let domain = results.domain.take().unwrap_or_else(|| stem.to_string());
                all.push(Pending {
                    day: day_name.clone(),
                    domain,
                    results,
                    path: file.path(),
                });
            }
        }
    }
    all.sort_by(|a, b| (&a.day, &a.domain).cmp(&(&b.day, &b.domain)));
    all
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn success(store: &TlsReports, domain: &str) {
        store.record(
            domain,
            &PolicyDescriptor::none(domain),
            SessionResult::Success,
        );
    }

    #[test]
    fn one_store_per_directory_while_a_plan_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = TlsReports::shared(Some(dir.path().to_path_buf()));
        let second = TlsReports::shared(Some(dir.path().to_path_buf()));
        assert!(Arc::ptr_eq(&first, &second));
        let other = tempfile::tempdir().unwrap();
        assert!(!Arc::ptr_eq(
            &first,
            &TlsReports::shared(Some(other.path().to_path_buf()))
        ));
        // Increments from both plans land in one aggregate.
        success(&first, "a.example");
        success(&second, "a.example");
        let pending = pending(dir.path());
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].results.policies[0].summary.successful, 2);
    }

    #[test]
    fn a_domain_too_long_for_a_file_name_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = TlsReports::shared(Some(dir.path().to_path_buf()));
        // 253 octets: labels of 62, 62, 62 and 60, and "com".
        let label = "a".repeat(62);
        let domain = format!("{label}.{label}.{label}.{}.com", "a".repeat(60));
        assert_eq!(domain.len(), 253);
        success(&store, &domain);
        let pending = pending(dir.path());
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].domain, domain);
        assert!(pending[0].results.domain.is_none());
    }

    #[test]
    fn memory_holds_a_bounded_number_of_domains() {
        let store = TlsReports::shared(None);
        for i in 0..=MAX_DOMAINS_IN_MEMORY {
            success(&store, &format!("d{i}.example"));
        }
        assert!(store.days.lock().unwrap().len() <= MAX_DOMAINS_IN_MEMORY);
    }
}
