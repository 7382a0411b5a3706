//! A TLS leg the kernel could not take, its records protected in this
//! process ([`crate::tls::records`]) once rustls finished the handshake:
//! read and written as plaintext by the userspace pump, as a kernel TLS
//! leg would be. Records are read off the socket many at a time, opened in
//! place and handed out from there; sealed records go out in batches.
//! Post-handshake records are decided as on the kernel path: close_notify
//! ends the stream, session tickets are skipped, a KeyUpdate is followed
//! (and answered when asked), any other alert is an error.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tlsrelay_sys::read_buf::poll_read_append;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::records::{
    self, Opener, RecordError, Sealer, CONTENT_ALERT, CONTENT_APPLICATION_DATA, CONTENT_HANDSHAKE,
    MAX_PLAINTEXT, MAX_RECORD,
};
use crate::tls::Unread;
use tlsrelay_sys::ktls::{self, PostHandshake, Rekey};

/// One read from the socket takes up to this much: four full records.
const READ_SIZE: usize = 2 * MAX_RECORD;

/// Plaintext sealed per write call: what the pump hands over at once.
const WRITE_BATCH: usize = 4 * MAX_PLAINTEXT;

/// A fill at least this large keeps the receive buffer across waits (bytes
/// are flowing); a smaller one gives it back while the leg waits.
const KEEP_AFTER: usize = MAX_RECORD;

pub struct SoftTls {
    tcp: TcpStream,
    opener: Opener,
    sealer: Sealer,
    /// TLS 1.3's traffic secrets, to follow and make KeyUpdates.
    rekey: Option<Rekey>,
    /// Bytes read off the socket: `inbuf[start..]`.
    inbuf: Vec<u8>,
    start: usize,
    last_fill: usize,
    /// The opened record's plaintext not yet read: a range of `inbuf`.
    plain: Range<usize>,
    /// Plaintext rustls had decrypted before the handover, read first.
    leftover: Unread,
    /// The peer's close_notify (or FIN) has been read.
    read_done: bool,
    /// Sealed records not yet on the socket: `out[out_at..]`.
    out: Vec<u8>,
    out_at: usize,
    close_notify_sent: bool,
}

/// A leg's keys and state as rustls left them after the handshake.
pub struct Handover {
    pub tcp: TcpStream,
    pub version: rustls::ProtocolVersion,
    pub secrets: rustls::ExtractedSecrets,
    pub leftover: Vec<u8>,
    pub peer_closed: bool,
    pub rekey: Option<Rekey>,
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl SoftTls {
    pub fn new(h: Handover) -> Result<SoftTls, RecordError> {
        if h.version == rustls::ProtocolVersion::TLSv1_3 && h.rekey.is_none() {
            // Without the traffic secrets a KeyUpdate could not be followed.
            return Err(RecordError::Unsupported(
                "TLS 1.3 without its traffic secrets".into(),
            ));
        }
        Ok(SoftTls {
            opener: Opener::new(h.version, h.secrets.rx)?,
            sealer: Sealer::new(h.version, h.secrets.tx)?,
            tcp: h.tcp,
            rekey: h.rekey,
            inbuf: Vec::new(),
            start: 0,
            last_fill: 0,
            plain: 0..0,
            leftover: Unread::new(h.leftover),
            read_done: h.peer_closed,
            out: Vec::new(),
            out_at: 0,
            close_notify_sent: false,
        })
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Opens the next whole record in the buffer, if there is one, and
    /// acts on it: application data becomes `plain`, a close_notify ends
    /// the stream, tickets are skipped, a KeyUpdate is followed.
    fn open_next(&mut self) -> io::Result<bool> {
        let Some(len) = records::record_len(&self.inbuf[self.start..]).map_err(invalid)? else {
            return Ok(false);
        };
        if self.inbuf.len() - self.start < len {
            return Ok(false);
        }
        let at = self.start;
        let (typ, range) = self
            .opener
            .open(&mut self.inbuf[at..at + len])
            .map_err(invalid)?;
        self.start += len;
        let body = at + range.start..at + range.end;
        match typ {
            CONTENT_APPLICATION_DATA => self.plain = body,
            CONTENT_ALERT => match self.inbuf[body] {
                [_, 0] => self.read_done = true,
                [level, description] => {
                    return Err(invalid(format!(
                        "the peer sent TLS alert {description} (level {level})"
                    )))
                }
                _ => return Err(invalid("malformed TLS alert")),
            },
            CONTENT_HANDSHAKE => match ktls::post_handshake(&self.inbuf[body])? {
                PostHandshake::Tickets => {}
                PostHandshake::KeyUpdate { update_requested } => {
                    let rekey = self
                        .rekey
                        .as_ref()
                        .ok_or_else(|| invalid("KeyUpdate on a TLS 1.2 connection"))?;
                    let keys = rekey.next_rx_keys(update_requested);
                    self.opener.rekey(keys.key(), keys.iv).map_err(invalid)?;
                }
            },
            other => return Err(invalid(format!("unexpected TLS record type {other}"))),
        }
        Ok(true)
    }

    /// Reads more of the socket into the buffer: `Ok(0)` at its end.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.start == self.inbuf.len() {
            self.inbuf.clear();
            self.start = 0;
        } else if self.inbuf.capacity() - self.inbuf.len() < MAX_RECORD {
            // Room for a whole record after the part already here.
            self.inbuf.drain(..self.start);
            self.start = 0;
        }
        // Uninitialised room: a buffer taken again for each message of a
        // request/response exchange is not zeroed each time.
        self.inbuf
            .reserve(READ_SIZE.saturating_sub(self.inbuf.len()));
        let read = poll_read_append(Pin::new(&mut self.tcp), cx, &mut self.inbuf, usize::MAX);
        match read {
            Poll::Ready(Ok(n)) => {
                self.last_fill = n;
                Poll::Ready(Ok(n))
            }
            other => {
                // Waiting with nothing buffered after a small fill (or an
                // error): an idle leg holds no receive buffer.
                if self.start == self.inbuf.len()
                    && (self.last_fill < KEEP_AFTER || other.is_ready())
                {
                    self.inbuf = Vec::new();
                    self.start = 0;
                }
                other
            }
        }
    }

