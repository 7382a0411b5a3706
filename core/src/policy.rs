//! The TLS policy model as pure decisions: what a listener does with a
//! client's first byte, what an upstream route does when TLS cannot be had,
//! how a peer certificate's names are matched. No I/O here, so every rule is
//! testable in memory.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a listener treats TLS from its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundMode {
    /// Plaintext only; a TLS ClientHello is relayed as opaque bytes.
    Off,
    /// TLS when the client starts it, plaintext otherwise (a downgrade).
    Opportunistic,
    /// TLS when the client starts it; plaintext is refused.
    Required,
    /// TLS from the first byte; anything else fails the handshake.
    Implicit,
}

/// How an upstream route secures the outbound leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundPolicy {
    /// Never try TLS.
    Plain,
    /// Try TLS; when the peer refuses it or the handshake fails, reconnect in
    /// plaintext and record the downgrade.
    Opportunistic,
    /// TLS or nothing.
    Required,
}

/// How much of the peer's certificate must check out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// Any certificate; the handshake's signatures are still checked.
    EncryptionOnly,
    /// The chain must lead to a trusted root.
    Certificate,
    /// The chain must lead to a trusted root and a name must match.
    Name,
}

/// A key exchange group a leg offers and accepts, in preference order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyExchange {
    /// Hybrid post-quantum (ML-KEM-768 with X25519): protects recorded
    /// traffic against a future quantum computer.
    X25519Mlkem768,
    X25519,
    Secp256r1,
    Secp384r1,
}
keywords!(KeyExchange, "key exchange group", {
    X25519Mlkem768 => "X25519MLKEM768",
    X25519 => "X25519",
    Secp256r1 => "secp256r1",
    Secp384r1 => "secp384r1",
});

impl KeyExchange {
    /// The default: the post-quantum hybrid first, then the classical ones.
    pub const PREFERRED: [KeyExchange; 4] = [
        KeyExchange::X25519Mlkem768,
        KeyExchange::X25519,
        KeyExchange::Secp256r1,
        KeyExchange::Secp384r1,
    ];
}

/// Lowest protocol version a leg accepts. Older than 1.2 is never offered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum MinVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

impl<'de> Deserialize<'de> for MinVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both `"1.3"` and `1.3`, the way operators write it.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(f64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(s) => s,
            Raw::Number(n) => format!("{n:.1}"),
        };
        match text.trim_start_matches("TLSv").trim_start_matches("tls") {
            "1.2" => Ok(MinVersion::Tls12),
            "1.3" => Ok(MinVersion::Tls13),
            other => Err(serde::de::Error::custom(format!(
                "unsupported minimum version '{other}', expected \"1.2\" or \"1.3\" (TLS 1.0 and 1.1 are never allowed)"
            ))),
        }
    }
}

impl fmt::Display for MinVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MinVersion::Tls12 => "TLSv1.2",
            MinVersion::Tls13 => "TLSv1.3",
        })
    }
}

keywords!(InboundMode, "mode", {
    Off => "off",
    Opportunistic => "opportunistic",
    Required => "required",
    Implicit => "implicit",
});
keywords!(OutboundPolicy, "policy", {
    Plain => "plain",
    Opportunistic => "opportunistic",
    Required => "required",
});
keywords!(Verification, "verification level", {
    EncryptionOnly => "encryption-only",
    Certificate => "certificate",
    Name => "name",
});

/// What the first bytes from a client mean under a listener's mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundStart {
    Tls,
    Plaintext { downgrade: bool },
    Refuse(String),
}

/// The first byte of a TLS record carrying a handshake message.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Decides how to treat a new client from its first byte (`None` when the
/// client sent nothing before closing or timing out).
pub fn inbound_start(mode: InboundMode, first_byte: Option<u8>) -> InboundStart {
    let starts_tls = first_byte == Some(TLS_HANDSHAKE_RECORD);
    match mode {
        InboundMode::Off => InboundStart::Plaintext { downgrade: false },
        InboundMode::Implicit => InboundStart::Tls,
        InboundMode::Opportunistic if starts_tls => InboundStart::Tls,
        InboundMode::Opportunistic => InboundStart::Plaintext { downgrade: true },
        InboundMode::Required if starts_tls => InboundStart::Tls,
        InboundMode::Required => InboundStart::Refuse(match first_byte {
            Some(_) => "plaintext refused: listener requires TLS".into(),
            None => "client sent nothing: listener requires TLS".into(),
        }),
    }
}

