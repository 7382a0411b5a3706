//! One SMTP session's I/O: the client's bytes into the dialogue machine
//! ([`tlsrelay_core::smtp::server`]), its events into the relaying machine
//! ([`tlsrelay_core::smtp::forward`]), and that machine's actions carried out on the
//! sockets, under RFC 5321's timers and the drain signal. No decision is
//! taken here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::client::{establish, MailConnector};
use super::hop::{HopConnection, OutboundRecord};
use crate::legs::{accept_tls, inbound_refused, inbound_security, ClientAddress, ProxySources};
use crate::pump::{leg_to_kernel, DataPath, Handoff, Leg, PumpEnd, Side};
use crate::tls::{cert_names, client_chain_verifies, ListenerTls};
use std::os::fd::AsRawFd;
use tlsrelay_core::policy::PeerTrust;
use tlsrelay_core::report::{
    Direction, Downgrade, LegSecurity, Outcome, PolicySession, SessionReport, SocketRecord,
};
use tlsrelay_core::smtp::admission::{Client, PresentedCertificate};
use tlsrelay_core::smtp::codec::Reply;
use tlsrelay_core::smtp::forward::{Action, Destination, Forwarder, OpenedHop, Routing, Stamp};
use tlsrelay_core::smtp::next_hop::SmtpTimeouts;
use tlsrelay_core::smtp::server::{Event, Server, ServerSettings, StartTls};
use tlsrelay_sys::splice::{read_pipe, splice, tee, Pipe};

/// Everything an SMTP listener's sessions need.
pub struct SmtpListenerPlan {
    pub name: String,
    pub hostname: String,
    pub starttls: StartTls,
    /// SMTPS: TLS from the first byte.
    pub implicit_tls: bool,
    /// Connections start with a PROXY protocol header naming the client,
    /// from these balancers only.
    pub proxy_protocol: Option<ProxySources>,
    pub tls: Option<ListenerTls>,
    /// Accepted domains, inbound connectors, who may relay, and where mail
    /// for each domain goes.
    pub routing: Arc<Routing>,
    /// Each inbound connector's client certificate anchors (by index).
    pub connector_anchors: Vec<Option<Arc<rustls::RootCertStore>>>,
    /// The outbound connectors, by the index `routing` uses.
    pub connectors: Vec<Arc<MailConnector>>,
    pub timeouts: SmtpTimeouts,
    pub max_message_size: u64,
    /// `Received:` fields a message may carry before it is a loop.
    pub max_hops: u32,
    /// Who may connect, and how fast.
    pub access: crate::access::ClientAccess,
    /// TLS legs go to the kernel after their handshake, where it can
    /// (`dataplane.ktls`).
    pub kernel_tls: bool,
}

/// The relay's "drain time is up" signal.
pub type Closing = tokio::sync::watch::Receiver<bool>;

/// What the session learnt about its legs, for the report.
#[derive(Default)]
struct Legs {
    inbound: Option<LegSecurity>,
    outbound: Option<LegSecurity>,
    /// The outbound leg is an idle connection an earlier session left.
    outbound_reused: bool,
    upstream: Option<(String, SocketAddr)>,
    downgrades: Vec<Downgrade>,
    sockets: Vec<SocketRecord>,
    policy_sessions: Vec<PolicySession>,
    /// Legs whose TLS the kernel held.
    kernel_tls: Vec<Side>,
    /// Why a TLS leg stayed in rustls.
    userspace_reason: Option<String>,
}

struct Session<'a> {
    id: u64,
    plan: &'a SmtpListenerPlan,
    peer: SocketAddr,
    forwarder: Forwarder,
    hop: Option<HopConnection>,
    legs: Legs,
    out: Vec<u8>,
    /// Becomes true when the relay's drain time is up.
    closing: Closing,
    /// BDAT splicing: the chunk pipe and its tee, made at first use.
    pipes: Option<(Pipe, Pipe)>,
    /// The scanned copy of spliced chunk bytes.
    scratch: Vec<u8>,
    /// Chunk bytes that went to the next hop by splice.
    chunk_bytes_spliced: u64,
}

