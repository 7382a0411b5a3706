//! The syscalls of the splice data plane: a sized non-blocking pipe and
//! the pool of empty ones, splice(2), the small-read copy path, and what a
//! control record read from a kTLS socket means.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::ktls;

/// A leg ready for the splice pump.
pub struct SpliceLeg {
    pub tcp: tokio::net::TcpStream,
    /// The kernel handles this leg's TLS.
    pub ktls: bool,
    /// Plaintext rustls had already decrypted: delivered before splicing.
    pub leftover: Vec<u8>,
    /// The peer had already sent close_notify.
    pub peer_closed: bool,
    /// TLS 1.3 secrets for KeyUpdates, when the kernel can rekey.
    pub rekey: Option<ktls::Rekey>,
}

/// What a direction's pipe asks for: a quarter of the splices of the
/// default 64 KiB (measured: 64 KiB, 128, 256, 512 KiB and 1 MiB pipes on
/// one stream and 16; 256 KiB was best for both pumps). The kernel may
/// refuse (past fs.pipe-user-pages-soft, for a user without
/// CAP_SYS_RESOURCE): the pipe then keeps its size and splices are that.
const PIPE_SIZE: i32 = 256 * 1024;

/// A non-blocking pipe: the only buffer a spliced direction has. A
/// direction takes one ([`Pipe::take`]) when bytes move and gives it back
/// ([`Pipe::give_back`]) when it waits for its source again, so an idle
/// session holds no pipe (nor the kernel pages behind one) and a session
/// mostly pays no pipe2/F_SETPIPE_SZ/close of its own (HAProxy pools its
/// pipes the same way).
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Bytes it holds at most: the size of one splice.
    pub capacity: usize,
}

/// Empty pipes waiting for a direction.
static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
/// Pipes that exist, pooled or in use.
static LIVE: AtomicUsize = AtomicUsize::new(0);

/// Empty pipes the pool keeps at most: half of what
/// fs.pipe-user-pages-soft lets one user hold at [`PIPE_SIZE`] (the other
/// half is for pipes in use), 128 where it is unlimited or unreadable.
fn pool_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let pages = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|t| t.trim().parse::<usize>().ok())
            .unwrap_or(0);
        match pages * 4096 / PIPE_SIZE as usize / 2 {
            0 => 128,
            n => n,
        }
    })
}

fn pool() -> std::sync::MutexGuard<'static, Vec<Pipe>> {
    POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a pipe fd we own; F_SETPIPE_SZ returns the size
        // granted, or -1 (then F_GETPIPE_SZ says what it is).
        let capacity = unsafe {
            match libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) {
                n if n > 0 => n,
                _ => libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ),
            }
        };
        LIVE.fetch_add(1, Ordering::Relaxed);
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(64 * 1024).max(4096),
        })
    }

    /// An empty pipe from the pool, or a new one.
    pub fn take() -> io::Result<Pipe> {
        match pool().pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Returns the pipe for another direction to take. One that still
    /// holds bytes (a session cut mid-transfer) is closed instead: no byte
    /// of one session can reach another; so is one past the pool's limit.
    pub fn give_back(self) {
        if self.is_empty() {
            let mut pool = pool();
            if pool.len() < pool_limit() {
                pool.push(self);
            }
        }
    }

    fn is_empty(&self) -> bool {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe we own writes one int.
        let rc = unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut queued) };
        rc == 0 && queued == 0
    }
}

/// A direction's pipe while its bytes move: taken from the pool when first
/// needed, given back when the direction waits for its source again or
/// ends (one still holding bytes is closed, see [`Pipe::give_back`]).
#[derive(Default)]
pub struct HeldPipe(Option<Pipe>);

impl HeldPipe {
    /// The pipe, taken from the pool when none is held.
    pub fn get(&mut self) -> io::Result<&Pipe> {
        match &mut self.0 {
            Some(pipe) => Ok(pipe),
            slot => Ok(slot.insert(Pipe::take()?)),
        }
    }

    /// The pipe held now, if any.
    pub fn current(&self) -> Option<&Pipe> {
        self.0.as_ref()
    }

    /// Gives the pipe back (the direction waits for its source).
    pub fn release(&mut self) {
        if let Some(pipe) = self.0.take() {
            pipe.give_back();
        }
    }
}

