//! The io_uring splice pump: worker threads, one io_uring each, move every
//! session's bytes socket -> pipe -> socket.
//!
//! The ring is the readiness engine: a direction waits with a POLL_ADD
//! (POLLIN on its source, or POLLOUT on its destination when that is
//! full), and once ready the worker splices non-blocking, in and out, until
//! a side would block — as the epoll pump does per readiness event — with
//! a budget per turn so one fast stream cannot starve the worker's other
//! sessions. No io-wq thread is ever parked on a blocking splice. Memory
//! per session is two pipes, whatever the transfer size: a slow reader
//! stalls its direction (the pipe stays full), it does not grow a buffer.
//!
//! A worker whose last turn moved bulk (64 KiB or more) waits for the
//! next completions as a NIC coalesces interrupts: until 16 have come or
//! 50 µs have passed with at least one (IORING_FEAT_MIN_TIMEOUT, 6.13+).
//! Otherwise a single fast stream woke it for every segment that arrived;
//! request/response turns move less and still wake at the first.
//!
//! Measured against one linked POLL_ADD + SPLICE per 64 KiB chunk (a ring
//! round trip per chunk and per drain): see the book's data plane chapter
//! (docs/src/data-plane.md).

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use tlsrelay_core::report::{PumpEnd, Side};

use crate::ktls;
use crate::splice::{copy_some, splice, Copied, CopyFault, HeldPipe, SpliceLeg, COPY_BELOW};

const RING_ENTRIES: u32 = 1024;
const WAKE: u64 = u64::MAX;
const TICK: u64 = u64::MAX - 1;

/// Splices a direction may make per turn before yielding to the worker's
/// other sessions (8 MiB at 64 KiB chunks).
const BUDGET: usize = 128;

/// What a completion belongs to: slot, generation, direction, operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// POLLIN on the source (the pipe is empty).
    PollIn = 1,
    /// POLLOUT on the destination (it was full).
    PollOut = 2,
    /// POLLOUT before a close_notify that found the socket full.
    CloseNotify = 4,
    Cancel = 5,
}

fn user_data(slot: usize, generation: u16, dir: usize, op: Op) -> u64 {
    ((slot as u64) << 32) | ((generation as u64) << 16) | ((dir as u64) << 8) | op as u64
}

fn decode(ud: u64) -> (usize, u16, usize, u8) {
    (
        (ud >> 32) as usize,
        (ud >> 16) as u16,
        ((ud >> 8) & 0xff) as usize,
        (ud & 0xff) as u8,
    )
}

struct Job {
    socks: [TcpStream; 2],
    ktls: [bool; 2],
    rekey: [Option<ktls::Rekey>; 2],
    peer_closed: [bool; 2],
    idle: Duration,
    done: oneshot::Sender<Finished>,
}

/// A session's byte counts and end, with its sockets handed back.
type Finished = ([u64; 2], PumpEnd, [TcpStream; 2]);

/// A ring for the calling thread alone. Completions' task work runs when
/// the worker asks for events (DEFER_TASKRUN), not by interrupting it at
/// every wakeup of a socket it polls; kernels before 6.1 get a plain ring.
fn new_ring() -> Result<IoUring, String> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::new(RING_ENTRIES))
        .map_err(|e| format!("io_uring_setup: {e}"))
}

/// IORING_ENTER_GETEVENTS: reap completions (and run deferred task work)
/// even when not waiting for one.
const ENTER_GETEVENTS: u32 = 1;

/// A turn that moved at least this much was bulk: the next wait batches.
const BULK_TURN: u64 = 64 * 1024;

/// A batched wait returns at this many completions...
const BATCH: usize = 16;

/// ...or once this long has passed with at least one.
const BATCH_WAIT_US: u32 = 50;

/// A session that moved nothing for this long has each waiting direction
/// tried once more, in case the kernel lost the wakeup it waits for (an
/// idle session pays two non-blocking syscalls per quiet spell).
const RETRY_QUIET: Duration = Duration::from_secs(5);

/// What a worker is handed.
enum Msg {
    Session(Job),
    /// Fails the worker, to test its replacement.
    #[cfg(test)]
    Panic,
}

struct Worker {
    jobs: mpsc::Sender<Msg>,
    wake: OwnedFd,
    thread: std::thread::JoinHandle<()>,
}

