//! The SMTP relay in memory, both ends driven (in the style of
//! quinn-proto's tests): a client's bytes go into the relay's dialogue
//! machine ([`Server`]) and relaying machine ([`Forwarder`]); the next hop
//! is another [`Server`] answering by script, reached through the opening
//! machine ([`HopOpening`]) and the connector policy; waits for the next
//! hop run on a fake clock. One test per row of the book's reply table
//! (docs/src/mail-edge.md), and the paths around it (drain, timeouts,
//! BDAT to DATA, routes).

use std::sync::Arc;
use std::time::Duration;

use super::address::Cidr;
use super::admission::{Admission, Client, ClientCertificate, InboundConnector};
use super::codec::{Reply, ReplyParser};
use super::forward::{
    tls_required, unreachable, Action, ConnectorRoute, Forwarder, OpenedHop, Routing, Stamp,
};
use super::next_hop::{HopOpening, Opening, OpeningFailure, SmtpTimeouts, Wait};
use super::server::{Event, Server, ServerSettings, StartTls};
use crate::policy::{on_outbound_failure, OnTlsFailure, OutboundPolicy};
use crate::report::LegSecurity;

/// The fake clock's wall time: Mon, 07 Dec 2026 04:31:01 +0000.
const NOW: i64 = 1_796_617_861;

/// How a connector's next hop behaves.
#[derive(Clone, Copy)]
struct HopKind {
    reachable: bool,
    starttls: bool,
    chunking: bool,
    policy: OutboundPolicy,
    /// Never answer this kind of wait (the fake clock runs out).
    stall: Option<Wait>,
    /// The reply to DATA.
    data_code: u16,
    /// Its certificate verifies (as DANE, MTA-STS or `verify = "name"` would).
    verified: bool,
    /// It offers REQUIRETLS after STARTTLS.
    requiretls: bool,
}

const GOOD_HOP: HopKind = HopKind {
    reachable: true,
    starttls: true,
    chunking: true,
    policy: OutboundPolicy::Opportunistic,
    stall: None,
    data_code: 354,
    verified: false,
    requiretls: true,
};

/// An open next-hop connection: the next hop's own dialogue machine.
struct HopConn {
    connector: usize,
    server: Server,
    kind: HopKind,
    /// Bytes the next hop has written, not yet read by the relay.
    output: Vec<u8>,
    replies: ReplyParser,
    /// Everything the relay wrote to it.
    heard: Vec<u8>,
    body: Vec<u8>,
}

struct Pair {
    server: Server,
    forwarder: Forwarder,
    hops: Vec<HopKind>,
    hop: Option<HopConn>,
    timeouts: SmtpTimeouts,
    /// The fake clock: time spent waiting for next hops.
    clock: Duration,
    /// What the client has read.
    to_client: Vec<u8>,
    /// Connections opened, by connector index, and how each ended.
    opened: Vec<usize>,
    quits: usize,
    hangups: usize,
    /// Connections released clean for another session, by connector.
    released: Vec<usize>,
    /// The next connection opened is an idle one another session released.
    reuse_next: bool,
    /// Messages next hops accepted (raw DATA or BDAT bytes, by connector).
    delivered: Vec<(usize, Vec<u8>)>,
    /// Everything each closed connection heard.
    transcripts: Vec<Vec<u8>>,
    /// Each write to a next hop after its opening, as sent.
    hop_writes: Vec<String>,
    closed: bool,
}

fn settings(starttls: StartTls) -> ServerSettings {
    ServerSettings {
        hostname: "mx.example".into(),
        starttls,
        max_message_size: 1 << 20,
        max_hops: crate::smtp::trace::DEFAULT_MAX_HOPS,
        command_timeout: std::time::Duration::from_secs(300),
    }
}

/// Accepted domain `example.org` to connector 0 (`inside`), `*.partner`
/// to connector 1 (`partner`); 192.0.2.0/24 may relay anywhere (connector
/// 1 for any other domain); the partner connector needs TLS from its
/// addresses (198.51.100.0/24).
fn routing(partner_by_mx: bool) -> Arc<Routing> {
    let admission = Admission {
        accepted_domains: vec!["example.org".parse().unwrap()],
        connectors: vec![
            InboundConnector {
                name: "onprem".into(),
                client_addresses: vec!["192.0.2.0/24".parse::<Cidr>().unwrap()],
                certificate_names: vec![],
                sender_domains: vec![],
                tls_required: false,
                client_certificate: ClientCertificate::None,
                allow_relay: true,
            },
            InboundConnector {
                name: "partner".into(),
                client_addresses: vec!["198.51.100.0/24".parse::<Cidr>().unwrap()],
                certificate_names: vec![],
                sender_domains: vec!["partner.example".parse().unwrap()],
                tls_required: true,
                client_certificate: ClientCertificate::None,
                allow_relay: false,
            },
        ],
    };
    Arc::new(Routing {
        admission: Arc::new(admission),
        routes: vec![
            (vec!["example.org".parse().unwrap()], 0),
            (vec!["*".parse().unwrap()], 1),
        ],
        connectors: vec![
            ConnectorRoute::fixed("inside"),
            ConnectorRoute {
                name: "partner".into(),
                per_domain: partner_by_mx,
            },
        ],
    })
}

