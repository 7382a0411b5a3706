//! One client connection end to end: decide and perform the inbound TLS,
//! connect the upstream under its policy (falling back or refusing), hand
//! both legs to the data pump, and report what happened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::HostPort;
use crate::policy::{
    inbound_start, on_outbound_failure, InboundMode, InboundStart, OnTlsFailure, OutboundPolicy,
    TlsFailure,
};
use crate::pump::{self, Leg, PumpOptions, SpliceEngine};
use crate::report::{
    inbound_tls_line, outbound_tls_line, Direction, Downgrade, LegSecurity, Outcome, SessionReport,
};
use crate::tls::{cert_names, classify_failure, ListenerTls, Negotiated, RecordIo, UpstreamTls};

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
    pub route: Arc<RoutePlan>,
    pub timeouts: Timeouts,
    /// Offer TLS legs to kernel TLS when the kernel supports them.
    pub ktls: bool,
    pub engine: SpliceEngine,
}

/// An upstream route: where to connect and how to secure it.
pub struct RoutePlan {
    pub name: String,
    pub address: HostPort,
    pub policy: OutboundPolicy,
    /// Present unless the policy is `plain`.
    pub tls: Option<UpstreamTls>,
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

/// Runs one session to its end and returns its report.
pub async fn run(
    id: u64,
    plan: &ListenerPlan,
    client: TcpStream,
    peer: SocketAddr,
) -> SessionReport {
    let started = Instant::now();
    let route = &plan.route;
    let mut report = SessionReport::new(id, &plan.name, peer, &route.name);
    let _ = client.set_nodelay(true);
    report.client_cookie = crate::bpf::socket_cookie(&client);
    if plan.mode == InboundMode::Off {
        report.tls_off.push(Direction::Inbound);
    }
    if route.policy == OutboundPolicy::Plain {
        report.tls_off.push(Direction::Outbound);
    }

    let client_leg = match accept_inbound(plan, client, peer, &mut report).await {
        Some(leg) => leg,
        None => return finish(report, started),
    };
    let upstream_leg = match connect_outbound(route, plan.timeouts, &mut report).await {
        Some(leg) => leg,
        None => {
            close_quietly(client_leg).await;
            return finish(report, started);
        }
    };
    report.setup_ms = ms(started.elapsed());
    let options = PumpOptions {
        idle_timeout: plan.timeouts.idle,
        ktls: plan.ktls,
        engine: plan.engine,
    };
    let pumped = pump::relay(client_leg, upstream_leg, options).await;
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

fn refuse(report: &mut SessionReport, leg: Direction, reason: String, failure: Option<TlsFailure>) {
    report.outcome = Outcome::Refused {
        leg,
        reason,
        failure,
    };
}

/// The client-facing leg, or `None` with the report saying why not.
async fn accept_inbound(
    plan: &ListenerPlan,
    client: TcpStream,
    peer: SocketAddr,
    report: &mut SessionReport,
) -> Option<Leg> {
    let first = match plan.mode {
        InboundMode::Off | InboundMode::Implicit => None,
        InboundMode::Opportunistic | InboundMode::Required => {
            match peek_first_byte(&client, plan.timeouts.handshake).await {
                FirstByte::Byte(b) => Some(b),
                FirstByte::Silent => None,
                FirstByte::Closed => {
                    report.outcome = Outcome::Failed {
                        reason: "client closed before sending anything".into(),
                    };
                    return None;
                }
            }
        }
    };
    match inbound_start(plan.mode, first) {
        InboundStart::Plaintext { downgrade } => {
            if downgrade {
                report.downgrades.push(Downgrade {
                    leg: Direction::Inbound,
                    reason: "client did not start TLS".into(),
                });
            }
            report.inbound = Some(LegSecurity::Plaintext);
            Some(Leg::Plain(client))
        }
        InboundStart::Refuse(reason) => {
            tracing::info!(session = report.id, client = %peer, "refused: {reason}");
            refuse(report, Direction::Inbound, reason, None);
            None
        }
        InboundStart::Tls => {
            let tls = plan.tls.as_ref().expect("TLS modes have a server config");
            let accepted = timeout(
                plan.timeouts.handshake,
                tls.acceptor().accept(RecordIo::new(client)),
            )
            .await;
            let stream = match accepted {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    let failure = classify_failure(&e);
                    tracing::info!(session = report.id, client = %peer, "inbound {failure}");
                    refuse(
                        report,
                        Direction::Inbound,
                        failure.to_string(),
                        Some(failure),
                    );
                    return None;
                }
                Err(_) => {
                    let failure = TlsFailure::HandshakeFailed("timed out".into());
                    refuse(
                        report,
                        Direction::Inbound,
                        failure.to_string(),
                        Some(failure),
                    );
                    return None;
                }
            };
            let conn = stream.get_ref().1;
            let negotiated = Negotiated::of(conn);
            let trust = tls.client_trust(conn.peer_certificates());
            tracing::info!(
                session = report.id,
                "{}",
                inbound_tls_line(peer, &negotiated, trust)
            );
            report.inbound = Some(LegSecurity::Tls {
                negotiated,
                trust,
                server_name: conn.server_name().map(str::to_string),
                peer_names: peer_names(conn.peer_certificates()),
            });
            Some(Leg::TlsServer(Box::new(stream)))
        }
    }
}

fn peer_names(certs: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> Vec<String> {
    certs
        .and_then(|c| c.first())
        .map(cert_names)
        .unwrap_or_default()
}

/// The upstream-facing leg under the route's policy, or `None` with the
/// report saying why not.
async fn connect_outbound(
    route: &RoutePlan,
    timeouts: Timeouts,
    report: &mut SessionReport,
) -> Option<Leg> {
    let tcp = connect_tcp(route, timeouts, report).await?;
    let Some(tls) = &route.tls else {
        report.outbound = Some(LegSecurity::Plaintext);
        return Some(Leg::Plain(tcp));
    };
    let addr = tcp.peer_addr().ok()?;
    let handshake = timeout(
        timeouts.handshake,
        tls.connector()
            .connect(tls.server_name(), RecordIo::new(tcp)),
    )
    .await;
    let failure = match handshake {
        Ok(Ok(stream)) => {
            let conn = stream.get_ref().1;
            let negotiated = Negotiated::of(conn);
            let trust = tls.peer_trust(conn.peer_certificates());
            // The relay always offers TLS 1.3; settling lower is a downgrade.
            if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_2) {
                report.downgrades.push(Downgrade {
                    leg: Direction::Outbound,
                    reason: "version: upstream negotiated TLSv1.2, TLSv1.3 was offered".into(),
                });
            }
            tracing::info!(
                session = report.id,
                "{}",
                outbound_tls_line(&route.address.host, addr, &negotiated, trust)
            );
            report.outbound = Some(LegSecurity::Tls {
                negotiated,
                trust,
                server_name: Some(tls.server_name().to_str().into_owned()),
                peer_names: peer_names(conn.peer_certificates()),
            });
            return Some(Leg::TlsClient(Box::new(stream)));
        }
        Ok(Err(e)) => classify_failure(&e),
        Err(_) => TlsFailure::HandshakeFailed("timed out".into()),
    };
    match on_outbound_failure(route.policy) {
        OnTlsFailure::Refuse => {
            tracing::info!(session = report.id, upstream = %route.address, "outbound {failure}");
            refuse(
                report,
                Direction::Outbound,
                failure.to_string(),
                Some(failure),
            );
            None
        }
        OnTlsFailure::FallBackToPlaintext => {
            tracing::info!(
                session = report.id,
                upstream = %route.address,
                "outbound {failure}; continuing in plaintext"
            );
            report.downgrades.push(Downgrade {
                leg: Direction::Outbound,
                reason: failure.to_string(),
            });
            let tcp = connect_tcp(route, timeouts, report).await?;
            report.outbound = Some(LegSecurity::Plaintext);
            Some(Leg::Plain(tcp))
        }
    }
}

async fn connect_tcp(
    route: &RoutePlan,
    timeouts: Timeouts,
    report: &mut SessionReport,
) -> Option<TcpStream> {
    let address = (route.address.host.as_str(), route.address.port);
    let result = timeout(timeouts.connect, TcpStream::connect(address)).await;
    let error = match result {
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            report.upstream_addr = tcp.peer_addr().ok();
            report.failed_attempt_cookie = report.upstream_cookie.take();
            report.upstream_cookie = crate::bpf::socket_cookie(&tcp);
            return Some(tcp);
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_string(),
    };
    let reason = format!("upstream {} unreachable: {error}", route.address);
    tracing::warn!(session = report.id, "{reason}");
    report.outcome = Outcome::Failed { reason };
    None
}

/// Ends a leg that never got to relay: close_notify for TLS, then FIN.
async fn close_quietly(mut leg: Leg) {
    let _ = timeout(Duration::from_secs(1), leg.shutdown()).await;
}
