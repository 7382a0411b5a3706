//! The upstream side: verification levels (encryption only, chain, chain and
//! name), enforced under a required policy and only assessed under an
//! opportunistic one, so the report always says how far the peer was trusted.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, ResolvesClientCert};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::RecordIo;
use tlsrelay_sys::ktls::SecretCapture;

use super::dane::{mismatch_error, DaneCheck};
use super::{cert_names, provider_with, signature_algorithms, versions, TlsError};
use tlsrelay_core::policy::{KeyExchange, MinVersion, NamePattern, PeerTrust, Verification};

/// What an upstream's TLS is built from (files already loaded).
#[derive(Clone)]
pub struct UpstreamTlsSettings {
    pub verification: Verification,
    /// Fail the handshake when verification fails (required policy);
    /// otherwise only record how far the peer was trusted.
    pub enforce: bool,
    /// Accepted names under `Verification::Name`.
    pub names: Vec<NamePattern>,
    /// Trust anchors; `None` only when nothing needs them.
    pub roots: Option<Arc<RootCertStore>>,
    pub min_version: MinVersion,
    /// Key exchange groups offered, the first with a key share.
    pub groups: Vec<KeyExchange>,
    pub server_name: ServerName<'static>,
    pub client_certificate: Option<Arc<CertifiedKey>>,
    /// Revocation lists the chain is checked against (none: no checking).
    pub crls: Arc<Vec<webpki::CertRevocationList<'static>>>,
    /// Where `roots` came from (a file, or `system`), for descriptions.
    pub anchors_from: String,
    /// Authenticate by TLSA records instead (an MX host under DANE).
    pub dane: Option<DaneCheck>,
}

impl UpstreamTlsSettings {
    /// These settings for one MX host: its name as SNI and as the name
    /// verified (unless names were configured), or DANE when it has TLSA.
    pub fn for_mx_host(&self, host: &str, dane: Option<DaneCheck>) -> Result<Self, String> {
        let mut settings = self.clone();
        settings.server_name =
            ServerName::try_from(host.to_string()).map_err(|e| format!("MX host '{host}': {e}"))?;
        if settings.names.is_empty() {
            settings.names = vec![NamePattern::Exact(host.to_ascii_lowercase())];
        }
        if dane.is_some() {
            settings.enforce = true;
        }
        settings.dane = dane;
        Ok(settings)
    }

    /// What these settings check, as `check` and the banner print it.
    fn describe(&self) -> String {
        let mut s = format!(", verify {}", self.verification);
        if self.verification == Verification::Name {
            let names: Vec<String> = self.names.iter().map(ToString::to_string).collect();
            s += &format!(" [{}]", names.join(" | "));
        }
        s += &format!(
            ", minimum {}, trust anchors {}",
            self.min_version, self.anchors_from
        );
        if !self.crls.is_empty() {
            s += &format!(
                ", revocation checked against {} CRL file(s)",
                self.crls.len()
            );
        }
        if self.client_certificate.is_some() {
            s += ", presents a client certificate";
        }
        s
    }
}

/// An upstream route's ready-to-use client configuration.
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    check: Arc<PeerCheck>,
    server_name: ServerName<'static>,
    description: String,
}