impl Pair {
    fn new(client_ip: &str, hops: [HopKind; 2]) -> Pair {
        Pair::routed(client_ip, hops, routing(false))
    }

    fn routed(client_ip: &str, hops: [HopKind; 2], routing: Arc<Routing>) -> Pair {
        let server = Server::new(settings(StartTls::Offered));
        let mut pair = Pair {
            forwarder: Forwarder::new(
                routing,
                Client::new(client_ip.parse().unwrap()),
                Stamp {
                    by: "mx.example".into(),
                    session: 7,
                },
            ),
            to_client: server.greeting().to_bytes(),
            server,
            hops: hops.to_vec(),
            hop: None,
            timeouts: SmtpTimeouts::rfc5321(1.0, Duration::from_secs(5), Duration::from_secs(5)),
            clock: Duration::ZERO,
            opened: Vec::new(),
            quits: 0,
            hangups: 0,
            released: Vec::new(),
            reuse_next: false,
            delivered: Vec::new(),
            transcripts: Vec::new(),
            hop_writes: Vec::new(),
            closed: false,
        };
        pair.client("EHLO client.example\r\n");
        pair
    }

    fn from_outside() -> Pair {
        Pair::new("203.0.113.9", [GOOD_HOP, GOOD_HOP])
    }

    /// The client sends `bytes`; returns what it reads back.
    fn client(&mut self, bytes: &str) -> String {
        self.client_bytes(bytes.as_bytes())
    }

    fn client_bytes(&mut self, bytes: &[u8]) -> String {
        let before = self.to_client.len();
        self.server.feed(bytes);
        while let Some(event) = self.server.poll() {
            match event {
                Event::Reply(r) => self.to_client.extend(r.to_bytes()),
                Event::StartTls => {
                    self.server = Server::new(settings(StartTls::Offered));
                    self.server.tls_established();
                    self.forwarder.tls_started();
                    self.perform();
                    let client = self.forwarder.client_mut();
                    client.tls = true;
                    client.tls_used = Some(
                        "TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256 key-exchange X25519".into(),
                    );
                }
                Event::Quit | Event::Close => {
                    self.closed = true;
                    self.forwarder.end();
                    self.perform();
                }
                event => {
                    self.forwarder.client_event(event, NOW);
                    self.perform();
                }
            }
        }
        String::from_utf8_lossy(&self.to_client[before..]).into_owned()
    }

    /// The relay's drain time is up.
    fn drain(&mut self) -> String {
        let reply = self.forwarder.shut_down();
        self.perform();
        reply.to_string()
    }

    fn perform(&mut self) {
        while let Some(action) = self.forwarder.poll() {
            match action {
                Action::Respond(reply) => self.server.respond(reply),
                Action::Write(reply) => self.to_client.extend(reply.to_bytes()),
                Action::Open(destination) => self.open(destination.connector),
                Action::Send(bytes) => {
                    self.hop_writes
                        .push(String::from_utf8_lossy(&bytes).into_owned());
                    let hop = self.hop.as_mut().expect("sent to an open hop");
                    hop.heard.extend(&bytes);
                    hop.server.feed(&bytes);
                }
                Action::Await(wait) => match self.hop_reply(wait) {
                    Some(reply) => self.forwarder.hop_reply(reply),
                    None => {
                        self.clock += self.timeouts.of(wait);
                        self.forwarder.hop_failed("next hop timed out");
                    }
                },
                Action::Close { polite } => self.close(polite),
                Action::Release(destination) => {
                    let hop = self.hop.take().expect("released an open hop");
                    assert_eq!(hop.connector, destination.connector);
                    self.released.push(destination.connector);
                    self.transcripts.push(hop.heard);
                }
            }
        }
    }

    fn close(&mut self, polite: bool) {
        let Some(mut hop) = self.hop.take() else {
            return;
        };
        if polite {
            self.quits += 1;
            hop.heard.extend(b"QUIT\r\n");
        } else {
            self.hangups += 1;
        }
        self.transcripts.push(hop.heard);
    }

    /// Opens a connection to the connector's next hop under its policy, as
    /// the runtime's `legs::open_outbound` does on sockets (the TLS handshake itself
    /// always succeeds in memory).
    fn open(&mut self, connector: usize) {
        let kind = self.hops[connector];
        let name = ["inside", "partner"][connector];
        if !kind.reachable {
            let tried = ["mx:25 unreachable: refused".to_string()];
            return self.forwarder.hop_unavailable(unreachable(name, &tried));
        }
        let want_tls = kind.policy != OutboundPolicy::Plain;
        let failure = match self.greet(connector, kind, want_tls) {
            Ok(opened) => return self.forwarder.hop_opened(opened),
            Err(OpeningFailure::Tls { failure, .. }) => failure,
            Err(OpeningFailure::Unavailable(why)) => panic!("{why}"),
        };
        if on_outbound_failure(kind.policy) == OnTlsFailure::Refuse {
            return self.forwarder.hop_unavailable(tls_required(name, &failure));
        }
        self.close(false);
        let opened = self.greet(connector, kind, false).expect("plaintext retry");
        self.forwarder.hop_opened(opened);
    }

