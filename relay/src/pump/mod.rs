//! The data plane: moves bytes between a session's two legs until both sides
//! have closed, propagating half-close (FIN / close_notify) and resets.
//!
//! [`run`] is the one entry point sessions use. It hands every TLS leg to
//! kernel TLS when the kernel supports the negotiated version and cipher,
//! and then splices socket -> pipe -> socket without the bytes entering
//! userspace ([`splice`]); otherwise the legs' records are protected in this
//! process ([`soft_tls`], on the keys rustls hands over after the
//! handshake) and the bytes pumped through it ([`userspace`]). The choice
//! and its reason go into the report.

mod kernel_tls;
mod offload;
mod soft_tls;
mod splice;
use tlsrelay_sys::uring;
mod userspace;

pub use uring::{
    available as io_uring_available, set_workers as set_uring_workers,
    workers_replaced as uring_workers_replaced,
};

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::RecordIo;
pub use kernel_tls::KernelTls;
pub use offload::{leg_to_kernel, Handoff};
pub use soft_tls::SoftTls;

/// One side of a session after its handshake (if any).
pub enum Leg {
    Plain(TcpStream),
    /// The relay is the TLS server (client-facing leg).
    TlsServer(Box<tokio_rustls::server::TlsStream<RecordIo>>),
    /// The relay is the TLS client (upstream-facing leg).
    TlsClient(Box<tokio_rustls::client::TlsStream<RecordIo>>),
    /// Either, after its keys went to the kernel: plaintext in and out.
    Kernel(KernelTls),
    /// Either, its records protected by this process after the handshake
    /// (a leg the kernel could not take).
    Soft(Box<SoftTls>),
}

impl Leg {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Leg::Plain(s) => s,
            Leg::TlsServer(s) => s.get_ref().0.tcp(),
            Leg::TlsClient(s) => s.get_ref().0.tcp(),
            Leg::Kernel(s) => s.tcp(),
            Leg::Soft(s) => s.tcp(),
        }
    }

    /// The socket to splice from or into, when the leg's bytes on it are
    /// plaintext to the kernel's splice (plain TCP, or kernel TLS with
    /// nothing held back).
    pub fn splice_socket(&self) -> Option<&TcpStream> {
        match self {
            Leg::Plain(tcp) => Some(tcp),
            Leg::Kernel(k) if !k.has_pending() => Some(k.tcp()),
            _ => None,
        }
    }

    fn is_tls(&self) -> bool {
        !matches!(self, Leg::Plain(_))
    }

    /// Keeps the leg in userspace: reads stop respecting record boundaries.
    pub fn stay_in_userspace(&mut self) {
        match self {
            Leg::Plain(_) => {}
            Leg::TlsServer(s) => s.get_mut().0.pass_through(),
            Leg::TlsClient(s) => s.get_mut().0.pass_through(),
            Leg::Kernel(_) | Leg::Soft(_) => {}
        }
    }
}

pub use tlsrelay_sys::splice::{close_gracefully, reset_on_close};

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
            Leg::Kernel($s) => {
                let $s = Pin::new($s);
                $e
            }
            Leg::Soft($s) => {
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
            Leg::Kernel(s) => s.is_write_vectored(),
            Leg::Soft(_) => false,
        }
    }
}

pub use tlsrelay_core::config::SpliceEngine;
pub use tlsrelay_core::report::{DataPath, PumpEnd, Side};

#[derive(Clone, Debug, Serialize)]
pub struct PumpReport {
    pub path: DataPath,
    /// Legs whose TLS the kernel handled.
    pub ktls: Vec<Side>,
    /// Why the path is not the preferred one (TLS legs in userspace, or
    /// epoll where io_uring was configured).
    pub path_reason: Option<String>,
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub end: PumpEnd,
}