impl Drop for HeldPipe {
    fn drop(&mut self) {
        self.release();
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The relay's splice pipes now: how many exist and how many of those wait
/// empty in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipeCounts {
    pub live: usize,
    pub pooled: usize,
}

pub fn pipe_counts() -> PipeCounts {
    let pooled = pool().len();
    PipeCounts {
        live: LIVE.load(Ordering::Relaxed).max(pooled),
        pooled,
    }
}

/// One non-blocking tee(2): duplicates up to `len` bytes from one pipe
/// into another without consuming them (page references, not copies).
pub fn tee(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on pipe fds owned by the caller.
    let n = unsafe { libc::tee(from, to, len, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking read(2) from a pipe.
pub fn read_pipe(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a live, writable buffer of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One non-blocking splice(2) of up to `len` bytes.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds owned by the caller.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Reads shorter than this are copied through one shared buffer instead of
/// spliced: for a small message a pipe costs more than the copy (page
/// references in, a splice out), and a read that did not fill the buffer
/// drained the socket, so no read is spent on EAGAIN. Larger flows splice.
pub const COPY_BELOW: usize = 16 * 1024;

/// What one [`copy_some`] did.
pub enum Copied {
    /// The source ended (FIN).
    Ended,
    /// `read` bytes came in, `sent` of them went out; the rest are in the
    /// pipe. `drained`: the read did not fill the buffer, so the source
    /// had nothing more.
    Moved {
        read: usize,
        sent: usize,
        drained: bool,
    },
}

/// Which side a [`copy_some`] failed on.
pub enum CopyFault {
    Read,
    Write,
}

/// One non-blocking read into `buf`, sent on at once; what the destination
/// does not take goes into the (empty) pipe `park` gives the write end of
/// (asked for only then), to be spliced out when it is writable, so a slow
/// reader still stalls its sender.
pub fn copy_some(
    src: RawFd,
    dst: RawFd,
    park: impl FnOnce() -> io::Result<RawFd>,
    buf: &mut [u8],
) -> Result<Copied, (CopyFault, io::Error)> {
    // SAFETY: recv into a live buffer of its length.
    let read = unsafe { libc::recv(src, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    let read = usize::try_from(read).map_err(|_| (CopyFault::Read, io::Error::last_os_error()))?;
    if read == 0 {
        return Ok(Copied::Ended);
    }
    let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: send from the bytes just read.
    let sent = match unsafe { libc::send(dst, buf.as_ptr().cast(), read, flags) } {
        n if n >= 0 => n as usize,
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => 0,
            e => return Err((CopyFault::Write, e)),
        },
    };
    if sent < read {
        let pipe_w = park().map_err(|e| (CopyFault::Write, e))?;
        let mut parked = sent;
        while parked < read {
            // SAFETY: write the unsent bytes into our pipe; it is empty and
            // larger than `buf`, so this does not block.
            let n = unsafe { libc::write(pipe_w, buf[parked..].as_ptr().cast(), read - parked) };
            let n =
                usize::try_from(n).map_err(|_| (CopyFault::Write, io::Error::last_os_error()))?;
            parked += n;
        }
    }
    Ok(Copied::Moved {
        read,
        sent,
        drained: read < buf.len(),
    })
}

/// What a non-data record on a kTLS RX socket means for the relay.
pub enum Control {
    /// close_notify: the peer is done sending.
    Closed,
    /// Dealt with (a session ticket skipped, a KeyUpdate followed): read on.
    Skip,
}

/// Decides on a control record read from the kTLS RX socket `fd`, and
/// follows a TLS 1.3 KeyUpdate when the kernel can rekey and the leg kept
/// its secrets (`rekey`); without them a KeyUpdate ends the session, since
/// the records after it cannot be decrypted.
pub fn control(
    kind: u8,
    body: &[u8],
    fd: RawFd,
    rekey: Option<&ktls::Rekey>,
) -> io::Result<Control> {
    match (kind, body) {
        (ktls::RECORD_ALERT, [_, 0]) => Ok(Control::Closed),
        (ktls::RECORD_ALERT, [level, desc]) => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("peer sent TLS alert {desc} (level {level})"),
        )),
        (ktls::RECORD_HANDSHAKE, body) => match (ktls::post_handshake(body)?, rekey) {
            (ktls::PostHandshake::Tickets, _) => Ok(Control::Skip),
            (ktls::PostHandshake::KeyUpdate { update_requested }, Some(rekey)) => {
                rekey.follow_peer(fd, update_requested)?;
                Ok(Control::Skip)
            }
            (ktls::PostHandshake::KeyUpdate { .. }, None) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "peer sent a TLS 1.3 KeyUpdate; this kernel TLS cannot rekey, closing rather than corrupting data",
            )),
        },
        (kind, body) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected TLS record type {kind} ({} bytes) after the handshake", body.len()),
        )),
    }
}

/// Ends a leg of a failed session so its peer can tell: a kTLS leg gets a
/// fatal alert (then FIN), waiting a moment for room behind the bytes
/// already queued; a leg that got none is reset when `reset` (the side
/// that did not fail).
pub async fn abort(tcp: &tokio::net::TcpStream, ktls: bool, reset: bool) {
    const ALERT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
    if ktls {
        let alert = async {
            loop {
                tcp.writable().await?;
                match tcp.try_io(tokio::io::Interest::WRITABLE, || {
                    ktls::send_fatal_alert(tcp.as_raw_fd())
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        };
        if let Ok(Ok(())) = tokio::time::timeout(ALERT_WAIT, alert).await {
            return;
        }
    }
    if reset {
        reset_on_close(tcp);
    }
}

/// Makes closing the socket send a RST, not a FIN. Sessions' sockets are
/// set so from the start: a relay that dies mid-session (or a session that
/// fails) must not end its peers' streams with what they would take for
/// their end - a TCP client would see a truncated stream as complete.
pub fn reset_on_close(tcp: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

/// Undoes [`reset_on_close`] once a session ended cleanly (both ways
/// closed, every byte handed to the kernel): the close then sends what is
/// still queued, and a FIN.
pub fn close_gracefully(tcp: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(tcp).set_linger(None);
}

/// Writes all of `data` to a non-blocking socket (kTLS encrypts it).
pub async fn write_all(dst: &tokio::net::TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
