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
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::RecordIo;
use tlsrelay_sys::ktls::SecretCapture;

use super::{cert_names, provider_with, signature_algorithms, versions, TlsError};
use tlsrelay_core::policy::{KeyExchange, MinVersion, NamePattern, PeerTrust};

/// What a listener's TLS is built from (files already loaded).
pub struct ListenerTlsSettings {
    pub min_version: MinVersion,
    /// Key exchange groups accepted.
    pub groups: Vec<KeyExchange>,
    /// Served by SNI; the default is served when no name matches.
    pub certificates: Vec<Arc<CertifiedKey>>,
    pub default_certificate: usize,
    pub client_auth: Option<ClientAuth>,
    /// Ticket keys shared by a fleet; `None`: the process's own.
    pub tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
}

/// How a listener treats client certificates.
pub enum ClientAuth {
    /// Checked in the handshake: chain to the anchors, a name allowed.
    Enforced(ClientAuthSettings),
    /// Asked for (naming these CAs) but never refused in the handshake:
    /// any certificate whose key the client proves is accepted, and the
    /// SMTP inbound connectors judge its chain afterwards, so a mail server
    /// presenting a certificate from some other CA keeps its STARTTLS.
    Deferred { hints: Vec<DistinguishedName> },
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
    deferred: bool,
    /// Each certificate served: its first name and when it expires (Unix
    /// seconds), for the expiry metric.
    expiries: Vec<(String, i64)>,
}

impl ListenerTls {
    /// Each certificate served: its first name and its expiry (Unix
    /// seconds).
    pub fn expiries(&self) -> &[(String, i64)] {
        &self.expiries
    }

    pub fn new(settings: ListenerTlsSettings) -> Result<ListenerTls, TlsError> {
        let provider = Arc::new(provider_with(&settings.groups));
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions(settings.min_version))
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let deferred = matches!(&settings.client_auth, Some(ClientAuth::Deferred { .. }));
        let client_names_checked = matches!(
            &settings.client_auth,
            Some(ClientAuth::Enforced(a)) if !a.names.is_empty()
        );
        let builder = match settings.client_auth {
            None => builder.with_no_client_auth(),
            Some(ClientAuth::Deferred { hints }) => {
                builder.with_client_cert_verifier(Arc::new(DeferredClientCertificate { hints }))
            }
            Some(ClientAuth::Enforced(auth)) => {
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
        let expiries = settings
            .certificates
            .iter()
            .filter_map(|key| crate::inspect::CertificateInfo::of_chain(&key.cert).ok())
            .map(|info| {
                let san = info.san.first().and_then(|s| s.split_once(':'));
                let name = san
                    .map(|(_, name)| name.to_string())
                    .or(info.subject_cn)
                    .unwrap_or_default();
                (name, info.not_after_unix)
            })
            .collect();
        let resolver = SniResolver::new(settings.certificates, settings.default_certificate);
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.ignore_client_order = true;
        // Stateless TLS 1.3 tickets (and TLS 1.2 ones): a returning client
        // resumes without a signature or a certificate, and the relay
        // keeps no per-client state. One key set for the process, so a
        // reload does not turn returning clients into full handshakes.
        config.ticketer = match settings.tickets {
            Some(fleet) => fleet,
            None => ticketer()?,
        };
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        // Lets the data plane hand the session keys to kernel TLS.
        config.enable_secret_extraction = true;
        Ok(ListenerTls {
            config: Arc::new(config),
            client_names_checked,
            deferred,
            expiries,
        })
    }

    /// Starts the server side of a handshake on `tcp`. The connection gets
    /// its own copy of the configuration whose key log keeps its traffic
    /// secrets: KeyUpdates after the keys left rustls (for the kernel, or
    /// the relay's own record layer) derive from them.
    pub fn accept(&self, tcp: TcpStream) -> tokio_rustls::Accept<RecordIo> {
        self.accept_after(tcp, Vec::new())
    }

    /// The handshake of a client whose first records (`hello`, read to
    /// route it) are already off the socket: rustls reads them first.
    pub fn accept_after(&self, tcp: TcpStream, hello: Vec<u8>) -> tokio_rustls::Accept<RecordIo> {
        let capture = Arc::new(SecretCapture::default());
        let mut config = (*self.config).clone();
        config.key_log = capture.clone();
        TlsAcceptor::from(Arc::new(config)).accept(RecordIo::capturing(tcp, capture).after(hello))
    }

    /// Whether client certificates are judged after the handshake
    /// ([`ClientAuth::Deferred`]).
    pub fn defers_client_certificates(&self) -> bool {
        self.deferred
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

/// The process's ticket keys: random, rotated every 6 hours (rustls's
/// recommended ticketer; a ticket lives 12 hours at most).
fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, TlsError> {
    static TICKETER: std::sync::OnceLock<Arc<dyn rustls::server::ProducesTickets>> =
        std::sync::OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let t = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| TlsError::Rustls(format!("session ticket keys: {e}")))?;
    Ok(TICKETER.get_or_init(|| t).clone())
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

/// Accepts any well-formed client certificate whose key signs the
/// handshake; see [`ClientAuth::Deferred`].
#[derive(Debug)]
struct DeferredClientCertificate {
    hints: Vec<DistinguishedName>,
}

impl ClientCertVerifier for DeferredClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ClientCertVerified::assertion())
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

/// Whether a client's chain (end entity first) leads to `roots` for client
/// authentication, now.
pub fn client_chain_verifies(roots: &RootCertStore, chain: &[CertificateDer<'_>]) -> bool {
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(end_entity) else {
        return false;
    };
    ee.verify_for_usage(
        signature_algorithms().all,
        &roots.roots,
        intermediates,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .is_ok()
}

#[derive(Debug, thiserror::Error)]
#[error("client certificate name not allowed (certificate names: {0})")]
struct NameNotAllowed(String);