/// Why TLS could not be had on a leg. These are the reasons forced-TLS
/// failures are reported with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "kebab-case")]
pub enum TlsFailure {
    NotOffered(String),
    HandshakeFailed(String),
    Untrusted(String),
    NameMismatch(String),
    VersionTooLow(String),
}

impl TlsFailure {
    /// A short stable name, for counters and the 4.7.x texts later on.
    pub fn kind(&self) -> &'static str {
        match self {
            TlsFailure::NotOffered(_) => "not offered",
            TlsFailure::HandshakeFailed(_) => "handshake failed",
            TlsFailure::Untrusted(_) => "certificate untrusted",
            TlsFailure::NameMismatch(_) => "name mismatch",
            TlsFailure::VersionTooLow(_) => "version too low",
        }
    }

    fn detail(&self) -> &str {
        match self {
            TlsFailure::NotOffered(d)
            | TlsFailure::HandshakeFailed(d)
            | TlsFailure::Untrusted(d)
            | TlsFailure::NameMismatch(d)
            | TlsFailure::VersionTooLow(d) => d,
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TLS {}: {}", self.kind(), self.detail())
    }
}

/// What an upstream route does once TLS to its peer has failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTlsFailure {
    /// Reconnect without TLS and record the downgrade.
    FallBackToPlaintext,
    /// Give up on this route.
    Refuse,
}

pub fn on_outbound_failure(policy: OutboundPolicy) -> OnTlsFailure {
    match policy {
        OutboundPolicy::Opportunistic => OnTlsFailure::FallBackToPlaintext,
        OutboundPolicy::Plain | OutboundPolicy::Required => OnTlsFailure::Refuse,
    }
}

/// How far a peer's certificate was established, in the words Postfix uses
/// in its "… TLS connection established …" lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerTrust {
    /// No certificate (a client that presented none).
    Anonymous,
    /// A certificate whose chain did not verify, or was not checked.
    Untrusted,
    /// The chain leads to a trusted root; names were not (or did not) match.
    Trusted,
    /// Chain and name both verified.
    Verified,
}

impl fmt::Display for PeerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerTrust::Anonymous => "Anonymous",
            PeerTrust::Untrusted => "Untrusted",
            PeerTrust::Trusted => "Trusted",
            PeerTrust::Verified => "Verified",
        })
    }
}

/// A certificate name an operator expects: `mail.partner.example`, or
/// `*.partner.example` for exactly one label under the domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum NamePattern {
    Exact(String),
    Wildcard(String),
}

impl From<NamePattern> for String {
    fn from(p: NamePattern) -> String {
        p.to_string()
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(d) => write!(f, "*.{d}"),
        }
    }
}

impl std::str::FromStr for NamePattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wild, domain) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if domain.is_empty() || !domain.split('.').all(valid_label) {
            return Err(format!(
                "invalid certificate name pattern '{s}', expected a host name or *.domain"
            ));
        }
        Ok(if wild {
            NamePattern::Wildcard(domain.to_string())
        } else {
            NamePattern::Exact(domain.to_string())
        })
    }
}

impl<'de> Deserialize<'de> for NamePattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl NamePattern {
    /// Whether a name taken from a certificate (a DNS SAN, possibly itself a
    /// wildcard like `*.partner.example`) satisfies this pattern.
    pub fn matches(&self, cert_name: &str) -> bool {
        let cert_name = cert_name.trim_end_matches('.').to_ascii_lowercase();
        let one_label_under = |name: &str, domain: &str| {
            name.strip_suffix(domain)
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.'))
        };
        match (self, cert_name.strip_prefix("*.")) {
            (NamePattern::Exact(want), None) => *want == cert_name,
            (NamePattern::Exact(want), Some(cert_domain)) => one_label_under(want, cert_domain),
            (NamePattern::Wildcard(domain), None) => {
                one_label_under(&cert_name, domain) && !cert_name.starts_with('*')
            }
            (NamePattern::Wildcard(domain), Some(cert_domain)) => domain == cert_domain,
        }
    }

