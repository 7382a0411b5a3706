//! The userspace pump: rustls (via tokio-rustls) encrypts and decrypts in
//! this process. The fallback when the kernel cannot take a TLS leg.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::{drive, load, Activity, Counts, Leg, PumpEnd, Side};

/// Per-direction buffer while bytes flow: four TLS records' worth of
/// plaintext, reused for every chunk.
const BUFFER_SIZE: usize = 64 * 1024;

/// The plaintext of a full TLS record.
const RECORD: usize = 16 * 1024;

/// What a direction holds while idle: an idle session keeps two of these,
/// not two full buffers. The first read to fill it brings the full one.
const IDLE_BUFFER_SIZE: usize = 512;

/// Without a byte for this long, a direction gives its full buffer back.
const IDLE_AFTER: Duration = Duration::from_secs(1);

pub(super) async fn run(client: Leg, upstream: Leg, idle: Duration) -> ([u64; 2], PumpEnd) {
    let activity = Activity::new();
    let counts: Counts = [AtomicU64::new(0), AtomicU64::new(0)];
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
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
    let end = drive(up, down, &activity, idle).await;
    let client = client_read.unsplit(client_write);
    let upstream = upstream_read.unsplit(upstream_write);
    // Propagate a reset: the side that did not fail is aborted too, so its
    // peer learns the stream is incomplete instead of seeing a clean end.
    for (leg, leg_side) in [(&client, Side::Client), (&upstream, Side::Upstream)] {
        match &end {
            PumpEnd::Reset { side, .. } => {
                let ktls = matches!(leg, Leg::Kernel(_));
                tlsrelay_sys::splice::abort(leg.tcp(), ktls, *side != leg_side).await;
            }
            PumpEnd::Closed => super::close_gracefully(leg.tcp()),
            _ => {}
        }
    }
    (load(&counts), end)
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
    let mut buf = vec![0u8; IDLE_BUFFER_SIZE];
    loop {
        let read = if buf.len() > IDLE_BUFFER_SIZE {
            // Polls the read first: the timer only starts when it waits.
            match tokio::time::timeout(IDLE_AFTER, reader.read(&mut buf)).await {
                Ok(read) => read,
                Err(_) => {
                    buf = vec![0u8; IDLE_BUFFER_SIZE];
                    continue;
                }
            }
        } else {
            reader.read(&mut buf).await
        };
        let mut n = match read {
            Ok(0) => break,
            Ok(n) => n,
            // TCP FIN without close_notify: the peer is done, but did not say
            // so in TLS. Treat as end of stream, as HTTP and SMTP peers do.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err((sides[0], e)),
        };
        // A TLS read returns one record; after a full one, take what else
        // is ready now, so the writer gets one large write (on a TLS
        // writer, several records in one vectored write) instead of one
        // per record. Not after a short read: that was the whole message,
        // and asking again would cost a read that finds nothing. The end
        // is met again by the next read; an error is kept for after the
        // bytes before it are written.
        let mut failed = None;
        let mut last = n;
        while last >= RECORD && n < buf.len() {
            let mut more = ReadBuf::new(&mut buf[n..]);
            let ready = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut *reader).poll_read(cx, &mut more))
            })
            .await;
            match ready {
                Poll::Ready(Ok(())) if !more.filled().is_empty() => {
                    last = more.filled().len();
                    n += last;
                }
                Poll::Ready(Err(e)) if e.kind() != io::ErrorKind::UnexpectedEof => {
                    failed = Some(e);
                    break;
                }
                _ => break,
            }
        }
        activity.touch();
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|e| (sides[1], e))?;
        writer.flush().await.map_err(|e| (sides[1], e))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(e) = failed {
            return Err((sides[0], e));
        }
        if n == buf.len() && buf.len() < BUFFER_SIZE {
            buf = vec![0u8; BUFFER_SIZE]; // bytes are flowing
        }
    }
    writer.shutdown().await.map_err(|e| (sides[1], e))
}
