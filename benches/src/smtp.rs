//! SMTP load: a next hop that accepts every message and discards it, and a
//! sender that delivers N messages of S bytes over STARTTLS per connection,
//! with DATA or BDAT, timing each message from MAIL to the final reply.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Accepts every message (STARTTLS with `tls`, CHUNKING, PIPELINING: each
/// command line answered in turn) and discards it.
pub async fn sink(listen: SocketAddr, tls: Option<(&Path, &Path)>) -> anyhow::Result<()> {
    let acceptor = match tls {
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(crate::load::server_config(
            cert, key,
        )?)),
        None => None,
    };
    let listener = crate::load::listener(listen)
        .with_context(|| format!("SMTP sink cannot listen on {listen}"))?;
    println!("SMTP sink listening on {listen}");
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(Some(tcp)) = serve(tcp, true, acceptor.is_some()).await {
                if let Ok(tls) = acceptor.expect("offered only with TLS").accept(tcp).await {
                    let _ = serve(tls, false, false).await;
                }
            }
        });
    }
}

/// One SMTP dialogue (`greet`: a new connection, not the one after
/// STARTTLS); returns the stream when the client started TLS.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    greet: bool,
    offer_starttls: bool,
) -> std::io::Result<Option<S>> {
    let mut s = BufReader::new(stream);
    if greet {
        s.write_all(b"220 sink.bench.test ESMTP\r\n").await?;
        s.flush().await?;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        if s.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        let upper = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            if offer_starttls {
                b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-SIZE 104857600\r\n250 STARTTLS\r\n"
            } else {
                b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SIZE 104857600\r\n"
            }
        } else if upper.starts_with("STARTTLS") && offer_starttls {
            s.write_all(b"220 2.0.0 go ahead\r\n").await?;
            s.flush().await?;
            return Ok(Some(s.into_inner()));
        } else if upper.starts_with("DATA") {
            s.write_all(b"354 end with .\r\n").await?;
            s.flush().await?;
            loop {
                line.clear();
                if s.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(None);
                }
                if line == b".\r\n" {
                    break;
                }
            }
            b"250 2.0.0 Ok: queued\r\n"
        } else if let Some(args) = upper.strip_prefix("BDAT ") {
            let size: u64 = args
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            tokio::io::copy(&mut (&mut s).take(size), &mut tokio::io::sink()).await?;
            if upper.contains("LAST") {
                b"250 2.0.0 Ok: queued\r\n"
            } else {
                b"250 2.0.0 chunk accepted\r\n"
            }
        } else if upper.starts_with("QUIT") {
            s.write_all(b"221 2.0.0 bye\r\n").await?;
            s.flush().await?;
            return Ok(None);
        } else {
            b"250 2.0.0 Ok\r\n"
        };
        s.write_all(reply).await?;
        s.flush().await?;
    }
}

/// A message of about `size` bytes: headers, then 78-byte lines that never
/// start with a dot.
pub(crate) fn message(size: usize) -> Vec<u8> {
    let mut m = b"From: load@sender.test\r\nTo: sink@bench.test\r\nSubject: bench\r\n\r\n".to_vec();
    let line = [b"x".repeat(76), b"\r\n".to_vec()].concat();
    while m.len() < size {
        m.extend_from_slice(&line);
    }
    m
}

/// How long the load waits for any one reply.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads one (possibly multi-line) reply; fails unless its code starts
/// with `class`.
pub(crate) async fn expect<S: AsyncRead + Unpin>(
    s: &mut BufReader<S>,
    class: u8,
) -> anyhow::Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        // A server that never answers (a connection its listener's full
        // backlog dropped after the handshake) fails the run, not hangs it.
        let read = tokio::time::timeout(REPLY_TIMEOUT, s.read_line(&mut line))
            .await
            .with_context(|| format!("no {}xx reply within {REPLY_TIMEOUT:?}", class as char))?;
        if read? == 0 {
            bail!(
                "connection closed while waiting for a {}xx reply",
                class as char
            );
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    if line.as_bytes().first() != Some(&class) {
        bail!("expected {}xx, got {:?}", class as char, line.trim_end());
    }
    Ok(())
}

pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    command: &[u8],
    class: u8,
) -> anyhow::Result<()> {
    // TLS streams may hold written bytes until flushed.
    s.get_mut().write_all(command).await?;
    s.get_mut().flush().await?;
    expect(s, class).await
}

/// What [`load`] sends.
pub struct LoadShape {
    /// Senders at once, each a task.
    pub senders: usize,
    /// Sessions each sender opens, one after the other.
    pub sessions: usize,
    /// Messages per session.
    pub messages: usize,
    /// Bytes per message.
    pub size: usize,
    pub bdat: bool,
    pub starttls: bool,
}