#[derive(Clone, Copy, Debug)]
pub struct PumpOptions {
    pub idle_timeout: Duration,
    /// Offer TLS legs to kernel TLS (when the kernel supports them).
    pub ktls: bool,
    pub engine: SpliceEngine,
}

/// Relays between `client` and `upstream` until both directions have ended.
pub async fn run(client: Leg, upstream: Leg, opts: PumpOptions) -> PumpReport {
    match offload::prepare(client, upstream, opts.ktls).await {
        offload::Prepared::Splice { client, upstream } => {
            let ktls = [(Side::Client, &client), (Side::Upstream, &upstream)]
                .into_iter()
                .filter(|(_, l)| l.ktls)
                .map(|(s, _)| s)
                .collect();
            let uring = match opts.engine {
                SpliceEngine::IoUring => {
                    uring::available().map_err(|e| format!("io_uring unavailable: {e}"))
                }
                SpliceEngine::Epoll => Err(String::new()),
            };
            let (path, (counts, end), path_reason) = match uring {
                Ok(()) => (
                    DataPath::SpliceIoUring,
                    uring::run(client, upstream, opts.idle_timeout).await,
                    None,
                ),
                Err(why) => (
                    DataPath::SpliceEpoll,
                    splice::run(client, upstream, opts.idle_timeout).await,
                    Some(why).filter(|w| !w.is_empty()),
                ),
            };
            PumpReport {
                path,
                ktls,
                path_reason,
                client_to_upstream: counts[0],
                upstream_to_client: counts[1],
                end,
            }
        }
        offload::Prepared::Userspace {
            client,
            upstream,
            reason,
        } => {
            let client = match offload::to_soft(client).await {
                Ok(leg) => leg,
                Err(detail) => return setup_failed(detail, upstream.tcp()),
            };
            let upstream = match offload::to_soft(upstream).await {
                Ok(leg) => leg,
                Err(detail) => return setup_failed(detail, client.tcp()),
            };
            let (counts, end) = userspace::run(client, upstream, opts.idle_timeout).await;
            PumpReport {
                path: DataPath::Userspace,
                ktls: Vec::new(),
                path_reason: reason,
                client_to_upstream: counts[0],
                upstream_to_client: counts[1],
                end,
            }
        }
        offload::Prepared::Failed { detail } => PumpReport {
            path: DataPath::SpliceEpoll,
            ktls: Vec::new(),
            path_reason: None,
            client_to_upstream: 0,
            upstream_to_client: 0,
            end: PumpEnd::SetupFailed { detail },
        },
    }
}

/// A session lost while its legs were being prepared: the other leg is
/// reset, so its peer does not take the end for a clean one.
fn setup_failed(detail: String, other: &TcpStream) -> PumpReport {
    reset_on_close(other);
    PumpReport {
        path: DataPath::Userspace,
        ktls: Vec::new(),
        path_reason: None,
        client_to_upstream: 0,
        upstream_to_client: 0,
        end: PumpEnd::SetupFailed { detail },
    }
}

/// Byte counters for the two directions: `[client->upstream, upstream->client]`.
type Counts = [AtomicU64; 2];

/// Runs both directions of a session to their end, or until one fails or the
/// session is idle too long. A direction's error names the side whose
/// socket failed.
async fn drive<U, D>(up: U, down: D, activity: &Activity, idle: Duration) -> PumpEnd
where
    U: Future<Output = Result<(), (Side, io::Error)>>,
    D: Future<Output = Result<(), (Side, io::Error)>>,
{
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let result = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; r }
            r = &mut down, if !down_done => { down_done = true; r }
            () = activity.idle_for(idle) => return PumpEnd::IdleTimeout,
        };
        if let Err((side, err)) = result {
            return PumpEnd::Reset {
                side,
                detail: err.to_string(),
            };
        }
        if up_done && down_done {
            return PumpEnd::Closed;
        }
    }
}

fn load(counts: &Counts) -> [u64; 2] {
    [
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    ]
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