    /// The opening dialogue against a fresh next hop.
    fn greet(
        &mut self,
        connector: usize,
        kind: HopKind,
        want_tls: bool,
    ) -> Result<OpenedHop, OpeningFailure> {
        self.opened.push(connector);
        let starttls = if kind.starttls {
            StartTls::Offered
        } else {
            StartTls::Unavailable
        };
        let server = Server::new(settings(starttls));
        self.hop = Some(HopConn {
            connector,
            output: server.greeting().to_bytes(),
            server,
            kind,
            replies: ReplyParser::default(),
            heard: Vec::new(),
            body: Vec::new(),
        });
        let mut opening = HopOpening::new("mx:25", "relay.example", want_tls);
        let mut tls = false;
        loop {
            let hop = self.hop.as_mut().unwrap();
            match opening.poll() {
                Opening::Send(bytes) => {
                    hop.heard.extend(&bytes);
                    hop.server.feed(&bytes);
                }
                Opening::Read(_) => {
                    hop.run();
                    let output = std::mem::take(&mut hop.output);
                    opening.feed(&output);
                }
                Opening::StartTls => {
                    hop.server.tls_established();
                    opening.tls_established();
                    tls = true;
                }
                Opening::Ready => {
                    assert_eq!(tls, want_tls);
                    return Ok(OpenedHop {
                        name: "mx[192.0.2.25]:25".into(),
                        security: security(tls, kind.verified),
                        offers: opening.capabilities().clone(),
                        reused: std::mem::take(&mut self.reuse_next),
                    });
                }
                Opening::Failed(failure) => return Err(failure),
            }
        }
    }

    /// The next hop's reply to what it has heard, unless it stalls.
    fn hop_reply(&mut self, wait: Wait) -> Option<Reply> {
        let hop = self.hop.as_mut()?;
        if hop.kind.stall == Some(wait) {
            return None;
        }
        loop {
            if let Ok(Some(reply)) = hop.replies.next_reply() {
                return Some(reply);
            }
            hop.run();
            let output = std::mem::take(&mut hop.output);
            if output.is_empty() {
                return None;
            }
            hop.replies.feed(&output);
            if let Some(body) = hop.take_delivery() {
                self.delivered.push((hop.connector, body));
            }
        }
    }

    fn client_read(&self) -> String {
        String::from_utf8_lossy(&self.to_client).into_owned()
    }
}

impl HopConn {
    /// The next hop's dialogue machine, answering by script: RCPT to
    /// `bad@` gets 550, sender `refused@` gets 553, everything else is
    /// accepted.
    fn run(&mut self) {
        while let Some(event) = self.server.poll() {
            let reply = match event {
                Event::Reply(r) => {
                    let mut bytes = r.to_bytes();
                    if !self.kind.requiretls {
                        bytes = String::from_utf8(bytes)
                            .unwrap()
                            .replace("250-CHUNKING\r\n250 REQUIRETLS\r\n", "250 CHUNKING\r\n")
                            .into_bytes();
                    }
                    if !self.kind.chunking {
                        bytes = String::from_utf8(bytes)
                            .unwrap()
                            .replace("250-SMTPUTF8\r\n250 CHUNKING\r\n", "250 SMTPUTF8\r\n")
                            .replace("250-CHUNKING\r\n", "")
                            .into_bytes();
                    }
                    self.output.extend(bytes);
                    continue;
                }
                Event::Mail { from, .. } if from.starts_with("refused@") => {
                    Reply::new(553, "5.7.1 Sender refused by next hop")
                }
                Event::Rcpt { to, .. } if to.starts_with("bad@") => {
                    Reply::new(550, "5.1.1 No such user here")
                }
                Event::Mail { .. } | Event::Rcpt { .. } => Reply::new(250, "2.1.5 OK"),
                Event::Data => Reply::new(self.kind.data_code, "Go ahead"),
                Event::Body(bytes) => {
                    self.body.extend(bytes);
                    continue;
                }
                Event::EndOfData | Event::ChunkEnd { last: true } => {
                    self.body.extend(b"<end>");
                    Reply::new(250, "2.0.0 Ok: queued as NEXTHOP1")
                }
                Event::ChunkEnd { last: false } => Reply::new(250, "2.0.0 chunk ok"),
                Event::AbortData(reply) => reply,
                _ => continue,
            };
            self.server.respond(reply);
        }
    }

    /// A message the next hop has just accepted, without the Received
    /// line the relay put first (checked here: every message has one).
    fn take_delivery(&mut self) -> Option<Vec<u8>> {
        let end = self.body.windows(5).position(|w| w == b"<end>")?;
        let body = self.body[..end].to_vec();
        self.body.drain(..end + 5);
        Some(without_trace(&body).to_vec())
    }
}

