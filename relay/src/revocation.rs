//! What a validating peer would make of a certificate's revocation and
//! issuer endpoints, checked from here before a rotation: each CRL fetched
//! and verified (signed by the issuer, current, the certificate not
//! listed), each OCSP responder asked about the certificate (a signed,
//! current answer, and what it says), each CA-issuer URL fetched and
//! checked to be the issuer.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::RootCertStore;
use serde::Serialize;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use tlsrelay_core::ocsp;

use crate::http_client;

/// One endpoint, fetched and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Reach {
    pub url: String,
    pub kind: &'static str,
    /// Answered, and the answer holds up (a valid CRL not listing the
    /// certificate, a signed "good", the issuer's certificate).
    pub reachable: bool,
    pub detail: String,
}

/// Everything needed to judge the endpoints of `chain`'s end-entity
/// certificate.
pub struct Subject<'a> {
    pub chain: &'a [CertificateDer<'a>],
    pub roots: &'a RootCertStore,
    pub crl_urls: &'a [String],
    pub ocsp_urls: &'a [String],
    pub ca_issuer_urls: &'a [String],
}

/// Fetches and checks every endpoint, `timeout` per step.
pub fn reach(subject: &Subject<'_>, timeout: Duration) -> Vec<Reach> {
    let mut out = Vec::new();
    // The CA-issuer certificates first: an OCSP request needs the issuer.
    let mut issuers: Vec<Vec<u8>> = subject
        .chain
        .get(1)
        .map(|c| c.to_vec())
        .into_iter()
        .collect();
    for url in subject.ca_issuer_urls {
        let result = http(url, None, timeout).and_then(|body| {
            let der = certificate_der(&body)?;
            let detail = is_issuer_of(&subject.chain[0], &der)?;
            issuers.push(der);
            Ok(detail)
        });
        out.push(entry(url, "CA issuer", result));
    }
    for url in subject.crl_urls {
        let result = http(url, None, timeout).and_then(|body| check_crl(subject, &body));
        out.push(entry(url, "CRL", result));
    }
    for url in subject.ocsp_urls {
        let result = ask_ocsp(url, &subject.chain[0], &issuers, timeout);
        out.push(entry(url, "OCSP", result));
    }
    out
}

fn entry(url: &str, kind: &'static str, result: Result<String, String>) -> Reach {
    Reach {
        url: url.to_string(),
        kind,
        reachable: result.is_ok(),
        detail: result.unwrap_or_else(|e| e),
    }
}

/// A CRL from the issuer, current, and not listing the certificate: what
/// webpki concludes verifying the chain against it alone.
fn check_crl(subject: &Subject<'_>, der: &[u8]) -> Result<String, String> {
    let (_, parsed) = CertificateRevocationList::from_der(der)
        .map_err(|e| format!("{} bytes, not a DER CRL: {e}", der.len()))?;
    let next = parsed
        .next_update()
        .map_or("none".to_string(), |t| t.to_string());
    let crl = webpki::OwnedCertRevocationList::from_der(der)
        .map_err(|e| format!("not a CRL webpki accepts: {e:?}"))?;
    let crl = webpki::CertRevocationList::from(crl);
    let crls = [&crl];
    let options = webpki::RevocationOptionsBuilder::new(&crls)
        .map_err(|e| format!("{e:?}"))?
        .with_depth(webpki::RevocationCheckDepth::EndEntity)
        .with_status_policy(webpki::UnknownStatusPolicy::Deny)
        .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
        .build();
    let leaf = webpki::EndEntityCert::try_from(&subject.chain[0])
        .map_err(|e| format!("certificate does not parse: {e:?}"))?;
    let verified = leaf.verify_for_usage(
        crate::tls::provider().signature_verification_algorithms.all,
        &subject.roots.roots,
        &subject.chain[1..],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        Some(options),
        None,
    );
    match verified {
        Ok(_) => Ok(format!(
            "signed by the issuer, next update {next}, {} entries, the certificate is not listed",
            parsed.iter_revoked_certificates().count()
        )),
        Err(webpki::Error::CertRevoked) => Err("the certificate is REVOKED in it".into()),
        Err(webpki::Error::CrlExpired { .. }) => {
            Err(format!("stale: next update {next} has passed"))
        }
        Err(webpki::Error::UnknownRevocationStatus) => {
            Err("not the certificate issuer's CRL (another issuer or scope)".into())
        }
        Err(webpki::Error::InvalidCrlSignatureForPublicKey) => {
            Err("not signed by the issuer (bad signature)".into())
        }
        Err(
            e @ (webpki::Error::UnsupportedCrlSignatureAlgorithmContext(_)
            | webpki::Error::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_)),
        ) => Err(format!(
            "signed with an algorithm webpki does not check ({e:?})"
        )),
        Err(e) => Err(format!("the chain does not verify against it: {e:?}")),
    }
}