    /// Whether any of `cert_names` satisfies any of `patterns`.
    pub fn any_matches<'a>(
        patterns: &[NamePattern],
        cert_names: impl IntoIterator<Item = &'a str> + Clone,
    ) -> bool {
        patterns
            .iter()
            .any(|p| cert_names.clone().into_iter().any(|n| p.matches(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_modes_decide_on_first_byte() {
        use InboundMode::*;
        let tls = Some(TLS_HANDSHAKE_RECORD);
        let text = Some(b'E');
        assert_eq!(
            inbound_start(Off, tls),
            InboundStart::Plaintext { downgrade: false }
        );
        assert_eq!(inbound_start(Implicit, text), InboundStart::Tls);
        assert_eq!(inbound_start(Opportunistic, tls), InboundStart::Tls);
        assert_eq!(
            inbound_start(Opportunistic, text),
            InboundStart::Plaintext { downgrade: true }
        );
        assert_eq!(inbound_start(Required, tls), InboundStart::Tls);
        assert!(
            matches!(inbound_start(Required, text), InboundStart::Refuse(r) if r.contains("plaintext refused"))
        );
        assert!(
            matches!(inbound_start(Required, None), InboundStart::Refuse(r) if r.contains("sent nothing"))
        );
    }

    /// The sniffing is one byte: every value (and none) in every mode. TLS
    /// is started only by a handshake record's type byte (or implicitly);
    /// nothing else is ever taken for TLS, nor 0x16 for plaintext.
    #[test]
    fn every_first_byte_in_every_mode() {
        use InboundMode::*;
        let firsts = (0..=255u8).map(Some).chain([None]);
        for first in firsts {
            for mode in [Off, Opportunistic, Required, Implicit] {
                let tls = first == Some(0x16);
                let start = inbound_start(mode, first);
                let expected = match mode {
                    Off => InboundStart::Plaintext { downgrade: false },
                    Implicit => InboundStart::Tls,
                    _ if tls => InboundStart::Tls,
                    Opportunistic => InboundStart::Plaintext { downgrade: true },
                    Required => {
                        assert!(matches!(start, InboundStart::Refuse(_)), "{first:?}");
                        continue;
                    }
                };
                assert_eq!(start, expected, "{mode:?} {first:?}");
            }
        }
    }

    #[test]
    fn only_opportunistic_routes_fall_back() {
        assert_eq!(
            on_outbound_failure(OutboundPolicy::Opportunistic),
            OnTlsFailure::FallBackToPlaintext
        );
        assert_eq!(
            on_outbound_failure(OutboundPolicy::Required),
            OnTlsFailure::Refuse
        );
    }

    #[test]
    fn name_patterns_match_like_rfc6125() {
        let exact: NamePattern = "Mail.Partner.Example.".parse().unwrap();
        let wild: NamePattern = "*.partner.example".parse().unwrap();
        assert!(exact.matches("mail.partner.example"));
        assert!(exact.matches("*.partner.example"));
        assert!(!exact.matches("mx.partner.example"));
        assert!(!exact.matches("*.example"));
        assert!(wild.matches("mx.partner.example"));
        assert!(wild.matches("*.partner.example"));
        assert!(!wild.matches("partner.example"));
        assert!(!wild.matches("a.b.partner.example"));
        assert!(!wild.matches("evilpartner.example"));
        assert!(!exact.matches("mail.partner.example.evil"));
        assert!("*.".parse::<NamePattern>().is_err());
        assert!("bad name".parse::<NamePattern>().is_err());
        assert!("a.*.example".parse::<NamePattern>().is_err());
    }

    #[test]
    fn failures_name_their_kind() {
        let f = TlsFailure::NameMismatch("certificate names wrong.example".into());
        assert_eq!(
            f.to_string(),
            "TLS name mismatch: certificate names wrong.example"
        );
    }
}
