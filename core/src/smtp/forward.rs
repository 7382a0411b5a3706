//! The relaying half of an SMTP session as a state machine, free of I/O:
//! the client's commands (as [`Event`]s from [`super::server`]) and the
//! next hop's replies in, [`Action`]s out. Who may send what, routing by
//! recipient domain, 452 for a second route, MAIL replayed at the first
//! RCPT, BDAT relayed or converted to DATA, aborts and the drain's 421 all
//! live here; the driver only moves bytes and keeps the clocks.
//!
//! The dialogue is lock-step: after each client event the driver performs
//! actions until [`Forwarder::poll`] has none, answering every
//! [`Action::Await`] with [`Forwarder::hop_reply`] or
//! [`Forwarder::hop_failed`] and every [`Action::Open`] with
//! [`Forwarder::hop_opened`] or [`Forwarder::hop_unavailable`].

use std::collections::VecDeque;
use std::sync::Arc;

use super::address::{is_hostname, route, DomainPattern};
use super::admission::{Admission, Client};
use super::codec::{Capabilities, Reply};
use super::next_hop::{DotStuffer, Wait};
use super::params::MailParams;
use super::server::Event;
use super::trace::Arrival;
use crate::policy::{PeerTrust, TlsFailure};
use crate::report::LegSecurity;
pub use crate::report::Transaction;

/// Where an SMTP listener's mail may go: the admission rules, the routes by
/// recipient domain, and the outbound connectors (by index).
pub struct Routing {
    pub admission: Arc<Admission>,
    pub routes: Vec<(Vec<DomainPattern>, usize)>,
    pub connectors: Vec<ConnectorRoute>,
}

/// An outbound connector as routing sees it.
#[derive(Clone, Debug)]
pub struct ConnectorRoute {
    pub name: String,
    /// It delivers to each recipient domain's own hosts (MX), so one
    /// transaction carries one domain's recipients.
    pub per_domain: bool,
}

impl ConnectorRoute {
    /// A connector with fixed next hops.
    pub fn fixed(name: &str) -> ConnectorRoute {
        ConnectorRoute {
            name: name.into(),
            per_domain: false,
        }
    }
}

/// Where one transaction's recipients go: a connector, and for one that
/// delivers by MX, the recipient domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub connector: usize,
    pub domain: Option<String>,
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// The reply to the client event that awaited one ([`super::server::Server::respond`]).
    Respond(Reply),
    /// Write this reply to the client now (it answers no pending command).
    Write(Reply),
    /// Connect to one of the destination's next hops.
    Open(Destination),
    /// Write these bytes to the next hop.
    Send(Vec<u8>),
    /// Flush, then read one reply from the next hop within this wait.
    Await(Wait),
    /// Drop the next hop: with QUIT (`polite`), or hung up on at once so
    /// nothing half-sent is delivered.
    Close { polite: bool },
    /// The next hop is done with and clean (no message half-sent, nothing
    /// failed, not opened for a plaintext envelope the client's STARTTLS
    /// voided): the driver may keep it idle for another session to the same
    /// destination (Postfix's connection cache), or QUIT it.
    Release(Destination),
}

/// What a next hop offered once open.
#[derive(Clone, Debug)]
pub struct OpenedHop {
    /// `host[address]:port`, as transactions report it.
    pub name: String,
    pub security: LegSecurity,
    /// The extensions its last EHLO reply offered.
    pub offers: Capabilities,
    /// An idle connection another session released (and RSET proved
    /// alive), not a new one.
    pub reused: bool,
}

impl OpenedHop {
    /// Why a REQUIRETLS message may not go to this next hop, if it may
    /// not: RFC 8689 wants TLS, a verified certificate and REQUIRETLS.
    fn refuses_requiretls(&self) -> Option<&'static str> {
        match &self.security {
            LegSecurity::Tls {
                trust: PeerTrust::Verified,
                ..
            } if self.offers.has("REQUIRETLS") => None,
            LegSecurity::Tls {
                trust: PeerTrust::Verified,
                ..
            } => Some("it does not offer REQUIRETLS"),
            LegSecurity::Tls { .. } => Some("its certificate is not verified"),
            LegSecurity::Plaintext => Some("it is not reached over TLS"),
        }
    }
}