/// Asks the responder about the certificate: a signed, current answer.
fn ask_ocsp(
    url: &str,
    leaf: &CertificateDer<'_>,
    issuers: &[Vec<u8>],
    timeout: Duration,
) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let issuer = issuers.iter().find_map(|der| {
        let (_, issuer) = X509Certificate::from_der(der).ok()?;
        (issuer.subject().as_raw() == cert.issuer().as_raw()).then_some(issuer)
    });
    let Some(issuer) = issuer else {
        let (addr, _) = connect(url, timeout)?;
        return Err(format!(
            "TCP {addr} connected, but a request needs the issuer's certificate: put it in the chain, or a CA-issuer URL in the certificate"
        ));
    };
    let sha1 = |bytes: &[u8]| {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, bytes)
            .as_ref()
            .to_vec()
    };
    let serial = cert.tbs_certificate.raw_serial();
    let request = ocsp::request(
        &sha1(issuer.subject().as_raw()),
        &sha1(&issuer.public_key().subject_public_key.data),
        serial,
    );
    let body = http(url, Some(&request), timeout)?;
    let status = ocsp::status_for(&body, serial).map_err(|e| e.to_string())?;
    let signer = responder(&status.signed, &issuer)?;
    let now = UnixTime::now().as_secs() as i64;
    let times = format!(
        "this update {}, next update {}",
        ocsp::format_time(status.this_update),
        status.next_update.map_or("none".into(), ocsp::format_time)
    );
    if status.next_update.is_some_and(|next| next <= now) {
        return Err(format!("stale answer ({times})"));
    }
    match status.status {
        ocsp::CertStatus::Good => Ok(format!("good, signed by {signer}, {times}")),
        other => Err(format!(
            "the responder says {other} (signed by {signer}, {times})"
        )),
    }
}

/// Who signed the response: the issuer itself, or a responder certificate
/// sent along that the issuer signed.
fn responder(signed: &ocsp::Signed, issuer: &X509Certificate<'_>) -> Result<&'static str, String> {
    if verify(&signed.algorithm, issuer, &signed.tbs, &signed.signature).is_ok() {
        return Ok("the issuer");
    }
    for der in &signed.certs {
        let Ok((_, delegate)) = X509Certificate::from_der(der) else {
            continue;
        };
        let issued = verify(
            delegate.signature_algorithm.algorithm.as_bytes(),
            issuer,
            delegate.tbs_certificate.as_ref(),
            &delegate.signature_value.data,
        );
        if issued.is_ok()
            && verify(&signed.algorithm, &delegate, &signed.tbs, &signed.signature).is_ok()
        {
            return Ok("a responder certificate the issuer signed");
        }
    }
    Err("the response's signature is not the issuer's (nor a delegate's it signed)".into())
}

/// Checks `signature` over `message` with `signer`'s key under the
/// signature algorithm with OID contents `algorithm`.
fn verify(
    algorithm: &[u8],
    signer: &X509Certificate<'_>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let spki = signer.public_key();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|oid| oid.as_bytes().to_vec());
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    let p256 = curve.as_deref() == Some(P256);
    let p384 = curve.as_deref() == Some(P384);
    let alg: &'static dyn VerificationAlgorithm = match algorithm {
        // ecdsa-with-SHA256 / SHA384
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] if p256 => {
            &signature::ECDSA_P256_SHA256_ASN1
        }
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02] if p384 => {
            &signature::ECDSA_P384_SHA256_ASN1
        }
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] if p384 => {
            &signature::ECDSA_P384_SHA384_ASN1
        }
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03] if p256 => {
            &signature::ECDSA_P256_SHA384_ASN1
        }
        // sha256/384/512WithRSAEncryption
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b] => {
            &signature::RSA_PKCS1_2048_8192_SHA256
        }
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c] => {
            &signature::RSA_PKCS1_2048_8192_SHA384
        }
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d] => {
            &signature::RSA_PKCS1_2048_8192_SHA512
        }
        // Ed25519
        [0x2b, 0x65, 0x70] => &signature::ED25519,
        _ => return Err("unsupported signature algorithm".into()),
    };
    UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
        .verify(message, signature)
        .map_err(|_| "bad signature".to_string())
}

