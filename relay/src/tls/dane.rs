//! Authenticating an MX host by its TLSA records (RFC 7672 3): DANE-EE(3)
//! matches the server's own certificate or key, names and dates aside;
//! DANE-TA(2) matches a certificate of the chain it sent, which then
//! anchors the chain, and the server's certificate must name the MX host
//! or the recipient domain.

use std::borrow::Cow;
use std::sync::Arc;

use aws_lc_rs::digest;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::signature_algorithms;
use tlsrelay_core::dane::{Tlsa, DANE_EE, DANE_TA};

/// What an MX host's certificate chain must match.
#[derive(Clone, Debug)]
pub struct DaneCheck {
    /// Usable, DNSSEC-proven records.
    pub tlsa: Vec<Tlsa>,
    /// Names a DANE-TA chain's server certificate may carry: the MX host
    /// and the recipient domain.
    pub names: Vec<String>,
}

/// Why no record matched.
#[derive(Debug, thiserror::Error)]
#[error("no DANE TLSA record matched the certificate chain ({tried})")]
pub struct DaneMismatch {
    tried: String,
}

impl DaneCheck {
    /// The first record the chain satisfies.
    pub fn matched(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<&Tlsa, DaneMismatch> {
        let found = self.tlsa.iter().find(|tlsa| match tlsa.usage {
            DANE_EE => matches(tlsa, end_entity),
            DANE_TA => intermediates.iter().enumerate().any(|(i, ta)| {
                matches(tlsa, ta) && self.anchors(end_entity, &intermediates[..i], ta, now)
            }),
            _ => false,
        });
        found.ok_or_else(|| DaneMismatch {
            tried: self
                .tlsa
                .iter()
                .map(|t| format!("TLSA {t}"))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// The server certificate chains to `anchor` through `between`, is
    /// valid now, and names one of the reference identifiers.
    fn anchors(
        &self,
        end_entity: &CertificateDer<'_>,
        between: &[CertificateDer<'_>],
        anchor: &CertificateDer<'_>,
        now: UnixTime,
    ) -> bool {
        let (Ok(anchor), Ok(ee)) = (
            webpki::anchor_from_trusted_cert(anchor),
            webpki::EndEntityCert::try_from(end_entity),
        ) else {
            return false;
        };
        let chained = ee
            .verify_for_usage(
                signature_algorithms().all,
                &[anchor],
                between,
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .is_ok();
        chained
            && self.names.iter().any(|name| {
                ServerName::try_from(name.as_str())
                    .is_ok_and(|name| ee.verify_is_valid_for_subject_name(&name).is_ok())
            })
    }
}

/// Whether `cert`'s selected part, digested as the record says, is the
/// record's data.
fn matches(tlsa: &Tlsa, cert: &CertificateDer<'_>) -> bool {
    let Some(selected) = selected(cert, tlsa.selector) else {
        return false;
    };
    match tlsa.matching {
        0 => *selected == tlsa.data[..],
        1 => digest::digest(&digest::SHA256, &selected).as_ref() == tlsa.data,
        2 => digest::digest(&digest::SHA512, &selected).as_ref() == tlsa.data,
        _ => false,
    }
}

/// Selector 0: the whole certificate; 1: its SubjectPublicKeyInfo.
fn selected<'a>(cert: &'a CertificateDer<'_>, selector: u8) -> Option<Cow<'a, [u8]>> {
    match selector {
        0 => Some(Cow::Borrowed(cert.as_ref())),
        1 => {
            let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
            Some(Cow::Owned(parsed.tbs_certificate.subject_pki.raw.to_vec()))
        }
        _ => None,
    }
}

/// The error rustls reports for a chain DANE does not vouch for.
pub fn mismatch_error(mismatch: DaneMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(mismatch),
    )))
}