/// The next hop of the transaction under way.
struct Hop {
    /// As [`OpenedHop`] says, for each transaction's report.
    name: String,
    security: LegSecurity,
    reused: bool,
    destination: Destination,
    /// Why a REQUIRETLS message may not go there, if it may not.
    refuses_requiretls: Option<&'static str>,
    offers: Capabilities,
    chunking: bool,
    /// The message's Received line, until it has gone ahead of the body.
    trace: Option<Vec<u8>>,
    /// MAIL has been accepted on this connection for the transaction.
    mail_sent: bool,
    /// Converting BDAT to DATA: the dot-stuffer once DATA got its 354.
    stuffer: Option<DotStuffer>,
    /// A DATA or chunk the next hop refused, or lost: the reply to give.
    refused: Option<Reply>,
    data_started: bool,
    /// Writing or reading failed: the connection goes when the message ends.
    broken: bool,
}

/// What a reply awaited from the next hop will answer.
#[derive(Debug)]
enum Awaiting {
    Mail {
        to: String,
    },
    /// MAIL's reply, with RCPT to `to` already sent behind it.
    PipelinedMail {
        to: String,
    },
    /// The reply to a pipelined RCPT after its MAIL was refused: read and
    /// dropped; the sender gets MAIL's refusal.
    RcptAfterRefusedMail {
        refusal: Reply,
    },
    Rcpt {
        to: String,
    },
    Data,
    /// DATA sent for BDAT converted to DATA: its 354 is not the client's.
    DataForBdat,
    EndOfData,
    Chunk {
        last: bool,
    },
    Rset,
}

/// What the relay says of itself in the trace header it adds.
#[derive(Clone, Debug)]
pub struct Stamp {
    /// Its name (the listener's `hostname`).
    pub by: String,
    /// The session's number, as logs and reports give it.
    pub session: u64,
}

pub struct Forwarder {
    routing: Arc<Routing>,
    client: Client,
    stamp: Stamp,
    /// The client's HELO/EHLO name, and whether it was EHLO.
    hello: Option<(String, bool)>,
    mail: Option<(String, MailParams)>,
    /// RCPT commands in this transaction, accepted or not.
    rcpts: usize,
    transaction: Option<Transaction>,
    hop: Option<Hop>,
    /// An RCPT waiting for a next hop to open.
    opening: Option<(Destination, String)>,
    /// Where the transaction under way goes, once MAIL was accepted there.
    routed: Option<Destination>,
    awaiting: Option<Awaiting>,
    actions: VecDeque<Action>,
    finished: Vec<Transaction>,
}

/// RCPT commands one transaction may carry, accepted or refused (Postfix's
/// smtpd_recipient_limit; RFC 5321 4.5.3.1.8 asks for at least 100). Past
/// it each RCPT gets 452 4.5.3 and the client sends the rest in another
/// transaction (4.5.3.1.10), so a stranger cannot grow a session's state
/// with recipients.
pub const MAX_RECIPIENTS: usize = 1000;

/// The sender's reply when the next hop fails mid-dialogue: 4xx, so the
/// sender keeps the message and retries.
pub fn next_hop_failed(when: &str, why: &str) -> Reply {
    Reply::new(451, format!("4.4.2 Next hop failed{when}: {why}"))
}

/// The sender's reply when forced TLS could not be had on the connector's
/// next hop (4xx: it keeps the message). The failure's kind and detail:
/// mostly the relay's own verification words (which name, which TLSA
/// record), what a partner needs to mend its side.
pub fn tls_required(connector: &str, failure: &TlsFailure) -> Reply {
    Reply::new(
        451,
        format!("4.7.5 TLS required by connector {connector} but {failure}"),
    )
}

/// The sender's reply when none of the connector's next hops could be
/// reached, with what each attempt said.
pub fn unreachable(connector: &str, tried: &[String]) -> Reply {
    Reply::new(
        451,
        format!(
            "4.4.1 No next hop of connector {connector} is reachable: {}",
            tried.join("; ")
        ),
    )
}

