//! The client-facing SMTP dialogue as a state machine: bytes from the
//! sending server go in ([`Server::feed`]), events come out
//! ([`Server::poll`]) — replies to write, and the commands the relay must
//! take to the next hop, whose replies come back in through
//! [`Server::respond`]. Pipelined commands wait in the buffer until the
//! reply before them is known, so every MAIL/RCPT/end-of-data reply can be
//! the next hop's.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::clock::RequestClock;
use super::codec::{parse_command, Command, Reply, SyntaxError, MAX_COMMAND_LINE, MAX_TEXT_LINE};
use super::params::{check_rcpt_params, MailParams};
use super::trace::HopCounter;

/// Whether and how this session may use STARTTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartTls {
    /// Offered; plaintext transactions are allowed.
    Offered,
    /// Offered, and required before any transaction (530 otherwise).
    Required,
    /// Not offered (no TLS on this listener).
    Unavailable,
}

#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// The name in the greeting and the EHLO reply.
    pub hostname: String,
    pub starttls: StartTls,
    /// Advertised in SIZE, enforced on MAIL's SIZE parameter and on the
    /// bytes of the message itself.
    pub max_message_size: u64,
    /// `Received:` fields a message may carry before it is refused as a
    /// mail loop.
    pub max_hops: u32,
    /// Postfix's `smtpd_timeout`: what one request may keep the relay
    /// waiting (see [`RequestClock`]).
    pub command_timeout: Duration,
}

/// What the relay must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Write this to the client.
    Reply(Reply),
    /// The 220 to STARTTLS has been queued before this: write it, then run
    /// the TLS handshake and call [`Server::tls_established`].
    StartTls,
    /// The client said HELO (`esmtp` false) or EHLO: the name for the
    /// trace header. Its reply is already queued.
    Hello {
        name: String,
        esmtp: bool,
    },
    /// Answer with [`Server::respond`].
    Mail {
        from: String,
        params: MailParams,
    },
    /// Answer with [`Server::respond`] (the next hop's reply, or a 4xx).
    /// RCPT takes no parameters: the relay advertises none for it.
    Rcpt {
        to: String,
    },
    /// Answer with [`Server::respond`]: 354 starts the body.
    Data,
    /// Body bytes as received (still dot-stuffed, terminator included).
    Body(Vec<u8>),
    /// The DATA body ended; answer with [`Server::respond`] (the final reply).
    EndOfData,
    /// The body broke a limit; the next hop must not get the message:
    /// drop its transaction, write this reply.
    AbortData(Reply),
    /// A BDAT chunk follows as `Body` events; answer with
    /// [`Server::respond`] after `ChunkEnd`.
    Bdat {
        size: u64,
        last: bool,
    },
    ChunkEnd {
        last: bool,
    },
    /// Reset the next hop's transaction (the reply is the relay's own).
    Rset,
    /// The client is done (221 queued); close after writing.
    Quit,
    /// Close after writing (protocol violation or too many errors).
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Before HELO/EHLO.
    Greeted,
    /// Ready for MAIL.
    Ready,
    /// MAIL accepted; RCPT next.
    Mail,
    /// At least one RCPT accepted.
    Rcpt,
    /// Reading a DATA body.
    Body,
    /// Reading a BDAT chunk with this many bytes left.
    Chunk,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    Mail,
    Rcpt,
    Data,
    EndOfData,
    Chunk { last: bool },
}

/// Where the DATA end-marker scan is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    LineStart,
    Dot,
    DotCr,
    InLine,
    Cr,
}

pub struct Server {
    settings: ServerSettings,
    phase: Phase,
    tls: bool,
    esmtp: bool,
    input: Vec<u8>,
    events: VecDeque<Event>,
    /// A command whose reply is awaited; input waits meanwhile.
    pending: Option<Pending>,
    scan: Scan,
    line_len: usize,
    body_error: Option<Reply>,
    chunk_left: u64,
    chunk_last: bool,
    /// BDAT chunks seen in this transaction (DATA is then out of sequence).
    chunking: bool,
    /// The last BDAT byte was a CR (its LF may open the next chunk).
    chunk_cr: bool,
    /// A BDAT chunk broke the line rules: refused at the chunk's end.
    chunk_refusal: Option<Reply>,
    /// Discarding the rest of an overlong command line.
    skipping_line: bool,
    errors: u32,
    /// Commands that move no mail (NOOP, RSET, VRFY, HELP, HELO/EHLO)
    /// since the last message accepted.
    junk: u32,
    /// Bytes of the message under way (DATA as received, BDAT chunks as
    /// announced), against `max_message_size`.
    message_bytes: u64,
    /// `Received:` fields of the message under way.
    hops: HopCounter,
    /// The client's time for the request under way.
    clock: RequestClock,
}

/// Errors (refused commands) before the session is closed with 421.
pub const MAX_ERRORS: u32 = 20;
/// Commands that move no mail since the last message, after which each
/// one also counts as an error (Postfix's `smtpd_junk_command_limit`):
/// a client looping NOOP or RSET is closed after 120 of them.
pub const MAX_JUNK_COMMANDS: u32 = 100;

impl Server {
    pub fn new(settings: ServerSettings) -> Server {
        Server {
            phase: Phase::Greeted,
            tls: false,
            esmtp: false,
            input: Vec::new(),
            events: VecDeque::new(),
            pending: None,
            scan: Scan::LineStart,
            line_len: 0,
            body_error: None,
            chunk_left: 0,
            chunk_last: false,
            chunking: false,
            chunk_cr: false,
            chunk_refusal: None,
            skipping_line: false,
            errors: 0,
            junk: 0,
            message_bytes: 0,
            hops: HopCounter::default(),
            clock: RequestClock::new(settings.command_timeout),
            settings,
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::new(220, format!("{} ESMTP tlsrelay", self.settings.hostname))
    }

    pub fn tls_active(&self) -> bool {
        self.tls
    }

    /// Bytes from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.clock.received(bytes.len());
        if self.phase != Phase::Closed {
            self.input.extend_from_slice(bytes);
        }
    }