/// Whether `issuer_der` is the certificate that issued `leaf`: its subject
/// is the leaf's issuer and its key verifies the leaf's signature.
fn is_issuer_of(leaf: &CertificateDer<'_>, issuer_der: &[u8]) -> Result<String, String> {
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let (_, issuer) =
        X509Certificate::from_der(issuer_der).map_err(|e| format!("not a certificate: {e}"))?;
    if issuer.subject().as_raw() != cert.issuer().as_raw() {
        return Err(format!(
            "a certificate for {}, not the issuer ({})",
            issuer.subject(),
            cert.issuer()
        ));
    }
    verify(
        cert.signature_algorithm.algorithm.as_bytes(),
        &issuer,
        cert.tbs_certificate.as_ref(),
        &cert.signature_value.data,
    )
    .map_err(|e| {
        format!(
            "{}: its key does not verify the certificate ({e})",
            issuer.subject()
        )
    })?;
    Ok(format!("the issuer, {}", issuer.subject()))
}

/// A certificate served as DER or PEM.
fn certificate_der(body: &[u8]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    if body.starts_with(b"-----BEGIN") {
        return CertificateDer::from_pem_slice(body)
            .map(|c| c.to_vec())
            .map_err(|e| format!("PEM without a certificate: {e}"));
    }
    Ok(body.to_vec())
}

/// A TCP connection to the URL's host and port.
fn connect(url: &str, timeout: Duration) -> Result<(std::net::SocketAddr, TcpStream), String> {
    let (_, host, port, _) =
        http_client::split_url(url).ok_or_else(|| "not an http, https or ldap URL".to_string())?;
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("UNREACHABLE: cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("UNREACHABLE: {host} has no address"))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("UNREACHABLE: TCP {addr}: {e}"))?;
    Ok((addr, tcp))
}

/// GET (or with `post`, POST an OCSP request) over plain HTTP, within
/// `timeout`; the body of a 200. Other schemes: a TCP connection is all
/// that is tried.
fn http(url: &str, post: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>, String> {
    let (scheme, host, port, path) =
        http_client::split_url(url).ok_or_else(|| "not an http, https or ldap URL".to_string())?;
    if !scheme.eq_ignore_ascii_case("http") {
        let (addr, _) = connect(url, timeout)?;
        return Err(format!(
            "TCP {addr} connected; only http endpoints are validated"
        ));
    }
    let request = http_client::Request {
        host,
        port,
        path,
        method: if post.is_some() { "POST" } else { "GET" },
        headers: match post {
            Some(_) => &[("Content-Type", "application/ocsp-request")],
            None => &[],
        },
        body: post.unwrap_or_default(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let response = runtime
        .block_on(http_client::request(
            http_client::Names::System,
            http_client::Transport::Plain,
            &request,
            64 << 20,
            timeout,
        ))
        .map_err(|e| format!("UNREACHABLE: HTTP: {e}"))?;
    if response.status != 200 {
        return Err(format!("HTTP answered {}", response.status));
    }
    Ok(response.body)
}
