//! What a certificate says (for partners: `tlsrelay cert info`) and whether
//! it will do (before a rotation: `tlsrelay cert check`): chain to a trusted
//! root, validity window, names, key strength, and the revocation and issuer
//! endpoints a validating peer will fetch — which `--reach` tries.

use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

/// Warn when a certificate expires sooner than this.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("certificate {index} of the chain does not parse: {reason}")]
    Parse { index: usize, reason: String },
}

/// The table partners ask for, for one certificate (the chain's first).
#[derive(Debug, Clone, Serialize)]
pub struct CertificateInfo {
    pub subject_cn: Option<String>,
    pub san: Vec<String>,
    pub organisation: Option<String>,
    pub organisational_unit: Option<String>,
    /// The issuer of the chain's last certificate: the root authority.
    pub root_issuer: String,
    pub issuer: String,
    pub key: String,
    /// Bits of the key (RSA modulus, EC curve size).
    pub key_bits: usize,
    pub not_before: String,
    pub not_after: String,
    pub not_after_unix: i64,
    pub sha256_fingerprint: String,
    pub public_key_sha256: String,
    pub crl_urls: Vec<String>,
    pub ocsp_urls: Vec<String>,
    pub ca_issuer_urls: Vec<String>,
    pub self_signed: bool,
}

impl CertificateInfo {
    /// Reads the chain's first certificate, and the root issuer from its last.
    pub fn of_chain(chain: &[CertificateDer<'_>]) -> Result<CertificateInfo, InspectError> {
        let parse = |index: usize| {
            X509Certificate::from_der(&chain[index])
                .map(|(_, c)| c)
                .map_err(|e| InspectError::Parse {
                    index,
                    reason: e.to_string(),
                })
        };
        let leaf = parse(0)?;
        let top = parse(chain.len() - 1)?;
        let subject = leaf.subject();
        let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
            it.next().and_then(|a| a.as_str().ok()).map(str::to_string)
        };
        let (key, key_bits) = key_strength(&leaf);
        let mut info = CertificateInfo {
            subject_cn: first(&mut subject.iter_common_name()),
            san: Vec::new(),
            organisation: first(&mut subject.iter_organization()),
            organisational_unit: first(&mut subject.iter_organizational_unit()),
            root_issuer: top.issuer().to_string(),
            issuer: leaf.issuer().to_string(),
            key,
            key_bits,
            not_before: leaf.validity().not_before.to_string(),
            not_after: leaf.validity().not_after.to_string(),
            not_after_unix: leaf.validity().not_after.timestamp(),
            sha256_fingerprint: colon_hex(&sha256(&chain[0])),
            public_key_sha256: colon_hex(&sha256(leaf.public_key().raw)),
            crl_urls: Vec::new(),
            ocsp_urls: Vec::new(),
            ca_issuer_urls: Vec::new(),
            self_signed: leaf.subject() == leaf.issuer(),
        };
        for ext in leaf.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => info.san.push(format!("DNS:{d}")),
                            GeneralName::IPAddress(ip) => {
                                info.san.push(format!("IP:{}", ip_text(ip)))
                            }
                            GeneralName::RFC822Name(m) => info.san.push(format!("email:{m}")),
                            GeneralName::URI(u) => info.san.push(format!("URI:{u}")),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::CRLDistributionPoints(cdp) => {
                    for point in cdp.iter() {
                        if let Some(DistributionPointName::FullName(names)) =
                            &point.distribution_point
                        {
                            info.crl_urls.extend(names.iter().filter_map(uri));
                        }
                    }
                }
                ParsedExtension::AuthorityInfoAccess(aia) => {
                    for access in &aia.accessdescs {
                        let Some(url) = uri(&access.access_location) else {
                            continue;
                        };
                        match access.access_method.to_id_string().as_str() {
                            "1.3.6.1.5.5.7.48.1" => info.ocsp_urls.push(url),
                            "1.3.6.1.5.5.7.48.2" => info.ca_issuer_urls.push(url),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(info)
    }

    /// Days until `not_after` (negative once expired).
    pub fn days_left(&self, now: UnixTime) -> i64 {
        (self.not_after_unix - now.as_secs() as i64).div_euclid(86_400)
    }

    /// Rows of the partner table: (field, value).
    pub fn rows(&self) -> Vec<(&'static str, String)> {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        vec![
            ("Root issuer", self.root_issuer.clone()),
            ("Issuer", self.issuer.clone()),
            ("Certificate name (CN)", or_none(&self.subject_cn)),
            ("Subject alternative names", list(&self.san)),
            ("Organisation", or_none(&self.organisation)),
            ("Organisation unit", or_none(&self.organisational_unit)),
            ("Key", self.key.clone()),
            ("Valid from", self.not_before.clone()),
            ("Valid until", self.not_after.clone()),
            ("SHA-256 fingerprint", self.sha256_fingerprint.clone()),
            ("Public key SHA-256", self.public_key_sha256.clone()),
            ("CRL distribution points", list(&self.crl_urls)),
            ("OCSP responders", list(&self.ocsp_urls)),
            ("CA issuers", list(&self.ca_issuer_urls)),
        ]
    }
}

fn uri(name: &GeneralName<'_>) -> Option<String> {
    match name {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    }
}

fn ip_text(raw: &[u8]) -> String {
    match raw.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(raw).expect("4 bytes")).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(raw).expect("16 bytes")).to_string(),
        _ => colon_hex(raw),
    }
}