impl Forwarder {
    pub fn new(routing: Arc<Routing>, client: Client, stamp: Stamp) -> Forwarder {
        Forwarder {
            routing,
            client,
            stamp,
            hello: None,
            mail: None,
            transaction: None,
            hop: None,
            opening: None,
            routed: None,
            rcpts: 0,
            awaiting: None,
            actions: VecDeque::new(),
            finished: Vec::new(),
        }
    }

    /// Who the client is (updated after STARTTLS).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The next thing to do, if any.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The transactions that have ended, for the session report.
    pub fn take_finished(&mut self) -> Vec<Transaction> {
        std::mem::take(&mut self.finished)
    }

    /// A client event from the server machine (not Reply, StartTls, Quit or
    /// Close: those are the driver's), at `now` (Unix seconds: the date
    /// of a message's trace header).
    pub fn client_event(&mut self, event: Event, now: i64) {
        match event {
            Event::Hello { name, esmtp } => self.hello = Some((name, esmtp)),
            Event::Mail { from, params } => self.mail_from(from, params),
            Event::Rcpt { to } => self.rcpt(to),
            Event::Data => self.data(now),
            Event::Body(bytes) => self.body(bytes),
            Event::EndOfData => self.end_of_data(),
            Event::AbortData(reply) => {
                // The next hop must not deliver a partial message: hang up.
                self.drop_hop();
                self.finish_transaction(&reply);
                self.actions.push_back(Action::Write(reply));
            }
            Event::Bdat { size, last } => self.bdat(size, last, now),
            Event::ChunkEnd { last } => self.chunk_end(last),
            Event::Rset => {
                if self.hop.is_some() {
                    self.command("RSET", Wait::Command, Awaiting::Rset);
                    if let Some(hop) = self.hop.as_mut() {
                        hop.mail_sent = false;
                    }
                }
                self.mail = None;
                self.transaction = None;
                self.routed = None;
            }
            Event::Reply(_) | Event::StartTls | Event::Quit | Event::Close => {}
        }
    }

    /// TLS is up with the client. RFC 3207 4.2: everything learnt before
    /// it is forgotten - the HELO name, the envelope, the transaction, and
    /// any next hop opened for it (closed with QUIT, so nothing given in
    /// plaintext, perhaps by a man in the middle, travels with what comes
    /// over TLS). The driver updates [`Forwarder::client_mut`] after.
    pub fn tls_started(&mut self) {
        if self.hop.take().is_some() {
            self.actions.push_back(Action::Close { polite: true });
        }
        self.hello = None;
        self.mail = None;
        self.transaction = None;
        self.routed = None;
        self.opening = None;
        self.awaiting = None;
        self.rcpts = 0;
    }

    /// The drain time is up: a transaction under way is abandoned (its next
    /// hop hung up on without an end of data); the reply to write.
    pub fn shut_down(&mut self) -> Reply {
        let reply = Reply::new(421, "4.3.2 Service shutting down, try again later");
        self.drop_hop();
        self.finish_transaction(&reply);
        reply
    }

    /// The session is over: QUIT to the next hop, if one is open. A
    /// transaction the client left unfinished is reported without a result.
    pub fn end(&mut self) {
        self.release_hop();
        self.finished.extend(self.transaction.take());
    }

    /// Lets the next hop go: released for reuse when clean, else QUIT.
    fn release_hop(&mut self) {
        let Some(hop) = self.hop.take() else {
            return;
        };
        let clean = !hop.broken && !hop.data_started && self.awaiting.is_none();
        self.actions.push_back(if clean {
            Action::Release(hop.destination)
        } else {
            Action::Close { polite: true }
        });
    }

    /// Whether chunk bytes may go to the next hop as they are (BDAT
    /// relayed as BDAT to a next hop that has refused nothing), so the
    /// driver can move them without [`Event::Body`].
    pub fn passes_chunks_through(&self) -> bool {
        self.hop
            .as_ref()
            .is_some_and(|h| h.chunking && h.refused.is_none() && !h.broken)
            && self.awaiting.is_none()
            && self.actions.is_empty()
    }

