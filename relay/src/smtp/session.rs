//! One SMTP session end to end: the client-facing dialogue
//! ([`super::server`]), STARTTLS as a server, the inbound connector's
//! rules, the outbound connector chosen at the first RCPT, the next hop's
//! replies relayed back, message bodies streamed through.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::client::{establish, DotStuffer, NextHop, OutboundConnector, SmtpTimeouts};
use super::codec::{domain_of, Reply};
use super::server::{Event, Server, ServerSettings, StartTls};
use crate::policy::NamePattern;
use crate::pump::Leg;
use crate::report::{inbound_tls_line, Direction, Downgrade, LegSecurity, Outcome, SessionReport};
use crate::tls::{cert_names, classify_failure, ListenerTls, Negotiated, RecordIo};

/// An address range (`192.0.2.0/24`, `2001:db8::/32`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid address range '{s}', expected e.g. 192.0.2.0/24");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (
                ip.parse::<IpAddr>().map_err(|_| bad())?,
                Some(p.parse::<u8>().map_err(|_| bad())?),
            ),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr {
            network: ip,
            prefix,
        })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    None,
    Requested,
    Required,
}
keywords!(ClientCertificate, "client certificate requirement", {
    None => "none",
    Requested => "requested",
    Required => "required",
});

/// Rules for sessions from a partner or an on-premises server.
pub struct InboundConnector {
    pub name: String,
    /// Matches sessions from these ranges (any when empty).
    pub client_addresses: Vec<Cidr>,
    /// Matches sessions whose client certificate carries one of these names
    /// (any when empty).
    pub certificate_names: Vec<NamePattern>,
    /// Mail from these domains must arrive through this connector.
    pub sender_domains: Vec<String>,
    pub tls_required: bool,
    pub client_certificate: ClientCertificate,
}

impl InboundConnector {
    fn matches(&self, ip: IpAddr, cert_names: &[String]) -> bool {
        let address_ok = self.client_addresses.is_empty()
            || self.client_addresses.iter().any(|c| c.contains(ip));
        let name_ok = self.certificate_names.is_empty()
            || NamePattern::any_matches(
                &self.certificate_names,
                cert_names.iter().map(String::as_str),
            );
        address_ok && name_ok
    }
}

/// Which outbound connector takes a recipient domain: an exact domain, then
/// the longest `.parent` match, then `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainPattern {
    Exact(String),
    Subdomains(String),
    Any,
}

impl std::str::FromStr for DomainPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<DomainPattern, String> {
        let s = s.trim_end_matches('.').to_ascii_lowercase();
        if s == "*" {
            return Ok(DomainPattern::Any);
        }
        let (sub, name) = match s.strip_prefix('.') {
            Some(rest) => (true, rest.to_string()),
            None => (false, s.clone()),
        };
        if name.is_empty()
            || name.contains(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        {
            return Err(format!(
                "invalid recipient domain '{s}', expected example.org, .example.org (subdomains) or *"
            ));
        }
        Ok(if sub {
            DomainPattern::Subdomains(name)
        } else {
            DomainPattern::Exact(name)
        })
    }
}

/// The connector (index) for `domain`, by the precedence above.
pub fn route(domain: &str, connectors: &[(Vec<DomainPattern>, usize)]) -> Option<usize> {
    let domain = domain.to_ascii_lowercase();
    let mut best: Option<(usize, usize)> = None; // (rank, connector)
    for (patterns, idx) in connectors {
        for p in patterns {
            let rank = match p {
                DomainPattern::Exact(d) if *d == domain => usize::MAX,
                DomainPattern::Subdomains(d) if domain.ends_with(&format!(".{d}")) => d.len() + 1,
                DomainPattern::Any => 0,
                _ => continue,
            };
            if best.is_none_or(|(r, _)| rank > r) {
                best = Some((rank, *idx));
            }
        }
    }
    best.map(|(_, i)| i)
}

/// Everything an SMTP listener's sessions need.
pub struct SmtpListenerPlan {
    pub name: String,
    pub hostname: String,
    pub starttls: StartTls,
    /// SMTPS: TLS from the first byte.
    pub implicit_tls: bool,
    pub tls: Option<ListenerTls>,
    pub inbound: Vec<InboundConnector>,
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
    /// The reply the sender got at the end (the next hop's, or the relay's 4xx).
    pub result: Option<String>,
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
    client_names: Vec<String>,
    inbound: Option<usize>,
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
    let _ = client.set_nodelay(true);
    let mut dialogue = Dialogue {
        plan,
        report: &mut report,
        peer,
        client_names: Vec::new(),
        inbound: None,
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
        let required = self
            .inbound
            .is_some_and(|i| self.plan.inbound[i].tls_required);
        ServerSettings {
            hostname: self.plan.hostname.clone(),
            starttls: match (self.plan.starttls, required) {
                (StartTls::Unavailable, _) => StartTls::Unavailable,
                (_, true) => StartTls::Required,
                (s, false) => s,
            },
            max_message_size: self.plan.max_message_size,
        }
    }