    /// A buffer the driver is done with (a `Body` event's, once written
    /// on): it takes the next input, so a session's reads stop allocating.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.input.is_empty() && buf.capacity() >= 4096 && buf.capacity() > self.input.capacity()
        {
            buf.clear();
            self.input = buf;
        }
    }

    /// Bytes of the BDAT chunk under way that are still on the client's
    /// socket (none buffered here, none refused): the driver may move them
    /// to the next hop itself, telling [`Server::chunk_passed`] what went.
    pub fn chunk_on_socket(&self) -> u64 {
        let clean = self.body_error.is_none() && self.chunk_refusal.is_none();
        if self.phase == Phase::Chunk && self.input.is_empty() && clean {
            self.chunk_left
        } else {
            0
        }
    }

    /// `bytes` of the chunk under way were read by the driver (spliced
    /// past this machine, a copy shown here): scanned as [`Server::feed`]
    /// would, counted off the chunk. Returns how many may go on to the
    /// next hop; fewer than all means the message is refused at the
    /// chunk's end and the rest must not be sent.
    pub fn chunk_passed(&mut self, bytes: &[u8]) -> usize {
        self.clock.received(bytes.len());
        let n = bytes.len().min(self.chunk_left as usize);
        self.chunk_left -= n as u64;
        if self.chunk_refusal.is_some() {
            return 0;
        }
        self.scan_chunk(&bytes[..n])
    }

    /// The next thing to do, if any.
    pub fn poll(&mut self) -> Option<Event> {
        if self.events.is_empty() {
            self.advance();
        }
        let event = self.events.pop_front();
        if matches!(event, Some(Event::Reply(_) | Event::AbortData(_))) {
            self.clock.reply_sent();
        }
        event
    }

    /// The driver waits for the client from `now` (a read).
    pub fn client_wait_from(&mut self, now: Instant) {
        self.clock.wait_from(now);
    }

    /// The driver's wait for the client ended at `now`.
    pub fn client_wait_over(&mut self, now: Instant) {
        self.clock.wait_over(now);
    }

    /// When the wait for the client under way runs out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.clock.poll_timeout()
    }

    /// At `now`: when the client's time for its request is up, the
    /// session is over, with this reply (Postfix's 421 4.4.2).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<Reply> {
        if !self.clock.handle_timeout(now) {
            return None;
        }
        self.clock.wait_over(now);
        self.phase = Phase::Closed;
        self.input.clear();
        Some(Reply::new(421, "4.4.2 Timeout, closing"))
    }

    /// The reply to the event that awaited one.
    pub fn respond(&mut self, reply: Reply) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let ok = reply.is_positive();
        match pending {
            Pending::Mail if ok => {
                self.phase = Phase::Mail;
                self.message_bytes = 0;
                self.hops = HopCounter::default();
            }
            Pending::Rcpt if ok => self.phase = Phase::Rcpt,
            // A refused recipient is an error like any refused command
            // (as Postfix counts it): a stranger trying 3,000 addresses is
            // closed after 20, not served on.
            Pending::Rcpt => {
                self.events.push_back(Event::Reply(reply));
                return self.count_error();
            }
            Pending::Data if reply.code == 354 => {
                self.phase = Phase::Body;
                self.scan = Scan::LineStart;
                self.line_len = 0;
                self.body_error = None;
            }
            Pending::EndOfData | Pending::Chunk { last: true } => {
                if ok {
                    self.junk = 0;
                }
                self.end_transaction()
            }
            Pending::Chunk { last: false } if !ok => self.end_transaction(),
            _ => {}
        }
        self.events.push_back(Event::Reply(reply));
    }

    /// TLS is up: RFC 3207 says forget everything learnt before it.
    pub fn tls_established(&mut self) {
        self.tls = true;
        self.phase = Phase::Greeted;
        self.esmtp = false;
        self.input.clear();
    }

    fn end_transaction(&mut self) {
        self.phase = Phase::Ready;
        self.chunking = false;
        self.chunk_cr = false;
        self.chunk_refusal = None;
    }

    fn reply(&mut self, code: u16, text: &str) {
        self.events.push_back(Event::Reply(Reply::new(code, text)));
    }

    fn error(&mut self, code: u16, text: &str) {
        self.reply(code, text);
        self.count_error();
    }

    fn count_error(&mut self) {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.reply(421, "4.7.0 Too many errors, closing");
            self.close();
        }
    }

    /// Past [`MAX_JUNK_COMMANDS`], a command that moves no mail is an
    /// error too (after its own reply).
    fn junk(&mut self) {
        self.junk += 1;
        if self.junk > MAX_JUNK_COMMANDS {
            self.count_error();
        }
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.input.clear();
        self.events.push_back(Event::Close);
    }

    /// Consumes input until an event is produced or more input is needed.
    fn advance(&mut self) {
        while self.events.is_empty() && self.pending.is_none() && self.phase != Phase::Closed {
            let progressed = match self.phase {
                Phase::Body => self.body(),
                Phase::Chunk => self.chunk(),
                _ => self.command(),
            };
            if !progressed {
                return;
            }
        }
    }

    fn command(&mut self) -> bool {
        let Some(end) = self.input.windows(2).position(|w| w == b"\r\n") else {
            if self.input.len() >= MAX_COMMAND_LINE {
                // No CRLF within the limit: refuse the line, drop what came.
                self.input.clear();
                if !self.skipping_line {
                    self.skipping_line = true;
                    self.error(500, "5.5.6 Line too long");
                }
                return !self.events.is_empty();
            }
            return false;
        };
        let line: Vec<u8> = self.input.drain(..end + 2).take(end).collect();
        if std::mem::take(&mut self.skipping_line) {
            return true; // the tail of the overlong line
        }
        match parse_command(&line) {
            Ok(cmd) => self.handle(cmd),
            Err(SyntaxError::LineTooLong) => self.error(500, "5.5.6 Line too long"),
            Err(SyntaxError::Empty) => self.error(500, "5.5.2 Syntax error, command unrecognized"),
            Err(SyntaxError::Parameters(why)) => {
                self.error(501, &format!("5.5.4 Syntax error in parameters: {why}"))
            }
        }
        true
    }

    fn handle(&mut self, cmd: Command) {
        let needs_tls = self.settings.starttls == StartTls::Required && !self.tls;
        let junk = matches!(
            cmd,
            Command::Ehlo(_)
                | Command::Helo(_)
                | Command::Noop
                | Command::Vrfy
                | Command::Help
                | Command::Rset
        );
        self.handle_command(cmd, needs_tls);
        if junk && self.phase != Phase::Closed {
            self.junk();
        }
    }

    fn handle_command(&mut self, cmd: Command, needs_tls: bool) {
        match cmd {
            Command::Ehlo(name) => self.ehlo(name),
            Command::Helo(name) => {
                self.esmtp = false;
                self.phase = Phase::Ready;
                let ours = self.settings.hostname.clone();
                self.reply(250, &ours);
                self.events.push_back(Event::Hello { name, esmtp: false });
            }
            Command::StartTls => self.starttls(),
            Command::Noop => self.reply(250, "2.0.0 OK"),
            Command::Vrfy => self.reply(252, "2.5.2 Cannot VRFY user, but will accept message"),
            Command::Help => self.reply(214, "2.0.0 See RFC 5321"),
            Command::Quit => {
                self.reply(221, "2.0.0 Bye");
                self.phase = Phase::Closed;
                self.input.clear();
                self.events.push_back(Event::Quit);
            }
            Command::Rset => {
                if matches!(self.phase, Phase::Mail | Phase::Rcpt) {
                    self.events.push_back(Event::Rset);
                }
                if self.phase != Phase::Greeted {
                    self.phase = Phase::Ready;
                }
                self.chunking = false;
                self.chunk_cr = false;
                self.reply(250, "2.0.0 OK");
            }
            Command::Unknown(verb) => self.error(502, &format!("5.5.1 {verb} not implemented")),
            Command::Mail { .. } | Command::Rcpt { .. } | Command::Data | Command::Bdat { .. }
                if needs_tls =>
            {
                self.error(530, "5.7.0 Must issue a STARTTLS command first")
            }
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to, params } => self.rcpt(to, params),
            Command::Data => {
                if self.phase != Phase::Rcpt || self.chunking {
                    return self.error(503, "5.5.1 Need RCPT before DATA");
                }
                self.pending = Some(Pending::Data);
                self.events.push_back(Event::Data);
            }
            Command::Bdat { size, last } => self.bdat(size, last),
        }
    }

    /// EHLO: the capabilities (STARTTLS before TLS only, REQUIRETLS over
    /// TLS only, RFC 8689).
    fn ehlo(&mut self, name: String) {
        self.esmtp = true;
        self.phase = Phase::Ready;
        let mut lines = vec![
            self.settings.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.settings.max_message_size),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            "SMTPUTF8".into(),
            "CHUNKING".into(),
        ];
        if !self.tls && self.settings.starttls != StartTls::Unavailable {
            lines.push("STARTTLS".into());
        }
        // RFC 8689: offered over TLS only.
        if self.tls {
            lines.push("REQUIRETLS".into());
        }
        self.events
            .push_back(Event::Reply(Reply::multi(250, lines)));
        self.events.push_back(Event::Hello { name, esmtp: true });
    }

    /// RCPT: in sequence, with parameters the relay can honour, then the
    /// relay decides.
    fn rcpt(&mut self, to: String, params: String) {
        if !matches!(self.phase, Phase::Mail | Phase::Rcpt) {
            return self.error(503, "5.5.1 Need MAIL before RCPT");
        }
        if let Err(e) = check_rcpt_params(&params) {
            let reply = e.reply();
            self.events.push_back(Event::Reply(reply));
            return self.count_error();
        }
        self.pending = Some(Pending::Rcpt);
        self.events.push_back(Event::Rcpt { to });
    }

    /// MAIL: in sequence, within the size limit, then the relay decides.
    fn mail(&mut self, from: String, params: String) {
        if self.phase == Phase::Greeted {
            return self.error(503, "5.5.1 Send HELO/EHLO first");
        }
        if self.phase != Phase::Ready {
            return self.error(503, "5.5.1 Nested MAIL command");
        }
        let params = match MailParams::parse(&params) {
            Ok(params) => params,
            Err(e) => {
                self.events.push_back(Event::Reply(e.reply()));
                return self.count_error();
            }
        };
        if params
            .size
            .is_some_and(|size| size > self.settings.max_message_size)
        {
            return self.error(552, "5.3.4 Message size exceeds fixed limit");
        }
        if params.requiretls && !self.tls {
            return self.error(
                530,
                "5.7.10 REQUIRETLS needs a TLS session (STARTTLS first)",
            );
        }
        self.pending = Some(Pending::Mail);
        self.events.push_back(Event::Mail { from, params });
    }

    /// BDAT: a chunk to read past and refuse when out of sequence (RFC
    /// 3030 2), else relayed.
    fn bdat(&mut self, size: u64, last: bool) {
        if self.phase != Phase::Rcpt || !self.esmtp {
            // The chunk still has to be read past (RFC 3030 2).
            self.chunk_left = size;
            self.chunk_last = last;
            self.body_error = Some(Reply::new(503, "5.5.1 Need RCPT before BDAT"));
            self.phase = Phase::Chunk;
            return;
        }
        self.chunking = true;
        self.chunk_left = size;
        self.chunk_last = last;
        self.body_error = None;
        self.phase = Phase::Chunk;
        // The chunk says its size first: one past the limit is refused
        // before a byte of it goes on (and read past, RFC 3030 2).
        self.message_bytes = self.message_bytes.saturating_add(size);
        if self.message_bytes > self.settings.max_message_size && self.chunk_refusal.is_none() {
            self.chunk_refusal = Some(BodyFault::TooBig.reply());
        }
        self.events.push_back(Event::Bdat { size, last });
    }

    fn starttls(&mut self) {
        if self.tls {
            return self.error(503, "5.5.1 TLS already active");
        }
        if self.settings.starttls == StartTls::Unavailable {
            return self.error(454, "4.7.0 TLS not available due to local problem");
        }
        if !self.input.is_empty() {
            // Anything pipelined after STARTTLS would be read as if it
            // came over TLS (CVE-2011-0411): drop it and refuse.
            self.input.clear();
            return self.error(503, "5.5.1 STARTTLS must be the last command in a group");
        }
        self.reply(220, "2.0.0 Ready to start TLS");
        self.events.push_back(Event::StartTls);
    }

    /// The first `n` input bytes. Most reads are body through and through:
    /// then the buffer itself moves on, uncopied.
    fn take_input(&mut self, n: usize) -> Vec<u8> {
        if n == self.input.len() {
            std::mem::take(&mut self.input)
        } else {
            self.input.drain(..n).collect()
        }
    }

    /// Forwards DATA body bytes until the end marker. Lines must end in
    /// CRLF: a bare CR or LF (SMTP smuggling, the CVE-2023-51764 class) or
    /// a line over 1000 octets refuses the message, and no byte from the
    /// offending one on is passed on, so the relay's end of data and the
    /// bytes a next hop sees always agree. A CR at the end of the input
    /// waits for the byte after it.
    fn body(&mut self) -> bool {
        let refused_before = self.body_error.is_some();
        let mut end = None;
        let mut offence = None;
        let n = self.input.len();
        let mut i = 0;
        while i < n {
            // Ordinary bytes up to the next CR or LF only lengthen the line
            // (and leave a lone '.' at its start noted): skipped in one step.
            let next = memchr::memchr2(b'\r', b'\n', &self.input[i..]).map_or(n, |p| i + p);
            let run = next - i;
            if run > 0 {
                if self.line_len + run > MAX_TEXT_LINE {
                    let at = i + MAX_TEXT_LINE.saturating_sub(self.line_len);
                    offence.get_or_insert((at, BodyFault::LineTooLong));
                }
                self.line_len += run;
                let lone_dot = self.scan == Scan::LineStart && run == 1 && self.input[i] == b'.';
                self.scan = if lone_dot { Scan::Dot } else { Scan::InLine };
                i = next;
                if i == n {
                    break;
                }
            }
            let b = self.input[i];
            self.line_len += 1;
            if self.line_len > MAX_TEXT_LINE {
                offence.get_or_insert((i, BodyFault::LineTooLong));
            }
            self.scan = match (self.scan, b) {
                (_, b'\r') if i + 1 == n => {
                    self.line_len -= 1;
                    break;
                }
                (scan, b'\r') if self.input[i + 1] == b'\n' => {
                    if scan == Scan::Dot {
                        Scan::DotCr
                    } else {
                        Scan::Cr
                    }
                }
                (_, b'\r') => {
                    offence.get_or_insert((i, BodyFault::BareCr));
                    Scan::InLine
                }
                (Scan::DotCr, b'\n') => {
                    end = Some(i + 1);
                    break;
                }
                (Scan::Cr, b'\n') => {
                    self.line_len = 0;
                    Scan::LineStart
                }
                (_, b'\n') => {
                    offence.get_or_insert((i, BodyFault::BareLf));
                    Scan::InLine
                }
                (Scan::LineStart, b'.') => Scan::Dot,
                _ => Scan::InLine,
            };
            i += 1;
        }
        let consumed = end.unwrap_or(i);
        if consumed == 0 {
            return false; // only a CR, waiting for its next byte
        }
        if let Some(at) = self.message_limits(consumed) {
            if offence.is_none_or(|(first, _)| at.0 < first) {
                offence = Some(at);
            }
        }
        let mut chunk = self.take_input(consumed);
        if let (Some((at, fault)), false) = (offence, refused_before) {
            chunk.truncate(at);
            self.body_error = Some(fault.reply());
        }
        if !refused_before && !chunk.is_empty() {
            self.events.push_back(Event::Body(chunk));
        }
        if end.is_some() {
            self.line_len = 0;
            self.scan = Scan::LineStart;
            match self.body_error.take() {
                None => {
                    self.pending = Some(Pending::EndOfData);
                    self.phase = Phase::Rcpt; // until the final reply
                    self.events.push_back(Event::EndOfData);
                }
                Some(reply) => {
                    self.end_transaction();
                    self.events.push_back(Event::AbortData(reply));
                }
            }
        }
        true
    }

    /// Counts the next `n` input bytes (DATA) against the message limits:
    /// where the first broken one is broken, if any. The size counts the
    /// bytes received, whatever SIZE declared; the hop count the
    /// `Received:` fields of the header section.
    fn message_limits(&mut self, n: usize) -> Option<(usize, BodyFault)> {
        let before = self.message_bytes;
        self.message_bytes = before.saturating_add(n as u64);
        self.hops.feed(&self.input[..n]);
        if self.hops.received() > self.settings.max_hops {
            return Some((0, BodyFault::TooManyHops));
        }
        let max = self.settings.max_message_size;
        (self.message_bytes > max).then(|| (max.saturating_sub(before) as usize, BodyFault::TooBig))
    }

    /// Bare CR or LF in a BDAT chunk: the chunk's count still frames it,
    /// but a next hop that turns it into DATA (or this relay, for a next
    /// hop without CHUNKING) would not, so it is refused like DATA's.
    /// Returns how many of `bytes` are clean.
    fn scan_chunk(&mut self, bytes: &[u8]) -> usize {
        self.hops.feed(bytes);
        if self.hops.received() > self.settings.max_hops {
            self.chunk_refusal = Some(BodyFault::TooManyHops.reply());
            return 0;
        }
        let mut i = 0;
        while i < bytes.len() {
            let next = memchr::memchr2(b'\r', b'\n', &bytes[i..]).map_or(bytes.len(), |p| i + p);
            if next > i {
                // Ordinary bytes: a CR before them was bare.
                if std::mem::take(&mut self.chunk_cr) {
                    self.chunk_refusal = Some(BodyFault::BareCr.reply());
                    return i.saturating_sub(1);
                }
                if next == bytes.len() {
                    break;
                }
            }
            let b = bytes[next];
            let fault = match (self.chunk_cr, b) {
                (true, b'\n') | (false, b'\r') => None,
                (true, _) => Some((next.saturating_sub(1), BodyFault::BareCr)),
                (false, _) => Some((next, BodyFault::BareLf)),
            };
            self.chunk_cr = b == b'\r';
            if let Some((at, fault)) = fault {
                self.chunk_refusal = Some(fault.reply());
                return at;
            }
            i = next + 1;
        }
        bytes.len()
    }

    /// Forwards exactly the announced BDAT bytes.
    fn chunk(&mut self) -> bool {
        if self.chunk_left > 0 {
            if self.input.is_empty() {
                return false;
            }
            let take = (self.chunk_left as usize).min(self.input.len());
            let mut chunk = self.take_input(take);
            self.chunk_left -= take as u64;
            if self.body_error.is_none() && self.chunk_refusal.is_none() {
                chunk.truncate(self.scan_chunk(&chunk));
                if !chunk.is_empty() {
                    self.events.push_back(Event::Body(chunk));
                }
            }
            if self.chunk_left > 0 {
                return true;
            }
        }
        let last = self.chunk_last;
        if last && self.chunk_cr && self.chunk_refusal.is_none() && self.body_error.is_none() {
            self.chunk_refusal = Some(BodyFault::BareCr.reply()); // the message ends in a CR
        }
        if let Some(reply) = self.chunk_refusal.take() {
            self.end_transaction();
            self.events.push_back(Event::AbortData(reply));
            return true;
        }
        match self.body_error.take() {
            Some(reply) => {
                // An out-of-sequence BDAT: its bytes are gone, say why.
                self.phase = if self.phase == Phase::Chunk && self.esmtp {
                    Phase::Ready
                } else {
                    Phase::Greeted
                };
                self.events.push_back(Event::Reply(reply));
                self.count_error();
            }
            None => {
                self.phase = Phase::Rcpt;
                self.pending = Some(Pending::Chunk { last });
                self.events.push_back(Event::ChunkEnd { last });
            }
        }
        true
    }
}

