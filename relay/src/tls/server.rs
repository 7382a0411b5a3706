//! The listener side: which certificate to serve (by SNI), and which client
//! certificates to accept (chain to the partner's anchors, name allowed).

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio_rustls::TlsAcceptor;

use super::{cert_names, provider, versions, TlsError};
use crate::policy::{MinVersion, NamePattern, PeerTrust};

/// What a listener's TLS is built from (files already loaded).
pub struct ListenerTlsSettings {
    pub min_version: MinVersion,
    /// Served by SNI; the default is served when no name matches.
    pub certificates: Vec<Arc<CertifiedKey>>,
    pub default_certificate: usize,
    pub client_auth: Option<ClientAuthSettings>,
}

pub struct ClientAuthSettings {
    pub required: bool,
    pub roots: RootCertStore,
    /// Allowed client certificate names; empty allows any.
    pub names: Vec<NamePattern>,
}

/// A listener's ready-to-use server configuration.
pub struct ListenerTls {
    config: Arc<ServerConfig>,
    client_names_checked: bool,
}

impl ListenerTls {
    pub fn new(settings: ListenerTlsSettings) -> Result<ListenerTls, TlsError> {
        let provider = Arc::new(provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions(settings.min_version))
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let client_names_checked = settings
            .client_auth
            .as_ref()
            .is_some_and(|a| !a.names.is_empty());
        let builder = match settings.client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => {
                let mut webpki =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(auth.roots), provider);
                if !auth.required {
                    webpki = webpki.allow_unauthenticated();
                }
                let inner = webpki.build().map_err(|e| {
                    TlsError::Rustls(format!("client certificate trust anchors: {e}"))
                })?;
                builder.with_client_cert_verifier(Arc::new(AllowedClientNames {
                    inner,
                    names: auth.names,
                }))
            }
        };
        let resolver = SniResolver::new(settings.certificates, settings.default_certificate);
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.ignore_client_order = true;
        // Lets the data plane hand the session keys to kernel TLS.
        config.enable_secret_extraction = true;
        Ok(ListenerTls {
            config: Arc::new(config),
            client_names_checked,
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// How far the client's certificate was established. Only called after
    /// a successful handshake, so a presented certificate passed the
    /// verifier (chain, and names when configured).
    pub fn client_trust(&self, peer_certs: Option<&[CertificateDer<'_>]>) -> PeerTrust {
        match peer_certs {
            None | Some([]) => PeerTrust::Anonymous,
            Some(_) if self.client_names_checked => PeerTrust::Verified,
            Some(_) => PeerTrust::Trusted,
        }
    }
}

/// Chooses the served certificate by SNI, matching the certificates' own
/// names (wildcards included).
#[derive(Debug)]
struct SniResolver {
    certificates: Vec<(Vec<String>, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn new(certificates: Vec<Arc<CertifiedKey>>, default: usize) -> SniResolver {
        let default = certificates[default].clone();
        let certificates = certificates
            .into_iter()
            .map(|ck| {
                let names = ck.end_entity_cert().map(cert_names).unwrap_or_default();
                (names, ck)
            })
            .collect();
        SniResolver {
            certificates,
            default,
        }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let chosen = hello.server_name().and_then(|sni| {
            let wanted = NamePattern::Exact(sni.to_ascii_lowercase());
            self.certificates
                .iter()
                .find(|(names, _)| names.iter().any(|n| wanted.matches(n)))
        });
        Some(chosen.map_or_else(|| self.default.clone(), |(_, ck)| ck.clone()))
    }
}

/// WebPKI client verification plus the listener's allowed names, so a
/// partner with a valid certificate under the wrong name fails the handshake
/// with an alert rather than being cut off afterwards.
#[derive(Debug)]
struct AllowedClientNames {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<NamePattern>,
}

impl ClientCertVerifier for AllowedClientNames {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let presented = cert_names(end_entity);
        if self.names.is_empty()
            || NamePattern::any_matches(&self.names, presented.iter().map(String::as_str))
        {
            return Ok(verified);
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(NameNotAllowed(
                presented.join(", "),
            )))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("client certificate name not allowed (certificate names: {0})")]
struct NameNotAllowed(String);
