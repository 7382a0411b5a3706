//! Certificate material: PEM files, the names a certificate carries, and the
//! self-signed certificate the relay generates when none is configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use super::TlsError;

/// Reads a PEM chain, end-entity certificate first.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::file(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::file(path, "no certificate found (expected PEM)"));
    }
    Ok(certs)
}

/// Reads a PEM private key and pairs it with its chain, checking they match.
pub fn load_certified_key(chain: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_chain(chain)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::file(key, e))?;
    let provider = super::provider();
    let certified = CertifiedKey::from_der(certs, key_der, &provider).map_err(|e| {
        TlsError::file(
            key,
            format!("does not match the certificate in {}: {e}", chain.display()),
        )
    })?;
    Ok(Arc::new(certified))
}

/// Reads an OCSP response (DER) to staple for `chain`'s end-entity
/// certificate, refusing one that is not for it, not "good" or not current.
pub fn load_ocsp_staple(path: &Path, chain: &[CertificateDer<'_>]) -> Result<Vec<u8>, TlsError> {
    let der = std::fs::read(path).map_err(|e| TlsError::file(path, e))?;
    let end_entity = chain
        .first()
        .ok_or_else(|| TlsError::file(path, "no certificate to staple it to"))?;
    let serial = certificate_serial(end_entity).map_err(|e| TlsError::file(path, e))?;
    tlsrelay_core::ocsp::check(&der, &serial, crate::unix_now())
        .map_err(|e| TlsError::file(path, e))?;
    Ok(der)
}

/// The certificate's serial number: its DER INTEGER contents.
pub fn certificate_serial(cert: &CertificateDer<'_>) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| format!("certificate does not parse: {e}"))?;
    Ok(parsed.tbs_certificate.raw_serial().to_vec())
}

/// Reads a PEM file of trust anchors.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::file(path, format!("not a usable trust anchor: {e}")))?;
    }
    Ok(roots)
}

/// Reads certificate revocation lists: PEM (any number) or one DER.
pub fn load_crls(path: &Path) -> Result<Vec<webpki::CertRevocationList<'static>>, TlsError> {
    use rustls::pki_types::CertificateRevocationListDer;
    let bytes = std::fs::read(path).map_err(|e| TlsError::file(path, e))?;
    let ders: Vec<CertificateRevocationListDer<'static>> = if bytes.starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::file(path, e))?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if ders.is_empty() {
        return Err(TlsError::file(path, "no CRL found (expected PEM or DER)"));
    }
    ders.iter()
        .map(|der| {
            webpki::OwnedCertRevocationList::from_der(der)
                .map(webpki::CertRevocationList::from)
                .map_err(|e| TlsError::file(path, format!("not a usable CRL: {e:?}")))
        })
        .collect()
}

/// The system trust store (what `update-ca-certificates` maintains).
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsError::NoSystemRoots(
            found
                .errors
                .first()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no certificates found".into()),
        ));
    }
    Ok(roots)
}

/// The names a certificate answers to: its DNS and IP subject alternative
/// names, or its subject common name when it has no DNS names (as Postfix
/// does). Lowercased.
pub fn cert_names(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                GeneralName::IPAddress(bytes) => {
                    let ip = match bytes.len() {
                        4 => <[u8; 4]>::try_from(*bytes).map(std::net::IpAddr::from).ok(),
                        16 => <[u8; 16]>::try_from(*bytes)
                            .map(std::net::IpAddr::from)
                            .ok(),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    if !names.iter().any(|n| n.parse::<std::net::IpAddr>().is_err()) {
        names.extend(
            parsed
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

/// The relay's own self-signed certificate, generated into the state
/// directory on first start and reused after, so clients that pin it keep
/// working across restarts.
pub struct SelfSigned {
    pub chain: PathBuf,
    pub key: PathBuf,
}

impl SelfSigned {
    pub fn in_dir(state_dir: &Path) -> SelfSigned {
        SelfSigned {
            chain: state_dir.join("self-signed.crt"),
            key: state_dir.join("self-signed.key"),
        }
    }

    /// Loads the certificate, generating it first if it does not exist.
    /// Its files are read without following symlinks.
    pub fn load_or_generate(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        if !self.chain.exists() || !self.key.exists() {
            self.generate()?;
        }
        let read = |path: &Path| crate::state::read_file(path).map_err(|e| TlsError::file(path, e));
        let (chain, key) = (read(&self.chain)?, read(&self.key)?);
        let certs = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::file(&self.chain, e))?;
        let key_der =
            PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::file(&self.key, e))?;
        CertifiedKey::from_der(certs, key_der, &super::provider())
            .map(Arc::new)
            .map_err(|e| {
                TlsError::file(
                    &self.key,
                    format!("does not match {}: {e}", self.chain.display()),
                )
            })
    }

    /// A fresh self-signed certificate kept in memory only.
    pub fn ephemeral() -> Result<Arc<CertifiedKey>, TlsError> {
        let generated = Self::new_certificate()?;
        let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        CertifiedKey::from_der(vec![generated.cert.der().clone()], key, &super::provider())
            .map(Arc::new)
            .map_err(|e| TlsError::Generate(e.to_string()))
    }

    fn new_certificate() -> Result<rcgen::CertifiedKey<rcgen::KeyPair>, TlsError> {
        let host = hostname().unwrap_or_else(|| "localhost".into());
        let mut names = vec![host, "localhost".to_string(), "127.0.0.1".to_string()];
        names.dedup();
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))
    }

    /// Writes a new key and certificate: each a new 0600 file renamed
    /// into place (a symlink planted there is replaced, not written
    /// through).
    fn generate(&self) -> Result<(), TlsError> {
        let generated = Self::new_certificate()?;
        if let Some(dir) = self.key.parent() {
            crate::state::create_dir(dir).map_err(|e| TlsError::file(dir, e))?;
        }
        let key = generated.signing_key.serialize_pem();
        crate::state::replace_file(&self.key, key.as_bytes())
            .map_err(|e| TlsError::file(&self.key, e))?;
        crate::state::replace_file(&self.chain, generated.cert.pem().as_bytes())
            .map_err(|e| TlsError::file(&self.chain, e))
    }
}

/// This machine's host name (for greetings and the generated certificate).
pub fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}
