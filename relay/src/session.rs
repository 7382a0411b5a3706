//! One client connection end to end: read its TLS hello where the
//! listener routes by name, decide and perform the inbound TLS (or pass it
//! through), connect one of the route's servers under its policy (falling
//! back, refusing, or moving to the next server), hand both legs to the
//! data pump, and report what happened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::access::ClientAccess;
use crate::legs::{
    accept_tls, inbound_refused, inbound_security, open_outbound, ClientAddress, LegTimeouts,
    OutboundFailure, OutboundLeg, ProxySources, Silent, Target,
};
use crate::pump::{self, Leg, PumpOptions, SpliceEngine};
use crate::tls::{ListenerTls, UpstreamTls};
use crate::upstreams::{Lease, PoolState};
use tlsrelay_core::policy::{inbound_start, InboundMode, InboundStart, OutboundPolicy};
use tlsrelay_core::proxy::ProxyVersion;
use tlsrelay_core::report::{
    Direction, Downgrade, HelloSeen, LegSecurity, Outcome, Passthrough, SessionReport,
};
use tlsrelay_core::tls_hello::{
    parse_server_hello, sni_matches, ClientHelloInfo, HelloReader, Progress as HelloProgress,
    ServerHelloInfo,
};
use tlsrelay_core::upstream::Balance;

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub handshake: Duration,
    pub connect: Duration,
    pub idle: Duration,
}

/// Everything a session on one listener needs, built once from the config.
pub struct ListenerPlan {
    pub name: String,
    pub mode: InboundMode,
    /// Present unless the mode is `off`.
    pub tls: Option<ListenerTls>,
    /// Where sessions go that no route takes (none: they are refused).
    pub default_route: Option<Arc<RoutePlan>>,
    /// By the ClientHello's SNI and ALPN, first match first.
    pub routes: Vec<RouteRule>,
    /// Who may connect and how fast.
    pub access: ClientAccess,
    pub timeouts: Timeouts,
    /// Offer TLS legs to kernel TLS when the kernel supports them.
    pub ktls: bool,
    pub engine: SpliceEngine,
    /// Connections start with a PROXY protocol header naming the client,
    /// from these balancers only.
    pub proxy_protocol: Option<ProxySources>,
}

/// A listener's route: the names and protocols it takes, where to, and
/// whether TLS ends here or passes through.
pub struct RouteRule {
    /// Lowercased server names and `*.suffix` patterns; empty: any.
    pub sni: Vec<String>,
    /// ALPN protocols, one of which the client must offer; empty: any.
    pub alpn: Vec<Vec<u8>>,
    pub route: Arc<RoutePlan>,
    pub passthrough: bool,
}

impl RouteRule {
    fn matches(&self, hello: &ClientHelloInfo) -> bool {
        let name = hello.server_name.as_deref().unwrap_or("");
        let sni = self.sni.is_empty() || self.sni.iter().any(|p| sni_matches(p, name));
        let alpn = self.alpn.is_empty() || hello.alpn.iter().any(|p| self.alpn.contains(p));
        sni && alpn
    }
}

/// An upstream route: its pool of servers and how to secure each leg.
pub struct RoutePlan {
    pub name: String,
    pub pool: Arc<PoolState>,
    /// Each server's TLS (`None` under policy plain), by pool index.
    pub servers: Vec<Option<Arc<UpstreamTls>>>,
    pub policy: OutboundPolicy,
    /// Send the upstream a PROXY protocol header naming the client.
    pub send_proxy: Option<ProxyVersion>,
}

/// What the client's first byte turned out to be.
enum FirstByte {
    Byte(u8),
    /// The client closed without sending anything.
    Closed,
    /// Nothing arrived within the handshake timeout.
    Silent,
}

async fn peek_first_byte(client: &TcpStream, limit: Duration) -> FirstByte {
    let mut byte = [0u8; 1];
    match timeout(limit, client.peek(&mut byte)).await {
        Ok(Ok(1)) => FirstByte::Byte(byte[0]),
        Ok(_) => FirstByte::Closed,
        Err(_) => FirstByte::Silent,
    }
}

