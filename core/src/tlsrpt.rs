//! SMTP TLS Reporting (RFC 8460) free of I/O: what each delivery attempt
//! to a policy domain adds to that domain's report for the UTC day, the
//! report's JSON shape, and the `_smtp._tls` TXT record that says where
//! reports go.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The policy a session was held to (RFC 8460 4.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDescriptor {
    /// `tlsa`, `sts` or `no-policy-found`.
    #[serde(rename = "policy-type")]
    pub policy_type: String,
    /// The TLSA records, or the MTA-STS policy's lines.
    #[serde(
        rename = "policy-string",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub policy_string: Vec<String>,
    #[serde(rename = "policy-domain")]
    pub policy_domain: String,
    /// MTA-STS: the policy's MX patterns.
    #[serde(rename = "mx-host", default, skip_serializing_if = "Vec::is_empty")]
    pub mx_host: Vec<String>,
}

impl PolicyDescriptor {
    pub fn none(domain: &str) -> PolicyDescriptor {
        PolicyDescriptor {
            policy_type: "no-policy-found".into(),
            policy_string: Vec::new(),
            policy_domain: domain.into(),
            mx_host: Vec::new(),
        }
    }
}

/// One kind of failure and how often it happened (RFC 8460 4.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureDetail {
    #[serde(rename = "result-type")]
    pub result_type: String,
    #[serde(rename = "sending-mta-ip", skip_serializing_if = "Option::is_none")]
    pub sending_mta_ip: Option<IpAddr>,
    #[serde(
        rename = "receiving-mx-hostname",
        skip_serializing_if = "Option::is_none"
    )]
    pub receiving_mx_hostname: Option<String>,
    #[serde(rename = "receiving-ip", skip_serializing_if = "Option::is_none")]
    pub receiving_ip: Option<IpAddr>,
    #[serde(rename = "failed-session-count")]
    pub failed_session_count: u64,
    #[serde(
        rename = "additional-information",
        skip_serializing_if = "Option::is_none"
    )]
    pub additional_information: Option<String>,
    #[serde(
        rename = "failure-reason-code",
        skip_serializing_if = "Option::is_none"
    )]
    pub failure_reason_code: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(rename = "total-successful-session-count")]
    pub successful: u64,
    #[serde(rename = "total-failure-session-count")]
    pub failed: u64,
}

/// One policy's sessions in a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyResults {
    pub policy: PolicyDescriptor,
    pub summary: Summary,
    #[serde(rename = "failure-details", default)]
    pub failure_details: Vec<FailureDetail>,
}

/// What one session (one connection attempt, or a host ruled out before
/// connecting) came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionResult {
    Success,
    Failure {
        /// An RFC 8460 result type (`certificate-expired`, ...).
        result_type: &'static str,
        receiving_mx_hostname: Option<String>,
        receiving_ip: Option<IpAddr>,
        sending_mta_ip: Option<IpAddr>,
        /// The relay's own words, for `failure-reason-code`.
        reason: String,
    },
}

/// Every result type RFC 8460 4.3.2 defines.
pub const RESULT_TYPES: &[&str] = &[
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
];

/// A policy domain's results for one UTC day.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayResults {
    /// The policy domain, kept with its results where the file's name
    /// cannot hold it whole (a name near DNS's 253 octets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub policies: Vec<PolicyResults>,
}