impl UpstreamTls {
    pub fn new(settings: UpstreamTlsSettings) -> Result<UpstreamTls, TlsError> {
        let description = settings.describe();
        let check = Arc::new(PeerCheck {
            verification: settings.verification,
            enforce: settings.enforce,
            names: settings.names,
            roots: settings.roots,
            crls: settings.crls,
            dane: settings.dane,
        });
        let builder =
            ClientConfig::builder_with_provider(Arc::new(provider_with(&settings.groups)))
                .with_protocol_versions(versions(settings.min_version))
                .map_err(|e| TlsError::Rustls(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(check.clone());
        let mut config = match settings.client_certificate {
            Some(ck) => builder.with_client_cert_resolver(Arc::new(PresentCertificate(ck))),
            None => builder.with_no_client_auth(),
        };
        // Lets the data plane hand the session keys to kernel TLS.
        config.enable_secret_extraction = true;
        Ok(UpstreamTls {
            config: Arc::new(config),
            check,
            server_name: settings.server_name,
            description,
        })
    }

    /// What this TLS verifies and offers, as built (`, verify name [..],
    /// minimum 1.2, trust anchors ...`).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Starts the client side of a handshake on `tcp`; secrets kept for
    /// KeyUpdates as in [`super::ListenerTls::accept`].
    pub fn connect(&self, tcp: TcpStream) -> tokio_rustls::Connect<RecordIo> {
        let name = self.server_name.clone();
        let capture = Arc::new(SecretCapture::default());
        let mut config = (*self.config).clone();
        config.key_log = capture.clone();
        TlsConnector::from(Arc::new(config)).connect(name, RecordIo::capturing(tcp, capture))
    }

    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// The TLSA record that authenticated the peer, when DANE did.
    pub fn dane_matched(&self, peer_certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
        let dane = self.check.dane.as_ref()?;
        let [end_entity, intermediates @ ..] = peer_certs? else {
            return None;
        };
        let tlsa = dane
            .matched(end_entity, intermediates, UnixTime::now())
            .ok()?;
        Some(format!("DANE TLSA {tlsa} matched"))
    }

    /// How far the upstream's certificate was established, whatever the
    /// level enforced.
    pub fn peer_trust(&self, peer_certs: Option<&[CertificateDer<'_>]>) -> PeerTrust {
        match peer_certs {
            Some([end_entity, intermediates @ ..]) => {
                self.check
                    .evaluate(end_entity, intermediates, UnixTime::now())
                    .0
            }
            _ => PeerTrust::Anonymous,
        }
    }
}

#[derive(Debug)]
struct PeerCheck {
    verification: Verification,
    enforce: bool,
    names: Vec<NamePattern>,
    roots: Option<Arc<RootCertStore>>,
    crls: Arc<Vec<webpki::CertRevocationList<'static>>>,
    dane: Option<DaneCheck>,
}

impl PeerCheck {
    /// The chain to the roots, with every certificate in it checked against
    /// the CRLs (a certificate no CRL covers passes).
    fn chain_with_revocation(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        roots: &RootCertStore,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        use rustls::CertificateError as E;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(E::Other(rustls::OtherError(Arc::new(e))))
        })?;
        let crls: Vec<&webpki::CertRevocationList<'_>> = self.crls.iter().collect();
        let revocation = webpki::RevocationOptionsBuilder::new(&crls)
            .expect("at least one CRL")
            .with_depth(webpki::RevocationCheckDepth::Chain)
            .with_status_policy(webpki::UnknownStatusPolicy::Allow)
            .build();
        ee.verify_for_usage(
            signature_algorithms().all,
            &roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(revocation),
            None,
        )
        .map(|_| ())
        .map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                webpki::Error::CertRevoked => E::Revoked,
                webpki::Error::UnknownIssuer => E::UnknownIssuer,
                webpki::Error::CertExpired { .. } => E::Expired,
                other => E::Other(rustls::OtherError(Arc::new(other))),
            })
        })
    }

    /// The trust reached, and the error the configured level makes of it.
    fn evaluate(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> (PeerTrust, Option<rustls::Error>) {
        if let Some(dane) = &self.dane {
            return match dane.matched(end_entity, intermediates, now) {
                Ok(_) => (PeerTrust::Verified, None),
                Err(mismatch) => (PeerTrust::Untrusted, Some(mismatch_error(mismatch))),
            };
        }
        let chain = match (ParsedCertificate::try_from(end_entity), &self.roots) {
            (Err(e), _) => Err(e),
            (Ok(_), None) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            )),
            (Ok(_), Some(roots)) if !self.crls.is_empty() => {
                self.chain_with_revocation(end_entity, intermediates, roots, now)
            }
            (Ok(parsed), Some(roots)) => verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                signature_algorithms().all,
            ),
        };
        let presented = cert_names(end_entity);
        let name_ok = NamePattern::any_matches(&self.names, presented.iter().map(String::as_str));
        let trust = match (&chain, name_ok) {
            (Err(_), _) => PeerTrust::Untrusted,
            (Ok(()), false) => PeerTrust::Trusted,
            (Ok(()), true) => PeerTrust::Verified,
        };
        let name_error = || {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(NameMismatch {
                    presented: presented.join(", "),
                    expected: self
                        .names
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            )))
        };
        let error = match self.verification {
            Verification::EncryptionOnly => None,
            Verification::Certificate => chain.err(),
            Verification::Name => chain.err().or_else(|| (!name_ok).then(name_error)),
        };
        (trust, error)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("certificate names [{presented}] match none of [{expected}]")]
pub(super) struct NameMismatch {
    presented: String,
    expected: String,
}

impl ServerCertVerifier for PeerCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.evaluate(end_entity, intermediates, now) {
            (_, Some(error)) if self.enforce => Err(error),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &signature_algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &signature_algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signature_algorithms().supported_schemes()
    }
}

/// Presents the relay's client certificate to every upstream that asks.
#[derive(Debug)]
struct PresentCertificate(Arc<CertifiedKey>);

impl ResolvesClientCert for PresentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
