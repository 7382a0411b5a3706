//! The client's time for one request, kept on the caller's clock: the
//! driver says when it starts and stops waiting for the client, asks
//! when the wait runs out ([`RequestClock::poll_timeout`]) and tells the
//! machine the time when it does ([`RequestClock::handle_timeout`]), so
//! the rule is tested here on a fake clock, not in a runtime.

use std::time::{Duration, Instant};

/// Postfix's `smtpd_min_data_rate`: message data slower than this, after
/// the command timeout's allowance, is cut.
pub const MIN_DATA_RATE: u64 = 500;

/// One request (a command line, or a message's data) may keep the relay
/// waiting for the command timeout in all, plus a second per
/// [`MIN_DATA_RATE`] bytes received - counted over the whole request, not
/// per read, so a client sending a byte a second cannot hold a session for
/// ever. Only time spent waiting for the client counts (a slow next hop is
/// not its fault). Starts again at each reply the relay sends.
#[derive(Clone, Debug)]
pub struct RequestClock {
    command: Duration,
    waited: Duration,
    bytes: u64,
    /// When the wait under way began.
    since: Option<Instant>,
}

impl RequestClock {
    pub fn new(command: Duration) -> RequestClock {
        RequestClock {
            command,
            waited: Duration::ZERO,
            bytes: 0,
            since: None,
        }
    }

    /// The relay waits for the client from `now`.
    pub fn wait_from(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// The wait under way ended at `now` (the client sent something, or
    /// the relay turned to other work).
    pub fn wait_over(&mut self, now: Instant) {
        if let Some(since) = self.since.take() {
            self.waited += now.saturating_duration_since(since);
        }
    }

    /// `n` bytes of the request arrived: each earns the client time at
    /// [`MIN_DATA_RATE`].
    pub fn received(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// A reply went out: the next request's clock starts.
    pub fn reply_sent(&mut self) {
        self.waited = Duration::ZERO;
        self.bytes = 0;
    }

    /// When the wait under way runs out; `None` while the relay is not
    /// waiting for the client.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let earned =
            self.command + Duration::from_secs_f64(self.bytes as f64 / MIN_DATA_RATE as f64);
        let left = earned.saturating_sub(self.waited).min(self.command);
        self.since.map(|since| since + left)
    }

    /// Whether the request's time is up at `now`.
    pub fn handle_timeout(&self, now: Instant) -> bool {
        self.poll_timeout().is_some_and(|deadline| now >= deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMAND: Duration = Duration::from_secs(300);

    /// Waits `secs` for the client from `now`, which then sends `bytes`;
    /// returns when the wait ended (or its deadline, if that came first)
    /// and whether the clock ran out.
    fn wait(clock: &mut RequestClock, now: Instant, secs: u64, bytes: usize) -> (Instant, bool) {
        clock.wait_from(now);
        let deadline = clock.poll_timeout().unwrap();
        let arrives = now + Duration::from_secs(secs);
        if clock.handle_timeout(arrives) {
            return (deadline, true);
        }
        clock.wait_over(arrives);
        clock.received(bytes);
        (arrives, false)
    }

    #[test]
    fn a_silent_client_has_the_command_timeout() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(COMMAND);
        assert_eq!(clock.poll_timeout(), None, "not waiting yet");
        clock.wait_from(t0);
        assert_eq!(clock.poll_timeout(), Some(t0 + COMMAND));
        assert!(!clock.handle_timeout(t0 + COMMAND - Duration::from_millis(1)));
        assert!(clock.handle_timeout(t0 + COMMAND));
    }

    /// A byte every 10 s: each read is well inside the timeout, yet the
    /// request is cut once the waits add up to the timeout plus what its
    /// bytes earned (Postfix cuts the same client).
    #[test]
    fn a_trickle_is_cut_on_the_sum_of_its_waits() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(COMMAND);
        let mut now = t0;
        let mut bytes = 0u64;
        loop {
            let (at, out) = wait(&mut clock, now, 10, 1);
            now = at;
            if out {
                break;
            }
            bytes += 1;
            assert!(now - t0 < Duration::from_secs(400), "never cut");
        }
        let earned = COMMAND.as_secs_f64() + bytes as f64 / MIN_DATA_RATE as f64;
        let held = (now - t0).as_secs_f64();
        assert!(
            (held - earned).abs() < 1.0,
            "held {held} s, earned {earned} s"
        );
    }

    /// Data at the minimum rate or faster is never cut, however long the
    /// message: a 100 MB message at 1 MB/s takes 100 s.
    #[test]
    fn data_at_the_minimum_rate_earns_its_time() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(COMMAND);
        let mut now = t0;
        for _ in 0..2_000 {
            // 1,000 bytes a second: twice the minimum rate.
            let (at, out) = wait(&mut clock, now, 1, 1_000);
            assert!(!out, "cut after {:?}", at - t0);
            now = at;
        }
        assert!(now - t0 > COMMAND * 6);
    }

    /// Time the relay spends on other work (the next hop's reply) is not
    /// the client's: only waits count.
    #[test]
    fn only_waiting_for_the_client_counts() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(COMMAND);
        let (t1, out) = wait(&mut clock, t0, 200, 0);
        assert!(!out);
        // The next hop takes an hour; then the relay waits again.
        let t2 = t1 + Duration::from_secs(3600);
        clock.wait_from(t2);
        assert_eq!(clock.poll_timeout(), Some(t2 + Duration::from_secs(100)));
    }

    /// A reply starts the next request's clock afresh.
    #[test]
    fn a_reply_restarts_the_clock() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(COMMAND);
        let (t1, _) = wait(&mut clock, t0, 290, 10);
        clock.reply_sent();
        clock.wait_from(t1);
        assert_eq!(clock.poll_timeout(), Some(t1 + COMMAND));
    }
}