impl DayResults {
    /// Counts one session against `policy`.
    pub fn record(&mut self, policy: &PolicyDescriptor, result: SessionResult) {
        let index = match self.policies.iter().position(|p| p.policy == *policy) {
            Some(i) => i,
            None => {
                self.policies.push(PolicyResults {
                    policy: policy.clone(),
                    summary: Summary::default(),
                    failure_details: Vec::new(),
                });
                self.policies.len() - 1
            }
        };
        let entry = &mut self.policies[index];
        let SessionResult::Failure {
            result_type,
            receiving_mx_hostname,
            receiving_ip,
            sending_mta_ip,
            reason,
        } = result
        else {
            entry.summary.successful += 1;
            return;
        };
        entry.summary.failed += 1;
        let reason = truncate(&reason, 200);
        let same = |d: &&mut FailureDetail| {
            d.result_type == result_type
                && d.receiving_mx_hostname == receiving_mx_hostname
                && d.receiving_ip == receiving_ip
                && d.failure_reason_code.as_deref() == Some(reason.as_str())
        };
        match entry.failure_details.iter_mut().find(same) {
            Some(detail) => detail.failed_session_count += 1,
            None => entry.failure_details.push(FailureDetail {
                result_type: result_type.into(),
                sending_mta_ip,
                receiving_mx_hostname,
                receiving_ip,
                failed_session_count: 1,
                additional_information: None,
                failure_reason_code: Some(reason),
            }),
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => text[..end].to_string(),
        None => text.to_string(),
    }
}

/// The date range of a report (RFC 8460 4.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DateRange {
    #[serde(rename = "start-datetime")]
    pub start: String,
    #[serde(rename = "end-datetime")]
    pub end: String,
}

/// A whole report (RFC 8460 4.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    #[serde(rename = "organization-name")]
    pub organization_name: String,
    #[serde(rename = "date-range")]
    pub date_range: DateRange,
    #[serde(rename = "contact-info")]
    pub contact_info: String,
    #[serde(rename = "report-id")]
    pub report_id: String,
    pub policies: Vec<PolicyResults>,
}

impl Report {
    /// The report for `day` (`2026-11-30`) of one policy domain's results.
    pub fn new(
        organization: &str,
        contact: &str,
        day: &str,
        domain: &str,
        results: DayResults,
    ) -> Report {
        Report {
            organization_name: organization.into(),
            date_range: DateRange {
                start: format!("{day}T00:00:00Z"),
                end: format!("{day}T23:59:59Z"),
            },
            contact_info: contact.into(),
            report_id: format!("{day}.{domain}@{organization}"),
            policies: results.policies,
        }
    }
}

/// Where a domain wants its reports: the `rua` URIs of its one
/// `v=TLSRPTv1` record (RFC 8460 3), `mailto:` and `https:` only.
pub fn rua(records: &[String]) -> Vec<String> {
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=TLSRPTv1;"))
        .collect();
    let [record] = ours[..] else {
        return Vec::new();
    };
    record
        .split(';')
        .filter_map(|field| field.trim().strip_prefix("rua="))
        .flat_map(|list| list.split(','))
        .map(|uri| uri.trim().to_string())
        .filter(|uri| uri.starts_with("mailto:") || uri.starts_with("https://"))
        .collect()
}

/// The result type of a TLS failure with an MX host (RFC 8460 4.3.2);
/// `dane`: the host was held to TLSA records.
pub fn result_type(failure: &crate::policy::TlsFailure, dane: bool) -> &'static str {
    use crate::policy::TlsFailure;
    match failure {
        TlsFailure::NotOffered(_) => "starttls-not-supported",
        TlsFailure::Untrusted(_) if dane => "tlsa-invalid",
        TlsFailure::NameMismatch(_) => "certificate-host-mismatch",
        TlsFailure::Untrusted(why) if why.to_ascii_lowercase().contains("expired") => {
            "certificate-expired"
        }
        TlsFailure::Untrusted(_) => "certificate-not-trusted",
        TlsFailure::HandshakeFailed(_) | TlsFailure::VersionTooLow(_) => "validation-failure",
    }
}

/// The UTC date (`2026-11-30`) of a Unix time.
pub fn utc_day(unix: i64) -> String {
    crate::ocsp::format_time(unix)[..10].to_string()
}