impl Worker {
    /// Starts worker `i`: a thread with its own ring.
    fn spawn(i: usize) -> Result<Worker, String> {
        // SAFETY: eventfd returns a fresh fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(format!("eventfd: {}", io::Error::last_os_error()));
        }
        // SAFETY: efd is fresh and owned here.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let worker_wake = wake.try_clone().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        // The ring is made on the worker's thread: its only issuer.
        let (setup_tx, setup_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("tlsrelay-uring-{i}"))
            .spawn(move || {
                let ring = match new_ring() {
                    Ok(ring) => {
                        let _ = setup_tx.send(Ok(()));
                        ring
                    }
                    Err(e) => {
                        let _ = setup_tx.send(Err(e));
                        return;
                    }
                };
                let run = std::panic::AssertUnwindSafe(|| WorkerLoop::new(ring, rx, worker_wake).run());
                let why = match std::panic::catch_unwind(run) {
                    Ok(why) => why,
                    Err(panic) => panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into()),
                };
                tracing::error!(
                    "io_uring worker {i} stopped ({why}); its sessions were reset, a new worker takes the next session"
                );
            })
            .map_err(|e| e.to_string())?;
        setup_rx
            .recv()
            .map_err(|_| "io_uring worker exited during setup".to_string())??;
        Ok(Worker {
            jobs: tx,
            wake,
            thread,
        })
    }

    /// Hands `msg` over and wakes the worker; `msg` back if it is gone.
    fn give(&self, msg: Msg) -> Result<(), Msg> {
        self.jobs.send(msg).map_err(|e| e.0)?;
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        Ok(())
    }
}

struct Pool {
    workers: Vec<Mutex<Worker>>,
    next: AtomicUsize,
}

/// Workers the pool starts with; set from `dataplane.workers` before the
/// first session.
static WORKERS: OnceLock<usize> = OnceLock::new();

/// Workers that stopped and were replaced, since start.
static REPLACED: AtomicU64 = AtomicU64::new(0);

/// Sets how many io_uring workers run (before the pool's first use; later
/// calls change nothing).
pub fn set_workers(n: usize) {
    let _ = WORKERS.set(n.max(1));
}

/// How many io_uring workers stopped and were replaced.
pub fn workers_replaced() -> u64 {
    REPLACED.load(Ordering::Relaxed)
}

/// The worker pool, started on first use. `Err` says why io_uring is not
/// usable here (the caller falls back to epoll).
fn pool() -> Result<&'static Pool, &'static str> {
    static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let n =
            *WORKERS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let workers = (0..n)
            .map(|i| Worker::spawn(i).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(Pool {
            workers,
            next: AtomicUsize::new(0),
        })
    })
    .as_ref()
    .map_err(String::as_str)
}

impl Pool {
    /// Gives `job` to the next worker, replacing that worker first if it
    /// has stopped.
    fn dispatch(&self, job: Job) -> Result<(), String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let mut worker = self.workers[i].lock().unwrap_or_else(|e| e.into_inner());
        let mut msg = Msg::Session(job);
        for _ in 0..2 {
            if !worker.thread.is_finished() {
                match worker.give(msg) {
                    Ok(()) => return Ok(()),
                    Err(back) => msg = back,
                }
            }
            *worker = Worker::spawn(i)?;
            REPLACED.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("io_uring worker {i} replaced");
        }
        Err("io_uring worker gone".to_string())
    }
}

/// Whether the io_uring pump can run here, and why not.
pub fn available() -> Result<(), String> {
    pool().map(|_| ()).map_err(str::to_string)
}