    /// The next hop asked for with [`Action::Open`] is ready.
    pub fn hop_opened(&mut self, opened: OpenedHop) {
        let Some((destination, to)) = self.opening.take() else {
            return;
        };
        let refuses_requiretls = opened.refuses_requiretls();
        let chunking = opened.offers.has("CHUNKING");
        self.hop = Some(Hop {
            name: opened.name,
            security: opened.security,
            reused: opened.reused,
            destination,
            refuses_requiretls,
            offers: opened.offers,
            chunking,
            trace: None,
            mail_sent: false,
            stuffer: None,
            refused: None,
            data_started: false,
            broken: false,
        });
        self.rcpt_on_hop(to);
    }

    /// No next hop could be had: the RCPT gets this (4xx) reply, and the
    /// transaction records it with the connector that could not deliver
    /// (reports and metrics count forced TLS that could not be had).
    pub fn hop_unavailable(&mut self, reply: Reply) {
        if let Some((destination, _)) = self.opening.take() {
            let name = self.connector_name(destination.connector);
            if let Some(t) = self.transaction.as_mut() {
                t.connector.get_or_insert(name);
                t.refused.push(reply.to_string());
            }
            self.actions.push_back(Action::Respond(reply));
        }
    }

    /// The reply awaited from the next hop.
    pub fn hop_reply(&mut self, reply: Reply) {
        let Some(awaiting) = self.awaiting.take() else {
            return;
        };
        // 354 answers DATA and nothing else; a 2xx to DATA would otherwise
        // end the message as if delivered when nothing was.
        let expected = match awaiting {
            Awaiting::Data | Awaiting::DataForBdat => reply.code == 354,
            Awaiting::RcptAfterRefusedMail { .. } => true,
            _ => reply.code / 100 == 2,
        };
        if !expected && reply.code < 400 {
            self.awaiting = Some(awaiting);
            return self.hop_failed(&format!("unexpected reply {reply}"));
        }
        match awaiting {
            Awaiting::Mail { to } if reply.is_positive() => {
                self.mail_accepted();
                self.send_rcpt(to);
            }
            Awaiting::PipelinedMail { to } if reply.is_positive() => {
                self.mail_accepted();
                self.actions.push_back(Action::Await(Wait::Command));
                self.awaiting = Some(Awaiting::Rcpt { to });
            }
            // The next hop refused the sender: this RCPT's reply.
            Awaiting::Mail { .. } => self.respond(reply),
            Awaiting::PipelinedMail { .. } => {
                self.actions.push_back(Action::Await(Wait::Command));
                self.awaiting = Some(Awaiting::RcptAfterRefusedMail { refusal: reply });
            }
            Awaiting::RcptAfterRefusedMail { refusal } => self.respond(refusal),
            Awaiting::Rcpt { to } => {
                if reply.is_positive() {
                    if let Some(t) = self.transaction.as_mut() {
                        t.recipients.push(to);
                    }
                }
                self.respond(reply);
            }
            Awaiting::Data => {
                // The trace header goes first, ahead of the client's body.
                if let (354, Some(trace)) =
                    (reply.code, self.hop.as_mut().and_then(|h| h.trace.take()))
                {
                    self.actions.push_back(Action::Send(trace));
                }
                self.respond(reply)
            }
            Awaiting::DataForBdat => {
                if let Some(hop) = self.hop.as_mut() {
                    if reply.code == 354 {
                        let mut stuffer = DotStuffer::new();
                        if let Some(trace) = hop.trace.take() {
                            let mut stuffed = Vec::with_capacity(trace.len());
                            stuffer.stuff(&trace, &mut stuffed);
                            self.actions.push_back(Action::Send(stuffed));
                        }
                        hop.stuffer = Some(stuffer);
                    } else {
                        hop.refused = Some(reply);
                    }
                }
            }
            Awaiting::EndOfData => self.end_of_message(reply),
            Awaiting::Chunk { last } => self.chunk_answered(reply, last),
            Awaiting::Rset => {}
        }
    }