/// A message without the relay's Received field at its head (a field
/// with its folded lines); panics if there is none.
fn without_trace(message: &[u8]) -> &[u8] {
    assert!(
        message.starts_with(b"Received: from "),
        "no trace header first: {:?}",
        String::from_utf8_lossy(message)
    );
    let mut at = 0;
    loop {
        let end = at
            + message[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a whole line")
            + 2;
        at = end;
        if !matches!(message.get(at), Some(b' ' | b'\t')) {
            return &message[at..];
        }
    }
}

/// How a next hop's leg is secured: TLS with the trust the kind says.
fn security(tls: bool, verified: bool) -> LegSecurity {
    if !tls {
        return LegSecurity::Plaintext;
    }
    LegSecurity::Tls {
        negotiated: crate::report::Negotiated {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            version_code: 0x0304,
            cipher_code: 0x1302,
            group: None,
            group_code: 0,
            resumed: false,
        },
        trust: if verified {
            crate::policy::PeerTrust::Verified
        } else {
            crate::policy::PeerTrust::Anonymous
        },
        server_name: None,
        peer_names: Vec::new(),
    }
}

const MAIL: &str = "MAIL FROM:<a@sender.example>\r\n";

#[test]
fn next_hops_own_replies_are_relayed_at_rcpt_and_end_of_data() {
    let mut p = Pair::from_outside();
    assert!(p.client(MAIL).starts_with("250 2.1.0"));
    assert!(
        p.opened.is_empty(),
        "MAIL alone contacts no next hop: {:?}",
        p.opened
    );
    assert_eq!(
        p.client("RCPT TO:<bad@example.org>\r\n"),
        "550 5.1.1 No such user here\r\n"
    );
    assert!(p
        .client("RCPT TO:<u@example.org>\r\n")
        .starts_with("250 2.1.5"));
    assert!(p.client("DATA\r\n").starts_with("354"));
    let end = p.client("Subject: hi\r\n\r\n..dot\r\n.\r\n");
    assert_eq!(end, "250 2.0.0 Ok: queued as NEXTHOP1\r\n");
    assert_eq!(p.delivered.len(), 1);
    assert_eq!(p.delivered[0].0, 0, "to the accepted domain's connector");
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(
        heard.contains("MAIL FROM:<a@sender.example>\r\nRCPT TO:<bad@example.org>\r\n"),
        "MAIL replayed at the first RCPT: {heard}"
    );
    assert!(
        heard.contains("..dot\r\n.\r\n"),
        "the body as sent, still stuffed"
    );
    assert_eq!(p.forwarder.take_finished()[0].recipients, ["u@example.org"]);
}

#[test]
fn a_sender_the_next_hop_refuses_is_that_rcpts_reply() {
    let mut p = Pair::from_outside();
    p.client("MAIL FROM:<refused@sender.example>\r\n");
    assert_eq!(
        p.client("RCPT TO:<u@example.org>\r\n"),
        "553 5.7.1 Sender refused by next hop\r\n"
    );
}

#[test]
fn forced_tls_without_starttls_at_the_next_hop_is_451_4_7_5() {
    let plain_hop = HopKind {
        starttls: false,
        policy: OutboundPolicy::Required,
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [plain_hop, GOOD_HOP]);
    p.client(MAIL);
    let reply = p.client("RCPT TO:<u@example.org>\r\n");
    assert_eq!(
        reply,
        "451 4.7.5 TLS required by connector inside but TLS not offered: mx does not offer STARTTLS\r\n"
    );
    assert!(p.delivered.is_empty());
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(
        !heard.contains("MAIL"),
        "nothing sent in plaintext: {heard}"
    );
}

#[test]
fn opportunistic_tls_without_starttls_falls_back_to_plaintext() {
    let plain_hop = HopKind {
        starttls: false,
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [plain_hop, GOOD_HOP]);
    p.client(MAIL);
    assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
    assert_eq!(p.opened, [0, 0], "a second connection, in plaintext");
}

#[test]
fn no_reachable_next_hop_is_451_4_4_1() {
    let down = HopKind {
        reachable: false,
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [down, GOOD_HOP]);
    p.client(MAIL);
    assert_eq!(
        p.client("RCPT TO:<u@example.org>\r\n"),
        "451 4.4.1 No next hop of connector inside is reachable: mx:25 unreachable: refused\r\n"
    );
}

#[test]
fn a_recipient_of_another_route_is_452_and_goes_in_the_next_transaction() {
    let mut p = Pair::new("192.0.2.10", [GOOD_HOP, GOOD_HOP]);
    p.client(MAIL);
    assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
    assert_eq!(
        p.client("RCPT TO:<x@elsewhere.example>\r\n"),
        "452 4.5.3 Recipient belongs to another route; send it in a separate transaction\r\n"
    );
    p.client("DATA\r\nbody\r\n.\r\n");
    p.client(MAIL);
    assert!(p
        .client("RCPT TO:<x@elsewhere.example>\r\n")
        .starts_with("250"));
    p.client("DATA\r\nbody two\r\n.\r\n");
    assert_eq!(p.opened, [0, 1]);
    assert_eq!(
        p.released,
        [0],
        "the first next hop is left clean for reuse"
    );
    assert_eq!(p.quits, 0);
    let to: Vec<usize> = p.delivered.iter().map(|d| d.0).collect();
    assert_eq!(to, [0, 1]);
}

#[test]
fn by_mx_each_recipient_domain_is_its_own_transaction_and_connection() {
    let mut p = Pair::routed("192.0.2.10", [GOOD_HOP, GOOD_HOP], routing(true));
    p.client(MAIL);
    assert!(p.client("RCPT TO:<a@one.example>\r\n").starts_with("250"));
    assert!(p.client("RCPT TO:<b@one.example>\r\n").starts_with("250"));
    assert_eq!(
        p.client("RCPT TO:<c@two.example>\r\n"),
        "452 4.5.3 Recipient belongs to another route; send it in a separate transaction\r\n"
    );
    p.client("DATA\r\nbody\r\n.\r\n");
    p.client(MAIL);
    assert!(p.client("RCPT TO:<c@two.example>\r\n").starts_with("250"));
    p.client("DATA\r\nbody two\r\n.\r\n");
    // A fixed connector keeps its connection across transactions; by MX
    // the second domain is a connection of its own.
    assert_eq!(p.opened, [1, 1]);
    assert_eq!(p.released, [1], "the first domain's host is left clean");
    assert_eq!(p.delivered.len(), 2);
}

#[test]
fn an_unmet_connector_condition_is_451_4_7_1_at_mail() {
    // From the partner's addresses without STARTTLS.
    let mut p = Pair::new("198.51.100.7", [GOOD_HOP, GOOD_HOP]);
    assert_eq!(
        p.client("MAIL FROM:<a@partner.example>\r\n"),
        "451 4.7.1 Connector partner (client address): TLS is required (issue STARTTLS first)\r\n"
    );
    p.client("STARTTLS\r\n");
    p.client("EHLO client.example\r\n");
    assert!(p
        .client("MAIL FROM:<a@partner.example>\r\n")
        .starts_with("250"));
}

#[test]
fn relaying_for_strangers_is_554_and_no_next_hop_hears_of_it() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    for rcpt in [
        "x@elsewhere.example",
        "user%other.example@example.org",
        "\"u@other.example\"@example.org",
    ] {
        let reply = p.client(&format!("RCPT TO:<{rcpt}>\r\n"));
        assert!(reply.starts_with("554 5.7.1 <"), "{rcpt}: {reply}");
        assert!(reply.contains("Relay access denied"), "{reply}");
    }
    assert!(p.opened.is_empty(), "no next hop contacted");
    // The relay connector's network may.
    let mut p = Pair::new("192.0.2.10", [GOOD_HOP, GOOD_HOP]);
    p.client(MAIL);
    assert!(p
        .client("RCPT TO:<x@elsewhere.example>\r\n")
        .starts_with("250"));
}

