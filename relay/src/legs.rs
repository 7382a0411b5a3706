//! Setting up a session's legs, one path for TCP sessions and SMTP next
//! hops alike: accept TLS from a client, connect under an outbound policy
//! (handshake, verify, refuse or fall back to plaintext, note a version
//! downgrade), and say what happened as values the session report is
//! built from. A protocol that talks before TLS (SMTP's greeting, EHLO and
//! STARTTLS) plugs in as a [`Greeter`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::names::UpstreamNames;
use crate::pump::{Handoff, Leg};
use crate::tls::{cert_names, classify_failure, negotiated_of, ListenerTls, RecordIo, UpstreamTls};
use tlsrelay_core::policy::{
    on_outbound_failure, OnTlsFailure, OutboundPolicy, PeerTrust, TlsFailure,
};
use tlsrelay_core::proxy::{HeaderReader, Progress, ProxyHeader};
use tlsrelay_core::report::{
    inbound_tls_line, outbound_tls_line, Direction, Downgrade, LegSecurity, Negotiated, Outcome,
    SocketRecord,
};
use tlsrelay_core::smtp::address::Cidr;
use tlsrelay_core::upstream::HostPort;

/// The balancers a listener takes PROXY protocol headers from.
#[derive(Clone, Debug)]
pub struct ProxySources(pub Vec<Cidr>);

impl ProxySources {
    /// Whether a connection from `ip` may send a header.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }
}

/// Who the client is: the socket's peer, or behind an L4 balancer the
/// address its PROXY protocol header names.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress {
    pub peer: SocketAddr,
    /// The balancer, when a header named someone else.
    pub proxied_by: Option<SocketAddr>,
    /// The address the client connected to, as a header named it (`None`:
    /// the socket's own address, asked for only when it is needed).
    pub destination: Option<SocketAddr>,
}

