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
}
