//! Delivery by DNS: a recipient domain's MX hosts found and ordered (RFC
//! 5321 5.1, null MX per RFC 7505), each host's addresses, and for each
//! host the TLS DANE (RFC 7672) or else the domain's MTA-STS policy (RFC
//! 8461) calls for, then the hosts tried in order through the shared
//! next-hop setup.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use super::client::{Established, HopSetup, MailConnector};
use super::codec::Reply;
use super::forward::tls_required;
use super::mx::{mx_hosts, MxHosts};
use crate::config::{DaneMode, HostPort};
use crate::dane::{host_tls, wants_tlsa, DnsFailure, HostTls};
use crate::dns::DnsResolver;
use crate::legs::{OutboundFailure, Target};
use crate::mta_sts::Mode;
use crate::policy::{NamePattern, OutboundPolicy, TlsFailure, Verification};
use crate::sts_policies::{StsLookup, StsPolicies};
use crate::tls::{DaneCheck, UpstreamTls, UpstreamTlsSettings};

/// At most this many MX hosts are looked up, and this many addresses
/// tried, per delivery attempt (Postfix: smtp_mx_address_limit = 5).
const MAX_HOSTS: usize = 10;

/// A connector that delivers to each recipient domain's MX hosts.
pub struct MxRoute {
    pub port: u16,
    pub dane: DaneMode,
    /// The connector's TLS for any MX host (`None`: policy plain); each
    /// host's name is filled in per connection.
    pub tls: Option<UpstreamTlsSettings>,
    pub resolver: DnsResolver,
    /// MTA-STS policies, when honoured.
    pub sts: Option<Arc<StsPolicies>>,
}

/// One MX host and what its lookups decided.
struct MxHost {
    name: String,
    addresses: Result<Vec<IpAddr>, DnsFailure>,
    tls: HostTls,
}

/// What stopped delivery to the hosts tried, worst last.
#[derive(Default)]
struct Problems {
    dns: Vec<String>,
    unreachable: Vec<String>,
    tls: Option<TlsFailure>,
    /// Why DANE or MTA-STS ruled a host out.
    secure: Option<String>,
}

impl MxRoute {
    /// DANE in force: none without TLS.
    fn dane_mode(&self) -> DaneMode {
        match self.tls {
            Some(_) => self.dane,
            None => DaneMode::Off,
        }
    }

    /// What `check` and the banner print after the route.
    pub fn describe(&self, policy: OutboundPolicy) -> String {
        let dane = match self.dane_mode() {
            DaneMode::Off => "DANE off".to_string(),
            DaneMode::On => "DANE where TLSA records are DNSSEC-proven, else".into(),
            DaneMode::Only => "DANE only (451 4.7.5 without DNSSEC-proven TLSA records)".into(),
        };
        let tls = match (&self.tls, self.dane_mode()) {
            (_, DaneMode::Only) => String::new(),
            (Some(settings), _) => format!(
                " TLS {policy}, verify {} [the MX host name]",
                settings.verification
            ),
            (None, _) => format!(" TLS {policy}"),
        };
        let sts = match self.sts {
            Some(_) => "; MTA-STS policies honoured (enforce: listed MX hosts only, TLS with the chain and MX name verified; cached per max_age in the state directory)",
            None => "; MTA-STS off",
        };
        format!("{dane}{tls}{sts}")
    }

    /// A session with one of `domain`'s MX hosts, or the sender's reply.
    pub async fn establish(
        &self,
        hop: &mut HopSetup<'_>,
        connector: &MailConnector,
        domain: &str,
    ) -> Result<Established, Reply> {
        let hosts = self.hosts(domain).await?;
        let sts = match &self.sts {
            Some(policies) => policies.lookup(domain).await,
            None => StsLookup::None,
        };
        if let StsLookup::Failed { reason, .. } = &sts {
            tracing::info!(
                session = hop.session,
                "{reason}; delivering as without a policy"
            );
        }
        let enforced = match &sts {
            StsLookup::Policy(policy) if policy.mode == Mode::Enforce => Some(policy),
            _ => None,
        };
        let mut problems = Problems::default();
        let mut tried = 0;
        for host in hosts {
            let addresses = match (host.addresses, &host.tls) {
                (_, HostTls::Skip { reason, .. }) => {
                    tracing::info!(session = hop.session, mx = %host.name, "{reason}");
                    problems.secure = Some(reason.clone());
                    continue;
                }
                // RFC 8461 4.1: DANE first; else an enforced policy must
                // list the host.
                (_, HostTls::Policy) if enforced.is_some_and(|p| !p.allows_mx(&host.name)) => {
                    let reason = format!(
                        "MX host {} is not listed in the MTA-STS policy of {domain}",
                        host.name
                    );
                    tracing::info!(session = hop.session, "{reason}");
                    problems.secure = Some(reason);
                    continue;
                }
                (Err(failure), _) => {
                    problems.dns.push(failure.to_string());
                    continue;
                }
                (Ok(addresses), _) if addresses.is_empty() => {
                    problems
                        .dns
                        .push(format!("MX host {} has no address", host.name));
                    continue;
                }
                (Ok(addresses), _) => addresses,
            };
            let sts_enforced = enforced.is_some() && host.tls == HostTls::Policy;
            let chosen = self.host_tls(
                &host.name,
                domain,
                &host.tls,
                sts_enforced,
                connector.policy,
            );
            let (policy, tls) = match chosen {
                Ok(chosen) => chosen,
                Err(why) => {
                    problems.unreachable.push(why);
                    continue;
                }
            };
            for ip in addresses {
                if tried == MAX_HOSTS {
                    break;
                }
                tried += 1;
                let address = HostPort {
                    host: ip.to_string(),
                    port: self.port,
                };
                let target = Target {
                    session: hop.session,
                    name: &host.name,
                    address: &address,
                    policy,
                    tls: tls.as_ref(),
                    proxy_header: None,
                };
                match hop.open(&target).await {
                    Ok(established) => return Ok(established),
                    // DANE or a required policy failed here: RFC 7672 2.2
                    // goes on to the next host.
                    Err(OutboundFailure::Refused { failure, .. }) => problems.tls = Some(failure),
                    Err(OutboundFailure::Unreachable(why)) => problems.unreachable.push(why),
                }
            }
        }
        Err(problems.reply(&connector.name, domain))
    }

