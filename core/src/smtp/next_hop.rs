//! The next hop's opening dialogue as a state machine, free of I/O:
//! greeting, EHLO (HELO for an old server), and STARTTLS as RFC 3207 has
//! it (bytes after the 220 are a protocol violation; EHLO again over TLS).
//! The driver writes what [`Opening::Send`] gives, feeds what it reads, runs
//! the TLS handshake on [`Opening::StartTls`], and stops at `Ready` or
//! `Failed`.

use std::time::Duration;

use super::codec::{Capabilities, Reply, ReplyParser};
use crate::policy::TlsFailure;

/// Which of RFC 5321 4.5.3.2's timeouts a wait for the next hop is under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Greeting,
    Command,
    DataInit,
    DataBlock,
    DataEnd,
}

/// RFC 5321 4.5.3.2 timeouts, scaled by the config.
#[derive(Clone, Copy, Debug)]
pub struct SmtpTimeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data_init: Duration,
    pub data_block: Duration,
    pub data_end: Duration,
    pub handshake: Duration,
}

impl SmtpTimeouts {
    /// The RFC's minimums, multiplied by `scale`.
    pub fn rfc5321(scale: f64, connect: Duration, handshake: Duration) -> SmtpTimeouts {
        let s = |secs: u64| Duration::from_secs_f64(secs as f64 * scale);
        SmtpTimeouts {
            connect,
            greeting: s(300),
            command: s(300),
            data_init: s(120),
            data_block: s(180),
            data_end: s(600),
            handshake,
        }
    }

