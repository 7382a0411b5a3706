//! The data plane: moves bytes between a session's two legs until both sides
//! have closed, propagating half-close (FIN / close_notify) and resets.
//!
//! [`relay`] is the one entry point sessions use. Today every leg goes
//! through the userspace pump (rustls encrypts and decrypts in this process);
//! the kTLS + io_uring splice path plugs in behind the same call.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Per-direction buffer: one TLS record's worth of plaintext, allocated once
/// per session and reused for every chunk.
const BUFFER_SIZE: usize = 16 * 1024;

/// One side of a session after its handshake (if any).
pub enum Leg {
    Plain(TcpStream),
    /// The relay is the TLS server (client-facing leg).
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The relay is the TLS client (upstream-facing leg).
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Leg {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Leg::Plain(s) => s,
            Leg::TlsServer(s) => s.get_ref().0,
            Leg::TlsClient(s) => s.get_ref().0,
        }
    }

    /// Aborts the TCP connection with a RST instead of a FIN when dropped.
    fn reset_on_drop(&self) {
        let _ = socket2::SockRef::from(self.tcp()).set_linger(Some(Duration::ZERO));
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Leg::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Leg::TlsServer($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Leg::TlsClient($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Leg {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Leg {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Leg::Plain(s) => s.is_write_vectored(),
            Leg::TlsServer(s) => s.is_write_vectored(),
            Leg::TlsClient(s) => s.is_write_vectored(),
        }
    }
}

/// Which way the bytes went through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// rustls in this process encrypts/decrypts; tokio moves the bytes.
    Userspace,
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataPath::Userspace => "userspace",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Client,
    Upstream,
}

/// How the relaying ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "kebab-case")]
pub enum PumpEnd {
    /// Both sides closed (FIN or close_notify) and everything was delivered.
    Closed,
    /// One side reset (or failed); the other was reset in turn.
    Reset { side: Side, detail: String },
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
}

#[derive(Clone, Debug, Serialize)]
pub struct PumpReport {
    pub path: DataPath,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub end: PumpEnd,
}

/// Relays between `client` and `upstream` until both directions have ended.
pub async fn relay(client: Leg, upstream: Leg, idle_timeout: Duration) -> PumpReport {
    let activity = Activity::new();
    let counts = [AtomicU64::new(0), AtomicU64::new(0)];
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let end = {
        let up = copy_half(
            &mut client_read,
            &mut upstream_write,
            [Side::Client, Side::Upstream],
            &counts[0],
            &activity,
        );
        let down = copy_half(
            &mut upstream_read,
            &mut client_write,
            [Side::Upstream, Side::Client],
            &counts[1],
            &activity,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let result = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r }
                r = &mut down, if !down_done => { down_done = true; r }
                () = activity.idle_for(idle_timeout) => break PumpEnd::IdleTimeout,
            };
            if let Err((side, err)) = result {
                break PumpEnd::Reset {
                    side,
                    detail: err.to_string(),
                };
            }
            if up_done && down_done {
                break PumpEnd::Closed;
            }
        }
    };
    let client = client_read.unsplit(client_write);
    let upstream = upstream_read.unsplit(upstream_write);
    // Propagate a reset: the side that did not fail is aborted too, so its
    // peer learns the stream is incomplete instead of seeing a clean end.
    if let PumpEnd::Reset { side, .. } = &end {
        match side {
            Side::Client => upstream.reset_on_drop(),
            Side::Upstream => client.reset_on_drop(),
        }
    }
    PumpReport {
        path: DataPath::Userspace,
        client_to_upstream: counts[0].load(Ordering::Relaxed),
        upstream_to_client: counts[1].load(Ordering::Relaxed),
        end,
    }
}

/// Copies one direction; at EOF shuts the writer down (half-close). An error
/// names the side whose socket failed: `sides` is `[reader, writer]`.
async fn copy_half<R, W>(
    reader: &mut R,
    writer: &mut W,
    sides: [Side; 2],
    count: &AtomicU64,
    activity: &Activity,
) -> Result<(), (Side, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            // TCP FIN without close_notify: the peer is done, but did not say
            // so in TLS. Treat as end of stream, as HTTP and SMTP peers do.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err((sides[0], e)),
        };
        activity.touch();
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|e| (sides[1], e))?;
        writer.flush().await.map_err(|e| (sides[1], e))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
    writer.shutdown().await.map_err(|e| (sides[1], e))
}

/// When bytes last moved, shared by both directions of a session.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self.start + last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}