/// The report as mail (RFC 8460 5.3): `multipart/report;
/// report-type="tlsrpt"`, the subject and `TLS-Report-*` headers the RFC
/// names, a short text part, and the gzipped JSON as a base64
/// attachment named as 5.1 says (`submitter!domain!begin!end.json.gz`).
pub fn report_mail(report: &Report, domain: &str, gzipped: &[u8], envelope: &Envelope) -> Vec<u8> {
    let begin = day_start(&report.date_range.start[..10]).unwrap_or(0);
    let (from, to, now) = (&envelope.from, &envelope.to, envelope.now);
    let filename = format!(
        "{}!{domain}!{begin}!{}.json.gz",
        report.organization_name,
        begin + 86_399
    );
    let boundary = format!("tlsrpt-{}-{now}", report.report_id.len());
    let mut attachment = String::new();
    for line in base64(gzipped).as_bytes().chunks(76) {
        attachment.push_str(std::str::from_utf8(line).unwrap_or_default());
        attachment.push_str("\r\n");
    }
    format!(
        "From: <{from}>\r\n\
         To: <{to}>\r\n\
         Date: {date}\r\n\
         Subject: Report Domain: {domain} Submitter: {submitter} Report-ID: <{id}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {submitter}\r\n\
         Message-ID: <{id}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         SMTP TLS report (RFC 8460) for {domain} from {submitter}, {start} to {end}.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{filename}\"\r\n\
         \r\n\
         {attachment}\
         --{boundary}--\r\n",
        date = rfc5322_date(now),
        submitter = report.organization_name,
        id = report.report_id,
        start = report.date_range.start,
        end = report.date_range.end,
    )
    .into_bytes()
}

/// Who a report mail is from and to, and when it is written.
pub struct Envelope {
    pub from: String,
    pub to: String,
    /// Unix time, for the Date header.
    pub now: i64,
}

/// The Unix time a UTC day (`2026-11-30`) begins.
pub fn day_start(day: &str) -> Option<i64> {
    let mut parts = day.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (parts.next()??, parts.next()??, parts.next()??);
    Some(crate::ocsp::days_from_civil(y, m, d) * 86_400)
}

/// `Mon, 30 Nov 2026 12:00:00 +0000` (RFC 5322 3.3).
pub fn rfc5322_date(unix: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // `2026-11-30 12:00:00 UTC`
    let text = crate::ocsp::format_time(unix);
    let month: usize = text[5..7].parse().unwrap_or(1);
    format!(
        "{}, {} {} {} {} +0000",
        DAYS[unix.div_euclid(86_400).rem_euclid(7) as usize],
        &text[8..10],
        MONTHS[month.clamp(1, 12) - 1],
        &text[..4],
        &text[11..19]
    )
}

/// Standard base64 with padding (RFC 4648 4).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How long a report that no `rua` took is tried again: RFC 8460 5.3,
/// "a sender SHOULD attempt redelivery for up to 24 hours after the
/// initial attempt", with exponential backoff.
pub const RETRY_WINDOW: i64 = 24 * 3600;

/// The wait after the first failed attempt; it doubles with each failure
/// (1, 2, 4, 8 h: attempts at 0, 1, 3, 7 and 15 h, then the window ends).
pub const FIRST_RETRY: i64 = 3600;

/// A report's failed delivery attempts so far, and when to try it next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// Unix time of the first attempt that failed.
    pub first_failure: i64,
    pub failures: u32,
    /// Not tried again before this Unix time.
    pub next_attempt: i64,
}

impl Retry {
    /// After an attempt at `now` failed (`before`: the earlier failures,
    /// if any): the next attempt, or None once the window has passed and
    /// the report is given up.
    pub fn after_failure(before: Option<Retry>, now: i64) -> Option<Retry> {
        let (first_failure, failures) = match before {
            Some(r) => (r.first_failure, r.failures + 1),
            None => (now, 1),
        };
        let wait = FIRST_RETRY.saturating_mul(1 << (failures - 1).min(20));
        let next_attempt = now.saturating_add(wait);
        (next_attempt <= first_failure + RETRY_WINDOW).then_some(Retry {
            first_failure,
            failures,
            next_attempt,
        })
    }