    /// Writing to or reading from the next hop failed (`why`). Whatever
    /// was still to be said to it is dropped.
    pub fn hop_failed(&mut self, why: &str) {
        self.actions
            .retain(|a| !matches!(a, Action::Send(_) | Action::Await(_)));
        if let Some(hop) = self.hop.as_mut() {
            hop.broken = true;
        }
        match self.awaiting.take() {
            Some(
                Awaiting::Mail { .. }
                | Awaiting::PipelinedMail { .. }
                | Awaiting::Rcpt { .. }
                | Awaiting::Data,
            ) => {
                self.drop_hop();
                self.respond(next_hop_failed("", why));
            }
            Some(Awaiting::RcptAfterRefusedMail { refusal }) => {
                self.drop_hop();
                self.respond(refusal);
            }
            Some(Awaiting::EndOfData) => {
                self.end_of_message(next_hop_failed(" at end of data", why));
            }
            Some(Awaiting::Chunk { last }) => self.chunk_answered(next_hop_failed("", why), last),
            Some(Awaiting::DataForBdat) => self.refuse_message(next_hop_failed("", why)),
            Some(Awaiting::Rset) => self.drop_hop(),
            // A write of message data: the reply comes at its end.
            None => self.refuse_message(next_hop_failed(" during the message", why)),
        }
    }

    /// MAIL was accepted on the hop: the transaction is routed there.
    fn mail_accepted(&mut self) {
        let destination = self.hop.as_ref().map(|h| h.destination.clone());
        let name = destination
            .as_ref()
            .map(|d| self.connector_name(d.connector));
        if let Some(t) = self.transaction.as_mut() {
            t.connector = name;
        }
        self.routed = destination;
        if let Some(hop) = self.hop.as_mut() {
            hop.mail_sent = true;
        }
    }

    fn connector_name(&self, connector: usize) -> String {
        self.routing.connectors[connector].name.clone()
    }

    fn respond(&mut self, reply: Reply) {
        self.actions.push_back(Action::Respond(reply));
    }

    fn command(&mut self, line: &str, wait: Wait, awaiting: Awaiting) {
        self.actions
            .push_back(Action::Send(format!("{line}\r\n").into_bytes()));
        self.actions.push_back(Action::Await(wait));
        self.awaiting = Some(awaiting);
    }

    fn drop_hop(&mut self) {
        if self.hop.take().is_some() {
            self.actions.push_back(Action::Close { polite: false });
        }
    }

    fn refuse_message(&mut self, reply: Reply) {
        if let Some(hop) = self.hop.as_mut() {
            hop.refused.get_or_insert(reply);
        }
    }

    fn mail_from(&mut self, from: String, params: MailParams) {
        let mut transaction = Transaction {
            from: from.clone(),
            ..Transaction::default()
        };
        if let Err(refusal) = self.routing.admission.check_sender(&self.client, &from) {
            transaction.result = Some(refusal.to_string());
            self.finished.push(transaction);
            return self.respond(refusal);
        }
        // The connector is chosen at the first RCPT: MAIL is replayed there,
        // and its reply reaches the sender as that RCPT's.
        self.transaction = Some(transaction);
        self.routed = None;
        self.rcpts = 0;
        self.mail = Some((from, params));
        self.respond(Reply::new(250, "2.1.0 Sender ok"));
    }

    fn rcpt(&mut self, to: String) {
        self.rcpts += 1;
        if self.rcpts > MAX_RECIPIENTS {
            return self.respond(Reply::new(452, "4.5.3 Too many recipients"));
        }
        // RFC 5321 4.5.1: <postmaster> without a domain must be accepted;
        // it is the postmaster of the organisation's (first) own domain.
        let to = if to.eq_ignore_ascii_case("postmaster") {
            match self.routing.admission.own_domain() {
                Some(domain) => format!("postmaster@{domain}"),
                None => return self.respond(Reply::new(
                    550,
                    "5.1.1 No postmaster here: this relay accepts mail for no domain of its own",
                )),
            }
        } else {
            to
        };
        let domain = match self.routing.admission.check_recipient(&self.client, &to) {
            Ok(domain) => domain,
            Err(refusal) => {
                if let Some(t) = self.transaction.as_mut() {
                    t.refused.push(refusal.to_string());
                }
                return self.respond(refusal);
            }
        };
        let Some(connector) = route(&domain, &self.routing.routes) else {
            return self.respond(Reply::new(
                550,
                format!("5.7.1 Relay access denied: no connector for {domain}"),
            ));
        };
        let per_domain = self.routing.connectors[connector].per_domain;
        if per_domain && !is_hostname(&domain) {
            return self.respond(Reply::new(
                501,
                format!("5.1.3 Bad recipient address syntax: '{domain}' is not a domain DNS can be asked about"),
            ));
        }
        let destination = Destination {
            connector,
            domain: per_domain.then_some(domain),
        };
        if self.routed.as_ref().is_some_and(|d| *d != destination) {
            return self.respond(Reply::new(
                452,
                "4.5.3 Recipient belongs to another route; send it in a separate transaction",
            ));
        }
        if self
            .hop
            .as_ref()
            .is_some_and(|h| h.destination != destination)
        {
            // A new transaction to another next hop.
            self.release_hop();
        }
        if self.hop.is_none() {
            self.opening = Some((destination.clone(), to));
            self.actions.push_back(Action::Open(destination));
            return;
        }
        self.rcpt_on_hop(to);
    }