/// Waits for `client` (something the client must do) within what is
/// left of its request's time, which the server machine keeps
/// ([`tlsrelay_core::smtp::clock::RequestClock`]); when that runs out,
/// the machine closes and this gives its goodbye (421 4.4.2).
async fn client_wait<T>(
    server: &mut Server,
    client: impl std::future::Future<Output = T>,
) -> Result<T, Reply> {
    server.client_wait_from(Instant::now());
    let deadline = server.poll_timeout().expect("waiting");
    let result = tokio::time::timeout_at(deadline.into(), client).await;
    let now = Instant::now();
    match result {
        Ok(value) => {
            server.client_wait_over(now);
            Ok(value)
        }
        Err(_) => Err(server
            .handle_timeout(now.max(deadline))
            .expect("the deadline passed")),
    }
}

/// Runs one SMTP session to its end. `address` is who the client is
/// (read from a PROXY protocol header by the listener), or why it was
/// refused before anything else.
pub async fn run(
    id: u64,
    plan: &SmtpListenerPlan,
    client: TcpStream,
    socket_peer: SocketAddr,
    address: Result<ClientAddress, Outcome>,
    closing: Closing,
) -> SessionReport {
    let started = Instant::now();
    let client_cookie = tlsrelay_sys::bpf::socket_cookie(&client);
    let _ = client.set_nodelay(true);
    let (peer, proxied_by) = match &address {
        Ok(a) => (a.peer, a.proxied_by),
        Err(_) => (socket_peer, None),
    };
    let mut session = Session {
        id,
        plan,
        peer,
        forwarder: Forwarder::new(
            plan.routing.clone(),
            Client::new(peer.ip()),
            Stamp {
                by: plan.hostname.clone(),
                session: id,
            },
        ),
        hop: None,
        legs: Legs::default(),
        out: Vec::new(),
        closing,
        pipes: None,
        scratch: Vec::new(),
        chunk_bytes_spliced: 0,
    };
    let outcome = match address {
        Ok(_) => session.run(client).await,
        Err(refused) => refused,
    };
    session.forwarder.end();
    session.perform(None).await;

    let legs = session.legs;
    let mut report = SessionReport::new(id, &plan.name, peer, "-");
    report.proxied_by = proxied_by;
    report.client_cookie = client_cookie;
    if plan.starttls == StartTls::Unavailable && !plan.implicit_tls {
        report.tls_off.push(Direction::Inbound);
    }
    if let Some((connector, address)) = legs.upstream {
        report.upstream = connector;
        report.upstream_addr = Some(address);
    }
    report.inbound = legs.inbound;
    report.outbound = legs.outbound;
    report.outbound_reused = legs.outbound_reused;
    report.downgrades = legs.downgrades;
    report.sockets = legs.sockets;
    report.policy_sessions = legs.policy_sessions;
    // Commands and bodies pass through this process (as plaintext where
    // the kernel holds a leg's TLS).
    if report.outbound.is_some() {
        report.data_path = Some(DataPath::Userspace);
    }
    if session.chunk_bytes_spliced > 0 {
        report.data_path = Some(DataPath::SpliceEpoll);
        report.bytes_client_to_upstream = session.chunk_bytes_spliced;
    }
    report.ktls = legs.kernel_tls;
    report.path_reason = legs.userspace_reason;
    report.transactions = session.forwarder.take_finished();
    report.outcome = outcome;
    report.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    report
}

fn failed(reason: impl ToString) -> Outcome {
    Outcome::Failed {
        reason: reason.to_string(),
    }
}