    /// Sealed records out to the socket, as far as it takes them.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        // A batch smaller than a full record was the whole message: an idle
        // leg holds no send buffer either. Full batches keep it.
        if self.out.len() < MAX_RECORD {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Our KeyUpdate, sealed under the current key, and the next key.
    fn update_tx(&mut self) -> io::Result<()> {
        let Some(rekey) = &self.rekey else {
            return Ok(());
        };
        self.sealer
            .seal(
                CONTENT_HANDSHAKE,
                &ktls::KEY_UPDATE_NOT_REQUESTED,
                &mut self.out,
            )
            .map_err(invalid)?;
        let keys = rekey.next_tx_keys();
        self.sealer.rekey(keys.key(), keys.iv).map_err(invalid)
    }
}

impl AsyncRead for SoftTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.leftover.read_into(buf) {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        loop {
            if !this.plain.is_empty() {
                let n = buf.remaining().min(this.plain.len());
                buf.put_slice(&this.inbuf[this.plain.start..this.plain.start + n]);
                this.plain.start += n;
                if buf.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            if this.open_next()? {
                continue;
            }
            // Whatever was already handed out goes now; the socket is read
            // only for a caller that got nothing yet.
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.fill(cx))? == 0 {
                if this.start != this.inbuf.len() {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                // A FIN without close_notify: the end, as HTTP and SMTP
                // peers take it.
                this.read_done = true;
            }
        }
    }
}

impl AsyncWrite for SoftTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if this.rekey.as_ref().is_some_and(Rekey::take_owed_update) {
            this.update_tx()?;
        }
        let take = data.len().min(WRITE_BATCH);
        let mut records = 0;
        for chunk in data[..take].chunks(MAX_PLAINTEXT) {
            this.sealer
                .seal(CONTENT_APPLICATION_DATA, chunk, &mut this.out)
                .map_err(invalid)?;
            records += 1;
        }
        if this.rekey.as_ref().is_some_and(|r| r.sealed(records)) {
            this.update_tx()?;
        }
        // Out now if the socket takes it; the rest goes with the next
        // write or the flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(take))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        if !this.close_notify_sent {
            this.sealer
                .seal(CONTENT_ALERT, &[1, 0], &mut this.out)
                .map_err(invalid)?;
            this.close_notify_sent = true;
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