#[test]
fn a_bare_lf_in_data_is_554_and_the_next_hop_is_hung_up_on() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("DATA\r\n");
    let reply = p.client("line\n.\nRCPT TO:<smuggled@example.org>\r\n\r\n.\r\n");
    assert!(reply.starts_with("554 5.6.0"), "{reply}");
    assert!(p.delivered.is_empty(), "nothing delivered");
    assert_eq!(p.hangups, 1, "hung up without an end of data");
    let heard = String::from_utf8_lossy(&p.transcripts[0]).into_owned();
    assert!(!heard.contains("smuggled"), "{heard}");
    // The session goes on, on a new connection.
    p.client(MAIL);
    assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
}

#[test]
fn pipelined_starttls_is_503_and_the_plaintext_after_it_is_discarded() {
    let mut p = Pair::from_outside();
    let reply = p.client("STARTTLS\r\nMAIL FROM:<a@b.example>\r\n");
    assert!(reply.starts_with("503 5.5.1"), "{reply}");
    assert!(!reply.contains("250"), "{reply}");
}

#[test]
fn an_overlong_command_line_is_500_5_5_6() {
    let mut p = Pair::from_outside();
    let line = format!("MAIL FROM:<{}@example.org>\r\n", "a".repeat(600));
    assert!(p.client(&line).starts_with("500 5.5.6"));
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("DATA\r\n");
    let reply = p.client(&format!("{}\r\n.\r\n", "x".repeat(1200)));
    assert!(reply.starts_with("500 5.5.6"), "{reply}");
    assert!(p.delivered.is_empty());
}

#[test]
fn the_drain_says_421_4_3_2_and_abandons_the_message() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("DATA\r\nhalf a message\r\n");
    assert_eq!(
        p.drain(),
        "421 4.3.2 Service shutting down, try again later"
    );
    assert_eq!(p.hangups, 1, "the next hop gets no end of data");
    assert!(p.delivered.is_empty());
    let t = p.forwarder.take_finished();
    assert_eq!(
        t[0].result.as_deref(),
        Some("421 4.3.2 Service shutting down, try again later")
    );
}

#[test]
fn a_next_hop_that_stalls_at_end_of_data_gets_451_after_the_data_end_timer() {
    let slow = HopKind {
        stall: Some(Wait::DataEnd),
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [slow, GOOD_HOP]);
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("DATA\r\n");
    let reply = p.client("body\r\n.\r\n");
    assert_eq!(
        reply,
        "451 4.4.2 Next hop failed at end of data: next hop timed out\r\n"
    );
    assert_eq!(p.clock, Duration::from_secs(600), "RFC 5321's 10 minutes");
    // That connection is not reused, by this session or another.
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    assert_eq!(p.opened, [0, 0]);
    assert_eq!(p.hangups, 1);
    assert!(p.released.is_empty());
}