impl Session<'_> {
    fn settings(&self) -> ServerSettings {
        ServerSettings {
            hostname: self.plan.hostname.clone(),
            starttls: self.plan.starttls,
            max_message_size: self.plan.max_message_size,
            max_hops: self.plan.max_hops,
            command_timeout: self.plan.timeouts.command,
        }
    }

    async fn run(&mut self, client: TcpStream) -> Outcome {
        let mut leg = Leg::Plain(client);
        let mut server = Server::new(self.settings());
        if self.plan.implicit_tls {
            leg = match self.start_tls(leg).await {
                Ok(leg) => leg,
                Err(outcome) => return outcome,
            };
            server.tls_established();
        } else {
            self.legs.inbound = Some(LegSecurity::Plaintext);
        }
        self.out.extend(server.greeting().to_bytes());
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(event) = server.poll() {
                match event {
                    Event::Reply(r) => self.out.extend(r.to_bytes()),
                    Event::StartTls => {
                        if let Err(e) = self.flush(&mut leg).await {
                            return failed(e);
                        }
                        // RFC 3207 4.2: nothing from before TLS goes on,
                        // including a next hop opened for it.
                        self.forwarder.tls_started();
                        self.perform(None).await;
                        leg = match self.start_tls(leg).await {
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
                            end: PumpEnd::Closed,
                        };
                    }
                    event => {
                        if matches!(event, Event::Mail { .. }) {
                            self.note_cleartext_mail();
                        }
                        self.forwarder.client_event(event, crate::unix_now());
                        self.perform(Some(&mut server)).await;
                    }
                }
            }
            if let Err(e) = self.flush(&mut leg).await {
                return failed(e);
            }
            if server.chunk_on_socket() > 0 && self.forwarder.passes_chunks_through() {
                match self.splice_chunk(&leg, &mut server).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(outcome) => return outcome,
                }
            }
            match self.read_client(&mut server, &mut leg, &mut buf).await {
                Ok(n) => server.feed(&buf[..n]),
                Err(outcome) => return outcome,
            }
        }
    }

    /// Moves the BDAT chunk under way from the client's socket to the next
    /// hop's with splice (both plain TCP or kernel TLS): socket -> pipe,
    /// tee'd into a second pipe whose copy the server scans for bare CR/LF
    /// before the bytes go on, pipe -> socket. Returns whether any moved;
    /// `false` leaves the chunk to the ordinary reads (a leg that is not
    /// spliceable, a kernel TLS control record next, a stall).
    async fn splice_chunk(&mut self, leg: &Leg, server: &mut Server) -> Result<bool, Outcome> {
        use tokio::io::Interest;
        // The command before the chunk goes first; a write that fails is
        // the ordinary path's to report.
        if let Some(hop) = self.hop.as_mut() {
            if hop.write_unwritten().await.is_err() {
                return Ok(false);
            }
        }
        let (Some(src), Some(hop)) = (leg.splice_socket(), self.hop.as_ref()) else {
            return Ok(false);
        };
        let Some(dst) = hop.splice_socket() else {
            return Ok(false);
        };
        let pipes = match self.pipes.take() {
            Some(pipes) => pipes,
            None => match (Pipe::take(), Pipe::take()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return Ok(false),
            },
        };
        let (a, b) = (&pipes.0, &pipes.1);
        let capacity = a.capacity.min(b.capacity);
        // The tee'd copy is scanned a piece at a time: a stalled session
        // holds this much of userspace, not a pipe's worth.
        self.scratch.resize(SCAN_PIECE, 0);
        let mut moved = false;
        let mut left = server.chunk_on_socket();
        while left > 0 {
            let readable = client_wait(server, src.readable()).await;
            if !matches!(readable, Ok(Ok(()))) {
                break; // the ordinary read path times out or fails it
            }
            let want = (left as usize).min(capacity);
            let read = src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), a.write.as_raw_fd(), want)
            });
            let n = match read {
                Ok(0) => break, // the client closed: the ordinary path says so
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                // EINVAL: a kernel TLS control record comes next.
                Err(_) => break,
            };
            if !matches!(tee(a.read.as_raw_fd(), b.write.as_raw_fd(), n), Ok(k) if k == n) {
                self.release_chunk_buffers();
                return Err(failed("splicing a BDAT chunk: tee of the pipe failed"));
            }
            moved = true;
            left -= n as u64;
            let clean = match scan_copy(b, n, &mut self.scratch, server) {
                Ok(clean) => clean,
                Err(e) => {
                    self.release_chunk_buffers();
                    return Err(failed(format!("splicing a BDAT chunk: {e}")));
                }
            };
            self.chunk_bytes_spliced += clean as u64;
            if let Err(e) = splice_out(a, dst, clean).await {
                hop_failed(self.id, &mut self.forwarder, &e);
            }
            if clean < n || !self.forwarder.passes_chunks_through() {
                // Refused or the next hop failed: what is left in the pipes
                // goes nowhere.
                self.release_chunk_buffers();
                return Ok(moved);
            }
        }
        self.pipes = Some(pipes);
        if server.chunk_on_socket() == 0 {
            self.release_chunk_buffers();
        }
        Ok(moved)
    }

    /// The chunk is over (or abandoned): its pipes and scan buffer go, so
    /// a session between chunks or messages holds neither.
    fn release_chunk_buffers(&mut self) {
        if let Some((a, b)) = self.pipes.take() {
            a.give_back();
            b.give_back();
        }
        self.scratch = Vec::new();
    }

    /// Reads the client's next bytes within its request's allowance
    /// ([`RequestClock`]), or ends the session: closed, failed, timed out
    /// (421), or drained (421).
    async fn read_client(
        &mut self,
        server: &mut Server,
        leg: &mut Leg,
        buf: &mut [u8],
    ) -> Result<usize, Outcome> {
        let read = tokio::select! {
            r = client_wait(server, leg.read(buf)) => Some(r),
            _ = self.closing.wait_for(|closing| *closing) => None,
        };
        let goodbye = match read {
            Some(Ok(Ok(0))) => return Err(failed("client closed without QUIT")),
            Some(Ok(Ok(n))) => return Ok(n),
            Some(Ok(Err(e))) => return Err(failed(e)),
            Some(Err(timed_out)) => (timed_out, "client timed out"),
            // A transaction under way is abandoned, so nothing half-received
            // is delivered and the sender keeps the message to retry.
            None => (self.forwarder.shut_down(), "relay shutting down"),
        };
        self.perform(None).await;
        self.out.extend(goodbye.0.to_bytes());
        let _ = self.flush(leg).await;
        let _ = leg.shutdown().await;
        Err(failed(goodbye.1))
    }

    /// Carries out the relaying machine's actions until it has none.
    async fn perform(&mut self, mut server: Option<&mut Server>) {
        while let Some(action) = self.forwarder.poll() {
            match action {
                Action::Respond(reply) => {
                    if let Some(server) = server.as_deref_mut() {
                        server.respond(reply);
                    }
                }
                Action::Write(reply) => self.out.extend(reply.to_bytes()),
                Action::Open(destination) => self.open_hop(destination).await,
                Action::Send(bytes) => {
                    let sent = match self.hop.as_mut() {
                        Some(hop) => hop.send(&bytes).await,
                        None => Err(std::io::ErrorKind::NotConnected.into()),
                    };
                    if let Err(e) = sent {
                        hop_failed(self.id, &mut self.forwarder, &e);
                    }
                    if let Some(server) = server.as_deref_mut() {
                        server.recycle(bytes);
                    }
                }
                Action::Await(wait) => {
                    let reply = match self.hop.as_mut() {
                        Some(hop) => hop.reply(wait).await,
                        None => Err(std::io::ErrorKind::NotConnected.into()),
                    };
                    match reply {
                        Ok(reply) => self.forwarder.hop_reply(reply),
                        Err(e) => hop_failed(self.id, &mut self.forwarder, &e),
                    }
                }
                Action::Close { polite } => {
                    if let Some(hop) = self.hop.take() {
                        if polite {
                            hop.quit().await;
                        }
                    }
                }
                Action::Release(destination) => {
                    let idle = &self.plan.connectors[destination.connector].idle;
                    match (self.hop.take(), idle) {
                        (Some(hop), Some(idle)) => idle.park(destination.domain, hop),
                        (Some(hop), None) => hop.quit().await,
                        (None, _) => {}
                    }
                }
            }
        }
    }

    async fn open_hop(&mut self, destination: Destination) {
        let plan = &self.plan.connectors[destination.connector];
        while let Some(mut hop) = plan.idle.as_ref().and_then(|i| i.take(&destination.domain)) {
            if hop.reset().await {
                tracing::debug!(session = self.id, connector = %plan.name, next_hop = %hop.facts.address, "reusing an idle next-hop connection");
                return self.adopt(plan.name.clone(), hop, true);
            }
            // Gone while idle (a 421 timeout, a reset): a new one.
            drop(hop);
        }
        let hostname = &self.plan.hostname;
        let record = OutboundRecord {
            sockets: &mut self.legs.sockets,
            policy_sessions: &mut self.legs.policy_sessions,
        };
        let domain = destination.domain.as_deref();
        match establish(self.id, plan, domain, hostname, self.plan.timeouts, record).await {
            Ok(est) => {
                if let Some(why) = est.userspace_reason {
                    self.legs.userspace_reason.get_or_insert(why);
                }
                self.legs.downgrades.extend(est.downgrade);
                self.adopt(plan.name.clone(), est.hop, false);
            }
            Err(reply) => self.forwarder.hop_unavailable(reply),
        }
    }

    /// `hop` carries the transaction under way: new, or `reused` idle.
    fn adopt(&mut self, connector: String, hop: HopConnection, reused: bool) {
        let facts = &hop.facts;
        if facts.kernel_tls && !self.legs.kernel_tls.contains(&Side::Upstream) {
            self.legs.kernel_tls.push(Side::Upstream);
        }
        self.legs.upstream = Some((connector, facts.address));
        self.legs.outbound = Some(facts.security.clone());
        self.legs.outbound_reused = reused;
        let opened = OpenedHop {
            name: format!("{}[{}]", facts.host, facts.address),
            security: facts.security.clone(),
            offers: facts.capabilities.clone(),
            reused,
        };
        self.hop = Some(hop);
        self.forwarder.hop_opened(opened);
    }

    /// Sends the replies written so far. A client that does not read them
    /// (a pipelining flood) has the command timeout to make room, and its
    /// next request's clock starts.
    async fn flush(&mut self, leg: &mut Leg) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let write = async {
                leg.write_all(&self.out).await?;
                leg.flush().await
            };
            timeout(self.plan.timeouts.command, write)
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client did not read its replies",
                    )
                })??;
            self.out.clear();
        }
        Ok(())
    }

    /// TLS with the client (STARTTLS, or SMTPS from the first byte) through
    /// the shared leg setup.
    async fn start_tls(&mut self, leg: Leg) -> Result<Leg, Outcome> {
        let (Some(tls), Leg::Plain(tcp)) = (&self.plan.tls, leg) else {
            return Err(failed("TLS without a certificate"));
        };
        let stream = match accept_tls(tls, tcp, Vec::new(), self.plan.timeouts.handshake).await {
            Ok(stream) => stream,
            Err(failure) => {
                self.legs.inbound = None;
                return Err(inbound_refused(self.id, self.peer, failure));
            }
        };
        let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
        let certificate = self.presented(chain);
        let trust = self.client_trust(tls, chain, certificate.as_ref());
        let security = inbound_security(self.id, self.peer, &stream, trust);
        let client = self.forwarder.client_mut();
        client.tls = true;
        client.certificate = certificate;
        if let LegSecurity::Tls { negotiated, .. } = &security {
            client.tls_used = Some(negotiated.trace_words());
        }
        self.legs.inbound = Some(security);
        let leg = Leg::TlsServer(Box::new(stream));
        Ok(match leg_to_kernel(leg, self.plan.kernel_tls).await {
            Handoff::Kernel(leg) => {
                self.legs.kernel_tls.push(Side::Client);
                leg
            }
            Handoff::Userspace(mut leg, why) => {
                self.legs.userspace_reason.get_or_insert(why);
                leg.stay_in_userspace();
                leg
            }
            Handoff::Lost(detail) => return Err(failed(detail)),
        })
    }

    /// A mail transaction in cleartext on a listener that offers STARTTLS
    /// is a downgrade, as the wire witness counts it (once per session).
    fn note_cleartext_mail(&mut self) {
        if self.forwarder.client().tls
            || self.plan.starttls == StartTls::Unavailable
            || self
                .legs
                .downgrades
                .iter()
                .any(|d| d.leg == Direction::Inbound)
        {
            return;
        }
        self.legs.downgrades.push(Downgrade {
            leg: Direction::Inbound,
            reason: "client did not use STARTTLS".into(),
            class: "no starttls",
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
        certificate: Option<&PresentedCertificate>,
    ) -> PeerTrust {
        let Some(cert) = certificate else {
            return PeerTrust::Anonymous;
        };
        if !tls.defers_client_certificates() {
            return tls.client_trust(Some(chain));
        }
        self.plan.routing.admission.certificate_trust(cert)
    }
}

/// How much of a spliced chunk's copy is read and scanned at a time.
const SCAN_PIECE: usize = 16 * 1024;

/// Reads the `n` tee'd bytes from `copy` a piece at a time and shows
/// them to the server; returns how many are clean (fewer than `n`: the
/// message is refused from there, and the rest of `copy` is emptied).
fn scan_copy(
    copy: &Pipe,
    n: usize,
    scratch: &mut [u8],
    server: &mut Server,
) -> std::io::Result<usize> {
    let mut clean = 0;
    let mut read = 0;
    while read < n {
        let want = (n - read).min(scratch.len());
        let k = read_pipe(copy.read.as_raw_fd(), &mut scratch[..want])?;
        if k == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        read += k;
        let passed = server.chunk_passed(&scratch[..k]);
        clean += passed;
        if passed < k {
            // The rest still counts off the chunk, unscanned and unsent.
            while read < n {
                let want = (n - read).min(scratch.len());
                let k = read_pipe(copy.read.as_raw_fd(), &mut scratch[..want])?;
                if k == 0 {
                    break;
                }
                server.chunk_passed(&scratch[..k]);
                read += k;
            }
            return Ok(clean);
        }
    }
    Ok(clean)
}

/// Splices `n` bytes from `pipe` into `dst`, waiting while it is full.
async fn splice_out(pipe: &Pipe, dst: &TcpStream, mut n: usize) -> std::io::Result<()> {
    use tokio::io::Interest;
    while n > 0 {
        dst.writable().await?;
        match dst.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), n)
        }) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(k) => n -= k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The next hop failed: the sender hears a short class of what happened
