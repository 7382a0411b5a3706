//! Log lines batched off the I/O threads: an event appends its formatted
//! line to a shared buffer, and one thread writes the buffer out every
//! [`FLUSH_EVERY`] or once it holds [`FLUSH_AT`] bytes. A line costs its
//! I/O thread a copy under a lock, not a write(2) (6 % of a handshake's
//! CPU when written in place) nor a wakeup of a writer thread per line (a
//! queue per line, as tracing-appender's, was 7 % of the relay's CPU in
//! the routing handshake bench: one wakeup per session report).

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The longest a line waits in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(50);

/// A buffer this full is written out at once.
const FLUSH_AT: usize = 64 * 1024;

/// A buffer this full makes a logging thread wait for the writer rather
/// than grow it: lines are the audit trail, never dropped.
const HOLD_AT_MOST: usize = 8 * 1024 * 1024;

struct Shared {
    pending: Mutex<Pending>,
    /// The writer waits on it; a full buffer or the end wakes it.
    wake: Condvar,
    /// Loggers wait on it while the buffer is over [`HOLD_AT_MOST`].
    drained: Condvar,
}

#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    closing: bool,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Pending> {
    shared.pending.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the subscriber writes its events to.
#[derive(Clone)]
pub struct BatchedLog {
    shared: Arc<Shared>,
}

/// Writes what is left when dropped, and stops the writer.
pub struct FlushGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

/// A batched log writing to `out` from a thread of its own.
pub fn batched(out: Box<dyn Write + Send>) -> (BatchedLog, FlushGuard) {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        drained: Condvar::new(),
    });
    let for_writer = shared.clone();
    // Without it every line would wait for a writer that never comes: a
    // process that cannot start one thread cannot run anyway.
    let writer = std::thread::Builder::new()
        .name("tlsrelay-log".into())
        .spawn(move || write_out(&for_writer, out))
        .expect("starting the log writer thread");
    let guard = FlushGuard {
        shared: shared.clone(),
        writer: Some(writer),
    };
    (BatchedLog { shared }, guard)
}

/// The writer thread: takes the buffer whole and writes it, until closed.
fn write_out(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut spare = Vec::new();
    loop {
        let mut pending = lock(shared);
        if pending.lines.len() < FLUSH_AT && !pending.closing {
            pending = shared
                .wake
                .wait_timeout(pending, FLUSH_EVERY)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::swap(&mut pending.lines, &mut spare);
        let closing = pending.closing;
        drop(pending);
        shared.drained.notify_all();
        if !spare.is_empty() {
            // Nowhere to report a failed log write but the log itself.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
        }
        if closing {
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        lock(&self.shared).closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl io::Write for BatchedLog {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut pending = lock(&self.shared);
        while pending.lines.len() > HOLD_AT_MOST && !pending.closing {
            pending = self
                .shared
                .drained
                .wait(pending)
                .unwrap_or_else(|e| e.into_inner());
        }
        pending.lines.extend_from_slice(line);
        if pending.lines.len() >= FLUSH_AT {
            self.shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedLog {
    type Writer = BatchedLog;

    fn make_writer(&'a self) -> BatchedLog {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read.
    #[derive(Clone, Default)]
    struct Collected(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Collected {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_whole_by_the_end() {
        let out = Collected::default();
        let (log, guard) = batched(Box::new(out.clone()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        log.write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..5000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}'s lines whole and in order");
        }
    }

    #[test]
    fn a_line_is_written_without_waiting_for_the_end() {
        let out = Collected::default();
        let (mut log, _guard) = batched(Box::new(out.clone()));
        log.write_all(b"one line\n").unwrap();
        // The writer's own timer writes it: wait for that event.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().as_slice() != b"one line\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "the line never came out"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
