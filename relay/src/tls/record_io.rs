//! A TCP stream that, during the handshake, hands rustls whole TLS records
//! only, one at a time.
//!
//! rustls reads greedily; bytes it has read past the handshake would be lost
//! when its secrets are extracted for kernel TLS. Feeding it whole records
//! means that after the handshake nothing is left half-read: every record
//! rustls saw is fully processed (application data among them is drained as
//! plaintext), and everything else is still in the kernel's socket buffer
//! for kTLS to decrypt. Once a leg stays in userspace the stream switches to
//! plain pass-through reads.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tlsrelay_sys::read_buf::poll_read_append;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use tlsrelay_sys::ktls::SecretCapture;

const HEADER: usize = 5;
/// Largest record a conforming peer sends: 2^14 plaintext plus expansion.
const MAX_RECORD: usize = HEADER + 16384 + 2048;

pub struct RecordIo {
    tcp: TcpStream,
    bounded: bool,
    /// The record being assembled: `buf[..filled]`, `buf.len()` once the
    /// header is known.
    buf: Vec<u8>,
    filled: usize,
    header_parsed: bool,
    /// How much of a complete record has been handed to rustls.
    delivered: usize,
    /// Pass-through read-ahead: one large read from the socket, handed to
    /// rustls in the 4 KiB pieces it asks for (a recv per piece was four
    /// syscalls per record). Unallocated while the socket has nothing.
    ahead: Vec<u8>,
    ahead_pos: usize,
    /// This connection's TLS 1.3 traffic secrets, logged by rustls during
    /// the handshake, for kernel TLS to follow KeyUpdates.
    secrets: Option<Arc<SecretCapture>>,
    /// Whole records already read off the socket (a ClientHello read to
    /// route the connection), handed to rustls before the socket's.
    prefix: Unread,
}

/// Bytes already off the socket, handed to reads before the socket's:
/// freed once all are out.
#[derive(Default)]
pub(crate) struct Unread {
    bytes: Vec<u8>,
    at: usize,
}

impl Unread {
    pub(crate) fn new(bytes: Vec<u8>) -> Unread {
        Unread { bytes, at: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.at == self.bytes.len()
    }

    /// Copies what fits into `out`; false if there was nothing.
    pub(crate) fn read_into(&mut self, out: &mut ReadBuf<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let n = out.remaining().min(self.bytes.len() - self.at);
        out.put_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        if self.is_empty() {
            *self = Unread::default();
        }
        true
    }

    /// What is not yet read.
    pub(crate) fn into_rest(mut self) -> Vec<u8> {
        self.bytes.split_off(self.at)
    }
}

/// How much one pass-through read takes from the socket.
const READ_AHEAD: usize = 64 * 1024;

/// A fill at least this large (the largest record) keeps the read-ahead
/// buffer across waits.
const KEEP_AFTER: usize = MAX_RECORD;

impl RecordIo {
    pub fn new(tcp: TcpStream) -> RecordIo {
        RecordIo {
            tcp,
            bounded: true,
            buf: vec![0; HEADER],
            filled: 0,
            header_parsed: false,
            delivered: 0,
            ahead: Vec::new(),
            ahead_pos: 0,
            secrets: None,
            prefix: Unread::default(),
        }
    }

    /// Reads `records` (whole TLS records) before the socket.
    pub fn after(mut self, records: Vec<u8>) -> RecordIo {
        self.prefix = Unread::new(records);
        self
    }

    /// A connection whose handshake logs its secrets into `capture`.
    pub fn capturing(tcp: TcpStream, capture: Arc<SecretCapture>) -> RecordIo {
        RecordIo {
            secrets: Some(capture),
            ..RecordIo::new(tcp)
        }
    }

