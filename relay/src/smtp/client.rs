//! The next-hop side: connect, greeting, EHLO, STARTTLS under the
//! connector's policy (RFC 3207: bytes after the 220 are a protocol
//! violation; EHLO again over TLS), then commands and replies.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::codec::{Capabilities, Reply, ReplyParser};
use crate::config::HostPort;
use crate::policy::{on_outbound_failure, OnTlsFailure, OutboundPolicy, TlsFailure};
use crate::pump::Leg;
use crate::report::{outbound_tls_line, Direction, LegSecurity, SocketRecord};
use crate::tls::{cert_names, classify_failure, Negotiated, RecordIo, UpstreamTls};

/// One way out: a connector's next hops and how to secure them.
pub struct OutboundConnector {
    pub name: String,
    pub next_hops: Vec<NextHopPlan>,
    pub policy: OutboundPolicy,
}

pub struct NextHopPlan {
    pub address: HostPort,
    /// Present unless the policy is `plain`.
    pub tls: Option<UpstreamTls>,
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
}

/// What setting up a next hop gives besides the connection.
pub struct Established {
    pub hop: NextHop,
    pub security: LegSecurity,
    /// Set when TLS was tried and the session went on without it.
    pub downgrade: Option<TlsFailure>,
    pub address: std::net::SocketAddr,
    pub host: String,
    /// Every socket opened on the way, for the wire cross-check.
    pub sockets: Vec<SocketRecord>,
}

pub struct NextHop {
    leg: Leg,
    replies: ReplyParser,
    pub capabilities: Capabilities,
    timeouts: SmtpTimeouts,
}

/// Why no next hop could be had: the reply to give the sender (always
/// 4xx, so it keeps the message and retries), and the sockets tried.
#[derive(Debug)]
pub struct Unavailable {
    pub reply: Reply,
    pub sockets: Vec<SocketRecord>,
}

impl NextHop {
    async fn read_reply(&mut self, limit: Duration) -> std::io::Result<Reply> {
        let mut buf = [0u8; 4096];
        loop {
            match self.replies.next_reply() {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
            let n = timeout(limit, self.leg.read(&mut buf))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "next hop timed out")
                })??;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.replies.feed(&buf[..n]);
        }
    }

    /// Sends one command line and reads its reply.
    pub async fn command(&mut self, line: &str, limit: Duration) -> std::io::Result<Reply> {
        self.leg.write_all(format!("{line}\r\n").as_bytes()).await?;
        self.leg.flush().await?;
        self.read_reply(limit).await
    }

    pub async fn command_default(&mut self, line: &str) -> std::io::Result<Reply> {
        self.command(line, self.timeouts.command).await
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.leg.write_all(bytes).await
    }

    pub async fn finish_data(&mut self, terminator: &[u8]) -> std::io::Result<Reply> {
        self.leg.write_all(terminator).await?;
        self.leg.flush().await?;
        self.read_reply(self.timeouts.data_end).await
    }

    /// The reply to a BDAT chunk (sent with `send`).
    pub async fn chunk_reply(&mut self) -> std::io::Result<Reply> {
        self.leg.flush().await?;
        self.read_reply(self.timeouts.data_block).await
    }

    pub async fn data(&mut self) -> std::io::Result<Reply> {
        self.command("DATA", self.timeouts.data_init).await
    }

    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            let _ = self.command("QUIT", Duration::from_secs(2)).await;
            let _ = self.leg.shutdown().await;
        })
        .await;
    }

    async fn ehlo(&mut self, hostname: &str) -> std::io::Result<Reply> {
        let reply = self
            .command(&format!("EHLO {hostname}"), self.timeouts.command)
            .await?;
        self.capabilities = if reply.code == 250 {
            Capabilities::from_ehlo(&reply)
        } else {
            Capabilities::default()
        };
        Ok(reply)
    }
}

fn temporary(text: String, sockets: Vec<SocketRecord>) -> Unavailable {
    Unavailable {
        reply: Reply::new(451, text),
        sockets,
    }
}

