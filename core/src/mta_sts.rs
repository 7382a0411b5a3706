//! MTA-STS (RFC 8461) free of I/O: the `_mta-sts` TXT record, the policy
//! file, which MX hosts a policy allows, and the HTTP response the policy
//! arrives in.

use std::fmt;

/// A policy's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Deliver only over TLS with a valid certificate to a listed MX host.
    Enforce,
    /// Report failures, deliver anyway.
    Testing,
    /// No policy (a domain withdrawing one).
    None,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// Allowed MX hosts: exact names or `*.parent` (one label).
    pub mx: Vec<String>,
    /// Seconds the policy may be cached.
    pub max_age: u64,
}

/// RFC 8461 3.2: at most a year.
pub const MAX_AGE_LIMIT: u64 = 31_557_600;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// The policy id from the domain's TXT records: exactly one record that
/// begins `v=STSv1;`, with an `id` of 1 to 32 letters and digits
/// (RFC 8461 3.1). `None`: the domain has no (usable) policy record.
pub fn txt_policy_id(records: &[String]) -> Option<String> {
    let ours: Vec<&String> = records
        .iter()
        .filter(|r| r.starts_with("v=STSv1;"))
        .collect();
    let [record] = ours[..] else {
        return None;
    };
    let mut id = None;
    for field in record.split(';').skip(1) {
        let field = field.trim();
        if field.is_empty() {
            continue;
        }
        let (key, value) = field.split_once('=')?;
        if key == "id" {
            let valid =
                (1..=32).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_alphanumeric());
            if !valid || id.is_some() {
                return None;
            }
            id = Some(value.to_string());
        }
    }
    id
}

/// Parses a policy file (RFC 8461 3.2): `key: value` lines, `version:
/// STSv1`, a mode, `max_age`, and `mx` lines (required unless mode is
/// none). Unknown keys are ignored.
pub fn parse_policy(text: &str) -> Result<Policy, PolicyError> {
    let bad = |why: String| Err(PolicyError(why));
    let (mut version, mut mode, mut max_age, mut mx) = (None, None, None, Vec::new());
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return bad(format!("line '{line}' is not 'key: value'"));
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_string()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return bad(format!("unknown mode '{other}'")),
                })
            }
            "max_age" => match value.parse::<u64>() {
                Ok(age) if age <= MAX_AGE_LIMIT => max_age = Some(age),
                _ => return bad(format!("invalid max_age '{value}'")),
            },
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return bad("no 'version: STSv1'".into());
    }
    let Some(mode) = mode else {
        return bad("no mode".into());
    };
    let Some(max_age) = max_age else {
        return bad("no max_age".into());
    };
    if mx.is_empty() && mode != Mode::None {
        return bad("no mx".into());
    }
    Ok(Policy { mode, mx, max_age })
}

impl Policy {
    /// Whether `host` is one of the policy's MX patterns (RFC 8461 4.1:
    /// a wildcard stands for exactly one leftmost label).
    pub fn allows_mx(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }
}

/// A complete HTTP/1.1 response (the connection was closed after it).
#[derive(Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Parses a whole response read to the end of the connection: status
/// line, headers, and the body by Content-Length, chunked encoding, or
/// to the end.
pub fn parse_http_response(bytes: &[u8]) -> Result<HttpResponse, PolicyError> {
    let bad = |why: &str| PolicyError(format!("malformed HTTP response: {why}"));
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(bad("no status line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("not HTTP/1.x"));
    }
    let status: u16 = code.parse().map_err(|_| bad("status code"))?;
    let (mut content_type, mut length, mut chunked) = (None, None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("header line without ':'"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.to_ascii_lowercase()),
            "content-length" => length = Some(value.parse::<usize>().map_err(|_| bad("length"))?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    let rest = &bytes[end + 4..];
    let body = match (chunked, length) {
        (true, _) => dechunk(rest).ok_or_else(|| bad("chunked body"))?,
        (false, Some(n)) if rest.len() >= n => rest[..n].to_vec(),
        (false, Some(_)) => return Err(bad("body shorter than Content-Length")),
        (false, None) => rest.to_vec(),
    };
    Ok(HttpResponse {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_txt_record_names_one_policy_id() {
        let id = |records: &[&str]| {
            txt_policy_id(&records.iter().map(|r| r.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(
            id(&["v=STSv1; id=20160831085700Z;"]),
            Some("20160831085700Z".into())
        );
        assert_eq!(id(&["v=spf1 -all", "v=STSv1;id=abc"]), Some("abc".into()));
        assert_eq!(
            id(&["v=STSv1; id=a;", "v=STSv1; id=b;"]),
            None,
            "two policies"
        );
        assert_eq!(id(&["v=STSv1; id=has-dash;"]), None);
        assert_eq!(id(&["v=STSv1; id=;"]), None);
        assert_eq!(id(&["v=STSv2; id=abc;"]), None);
        assert_eq!(id(&[]), None);
    }

    #[test]
    fn a_policy_needs_version_mode_max_age_and_mx() {
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\nfuture: ignored\r\n";
        let policy = parse_policy(text).unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 604_800);
        assert!(policy.allows_mx("mail.example.com"));
        assert!(policy.allows_mx("MX1.Example.NET."));
        assert!(
            !policy.allows_mx("example.net"),
            "the wildcard needs a label"
        );
        assert!(!policy.allows_mx("a.b.example.net"), "and only one");
        assert!(!policy.allows_mx("mail.example.org"));
        for broken in [
            "mode: enforce\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\n",
            "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n",
            "version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999\n",
            "<html>not a policy</html>",
        ] {
            assert!(parse_policy(broken).is_err(), "{broken}");
        }
        assert_eq!(
            parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
                .unwrap()
                .mode,
            Mode::None
        );
    }

    #[test]
    fn http_bodies_by_length_chunks_or_to_the_end() {
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(r.content_type.as_deref(), Some("text/plain; charset=utf-8"));
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, b"hello");
        let r = parse_http_response(b"HTTP/1.0 404 Not Found\r\n\r\ngone").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"gone"[..]));
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_http_response(b"SSH-2.0-OpenSSH\r\n").is_err());
    }
}