    /// RCPT on an open next hop, MAIL first if this transaction has not
    /// been opened there.
    fn rcpt_on_hop(&mut self, to: String) {
        if let (Some(t), Some(hop)) = (self.transaction.as_mut(), self.hop.as_ref()) {
            t.next_hop = Some(hop.name.clone());
            t.outbound = Some(hop.security.clone());
            t.reused = hop.reused;
        }
        if let Some(reply) = self.cannot_carry(&to) {
            if let Some(t) = self.transaction.as_mut() {
                t.refused.push(reply.to_string());
            }
            return self.respond(reply);
        }
        if self.hop.as_ref().is_some_and(|h| h.mail_sent) {
            return self.send_rcpt(to);
        }
        let (from, params) = self.mail.clone().unwrap_or_default();
        let offers = self
            .hop
            .as_ref()
            .map(|h| h.offers.clone())
            .unwrap_or_default();
        let mail = format!(
            "MAIL FROM:<{from}>{}",
            spaced(&params.for_next_hop(&offers))
        );
        if offers.has("PIPELINING") {
            // RFC 2920: MAIL and RCPT in one write, their replies read in
            // turn (Postfix's smtp client does the same): a round trip
            // less per message.
            let both = format!("{mail}\r\nRCPT TO:<{to}>");
            return self.command(&both, Wait::Command, Awaiting::PipelinedMail { to });
        }
        self.command(&mail, Wait::Command, Awaiting::Mail { to });
    }

    /// Why the open next hop may not take this transaction to `to`: a
    /// REQUIRETLS message where it cannot honour that (RFC 8689), or an
    /// address in UTF-8 where it does not offer SMTPUTF8 (RFC 6531 3.4).
    fn cannot_carry(&self, to: &str) -> Option<Reply> {
        let hop = self.hop.as_ref()?;
        let (from, params) = self.mail.as_ref()?;
        if let (true, Some(why)) = (params.requiretls, hop.refuses_requiretls) {
            return Some(Reply::new(
                550,
                format!("5.7.30 REQUIRETLS support required: the next hop cannot take this message ({why})"),
            ));
        }
        let ascii = from.is_ascii() && to.is_ascii();
        if !ascii && !hop.offers.has("SMTPUTF8") {
            return Some(Reply::new(
                553,
                "5.6.7 The next hop does not support SMTPUTF8, which this address needs",
            ));
        }
        None
    }

    fn send_rcpt(&mut self, to: String) {
        let line = format!("RCPT TO:<{to}>");
        self.command(&line, Wait::Command, Awaiting::Rcpt { to });
    }

    /// The Received line for the message starting now (RFC 5321 4.4).
    fn trace(&self, now: i64) -> Vec<u8> {
        let recipients = self.transaction.as_ref().map(|t| t.recipients.as_slice());
        Arrival {
            helo: self.hello.as_ref().map(|(name, _)| name.as_str()),
            client: self.client.ip,
            tls: self.client.tls_used.as_deref(),
            esmtp: self.hello.as_ref().is_some_and(|(_, esmtp)| *esmtp),
            by: &self.stamp.by,
            id: self.stamp.session,
            recipient: match recipients {
                Some([one]) => Some(one.as_str()),
                _ => None,
            },
            at: now,
        }
        .received()
    }