/// A next-hop socket as the relay saw it.
fn record(
    cookie: Option<u64>,
    negotiated: Option<Negotiated>,
    downgraded: bool,
    handshake_failed: bool,
    tls_off: bool,
) -> Option<SocketRecord> {
    Some(SocketRecord {
        cookie: cookie?,
        leg: Direction::Outbound,
        negotiated,
        downgraded,
        handshake_failed,
        tls_off,
    })
}

/// Opens a plaintext session: TCP, greeting, EHLO. Returns the socket's
/// cookie too, also when the session could not be opened on it.
async fn open_plain(
    hop: &NextHopPlan,
    hostname: &str,
    timeouts: SmtpTimeouts,
) -> (Option<u64>, Result<(NextHop, std::net::SocketAddr), String>) {
    let address = (hop.address.host.as_str(), hop.address.port);
    let tcp = match timeout(timeouts.connect, TcpStream::connect(address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return (None, Err(format!("{}: {e}", hop.address))),
        Err(_) => return (None, Err(format!("{}: connect timed out", hop.address))),
    };
    let cookie = crate::bpf::socket_cookie(&tcp);
    (cookie, greet(tcp, hop, hostname, timeouts).await)
}

/// Greeting and EHLO (or HELO) on a fresh connection.
async fn greet(
    tcp: TcpStream,
    hop: &NextHopPlan,
    hostname: &str,
    timeouts: SmtpTimeouts,
) -> Result<(NextHop, std::net::SocketAddr), String> {
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().map_err(|e| e.to_string())?;
    let mut next = NextHop {
        leg: Leg::Plain(tcp),
        replies: ReplyParser::default(),
        capabilities: Capabilities::default(),
        timeouts,
    };
    let greeting = next
        .read_reply(timeouts.greeting)
        .await
        .map_err(|e| format!("{}: greeting: {e}", hop.address))?;
    if greeting.code != 220 {
        return Err(format!("{}: greeting {greeting}", hop.address));
    }
    let ehlo = next
        .ehlo(hostname)
        .await
        .map_err(|e| format!("{}: EHLO: {e}", hop.address))?;
    if ehlo.code != 250 {
        // An old server: HELO, and no extensions.
        let helo = next
            .command(&format!("HELO {hostname}"), timeouts.command)
            .await
            .map_err(|e| format!("{}: HELO: {e}", hop.address))?;
        if helo.code != 250 {
            return Err(format!("{}: HELO {helo}", hop.address));
        }
    }
    Ok((next, addr))
}

/// Why STARTTLS did not give a TLS session, and whether a TLS handshake
/// had begun on the wire (the wire witness sees its alerts).
struct StartTlsFailed {
    failure: TlsFailure,
    handshake_begun: bool,
}

impl From<TlsFailure> for StartTlsFailed {
    fn from(failure: TlsFailure) -> StartTlsFailed {
        StartTlsFailed {
            failure,
            handshake_begun: true,
        }
    }
}

/// Runs STARTTLS on an open plaintext session.
async fn start_tls(
    mut next: NextHop,
    tls: &UpstreamTls,
    host: &str,
    addr: std::net::SocketAddr,
    hostname: &str,
) -> Result<(NextHop, LegSecurity), StartTlsFailed> {
    let before = |failure| StartTlsFailed {
        failure,
        handshake_begun: false,
    };
    if !next.capabilities.has("STARTTLS") {
        return Err(before(TlsFailure::NotOffered(format!(
            "{host} does not offer STARTTLS"
        ))));
    }
    let reply = next
        .command("STARTTLS", next.timeouts.command)
        .await
        .map_err(|e| before(TlsFailure::HandshakeFailed(format!("STARTTLS: {e}"))))?;
    if reply.code != 220 {
        return Err(before(TlsFailure::NotOffered(format!(
            "{host} answered STARTTLS with {reply}"
        ))));
    }
    if next.replies.pending() > 0 {
        return Err(before(TlsFailure::HandshakeFailed(format!(
            "{host} sent {} bytes after its 220 to STARTTLS (protocol violation)",
            next.replies.pending()
        ))));
    }
    let Leg::Plain(tcp) = next.leg else {
        return Err(before(TlsFailure::HandshakeFailed(
            "STARTTLS on a TLS session".into(),
        )));
    };
    let handshake = timeout(
        next.timeouts.handshake,
        tls.connector()
            .connect(tls.server_name(), RecordIo::new(tcp)),
    )
    .await;
    let stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(classify_failure(&e).into()),
        Err(_) => return Err(TlsFailure::HandshakeFailed("timed out".into()).into()),
    };
    let conn = stream.get_ref().1;
    let negotiated = Negotiated::of(conn);
    let trust = tls.peer_trust(conn.peer_certificates());
    tracing::info!("{}", outbound_tls_line(host, addr, &negotiated, trust));
    let security = LegSecurity::Tls {
        negotiated,
        trust,
        server_name: Some(tls.server_name().to_str().into_owned()),
        peer_names: conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(cert_names)
            .unwrap_or_default(),
    };
    let mut stream = stream;
    stream.get_mut().0.pass_through();
    next.leg = Leg::TlsClient(Box::new(stream));
    next.replies = ReplyParser::default();
    let ehlo = next
        .ehlo(hostname)
        .await
        .map_err(|e| TlsFailure::HandshakeFailed(format!("EHLO after STARTTLS: {e}")))?;
    if ehlo.code != 250 {
        return Err(TlsFailure::HandshakeFailed(format!("EHLO after STARTTLS: {ehlo}")).into());
    }
    Ok((next, security))
}