/// Runs one session to its end and returns its report. `address` is
/// who the client is (read from a PROXY protocol header by the listener),
/// or why it was refused before anything else.
pub async fn run(
    id: u64,
    plan: &ListenerPlan,
    client: TcpStream,
    peer: SocketAddr,
    address: Result<ClientAddress, Outcome>,
) -> SessionReport {
    let started = Instant::now();
    let default = plan.default_route.as_ref().map_or("-", |r| r.name.as_str());
    let mut report = SessionReport::new(id, &plan.name, peer, default);
    let _ = client.set_nodelay(true);
    // Until the session ends cleanly, closing (or dying) resets the client.
    pump::reset_on_close(&client);
    report.client_cookie = tlsrelay_sys::bpf::socket_cookie(&client);
    let address = match address {
        Ok(address) => address,
        Err(outcome) => {
            report.outcome = outcome;
            return finish(report, started);
        }
    };
    report.client = address.peer;
    report.proxied_by = address.proxied_by;
    let destination = address.destination.or_else(|| client.local_addr().ok());
    let peer = address.peer;
    if plan.mode == InboundMode::Off {
        report.tls_off.push(Direction::Inbound);
    }
    let (accepted, route) = match accept_and_route(id, plan, client, peer, &mut report).await {
        Ok(accepted) => accepted,
        Err(outcome) => {
            report.outcome = outcome;
            return finish(report, started);
        }
    };
    report.upstream = route.name.clone();
    let passthrough = matches!(accepted, Accepted::Passthrough { .. });
    if route.policy == OutboundPolicy::Plain && !passthrough {
        report.tls_off.push(Direction::Outbound);
    }
    let key = hash_key(&route, peer, report.hello.as_ref());
    let connect = Connect {
        session: id,
        route: &route,
        key: key.as_deref(),
        // The header naming the client, for an upstream that wants one.
        proxy_header: route
            .send_proxy
            .and_then(|version| Some(tlsrelay_core::proxy::encode(version, peer, destination?))),
        // A passthrough session's TLS is the server's: the relay connects
        // in plain TCP and replays the client's hello.
        hello: match &accepted {
            Accepted::Passthrough { hello, .. } => Some(hello),
            Accepted::Terminated { .. } => None,
        },
        timeouts: LegTimeouts {
            connect: plan.timeouts.connect,
            handshake: plan.timeouts.handshake,
        },
    };
    let opened = connect_upstream(&connect, &mut report.sockets).await;
    let (upstream, first_record, _lease) = match opened {
        Ok((opened, lease)) => (opened.leg, opened.first_record, lease),
        Err(failure) => {
            // The client's leg is dropped: a RST, so that no client takes
            // the service's absence for an empty answer.
            report.outcome = outbound_failed(id, failure, &mut report);
            return finish(report, started);
        }
    };
    pump::reset_on_close(upstream.leg.tcp());
    report.upstream_addr = Some(upstream.address);
    let client_leg = match accepted {
        Accepted::Terminated { leg, .. } => {
            report.outbound = Some(upstream.security);
            report.downgrades.extend(upstream.downgrade);
            *leg
        }
        Accepted::Passthrough { tcp, .. } => {
            let reply = first_record.as_deref().unwrap_or_default();
            match answer_hello(tcp, reply, &mut report).await {
                Ok(leg) => leg,
                Err(outcome) => {
                    report.outcome = outcome;
                    return finish(report, started);
                }
            }
        }
    };
    report.setup_ms = ms(started.elapsed());
    pump_to_end(report, client_leg, upstream.leg, plan, started).await
}

/// The client's leg accepted (its security and any downgrade recorded)
/// and the route it takes.
async fn accept_and_route(
    id: u64,
    plan: &ListenerPlan,
    client: TcpStream,
    peer: SocketAddr,
    report: &mut SessionReport,
) -> Result<(Accepted, Arc<RoutePlan>), Outcome> {
    let mut accepted = accept_inbound(id, plan, client, peer, report).await?;
    if let Accepted::Terminated {
        security,
        downgrade,
        ..
    } = &mut accepted
    {
        report.inbound = Some(security.clone());
        report.downgrades.extend(downgrade.take());
    }
    match accepted.route() {
        Some(route) => {
            let route = route.clone();
            Ok((accepted, route))
        }
        None => Err(no_route(report)),
    }
}

