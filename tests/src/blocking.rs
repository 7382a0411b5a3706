//! Blocking peers for tests that drive the `tlsrelay` binary from plain
//! threads: an echo upstream and rustls sessions over std sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

/// A plain echo server on loopback, a thread per connection.
pub fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS session to `addr` for relay.test, trusting `roots`, proven by
/// one echo.
pub fn tls_session(addr: SocketAddr, roots: &rustls::RootCertStore) -> Result<Tls, String> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from("relay.test").unwrap(),
    )
    .map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    echo(&mut tls)?;
    Ok(tls)
}

/// One request/response through an open session.
pub fn echo(tls: &mut Tls) -> Result<(), String> {
    tls.write_all(b"ping").map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut back = [0u8; 4];
    tls.read_exact(&mut back).map_err(|e| e.to_string())?;
    if &back != b"ping" {
        return Err(format!("echo came back as {back:?}"));
    }
    Ok(())
}

/// A plaintext session to `addr`, proven by one echo.
pub fn plain_session(addr: SocketAddr) -> Result<TcpStream, String> {
    let mut tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"ping").map_err(|e| e.to_string())?;
    let mut back = [0u8; 4];
    tcp.read_exact(&mut back).map_err(|e| e.to_string())?;
    if &back != b"ping" {
        return Err(format!("echo came back as {back:?}"));
    }
    Ok(tcp)
}

/// Serves `body` at every path over HTTP/1.0 on loopback.
pub fn http_server(body: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut request = [0u8; 1024];
            let _ = s.read(&mut request);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    port
}
