//! The relay's one HTTP client, for what mail delivery fetches or posts
//! (MTA-STS policies, TLS-RPT reports, over HTTPS) and for the revocation
//! endpoints `tlsrelay cert check --reach` asks (CRLs, OCSP, CA issuers,
//! over plain HTTP: what they serve is signed). hyper speaks the HTTP/1.1,
//! so a response is whole at its last byte by Content-Length or chunked
//! framing, whether or not an HTTPS server then sends close_notify (many
//! close without it). Each address of the host is tried until one
//! connects; certificates verify against the given anchors; one request
//! per connection; no redirects; one deadline over all of it, so a server
//! that never answers costs that long and no more.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::dns::DnsResolver;

/// Why a request failed: the server's certificate, or anything else.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Certificate(String),
    #[error("{0}")]
    Other(String),
}

/// Where host names are looked up.
#[derive(Clone, Copy)]
pub enum Names<'a> {
    /// The relay's validating resolver (mail delivery's lookups).
    Relay(&'a DnsResolver),
    /// The system's (a command run by an operator).
    System,
}

/// How the request reaches its server.
#[derive(Clone, Copy)]
pub enum Transport<'a> {
    Plain,
    /// TLS, the server's certificate verified against these anchors.
    Tls(&'a Arc<RootCertStore>),
}

/// One request to `host` (a name, or an address: IPv6 without brackets) on
/// `port`, and a path.
pub struct Request<'a> {
    pub host: &'a str,
    pub port: u16,
    pub path: &'a str,
    pub method: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// A whole response.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Sends `request` and reads the response, its body at most `max` bytes,
/// all within `deadline`.
pub async fn request(
    names: Names<'_>,
    transport: Transport<'_>,
    request: &Request<'_>,
    max: usize,
    deadline: Duration,
) -> Result<HttpResponse, HttpError> {
    match tokio::time::timeout(deadline, send(names, transport, request, max)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Other(format!(
            "{}: no answer within {} s",
            request.host,
            deadline.as_secs_f64()
        ))),
    }
}

fn other(e: impl std::fmt::Display) -> HttpError {
    HttpError::Other(e.to_string())
}

/// (scheme, host, port, path) of an http(s) or ldap(s) URL: the host
/// without an IPv6 address's brackets, the scheme's port if none is given.
pub fn split_url(url: &str) -> Option<(&str, &str, u16, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        "ldap" => 389,
        "ldaps" => 636,
        _ => return None,
    };
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (v6, tail) = rest.split_once(']')?;
            match tail.strip_prefix(':') {
                Some(p) => (v6, p.parse().ok()?),
                None => (v6, default),
            }
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (authority, default),
        },
    };
    Some((scheme, host, port, path))
}

/// The Host header for `host` on `port`: `[v6]`, and `:port` unless the
/// transport's own.
fn host_header(host: &str, port: u16, default_port: u16) -> String {
    let host = match host.contains(':') {
        true => format!("[{host}]"),
        false => host.to_string(),
    };
    match port == default_port {
        true => host,
        false => format!("{host}:{port}"),
    }
}

async fn send(
    names: Names<'_>,
    transport: Transport<'_>,
    request: &Request<'_>,
    max: usize,
) -> Result<HttpResponse, HttpError> {
    let default_port = match transport {
        Transport::Plain => 80,
        Transport::Tls(_) => 443,
    };
    let (host, port) = (request.host, request.port);
    let host_field = host_header(host, port, default_port);
    let addresses: Vec<IpAddr> = match (host.parse::<IpAddr>(), names) {
        (Ok(ip), _) => vec![ip],
        (Err(_), Names::Relay(resolver)) => resolver.addresses(host).await.map_err(other)?.records,
        (Err(_), Names::System) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| HttpError::Other(format!("cannot resolve {host}: {e}")))?
            .map(|a| a.ip())
            .collect(),
    };
    if addresses.is_empty() {
        return Err(HttpError::Other(format!("{host} has no address")));
    }
    let mut refused = Vec::new();
    for ip in &addresses {
        let tcp = match TcpStream::connect(SocketAddr::new(*ip, port)).await {
            Ok(tcp) => tcp,
            Err(e) => {
                refused.push(format!("{host}[{ip}]:{port}: {e}"));
                continue;
            }
        };
        // The first server that takes the connection answers.
        return match transport {
            Transport::Plain => exchange(tcp, &host_field, request, max).await,
            Transport::Tls(roots) => {
                let tls = handshake(tcp, host, roots).await?;
                exchange(tls, &host_field, request, max).await
            }
        };
    }
    Err(HttpError::Other(refused.join("; ")))
}