/// Relays until both directions end, on an io_uring worker.
pub async fn run(
    mut client: SpliceLeg,
    mut upstream: SpliceLeg,
    idle: Duration,
) -> ([u64; 2], PumpEnd) {
    let pool = pool().expect("checked by the caller with available()");
    let mut sent = [0u64; 2];
    // Plaintext rustls decrypted before the handover goes first.
    for (i, (src, dst)) in [(&client, &upstream), (&upstream, &client)]
        .into_iter()
        .enumerate()
    {
        if !src.leftover.is_empty() {
            if let Err(e) = crate::splice::write_all(&dst.tcp, &src.leftover).await {
                let side = if i == 0 { Side::Upstream } else { Side::Client };
                return (
                    sent,
                    PumpEnd::Reset {
                        side,
                        detail: e.to_string(),
                    },
                );
            }
            sent[i] += src.leftover.len() as u64;
        }
    }
    let to_std = |leg: SpliceLeg| leg.tcp.into_std();
    let (ktls, peer_closed) = (
        [client.ktls, upstream.ktls],
        [client.peer_closed, upstream.peer_closed],
    );
    let rekey = [client.rekey.take(), upstream.rekey.take()];
    let socks = match (to_std(client), to_std(upstream)) {
        (Ok(c), Ok(u)) => [c, u],
        (Err(e), _) | (_, Err(e)) => {
            return (
                sent,
                PumpEnd::SetupFailed {
                    detail: e.to_string(),
                },
            )
        }
    };
    let (done, result) = oneshot::channel();
    let job = Job {
        socks,
        ktls,
        rekey,
        peer_closed,
        idle,
        done,
    };
    if let Err(detail) = pool.dispatch(job) {
        return (sent, PumpEnd::SetupFailed { detail });
    }
    match result.await {
        Ok((counts, end, socks)) => {
            match &end {
                PumpEnd::Reset { side, .. } => {
                    for ((sock, ktls), leg) in socks.into_iter().zip(ktls).zip(SIDES) {
                        if let Ok(sock) = tokio::net::TcpStream::from_std(sock) {
                            crate::splice::abort(&sock, ktls, *side != leg).await;
                        }
                    }
                }
                PumpEnd::Closed => socks.iter().for_each(crate::splice::close_gracefully),
                _ => {}
            }
            ([counts[0] + sent[0], counts[1] + sent[1]], end)
        }
        Err(_) => (
            sent,
            PumpEnd::SetupFailed {
                detail: "io_uring worker dropped the session".into(),
            },
        ),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirState {
    /// Moving bytes, or waiting for a side to be ready.
    Open,
    /// Source ended and the destination was half-closed.
    Done,
}

struct Direction {
    src: usize,
    dst: usize,
    /// Held while bytes move, given back when the direction waits for its
    /// source with nothing in it.
    pipe: HeldPipe,
    in_pipe: usize,
    state: DirState,
    /// A one-shot poll of this direction (POLLOUT on a full destination,
    /// or before a close_notify) is in flight: the direction waits on it.
    pending: bool,
    /// The multishot POLLIN on the source is armed: it posts a completion
    /// at every wakeup, so readiness is not re-armed per message.
    armed_in: bool,
    /// The last read was small: the next one copies (see [`copy_some`]).
    small: bool,
    /// The source's poll saw the peer's FIN (POLLRDHUP) or an error: read
    /// until the end, a short read does not mean there is nothing more. A
    /// FIN that came in the same wakeup as the last data wakes nobody again.
    closing: bool,
}

struct Session {
    generation: u16,
    socks: [TcpStream; 2],
    ktls: [bool; 2],
    rekey: [Option<ktls::Rekey>; 2],
    dirs: [Direction; 2],
    counts: [u64; 2],
    idle: Duration,
    last_activity: Instant,
    /// The quiet spell (by its `last_activity`) whose waits were retried.
    retried: Option<Instant>,
    /// Set once the session is ending; freed when nothing is in flight.
    end: Option<PumpEnd>,
    done: Option<oneshot::Sender<Finished>>,
}

const SIDES: [Side; 2] = [Side::Client, Side::Upstream];

/// What a source's poll waits for: data, and the peer's FIN apart from it.
const READABLE: u32 = (libc::POLLIN | libc::POLLRDHUP) as u32;

/// A poll result saying the source is ending or failed.
const ENDING: i32 = (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as i32;

/// What a run of splices on one direction came to.
enum Step {
    /// A side would block: wait for it with this poll.
    Wait(RawFd, u32, Op),
    /// The budget is spent: continue at the next turn.
    Yield,
    /// The source ended.
    Ended,
    /// The kTLS source holds a control record.
    Control,
    Failed(Side, io::Error),
}

/// The direction waits for its source with its pipe empty: the pipe goes
/// back to the pool meanwhile.
fn await_source(dir: &mut Direction, src_fd: RawFd) -> Step {
    dir.pipe.release();
    Step::Wait(src_fd, READABLE, Op::PollIn)
}

struct WorkerLoop {
    ring: IoUring,
    jobs: mpsc::Receiver<Msg>,
    wake: OwnedFd,
    wake_buf: Box<u64>,
    tick: Box<types::Timespec>,
    sessions: Vec<Option<Session>>,
    free: Vec<usize>,
    generation: u16,
    /// Directions that spent their budget: (slot, generation, direction).
    ready: Vec<(usize, u16, usize)>,
    /// The one buffer small reads are copied through, shared by sessions.
    copy_buf: Box<[u8]>,
    /// Bytes moved since the last wait.
    turn_bytes: u64,
    /// The kernel can batch a wait (IORING_FEAT_MIN_TIMEOUT).
    batches: bool,
}

impl WorkerLoop {
    fn new(ring: IoUring, jobs: mpsc::Receiver<Msg>, wake: OwnedFd) -> WorkerLoop {
        WorkerLoop {
            jobs,
            wake,
            wake_buf: Box::new(0),
            tick: Box::new(types::Timespec::new().sec(1)),
            sessions: Vec::new(),
            free: Vec::new(),
            generation: 0,
            ready: Vec::new(),
            copy_buf: vec![0; COPY_BELOW].into_boxed_slice(),
            turn_bytes: 0,
            batches: ring.params().is_feature_min_timeout(),
            ring,
        }
    }

    /// Submits, then waits for [`BATCH`] completions or [`BATCH_WAIT_US`]
    /// with at least one (a second at most, as the idle tick).
    fn wait_batch(&mut self) -> io::Result<()> {
        let most = types::Timespec::new().sec(1);
        let args = types::SubmitArgs::new()
            .min_wait_usec(BATCH_WAIT_US)
            .timespec(&most);
        match self.ring.submitter().submit_with_args(BATCH, &args) {
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: every entry's buffers (sockets, wake_buf, tick) outlive
        // the operation: sessions are freed only once nothing of theirs is
        // in flight, and the worker's own buffers live forever.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            let _ = self.ring.submit();
        }
    }

    fn arm_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let read = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf.cast(), 8)
            .build()
            .user_data(WAKE);
        self.push(read);
    }

    fn arm_tick(&mut self) {
        let ts: *const types::Timespec = &*self.tick;
        self.push(opcode::Timeout::new(ts).build().user_data(TICK));
    }

    /// Runs until the ring fails; says why.
    fn run(mut self) -> String {
        self.arm_wake();
        self.arm_tick();
        let mut completions = Vec::with_capacity(RING_ENTRIES as usize);
        loop {
            // Directions that yielded run again without sleeping.
            let wait = u32::from(self.ready.is_empty());
            let bulk = std::mem::take(&mut self.turn_bytes) >= BULK_TURN;
            let entered = if wait == 1 && bulk && self.batches {
                self.wait_batch()
            } else {
                let to_submit = self.ring.submission().len() as u32;
                // SAFETY: the submission queue's entries were pushed by
                // `push`, whose buffers outlive them; no argument struct is
                // passed.
                unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        to_submit,
                        wait,
                        ENTER_GETEVENTS,
                        None,
                    )
                }
                .map(|_| ())
            };
            if let Err(e) = entered {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return format!("io_uring_enter: {e}");
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, res, flags) in &completions {
                match ud {
                    WAKE => {
                        while let Ok(msg) = self.jobs.try_recv() {
                            match msg {
                                Msg::Session(job) => self.start(job),
                                #[cfg(test)]
                                Msg::Panic => panic!("told to fail"),
                            }
                        }
                        self.arm_wake();
                    }
                    TICK => {
                        self.check_idle();
                        self.arm_tick();
                    }
                    _ => self.complete(ud, res, io_uring::cqueue::more(flags)),
                }
            }
            for (slot, generation, d) in std::mem::take(&mut self.ready) {
                if self.live(slot, generation).is_some_and(|s| s.end.is_none()) {
                    self.run_direction(slot, d);
                }
            }
        }
    }

    fn live(&self, slot: usize, generation: u16) -> Option<&Session> {
        self.sessions
            .get(slot)
            .and_then(Option::as_ref)
            .filter(|s| s.generation == generation)
    }

    fn session(&mut self, slot: usize) -> Option<&mut Session> {
        self.sessions.get_mut(slot).and_then(Option::as_mut)
    }

    fn start(&mut self, job: Job) {
        let dir = |src, dst| Direction {
            src,
            dst,
            pipe: HeldPipe::default(),
            in_pipe: 0,
            state: DirState::Open,
            pending: false,
            armed_in: false,
            small: true,
            closing: false,
        };
        self.generation = self.generation.wrapping_add(1);
        let session = Session {
            generation: self.generation,
            socks: job.socks,
            ktls: job.ktls,
            rekey: job.rekey,
            dirs: [dir(0, 1), dir(1, 0)],
            counts: [0, 0],
            idle: job.idle,
            last_activity: Instant::now(),
            retried: None,
            end: None,
            done: Some(job.done),
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.sessions[slot] = Some(session);
                slot
            }
            None => {
                self.sessions.push(Some(session));
                self.sessions.len() - 1
            }
        };
        for d in 0..2 {
            if job.peer_closed[d] {
                self.finish_direction(slot, d);
            } else {
                self.run_direction(slot, d);
            }
        }
    }

    /// Splices in and out until a side would block, the source ends, or
    /// the budget is spent; then waits, yields or ends accordingly.
    fn run_direction(&mut self, slot: usize, d: usize) {
        let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if s.end.is_some() || s.dirs[d].state == DirState::Done || s.dirs[d].pending {
            return;
        }
        let generation = s.generation;
        let before = s.counts[d];
        let step = Self::splice_some(s, d, &mut self.copy_buf);
        self.turn_bytes += s.counts[d] - before;
        match step {
            Step::Wait(fd, events, Op::PollIn) => {
                if s.dirs[d].armed_in {
                    return; // its next completion runs us again
                }
                s.dirs[d].armed_in = true;
                let poll = opcode::PollAdd::new(types::Fd(fd), events)
                    .multi(true)
                    .build()
                    .user_data(user_data(slot, generation, d, Op::PollIn));
                self.push(poll);
            }
            Step::Wait(fd, events, op) => {
                s.dirs[d].pending = true;
                let poll = opcode::PollAdd::new(types::Fd(fd), events)
                    .build()
                    .user_data(user_data(slot, generation, d, op));
                self.push(poll);
            }
            Step::Yield => self.ready.push((slot, generation, d)),
            Step::Ended => self.finish_direction(slot, d),
            Step::Control => self.control_record(slot, d),
            Step::Failed(side, e) => self.fail(slot, side, e),
        }
    }

    fn splice_some(s: &mut Session, d: usize, buf: &mut [u8]) -> Step {
        let src_fd = s.socks[s.dirs[d].src].as_raw_fd();
        let dst_fd = s.socks[s.dirs[d].dst].as_raw_fd();
        let (src_side, dst_side) = (SIDES[s.dirs[d].src], SIDES[s.dirs[d].dst]);
        let src_ktls = s.ktls[s.dirs[d].src];
        // Bytes written to a kTLS destination count towards its key's limit;
        // a KeyUpdate its peer asked for goes out before them.
        let rekey = |s: &Session, n: usize| match &s.rekey[s.dirs[d].dst] {
            Some(r) => r.wrote(dst_fd, n),
            None => Ok(()),
        };
        for _ in 0..BUDGET {
            if let Some(r) = &s.rekey[s.dirs[d].dst] {
                if let Err(e) = r.before_write(dst_fd) {
                    return Step::Failed(dst_side, e);
                }
            }
            let dir = &mut s.dirs[d];
            if dir.in_pipe == 0 && dir.small && !src_ktls {
                let park = || dir.pipe.get().map(|p| p.write.as_raw_fd());
                match copy_some(src_fd, dst_fd, park, buf) {
                    Ok(Copied::Ended) => return Step::Ended,
                    Ok(Copied::Moved {
                        read,
                        sent,
                        drained,
                    }) => {
                        s.counts[d] += sent as u64;
                        if let Err(e) = rekey(s, sent) {
                            return Step::Failed(dst_side, e);
                        }
                        let dir = &mut s.dirs[d];
                        s.last_activity = Instant::now();
                        dir.in_pipe = read - sent;
                        dir.small = drained;
                        if drained && dir.in_pipe == 0 && !dir.closing {
                            return await_source(&mut s.dirs[d], src_fd);
                        }
                    }
                    Err((CopyFault::Read, e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        return await_source(&mut s.dirs[d], src_fd)
                    }
                    Err((CopyFault::Read, e)) => return Step::Failed(src_side, e),
                    Err((CopyFault::Write, e)) => return Step::Failed(dst_side, e),
                }
                continue;
            }
            if dir.in_pipe > 0 {
                let Some(pipe) = dir.pipe.current() else {
                    let lost = io::Error::other("bytes counted in a pipe the direction lacks");
                    return Step::Failed(dst_side, lost);
                };
                match splice(pipe.read.as_raw_fd(), dst_fd, dir.in_pipe) {
                    Ok(0) => return Step::Failed(dst_side, io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        dir.in_pipe -= n;
                        s.counts[d] += n as u64;
                        if let Err(e) = rekey(s, n) {
                            return Step::Failed(dst_side, e);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Step::Wait(dst_fd, libc::POLLOUT as u32, Op::PollOut)
                    }
                    Err(e) => return Step::Failed(dst_side, e),
                }
                continue;
            }
            let pipe = match dir.pipe.get() {
                Ok(pipe) => pipe,
                Err(e) => return Step::Failed(src_side, e),
            };
            match splice(src_fd, pipe.write.as_raw_fd(), pipe.capacity) {
                Ok(0) => return Step::Ended,
                Ok(n) => {
                    dir.in_pipe = n;
                    dir.small = n < COPY_BELOW;
                    s.last_activity = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return await_source(&mut s.dirs[d], src_fd)
                }
                Err(e) if src_ktls && e.raw_os_error() == Some(libc::EINVAL) => {
                    return Step::Control
                }
                Err(e) => return Step::Failed(src_side, e),
            }
        }
        Step::Yield
    }

    /// A completion; `more`: a multishot poll stays armed after it.
    fn complete(&mut self, ud: u64, res: i32, more: bool) {
        let (slot, generation, d, op) = decode(ud);
        if d > 1 || self.live(slot, generation).is_none() {
            return; // a straggler of a session already freed
        }
        if op == Op::Cancel as u8 {
            return;
        }
        #[cfg(test)]
        if op == Op::PollIn as u8 && res > 0 && tests::LOSE_WAKEUPS.load(Ordering::Relaxed) {
            return; // as if the kernel had not woken us
        }
        let Some(s) = self.session(slot) else { return };
        if op == Op::PollIn as u8 {
            s.dirs[d].armed_in = more;
            if res > 0 && res & ENDING != 0 {
                s.dirs[d].closing = true;
            }
        } else {
            s.dirs[d].pending = false;
        }
        if s.end.is_some() {
            self.free_if_idle(slot);
            return;
        }
        let (src_side, dst_side) = (SIDES[s.dirs[d].src], SIDES[s.dirs[d].dst]);
        match op {
            _ if res == -libc::ECANCELED => self.retry_direction(slot, d, None),
            x if x == Op::PollIn as u8 && res < 0 => {
                self.fail(slot, src_side, io::Error::from_raw_os_error(-res))
            }
            x if x == Op::PollOut as u8 && res < 0 => {
                self.fail(slot, dst_side, io::Error::from_raw_os_error(-res))
            }
            x if x == Op::PollIn as u8 || x == Op::PollOut as u8 => self.run_direction(slot, d),
            x if x == Op::CloseNotify as u8 => self.finish_direction(slot, d),
            _ => {}
        }
    }

    /// Splice refused a non-data record on a kTLS source: read it and act.
    fn control_record(&mut self, slot: usize, d: usize) {
        let Some(s) = self.session(slot) else { return };
        let src_idx = s.dirs[d].src;
        let src = s.socks[src_idx].as_raw_fd();
        let side = SIDES[src_idx];
        let mut record = vec![0u8; 16 * 1024 + 256];
        match ktls::recv_record(src, &mut record).and_then(|(kind, n)| {
            crate::splice::control(kind, &record[..n], src, s.rekey[src_idx].as_ref())
        }) {
            Ok(crate::splice::Control::Closed) => self.finish_direction(slot, d),
            Ok(crate::splice::Control::Skip) => self.run_direction(slot, d),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.run_direction(slot, d),
            Err(e) => self.fail(slot, side, e),
        }
    }

    /// The source ended: close_notify (kTLS) and FIN to the destination.
    fn finish_direction(&mut self, slot: usize, d: usize) {
        let Some(s) = self.session(slot) else { return };
        let generation = s.generation;
        let dst_idx = s.dirs[d].dst;
        let dst = s.socks[dst_idx].as_raw_fd();
        if s.ktls[dst_idx] {
            match ktls::send_close_notify(dst) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.dirs[d].pending = true;
                    let poll = opcode::PollAdd::new(types::Fd(dst), libc::POLLOUT as u32)
                        .build()
                        .user_data(user_data(slot, generation, d, Op::CloseNotify));
                    self.push(poll);
                    return;
                }
                Err(e) => return self.fail(slot, SIDES[dst_idx], e),
            }
        }
        // SAFETY: shutdown on a socket this session owns.
        unsafe { libc::shutdown(dst, libc::SHUT_WR) };
        s.dirs[d].state = DirState::Done;
        let (armed, all_done) = (
            s.dirs[d].armed_in,
            s.dirs.iter().all(|dir| dir.state == DirState::Done),
        );
        if all_done {
            self.end(slot, PumpEnd::Closed);
        } else if armed {
            // Nothing more to read: stop its poll.
            let cancel = opcode::AsyncCancel::new(user_data(slot, generation, d, Op::PollIn))
                .build()
                .user_data(user_data(slot, generation, d, Op::Cancel));
            self.push(cancel);
        }
    }

    fn fail(&mut self, slot: usize, side: Side, err: io::Error) {
        // The legs are ended (alerts, resets) by `run` once they are back.
        self.end(
            slot,
            PumpEnd::Reset {
                side,
                detail: err.to_string(),
            },
        );
    }

    /// Ends a session: cancels what is in flight and frees it once that
    /// has completed.
    fn end(&mut self, slot: usize, end: PumpEnd) {
        let Some(s) = self.session(slot) else { return };
        if s.end.is_some() {
            return;
        }
        s.end = Some(end);
        let generation = s.generation;
        let pending: Vec<usize> = (0..2)
            .filter(|&d| s.dirs[d].pending || s.dirs[d].armed_in)
            .collect();
        for d in pending {
            for op in [Op::PollIn, Op::PollOut, Op::CloseNotify] {
                let cancel = opcode::AsyncCancel::new(user_data(slot, generation, d, op))
                    .build()
                    .user_data(user_data(slot, generation, d, Op::Cancel));
                self.push(cancel);
            }
        }
        self.free_if_idle(slot);
    }

    fn free_if_idle(&mut self, slot: usize) {
        let Some(s) = self.session(slot) else { return };
        if s.end.is_none() || s.dirs.iter().any(|d| d.pending || d.armed_in) {
            return;
        }
        let Some(mut s) = self.sessions[slot].take() else {
            return;
        };
        self.free.push(slot);
        // After their last operation: an empty pipe goes back to the pool,
        // one still holding bytes closes.
        for dir in &mut s.dirs {
            dir.pipe.release();
        }
        if let (Some(done), Some(end)) = (s.done.take(), s.end.take()) {
            let _ = done.send((s.counts, end, s.socks));
        }
        // The sockets went back to `run` (or close here if it is gone).
    }

    fn check_idle(&mut self) {
        let now = Instant::now();
        let mut idle = Vec::new();
        let mut quiet = Vec::new();
        for (slot, s) in self.sessions.iter().enumerate() {
            let Some(s) = s.as_ref().filter(|s| s.end.is_none()) else {
                continue;
            };
            let still = now.duration_since(s.last_activity);
            if still >= s.idle {
                idle.push(slot);
            } else if still >= RETRY_QUIET && s.retried != Some(s.last_activity) {
                quiet.push(slot);
            }
        }
        for slot in idle {
            if let Some(s) = self.session(slot) {
                tracing::info!("io_uring session idle: {}", waits(s));
            }
            self.end(slot, PumpEnd::IdleTimeout);
        }
        for slot in quiet {
            self.retry_waits(slot);
        }
    }

    /// Tries each waiting direction of a quiet session once more: one
    /// waiting for its source runs now (its multishot poll stays armed),
    /// one waiting for its destination has that poll cancelled, and its
    /// cancellation runs it ([`Self::retry_direction`]).
    fn retry_waits(&mut self, slot: usize) {
        let Some(s) = self.session(slot) else { return };
        s.retried = Some(s.last_activity);
        let generation = s.generation;
        let open = s.dirs.each_ref().map(|dir| dir.state == DirState::Open);
        let pending = s.dirs.each_ref().map(|dir| dir.pending);
        let waits_then = waits(s);
        for d in (0..2).filter(|&d| open[d] && !pending[d]) {
            self.retry_direction(slot, d, Some(&waits_then));
        }
        for d in (0..2).filter(|&d| open[d] && pending[d]) {
            let cancel = opcode::AsyncCancel::new(user_data(slot, generation, d, Op::PollOut))
                .build()
                .user_data(user_data(slot, generation, d, Op::Cancel));
            self.push(cancel);
        }
    }

    /// Runs a direction that no completion woke (a retry, or a cancelled
    /// poll); in a quiet session that was retried, bytes found to move
    /// mean a lost wakeup, logged with the waits before the retry when
    /// known (`waits_then`), else as they are now. Nothing is kept per
    /// session for it: an idle session costs what it did.
    fn retry_direction(&mut self, slot: usize, d: usize, waits_then: Option<&str>) {
        let Some(s) = self.session(slot) else { return };
        let before = s.counts[d];
        self.run_direction(slot, d);
        let Some(s) = self.session(slot) else { return };
        if s.counts[d] > before && s.retried.is_some() {
            let state = waits_then.map_or_else(|| waits(s), str::to_string);
            tracing::warn!(
                "io_uring: a quiet session moved {} bytes when tried again: a wakeup was lost \
                 ({state})",
                s.counts[d] - before
            );
        }
    }
}