/// Postfix's connection cache: a session that ends on a clean next hop
/// leaves it for the next session to the same destination, and every
/// transaction over such a connection says so.
#[test]
fn a_clean_next_hop_is_released_and_a_reused_one_is_reported() {
    let mut p = Pair::from_outside();
    p.reuse_next = true;
    for body in ["DATA\r\none\r\n.\r\n", "DATA\r\ntwo\r\n.\r\n"] {
        p.client(MAIL);
        assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
        assert!(p
            .client(body)
            .ends_with("250 2.0.0 Ok: queued as NEXTHOP1\r\n"));
    }
    p.client("QUIT\r\n");
    assert_eq!(
        (p.released.as_slice(), p.quits, p.hangups),
        (&[0][..], 0, 0)
    );
    let finished = p.forwarder.take_finished();
    assert_eq!(finished.len(), 2);
    for t in &finished {
        assert!(t.reused, "{t:?}");
        assert_eq!(t.next_hop.as_deref(), Some("mx[192.0.2.25]:25"), "{t:?}");
    }
    // A session that ends mid-message hangs up instead.
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("DATA\r\nhalf\r\n");
    p.drain();
    assert_eq!((p.released.len(), p.hangups), (0, 1));
    let t = p.forwarder.take_finished();
    assert!(!t[0].reused, "a new connection: {:?}", t[0]);
}

#[test]
fn a_next_hop_that_stalls_at_rcpt_gets_451_4_4_2() {
    let slow = HopKind {
        stall: Some(Wait::Command),
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [slow, GOOD_HOP]);
    p.client(MAIL);
    assert_eq!(
        p.client("RCPT TO:<u@example.org>\r\n"),
        "451 4.4.2 Next hop failed: next hop timed out\r\n"
    );
    assert_eq!(p.clock, Duration::from_secs(300));
}

#[test]
fn bdat_is_relayed_as_bdat_to_a_next_hop_with_chunking() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    assert_eq!(p.client("BDAT 5\r\nabcde"), "250 2.0.0 chunk ok\r\n");
    let end = p.client("BDAT 3 LAST\r\nfg\n");
    assert!(end.starts_with("554 5.6.0"), "a bare LF in a chunk: {end}");
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("BDAT 4\r\n.a\r\n");
    assert_eq!(
        p.client("BDAT 0 LAST\r\n"),
        "250 2.0.0 Ok: queued as NEXTHOP1\r\n"
    );
    assert_eq!(p.delivered.last().unwrap().1, b".a\r\n");
}

#[test]
fn bdat_is_converted_to_dot_stuffed_data_for_a_next_hop_without_chunking() {
    let old = HopKind {
        chunking: false,
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [old, GOOD_HOP]);
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    assert_eq!(
        p.client("BDAT 5\r\n.a\r\nb"),
        "250 2.0.0 Chunk received\r\n"
    );
    assert_eq!(
        p.client("BDAT 3 LAST\r\nc\r\n"),
        "250 2.0.0 Ok: queued as NEXTHOP1\r\n"
    );
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(heard.contains("DATA\r\nReceived: from "), "{heard}");
    assert!(heard.contains("+0000\r\n..a\r\nbc\r\n.\r\n"), "{heard}");
    assert!(!heard.contains("BDAT"), "{heard}");
}

#[test]
fn rset_resets_the_next_hop_and_quit_ends_it_politely() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    assert!(p.client("RSET\r\n").starts_with("250"));
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("QUIT\r\n");
    assert!(p.closed);
    // The envelope left open there is the driver's RSET's to clear.
    assert_eq!(p.released, [0], "released, MAIL and RCPT left open on it");
    let heard = String::from_utf8_lossy(&p.transcripts[0]).into_owned();
    assert!(
        heard.contains("RSET\r\nMAIL FROM:<a@sender.example>\r\nRCPT"),
        "MAIL replayed after RSET on the same connection: {heard}"
    );
    assert!(p.client_read().ends_with("221 2.0.0 Bye\r\n"));
    assert_eq!(p.opened, [0]);
}

#[test]
fn a_2xx_to_data_is_no_delivery() {
    let odd = HopKind {
        data_code: 250,
        chunking: false,
        ..GOOD_HOP
    };
    for bdat in [false, true] {
        let mut p = Pair::new("203.0.113.9", [odd, GOOD_HOP]);
        p.client(MAIL);
        p.client("RCPT TO:<u@example.org>\r\n");
        let reply = if bdat {
            p.client("BDAT 3 LAST\r\nx\r\n")
        } else {
            p.client("DATA\r\n")
        };
        assert_eq!(
            reply, "451 4.4.2 Next hop failed: unexpected reply 250 Go ahead\r\n",
            "bdat {bdat}"
        );
        assert!(p.delivered.is_empty());
    }
}

#[test]
fn requiretls_needs_tls_from_the_client_and_a_verified_next_hop_offering_it() {
    const MAIL_REQUIRETLS: &str = "MAIL FROM:<a@sender.example> REQUIRETLS\r\n";
    // Not over TLS: refused at MAIL, and not even advertised.
    let mut p = Pair::from_outside();
    assert!(!p.client("EHLO c\r\n").contains("REQUIRETLS"));
    assert!(p.client(MAIL_REQUIRETLS).starts_with("530 5.7.10"));
    let secured = |hop: HopKind| {
        let mut p = Pair::new("203.0.113.9", [hop, GOOD_HOP]);
        p.client("STARTTLS\r\n");
        assert!(p.client("EHLO c\r\n").contains("250 REQUIRETLS"));
        assert!(p.client(MAIL_REQUIRETLS).starts_with("250"));
        let reply = p.client("RCPT TO:<u@example.org>\r\n");
        let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
        (reply, heard)
    };
    let verified = HopKind {
        verified: true,
        ..GOOD_HOP
    };
    let (reply, heard) = secured(verified);
    assert!(reply.starts_with("250"), "{reply}");
    assert!(
        heard.contains("MAIL FROM:<a@sender.example> REQUIRETLS\r\n"),
        "{heard}"
    );
    for (hop, why) in [
        (GOOD_HOP, "its certificate is not verified"),
        (
            HopKind {
                requiretls: false,
                ..verified
            },
            "it does not offer REQUIRETLS",
        ),
        (
            HopKind {
                policy: OutboundPolicy::Plain,
                ..verified
            },
            "it is not reached over TLS",
        ),
    ] {
        let (reply, heard) = secured(hop);
        assert!(
            reply.starts_with("550 5.7.30 REQUIRETLS support required"),
            "{reply}"
        );
        assert!(reply.contains(why), "{reply}");
        assert!(
            !heard.contains("MAIL"),
            "the message never starts there: {heard}"
        );
    }
}

