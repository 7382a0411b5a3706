//! The splice pump: socket -> pipe -> socket with non-blocking splice(2),
//! driven by the runtime's readiness (epoll). Bytes never enter userspace;
//! on kernel-TLS legs the kernel decrypts on the way into the pipe and
//! encrypts on the way out.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;

use super::{drive, load, Activity, Counts, PumpEnd, Side};
use tlsrelay_sys::ktls;

pub(super) async fn run(
    client: SpliceLeg,
    upstream: SpliceLeg,
    idle: Duration,
) -> ([u64; 2], PumpEnd) {
    let activity = Activity::new();
    let counts: Counts = [AtomicU64::new(0), AtomicU64::new(0)];
    let up = splice_half(
        &client,
        &upstream,
        [Side::Client, Side::Upstream],
        &counts[0],
        &activity,
    );
    let down = splice_half(
        &upstream,
        &client,
        [Side::Upstream, Side::Client],
        &counts[1],
        &activity,
    );
    let end = drive(up, down, &activity, idle).await;
    match &end {
        PumpEnd::Reset { side, .. } => {
            abort(&client.tcp, client.ktls, *side != Side::Client).await;
            abort(&upstream.tcp, upstream.ktls, *side != Side::Upstream).await;
        }
        PumpEnd::Closed => {
            close_gracefully(&client.tcp);
            close_gracefully(&upstream.tcp);
        }
        _ => {}
    }
    (load(&counts), end)
}

use tlsrelay_sys::splice::{
    abort, close_gracefully, control, splice, write_all, Control, HeldPipe, SpliceLeg,
};

/// Reads the control record splice refused (EINVAL) and acts on it.
fn read_control(src: &SpliceLeg) -> io::Result<Control> {
    let mut record = vec![0u8; 16 * 1024 + 256];
    let fd = src.tcp.as_raw_fd();
    let (kind, n) = src
        .tcp
        .try_io(Interest::READABLE, || ktls::recv_record(fd, &mut record))?;
    control(kind, &record[..n], fd, src.rekey.as_ref())
}

/// One direction: splice src -> pipe -> dst until src ends, then half-close
/// dst (close_notify first when the kernel speaks TLS on it).
async fn splice_half(
    src: &SpliceLeg,
    dst: &SpliceLeg,
    sides: [Side; 2],
    count: &AtomicU64,
    activity: &Activity,
) -> Result<(), (Side, io::Error)> {
    let [src_side, dst_side] = sides;
    if !src.leftover.is_empty() {
        write_all(&dst.tcp, &src.leftover)
            .await
            .map_err(|e| (dst_side, e))?;
        count.fetch_add(src.leftover.len() as u64, Ordering::Relaxed);
    }
    if !src.peer_closed {
        // Taken when bytes move, given back (empty) while the source is
        // awaited: an idle direction holds no pipe.
        let mut held = HeldPipe::default();
        let (src_fd, dst_fd) = (src.tcp.as_raw_fd(), dst.tcp.as_raw_fd());
        loop {
            src.tcp.readable().await.map_err(|e| (src_side, e))?;
            let pipe = held.get().map_err(|e| (src_side, e))?;
            let n = match src.tcp.try_io(Interest::READABLE, || {
                splice(src_fd, pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    held.release();
                    continue;
                }
                Err(e) if src.ktls && e.raw_os_error() == Some(libc::EINVAL) => {
                    match read_control(src) {
                        Ok(Control::Closed) => break,
                        Ok(Control::Skip) => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err((src_side, e)),
                    }
                }
                Err(e) => return Err((src_side, e)),
            };
            activity.touch();
            if let Some(rekey) = &dst.rekey {
                rekey.before_write(dst_fd).map_err(|e| (dst_side, e))?;
            }
            let mut left = n;
            while left > 0 {
                dst.tcp.writable().await.map_err(|e| (dst_side, e))?;
                match dst.tcp.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), dst_fd, left)
                }) {
                    Ok(m) => {
                        left -= m;
                        if let Some(rekey) = &dst.rekey {
                            rekey.wrote(dst_fd, m).map_err(|e| (dst_side, e))?;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err((dst_side, e)),
                }
            }
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    end_half(dst, dst_side).await
}

/// The source ended: close_notify first when the kernel speaks TLS on
/// `dst`, then its write half closed.
async fn end_half(dst: &SpliceLeg, dst_side: Side) -> Result<(), (Side, io::Error)> {
    if dst.ktls {
        loop {
            dst.tcp.writable().await.map_err(|e| (dst_side, e))?;
            match dst.tcp.try_io(Interest::WRITABLE, || {
                ktls::send_close_notify(dst.tcp.as_raw_fd())
            }) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err((dst_side, e)),
            }
        }
    }
    socket2::SockRef::from(&dst.tcp)
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| (dst_side, e))
}