async fn handshake(
    tcp: TcpStream,
    host: &str,
    roots: &Arc<RootCertStore>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HttpError> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| match crate::tls::classify_failure(&e) {
            tlsrelay_core::policy::TlsFailure::Untrusted(why)
            | tlsrelay_core::policy::TlsFailure::NameMismatch(why) => HttpError::Certificate(why),
            failure => HttpError::Other(failure.to_string()),
        })
}

/// Aborts the connection's task when the request is done or dropped (the
/// deadline).
struct Driver(JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange<S>(
    io: S,
    host_field: &str,
    request: &Request<'_>,
    max: usize,
) -> Result<HttpResponse, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(other)?;
    let _driver = Driver(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut builder = hyper::Request::builder()
        .method(request.method)
        .uri(request.path)
        .header(HOST, host_field)
        .header(USER_AGENT, "tlsrelay")
        .header(CONNECTION, "close");
    for (name, value) in request.headers {
        builder = builder.header(*name, *value);
    }
    let outgoing = builder
        .body(Full::new(Bytes::copy_from_slice(request.body)))
        .map_err(other)?;
    let response = sender.send_request(outgoing).await.map_err(other)?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    let body = Limited::new(response.into_body(), max)
        .collect()
        .await
        .map_err(|e| HttpError::Other(format!("response body: {e}")))?
        .to_bytes()
        .to_vec();
    Ok(HttpResponse {
        status,
        content_type,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-connection HTTPS server on 127.0.0.1 (its certificate names
    /// the address) that reads the request's head, then writes `answer`,
    /// or nothing if it is `None`, and closes TCP without close_notify.
    /// Returns its port and the anchors that trust it.
    async fn server(answer: Option<&'static [u8]>) -> (u16, Arc<RootCertStore>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(crate::tls::provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if tls.read(&mut byte).await.unwrap() == 0 {
                    return;
                }
                head.push(byte[0]);
            }
            let Some(answer) = answer else {
                std::future::pending::<()>().await;
                return;
            };
            tls.write_all(answer).await.unwrap();
            tls.flush().await.unwrap();
            let (tcp, _) = tls.into_inner();
            drop(tcp); // FIN, no close_notify
        });
        (port, Arc::new(roots))
    }

    async fn get(
        port: u16,
        roots: &Arc<RootCertStore>,
        max: usize,
        deadline: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let req = Request {
            host: "127.0.0.1",
            port,
            path: "/report",
            method: "POST",
            headers: &[("Content-Type", "application/tlsrpt+gzip")],
            body: b"report",
        };
        // Names are not looked up: the host is an address.
        request(Names::System, Transport::Tls(roots), &req, max, deadline).await
    }

    #[tokio::test]
    async fn a_response_is_whole_at_its_content_length_without_close_notify() {
        let (port, roots) = server(Some(
            b"HTTP/1.1 200 OK\r\nContent-Type: Text/Plain\r\nContent-Length: 5\r\n\r\nstored",
        ))
        .await;
        let response = get(port, &roots, 1024, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.content_type.as_deref(), Some("text/plain"));
        assert_eq!(response.body, b"store");
    }

    #[tokio::test]
    async fn chunked_bodies_are_joined_and_capped() {
        let (port, roots) = server(Some(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
        ))
        .await;
        let response = get(port, &roots, 1024, Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(response.body, b"hello");
        let (port, roots) = server(Some(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789",
        ))
        .await;
        let err = get(port, &roots, 4, Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("response body"), "{err}");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let (port, roots) =
            server(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 77\r\n\r\nshort")).await;
        assert!(get(port, &roots, 1024, Duration::from_secs(20))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_server_that_never_answers_costs_the_deadline() {
        let (port, roots) = server(None).await;
        let err = get(port, &roots, 1024, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
    }

    #[test]
    fn urls_split_into_scheme_host_port_path() {
        for (url, parts) in [
            (
                "http://crl.example/ca.crl",
                Some(("http", "crl.example", 80, "/ca.crl")),
            ),
            (
                "http://127.0.0.1:8080/x",
                Some(("http", "127.0.0.1", 8080, "/x")),
            ),
            ("https://[::1]:8443/r", Some(("https", "::1", 8443, "/r"))),
            ("https://[::1]", Some(("https", "::1", 443, "/"))),
            (
                "ldap://dir.example",
                Some(("ldap", "dir.example", 389, "/")),
            ),
            ("https://a.test:x/", None),
            ("ftp://x/y", None),
            ("no scheme", None),
        ] {
            assert_eq!(split_url(url), parts, "{url}");
        }
        assert_eq!(host_header("a.test", 443, 443), "a.test");
        assert_eq!(host_header("::1", 8080, 80), "[::1]:8080");
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_told_apart() {
        let (port, _) = server(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let (_, other_roots) = server(None).await;
        let err = get(port, &other_roots, 1024, Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Certificate(_)), "{err:?}");
    }
}