    fn data(&mut self, now: i64) {
        let trace = self.trace(now);
        let Some(hop) = self.hop.as_mut() else {
            return self.respond(Reply::new(503, "5.5.1 No valid recipients"));
        };
        hop.data_started = true;
        hop.trace = Some(trace);
        self.command("DATA", Wait::DataInit, Awaiting::Data);
    }

    fn body(&mut self, bytes: Vec<u8>) {
        let Some(hop) = self.hop.as_mut() else {
            return;
        };
        if hop.refused.is_some() {
            return;
        }
        let out = match hop.stuffer.as_mut() {
            Some(s) => {
                let mut stuffed = Vec::with_capacity(bytes.len() + 16);
                s.stuff(&bytes, &mut stuffed);
                stuffed
            }
            None => bytes,
        };
        self.actions.push_back(Action::Send(out));
    }

    fn end_of_data(&mut self) {
        match self.hop.as_mut().map(|h| h.refused.take()) {
            None => self.end_of_message(Reply::new(451, "4.3.0 No next hop")),
            Some(Some(refused)) => self.end_of_message(refused),
            // The terminator went with the body.
            Some(None) => {
                self.actions.push_back(Action::Await(Wait::DataEnd));
                self.awaiting = Some(Awaiting::EndOfData);
            }
        }
    }

    fn bdat(&mut self, size: u64, last: bool, now: i64) {
        let first = self.hop.as_ref().is_some_and(|h| !h.data_started);
        let trace = first.then(|| self.trace(now));
        let Some(hop) = self.hop.as_mut() else {
            return;
        };
        if hop.chunking {
            // The trace header rides at the head of the first chunk, which
            // grows by its length; the client's bytes follow unchanged.
            let trace = trace.unwrap_or_default();
            hop.data_started = true;
            let size = size + trace.len() as u64;
            let line = format!("BDAT {size}{}\r\n", if last { " LAST" } else { "" });
            self.actions
                .push_back(Action::Send([line.into_bytes(), trace].concat()));
        } else if first {
            hop.data_started = true;
            hop.trace = trace;
            self.command("DATA", Wait::DataInit, Awaiting::DataForBdat);
        }
    }

    fn chunk_end(&mut self, last: bool) {
        let Some(hop) = self.hop.as_mut() else {
            return self.respond(Reply::new(503, "5.5.1 No valid recipients"));
        };
        if let Some(refused) = hop.refused.clone() {
            return self.chunk_answered(refused, last);
        }
        if hop.chunking {
            self.actions.push_back(Action::Await(Wait::DataBlock));
            self.awaiting = Some(Awaiting::Chunk { last });
        } else if last {
            let terminator = hop
                .stuffer
                .as_ref()
                .map(DotStuffer::finish)
                .unwrap_or_default();
            self.actions.push_back(Action::Send(terminator));
            self.actions.push_back(Action::Await(Wait::DataEnd));
            self.awaiting = Some(Awaiting::Chunk { last });
        } else {
            // Converting to DATA: the next hop answers once, at the end; a
            // chunk is only acknowledged as received.
            self.chunk_answered(Reply::new(250, "2.0.0 Chunk received"), last);
        }
    }

    fn chunk_answered(&mut self, reply: Reply, last: bool) {
        if last || !reply.is_positive() {
            self.end_of_message(reply);
        } else {
            self.respond(reply);
        }
    }

    fn finish_transaction(&mut self, reply: &Reply) {
        if let Some(mut t) = self.transaction.take() {
            t.result = Some(reply.to_string());
            self.finished.push(t);
        }
        self.mail = None;
        self.routed = None;
    }

    fn end_of_message(&mut self, reply: Reply) {
        self.finish_transaction(&reply);
        if self.hop.as_ref().is_some_and(|h| h.broken) {
            self.drop_hop();
        }
        if let Some(hop) = self.hop.as_mut() {
            hop.data_started = false;
            hop.trace = None;
            hop.stuffer = None;
            hop.refused = None;
            hop.mail_sent = false;
        }
        self.respond(reply);
    }
}

fn spaced(params: &str) -> String {
    if params.is_empty() {
        String::new()
    } else {
        format!(" {params}")
    }
}