/// Reads the PROXY protocol header a listener behind a balancer expects,
/// to its last byte and no further, within `limit`. Without one (or a
/// malformed one) the session is refused with the reason.
pub async fn client_address(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Result<ClientAddress, Outcome> {
    let socket = ClientAddress::direct(peer);
    let refused = |reason: String| Outcome::Refused {
        leg: Direction::Inbound,
        reason: format!("PROXY protocol: {reason}"),
        failure: None,
    };
    let header = match timeout(limit, read_proxy_header(tcp)).await {
        Ok(Ok(header)) => header,
        Ok(Err(reason)) => return Err(refused(reason)),
        Err(_) => return Err(refused("no header within the handshake timeout".into())),
    };
    Ok(match header {
        ProxyHeader::Local => socket,
        ProxyHeader::Proxied {
            source,
            destination,
        } => ClientAddress {
            peer: source,
            proxied_by: Some(peer),
            destination: Some(destination),
        },
    })
}

impl ClientAddress {
    /// A client connected directly: the socket's peer.
    pub fn direct(peer: SocketAddr) -> ClientAddress {
        ClientAddress {
            peer,
            proxied_by: None,
            destination: None,
        }
    }
}

async fn read_proxy_header(tcp: &mut TcpStream) -> Result<ProxyHeader, String> {
    use tokio::io::AsyncReadExt;
    let mut reader = HeaderReader::new();
    let mut buf = [0u8; 256];
    loop {
        match reader.progress().map_err(|e| e.to_string())? {
            Progress::Done(header) => return Ok(header),
            Progress::Need(n) => {
                let n = n.min(buf.len());
                tcp.read_exact(&mut buf[..n])
                    .await
                    .map_err(|e| format!("reading the header: {e}"))?;
                reader.feed(&buf[..n]);
            }
        }
    }
}

/// A completed inbound TLS handshake.
pub type ServerStream = tokio_rustls::server::TlsStream<RecordIo>;

/// Runs the server side of a TLS handshake within `limit` (`hello`: the
/// records a router already read off the socket, or none). The stream
/// returned still reads whole records only, so nothing meant for kTLS has
/// been consumed: the caller hands it to the kernel, or lets it read
/// ahead ([`Leg::stay_in_userspace`]).
pub async fn accept_tls(
    tls: &ListenerTls,
    tcp: TcpStream,
    hello: Vec<u8>,
    limit: Duration,
) -> Result<ServerStream, TlsFailure> {
    match timeout(limit, tls.accept_after(tcp, hello)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(classify_failure(&e)),
        Err(_) => Err(TlsFailure::HandshakeFailed("timed out".into())),
    }
}

/// How an accepted TLS leg is secured, given the trust decided for the
/// client's certificate; logged as Postfix's smtpd logs it.
pub fn inbound_security(
    session: u64,
    peer: SocketAddr,
    stream: &ServerStream,
    trust: PeerTrust,
) -> LegSecurity {
    let conn = stream.get_ref().1;
    let negotiated = negotiated_of(conn);
    tracing::info!(session, "{}", inbound_tls_line(peer, &negotiated, trust));
    LegSecurity::Tls {
        negotiated,
        trust,
        server_name: conn.server_name().map(str::to_string),
        peer_names: peer_names(conn.peer_certificates()),
    }
}

/// The session's end when the client's TLS handshake failed: the same for
/// every protocol, so metrics and the wire cross-check agree.
pub fn inbound_refused(session: u64, peer: SocketAddr, failure: TlsFailure) -> Outcome {
    tracing::info!(session, client = %peer, "inbound {failure}");
    Outcome::Refused {
        leg: Direction::Inbound,
        reason: failure.to_string(),
        failure: Some(failure),
    }
}

fn peer_names(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Vec<String> {
    certs
        .and_then(|c| c.first())
        .map(cert_names)
        .unwrap_or_default()
}

/// Where an outbound leg goes and how it is secured.
pub struct Target<'a> {
    /// The session it is for (for the log lines).
    pub session: u64,
    /// The peer as logged: the configured host, or the MX host name.
    pub name: &'a str,
    pub address: &'a HostPort,
    pub policy: OutboundPolicy,
    /// Present unless the policy is `plain`.
    pub tls: Option<&'a UpstreamTls>,
    /// A PROXY protocol header to send first on every connection.
    pub proxy_header: Option<Vec<u8>>,
    /// Resolves a host name by its records' TTL; `None`: getaddrinfo.
    pub names: Option<&'a UpstreamNames>,
    /// Hand the TLS leg's keys to the kernel right after the handshake
    /// (SMTP next hops: the dialogue then runs on kernel TLS). TCP
    /// sessions leave this to their pump.
    pub kernel_tls: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct LegTimeouts {
    pub connect: Duration,
    pub handshake: Duration,
}

/// Why a protocol's part of the setup stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GreeterFailure {
    /// The peer can't serve now (try another); the reason says why.
    Unavailable(String),
    /// TLS could not be had: the policy decides.
    Tls {
        failure: TlsFailure,
        handshake_begun: bool,
    },
}

/// What a protocol says on an outbound connection around its TLS
/// handshake. Bulk TCP says nothing ([`Silent`]).
#[allow(async_fn_in_trait)]
pub trait Greeter {
    /// On a fresh connection: up to where TLS starts when `want_tls`, or
    /// up to where the session can be used in plaintext.
    async fn before_tls(
        &mut self,
        tcp: &mut TcpStream,
        want_tls: bool,
    ) -> Result<(), GreeterFailure>;
    /// After the handshake (SMTP: EHLO again).
    async fn after_tls(&mut self, leg: &mut Leg) -> Result<(), GreeterFailure>;
}

/// Bulk TCP: TLS from the first byte, nothing said around it.
pub struct Silent;

impl Greeter for Silent {
    async fn before_tls(&mut self, _: &mut TcpStream, _: bool) -> Result<(), GreeterFailure> {
        Ok(())
    }
    async fn after_tls(&mut self, _: &mut Leg) -> Result<(), GreeterFailure> {
        Ok(())
    }
}

/// An outbound leg ready for data.
pub struct OutboundLeg {
    pub leg: Leg,
    pub security: LegSecurity,
    /// Less security than offered: a plaintext fallback, or TLS 1.2.
    pub downgrade: Option<Downgrade>,
    pub address: SocketAddr,
    /// Why a TLS leg offered to the kernel ([`Target::kernel_tls`]) stayed
    /// in rustls.
    pub userspace_reason: Option<String>,
}

/// Why no outbound leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundFailure {
    /// Connecting (or the protocol's greeting) failed.
    Unreachable(String),
    /// The policy refused the session: TLS was required and failed.
    Refused {
        failure: TlsFailure,
        address: SocketAddr,
    },
}

