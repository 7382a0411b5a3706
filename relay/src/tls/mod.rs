//! rustls configuration for both legs: the relay's certificates and SNI
//! choice, client-certificate checks, upstream verification levels, and the
//! mapping of handshake errors to policy failure reasons.

mod certs;
mod client;
mod dane;
mod record_io;
pub mod records;
mod server;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{AlertDescription, CertificateError, CommonState, PeerIncompatible};

/// This machine's host name, or `localhost`.
pub fn hostname() -> String {
    certs::hostname().unwrap_or_else(|| "localhost".into())
}

pub use certs::{
    cert_names, certificate_serial, load_certified_key, load_chain, load_crls, load_ocsp_staple,
    load_roots, system_roots, SelfSigned,
};
pub use client::{UpstreamTls, UpstreamTlsSettings};
pub use dane::DaneCheck;
pub use record_io::RecordIo;
pub(crate) use record_io::Unread;
pub use server::{
    client_chain_verifies, ClientAuth, ClientAuthSettings, ListenerTls, ListenerTlsSettings,
};

use tlsrelay_core::policy::{KeyExchange, MinVersion, TlsFailure};
pub use tlsrelay_core::report::Negotiated;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("no system trust store: {0} (install ca-certificates or set trust_anchors)")]
    NoSystemRoots(String),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("{0}")]
    Rustls(String),
}

impl TlsError {
    fn file(path: &Path, message: impl fmt::Display) -> TlsError {
        TlsError::File {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// aws-lc-rs with forward-secret suites only. rustls never negotiates TLS
/// 1.0/1.1 or static-RSA key exchange, and its TLS 1.2 suites are all ECDHE;
/// the filter states the rule rather than relying on that. Key exchange:
/// [`KeyExchange::PREFERRED`], the post-quantum hybrid first.
pub fn provider() -> CryptoProvider {
    provider_with(&KeyExchange::PREFERRED)
}

/// [`provider`] with these key exchange groups, in this order (as a client
/// the first gets a key share; as a server rustls follows the client's
/// order among these).
pub fn provider_with(groups: &[KeyExchange]) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = groups
        .iter()
        .map(|g| match g {
            KeyExchange::X25519Mlkem768 => kx_group::X25519MLKEM768,
            KeyExchange::X25519 => kx_group::X25519,
            KeyExchange::Secp256r1 => kx_group::SECP256R1,
            KeyExchange::Secp384r1 => kx_group::SECP384R1,
        })
        .collect();
    provider.cipher_suites.retain(|suite| match suite {
        rustls::SupportedCipherSuite::Tls13(_) => true,
        rustls::SupportedCipherSuite::Tls12(s) => {
            matches!(s.kx, rustls::crypto::KeyExchangeAlgorithm::ECDHE)
        }
    });
    provider
}

/// The protocol versions a leg offers, newest first.
pub fn versions(min: MinVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        MinVersion::Tls12 => BOTH,
        MinVersion::Tls13 => TLS13_ONLY,
    }
}

/// Classifies a failed handshake (as the `io::Error` tokio-rustls returns)
/// into the policy's failure reasons.
pub fn classify_failure(err: &std::io::Error) -> TlsFailure {
    let Some(tls) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                TlsFailure::NotOffered(format!("peer closed the connection: {err}"))
            }
            _ => TlsFailure::HandshakeFailed(err.to_string()),
        };
    };
    let detail = tls.to_string();
    match tls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsFailure::NameMismatch(detail),
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<client::NameMismatch>().is_some() =>
        {
            TlsFailure::NameMismatch(detail)
        }
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<dane::DaneMismatch>().is_some() =>
        {
            TlsFailure::Untrusted(other.0.to_string())
        }
        rustls::Error::InvalidCertificate(_) => TlsFailure::Untrusted(detail),
        rustls::Error::PeerIncompatible(
            PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig
            | PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled,
        )
        | rustls::Error::AlertReceived(AlertDescription::ProtocolVersion) => {
            TlsFailure::VersionTooLow(detail)
        }
        rustls::Error::InvalidMessage(_) => {
            TlsFailure::NotOffered(format!("peer does not speak TLS: {detail}"))
        }
        _ => TlsFailure::HandshakeFailed(detail),
    }
}

/// Shared with the verifiers: the provider's signature algorithms.
fn signature_algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(provider()))
        .signature_verification_algorithms
}

/// What a completed handshake negotiated.
pub fn negotiated_of(conn: &CommonState) -> Negotiated {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let suite = conn.negotiated_cipher_suite().map(|s| s.suite());
    let cipher = suite
        .and_then(|s| s.as_str())
        .unwrap_or("unknown")
        .to_string();
    let group = conn.negotiated_key_exchange_group().map(|g| g.name());
    Negotiated {
        version,
        cipher,
        version_code: conn.protocol_version().map_or(0, u16::from),
        cipher_code: suite.map_or(0, u16::from),
        group: group.map(|g| format!("{g:?}")),
        group_code: group.map_or(0, u16::from),
        resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
    }
}