    fn choose_inbound(&mut self) {
        self.inbound = self
            .plan
            .inbound
            .iter()
            .position(|c| c.matches(self.peer.ip(), &self.client_names));
    }

    async fn run(&mut self, client: TcpStream) -> Outcome {
        self.choose_inbound();
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
                        self.choose_inbound();
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
                        let tls = server.tls_active();
                        if let Some(reply) = self.relay_event(other, tls).await {
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
            Ok(Err(e)) => {
                let failure = classify_failure(&e);
                return Err(Outcome::Refused {
                    leg: Direction::Inbound,
                    reason: failure.to_string(),
                    failure: Some(failure),
                });
            }
            Err(_) => {
                return Err(Outcome::Failed {
                    reason: "TLS handshake timed out".into(),
                })
            }
        };
        stream.get_mut().0.pass_through();
        let conn = stream.get_ref().1;
        let negotiated = Negotiated::of(conn);
        let trust = tls.client_trust(conn.peer_certificates());
        self.client_names = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(cert_names)
            .unwrap_or_default();
        tracing::info!(
            session = self.report.id,
            "{}",
            inbound_tls_line(self.peer, &negotiated, trust)
        );
        self.report.inbound = Some(LegSecurity::Tls {
            negotiated,
            trust,
            server_name: conn.server_name().map(str::to_string),
            peer_names: self.client_names.clone(),
        });
        Ok(Leg::TlsServer(Box::new(stream)))
    }

    /// Checks the inbound connector's rules for a sender.
    fn sender_refusal(&self, from: &str, tls: bool) -> Option<Reply> {
        if let Some(i) = self.inbound {
            let c = &self.plan.inbound[i];
            let has_cert = !self.client_names.is_empty();
            let named = NamePattern::any_matches(
                &c.certificate_names,
                self.client_names.iter().map(String::as_str),
            );
            if c.client_certificate == ClientCertificate::Required
                && !(has_cert && (named || c.certificate_names.is_empty()))
            {
                return Some(Reply::new(
                    451,
                    format!(
                        "4.7.1 Connector {} requires a client certificate with an allowed name",
                        c.name
                    ),
                ));
            }
        }
        let domain = domain_of(from)?;
        let owner = self
            .plan
            .inbound
            .iter()
            .find(|c| c.sender_domains.contains(&domain))?;
        let named = NamePattern::any_matches(
            &owner.certificate_names,
            self.client_names.iter().map(String::as_str),
        );
        if tls && named {
            return None;
        }
        Some(Reply::new(
            451,
            format!(
                "4.7.1 Mail from {domain} must arrive over TLS with a certificate of connector {}",
                owner.name
            ),
        ))
    }

    async fn relay_event(&mut self, event: Event, tls: bool) -> Option<Reply> {
        match event {
            Event::Mail { from, params } => {
                if let Some(refusal) = self.sender_refusal(&from, tls) {
                    return Some(refusal);
                }
                // The connector is chosen at the first RCPT: MAIL is replayed
                // there, and its reply reaches the sender as that RCPT's.
                self.transaction = Some(Transaction {
                    from: from.clone(),
                    recipients: Vec::new(),
                    connector: None,
                    next_hop: None,
                    outbound: None,
                    result: None,
                });
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
        let Some(domain) = domain_of(&to) else {
            return Reply::new(550, "5.1.3 Recipient address needs a domain");
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
                Ok(est) => {
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
                Err(unavailable) => return unavailable.0,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_ranges() {
        let net: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(net.contains("192.0.2.77".parse().unwrap()));
        assert!(!net.contains("192.0.3.1".parse().unwrap()));
        assert!(
            net.contains("::ffff:192.0.2.1".parse().unwrap()),
            "v4-mapped v6 matches"
        );
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("127.0.0.1"
            .parse::<Cidr>()
            .unwrap()
            .contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn routing_prefers_exact_then_longest_parent_then_default() {
        let p = |s: &str| s.parse::<DomainPattern>().unwrap();
        let routes = vec![
            (vec![p("*")], 0),
            (vec![p(".partner.example")], 1),
            (vec![p("partner.example"), p("mx.partner.example")], 2),
            (vec![p(".eu.partner.example")], 3),
        ];
        assert_eq!(route("partner.example", &routes), Some(2));
        assert_eq!(route("a.partner.example", &routes), Some(1));
        assert_eq!(route("mx.partner.example", &routes), Some(2));
        assert_eq!(route("x.eu.partner.example", &routes), Some(3));
        assert_eq!(route("elsewhere.example", &routes), Some(0));
        assert_eq!(route("elsewhere.example", &routes[1..]), None);
        assert!("bad domain".parse::<DomainPattern>().is_err());
    }
}