/// Connects `target` under its policy. Every socket opened is appended
/// to `sockets` with what the relay made of it (the wire cross-check's
/// view), whether or not a leg comes of it.
pub async fn open_outbound<G: Greeter>(
    target: &Target<'_>,
    greeter: &mut G,
    timeouts: LegTimeouts,
    sockets: &mut Vec<SocketRecord>,
) -> Result<OutboundLeg, OutboundFailure> {
    let (mut tcp, address) = connect(target, timeouts.connect).await?;
    let cookie = tlsrelay_sys::bpf::socket_cookie(&tcp);
    let Some(tls) = target.tls else {
        let greeted = greeter.before_tls(&mut tcp, false).await;
        sockets.extend(record(cookie, None, false, false, true));
        return match greeted {
            Ok(()) => Ok(plaintext(tcp, address, None)),
            Err(failure) => Err(unreachable(failure)),
        };
    };
    let (failure, handshake_begun) = match greeter.before_tls(&mut tcp, true).await {
        Ok(()) => match handshake(target, tls, tcp, address, timeouts.handshake, greeter).await {
            Ok(opened) => {
                let negotiated = match &opened.security {
                    LegSecurity::Tls { negotiated, .. } => Some(negotiated.clone()),
                    LegSecurity::Plaintext => None,
                };
                let downgraded = opened.downgrade.is_some();
                sockets.extend(record(cookie, negotiated, downgraded, false, false));
                return Ok(opened);
            }
            Err(failure) => (failure, true),
        },
        Err(GreeterFailure::Tls {
            failure,
            handshake_begun,
        }) => (failure, handshake_begun),
        Err(unavailable) => {
            sockets.extend(record(cookie, None, false, false, false));
            return Err(unreachable(unavailable));
        }
    };
    sockets.extend(record(cookie, None, false, handshake_begun, false));
    if on_outbound_failure(target.policy) == OnTlsFailure::Refuse {
        tracing::info!(session = target.session, upstream = %target.address, "outbound {failure}; TLS is required");
        return Err(OutboundFailure::Refused { failure, address });
    }
    tracing::info!(session = target.session, upstream = %target.address, "outbound {failure}; continuing in plaintext");
    let (mut tcp, address) = connect(target, timeouts.connect).await?;
    let greeted = greeter.before_tls(&mut tcp, false).await;
    sockets.extend(record(
        tlsrelay_sys::bpf::socket_cookie(&tcp),
        None,
        true,
        false,
        false,
    ));
    greeted.map_err(unreachable)?;
    let downgrade = Downgrade {
        leg: Direction::Outbound,
        reason: failure.to_string(),
        class: failure.kind(),
    };
    Ok(plaintext(tcp, address, Some(downgrade)))
}

/// The TLS handshake on a connection the greeter has readied, then the
/// greeter's part after it.
async fn handshake<G: Greeter>(
    target: &Target<'_>,
    tls: &UpstreamTls,
    tcp: TcpStream,
    address: SocketAddr,
    limit: Duration,
    greeter: &mut G,
) -> Result<OutboundLeg, TlsFailure> {
    let connecting = tls.connect(tcp);
    let stream = match timeout(limit, connecting).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(classify_failure(&e)),
        Err(_) => return Err(TlsFailure::HandshakeFailed("timed out".into())),
    };
    let conn = stream.get_ref().1;
    let negotiated = negotiated_of(conn);
    let trust = tls.peer_trust(conn.peer_certificates());
    // The relay always offers TLS 1.3; settling lower is a downgrade.
    let downgrade =
        (conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2)).then(|| Downgrade {
            leg: Direction::Outbound,
            reason: "version: upstream negotiated TLSv1.2, TLSv1.3 was offered".into(),
            class: "tls 1.2",
        });
    let line = outbound_tls_line(target.name, address, &negotiated, trust);
    match tls.dane_matched(conn.peer_certificates()) {
        Some(dane) => tracing::info!(session = target.session, "{line}, {dane}"),
        None => tracing::info!(session = target.session, "{line}"),
    }
    let security = LegSecurity::Tls {
        negotiated,
        trust,
        server_name: Some(tls.server_name().to_str().into_owned()),
        peer_names: peer_names(conn.peer_certificates()),
    };
    let mut leg = Leg::TlsClient(Box::new(stream));
    // SMTP's EHLO again while rustls still reads the leg: the server's
    // session tickets come before its reply, and rustls keeps them for the
    // next connection to this host (after the handoff, the kernel or the
    // userspace record layer would skip them).
    match greeter.after_tls(&mut leg).await {
        Ok(()) => {}
        Err(GreeterFailure::Tls { failure, .. }) => return Err(failure),
        Err(GreeterFailure::Unavailable(why)) => return Err(TlsFailure::HandshakeFailed(why)),
    }
    let mut userspace_reason = None;
    if target.kernel_tls {
        leg = match crate::pump::leg_to_kernel(leg, true).await {
            Handoff::Kernel(leg) => leg,
            Handoff::Userspace(leg, why) => {
                userspace_reason = Some(why);
                leg
            }
            Handoff::Lost(detail) => return Err(TlsFailure::HandshakeFailed(detail)),
        };
    }
    leg.stay_in_userspace();
    Ok(OutboundLeg {
        leg,
        security,
        downgrade,
        address,
        userspace_reason,
    })
}

