//! A small HTTPS/1.1 client for the two things mail delivery fetches or
//! posts: MTA-STS policies (GET) and TLS-RPT reports (POST). Names resolve
//! through the relay's own resolver; certificates verify against the
//! given anchors; one request per connection; no redirects.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dns::DnsResolver;
use crate::mta_sts::{parse_http_response, HttpResponse};

/// Why a request failed: the server's certificate, or anything else.
#[derive(Debug)]
pub enum HttpsError {
    Certificate(String),
    Other(String),
}

impl std::fmt::Display for HttpsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpsError::Certificate(why) | HttpsError::Other(why) => f.write_str(why),
        }
    }
}

/// One request to `https://host[:port]/path`.
pub struct Request<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Sends `request`; the response read to the connection's end, at most
/// `max` bytes.
pub async fn request(
    resolver: &DnsResolver,
    roots: &Arc<RootCertStore>,
    request: &Request<'_>,
    max: usize,
) -> Result<HttpResponse, HttpsError> {
    let Request {
        host,
        path,
        method,
        headers,
        body,
    } = *request;
    let other = |e: &dyn std::fmt::Display| HttpsError::Other(e.to_string());
    let (host, port) = match host.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h, p.parse().unwrap_or(443)),
        _ => (host, 443),
    };
    let addresses = resolver.addresses(host).await.map_err(|e| other(&e))?;
    let ip = *addresses
        .records
        .first()
        .ok_or_else(|| HttpsError::Other(format!("{host} has no address")))?;
    let tcp = TcpStream::connect(SocketAddr::new(ip, port))
        .await
        .map_err(|e| other(&format!("{host}[{ip}]:{port}: {e}")))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| other(&e))?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| other(&e))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| match crate::tls::classify_failure(&e) {
            crate::policy::TlsFailure::Untrusted(why)
            | crate::policy::TlsFailure::NameMismatch(why) => HttpsError::Certificate(why),
            failure => HttpsError::Other(failure.to_string()),
        })?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tlsrelay\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers.iter() {
        head += &format!("{name}: {value}\r\n");
    }
    head += "\r\n";
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| other(&e))?;
    tls.write_all(body).await.map_err(|e| other(&e))?;
    let mut response = Vec::new();
    (&mut tls)
        .take(max as u64 + 4096)
        .read_to_end(&mut response)
        .await
        .map_err(|e| other(&e))?;
    parse_http_response(&response).map_err(|e| other(&e))
}
