//! Stream load: a sink that discards or echoes, generators that push bytes
//! over many connections at once, time request/response round trips, count
//! new TLS handshakes per second or hold idle connections open, and the
//! certificates all of them use, so every peer is measured with the same work.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;

/// Writes, per key type, `<stem>.crt`/`<stem>.key` (self-signed, names
/// bench.test and 127.0.0.1) and `<stem>.pem` (both, for peers that want one
/// file): `bench` is ECDSA P-256, `bench-rsa` is RSA 2048.
pub fn certs(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    for (stem, alg) in [
        ("bench", &rcgen::PKCS_ECDSA_P256_SHA256),
        ("bench-rsa", &rcgen::PKCS_RSA_SHA256),
    ] {
        let key = rcgen::KeyPair::generate_for(alg)?;
        let params = rcgen::CertificateParams::new(vec!["bench.test".into(), "127.0.0.1".into()])?;
        let cert = params.self_signed(&key)?.pem();
        let key = key.serialize_pem();
        std::fs::write(out.join(format!("{stem}.crt")), &cert)?;
        std::fs::write(out.join(format!("{stem}.key")), &key)?;
        std::fs::write(out.join(format!("{stem}.pem")), format!("{cert}{key}"))?;
    }
    Ok(())
}

/// The generators' TLS client: TLS 1.3 and 1.2, any certificate (the bench
/// measures relays, not identities).
pub(crate) fn connector() -> tokio_rustls::TlsConnector {
    connector_offering(None)
}

/// The generators' TLS client offering only `suite` (its IANA name, e.g.
/// TLS13_CHACHA20_POLY1305_SHA256) when given.
fn connector_offering(suite: Option<&str>) -> tokio_rustls::TlsConnector {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(name) = suite {
        provider
            .cipher_suites
            .retain(|s| s.suite().as_str() == Some(name));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::danger::AnyCertificate))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connected stream to `to`, through TLS when `tls` is given.
async fn open(
    to: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    Ok(match tls {
        Some(c) => {
            let name = rustls::pki_types::ServerName::try_from("bench.test").expect("valid name");
            Box::new(c.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    })
}

/// Latency percentiles in microseconds, as JSON fields.
pub(crate) fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50_us": h.value_at_quantile(0.5),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
    })
}

pub(crate) fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
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

/// Writes every byte back until the peer closes.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                s.write_all(&buf[..n]).await?;
                s.flush().await?;
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    s.shutdown().await?;
    Ok(total)
}

