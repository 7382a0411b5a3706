//! An outbound connector's way out: its next hops tried in order, or a
//! recipient domain's MX hosts ([`super::dns_route`]), or an idle
//! connection an earlier session left ([`super::idle_hops`]).

use std::sync::Arc;

use super::dns_route::MxRoute;
use super::hop::{Established, HopPolicy, HopSetup, OutboundRecord};
use super::idle_hops::IdleHops;
use crate::legs::{OutboundFailure, Target};
use crate::tls::UpstreamTls;
use tlsrelay_core::policy::OutboundPolicy;
use tlsrelay_core::smtp::codec::Reply;
use tlsrelay_core::smtp::forward::{tls_required, unreachable};
use tlsrelay_core::smtp::next_hop::SmtpTimeouts;
use tlsrelay_core::upstream::HostPort;

/// One way out for mail: a connector's next hops and how to secure them.
pub struct MailConnector {
    pub name: String,
    pub hops: NextHops,
    pub policy: OutboundPolicy,
    /// Next hops' TLS goes to the kernel after the handshake, where it can
    /// (`dataplane.ktls`).
    pub kernel_tls: bool,
    /// Connections sessions left clean, for the next session to reuse
    /// (`connection_reuse`); None when the connector does not reuse.
    pub idle: Option<Arc<IdleHops>>,
}

/// Where a connector's mail goes.
pub enum NextHops {
    /// These, in order.
    Fixed(Vec<NextHopPlan>),
    /// Each recipient domain's MX hosts.
    Mx(Box<MxRoute>),
}

pub struct NextHopPlan {
    pub address: HostPort,
    /// Present unless the policy is `plain`.
    pub tls: Option<UpstreamTls>,
}

/// Sets up a session with the connector's first reachable next hop under
/// its TLS policy: a fixed one, or one of `domain`'s MX hosts.
pub async fn establish(
    session: u64,
    connector: &MailConnector,
    domain: Option<&str>,
    hostname: &str,
    timeouts: SmtpTimeouts,
    record: OutboundRecord<'_>,
) -> Result<Established, Reply> {
    let mut hop = HopSetup {
        session,
        hostname,
        timeouts,
        record,
    };
    let hops = match (&connector.hops, domain) {
        (NextHops::Fixed(hops), _) => hops,
        (NextHops::Mx(route), Some(domain)) => {
            let policy = HopPolicy {
                connector: &connector.name,
                policy: connector.policy,
                kernel_tls: connector.kernel_tls,
            };
            return route.establish(&mut hop, policy, domain).await;
        }
        (NextHops::Mx(_), None) => return Err(unreachable(&connector.name, &[])),
    };
    let mut problems = Vec::new();
    for plan in hops {
        let target = Target {
            session,
            name: &plan.address.host,
            address: &plan.address,
            policy: connector.policy,
            tls: plan.tls.as_ref(),
            proxy_header: None,
            names: None,
            kernel_tls: connector.kernel_tls,
        };
        match hop.open(&target).await {
            Ok(established) => return Ok(established),
            Err(OutboundFailure::Refused { failure, .. }) => {
                return Err(tls_required(&connector.name, &failure));
            }
            Err(OutboundFailure::Unreachable(why)) => {
                tracing::info!(session, connector = %connector.name, "next hop unavailable: {why}");
                problems.push(why);
            }
        }
    }
    Err(unreachable(&connector.name, &problems))
}