/// "RSA 2048", "ECDSA P-256", "Ed25519"; and the size in bits.
fn key_strength(cert: &X509Certificate<'_>) -> (String, usize) {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let bits = rsa.key_size();
            (format!("RSA {bits}"), bits)
        }
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => ("ECDSA P-256".into(), 256),
                Some("1.3.132.0.34") => ("ECDSA P-384".into(), 384),
                Some("1.3.132.0.35") => ("ECDSA P-521".into(), 521),
                other => (format!("ECDSA {}", other.unwrap_or("unknown curve")), 0),
            }
        }
        _ => match spki.algorithm.algorithm.to_id_string().as_str() {
            "1.3.101.112" => ("Ed25519".into(), 256),
            "1.3.101.113" => ("Ed448".into(), 448),
            oid => (format!("unknown key type {oid}"), 0),
        },
    }
}

pub(crate) fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Error,
}

/// One result of `cert check`.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
}

impl Finding {
    fn new(level: Level, what: impl Into<String>) -> Finding {
        Finding {
            level,
            what: what.into(),
        }
    }
}

/// What `cert check` looks at for one chain.
pub struct CheckInput<'a> {
    pub chain: &'a [CertificateDer<'static>],
    pub roots: &'a rustls::RootCertStore,
    /// Names the certificate must cover, with who needs them.
    pub names: &'a [(String, String)],
    pub now: UnixTime,
}

/// Smallest acceptable keys: RSA 2048 bits, EC 256 bits.
pub const MIN_RSA_BITS: usize = 2048;
pub const MIN_EC_BITS: usize = 256;

/// Checks a chain: trusted path, validity window, names, key strength.
pub fn check(input: &CheckInput<'_>, info: &CertificateInfo) -> Vec<Finding> {
    let mut out = vec![validity(info, input.now), key_policy(info)];
    let leaf = match webpki::EndEntityCert::try_from(&input.chain[0]) {
        Ok(leaf) => leaf,
        Err(e) => {
            out.push(Finding::new(
                Level::Error,
                format!("certificate does not parse: {e}"),
            ));
            return out;
        }
    };
    out.push(trust_path(input, info, &leaf));
    for (name, who) in input.names {
        let covered = ServerName::try_from(name.as_str())
            .ok()
            .map(|n| leaf.verify_is_valid_for_subject_name(&n).is_ok());
        out.push(match covered {
            Some(true) => Finding::new(Level::Ok, format!("covers {name} ({who})")),
            Some(false) => Finding::new(Level::Error, format!("does not cover {name} ({who})")),
            None => Finding::new(Level::Error, format!("{name} ({who}) is not a valid name")),
        });
    }
    out
}

fn validity(info: &CertificateInfo, now: UnixTime) -> Finding {
    let days = info.days_left(now);
    let not_after = &info.not_after;
    if days < 0 {
        Finding::new(Level::Error, format!("expired on {not_after}"))
    } else if days < EXPIRY_WARNING_DAYS {
        Finding::new(
            Level::Warning,
            format!("expires in {days} days ({not_after}), under {EXPIRY_WARNING_DAYS}"),
        )
    } else {
        Finding::new(
            Level::Ok,
            format!("valid for {days} more days (until {not_after})"),
        )
    }
}

fn key_policy(info: &CertificateInfo) -> Finding {
    let weak = if info.key.starts_with("RSA") {
        info.key_bits < MIN_RSA_BITS
    } else if info.key.starts_with("ECDSA") {
        info.key_bits < MIN_EC_BITS
    } else {
        info.key_bits == 0
    };
    if weak {
        Finding::new(
            Level::Error,
            format!(
                "key {} is below policy (RSA {MIN_RSA_BITS}, EC {MIN_EC_BITS} bits)",
                info.key
            ),
        )
    } else {
        Finding::new(Level::Ok, format!("key {}", info.key))
    }
}

fn trust_path(
    input: &CheckInput<'_>,
    info: &CertificateInfo,
    leaf: &webpki::EndEntityCert<'_>,
) -> Finding {
    let algorithms = crate::tls::provider().signature_verification_algorithms.all;
    let path = leaf.verify_for_usage(
        algorithms,
        &input.roots.roots,
        &input.chain[1..],
        input.now,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    );
    match path {
        Ok(_) => Finding::new(
            Level::Ok,
            format!("chains to a trusted root ({})", info.root_issuer),
        ),
        // Expiry has its own finding.
        Err(webpki::Error::CertExpired { .. }) => Finding::new(
            Level::Error,
            "chain does not validate now: a certificate in it has expired",
        ),
        Err(e) => Finding::new(
            Level::Error,
            format!(
                "does not chain to a trusted root: {e:?} (issuer {})",
                info.issuer
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colon_hex_is_upper_case_pairs() {
        assert_eq!(colon_hex(&[0x0a, 0xff, 0x10]), "0A:FF:10");
    }
}