#[test]
fn past_a_thousand_recipients_each_rcpt_is_452_and_the_next_transaction_takes_more() {
    use super::forward::MAX_RECIPIENTS;
    let mut p = Pair::new("192.0.2.10", [GOOD_HOP, GOOD_HOP]);
    p.client(MAIL);
    for i in 0..MAX_RECIPIENTS {
        let reply = p.client(&format!("RCPT TO:<u{i}@example.org>\r\n"));
        assert!(reply.starts_with("250"), "{i}: {reply}");
    }
    for i in 0..3 {
        assert_eq!(
            p.client(&format!("RCPT TO:<more{i}@example.org>\r\n")),
            "452 4.5.3 Too many recipients\r\n"
        );
    }
    p.client("DATA\r\nbody\r\n.\r\n");
    p.client(MAIL);
    assert!(p
        .client("RCPT TO:<more0@example.org>\r\n")
        .starts_with("250"));
}

/// RFC 3207 4.2 across round trips: a man in the middle injects MAIL and
/// RCPT in plaintext before the client's STARTTLS (each answered, so the
/// pipelining check cannot see it); once TLS is up nothing of that
/// envelope survives: its next hop is closed with QUIT, and the message
/// given over TLS reaches the next hop with the client's envelope only.
#[test]
fn starttls_forgets_the_envelope_and_next_hop_opened_in_plaintext() {
    let mut p = Pair::from_outside();
    assert!(p
        .client("MAIL FROM:<mitm@attacker.test>\r\n")
        .starts_with("250"));
    assert!(p
        .client("RCPT TO:<attacker-mailbox@example.org>\r\n")
        .starts_with("250"));
    assert_eq!(p.opened, [0], "the injected RCPT opened a next hop");
    assert!(p.client("STARTTLS\r\n").starts_with("220"));
    assert_eq!(p.quits, 1, "that next hop is closed politely at STARTTLS");
    assert!(p.hop.is_none());
    p.client("EHLO client.example\r\n");
    assert!(p
        .client("MAIL FROM:<alice@good.test>\r\n")
        .starts_with("250"));
    assert!(p.client("RCPT TO:<bob@example.org>\r\n").starts_with("250"));
    assert!(p.client("DATA\r\n").starts_with("354"));
    assert!(p
        .client("Subject: secret\r\n\r\nfor bob\r\n.\r\n")
        .starts_with("250"));
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(
        heard.contains("MAIL FROM:<alice@good.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"),
        "{heard}"
    );
    assert!(
        !heard.contains("mitm") && !heard.contains("attacker"),
        "{heard}"
    );
    let finished = p.forwarder.take_finished();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0].from, "alice@good.test");
    assert_eq!(finished[0].recipients, ["bob@example.org"]);
    assert!(
        heard.contains("Received: from client.example ([203.0.113.9])\r\n\t(using TLSv1.3"),
        "{heard}"
    );
}

/// Every message carries the relay's Received line first: DATA, BDAT
/// relayed as BDAT (the first chunk grows by its length), BDAT turned
/// into DATA; with the client's HELO name and address, the TLS used, the
/// protocol, the session and the one recipient.
#[test]
fn every_message_gets_a_received_line_first() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("DATA\r\nSubject: a\r\n\r\nbody\r\n.\r\n");
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    let trace = "Received: from client.example ([203.0.113.9])\r\n\tby mx.example (tlsrelay) with ESMTP id 7\r\n\tfor <u@example.org>; Mon, 07 Dec 2026 04:31:01 +0000\r\n";
    assert!(
        heard.contains(&format!("DATA\r\n{trace}Subject: a\r\n")),
        "{heard}"
    );

    let mut p = Pair::from_outside();
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    p.client("RCPT TO:<v@example.org>\r\n");
    assert!(p.client("BDAT 4\r\nab\r\n").starts_with("250"));
    assert!(p.client("BDAT 2 LAST\r\ncd").starts_with("250"));
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    let trace = "Received: from client.example ([203.0.113.9])\r\n\tby mx.example (tlsrelay) with ESMTP id 7; Mon, 07 Dec 2026 04:31:01 +0000\r\n";
    assert!(
        heard.contains(&format!(
            "BDAT {}\r\n{trace}ab\r\nBDAT 2 LAST\r\ncd",
            trace.len() + 4
        )),
        "two recipients: no 'for'; the first chunk grew: {heard}"
    );

    let old = HopKind {
        chunking: false,
        ..GOOD_HOP
    };
    let mut p = Pair::new("203.0.113.9", [old, GOOD_HOP]);
    p.client("EHLO old.example\r\n");
    p.client(MAIL);
    p.client("RCPT TO:<u@example.org>\r\n");
    assert!(p.client("BDAT 4 LAST\r\n.x\r\n").starts_with("250"));
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(
        heard.contains("DATA\r\nReceived: from old.example ([203.0.113.9])\r\n\tby mx.example (tlsrelay) with ESMTP id 7\r\n\tfor <u@example.org>; Mon, 07 Dec 2026 04:31:01 +0000\r\n..x\r\n.\r\n"),
        "{heard}"
    );
}