    /// How long a wait of this kind may last.
    pub fn of(&self, wait: Wait) -> Duration {
        match wait {
            Wait::Greeting => self.greeting,
            Wait::Command => self.command,
            Wait::DataInit => self.data_init,
            Wait::DataBlock => self.data_block,
            Wait::DataEnd => self.data_end,
        }
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Opening {
    /// Write these bytes and flush.
    Send(Vec<u8>),
    /// Read from the next hop (a reply is incomplete), within this wait.
    Read(Wait),
    /// The 220 to STARTTLS came alone: run the TLS handshake, then call
    /// [`HopOpening::tls_established`].
    StartTls,
    /// The session is open; [`HopOpening::capabilities`] says what it offers.
    Ready,
    Failed(OpeningFailure),
}

/// Why the opening stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpeningFailure {
    /// This next hop can't take mail now (greeting, EHLO and HELO refused,
    /// the connection lost): try the next one.
    Unavailable(String),
    /// TLS could not be had; the connector's policy decides. A handshake
    /// that had begun on the wire shows there (alerts), one that had not
    /// does not.
    Tls {
        failure: TlsFailure,
        handshake_begun: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    Ehlo { over_tls: bool },
    Helo,
    StartTls,
    Handshake,
    Ready,
    Failed(OpeningFailure),
}

/// One next-hop connection from its greeting until mail can be sent.
pub struct HopOpening {
    state: State,
    replies: ReplyParser,
    outgoing: Option<Vec<u8>>,
    /// `host:port`, for the reasons given.
    label: String,
    hostname: String,
    want_tls: bool,
    capabilities: Capabilities,
}

impl HopOpening {
    /// `want_tls`: issue STARTTLS (the connector's policy is not `plain`
    /// and this is not the plaintext retry).
    pub fn new(label: &str, hostname: &str, want_tls: bool) -> HopOpening {
        HopOpening {
            state: State::Greeting,
            replies: ReplyParser::default(),
            outgoing: None,
            label: label.to_string(),
            hostname: hostname.to_string(),
            want_tls,
            capabilities: Capabilities::default(),
        }
    }

    /// Bytes from the next hop.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.replies.feed(bytes);
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// The reply parser, for the rest of the session.
    pub fn into_replies(self) -> ReplyParser {
        self.replies
    }

    /// TLS is up: forget what was said before it and EHLO again.
    pub fn tls_established(&mut self) {
        self.replies = ReplyParser::default();
        self.capabilities = Capabilities::default();
        self.send(format!("EHLO {}", self.hostname));
        self.state = State::Ehlo { over_tls: true };
    }

    /// Reading or writing failed (`why`: timed out, closed, reset): the
    /// failure this is at the current step.
    pub fn io_failed(&mut self, why: &str) -> OpeningFailure {
        let failure = match self.state {
            State::Greeting => self.unavailable(format!("greeting: {why}")),
            State::Ehlo { over_tls: false } => self.unavailable(format!("EHLO: {why}")),
            State::Helo => self.unavailable(format!("HELO: {why}")),
            State::StartTls => tls(
                TlsFailure::HandshakeFailed(format!("STARTTLS: {why}")),
                false,
            ),
            _ => tls(
                TlsFailure::HandshakeFailed(format!("EHLO after STARTTLS: {why}")),
                true,
            ),
        };
        self.state = State::Failed(failure.clone());
        failure
    }

    /// The next step.
    pub fn poll(&mut self) -> Opening {
        if let Some(bytes) = self.outgoing.take() {
            return Opening::Send(bytes);
        }
        let wait = match &self.state {
            State::Ready => return Opening::Ready,
            State::Failed(f) => return Opening::Failed(f.clone()),
            State::Handshake => return Opening::StartTls,
            State::Greeting => Wait::Greeting,
            _ => Wait::Command,
        };
        let reply = match self.replies.next_reply() {
            Ok(Some(reply)) => reply,
            Ok(None) => return Opening::Read(wait),
            Err(e) => {
                let failure = self.io_failed(&e.to_string());
                return Opening::Failed(failure);
            }
        };
        self.state = self.on_reply(reply);
        self.poll()
    }

    fn on_reply(&mut self, reply: Reply) -> State {
        match self.state {
            State::Greeting if reply.code == 220 => {
                self.send(format!("EHLO {}", self.hostname));
                State::Ehlo { over_tls: false }
            }
            State::Greeting => State::Failed(self.unavailable(format!("greeting {reply}"))),
            State::Ehlo { over_tls } if reply.code == 250 => {
                self.capabilities = Capabilities::from_ehlo(&reply);
                if over_tls {
                    State::Ready
                } else {
                    self.after_hello()
                }
            }
            // An old server: HELO, and no extensions.
            State::Ehlo { over_tls: false } => {
                self.send(format!("HELO {}", self.hostname));
                State::Helo
            }
            State::Ehlo { over_tls: true } => State::Failed(tls(
                TlsFailure::HandshakeFailed(format!("EHLO after STARTTLS: {reply}")),
                true,
            )),
            State::Helo if reply.code == 250 => self.after_hello(),
            State::Helo => State::Failed(self.unavailable(format!("HELO {reply}"))),
            State::StartTls if reply.code != 220 => State::Failed(tls(
                TlsFailure::NotOffered(format!("{} answered STARTTLS with {reply}", self.host())),
                false,
            )),
            State::StartTls if self.replies.pending() > 0 => State::Failed(tls(
                TlsFailure::HandshakeFailed(format!(
                    "{} sent {} bytes after its 220 to STARTTLS (protocol violation)",
                    self.host(),
                    self.replies.pending()
                )),
                false,
            )),
            State::StartTls => State::Handshake,
            // No reply is read in these states.
            State::Handshake | State::Ready | State::Failed(_) => self.state.clone(),
        }
    }

    /// Greeted by EHLO or HELO: STARTTLS if wanted and offered.
    fn after_hello(&mut self) -> State {
        if !self.want_tls {
            return State::Ready;
        }
        if !self.capabilities.has("STARTTLS") {
            return State::Failed(tls(
                TlsFailure::NotOffered(format!("{} does not offer STARTTLS", self.host())),
                false,
            ));
        }
        self.send("STARTTLS".into());
        State::StartTls
    }

    fn send(&mut self, line: String) {
        self.outgoing = Some(format!("{line}\r\n").into_bytes());
    }

    fn host(&self) -> &str {
        self.label.rsplit_once(':').map_or(&self.label, |(h, _)| h)
    }

    fn unavailable(&self, why: String) -> OpeningFailure {
        OpeningFailure::Unavailable(format!("{}: {why}", self.label))
    }
}

fn tls(failure: TlsFailure, handshake_begun: bool) -> OpeningFailure {
    OpeningFailure::Tls {
        failure,
        handshake_begun,
    }
}

/// Dot-stuffs raw message bytes for DATA (BDAT to a next hop without
/// CHUNKING), ending with the terminator.
#[derive(Default)]
pub struct DotStuffer {
    at_line_start: bool,
    last_cr: bool,
    started: bool,
}

impl DotStuffer {
    pub fn new() -> DotStuffer {
        DotStuffer {
            at_line_start: true,
            ..Default::default()
        }
    }

    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if self.at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            self.at_line_start = self.last_cr && b == b'\n';
            self.last_cr = b == b'\r';
            self.started = true;
        }
    }

