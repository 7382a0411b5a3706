//! One SMTP session end to end: the client-facing dialogue
//! ([`super::server`]), STARTTLS as a server, the inbound connector's
//! rules, the outbound connector chosen at the first RCPT, the next hop's
//! replies relayed back, message bodies streamed through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::address::{route, DomainPattern};
use super::admission::{Admission, Client, PresentedCertificate};
use super::client::{establish, DotStuffer, NextHop, OutboundConnector, SmtpTimeouts};
use super::codec::Reply;
use super::server::{Event, Server, ServerSettings, StartTls};
use crate::policy::{PeerTrust, TlsFailure};
use crate::pump::Leg;
use crate::report::{inbound_tls_line, Direction, Downgrade, LegSecurity, Outcome, SessionReport};
use crate::tls::{
    cert_names, classify_failure, client_chain_verifies, ListenerTls, Negotiated, RecordIo,
};

/// Everything an SMTP listener's sessions need.
pub struct SmtpListenerPlan {
    pub name: String,
    pub hostname: String,
    pub starttls: StartTls,
    /// SMTPS: TLS from the first byte.
    pub implicit_tls: bool,
    pub tls: Option<ListenerTls>,
    /// Accepted domains, inbound connectors, who may relay.
    pub admission: Arc<Admission>,
    /// Each inbound connector's client certificate anchors (by index).
    pub connector_anchors: Vec<Option<Arc<rustls::RootCertStore>>>,
    pub outbound: Vec<Arc<OutboundConnector>>,
    pub routes: Vec<(Vec<DomainPattern>, usize)>,
    pub timeouts: SmtpTimeouts,
    pub max_message_size: u64,
}

/// One mail transaction as relayed.
#[derive(Clone, Debug, Serialize)]
pub struct Transaction {
    pub from: String,
    pub recipients: Vec<String>,
    pub connector: Option<String>,
    pub next_hop: Option<String>,
    pub outbound: Option<LegSecurity>,
    /// The reply the sender got at the end (the next hop's, or the relay's
    /// own refusal of the sender).
    pub result: Option<String>,
    /// Recipients the relay itself refused, with the reply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

/// The next hop of the transaction under way.
struct Outbound {
    connector: usize,
    hop: NextHop,
    /// How BDAT goes out: as BDAT, or as DATA (dot-stuffed).
    chunking: bool,
    stuffer: Option<DotStuffer>,
    /// A DATA the next hop refused while we converted BDAT: the reply.
    refused: Option<Reply>,
    data_started: bool,
}

struct Dialogue<'a> {
    plan: &'a SmtpListenerPlan,
    report: &'a mut SessionReport,
    peer: SocketAddr,
    client: Client,
    mail: Option<(String, String)>,
    outbound: Option<Outbound>,
    transaction: Option<Transaction>,
    out: Vec<u8>,
    /// Becomes true when the relay's drain time is up.
    closing: Closing,
}

/// The relay's "drain time is up" signal.
pub type Closing = tokio::sync::watch::Receiver<bool>;

/// Runs one SMTP session to its end.
pub async fn run(
    id: u64,
    plan: &SmtpListenerPlan,
    client: TcpStream,
    peer: SocketAddr,
    closing: Closing,
) -> SessionReport {
    let started = Instant::now();
    let mut report = SessionReport::new(id, &plan.name, peer, "-");
    report.client_cookie = crate::bpf::socket_cookie(&client);
    if plan.starttls == StartTls::Unavailable && !plan.implicit_tls {
        report.tls_off.push(Direction::Inbound);
    }
    let _ = client.set_nodelay(true);
    let mut dialogue = Dialogue {
        plan,
        report: &mut report,
        peer,
        client: Client::new(peer.ip()),
        mail: None,
        outbound: None,
        transaction: None,
        out: Vec::new(),
        closing,
    };
    let end = dialogue.run(client).await;
    if let Some(o) = dialogue.outbound.take() {
        o.hop.quit().await;
    }
    report.outcome = end;
    report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    report
}