/// The refusal of a session no route takes, naming the server name asked.
fn no_route(report: &SessionReport) -> Outcome {
    let name = report.hello.as_ref().and_then(|h| h.server_name.clone());
    Outcome::Refused {
        leg: Direction::Inbound,
        reason: format!(
            "no route for server name {}",
            name.as_deref().unwrap_or("(none)")
        ),
        failure: None,
    }
}

/// Passthrough: the server's answer to the replayed hello goes to the
/// client, and its ServerHello into the report.
async fn answer_hello(
    mut tcp: TcpStream,
    reply: &[u8],
    report: &mut SessionReport,
) -> Result<Leg, Outcome> {
    use tokio::io::AsyncWriteExt;
    if let Err(e) = tcp.write_all(reply).await {
        return Err(Outcome::Failed {
            reason: format!("passthrough: client {}", crate::legs::io_class(&e)),
        });
    }
    record_passthrough(report, parse_server_hello(reply));
    Ok(Leg::Plain(tcp))
}

/// Moves the bytes until both sides are done, and reports how.
async fn pump_to_end(
    mut report: SessionReport,
    client: Leg,
    upstream: Leg,
    plan: &ListenerPlan,
    started: Instant,
) -> SessionReport {
    let options = PumpOptions {
        idle_timeout: plan.timeouts.idle,
        ktls: plan.ktls,
        engine: plan.engine,
    };
    let pumped = pump::run(client, upstream, options).await;
    report.data_path = Some(pumped.path);
    report.ktls = pumped.ktls;
    report.path_reason = pumped.path_reason;
    report.bytes_client_to_upstream = pumped.client_to_upstream;
    report.bytes_upstream_to_client = pumped.upstream_to_client;
    report.outcome = Outcome::Relayed { end: pumped.end };
    finish(report, started)
}