/// A connection to the target, its PROXY protocol header sent.
async fn connect(
    target: &Target<'_>,
    limit: Duration,
) -> Result<(TcpStream, SocketAddr), OutboundFailure> {
    let address = target.address;
    let opening = open(address, target.names, target.proxy_header.as_deref());
    let error = match timeout(limit, opening).await {
        Ok(Ok(opened)) => return Ok(opened),
        Ok(Err((class, e))) => {
            tracing::debug!(session = target.session, "connecting {address}: {e}");
            class
        }
        Err(_) => "timed out",
    };
    Err(OutboundFailure::Unreachable(format!(
        "{address} unreachable: {error}"
    )))
}

/// Resolves and connects `address` and sends the PROXY protocol header:
/// the stream and its peer, or a class of what failed with the error.
async fn open(
    address: &HostPort,
    names: Option<&UpstreamNames>,
    header: Option<&[u8]>,
) -> Result<(TcpStream, SocketAddr), (&'static str, std::io::Error)> {
    use tokio::io::AsyncWriteExt;
    let class = |e: std::io::Error| (io_class(&e), e);
    let resolved = match names {
        Some(names) => names.resolve(address).await,
        None => tokio::net::lookup_host((address.host.as_str(), address.port))
            .await
            .map(Iterator::collect),
    };
    let addrs: Vec<SocketAddr> = resolved.map_err(|e| ("name not resolved", e))?;
    let mut tcp = TcpStream::connect(&addrs[..]).await.map_err(class)?;
    let _ = tcp.set_nodelay(true);
    if let Some(header) = header {
        tcp.write_all(header).await.map_err(class)?;
    }
    let peer = tcp.peer_addr().map_err(class)?;
    Ok((tcp, peer))
}

/// An I/O error as a class: what an SMTP sender is told and a report
/// says, instead of the OS's or a library's text (which can carry
/// addresses, paths and URLs).
pub fn io_class(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        TimedOut => "timed out",
        UnexpectedEof | BrokenPipe | ConnectionAborted => "closed the connection",
        ConnectionReset => "reset the connection",
        ConnectionRefused => "refused the connection",
        HostUnreachable | NetworkUnreachable => "no route",
        NotConnected => "not connected",
        InvalidData => "sent what the relay could not read",
        _ => "connection failed",
    }
}

fn plaintext(tcp: TcpStream, address: SocketAddr, downgrade: Option<Downgrade>) -> OutboundLeg {
    OutboundLeg {
        leg: Leg::Plain(tcp),
        security: LegSecurity::Plaintext,
        downgrade,
        address,
        userspace_reason: None,
    }
}

fn unreachable(failure: GreeterFailure) -> OutboundFailure {
    match failure {
        GreeterFailure::Unavailable(why) => OutboundFailure::Unreachable(why),
        GreeterFailure::Tls { failure, .. } => OutboundFailure::Unreachable(failure.to_string()),
    }
}

/// An outbound socket as the relay saw it.
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
