//! Throughput load: a sink that discards, a generator that pushes bytes
//! over many connections at once and times each, and the certificates both
//! use, so every peer is measured with the same work.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

/// Writes `bench.crt`/`bench.key` (self-signed, names bench.test and
/// 127.0.0.1) and `bench.pem` (both, for peers that want one file).
pub fn certs(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let generated =
        rcgen::generate_simple_self_signed(vec!["bench.test".into(), "127.0.0.1".into()])?;
    let (cert, key) = (generated.cert.pem(), generated.signing_key.serialize_pem());
    std::fs::write(out.join("bench.crt"), &cert)?;
    std::fs::write(out.join("bench.key"), &key)?;
    std::fs::write(out.join("bench.pem"), format!("{cert}{key}"))?;
    Ok(())
}

fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    let chain =
        rustls::pki_types::CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

async fn drain<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    s.shutdown().await?;
    Ok(total)
}

/// Reads and discards every connection's bytes, then closes it.
pub async fn sink(listen: SocketAddr, tls: Option<(&Path, &Path)>) -> anyhow::Result<()> {
    let acceptor = match tls {
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(server_config(cert, key)?)),
        None => None,
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("sink cannot listen on {listen}"))?;
    println!("sink listening on {listen}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = match acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(tls) => drain(tls).await,
                    Err(_) => return,
                },
                None => drain(tcp).await,
            };
        });
    }
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, bytes: u64) -> std::io::Result<()> {
    let chunk = vec![0x5Au8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    s.shutdown().await?;
    // The sink closes once it has everything: the bytes arrived. Some
    // relays close without close_notify; that is an end too.
    let mut rest = [0u8; 16];
    loop {
        match s.read(&mut rest).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// `connections` at once, each sending `bytes`; one JSON line of results.
pub async fn blast(
    to: SocketAddr,
    tls: bool,
    connections: usize,
    bytes: u64,
) -> anyhow::Result<serde_json::Value> {
    let connector = tls.then(|| {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::danger::AnyCertificate))
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let connector = connector.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            let tcp = TcpStream::connect(to).await?;
            tcp.set_nodelay(true)?;
            match connector {
                Some(c) => {
                    let name =
                        rustls::pki_types::ServerName::try_from("bench.test").expect("valid name");
                    push(c.connect(name, tcp).await?, bytes).await?
                }
                None => push(tcp, bytes).await?,
            }
            anyhow::Ok(t0.elapsed())
        });
    }
    let mut latency = Histogram::<u64>::new(3)?;
    while let Some(done) = tasks.join_next().await {
        let elapsed = done??;
        latency.record(elapsed.as_micros() as u64)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let total = bytes * connections as u64;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(serde_json::json!({
        "connections": connections,
        "bytes": total,
        "seconds": seconds,
        "gbit_per_s": total as f64 * 8.0 / seconds / 1e9,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
    }))
}
