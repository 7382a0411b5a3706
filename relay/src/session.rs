//! One client connection end to end: decide and perform the inbound TLS,
//! connect the upstream under its policy (falling back or refusing), hand
//! both legs to the data pump, and report what happened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::config::HostPort;
use crate::legs::{
    accept_tls, inbound_refused, inbound_security, open_outbound, ClientAddress, LegTimeouts,
    OutboundFailure, ProxySources, Silent, Target,
};
use crate::policy::{inbound_start, InboundMode, InboundStart, OutboundPolicy};
use crate::proxy::ProxyVersion;
use crate::pump::{self, Leg, PumpOptions, SpliceEngine};
use crate::report::{Direction, Downgrade, LegSecurity, Outcome, SessionReport};
use crate::tls::{ListenerTls, UpstreamTls};

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
    /// Connections start with a PROXY protocol header naming the client,
    /// from these balancers only.
    pub proxy_protocol: Option<ProxySources>,
}

/// An upstream route: where to connect and how to secure it.
pub struct RoutePlan {
    pub name: String,
    pub address: HostPort,
    pub policy: OutboundPolicy,
    /// Present unless the policy is `plain`.
    pub tls: Option<UpstreamTls>,
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
    let route = &plan.route;
    let mut report = SessionReport::new(id, &plan.name, peer, &route.name);
    let _ = client.set_nodelay(true);
    // Until the session ends cleanly, closing (or dying) resets the client.
    pump::reset_on_close(&client);
    report.client_cookie = crate::bpf::socket_cookie(&client);
    let address = match address {
        Ok(address) => address,
        Err(outcome) => {
            report.outcome = outcome;
            return finish(report, started);
        }
    };
    report.client = address.peer;
    report.proxied_by = address.proxied_by;
    // The header naming the client, for an upstream that wants one.
    let proxy_header = route.send_proxy.and_then(|version| {
        let destination = address.destination.or_else(|| client.local_addr().ok())?;
        Some(crate::proxy::encode(version, address.peer, destination))
    });
    let peer = address.peer;
    if plan.mode == InboundMode::Off {
        report.tls_off.push(Direction::Inbound);
    }
    if route.policy == OutboundPolicy::Plain {
        report.tls_off.push(Direction::Outbound);
    }
    let (client_leg, inbound) = match accept_inbound(id, plan, client, peer).await {
        Ok(accepted) => accepted,
        Err(outcome) => {
            report.outcome = outcome;
            return finish(report, started);
        }
    };
    report.inbound = Some(inbound.security);
    report.downgrades.extend(inbound.downgrade);
    let target = Target {
        session: id,
        name: &route.address.host,
        address: &route.address,
        policy: route.policy,
        tls: route.tls.as_ref(),
        proxy_header,
        kernel_tls: false,
    };
    let timeouts = LegTimeouts {
        connect: plan.timeouts.connect,
        handshake: plan.timeouts.handshake,
    };
    let opened = open_outbound(&target, &mut Silent, timeouts, &mut report.sockets).await;
    let upstream = match opened {
        Ok(upstream) => upstream,
        Err(failure) => {
            // The client's leg is dropped: a RST, so that no client takes
            // the service's absence for an empty answer.
            report.outcome = outbound_failed(id, failure, &mut report);
            return finish(report, started);
        }
    };
    pump::reset_on_close(upstream.leg.tcp());
    report.upstream_addr = Some(upstream.address);
    report.outbound = Some(upstream.security);
    report.downgrades.extend(upstream.downgrade);
    report.setup_ms = ms(started.elapsed());
    let options = PumpOptions {
        idle_timeout: plan.timeouts.idle,
        ktls: plan.ktls,
        engine: plan.engine,
    };
    let pumped = pump::run(client_leg, upstream.leg, options).await;
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

/// How the inbound leg was secured.
struct Inbound {
    security: LegSecurity,
    downgrade: Option<Downgrade>,
}

/// The client-facing leg, or the outcome that ends the session.
async fn accept_inbound(
    id: u64,
    plan: &ListenerPlan,
    client: TcpStream,
    peer: SocketAddr,
) -> Result<(Leg, Inbound), Outcome> {
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
            let security = LegSecurity::Plaintext;
            Ok((
                Leg::Plain(client),
                Inbound {
                    security,
                    downgrade,
                },
            ))
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
            let stream = accept_tls(tls, client, plan.timeouts.handshake)
                .await
                .map_err(|failure| inbound_refused(id, peer, failure))?;
            let trust = tls.client_trust(stream.get_ref().1.peer_certificates());
            let security = inbound_security(id, peer, &stream, trust);
            let leg = Leg::TlsServer(Box::new(stream));
            Ok((
                leg,
                Inbound {
                    security,
                    downgrade: None,
                },
            ))
        }
    }
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
