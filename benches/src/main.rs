//! `tlsrelay-load`: the peers tlsrelay is demonstrated and measured with.
//!
//! - `echo`: a plaintext echo server (the demo's upstream);
//! - `send`: one client session, plaintext or TLS, that sends bytes, reads
//!   the echo and says what happened;
//! - `sink`, `blast`, `rr`, `handshakes`, `hold`, `smtp-sink`, `smtp`,
//!   `certs`: the load `cargo xtask bench` runs.

mod chaos;
mod load;
mod smtp;
mod soak;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(name = "tlsrelay-load", about = "Load generator and sink for tlsrelay")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every byte back until the client closes.
    Echo {
        #[arg(long, default_value = "127.0.0.1:4432")]
        listen: SocketAddr,
    },
    /// Read and discard (or --echo) every connection's bytes (plain, or
    /// TLS with --cert/--key).
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsFiles,
        #[arg(long)]
        echo: bool,
    },
    /// Request/response round trips against an echo sink; one JSON line.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        tls: bool,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Bytes per request (and per response).
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// New TLS 1.3 sessions per second against an echo sink; one JSON line.
    Handshakes {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Resume from the previous session's ticket (else full handshakes).
        #[arg(long)]
        resume: bool,
        /// Count a session that fails and go on (else the first failure
        /// ends the run): the failover measurement.
        #[arg(long)]
        count_failures: bool,
    },
    /// Open idle sessions to an echo sink, print {"ready": n}, hold them
    /// until standard input closes.
    Hold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        tls: bool,
        #[arg(long)]
        connections: usize,
    },
    /// An SMTP next hop that accepts and discards every message (STARTTLS
    /// with --cert/--key).
    SmtpSink {
        #[arg(long)]
        listen: SocketAddr,
        #[command(flatten)]
        tls: TlsFiles,
    },
    /// Deliver messages over STARTTLS (or --plain), DATA or --bdat; one
    /// JSON line.
    Smtp {
        #[arg(long)]
        to: SocketAddr,
        /// Senders at once.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Messages per session.
        #[arg(long, default_value_t = 10)]
        messages: usize,
        /// Sessions each sender opens, one after the other.
        #[arg(long, default_value_t = 1)]
        sessions: usize,
        /// Bytes per message.
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long)]
        bdat: bool,
        /// No STARTTLS.
        #[arg(long)]
        plain: bool,
    },
    /// Send one message, printing the dialogue; exit 0 when it was
    /// accepted (2xx), 4 when deferred (4xx), 5 when refused (5xx).
    Mail {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        starttls: bool,
        #[arg(long, default_value = "postmaster@example.org")]
        rcpt: String,
    },
    /// Push bytes over many connections at once; print one JSON line.
    Blast {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        tls: bool,
        /// Offer only this cipher suite (e.g. TLS13_AES_128_GCM_SHA256).
        #[arg(long)]
        suite: Option<String>,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Bytes per connection.
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
    },
    /// Hold `connections` sessions through the relay (half TLS to an echo
    /// behind --tcp, half SMTP over STARTTLS to --smtp), each with traffic
    /// every --interval seconds, for --seconds; time fresh handshakes
    /// meanwhile. JSON lines: {"ready": …} when all are up, then totals.
    Soak(soak::Soak),
    /// An SMTP next hop that appends "<message-id> <attempt>" to --journal
    /// for each message it accepts, before its 250 (`cargo xtask chaos`).
    SmtpStore {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        journal: std::path::PathBuf,
    },
    /// A TCP upstream for `cargo xtask chaos`: serves downloads and takes
    /// uploads of a requested length, journalling uploads that ended
    /// cleanly short.
    TcpPeer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        journal: std::path::PathBuf,
    },
    /// Senders with a retry queue (4xx and no reply: retried) delivering
    /// new messages through --smtp until standard input closes, then the
    /// rest of their queue (for --drain seconds at most); one JSON line per
    /// attempt in --journal; TCP transfers through each --tcp meanwhile;
    /// totals at the end.
    ChaosSend(chaos::Senders),
    /// Write the benchmark certificate (bench.crt, bench.key, bench.pem).
    Certs {
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Send bytes through one session and check the echo.
    Send {
        #[arg(long)]
        to: SocketAddr,
        /// Start TLS (any certificate is accepted: this checks the relay's
        /// policy, not its identity).
        #[arg(long)]
        tls: bool,
        #[arg(long, default_value = "localhost")]
        sni: String,
        #[arg(long, default_value_t = 1 << 20)]
        bytes: usize,
    },
}