/// A stranger's MAIL parameters never reach the next hop: unadvertised
/// ones are 555 at the relay, and advertised ones are written anew.
#[test]
fn mail_parameters_are_refused_or_written_anew_for_the_next_hop() {
    let mut p = Pair::from_outside();
    let reply = p.client("MAIL FROM:<ceo@example.org> AUTH=ceo@example.org\r\n");
    assert_eq!(reply, "555 5.5.4 Unsupported parameter AUTH\r\n");
    assert!(p
        .client("MAIL FROM:<a@sender.example> size=10 body=8bitmime\r\n")
        .starts_with("250"));
    let reply =
        p.client("RCPT TO:<u@example.org> NOTIFY=SUCCESS ORCPT=rfc822;boss@example.org\r\n");
    assert_eq!(reply, "555 5.5.4 Unsupported parameter NOTIFY\r\n");
    assert!(p.opened.is_empty(), "no next hop hears of a refused RCPT");
    assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(
        heard.contains(
            "MAIL FROM:<a@sender.example> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<u@example.org>\r\n"
        ),
        "{heard}"
    );
}

/// An address in UTF-8 goes to a next hop that offers SMTPUTF8, with the
/// parameter.
#[test]
fn utf8_addresses_go_with_smtputf8_where_it_is_offered() {
    let mut p = Pair::from_outside();
    p.client("MAIL FROM:<us\u{e9}r@sender.example> SMTPUTF8\r\n");
    assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(heard.contains("r@sender.example> SMTPUTF8\r\n"), "{heard}");
}

/// RFC 5321 4.5.1: `<postmaster>` is taken, as the organisation's own
/// postmaster.
#[test]
fn bare_postmaster_reaches_the_own_domains_postmaster() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    assert!(p.client("RCPT TO:<Postmaster>\r\n").starts_with("250"));
    let heard = String::from_utf8_lossy(&p.hop.as_ref().unwrap().heard).into_owned();
    assert!(
        heard.contains("RCPT TO:<postmaster@example.org>\r\n"),
        "{heard}"
    );
}

/// Refused recipients are errors: a stranger probing addresses is
/// closed after the error limit, not served for ever.
#[test]
fn refused_recipients_count_as_errors_until_421() {
    use super::server::MAX_ERRORS;
    let mut p = Pair::from_outside();
    p.client(MAIL);
    let mut probes = String::new();
    for i in 0..3000 {
        probes += &format!("RCPT TO:<v{i}@elsewhere.example>\r\n");
    }
    let replies = p.client(&probes);
    let codes: Vec<&str> = replies.lines().map(|l| &l[..3]).collect();
    assert_eq!(codes.len(), MAX_ERRORS as usize + 1, "{codes:?}");
    assert!(codes[..MAX_ERRORS as usize].iter().all(|&c| c == "554"));
    assert_eq!(codes[MAX_ERRORS as usize], "421");
    assert!(p.closed);
}

/// RFC 2920 toward a next hop that offers PIPELINING (as Postfix's smtp
/// client does): MAIL and the first RCPT go in one write; a refused MAIL
/// still answers the sender's RCPT, and the pipelined RCPT's own reply is
/// read and dropped, so the dialogue stays in step.
#[test]
fn mail_and_rcpt_are_pipelined_to_a_next_hop_that_offers_it() {
    let mut p = Pair::from_outside();
    p.client(MAIL);
    assert!(p.client("RCPT TO:<u@example.org>\r\n").starts_with("250"));
    assert_eq!(
        p.hop_writes,
        ["MAIL FROM:<a@sender.example>\r\nRCPT TO:<u@example.org>\r\n"]
    );
    assert!(p.client("RCPT TO:<v@example.org>\r\n").starts_with("250"));
    assert_eq!(p.hop_writes[1], "RCPT TO:<v@example.org>\r\n");
    p.client("RSET\r\n");
    p.client("MAIL FROM:<refused@sender.example>\r\n");
    let refused = p.client("RCPT TO:<u@example.org>\r\n");
    assert!(refused.starts_with("553"), "MAIL's refusal: {refused}");
    // In step: the next transaction's replies are its own.
    p.client("RSET\r\n");
    p.client(MAIL);
    let rcpt = p.client("RCPT TO:<u@example.org>\r\n");
    assert!(rcpt.starts_with("250"), "{rcpt}");
    assert!(p
        .client("DATA\r\nbody\r\n.\r\n")
        .ends_with("250 2.0.0 Ok: queued as NEXTHOP1\r\n"));
    assert_eq!(p.delivered.len(), 1);
}
