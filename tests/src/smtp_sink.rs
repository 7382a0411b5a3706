//! A small SMTP next hop for tests: greets, offers STARTTLS (with a
//! certificate from the test PKI) and CHUNKING as told, accepts DATA and
//! BDAT, and records every message it accepted. Written independently of
//! the relay's own codec so the two check each other.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpListener;

/// What the sink received in one accepted transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub from: String,
    pub recipients: Vec<String>,
    /// The message as delivered (dot-unstuffed, without the terminator),
    /// less the relay's Received field at its head.
    pub body: Vec<u8>,
    /// That Received field (`Received: from … by … (tlsrelay) …`), folded
    /// lines and all, if the message started with one.
    pub trace: Option<String>,
    pub over_tls: bool,
    pub via_bdat: bool,
}

#[derive(Clone)]
pub struct SinkOptions {
    /// Offer STARTTLS with this server config.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub chunking: bool,
    /// Recipients containing this are refused with 550.
    pub refuse_marker: &'static str,
    /// Offer REQUIRETLS (RFC 8689) after STARTTLS.
    pub requiretls: bool,
}

/// A plaintext next hop without CHUNKING that refuses recipients named
/// "nobody".
impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            tls: None,
            chunking: false,
            refuse_marker: "nobody",
            requiretls: false,
        }
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Every byte the sink read, across its connections, as plaintext
    /// (after STARTTLS: decrypted): exactly what a next hop would parse.
    pub wire: Arc<Mutex<Vec<u8>>>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
}

impl Sink {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn wire(&self) -> Vec<u8> {
        self.wire.lock().unwrap().clone()
    }
}

pub async fn smtp_sink(opts: SinkOptions) -> Sink {
    smtp_sink_at("127.0.0.1:0".parse().unwrap(), opts).await
}

/// A sink listening on `addr` (an MX host's address and port).
pub async fn smtp_sink_at(addr: SocketAddr, opts: SinkOptions) -> Sink {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let wire = Arc::new(Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (store, record, count) = (received.clone(), wire.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let opts = opts.clone();
            let store = store.clone();
            let wire = record.clone();
            tokio::spawn(async move {
                let _ = serve(tcp, wire, opts, store).await;
            });
        }
    });
    Sink {
        addr,
        received,
        wire,
        connections,
    }
}