    pub fn secret_capture(&self) -> Option<Arc<SecretCapture>> {
        self.secrets.clone()
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// From now on reads go straight to the socket (userspace TLS).
    pub fn pass_through(&mut self) {
        self.bounded = false;
    }

    fn complete(&self) -> bool {
        self.header_parsed && self.filled == self.buf.len()
    }

    /// Accounts for `n` more bytes read into the record.
    fn advance(&mut self, n: usize) {
        self.filled += n;
        if !self.header_parsed && self.filled == HEADER {
            // Not a TLS record header (content type 20-24, version 3.x):
            // hand rustls the header alone so it fails now, rather than
            // waiting for a "length" read from garbage.
            let tls = (20..=24).contains(&self.buf[0]) && self.buf[1] == 3;
            let len = u16::from_be_bytes([self.buf[3], self.buf[4]]) as usize;
            if tls {
                self.buf.resize((HEADER + len).min(MAX_RECORD), 0);
            }
            self.header_parsed = true;
        }
    }

    fn reset(&mut self) {
        self.buf.truncate(HEADER);
        self.filled = 0;
        self.delivered = 0;
        self.header_parsed = false;
    }

    /// Ends record-bounded reading for kTLS: returns the socket and the rest
    /// of any record rustls has not yet seen in full, which must be given to
    /// rustls before its secrets are extracted.
    pub async fn into_parts(mut self) -> io::Result<(TcpStream, Option<Vec<u8>>)> {
        if !self.prefix.is_empty() {
            // Records read before the handshake that rustls has not seen:
            // they come before anything on the socket.
            if self.filled != 0 {
                return Err(io::Error::other("a record read past records held back"));
            }
            return Ok((self.tcp, Some(self.prefix.into_rest())));
        }
        if self.filled == 0 {
            return Ok((self.tcp, None));
        }
        // A record partly read from the socket: finish it.
        while !self.complete() {
            let end = self.buf.len();
            let n = self.tcp.read(&mut self.buf[self.filled..end]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.advance(n);
        }
        Ok((self.tcp, Some(self.buf[self.delivered..].to_vec())))
    }
}

impl RecordIo {
    /// Pass-through read: from the read-ahead buffer, refilled with one
    /// large read when empty.
    fn poll_read_ahead(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.ahead_pos == self.ahead.len() {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut self.tcp).poll_read(cx, out);
            }
            let last_fill = self.ahead.len();
            self.ahead.clear();
            self.ahead_pos = 0;
            self.ahead.reserve_exact(READ_AHEAD);
            let read = poll_read_append(Pin::new(&mut self.tcp), cx, &mut self.ahead, READ_AHEAD);
            match read {
                Poll::Ready(Ok(_)) => {}
                other => {
                    // Waiting with nothing buffered: a stream that last
                    // brought a largest record or more keeps its buffer (no
                    // allocation per drain while bytes flow); one that
                    // brought less, or failed, holds none while it waits.
                    if last_fill < KEEP_AFTER || !matches!(other, Poll::Pending) {
                        self.ahead = Vec::new();
                    }
                    return other.map_ok(|_| ());
                }
            }
        }
        let n = out.remaining().min(self.ahead.len() - self.ahead_pos);
        out.put_slice(&self.ahead[self.ahead_pos..self.ahead_pos + n]);
        self.ahead_pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for RecordIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.read_into(out) {
            return Poll::Ready(Ok(()));
        }
        if !this.bounded && this.filled == 0 {
            // The record buffer is done with: an idle session keeps none.
            if this.buf.capacity() > 0 {
                this.buf = Vec::new();
            }
            return this.poll_read_ahead(cx, out);
        }
        loop {
            if this.complete() {
                let n = out.remaining().min(this.filled - this.delivered);
                out.put_slice(&this.buf[this.delivered..this.delivered + n]);
                this.delivered += n;
                if this.delivered == this.filled {
                    this.reset();
                }
                return Poll::Ready(Ok(()));
            }
            let end = this.buf.len();
            let mut chunk = ReadBuf::new(&mut this.buf[this.filled..end]);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut chunk))?;
            let n = chunk.filled().len();
            if n == 0 {
                return match this.filled {
                    0 => Poll::Ready(Ok(())), // clean EOF between records
                    _ => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                };
            }
            this.advance(n);
        }
    }
}

impl AsyncWrite for RecordIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