/// (never a library's text, which can carry URLs and peer data); the log
/// has the whole error. Fields, not the session: a splice borrows its hop.
fn hop_failed(session: u64, forwarder: &mut Forwarder, e: &std::io::Error) {
    tracing::info!(session, "next hop failed: {e}");
    forwarder.hop_failed(&hop_failure(e));
}

/// What a sender is told of a next hop's I/O error.
fn hop_failure(e: &std::io::Error) -> String {
    format!("next hop {}", crate::legs::io_class(e))
}

#[cfg(test)]
mod tests {
    use super::hop_failure;
    use std::io::{Error, ErrorKind};

    /// rustls's error for a peer that closed without close_notify carries
    /// a docs.rs URL; the sender gets the class only.
    #[test]
    fn senders_hear_a_class_not_a_library_error() {
        let rustls = Error::new(
            ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify: https://docs.rs/rustls/latest/rustls/manual/_03_howto/index.html#unexpected-eof",
        );
        assert_eq!(hop_failure(&rustls), "next hop closed the connection");
        let garbage = Error::new(
            ErrorKind::InvalidData,
            "received corrupt message of type InvalidContentType",
        );
        assert_eq!(
            hop_failure(&garbage),
            "next hop sent what the relay could not read"
        );
        let refused = Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(hop_failure(&refused), "next hop refused the connection");
        assert_eq!(
            hop_failure(&Error::new(ErrorKind::TimedOut, "next hop timed out")),
            "next hop timed out"
        );
    }
}