/// Reads and discards (or with `echo`, returns) every connection's bytes,
/// then closes it.
pub async fn sink(
    listen: SocketAddr,
    tls: Option<(&Path, &Path)>,
    echo_back: bool,
) -> anyhow::Result<()> {
    let acceptor = match tls {
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(server_config(cert, key)?)),
        None => None,
    };
    let listener = listener(listen).with_context(|| format!("sink cannot listen on {listen}"))?;
    println!("sink listening on {listen}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = match (acceptor, echo_back) {
                (Some(a), echo_back) => match a.accept(tcp).await {
                    Ok(tls) if echo_back => echo(tls).await,
                    Ok(tls) => drain(tls).await,
                    Err(_) => return,
                },
                (None, true) => echo(tcp).await,
                (None, false) => drain(tcp).await,
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
    suite: Option<&str>,
    connections: usize,
    bytes: u64,
) -> anyhow::Result<serde_json::Value> {
    if suite.is_some_and(|name| {
        !rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES
            .iter()
            .any(|s| s.suite().as_str() == Some(name))
    }) {
        anyhow::bail!("unknown cipher suite {suite:?}");
    }
    let connector = tls.then(|| connector_offering(suite));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let connector = connector.clone();
        tasks.spawn(async move {
            let t0 = Instant::now();
            push(open(to, connector.as_ref()).await?, bytes).await?;
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

/// Every connection's histogram in one; the first failure fails it.
pub(crate) async fn merged(
    mut tasks: tokio::task::JoinSet<anyhow::Result<Histogram<u64>>>,
) -> anyhow::Result<Histogram<u64>> {
    let mut all = Histogram::<u64>::new(3)?;
    while let Some(done) = tasks.join_next().await {
        all.add(done??)?;
    }
    Ok(all)
}

/// `connections` each send `size` bytes and wait for them to come back (an
/// echo sink behind the relay), over and over for `seconds`: round-trip
/// latency percentiles and requests per second.
pub async fn request_response(
    to: SocketAddr,
    tls: bool,
    connections: usize,
    size: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let connector = tls.then(connector);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let connector = connector.clone();
        tasks.spawn(async move {
            let mut s = open(to, connector.as_ref()).await?;
            let request = vec![0x42u8; size];
            let mut response = vec![0u8; size];
            let mut h = Histogram::<u64>::new(3)?;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                s.write_all(&request).await?;
                s.flush().await?;
                s.read_exact(&mut response).await?;
                h.record(t0.elapsed().as_micros() as u64)?;
            }
            s.shutdown().await?;
            anyhow::Ok(h)
        });
    }
    let started = Instant::now();
    let all = merged(tasks).await?;
    let mut out = percentiles(&all);
    out["requests_per_s"] = (all.len() as f64 / started.elapsed().as_secs_f64()).into();
    Ok(out)
}

/// TLS 1.3 sessions, one after the other on each of `connections`
/// workers, for `seconds`: each handshakes, sends one byte and waits for its
/// echo (so the relay's upstream leg is up too), then closes. Full
/// handshakes only, or with `resume` each worker resumes from the tickets
/// of its previous session; `resumed` says what fraction did.
pub async fn handshakes(
    to: SocketAddr,
    connections: usize,
    seconds: f64,
    resume: bool,
    count_failures: bool,
) -> anyhow::Result<serde_json::Value> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(crate::danger::AnyCertificate))
    .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let resumed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // When each failed session started (Unix ms): before or after a fault.
    let failed = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        // A ticket store per worker: workers sharing one would take each
        // other's tickets and fall back to full handshakes.
        let mut config = config.clone();
        if resume {
            config.resumption = rustls::client::Resumption::in_memory_sessions(4);
        }
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let (resumed, failed) = (resumed.clone(), failed.clone());
        tasks.spawn(async move {
            let mut h = Histogram::<u64>::new(3)?;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let began = unix_ms();
                let session = async {
                    let tcp = TcpStream::connect(to).await?;
                    tcp.set_nodelay(true)?;
                    // Close with RST: the generator's ports must outlast the run.
                    tcp.set_zero_linger()?;
                    let name = rustls::pki_types::ServerName::try_from("bench.test")?;
                    let mut s = connector.connect(name, tcp).await?;
                    let mut one = [7u8];
                    s.write_all(&one).await?;
                    s.flush().await?;
                    s.read_exact(&mut one).await?;
                    anyhow::Ok(s.get_ref().1.handshake_kind())
                };
                match tokio::time::timeout(Duration::from_secs(10), session).await {
                    Ok(Ok(kind)) => {
                        h.record(t0.elapsed().as_micros() as u64)?;
                        if kind == Some(rustls::HandshakeKind::Resumed) {
                            resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(Err(_)) | Err(_) if count_failures => {
                        failed.lock().expect("not poisoned").push(began);
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => anyhow::bail!("a session took over 10 s"),
                }
            }
            anyhow::Ok(h)
        });
    }
    let all = merged(tasks).await?;
    let mut out = percentiles(&all);
    out["handshakes_per_s"] = (all.len() as f64 / started.elapsed().as_secs_f64()).into();
    out["resumed"] = (resumed.load(std::sync::atomic::Ordering::Relaxed) as f64
        / all.len().max(1) as f64)
        .into();
    let failed = std::mem::take(&mut *failed.lock().expect("not poisoned"));
    out["ok_percent"] =
        (100.0 * all.len() as f64 / (all.len() as f64 + failed.len() as f64).max(1.0)).into();
    out["failed"] = failed.len().into();
    out["failed_started_ms"] = failed.into();
    Ok(out)
}

/// Opens `connections` sessions (64 handshakes in flight at a time), each
/// proven end to end by one echoed byte, prints `{"ready": n}` and holds
/// them idle until standard input closes.
pub async fn hold(to: SocketAddr, tls: bool, connections: usize) -> anyhow::Result<()> {
    let connector = tls.then(connector);
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (connector, gate) = (connector.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire().await?;
            let mut s = open(to, connector.as_ref()).await?;
            let mut one = [7u8];
            s.write_all(&one).await?;
            s.flush().await?;
            s.read_exact(&mut one).await?;
            anyhow::Ok(s)
        });
    }
    let mut open = Vec::with_capacity(connections);
    while let Some(done) = tasks.join_next().await {
        open.push(done?.context("opening an idle connection")?);
    }
    println!("{}", serde_json::json!({ "ready": open.len() }));
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    drop(open);
    Ok(())
}

/// A listener with a deep accept queue (the runtime's default of 128
/// overflows when hundreds of connections arrive at once, and each dropped
/// SYN costs a one-second retransmission).
pub fn listener(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(4096)
}

/// Milliseconds since the Unix epoch: comparable with another process's.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