/// Appends what is read through it to `wire` while `on` (the recorder
/// under the TLS layer is switched off at STARTTLS and a new one goes
/// above it, so only plaintext is recorded).
struct Recorder<T> {
    inner: T,
    wire: Arc<Mutex<Vec<u8>>>,
    on: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> Recorder<T> {
    fn new(inner: T, wire: Arc<Mutex<Vec<u8>>>) -> Recorder<T> {
        Recorder {
            inner,
            wire,
            on: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Recorder<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), true) = (&poll, this.on.load(Ordering::SeqCst)) {
            this.wire
                .lock()
                .unwrap()
                .extend_from_slice(&buf.filled()[before..]);
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recorder<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn serve(
    tcp: tokio::net::TcpStream,
    wire: Arc<Mutex<Vec<u8>>>,
    opts: SinkOptions,
    store: Arc<Mutex<Vec<Received>>>,
) -> std::io::Result<()> {
    let plain = Recorder::new(tcp, wire.clone());
    let plain_on = plain.on.clone();
    let mut stream: BufReader<Box<dyn Io>> = BufReader::new(Box::new(plain));
    let mut tls = false;
    stream
        .get_mut()
        .write_all(b"220 sink.test ESMTP test sink\r\n")
        .await?;
    let mut current: Option<Received> = None;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.trim_end().to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut caps = vec!["sink.test", "PIPELINING", "8BITMIME"];
            if opts.chunking {
                caps.push("CHUNKING");
            }
            if opts.tls.is_some() && !tls {
                caps.push("STARTTLS");
            }
            if opts.requiretls && tls {
                caps.push("REQUIRETLS");
            }
            let n = caps.len();
            caps.iter()
                .enumerate()
                .map(|(i, c)| format!("250{}{c}\r\n", if i + 1 == n { ' ' } else { '-' }))
                .collect()
        } else if upper == "STARTTLS" && opts.tls.is_some() && !tls {
            stream
                .get_mut()
                .write_all(b"220 2.0.0 go ahead\r\n")
                .await?;
            let inner = stream.into_inner();
            let acceptor = tokio_rustls::TlsAcceptor::from(opts.tls.clone().unwrap());
            plain_on.store(false, Ordering::SeqCst);
            let tls_stream = acceptor.accept(inner).await?;
            stream = BufReader::new(Box::new(Recorder::new(tls_stream, wire.clone())));
            tls = true;
            current = None;
            continue;
        } else if upper.starts_with("MAIL FROM:") {
            current = Some(Received {
                from: path(&line),
                recipients: Vec::new(),
                body: Vec::new(),
                trace: None,
                over_tls: tls,
                via_bdat: false,
            });
            "250 2.1.0 ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            let to = path(&line);
            match current.as_mut() {
                Some(_) if to.contains(opts.refuse_marker) => "550 5.1.1 no such user\r\n".into(),
                Some(t) => {
                    t.recipients.push(to);
                    "250 2.1.5 ok\r\n".into()
                }
                None => "503 5.5.1 need MAIL\r\n".into(),
            }
        } else if upper == "DATA" {
            stream.get_mut().write_all(b"354 go ahead\r\n").await?;
            let mut body = Vec::new();
            loop {
                let mut l = Vec::new();
                if stream.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                if l.starts_with(b".") {
                    l.remove(0);
                }
                body.extend_from_slice(&l);
            }
            match current.take() {
                Some(mut t) => {
                    t.body = body;
                    t.take_trace();
                    store.lock().unwrap().push(t);
                    "250 2.0.0 Ok: queued as SINK\r\n".into()
                }
                None => "503 5.5.1 need MAIL\r\n".into(),
            }
        } else if upper.starts_with("BDAT ") {
            let mut words = upper.split_whitespace().skip(1);
            let size: usize = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let last = words.next() == Some("LAST");
            let mut chunk = vec![0u8; size];
            stream.read_exact(&mut chunk).await?;
            match current.as_mut() {
                Some(t) => {
                    t.body.extend_from_slice(&chunk);
                    t.via_bdat = true;
                    if last {
                        let mut t = current.take().unwrap();
                        t.take_trace();
                        store.lock().unwrap().push(t);
                        "250 2.0.0 Ok: queued as SINK\r\n".into()
                    } else {
                        "250 2.0.0 chunk ok\r\n".into()
                    }
                }
                None => "503 5.5.1 need MAIL\r\n".into(),
            }
        } else if upper == "RSET" {
            current = None;
            "250 2.0.0 ok\r\n".into()
        } else if upper == "QUIT" {
            stream.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "502 5.5.1 not here\r\n".into()
        };
        stream.get_mut().write_all(reply.as_bytes()).await?;
    }
}

impl Received {
    /// Moves the relay's Received field (the first field, with its
    /// folded lines, naming tlsrelay) from the body to `trace`.
    fn take_trace(&mut self) {
        if !self.body.starts_with(b"Received: from ") {
            return;
        }
        let mut end = 0;
        loop {
            let Some(eol) = self.body[end..].windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            end += eol + 2;
            if !matches!(self.body.get(end), Some(b' ' | b'\t')) {
                break;
            }
        }
        let field = String::from_utf8_lossy(&self.body[..end]).into_owned();
        if field.contains(" (tlsrelay) with ") {
            self.trace = Some(field);
            self.body.drain(..end);
        }
    }
}

fn path(line: &str) -> String {
    let start = line.find('<').map_or(0, |i| i + 1);
    let end = line[start..].find('>').map_or(line.len(), |i| start + i);
    line[start..end].to_string()
}
