//! Reading into a `Vec`'s spare capacity without zeroing it first (a
//! buffer taken again for every record is not cleared each time): the one
//! unsafe step, `set_len` over the bytes the read initialised, lives here.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// One `poll_read` into at most `limit` bytes of `buf`'s spare capacity
/// (the caller reserves it); on `Ready(Ok(n))` the `n` bytes read are
/// appended to `buf`.
pub fn poll_read_append<R: AsyncRead + ?Sized>(
    reader: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Poll<io::Result<usize>> {
    let spare = buf.spare_capacity_mut();
    let room = spare.len().min(limit);
    let mut chunk = ReadBuf::uninit(&mut spare[..room]);
    let start = chunk.filled().as_ptr();
    match reader.poll_read(cx, &mut chunk) {
        Poll::Ready(Ok(())) => {
            // A reader that swapped in another buffer would leave ours
            // unwritten: refuse to claim it.
            assert_eq!(
                start,
                chunk.filled().as_ptr(),
                "poll_read replaced the buffer"
            );
            let n = chunk.filled().len();
            // SAFETY: the first n bytes of the spare capacity were
            // initialised by poll_read (ReadBuf tracks it, and the buffer
            // is still ours: checked above); n <= room <= spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            Poll::Ready(Ok(n))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_what_was_read_within_the_limit() {
        let mut buf = b"ab".to_vec();
        buf.reserve(16);
        let mut source: &[u8] = b"cdefgh";
        let n = std::future::poll_fn(|cx| poll_read_append(Pin::new(&mut source), cx, &mut buf, 4))
            .await
            .unwrap();
        assert_eq!((n, buf.as_slice()), (4, &b"abcdef"[..]));
    }
}