/// What each direction of a session waits for, and the bytes queued at
/// its sockets (SIOCINQ at the source, SIOCOUTQ at the destination).
fn waits(s: &Session) -> String {
    // SIOCINQ and SIOCOUTQ are FIONREAD's and TIOCOUTQ's numbers.
    let queued = |fd: RawFd, req: libc::Ioctl| {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD/SIOCOUTQ on a socket this session owns write one int.
        match unsafe { libc::ioctl(fd, req, &mut n) } {
            0 => n.to_string(),
            _ => "?".to_string(),
        }
    };
    let dirs: Vec<String> = s
        .dirs
        .iter()
        .map(|dir| {
            let wait = match (dir.state, dir.pending, dir.armed_in) {
                (DirState::Done, ..) => "done",
                (_, true, _) => "destination",
                (_, _, true) => "source",
                _ => "nothing",
            };
            format!(
                "{:?}->{:?} waits for {wait}: {} in pipe, source queue {}, destination queue {}",
                SIDES[dir.src],
                SIDES[dir.dst],
                dir.in_pipe,
                queued(s.socks[dir.src].as_raw_fd(), libc::FIONREAD),
                queued(s.socks[dir.dst].as_raw_fd(), libc::TIOCOUTQ),
            )
        })
        .collect();
    format!("{}; bytes {}/{}", dirs.join("; "), s.counts[0], s.counts[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream as TokioStream};

    /// Whether io_uring runs here; says why not (a failure under CI).
    fn uring_here() -> bool {
        let Err(why) = available() else {
            return true;
        };
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "io_uring: {why}"
        );
        eprintln!("skipped: io_uring unavailable here: {why}");
        false
    }

    /// A connected pair on loopback: (our end, the far end).
    async fn pair() -> (TokioStream, TokioStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TokioStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        (near.unwrap(), far.unwrap().0)
    }

    fn leg(tcp: TokioStream) -> SpliceLeg {
        SpliceLeg {
            tcp,
            ktls: false,
            leftover: Vec::new(),
            peer_closed: false,
            rekey: None,
        }
    }

    /// Relays one session through the pool: `message` each way, then
    /// both ends close; the pump's counts and end.
    async fn one_session(message: &[u8]) -> ([u64; 2], PumpEnd) {
        let ((mut client, relay_c), (relay_u, mut server)) = (pair().await, pair().await);
        let pump = tokio::spawn(run(leg(relay_c), leg(relay_u), Duration::from_secs(10)));
        let mut got = vec![0; message.len()];
        client.write_all(message).await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
        server.write_all(message).await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, message);
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        pump.await.unwrap()
    }

    /// Workers drop the completions of source polls: wakeups the kernel
    /// lost.
    pub(super) static LOSE_WAKEUPS: AtomicBool = AtomicBool::new(false);

    /// Held by a test that changes every worker (kills them, or loses
    /// their wakeups), so another's sessions do not meet it.
    static WORKERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A session whose source's wakeup never comes still moves its bytes
    /// after a quiet spell ([`RETRY_QUIET`]), not at its idle timeout.
    #[tokio::test]
    async fn a_lost_wakeup_costs_a_quiet_spell_not_the_session() {
        if !uring_here() {
            return;
        }
        let _alone = WORKERS.lock().await;
        let ((mut client, relay_c), (relay_u, mut server)) = (pair().await, pair().await);
        let pump = tokio::spawn(run(leg(relay_c), leg(relay_u), Duration::from_secs(300)));
        // One byte with wakeups intact: the session runs and its polls are armed.
        let mut one = [0u8; 1];
        client.write_all(b"a").await.unwrap();
        server.read_exact(&mut one).await.unwrap();
        LOSE_WAKEUPS.store(true, Ordering::Relaxed);
        let message = vec![9u8; 100_000];
        let sent = Instant::now();
        client.write_all(&message).await.unwrap();
        let mut got = vec![0; message.len()];
        let arrived = tokio::time::timeout(Duration::from_secs(60), server.read_exact(&mut got));
        let arrived = arrived.await;
        LOSE_WAKEUPS.store(false, Ordering::Relaxed);
        arrived
            .expect("bytes moved before the idle timeout")
            .unwrap();
        assert_eq!(got, message);
        // Not woken: they waited for the retry.
        assert!(sent.elapsed() >= RETRY_QUIET / 2, "{:?}", sent.elapsed());
        client.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let (counts, end) = pump.await.unwrap();
        assert_eq!(counts, [100_001, 0]);
        assert!(matches!(end, PumpEnd::Closed), "{end:?}");
    }

    #[tokio::test]
    async fn a_failed_worker_is_replaced_and_counted() {
        if !uring_here() {
            return;
        }
        let _alone = WORKERS.lock().await;
        let pool = pool().unwrap();
        let message = vec![7u8; 100_000];
        assert_eq!(one_session(&message).await.0, [100_000, 100_000]);
        let before = workers_replaced();
        for w in &pool.workers {
            let w = w.lock().unwrap();
            assert!(w.give(Msg::Panic).is_ok());
        }
        while !pool
            .workers
            .iter()
            .all(|w| w.lock().unwrap().thread.is_finished())
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Every worker is dead: each of the next sessions meets one and
        // must get a replacement, and still relay every byte.
        for _ in 0..pool.workers.len() {
            let (counts, end) = one_session(&message).await;
            assert_eq!(counts, [100_000, 100_000]);
            assert!(matches!(end, PumpEnd::Closed), "{end:?}");
        }
        assert_eq!(workers_replaced() - before, pool.workers.len() as u64);
    }
}
