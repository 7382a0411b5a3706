//! A TLS leg whose keys the kernel holds, read and written as plaintext by
//! protocol code (SMTP's dialogue and bodies): the kernel decrypts on read
//! and encrypts on write, so no userspace crypto. Records other than
//! application data are read with their type and decided as on the splice
//! path: close_notify ends the stream, session tickets are skipped, a
//! KeyUpdate is followed where the kernel can rekey, other alerts (and a
//! KeyUpdate it cannot follow) are errors.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use tlsrelay_sys::ktls;
use tlsrelay_sys::splice::{control, Control, SpliceLeg};

/// The largest TLS plaintext record: a read buffer at least this large
/// takes any record whole.
const MAX_PLAINTEXT: usize = 16 * 1024;

pub struct KernelTls {
    tcp: TcpStream,
    /// Plaintext rustls had decrypted before the handoff, read first; also
    /// a record read for a buffer too small to take it whole.
    pending: Vec<u8>,
    pending_at: usize,
    /// The peer's close_notify (or FIN) has been read.
    read_done: bool,
    close_notify_sent: bool,
    rekey: Option<ktls::Rekey>,
}

impl KernelTls {
    pub fn new(leg: SpliceLeg) -> KernelTls {
        KernelTls {
            tcp: leg.tcp,
            pending: leg.leftover,
            pending_at: 0,
            read_done: leg.peer_closed,
            close_notify_sent: false,
            rekey: leg.rekey,
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Plaintext is waiting here (not on the socket): reads must come
    /// through this stream, not splice.
    pub fn has_pending(&self) -> bool {
        self.pending_at < self.pending.len()
    }

    /// What is left of the stream for a splice pump, with the plaintext
    /// held back (from the handoff).
    pub fn into_splice_leg(mut self) -> SpliceLeg {
        let leftover = self.pending.split_off(self.pending_at);
        SpliceLeg {
            tcp: self.tcp,
            ktls: true,
            leftover,
            peer_closed: self.read_done,
            rekey: self.rekey,
        }
    }

    /// A KeyUpdate the peer asked for, before our next data.
    fn before_write(&self) -> io::Result<()> {
        match &self.rekey {
            Some(rekey) => rekey.before_write(self.tcp.as_raw_fd()),
            None => Ok(()),
        }
    }

    /// Counts written bytes towards the TX key's limit (a KeyUpdate when
    /// reached).
    fn wrote(&self, n: usize) -> Poll<io::Result<usize>> {
        if let Some(rekey) = &self.rekey {
            rekey.wrote(self.tcp.as_raw_fd(), n)?;
        }
        Poll::Ready(Ok(n))
    }

    /// One record from the socket into `into`: its plaintext length, or
    /// `None` for a control record that was dealt with (read again).
    fn read_record(&mut self, into: &mut [u8]) -> io::Result<Option<usize>> {
        let fd = self.tcp.as_raw_fd();
        let (kind, n) = self
            .tcp
            .try_io(Interest::READABLE, || ktls::recv_record(fd, into))?;
        if kind == ktls::RECORD_APPLICATION_DATA {
            if n == 0 {
                self.read_done = true; // FIN without close_notify
            }
            return Ok(Some(n));
        }
        match control(kind, &into[..n], fd, self.rekey.as_ref())? {
            Control::Closed => {
                self.read_done = true;
                Ok(Some(0))
            }
            Control::Skip => Ok(None),
        }
    }
}

impl AsyncRead for KernelTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pending_at < this.pending.len() {
                let n = buf.remaining().min(this.pending.len() - this.pending_at);
                buf.put_slice(&this.pending[this.pending_at..this.pending_at + n]);
                this.pending_at += n;
                if this.pending_at == this.pending.len() {
                    this.pending.clear();
                    this.pending_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_done || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            ready!(this.tcp.poll_read_ready(cx))?;
            // A small buffer could cut a control record: records go into
            // `pending` then, and are handed out from there.
            let read = if buf.remaining() >= MAX_PLAINTEXT {
                match this.read_record(buf.initialize_unfilled()) {
                    Ok(Some(n)) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    other => other,
                }
            } else {
                let mut scratch = std::mem::take(&mut this.pending);
                scratch.resize(MAX_PLAINTEXT, 0);
                let read = this.read_record(&mut scratch);
                scratch.truncate(match read {
                    Ok(Some(n)) => n,
                    _ => 0,
                });
                this.pending = scratch;
                read
            };
            match read {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for KernelTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write()?;
        let n = ready!(Pin::new(&mut this.tcp).poll_write(cx, buf))?;
        this.wrote(n)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.before_write()?;
        let n = ready!(Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs))?;
        this.wrote(n)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    /// close_notify, then FIN: the peer can tell an end from a truncation.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while !this.close_notify_sent {
            ready!(this.tcp.poll_write_ready(cx))?;
            let fd = this.tcp.as_raw_fd();
            match this
                .tcp
                .try_io(Interest::WRITABLE, || ktls::send_close_notify(fd))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                // A peer gone already: the FIN (or its reset) says the rest.
                _ => this.close_notify_sent = true,
            }
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