/// Sets up a session with the connector's first reachable next hop under
/// its TLS policy.
pub async fn establish(
    connector: &OutboundConnector,
    hostname: &str,
    timeouts: SmtpTimeouts,
) -> Result<Established, Unavailable> {
    let mut problems = Vec::new();
    let mut sockets = Vec::new();
    for hop in &connector.next_hops {
        let host = hop.address.host.clone();
        let (cookie, opened) = open_plain(hop, hostname, timeouts).await;
        let (next, addr) = match opened {
            Ok(open) => open,
            Err(why) => {
                tracing::info!(connector = %connector.name, "next hop unavailable: {why}");
                sockets.extend(record(cookie, None, false, false, hop.tls.is_none()));
                problems.push(why);
                continue;
            }
        };
        let Some(tls) = &hop.tls else {
            sockets.extend(record(cookie, None, false, false, true));
            return Ok(Established {
                hop: next,
                security: LegSecurity::Plaintext,
                downgrade: None,
                address: addr,
                host,
                sockets,
            });
        };
        let failed = match start_tls(next, tls, &host, addr, hostname).await {
            Ok((hop_session, security)) => {
                let negotiated = match &security {
                    LegSecurity::Tls { negotiated, .. } => Some(negotiated.clone()),
                    LegSecurity::Plaintext => None,
                };
                sockets.extend(record(cookie, negotiated, false, false, false));
                return Ok(Established {
                    hop: hop_session,
                    security,
                    downgrade: None,
                    address: addr,
                    host,
                    sockets,
                });
            }
            Err(failed) => failed,
        };
        sockets.extend(record(cookie, None, false, failed.handshake_begun, false));
        let failure = failed.failure;
        match on_outbound_failure(connector.policy) {
            OnTlsFailure::Refuse => {
                tracing::info!(connector = %connector.name, "{host}: {failure}; TLS is required");
                return Err(temporary(
                    format!(
                        "4.7.5 TLS required by connector {} but {failure}",
                        connector.name
                    ),
                    sockets,
                ));
            }
            OnTlsFailure::FallBackToPlaintext => {
                tracing::info!(connector = %connector.name, "{host}: {failure}; continuing in plaintext");
                let (cookie, opened) = open_plain(hop, hostname, timeouts).await;
                sockets.extend(record(cookie, None, true, false, false));
                match opened {
                    Ok((plain, addr)) => {
                        return Ok(Established {
                            hop: plain,
                            security: LegSecurity::Plaintext,
                            downgrade: Some(failure),
                            address: addr,
                            host,
                            sockets,
                        })
                    }
                    Err(why) => problems.push(why),
                }
            }
        }
    }
    Err(temporary(
        format!(
            "4.4.1 No next hop of connector {} is reachable: {}",
            connector.name,
            problems.join("; ")
        ),
        sockets,
    ))
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