    /// Whether the report may be tried at `now`.
    pub fn due(&self, now: i64) -> bool {
        now >= self.next_attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_aggregate_per_policy_and_failure_kind() {
        let mut day = DayResults::default();
        let sts = PolicyDescriptor {
            policy_type: "sts".into(),
            policy_string: vec!["version: STSv1".into(), "mode: enforce".into()],
            policy_domain: "example.net".into(),
            mx_host: vec!["mx.example.net".into()],
        };
        let expired = || SessionResult::Failure {
            result_type: "certificate-expired",
            receiving_mx_hostname: Some("mx.example.net".into()),
            receiving_ip: None,
            sending_mta_ip: None,
            reason: "certificate expired".into(),
        };
        day.record(&sts, SessionResult::Success);
        day.record(&sts, expired());
        day.record(&sts, expired());
        day.record(
            &PolicyDescriptor::none("example.net"),
            SessionResult::Success,
        );
        assert_eq!(day.policies.len(), 2);
        assert_eq!(
            day.policies[0].summary,
            Summary {
                successful: 1,
                failed: 2
            }
        );
        assert_eq!(day.policies[0].failure_details.len(), 1);
        assert_eq!(day.policies[0].failure_details[0].failed_session_count, 2);
    }

    #[test]
    fn reports_go_to_the_rua_of_the_one_tlsrpt_record() {
        let records = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            rua(&records(&[
                "v=TLSRPTv1; rua=mailto:tls@example.net,https://r.example.net/v1"
            ])),
            ["mailto:tls@example.net", "https://r.example.net/v1"]
        );
        assert!(rua(&records(&[
            "v=TLSRPTv1; rua=mailto:a@x",
            "v=TLSRPTv1; rua=mailto:b@x"
        ]))
        .is_empty());
        assert!(rua(&records(&["v=TLSRPTv1; rua=http://insecure.example"])).is_empty());
        assert_eq!(utc_day(86_400 * 365), "1971-01-01");
    }

    #[test]
    fn mail_pieces_follow_their_rfcs() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(
            rfc5322_date(1_796_040_157),
            "Mon, 30 Nov 2026 12:02:37 +0000"
        );
        assert_eq!(day_start("2026-11-30"), Some(1_796_040_157 - 43_357));
        let report = Report::new(
            "relay.example",
            "mailto:t@relay.example",
            "2026-11-30",
            "example.net",
            DayResults::default(),
        );
        let envelope = Envelope {
            from: "postmaster@relay.example".into(),
            to: "tlsrpt@example.net".into(),
            now: 1_796_040_157,
        };
        let mail =
            String::from_utf8(report_mail(&report, "example.net", b"gz", &envelope)).unwrap();
        assert!(mail.contains("Subject: Report Domain: example.net Submitter: relay.example Report-ID: <2026-11-30.example.net@relay.example>\r\n"), "{mail}");
        assert!(
            mail.contains("Content-Type: multipart/report; report-type=\"tlsrpt\""),
            "{mail}"
        );
        assert!(
            mail.contains("filename=\"relay.example!example.net!1795996800!1796083199.json.gz\""),
            "{mail}"
        );
        assert!(mail.contains("\r\n\r\nZ3o=\r\n--"), "{mail}");
    }

    /// Attempts an hourly sender makes for a report whose collector is
    /// down: backoff doubling from an hour, nothing past 24 hours.
    #[test]
    fn a_failed_report_is_retried_with_backoff_for_a_day() {
        let start = 1_800_000_000;
        let mut retry = None;
        let mut attempts = Vec::new();
        for hour in 0..48 {
            let now = start + hour * 3600;
            if retry.is_some_and(|r: Retry| !r.due(now)) {
                continue;
            }
            attempts.push(hour);
            match Retry::after_failure(retry, now) {
                Some(next) => retry = Some(next),
                None => break,
            }
        }
        assert_eq!(attempts, [0, 1, 3, 7, 15]);
        let last = retry.unwrap();
        assert_eq!((last.first_failure, last.failures), (start, 4));
        assert!(Retry::after_failure(retry, start + 15 * 3600).is_none());
    }
}