/// A server's certificate and key (both, or neither: plaintext).
#[derive(clap::Args)]
struct TlsFiles {
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    #[arg(long)]
    key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    fn pair(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        self.cert.as_deref().zip(self.key.as_deref())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Echo { listen } => echo_server(listen).await,
        Command::Sink { listen, tls, echo } => load::sink(listen, tls.pair(), echo).await,
        Command::Rr {
            to,
            tls,
            connections,
            size,
            seconds,
        } => {
            let out = load::request_response(to, tls, connections, size, seconds).await?;
            println!("{out}");
            Ok(())
        }
        Command::Handshakes {
            to,
            connections,
            seconds,
            resume,
            count_failures,
        } => {
            println!(
                "{}",
                load::handshakes(to, connections, seconds, resume, count_failures).await?
            );
            Ok(())
        }
        Command::Hold {
            to,
            tls,
            connections,
        } => load::hold(to, tls, connections).await,
        Command::SmtpSink { listen, tls } => smtp::sink(listen, tls.pair()).await,
        Command::Mail { to, starttls, rcpt } => {
            let reply = smtp::mail(to, starttls, &rcpt).await?;
            let code = match reply.as_bytes().first() {
                Some(b'2') => 0,
                Some(b'4') => 4,
                _ => 5,
            };
            std::process::exit(code);
        }
        Command::Smtp {
            to,
            connections,
            messages,
            sessions,
            size,
            bdat,
            plain,
        } => {
            let shape = smtp::LoadShape {
                senders: connections,
                sessions,
                messages,
                size,
                bdat,
                starttls: !plain,
            };
            println!("{}", smtp::load(to, shape).await?);
            Ok(())
        }
        Command::Blast {
            to,
            tls,
            suite,
            connections,
            bytes,
        } => {
            let suite = suite.as_deref();
            println!("{}", load::blast(to, tls, suite, connections, bytes).await?);
            Ok(())
        }
        Command::Certs { out } => load::certs(&out),
        Command::SmtpStore { listen, journal } => chaos::store(listen, &journal).await,
        Command::TcpPeer { listen, journal } => chaos::tcp_peer(listen, &journal).await,
        Command::ChaosSend(senders) => chaos::senders(senders).await,
        Command::Soak(opts) => soak::soak(opts).await,
        Command::Send {
            to,
            tls,
            sni,
            bytes,
        } => {
            let outcome = send(to, tls, &sni, bytes).await;
            match &outcome {
                Ok(line) => println!("{line}"),
                Err(e) => println!("{e:#}"),
            }
            // A refusal is an outcome, not a failure of this tool; the exit
            // status says whether the echo came back intact.
            std::process::exit(if outcome.is_ok() { 0 } else { 3 });
        }
    }
}

async fn echo_server(listen: SocketAddr) -> anyhow::Result<()> {
    let listener =
        load::listener(listen).with_context(|| format!("echo server cannot listen on {listen}"))?;
    println!("echo server listening on {listen}");
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn send(to: SocketAddr, tls: bool, sni: &str, bytes: usize) -> anyhow::Result<String> {
    let started = Instant::now();
    let tcp = TcpStream::connect(to)
        .await
        .with_context(|| format!("cannot connect to {to}"))?;
    tcp.set_nodelay(true)?;
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    if !tls {
        let back = roundtrip(tcp, &data).await?;
        return report(&data, &back, "plaintext", started);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(danger::AnyCertificate))
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake with the relay failed")?;
    let conn = stream.get_ref().1;
    let how = format!(
        "{:?} {}",
        conn.protocol_version().context("no version")?,
        conn.negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("?")
    );
    let back = roundtrip(stream, &data).await?;
    report(&data, &back, &how, started)
}

async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    data: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(data.len());
    let read = r.read_to_end(&mut back);
    let (written, read) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
            .await
            .context("no answer within 30 s")?;
    if let Err(e) = written.and(read) {
        if back.is_empty() {
            bail!("closed by the relay without a reply ({e})");
        }
    }
    Ok(back)
}

fn report(sent: &[u8], back: &[u8], how: &str, started: Instant) -> anyhow::Result<String> {
    if back.is_empty() {
        bail!("closed by the relay without a reply");
    }
    if back != sent {
        bail!(
            "echo differs: sent {} bytes, got {} back",
            sent.len(),
            back.len()
        );
    }
    Ok(format!(
        "{} bytes echoed intact over {how} in {:.1} ms",
        back.len(),
        started.elapsed().as_secs_f64() * 1000.0
    ))
}

mod danger {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// The demo's relay serves a self-signed certificate: accept it.
    #[derive(Debug)]
    pub struct AnyCertificate;

    fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    }

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    }
}