/// Delivers `shape`'s messages; message round trips as latency
/// percentiles, messages/s and Gbit/s of message bytes.
pub async fn load(to: SocketAddr, shape: LoadShape) -> anyhow::Result<serde_json::Value> {
    let body = Arc::new(message(shape.size));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..shape.senders {
        let body = body.clone();
        let (sessions, messages, bdat, starttls) =
            (shape.sessions, shape.messages, shape.bdat, shape.starttls);
        tasks.spawn(async move {
            let mut h = Histogram::<u64>::new(3)?;
            for _ in 0..sessions {
                let tcp = TcpStream::connect(to).await?;
                tcp.set_nodelay(true)?;
                let mut s = BufReader::new(tcp);
                expect(&mut s, b'2').await?;
                send(&mut s, b"EHLO load.bench.test\r\n", b'2').await?;
                if !starttls {
                    session(&mut s, &body, messages, bdat, &mut h).await?;
                    continue;
                }
                send(&mut s, b"STARTTLS\r\n", b'2').await?;
                let name = rustls::pki_types::ServerName::try_from("bench.test")?;
                let tls = crate::load::connector()
                    .connect(name, s.into_inner())
                    .await
                    .context("STARTTLS handshake")?;
                let mut s = BufReader::new(tls);
                send(&mut s, b"EHLO load.bench.test\r\n", b'2').await?;
                session(&mut s, &body, messages, bdat, &mut h).await?;
            }
            anyhow::Ok(h)
        });
    }
    let all = crate::load::merged(tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = all.len() as f64 * body.len() as f64;
    let mut out = crate::load::percentiles(&all);
    out["messages"] = all.len().into();
    out["messages_per_s"] = (all.len() as f64 / seconds).into();
    out["bytes"] = bytes.into();
    out["gbit_per_s"] = (bytes * 8.0 / seconds / 1e9).into();
    Ok(out)
}

/// `messages` transactions, each timed from MAIL to its final reply, then
/// QUIT.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    body: &[u8],
    messages: usize,
    bdat: bool,
    h: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    for _ in 0..messages {
        let t0 = Instant::now();
        send(s, b"MAIL FROM:<load@sender.test>\r\n", b'2').await?;
        send(s, b"RCPT TO:<sink@bench.test>\r\n", b'2').await?;
        if bdat {
            let head = format!("BDAT {} LAST\r\n", body.len());
            s.get_mut().write_all(head.as_bytes()).await?;
            send(s, body, b'2').await?;
        } else {
            send(s, b"DATA\r\n", b'3').await?;
            s.get_mut().write_all(body).await?;
            send(s, b".\r\n", b'2').await?;
        }
        h.record(t0.elapsed().as_micros() as u64)?;
    }
    send(s, b"QUIT\r\n", b'2').await
}

/// Sends one command line (or, with `None`, nothing) and reads the reply,
/// printing both as `C:` and `S:` lines; the reply's last line.
async fn say<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    command: Option<&str>,
) -> anyhow::Result<String> {
    if let Some(command) = command {
        println!("C: {command}");
        s.get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        s.get_mut().flush().await?;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line).await? == 0 {
            bail!("connection closed while waiting for a reply");
        }
        println!("S: {}", line.trim_end());
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.trim_end().to_string());
        }
    }
}

/// The rest of a mail dialogue once greeted (and secured): MAIL, RCPT,
/// DATA and QUIT; the reply that decided the message.
async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    rcpt: &str,
) -> anyhow::Result<String> {
    say(s, Some("MAIL FROM:<demo@sender.example>")).await?;
    let reply = say(s, Some(&format!("RCPT TO:<{rcpt}>"))).await?;
    if !reply.starts_with('2') {
        say(s, Some("QUIT")).await?;
        return Ok(reply);
    }
    say(s, Some("DATA")).await?;
    let body = format!("From: demo@sender.example\r\nTo: {rcpt}\r\nSubject: tlsrelay demo\r\n\r\nHello through the mail edge.\r\n.");
    let reply = say(s, Some(&body)).await?;
    say(s, Some("QUIT")).await?;
    Ok(reply)
}

/// One message to `rcpt`, over STARTTLS when `starttls`, its dialogue
/// printed; the reply that decided it.
pub async fn mail(to: SocketAddr, starttls: bool, rcpt: &str) -> anyhow::Result<String> {
    let tcp = TcpStream::connect(to).await?;
    let mut s = BufReader::new(tcp);
    say(&mut s, None).await?;
    say(&mut s, Some("EHLO demo.client.example")).await?;
    if !starttls {
        return transaction(&mut s, rcpt).await;
    }
    say(&mut s, Some("STARTTLS")).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let tls = crate::load::connector()
        .connect(name, s.into_inner())
        .await
        .context("STARTTLS handshake")?;
    println!("   (TLS established)");
    let mut s = BufReader::new(tls);
    say(&mut s, Some("EHLO demo.client.example")).await?;
    transaction(&mut s, rcpt).await
}