fn finish(mut report: SessionReport, started: Instant) -> SessionReport {
    report.duration_ms = ms(started.elapsed());
    report
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the hash balances hash: the client's address, or the name it asked
/// for (its address when it named none).
fn hash_key(route: &RoutePlan, peer: SocketAddr, hello: Option<&HelloSeen>) -> Option<Vec<u8>> {
    let address = || match tlsrelay_core::access::client_key(peer.ip()) {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    match route.pool.balance() {
        Balance::HashClient => Some(address()),
        Balance::HashSni => Some(
            hello
                .and_then(|h| h.server_name.as_ref())
                .map_or_else(address, |n| n.as_bytes().to_vec()),
        ),
        _ => None,
    }
}

/// How the client's side of a session came out.
enum Accepted {
    /// The relay holds the client's leg (TLS terminated here, or
    /// plaintext).
    Terminated {
        leg: Box<Leg>,
        security: LegSecurity,
        downgrade: Option<Downgrade>,
        route: Option<Arc<RoutePlan>>,
    },
    /// TLS passes through: the client's hello, read and to be replayed.
    Passthrough {
        tcp: TcpStream,
        hello: Vec<u8>,
        route: Arc<RoutePlan>,
    },
}

impl Accepted {
    fn route(&self) -> Option<&Arc<RoutePlan>> {
        match self {
            Accepted::Terminated { route, .. } => route.as_ref(),
            Accepted::Passthrough { route, .. } => Some(route),
        }
    }
}

/// The client-facing leg (and with routes, where it goes), or the
/// outcome that ends the session.
async fn accept_inbound(
    id: u64,
    plan: &ListenerPlan,
    mut client: TcpStream,
    peer: SocketAddr,
    report: &mut SessionReport,
) -> Result<Accepted, Outcome> {
    let first = match plan.mode {
        InboundMode::Off | InboundMode::Implicit => None,
        InboundMode::Opportunistic | InboundMode::Required => {
            match peek_first_byte(&client, plan.timeouts.handshake).await {
                FirstByte::Byte(b) => Some(b),
                FirstByte::Silent => None,
                FirstByte::Closed => {
                    return Err(Outcome::Failed {
                        reason: "client closed before sending anything".into(),
                    })
                }
            }
        }
    };
    match inbound_start(plan.mode, first) {
        InboundStart::Plaintext { downgrade } => {
            let downgrade = downgrade.then(|| Downgrade {
                leg: Direction::Inbound,
                reason: "client did not start TLS".into(),
                class: "no tls",
            });
            Ok(Accepted::Terminated {
                leg: Box::new(Leg::Plain(client)),
                security: LegSecurity::Plaintext,
                downgrade,
                route: plan.default_route.clone(),
            })
        }
        InboundStart::Refuse(reason) => {
            tracing::info!(session = id, client = %peer, "refused: {reason}");
            Err(Outcome::Refused {
                leg: Direction::Inbound,
                reason,
                failure: None,
            })
        }
        InboundStart::Tls => {
            let tls = plan.tls.as_ref().expect("TLS modes have a server config");
            let (hello, route) = if plan.routes.is_empty() {
                (Vec::new(), plan.default_route.clone())
            } else {
                let (info, raw) = read_hello(&mut client, plan.timeouts.handshake)
                    .await
                    .map_err(|reason| {
                        tracing::info!(session = id, client = %peer, "refused: TLS hello: {reason}");
                        Outcome::Refused {
                            leg: Direction::Inbound,
                            reason: format!("TLS hello: {reason}"),
                            failure: None,
                        }
                    })?;
                report.hello = Some(seen(&info));
                let rule = plan.routes.iter().find(|r| r.matches(&info));
                if let Some(rule) = rule.filter(|r| r.passthrough) {
                    return Ok(Accepted::Passthrough {
                        tcp: client,
                        hello: raw,
                        route: rule.route.clone(),
                    });
                }
                (
                    raw,
                    rule.map(|r| r.route.clone()).or(plan.default_route.clone()),
                )
            };
            let stream = accept_tls(tls, client, hello, plan.timeouts.handshake)
                .await
                .map_err(|failure| inbound_refused(id, peer, failure))?;
            let trust = tls.client_trust(stream.get_ref().1.peer_certificates());
            let security = inbound_security(id, peer, &stream, trust);
            Ok(Accepted::Terminated {
                leg: Box::new(Leg::TlsServer(Box::new(stream))),
                security,
                downgrade: None,
                route,
            })
        }
    }
}

/// The client's ClientHello, read record by record and no further within
/// `limit`: what it asks for, and its bytes to hand on.
async fn read_hello(
    client: &mut TcpStream,
    limit: Duration,
) -> Result<(ClientHelloInfo, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut reader = HelloReader::new();
        let mut buf = vec![0u8; 4096];
        loop {
            match reader.progress().map_err(|e| e.to_string())? {
                HelloProgress::Done(info) => return Ok((info, reader.into_raw())),
                HelloProgress::Need(n) => {
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                    client
                        .read_exact(&mut buf[..n])
                        .await
                        .map_err(|e| crate::legs::io_class(&e).to_string())?;
                    reader.feed(&buf[..n]);
                }
            }
        }
    };
    timeout(limit, read)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

fn seen(info: &ClientHelloInfo) -> HelloSeen {
    HelloSeen {
        server_name: info.server_name.clone(),
        alpn: info
            .alpn
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect(),
        offered: info
            .versions
            .iter()
            .filter_map(|&v| tlsrelay_core::report::version_name(v).map(str::to_string))
            .collect(),
    }
}

/// Replays the client's hello to the server and reads the server's first
/// record whole (its ServerHello, or an alert): nothing reaches the client
/// yet, so a server that fails here is one more to retry past.
async fn replay_hello(server: &mut Leg, hello: &[u8], limit: Duration) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Leg::Plain(server) = server else {
        unreachable!("passthrough connects in plain TCP")
    };
    let exchange = async {
        server.write_all(hello).await?;
        let mut record = vec![0u8; 5];
        server.read_exact(&mut record).await?;
        let len = usize::from(u16::from_be_bytes([record[3], record[4]]));
        record.resize(5 + len.min(16384 + 2048), 0);
        server.read_exact(&mut record[5..]).await?;
        Ok(record)
    };
    timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A passed-through session's TLS in the report and the socket records:
/// what the server's hello chose, on both legs (as the wire shows it).
fn record_passthrough(report: &mut SessionReport, seen: Option<ServerHelloInfo>) {
    let passthrough = Passthrough {
        version: seen
            .and_then(|s| tlsrelay_core::report::version_name(s.version).map(str::to_string)),
        version_code: seen.map_or(0, |s| s.version),
        cipher_code: seen.map_or(0, |s| s.cipher),
        group_code: seen.map_or(0, |s| s.group),
    };
    report.passthrough = Some(passthrough);
}

/// Where and how to open an upstream leg for a session.
struct Connect<'a> {
    session: u64,
    route: &'a RoutePlan,
    key: Option<&'a [u8]>,
    proxy_header: Option<Vec<u8>>,
    /// The client's hello to replay (passthrough): plain TCP whatever the
    /// route's TLS, and a server counts as reached once it answered it.
    hello: Option<&'a [u8]>,
    timeouts: LegTimeouts,
}

/// An upstream leg, and for passthrough the server's answer to the hello.
struct Opened {
    leg: OutboundLeg,
    first_record: Option<Vec<u8>>,
}

/// A leg to one of the route's servers: the pool picks one; a connect
/// that is refused, reset or times out (and for passthrough, a hello the
/// server does not answer) marks it and moves to the next, so a dead
/// server costs the client nothing but the time to learn it.
async fn connect_upstream(
    c: &Connect<'_>,
    sockets: &mut Vec<tlsrelay_core::report::SocketRecord>,
) -> Result<(Opened, Lease), OutboundFailure> {
    let pool = &c.route.pool;
    let mut tried = Vec::new();
    let mut last = None;
    while let Some(server) = pool.pick(c.key, &tried) {
        let address = pool.address(server);
        let (policy, tls) = match c.hello.is_some() {
            true => (OutboundPolicy::Plain, None),
            false => (
                c.route.policy,
                c.route.servers.get(server).cloned().flatten(),
            ),
        };
        let target = Target {
            session: c.session,
            name: &address.host,
            address: &address,
            policy,
            tls: tls.as_deref(),
            proxy_header: c.proxy_header.clone(),
            names: Some(pool.names()),
            kernel_tls: false,
        };
        let why = match open_outbound(&target, &mut Silent, c.timeouts, sockets).await {
            Ok(mut leg) => {
                let Some(hello) = c.hello else {
                    let opened = Opened {
                        leg,
                        first_record: None,
                    };
                    return Ok((opened, pool.connected(server)));
                };
                match replay_hello(&mut leg.leg, hello, c.timeouts.handshake).await {
                    Ok(record) => {
                        let opened = Opened {
                            leg,
                            first_record: Some(record),
                        };
                        return Ok((opened, pool.connected(server)));
                    }
                    Err(e) => format!(
                        "{} ({}): no answer to the client's hello: {}",
                        address.host,
                        leg.address,
                        crate::legs::io_class(&e)
                    ),
                }
            }
            Err(OutboundFailure::Unreachable(why)) => why,
            Err(refused) => return Err(refused),
        };
        pool.connect_failed(server);
        tried.push(server);
        last = Some(OutboundFailure::Unreachable(why));
    }
    Err(last
        .unwrap_or_else(|| OutboundFailure::Unreachable(format!("{}: no server up", c.route.name))))
}

/// The outcome when no upstream leg could be had.
fn outbound_failed(id: u64, failure: OutboundFailure, report: &mut SessionReport) -> Outcome {
    match failure {
        OutboundFailure::Unreachable(why) => {
            let reason = format!("upstream {why}");
            tracing::warn!(session = id, "{reason}");
            Outcome::Failed { reason }
        }
        OutboundFailure::Refused {
            failure,
            address: peer,
        } => {
            report.upstream_addr = Some(peer);
            Outcome::Refused {
                leg: Direction::Outbound,
                reason: failure.to_string(),
                failure: Some(failure),
            }
        }
    }
}