/// What makes a message body unacceptable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyFault {
    LineTooLong,
    BareCr,
    BareLf,
    /// Past `max_message_size`.
    TooBig,
    /// More `Received:` fields than `max_hops`: a mail loop.
    TooManyHops,
}

impl BodyFault {
    fn reply(self) -> Reply {
        match self {
            BodyFault::LineTooLong => Reply::new(500, "5.5.6 Line too long in message body"),
            BodyFault::BareCr => Reply::new(
                554,
                "5.6.0 Bare CR in message data refused: lines must end in CRLF",
            ),
            BodyFault::BareLf => Reply::new(
                554,
                "5.6.0 Bare LF in message data refused: lines must end in CRLF",
            ),
            BodyFault::TooBig => Reply::new(552, "5.3.4 Message size exceeds fixed limit"),
            BodyFault::TooManyHops => Reply::new(554, "5.4.6 Too many hops"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(starttls: StartTls) -> Server {
        Server::new(ServerSettings {
            hostname: "relay.test".into(),
            starttls,
            max_message_size: 1 << 20,
            max_hops: 3,
            command_timeout: Duration::from_secs(300),
        })
    }

    fn drain(s: &mut Server) -> Vec<Event> {
        std::iter::from_fn(|| s.poll()).collect()
    }

    fn codes(events: &[Event]) -> Vec<u16> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Reply(r) => Some(r.code),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ehlo_advertises_capabilities_and_starttls_only_before_tls() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO client.test\r\n");
        let ev = drain(&mut s);
        let Event::Reply(r) = &ev[0] else { panic!() };
        for cap in [
            "PIPELINING",
            "SIZE 1048576",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "CHUNKING",
            "STARTTLS",
        ] {
            assert!(r.lines.iter().any(|l| l == cap), "{cap} in {r:?}");
        }
        s.feed(b"STARTTLS\r\n");
        assert_eq!(
            drain(&mut s),
            vec![
                Event::Reply(Reply::new(220, "2.0.0 Ready to start TLS")),
                Event::StartTls
            ]
        );
        s.tls_established();
        s.feed(b"EHLO client.test\r\n");
        let ev = drain(&mut s);
        let Event::Reply(r) = &ev[0] else { panic!() };
        assert!(
            !r.lines.iter().any(|l| l == "STARTTLS"),
            "never offered twice"
        );
        s.feed(b"STARTTLS\r\n");
        assert_eq!(codes(&drain(&mut s)), vec![503]);
    }

    #[test]
    fn plaintext_pipelined_after_starttls_is_discarded() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n");
        let ev = drain(&mut s);
        assert_eq!(codes(&ev), vec![250, 503]);
        assert!(
            !ev.iter()
                .any(|e| matches!(e, Event::Mail { .. } | Event::StartTls)),
            "{ev:?}"
        );
        // After a clean STARTTLS, bytes that arrive before the handshake
        // belong to no one: establishing TLS forgets them.
        s.feed(b"STARTTLS\r\n");
        assert_eq!(codes(&drain(&mut s)), vec![220]);
        s.feed(b"MAIL FROM:<injected@x>\r\n");
        s.tls_established();
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn required_tls_refuses_transactions_before_starttls() {
        let mut s = server(StartTls::Required);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nNOOP\r\n");
        let ev = drain(&mut s);
        assert_eq!(codes(&ev), vec![250, 530, 530, 530, 250]);
        let Event::Reply(r) = &ev[2] else {
            panic!("{ev:?}")
        };
        assert_eq!(r.text(), "5.7.0 Must issue a STARTTLS command first");
    }

    #[test]
    fn pipelined_transaction_waits_for_each_next_hop_reply() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@p.example>\r\nRCPT TO:<y@p.example>\r\nDATA\r\n");
        let ev = drain(&mut s);
        assert_eq!(codes(&ev), vec![250]);
        assert!(matches!(ev.last(), Some(Event::Mail { .. })));
        // Nothing after MAIL is read until MAIL's reply is known.
        assert_eq!(s.poll(), None);
        s.respond(Reply::new(250, "2.1.0 Ok"));
        let ev = drain(&mut s);
        assert!(
            matches!(ev.as_slice(), [Event::Reply(_), Event::Rcpt { to, .. }] if to == "x@p.example")
        );
        s.respond(Reply::new(250, "2.1.5 Ok"));
        let ev = drain(&mut s);
        assert!(
            matches!(ev.as_slice(), [Event::Reply(_), Event::Rcpt { to, .. }] if to == "y@p.example")
        );
        s.respond(Reply::new(452, "4.5.3 other transaction"));
        // One recipient accepted: DATA goes ahead.
        assert!(
            matches!(drain(&mut s).as_slice(), [Event::Reply(r), Event::Data] if r.code == 452)
        );
    }

    #[test]
    fn mail_rcpt_data_body_end_marker_and_final_reply() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@p.example>\r\nDATA\r\n");
        let mut ev = drain(&mut s);
        assert!(matches!(ev.pop(), Some(Event::Mail { .. })));
        s.respond(Reply::new(250, "2.1.0 Ok"));
        assert!(matches!(
            drain(&mut s).as_slice(),
            [Event::Reply(_), Event::Rcpt { .. }]
        ));
        s.respond(Reply::new(250, "2.1.5 Ok"));
        assert!(matches!(
            drain(&mut s).as_slice(),
            [Event::Reply(_), Event::Data]
        ));
        s.respond(Reply::new(354, "End data with <CR><LF>.<CR><LF>"));
        assert_eq!(codes(&drain(&mut s)), vec![354]);
        // Split across feeds, with a stuffed dot line kept as is.
        s.feed(b"Subject: t\r\n\r\n..leading dot\r\n.");
        s.feed(b"\r\nQUIT\r\n");
        let ev = drain(&mut s);
        let body: Vec<u8> = ev
            .iter()
            .filter_map(|e| match e {
                Event::Body(b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(body, b"Subject: t\r\n\r\n..leading dot\r\n.\r\n");
        assert_eq!(ev.last(), Some(&Event::EndOfData));
        s.respond(Reply::new(250, "2.0.0 Ok: queued as ABC"));
        let ev = drain(&mut s);
        assert_eq!(codes(&ev), vec![250, 221]);
        assert_eq!(ev.last(), Some(&Event::Quit));
    }

    #[test]
    fn a_rejected_rcpt_keeps_the_transaction_open_for_others() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@elsewhere>\r\nDATA\r\n");
        drain(&mut s);
        s.respond(Reply::new(250, "ok"));
        drain(&mut s);
        s.respond(Reply::new(
            452,
            "4.5.3 Send this recipient in another transaction",
        ));
        // With no accepted recipient, DATA is out of sequence.
        assert_eq!(codes(&drain(&mut s)), vec![452, 503]);
    }

    #[test]
    fn bdat_chunks_are_counted_bytes() {
        let mut s = in_transaction();
        s.feed(b"BDAT 5\r\nab\r\n.BDAT 3 LAST\r\nxyz");
        let ev = drain(&mut s);
        assert_eq!(
            ev[0],
            Event::Bdat {
                size: 5,
                last: false
            }
        );
        assert_eq!(ev[1], Event::Body(b"ab\r\n.".to_vec()));
        assert_eq!(ev[2], Event::ChunkEnd { last: false });
        s.respond(Reply::new(250, "2.0.0 chunk"));
        let ev = drain(&mut s);
        assert_eq!(
            ev[1],
            Event::Bdat {
                size: 3,
                last: true
            }
        );
        assert_eq!(ev[2], Event::Body(b"xyz".to_vec()));
        assert_eq!(ev[3], Event::ChunkEnd { last: true });
        s.respond(Reply::new(250, "2.0.0 queued"));
        s.feed(b"DATA\r\n");
        assert_eq!(
            codes(&drain(&mut s)),
            vec![250, 503],
            "a new transaction needs MAIL"
        );
    }

    #[test]
    fn line_limits() {
        let mut s = server(StartTls::Offered);
        let mut long = vec![b'N'; 600];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        s.feed(&long);
        assert_eq!(codes(&drain(&mut s)), vec![500, 250]);
        // A body line over 1000 octets: the message is not passed on.
        let mut s = in_body();
        let mut body = vec![b'x'; 1200];
        body.extend_from_slice(b"\r\n.\r\n");
        s.feed(&body);
        let ev = drain(&mut s);
        assert!(
            matches!(ev.last(), Some(Event::AbortData(r)) if r.code == 500),
            "{ev:?}"
        );
    }

    #[test]
    fn a_loop_of_commands_that_move_no_mail_is_closed() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\n");
        let mut flood = Vec::new();
        for _ in 0..200 {
            flood.extend_from_slice(b"NOOP\r\n");
        }
        s.feed(&flood);
        let ev = drain(&mut s);
        let c = codes(&ev);
        // EHLO and 119 NOOPs answered, then 421 and the close: 120 junk
        // commands, the last 20 of them errors.
        let limit = (MAX_JUNK_COMMANDS + MAX_ERRORS) as usize;
        assert_eq!(c.len(), limit + 1, "{c:?}");
        assert!(c[..limit].iter().all(|&c| c == 250));
        assert_eq!(c[limit], 421);
        assert!(matches!(ev.last(), Some(Event::Close)));
    }

    #[test]
    fn a_delivered_message_resets_the_junk_count() {
        let mut s = in_transaction();
        let mut noops = Vec::new();
        for _ in 0..MAX_JUNK_COMMANDS - 2 {
            noops.extend_from_slice(b"NOOP\r\n");
        }
        s.feed(&noops);
        s.feed(b"DATA\r\n");
        drain(&mut s);
        s.respond(Reply::new(354, "go"));
        s.feed(b"x\r\n.\r\n");
        drain(&mut s);
        s.respond(Reply::new(250, "queued"));
        drain(&mut s);
        // 98 more: past the limit had the count gone on.
        s.feed(&noops);
        let c = codes(&drain(&mut s));
        assert_eq!(c.len(), MAX_JUNK_COMMANDS as usize - 2);
        assert!(c.iter().all(|&c| c == 250), "{c:?}");
    }

    #[test]
    fn size_and_sequence_errors() {
        let mut s = server(StartTls::Offered);
        s.feed(
            b"MAIL FROM:<a@b>\r\nEHLO c\r\nMAIL FROM:<a@b> SIZE=5000000\r\nRCPT TO:<x@p>\r\nBOGUS\r\n",
        );
        assert_eq!(codes(&drain(&mut s)), vec![503, 250, 552, 503, 502]);
    }

    /// A server with a recipient accepted, ready for DATA or BDAT.
    /// The request clock is the machine's: a reply restarts it, message
    /// bytes earn time, and its timeout closes the session with 421 4.4.2
    /// after which input is ignored.
    #[test]
    fn the_request_clock_runs_inside_the_machine() {
        let secs = Duration::from_secs;
        let t0 = Instant::now();
        let mut s = server(StartTls::Offered);
        s.client_wait_from(t0);
        assert_eq!(s.poll_timeout(), Some(t0 + secs(300)));
        let t1 = t0 + secs(299);
        s.client_wait_over(t1);
        s.feed(b"EHLO a.test\r\n");
        assert_eq!(codes(&drain(&mut s)), [250]);
        s.client_wait_from(t1);
        assert_eq!(
            s.poll_timeout(),
            Some(t1 + secs(300)),
            "the reply restarted it"
        );
        // In a message: 200 s of waiting, then 50,000 bytes (100 s earned).
        let mut s = in_body();
        s.client_wait_from(t0);
        s.client_wait_over(t0 + secs(200));
        s.feed(&b"x".repeat(998)[..]);
        s.feed(b"\r\n");
        for _ in 0..49 {
            s.feed(&[b"y".repeat(998), b"\r\n".to_vec()].concat());
        }
        let t2 = t0 + secs(200);
        s.client_wait_from(t2);
        assert_eq!(s.poll_timeout(), Some(t2 + secs(200)));
        assert_eq!(s.handle_timeout(t2 + secs(199)), None);
        let goodbye = s.handle_timeout(t2 + secs(200)).expect("timed out");
        assert_eq!(goodbye.code, 421);
        s.feed(b".\r\nQUIT\r\n");
        assert!(drain(&mut s).iter().all(|e| !matches!(e, Event::Reply(_))));
    }

    fn in_transaction() -> Server {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@p>\r\n");
        drain(&mut s);
        s.respond(Reply::new(250, "ok"));
        drain(&mut s);
        s.respond(Reply::new(250, "ok"));
        drain(&mut s);
        s
    }

    /// A server in DATA body state, ready for bytes.
    fn in_body() -> Server {
        let mut s = in_transaction();
        s.feed(b"DATA\r\n");
        drain(&mut s);
        s.respond(Reply::new(354, "go"));
        drain(&mut s);
        s
    }

    fn body_of(events: &[Event]) -> Vec<u8> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Body(b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Every smuggling variant, fed whole and one byte at a time: the
    /// message is refused at the relay's own (CRLF.CRLF) end of data, the
    /// commands smuggled inside are never read as commands, and no byte
    /// from the bare CR or LF on is passed on.
    #[test]
    fn bare_cr_and_lf_in_data_refuse_the_message_and_pass_nothing_on() {
        // (variant, where its first bare byte is, what it is)
        for (variant, clean, fault) in [
            (&b"\n.\n"[..], 0, "Bare LF"),
            (b"\r\n.\n", 3, "Bare LF"),
            (b"\n.\r\n", 0, "Bare LF"),
            (b"\r.\r", 0, "Bare CR"),
            (b"\r.\r\n", 0, "Bare CR"),
            (b"\r\n.\r", 3, "Bare CR"),
        ] {
            for bytewise in [false, true] {
                let mut s = in_body();
                let mut input = b"Subject: hi\r\n\r\nclean line".to_vec();
                input.extend_from_slice(variant);
                input.extend_from_slice(
                    b"MAIL FROM:<forged@partner.example>\r\nRCPT TO:<x@p>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n",
                );
                let mut events = Vec::new();
                if bytewise {
                    for b in &input {
                        s.feed(std::slice::from_ref(b));
                        events.extend(drain(&mut s));
                    }
                } else {
                    s.feed(&input);
                    events = drain(&mut s);
                }
                let label = format!("{:?} bytewise={bytewise}", String::from_utf8_lossy(variant));
                let want = [&b"Subject: hi\r\n\r\nclean line"[..], &variant[..clean]].concat();
                assert_eq!(
                    body_of(&events),
                    want,
                    "{label}: nothing from the bare byte on"
                );
                assert!(
                    !events.iter().any(|e| matches!(
                        e,
                        Event::Mail { .. } | Event::Rcpt { .. } | Event::Data | Event::EndOfData
                    )),
                    "{label}: {events:?}"
                );
                let abort = events.iter().find_map(|e| match e {
                    Event::AbortData(r) => Some(r.clone()),
                    _ => None,
                });
                let abort = abort.unwrap_or_else(|| panic!("{label}: no refusal in {events:?}"));
                assert_eq!(abort.code, 554, "{label}");
                assert!(abort.text().contains(fault), "{label}: {abort:?}");
                // The session goes on after the relay's end of data.
                assert_eq!(codes(&events), vec![250], "{label}: NOOP answered");
            }
        }
    }

    /// The body scan skips from CR/LF to CR/LF: however the input is split
    /// (whole, byte by byte, in odd pieces) the same bytes pass and the
    /// same end or refusal comes, for bodies of dots, CRs, LFs and lines
    /// around the 1000-octet limit.
    #[test]
    fn the_body_scan_does_not_depend_on_how_reads_split_the_input() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let outcome = |events: &[Event]| {
            let last = events
                .iter()
                .rev()
                .find(|e| matches!(e, Event::EndOfData | Event::AbortData(_)))
                .cloned();
            (body_of(events), last)
        };
        for _ in 0..300 {
            let mut input = Vec::new();
            for _ in 0..next(12) {
                match next(8) {
                    0 => input.extend(b"\r\n"),
                    1 => input.extend(b"\r\n."),
                    2 => input.push(b'\r'),
                    3 => input.push(b'\n'),
                    4 => input.push(b'.'),
                    5 => input.extend(std::iter::repeat_n(b'x', 990 + next(20))),
                    _ => input.extend(b"text"),
                }
            }
            input.extend(b"\r\n.\r\n");
            let whole = {
                let mut s = in_body();
                s.feed(&input);
                outcome(&drain(&mut s))
            };
            let mut bytewise = in_body();
            let mut events = Vec::new();
            for b in &input {
                bytewise.feed(std::slice::from_ref(b));
                events.extend(drain(&mut bytewise));
            }
            assert_eq!(
                outcome(&events),
                whole,
                "bytewise: {:?}",
                String::from_utf8_lossy(&input)
            );
            let mut pieces = in_body();
            let mut events = Vec::new();
            let mut at = 0;
            while at < input.len() {
                let end = (at + 1 + next(64)).min(input.len());
                pieces.feed(&input[at..end]);
                events.extend(drain(&mut pieces));
                at = end;
            }
            assert_eq!(
                outcome(&events),
                whole,
                "pieces: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn body_lines_may_be_1000_octets_with_their_crlf_and_no_more() {
        for (content, refused) in [(998, false), (999, true)] {
            let mut s = in_body();
            let mut input = vec![b'x'; content];
            input.extend(b"\r\n.\r\n");
            s.feed(&input);
            let ev = drain(&mut s);
            match ev.last() {
                Some(Event::AbortData(r)) => assert!(refused && r.code == 500, "{content}: {r:?}"),
                Some(Event::EndOfData) => assert!(!refused, "{content}"),
                other => panic!("{content}: {other:?}"),
            }
        }
    }

    /// Body bytes move out of the server without a copy, and the buffer
    /// comes back for the next read: a message of many reads allocates
    /// once.
    #[test]
    fn a_recycled_body_buffer_takes_the_next_read() {
        let mut s = in_body();
        let read = [&[b'x'; 78][..], b"\r\n"].concat().repeat(100);
        s.feed(&read);
        let first = match drain(&mut s).pop() {
            Some(Event::Body(bytes)) => bytes,
            other => panic!("{other:?}"),
        };
        let at = first.as_ptr();
        s.recycle(first);
        s.feed(&read);
        match drain(&mut s).pop() {
            Some(Event::Body(bytes)) => assert_eq!(bytes.as_ptr(), at, "the same buffer"),
            other => panic!("{other:?}"),
        }
        // A small buffer (a command's) is not taken.
        s.recycle(b"MAIL FROM:<a@b>\r\n".to_vec());
        s.feed(b".\r\n");
        assert_eq!(drain(&mut s).last(), Some(&Event::EndOfData));
    }

    /// Chunk bytes the driver moves itself are counted off and scanned
    /// like fed ones: the chunk then ends, or is refused, as if fed.
    #[test]
    fn chunk_bytes_passed_by_the_driver_count_and_are_scanned() {
        let mut s = in_transaction();
        s.feed(b"BDAT 10 LAST\r\nab");
        let ev = drain(&mut s);
        assert_eq!(body_of(&ev), b"ab");
        assert_eq!(s.chunk_on_socket(), 8, "the rest is on the socket");
        assert_eq!(s.chunk_passed(b"c\r\nd"), 4);
        assert_eq!(s.chunk_on_socket(), 4);
        assert_eq!(s.chunk_passed(b"e\nfg"), 1, "clean up to the bare LF");
        assert_eq!(s.chunk_on_socket(), 0, "refused: the driver stops");
        let ev = drain(&mut s);
        assert!(
            matches!(ev.last(), Some(Event::AbortData(r)) if r.code == 554),
            "{ev:?}"
        );
        // A clean chunk ends as fed ones do.
        let mut s = in_transaction();
        s.feed(b"BDAT 4 LAST\r\n");
        drain(&mut s);
        assert_eq!(s.chunk_passed(b"ok\r\n"), 4);
        assert_eq!(drain(&mut s).last(), Some(&Event::ChunkEnd { last: true }));
    }

    /// The size limit holds on the bytes, whatever SIZE declared: DATA
    /// past it passes nothing from the byte that crosses it and ends in
    /// 552; a BDAT chunk that would cross it is read past and refused.
    #[test]
    fn message_size_is_enforced_on_the_bytes() {
        let limit = 1 << 20;
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b> SIZE=10\r\n");
        drain(&mut s);
        s.respond(Reply::new(250, "ok"));
        s.feed(b"RCPT TO:<x@p>\r\n");
        drain(&mut s);
        s.respond(Reply::new(250, "ok"));
        s.feed(b"DATA\r\n");
        drain(&mut s);
        s.respond(Reply::new(354, "go"));
        drain(&mut s);
        let line = [&[b'x'; 998][..], b"\r\n"].concat();
        let mut passed = 0;
        let mut end = None;
        for _ in 0..2000 {
            s.feed(&line);
            for e in drain(&mut s) {
                match e {
                    Event::Body(b) => passed += b.len(),
                    Event::AbortData(r) | Event::Reply(r) => end = Some(r),
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(passed, limit, "exactly up to the limit");
        assert!(end.is_none(), "refused at the end of data, not before");
        s.feed(b".\r\n");
        let ev = drain(&mut s);
        assert!(
            matches!(ev.last(), Some(Event::AbortData(r)) if r.code == 552 && r.text().starts_with("5.3.4")),
            "{ev:?}"
        );

        // BDAT without SIZE: the chunk that crosses the limit is refused
        // and nothing of it passes; the ones before it went.
        let mut s = in_transaction();
        s.feed(b"BDAT 1000000\r\n");
        s.feed(&vec![b'x'; 1_000_000]);
        let ev = drain(&mut s);
        assert_eq!(body_of(&ev).len(), 1_000_000);
        s.respond(Reply::new(250, "chunk"));
        drain(&mut s);
        s.feed(b"BDAT 100000 LAST\r\n");
        s.feed(&vec![b'y'; 100_000]);
        let ev = drain(&mut s);
        assert!(
            body_of(&ev).is_empty(),
            "{} bytes passed",
            body_of(&ev).len()
        );
        assert!(
            matches!(ev.last(), Some(Event::AbortData(r)) if r.code == 552),
            "{ev:?}"
        );
        assert_eq!(s.chunk_on_socket(), 0);
    }

    /// More Received fields than `max_hops` (3 here) is a mail loop: 554
    /// 5.4.6 at the end of data, by DATA and by BDAT.
    #[test]
    fn too_many_received_fields_are_a_loop() {
        let headers =
            |n: usize| "Received: from x by y; date\r\n".repeat(n) + "Subject: s\r\n\r\nbody\r\n";
        for (n, refused) in [(3, false), (4, true)] {
            let mut s = in_body();
            s.feed(format!("{}.\r\n", headers(n)).as_bytes());
            let ev = drain(&mut s);
            match ev.last() {
                Some(Event::AbortData(r)) => assert!(
                    refused && r.code == 554 && r.text() == "5.4.6 Too many hops",
                    "{n}: {r:?}"
                ),
                Some(Event::EndOfData) => assert!(!refused, "{n}"),
                other => panic!("{n}: {other:?}"),
            }
            let mut s = in_transaction();
            let message = headers(n);
            s.feed(format!("BDAT {} LAST\r\n{message}", message.len()).as_bytes());
            let ev = drain(&mut s);
            match ev.last() {
                Some(Event::AbortData(r)) => assert!(refused && r.code == 554, "{n}: {r:?}"),
                Some(Event::ChunkEnd { last: true }) => assert!(!refused, "{n}"),
                other => panic!("{n}: {other:?}"),
            }
        }
    }

    /// An out-of-sequence BDAT is an error like any other: enough of them
    /// close the session with 421.
    #[test]
    fn out_of_sequence_bdat_counts_toward_the_error_limit() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\n");
        drain(&mut s);
        s.feed(&b"BDAT 1\r\nx".repeat(MAX_ERRORS as usize + 5));
        let ev = drain(&mut s);
        let c = codes(&ev);
        assert_eq!(c.len(), MAX_ERRORS as usize + 1, "{c:?}");
        assert_eq!(c.last(), Some(&421));
        assert!(matches!(ev.last(), Some(Event::Close)));
    }

    #[test]
    fn crlf_split_across_reads_is_not_bare() {
        let mut s = in_body();
        for part in [&b"line one\r"[..], b"\nline two\r", b"\n.", b"\r", b"\n"] {
            s.feed(part);
        }
        let ev = drain(&mut s);
        assert_eq!(body_of(&ev), b"line one\r\nline two\r\n.\r\n");
        assert_eq!(ev.last(), Some(&Event::EndOfData));
    }

    #[test]
    fn bare_cr_and_lf_in_bdat_refuse_the_message() {
        for (chunks, clean) in [
            (vec![&b"a\r\nb\nc\r\n"[..]], &b"a\r\nb"[..]),
            (vec![b"a\r", b"\nb\r", b"x\r\n"], b"a\r\nb\r"),
            (vec![b"a\r\n", b"ends in CR\r"], b"a\r\nends in CR\r"),
        ] {
            let mut s = in_transaction();
            let mut events = Vec::new();
            for (i, chunk) in chunks.iter().enumerate() {
                let last = if i + 1 == chunks.len() { " LAST" } else { "" };
                s.feed(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes());
                s.feed(chunk);
                let ev = drain(&mut s);
                if ev.iter().any(|e| matches!(e, Event::ChunkEnd { .. })) {
                    s.respond(Reply::new(250, "chunk ok"));
                }
                events.extend(ev);
                events.extend(drain(&mut s));
            }
            assert_eq!(body_of(&events), clean, "{chunks:?}");
            assert!(
                matches!(events.last(), Some(Event::AbortData(r)) if r.code == 554),
                "{chunks:?}: {events:?}"
            );
            s.feed(b"MAIL FROM:<a@b>\r\n");
            assert!(
                matches!(drain(&mut s).as_slice(), [Event::Mail { .. }]),
                "a new transaction may start"
            );
        }
    }

    #[test]
    fn control_characters_in_command_lines_are_refused() {
        let mut s = server(StartTls::Offered);
        s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@accepted.example> X\nRCPT TO:<victim@foreign.example>\r\n");
        let ev = drain(&mut s);
        assert!(matches!(ev.last(), Some(Event::Mail { .. })));
        s.respond(Reply::new(250, "ok"));
        let ev = drain(&mut s);
        assert_eq!(codes(&ev), vec![250, 501], "{ev:?}");
        assert!(!ev.iter().any(|e| matches!(e, Event::Rcpt { .. })));
    }
}