impl Dialogue<'_> {
    fn settings(&self) -> ServerSettings {
        ServerSettings {
            hostname: self.plan.hostname.clone(),
            starttls: self.plan.starttls,
            max_message_size: self.plan.max_message_size,
        }
    }

    async fn run(&mut self, client: TcpStream) -> Outcome {
        let mut leg = Leg::Plain(client);
        if self.plan.implicit_tls {
            leg = match self.accept_tls(leg).await {
                Ok(leg) => leg,
                Err(outcome) => return outcome,
            };
        } else {
            self.report.inbound = Some(LegSecurity::Plaintext);
        }
        let mut server = Server::new(self.settings());
        if self.plan.implicit_tls {
            server.tls_established();
        }
        self.out.extend(server.greeting().to_bytes());
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(event) = server.poll() {
                match event {
                    Event::Reply(r) => self.out.extend(r.to_bytes()),
                    Event::StartTls => {
                        if let Err(e) = self.flush(&mut leg).await {
                            return Outcome::Failed {
                                reason: e.to_string(),
                            };
                        }
                        leg = match self.accept_tls(leg).await {
                            Ok(leg) => leg,
                            Err(outcome) => return outcome,
                        };
                        server = Server::new(self.settings());
                        server.tls_established();
                    }
                    Event::Quit | Event::Close => {
                        let _ = self.flush(&mut leg).await;
                        let _ = leg.shutdown().await;
                        return Outcome::Relayed {
                            end: crate::pump::PumpEnd::Closed,
                        };
                    }
                    other => {
                        if let Some(reply) = self.relay_event(other).await {
                            server.respond(reply);
                        }
                    }
                }
            }
            if let Err(e) = self.flush(&mut leg).await {
                return Outcome::Failed {
                    reason: e.to_string(),
                };
            }
            let read = tokio::select! {
                r = timeout(self.plan.timeouts.command, leg.read(&mut buf)) => Some(r),
                _ = self.closing.wait_for(|closing| *closing) => None,
            };
            let Some(read) = read else {
                return self.close_for_shutdown(&mut leg).await;
            };
            let n = match read {
                Ok(Ok(0)) => {
                    return Outcome::Failed {
                        reason: "client closed without QUIT".into(),
                    }
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    return Outcome::Failed {
                        reason: e.to_string(),
                    }
                }
                Err(_) => {
                    self.out
                        .extend(Reply::new(421, "4.4.2 Timeout, closing").to_bytes());
                    let _ = self.flush(&mut leg).await;
                    return Outcome::Failed {
                        reason: "client timed out".into(),
                    };
                }
            };
            server.feed(&buf[..n]);
        }
    }

    /// The drain time is up: 421 to the client wherever the dialogue is. A
    /// transaction under way is abandoned — its next hop is hung up on
    /// without an end of data, so nothing half-received is delivered and
    /// the sender keeps the message to retry.
    async fn close_for_shutdown(&mut self, leg: &mut Leg) -> Outcome {
        let reply = Reply::new(421, "4.3.2 Service shutting down, try again later");
        self.outbound = None;
        self.finish_transaction(&reply);
        self.out.extend(reply.to_bytes());
        let _ = self.flush(leg).await;
        let _ = leg.shutdown().await;
        Outcome::Failed {
            reason: "relay shutting down".into(),
        }
    }

    async fn flush(&mut self, leg: &mut Leg) -> std::io::Result<()> {
        if !self.out.is_empty() {
            leg.write_all(&self.out).await?;
            leg.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn accept_tls(&mut self, leg: Leg) -> Result<Leg, Outcome> {
        let (Some(tls), Leg::Plain(tcp)) = (&self.plan.tls, leg) else {
            return Err(Outcome::Failed {
                reason: "TLS without a certificate".into(),
            });
        };
        let accepted = timeout(
            self.plan.timeouts.handshake,
            tls.acceptor().accept(RecordIo::new(tcp)),
        )
        .await;
        let mut stream = match accepted {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.handshake_failed(classify_failure(&e))),
            Err(_) => {
                return Err(self.handshake_failed(TlsFailure::HandshakeFailed("timed out".into())))
            }
        };
        stream.get_mut().0.pass_through();
        let conn = stream.get_ref().1;
        let negotiated = Negotiated::of(conn);
        let chain = conn.peer_certificates().unwrap_or_default();
        self.client.tls = true;
        self.client.certificate = self.presented(chain);
        let trust = self.client_trust(tls, chain);
        tracing::info!(
            session = self.report.id,
            "{}",
            inbound_tls_line(self.peer, &negotiated, trust)
        );
        self.report.inbound = Some(LegSecurity::Tls {
            negotiated,
            trust,
            server_name: conn.server_name().map(str::to_string),
            peer_names: self
                .client
                .certificate
                .as_ref()
                .map(|c| c.names.clone())
                .unwrap_or_default(),
        });
        Ok(Leg::TlsServer(Box::new(stream)))
    }

    /// The inbound TLS handshake failed (as a TCP session reports it): the
    /// leg never got a security to report, not even plaintext.
    fn handshake_failed(&mut self, failure: TlsFailure) -> Outcome {
        tracing::info!(session = self.report.id, client = %self.peer, "inbound {failure}");
        self.report.inbound = None;
        Outcome::Refused {
            leg: Direction::Inbound,
            reason: failure.to_string(),
            failure: Some(failure),
        }
    }

    /// A mail transaction in cleartext on a listener that offers STARTTLS
    /// is a downgrade, as the wire witness counts it (once per session).
    fn note_cleartext_mail(&mut self) {
        if self.client.tls
            || self.plan.starttls == StartTls::Unavailable
            || self.report.downgraded(Direction::Inbound).is_some()
        {
            return;
        }
        self.report.downgrades.push(Downgrade {
            leg: Direction::Inbound,
            reason: "client did not use STARTTLS".into(),
        });
    }

    /// The client certificate, and which inbound connectors' anchors its
    /// chain leads to.
    fn presented(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'_>],
    ) -> Option<PresentedCertificate> {
        let end_entity = chain.first()?;
        let trusted_by = self
            .plan
            .connector_anchors
            .iter()
            .enumerate()
            .filter(|(_, roots)| {
                roots
                    .as_ref()
                    .is_some_and(|roots| client_chain_verifies(roots, chain))
            })
            .map(|(i, _)| i)
            .collect();
        Some(PresentedCertificate {
            names: cert_names(end_entity),
            trusted_by,
        })
    }

    /// The trust word for the inbound TLS line: a listener that checks
    /// client certificates in the handshake knows; otherwise the
    /// connectors' anchors and names decide.
    fn client_trust(
        &self,
        tls: &ListenerTls,
        chain: &[rustls::pki_types::CertificateDer<'_>],
    ) -> PeerTrust {
        let Some(cert) = &self.client.certificate else {
            return PeerTrust::Anonymous;
        };
        if !tls.defers_client_certificates() {
            return tls.client_trust(Some(chain));
        }
        self.plan.admission.certificate_trust(cert)
    }

    async fn relay_event(&mut self, event: Event) -> Option<Reply> {
        match event {
            Event::Mail { from, params } => {
                self.note_cleartext_mail();
                let mut transaction = Transaction {
                    from: from.clone(),
                    recipients: Vec::new(),
                    connector: None,
                    next_hop: None,
                    outbound: None,
                    result: None,
                    refused: Vec::new(),
                };
                if let Err(refusal) = self.plan.admission.check_sender(&self.client, &from) {
                    transaction.result = Some(refusal.to_string());
                    self.report.transactions.push(transaction);
                    return Some(refusal);
                }
                // The connector is chosen at the first RCPT: MAIL is replayed
                // there, and its reply reaches the sender as that RCPT's.
                self.transaction = Some(transaction);
                self.mail = Some((from, params));
                Some(Reply::new(250, "2.1.0 Sender ok"))
            }
            Event::Rcpt { to, params } => Some(self.rcpt(to, params).await),
            Event::Data => {
                let Some(o) = self.outbound.as_mut() else {
                    return Some(Reply::new(503, "5.5.1 No valid recipients"));
                };
                o.data_started = true;
                Some(match o.hop.data().await {
                    Ok(r) => r,
                    Err(e) => {
                        self.outbound = None;
                        Reply::new(451, format!("4.4.2 Next hop failed: {e}"))
                    }
                })
            }
            Event::Body(bytes) => {
                if let Some(o) = self.outbound.as_mut() {
                    if o.refused.is_none() {
                        let mut stuffed;
                        let out = match o.stuffer.as_mut() {
                            Some(s) => {
                                stuffed = Vec::with_capacity(bytes.len() + 16);
                                s.stuff(&bytes, &mut stuffed);
                                &stuffed[..]
                            }
                            None => &bytes[..],
                        };
                        if let Err(e) = o.hop.send(out).await {
                            o.refused = Some(Reply::new(
                                451,
                                format!("4.4.2 Next hop failed during the message: {e}"),
                            ));
                        }
                    }
                }
                None
            }
            Event::EndOfData => {
                let reply = match self.outbound.as_mut() {
                    Some(o) => match o.refused.take() {
                        Some(r) => r,
                        None => match o.hop.finish_data(b"").await {
                            Ok(r) => r,
                            Err(e) => Reply::new(
                                451,
                                format!("4.4.2 Next hop failed at end of data: {e}"),
                            ),
                        },
                    },
                    None => Reply::new(451, "4.3.0 No next hop"),
                };
                Some(self.end_of_message(reply))
            }
            Event::AbortData(reply) => {
                // The next hop must not deliver a partial message: hang up.
                self.outbound = None;
                self.finish_transaction(&reply);
                self.out.extend(reply.to_bytes());
                None
            }
            Event::Bdat { size, last } => {
                let o = self.outbound.as_mut()?;
                if o.chunking {
                    let line = format!("BDAT {size}{}\r\n", if last { " LAST" } else { "" });
                    if let Err(e) = o.hop.send(line.as_bytes()).await {
                        o.refused = Some(Reply::new(451, format!("4.4.2 Next hop failed: {e}")));
                    }
                } else if !o.data_started {
                    o.data_started = true;
                    match o.hop.data().await {
                        Ok(r) if r.code == 354 => o.stuffer = Some(DotStuffer::new()),
                        Ok(r) => o.refused = Some(r),
                        Err(e) => {
                            o.refused = Some(Reply::new(451, format!("4.4.2 Next hop failed: {e}")))
                        }
                    }
                }
                None
            }
            Event::ChunkEnd { last } => {
                let Some(o) = self.outbound.as_mut() else {
                    return Some(Reply::new(503, "5.5.1 No valid recipients"));
                };
                let reply =
                    if let Some(r) = o.refused.clone() {
                        r
                    } else if o.chunking {
                        o.hop.chunk_reply().await.unwrap_or_else(|e| {
                            Reply::new(451, format!("4.4.2 Next hop failed: {e}"))
                        })
                    } else if last {
                        let terminator = o
                            .stuffer
                            .as_ref()
                            .map(DotStuffer::finish)
                            .unwrap_or_default();
                        o.hop.finish_data(&terminator).await.unwrap_or_else(|e| {
                            Reply::new(451, format!("4.4.2 Next hop failed: {e}"))
                        })
                    } else {
                        // Converting to DATA: the next hop answers once, at the
                        // end; a chunk is only acknowledged as received.
                        Reply::new(250, "2.0.0 Chunk received")
                    };
                if last || !reply.is_positive() {
                    return Some(self.end_of_message(reply));
                }
                Some(reply)
            }
            Event::Rset => {
                if let Some(o) = self.outbound.as_mut() {
                    let _ = o.hop.command_default("RSET").await;
                }
                self.mail = None;
                self.transaction = None;
                None
            }
            Event::Reply(_) | Event::StartTls | Event::Quit | Event::Close => None,
        }
    }

    fn finish_transaction(&mut self, reply: &Reply) {
        if let Some(mut t) = self.transaction.take() {
            t.result = Some(reply.to_string());
            self.report.transactions.push(t);
        }
        self.mail = None;
    }

    fn end_of_message(&mut self, reply: Reply) -> Reply {
        self.finish_transaction(&reply);
        if let Some(o) = self.outbound.as_mut() {
            o.data_started = false;
            o.stuffer = None;
            o.refused = None;
        }
        reply
    }

    async fn rcpt(&mut self, to: String, params: String) -> Reply {
        let domain = match self.plan.admission.check_recipient(&self.client, &to) {
            Ok(domain) => domain,
            Err(refusal) => {
                if let Some(t) = self.transaction.as_mut() {
                    t.refused.push(refusal.to_string());
                }
                return refusal;
            }
        };
        let Some(connector) = route(&domain, &self.plan.routes) else {
            return Reply::new(
                550,
                format!("5.7.1 Relay access denied: no connector for {domain}"),
            );
        };
        let txn_connector = self.transaction.as_ref().and_then(|t| t.connector.clone());
        let name = self.plan.outbound[connector].name.clone();
        if txn_connector.as_ref().is_some_and(|c| *c != name) {
            return Reply::new(
                452,
                "4.5.3 Recipient belongs to another route; send it in a separate transaction",
            );
        }
        if self
            .outbound
            .as_ref()
            .is_some_and(|o| o.connector != connector)
            || txn_connector.is_none()
        {
            // A new transaction, possibly to another next hop.
            if let Some(old) = self.outbound.take() {
                if old.connector == connector {
                    self.outbound = Some(old);
                } else {
                    old.hop.quit().await;
                }
            }
        }
        if self.outbound.is_none() {
            let plan = &self.plan.outbound[connector];
            match establish(plan, &self.plan.hostname, self.plan.timeouts).await {
                Ok(mut est) => {
                    self.report.sockets.append(&mut est.sockets);
                    self.report.upstream = plan.name.clone();
                    self.report.upstream_addr = Some(est.address);
                    self.report.outbound = Some(est.security.clone());
                    if let Some(failure) = &est.downgrade {
                        self.report.downgrades.push(Downgrade {
                            leg: Direction::Outbound,
                            reason: failure.to_string(),
                        });
                    }
                    if let Some(t) = self.transaction.as_mut() {
                        t.next_hop = Some(format!("{}[{}]", est.host, est.address));
                        t.outbound = Some(est.security);
                    }
                    let chunking = est.hop.capabilities.has("CHUNKING");
                    self.outbound = Some(Outbound {
                        connector,
                        hop: est.hop,
                        chunking,
                        stuffer: None,
                        refused: None,
                        data_started: false,
                    });
                }
                Err(mut unavailable) => {
                    self.report.sockets.append(&mut unavailable.sockets);
                    return unavailable.reply;
                }
            }
        }
        let o = self.outbound.as_mut().expect("established above");
        if txn_connector.is_none() {
            let (from, mail_params) = self.mail.clone().unwrap_or_default();
            let line = format!("MAIL FROM:<{from}>{}", spaced(&mail_params));
            match o.hop.command_default(&line).await {
                Ok(r) if r.is_positive() => {}
                Ok(r) => return r, // the next hop refused the sender
                Err(e) => {
                    self.outbound = None;
                    return Reply::new(451, format!("4.4.2 Next hop failed: {e}"));
                }
            }
            if let Some(t) = self.transaction.as_mut() {
                t.connector = Some(name.clone());
            }
        }
        let reply = match o
            .hop
            .command_default(&format!("RCPT TO:<{to}>{}", spaced(&params)))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.outbound = None;
                return Reply::new(451, format!("4.4.2 Next hop failed: {e}"));
            }
        };
        if reply.is_positive() {
            if let Some(t) = self.transaction.as_mut() {
                t.recipients.push(to);
            }
        }
        reply
    }
}

fn spaced(params: &str) -> String {
    if params.is_empty() {
        String::new()
    } else {
        format!(" {params}")
    }
}