    /// The end of the body: CRLF if the content did not end with one, then
    /// the terminator.
    pub fn finish(&self) -> Vec<u8> {
        if !self.started || self.at_line_start {
            b".\r\n".to_vec()
        } else {
            b"\r\n.\r\n".to_vec()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the opening against scripted replies, one per command sent.
    fn open(want_tls: bool, replies: &[&str]) -> (Vec<String>, Opening, HopOpening) {
        let mut hop = HopOpening::new("mx.example:25", "relay.example", want_tls);
        let mut sent = Vec::new();
        let mut replies = replies.iter();
        loop {
            match hop.poll() {
                Opening::Send(bytes) => sent.push(String::from_utf8(bytes).unwrap()),
                Opening::Read(_) => match replies.next() {
                    Some(r) => hop.feed(r.as_bytes()),
                    None => return (sent, Opening::Read(Wait::Command), hop),
                },
                Opening::StartTls => {
                    sent.push("<handshake>".into());
                    hop.tls_established();
                }
                end => return (sent, end, hop),
            }
        }
    }

    #[test]
    fn ehlo_then_starttls_then_ehlo_again() {
        let (sent, end, hop) = open(
            true,
            &[
                "220 mx\r\n",
                "250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n",
                "220 go\r\n",
                "250-mx\r\n250 CHUNKING\r\n",
            ],
        );
        assert_eq!(end, Opening::Ready);
        assert_eq!(
            sent,
            [
                "EHLO relay.example\r\n",
                "STARTTLS\r\n",
                "<handshake>",
                "EHLO relay.example\r\n"
            ]
        );
        assert!(hop.capabilities().has("CHUNKING"));
        assert!(!hop.capabilities().has("STARTTLS"), "forgotten after TLS");
    }

    #[test]
    fn helo_for_an_old_server_and_no_starttls_offered() {
        let (sent, end, _) = open(false, &["220 old\r\n", "502 what\r\n", "250 old\r\n"]);
        assert_eq!(sent, ["EHLO relay.example\r\n", "HELO relay.example\r\n"]);
        assert_eq!(end, Opening::Ready);
        let (_, end, _) = open(true, &["220 old\r\n", "502 what\r\n", "250 old\r\n"]);
        assert!(
            matches!(&end, Opening::Failed(OpeningFailure::Tls { failure: TlsFailure::NotOffered(why), handshake_begun: false }) if why == "mx.example does not offer STARTTLS"),
            "{end:?}"
        );
    }

    #[test]
    fn bytes_after_the_220_to_starttls_are_a_violation() {
        let (_, end, _) = open(
            true,
            &[
                "220 mx\r\n",
                "250-mx\r\n250 STARTTLS\r\n",
                "220 go\r\n250 injected\r\n",
            ],
        );
        let Opening::Failed(OpeningFailure::Tls { failure, .. }) = end else {
            panic!("{end:?}")
        };
        assert!(
            failure.to_string().contains("protocol violation"),
            "{failure}"
        );
    }

    #[test]
    fn a_refused_greeting_makes_the_hop_unavailable() {
        let (_, end, _) = open(true, &["554 go away\r\n"]);
        assert_eq!(
            end,
            Opening::Failed(OpeningFailure::Unavailable(
                "mx.example:25: greeting 554 go away".into()
            ))
        );
        let (_, end, _) = open(true, &["220 mx\r\n", "500 no\r\n", "500 no\r\n"]);
        assert!(matches!(
            end,
            Opening::Failed(OpeningFailure::Unavailable(_))
        ));
    }

    #[test]
    fn starttls_refused_or_ehlo_refused_over_tls() {
        let (_, end, _) = open(
            true,
            &[
                "220 mx\r\n",
                "250-mx\r\n250 STARTTLS\r\n",
                "454 not now\r\n",
            ],
        );
        assert!(matches!(
            end,
            Opening::Failed(OpeningFailure::Tls {
                failure: TlsFailure::NotOffered(_),
                handshake_begun: false
            })
        ));
        let (_, end, _) = open(
            true,
            &[
                "220 mx\r\n",
                "250-mx\r\n250 STARTTLS\r\n",
                "220 go\r\n",
                "421 bye\r\n",
            ],
        );
        assert!(matches!(
            end,
            Opening::Failed(OpeningFailure::Tls {
                handshake_begun: true,
                ..
            })
        ));
    }

    #[test]
    fn a_lost_connection_is_named_by_its_step() {
        let (_, _, mut hop) = open(true, &["220 mx\r\n"]);
        assert_eq!(
            hop.io_failed("timed out"),
            OpeningFailure::Unavailable("mx.example:25: EHLO: timed out".into())
        );
        assert!(matches!(hop.poll(), Opening::Failed(_)));
    }

    #[test]
    fn dot_stuffing_for_bdat_to_data() {
        let mut s = DotStuffer::new();
        let mut out = Vec::new();
        s.stuff(b".starts\r\nmid.dle\r\n.", &mut out);
        s.stuff(b"\r\n", &mut out);
        out.extend(s.finish());
        assert_eq!(out, b"..starts\r\nmid.dle\r\n..\r\n.\r\n");
        let mut s = DotStuffer::new();
        let mut out = Vec::new();
        s.stuff(b"no newline", &mut out);
        out.extend(s.finish());
        assert_eq!(out, b"no newline\r\n.\r\n");
        assert_eq!(DotStuffer::new().finish(), b".\r\n");
    }
}
