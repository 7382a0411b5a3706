//! Value types for who and where: client address ranges and mail domain
//! patterns. They import nothing of the runtime, so the config, the
//! admission rules and the router can all use them.

use std::net::IpAddr;

/// An address range (`192.0.2.0/24`, `2001:db8::/32`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid address range '{s}', expected e.g. 192.0.2.0/24");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (
                ip.parse::<IpAddr>().map_err(|_| bad())?,
                Some(p.parse::<u8>().map_err(|_| bad())?),
            ),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr {
            network: ip,
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// `0.0.0.0/0` or `::/0`: every address.
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }
}

/// A mail domain pattern: an exact domain, its subdomains (`.example.org`),
/// or every domain (`*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainPattern {
    Exact(String),
    Subdomains(String),
    Any,
}

impl std::str::FromStr for DomainPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<DomainPattern, String> {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        if s == "*" {
            return Ok(DomainPattern::Any);
        }
        let (sub, name) = match s.strip_prefix('.') {
            Some(rest) => (true, rest.to_string()),
            None => (false, s.clone()),
        };
        if name.is_empty()
            || name.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            return Err(format!(
                "invalid domain '{s}', expected example.org, .example.org (subdomains) or *"
            ));
        }
        Ok(if sub {
            DomainPattern::Subdomains(name)
        } else {
            DomainPattern::Exact(name)
        })
    }
}

impl std::fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Subdomains(d) => write!(f, ".{d}"),
            DomainPattern::Any => f.write_str("*"),
        }
    }
}

impl DomainPattern {
    /// How specific a match of `domain` is (higher wins), or `None`.
    /// `domain` is lower case without a trailing dot.
    fn rank(&self, domain: &str) -> Option<usize> {
        match self {
            DomainPattern::Exact(d) if d == domain => Some(usize::MAX),
            DomainPattern::Subdomains(d)
                if domain.len() > d.len()
                    && domain.ends_with(d.as_str())
                    && domain.as_bytes()[domain.len() - d.len() - 1] == b'.' =>
            {
                Some(d.len() + 1)
            }
            DomainPattern::Any => Some(0),
            _ => None,
        }
    }

    pub fn matches(&self, domain: &str) -> bool {
        self.rank(&normalise(domain)).is_some()
    }

    /// Whether any of `patterns` matches `domain`.
    pub fn any_matches(patterns: &[DomainPattern], domain: &str) -> bool {
        let domain = normalise(domain);
        patterns.iter().any(|p| p.rank(&domain).is_some())
    }
}

fn normalise(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

/// The connector (index) for `domain`: an exact domain, then the longest
/// `.parent` match, then `*`.
pub fn route(domain: &str, connectors: &[(Vec<DomainPattern>, usize)]) -> Option<usize> {
    let domain = normalise(domain);
    let mut best: Option<(usize, usize)> = None; // (rank, connector)
    for (patterns, idx) in connectors {
        for rank in patterns.iter().filter_map(|p| p.rank(&domain)) {
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, *idx));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// Whether `name` is a host name DNS can be asked about: labels of
/// letters, digits and hyphens (1 to 63 octets, no hyphen at either end),
/// 253 octets at most. A recipient domain delivered by MX must be one; it
/// also names files (MTA-STS cache, TLS reports), so nothing else may pass.
pub fn is_hostname(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_names_are_letters_digits_and_hyphens_in_labels() {
        for good in [
            "example.org",
            "mx-1.example.org.",
            "a",
            "xn--bcher-kva.example",
        ] {
            assert!(super::is_hostname(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "a..b",
            "-a.example",
            "a-.example",
            "../etc",
            "a/b",
            "[192.0.2.1]",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!super::is_hostname(bad), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn cidr_ranges() {
        let net: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(net.contains("192.0.2.77".parse().unwrap()));
        assert!(!net.contains("192.0.3.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:192.0.2.1".parse().unwrap()),
            "v4-mapped v6 matches"
        );
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("127.0.0.1"
            .parse::<Cidr>()
            .unwrap()
            .contains("127.0.0.1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().is_everything());
        assert!(!"10.0.0.0/8".parse::<Cidr>().unwrap().is_everything());
    }

    #[test]
    fn routing_prefers_exact_then_longest_parent_then_default() {
        let p = |s: &str| s.parse::<DomainPattern>().unwrap();
        let routes = vec![
            (vec![p("*")], 0),
            (vec![p(".partner.example")], 1),
            (vec![p("partner.example"), p("mx.partner.example")], 2),
            (vec![p(".eu.partner.example")], 3),
        ];
        assert_eq!(route("partner.example", &routes), Some(2));
        assert_eq!(route("a.partner.example", &routes), Some(1));
        assert_eq!(route("mx.partner.example", &routes), Some(2));
        assert_eq!(route("x.eu.partner.example", &routes), Some(3));
        assert_eq!(route("Elsewhere.Example.", &routes), Some(0));
        assert_eq!(route("elsewhere.example", &routes[1..]), None);
        assert!("bad domain".parse::<DomainPattern>().is_err());
    }

    #[test]
    fn subdomain_patterns_need_a_label_boundary() {
        let sub: DomainPattern = ".example.org".parse().unwrap();
        assert!(sub.matches("mail.example.org"));
        assert!(sub.matches("A.B.Example.Org."));
        assert!(
            !sub.matches("example.org"),
            "the parent itself is not a subdomain"
        );
        assert!(!sub.matches("evilexample.org"));
        let exact: DomainPattern = "example.org".parse().unwrap();
        assert!(exact.matches("EXAMPLE.ORG"));
        assert!(!exact.matches("mail.example.org"));
    }
}