    /// The policy and TLS for one host: DANE's when it has TLSA records,
    /// an enforced MTA-STS policy's (TLS, the chain and the host name
    /// verified), else the connector's with the host's name to verify.
    fn host_tls(
        &self,
        host: &str,
        domain: &str,
        tls: &HostTls,
        sts_enforced: bool,
        policy: OutboundPolicy,
    ) -> Result<(OutboundPolicy, Option<UpstreamTls>), String> {
        let Some(settings) = &self.tls else {
            return Ok((policy, None));
        };
        let (policy, dane) = match tls {
            HostTls::Dane(tlsa) => (
                OutboundPolicy::Required,
                Some(DaneCheck {
                    tlsa: tlsa.clone(),
                    names: vec![host.to_string(), domain.to_string()],
                }),
            ),
            HostTls::EncryptOnly => (OutboundPolicy::Required, None),
            HostTls::Policy | HostTls::Skip { .. } => (policy, None),
        };
        let mut settings = settings.for_mx_host(host, dane)?;
        let policy = if *tls == HostTls::EncryptOnly {
            settings.verification = Verification::EncryptionOnly;
            settings.enforce = true;
            policy
        } else if sts_enforced {
            settings.verification = Verification::Name;
            settings.names = vec![NamePattern::Exact(host.to_ascii_lowercase())];
            settings.enforce = true;
            OutboundPolicy::Required
        } else {
            policy
        };
        let tls = UpstreamTls::new(settings).map_err(|e| e.to_string())?;
        Ok((policy, Some(tls)))
    }

    /// The domain's MX hosts in the order to try, each with its addresses
    /// and TLS; or the sender's reply when there are none to try.
    async fn hosts(&self, domain: &str) -> Result<Vec<MxHost>, Reply> {
        let mx = self
            .resolver
            .mx(domain)
            .await
            .map_err(|failure| Reply::new(451, format!("4.4.3 {failure}; try again later")))?;
        let random = std::collections::hash_map::RandomState::new();
        let names = match mx_hosts(domain, &mx.records, |n| {
            (random.build_hasher().finish() % n as u64) as usize
        }) {
            MxHosts::NullMx => {
                return Err(Reply::new(
                    556,
                    format!("5.1.10 Recipient domain {domain} accepts no mail (null MX)"),
                ))
            }
            MxHosts::Hosts(names) => names,
        };
        let mode = self.dane_mode();
        let mut hosts = Vec::new();
        for name in names.into_iter().take(MAX_HOSTS) {
            let (addresses, tls) = match self.resolver.addresses(&name).await {
                Err(failure) => (Err(failure), HostTls::Policy),
                Ok(answer) => {
                    let tlsa = if wants_tlsa(mode, mx.secure, answer.secure)
                        && !answer.records.is_empty()
                    {
                        Some(self.resolver.tlsa(&name, self.port).await)
                    } else {
                        None
                    };
                    let tls = host_tls(mode, mx.secure, answer.secure, tlsa);
                    (Ok(answer.records), tls)
                }
            };
            hosts.push(MxHost {
                name,
                addresses,
                tls,
            });
        }
        Ok(hosts)
    }
}

impl Problems {
    /// The sender's reply (4xx: it keeps the message): TLS or DANE
    /// failures first, as they are the ones an operator must see.
    fn reply(self, connector: &str, domain: &str) -> Reply {
        if let Some(failure) = &self.tls {
            return tls_required(connector, failure);
        }
        if let Some(reason) = self.secure {
            return Reply::new(
                451,
                format!("4.7.5 No MX host of {domain} can be reached securely: {reason}"),
            );
        }
        if !self.unreachable.is_empty() || self.dns.is_empty() {
            return super::forward::unreachable(connector, &self.unreachable);
        }
        Reply::new(
            451,
            format!("4.4.3 {}; try again later", self.dns.join("; ")),
        )
    }
}
