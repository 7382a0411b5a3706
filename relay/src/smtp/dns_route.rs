//! Delivery by DNS: a recipient domain's MX hosts found and ordered (RFC
//! 5321 5.1, null MX per RFC 7505), each host's addresses, and for each
//! host the TLS DANE (RFC 7672) or else the domain's MTA-STS policy (RFC
//! 8461) calls for, then the hosts tried in order through the shared
//! next-hop setup.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::hop::{Established, HopPolicy, HopSetup};
use crate::dns::DnsResolver;
use crate::legs::{OutboundFailure, Target};
use crate::sts_policies::{StsLookup, StsPolicies};
use crate::tls::{DaneCheck, UpstreamTls, UpstreamTlsSettings};
use crate::tls_reports::TlsReports;
use tlsrelay_core::config::DaneMode;
use tlsrelay_core::dane::{host_tls, wants_tlsa, DnsFailure, HostTls, Tlsa};
use tlsrelay_core::mta_sts::Mode;
use tlsrelay_core::policy::PeerTrust;
use tlsrelay_core::policy::{NamePattern, OutboundPolicy, TlsFailure, Verification};
use tlsrelay_core::report::{LegSecurity, PolicySession};
use tlsrelay_core::smtp::codec::Reply;
use tlsrelay_core::smtp::forward::tls_required;
use tlsrelay_core::smtp::mx::{mx_hosts, MxGuard, MxHosts, Unfit};
use tlsrelay_core::tlsrpt::{result_type, PolicyDescriptor, SessionResult};
use tlsrelay_core::upstream::HostPort;

/// At most this many MX hosts are looked up, and this many addresses
/// tried, per delivery attempt (Postfix: smtp_mx_address_limit = 5).
const MAX_HOSTS: usize = 10;

/// A connector that delivers to each recipient domain's MX hosts.
pub struct MxRoute {
    pub port: u16,
    /// DANE in force (off for a plain connector).
    pub dane: DaneMode,
    /// The connector's TLS for any MX host (`None`: policy plain); each
    /// host's name is filled in per connection.
    pub tls: Option<UpstreamTlsSettings>,
    pub resolver: DnsResolver,
    /// MTA-STS policies, when honoured.
    pub sts: Option<Arc<StsPolicies>>,
    /// Where each delivery's TLS results go (RFC 8460), when kept.
    pub reports: Option<Arc<TlsReports>>,
    /// Addresses delivery keeps out of: the relay itself, loopback and
    /// private networks.
    pub guard: MxGuard,
    /// The TLS of the MX hosts delivered to, with their session tickets.
    pub host_tls: HostTlsCache,
}

/// Each MX host's TLS, kept per host and the checks it is held to, with
/// the session tickets its server gave (as Postfix's
/// `smtp_tls_session_cache_database`): a returning delivery resumes
/// instead of a full handshake. rustls resumes only under the verifier a
/// ticket was won with, so keeping the config per host and checks is what
/// lets it, and a session never DANE-verified never resumes a DANE one.
#[derive(Default)]
pub struct HostTlsCache {
    configs: std::sync::Mutex<HashMap<String, Arc<UpstreamTls>>>,
}

/// Hosts (with their checks) kept at once; past it, all are dropped and
/// the next deliveries start over with full handshakes.
const MAX_TLS_HOSTS: usize = 10_000;

impl HostTlsCache {
    fn get_or_build(
        &self,
        key: String,
        build: impl FnOnce() -> Result<UpstreamTls, String>,
    ) -> Result<Arc<UpstreamTls>, String> {
        if let Some(tls) = self.configs.lock().unwrap().get(&key) {
            return Ok(tls.clone());
        }
        let tls = Arc::new(build()?);
        let mut configs = self.configs.lock().unwrap();
        if configs.len() >= MAX_TLS_HOSTS {
            configs.clear();
        }
        Ok(configs.entry(key).or_insert(tls).clone())
    }
}

/// Whether `ip` is one of this host's addresses: binding to it works only
/// then.
fn is_local(ip: IpAddr) -> bool {
    std::net::TcpListener::bind((ip, 0)).is_ok()
}

/// One MX host and what its lookups decided.
struct MxHost {
    name: String,
    addresses: Result<Vec<IpAddr>, DnsFailure>,
    tls: HostTls,
}

/// Why a domain has no MX host to try.
enum NoHosts {
    /// The sender's reply (a null MX, no such domain, a failed lookup).
    Reply(Reply),
    /// The MX answer failed DNSSEC validation: deferred, and reported.
    Bogus(DnsFailure),
}

/// What stopped delivery to the hosts tried.
#[derive(Default)]
struct Problems {
    dns: Vec<String>,
    unreachable: Vec<String>,
    tls: Option<TlsFailure>,
    /// Why DANE or MTA-STS ruled a host out.
    secure: Option<String>,
    /// An address that is the relay itself, or in a private network.
    unfit: Option<Unfit>,
}

impl MxRoute {
    /// What `check` and the banner print after the route.
    pub fn describe(&self, policy: OutboundPolicy) -> String {
        let dane = match self.dane {
            DaneMode::Off => "DANE off".to_string(),
            DaneMode::On => "DANE where TLSA records are DNSSEC-proven, else".into(),
            DaneMode::Only => "DANE only (451 4.7.5 without DNSSEC-proven TLSA records)".into(),
        };
        let tls = match (&self.tls, self.dane) {
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
    /// Each host tried or ruled out is one session in `domain`'s TLS
    /// report.
    pub async fn establish(
        &self,
        hop: &mut HopSetup<'_>,
        connector: HopPolicy<'_>,
        domain: &str,
    ) -> Result<Established, Reply> {
        let hosts = match self.hosts(domain).await {
            Ok(hosts) => hosts,
            Err(NoHosts::Reply(reply)) => return Err(reply),
            Err(NoHosts::Bogus(failure)) => {
                // RFC 8460 4.3.2: a DNSSEC answer that does not validate is
                // a session failure of the domain's report.
                let mut sessions = Vec::new();
                let mut report = Reporter {
                    reports: self.reports.as_deref(),
                    domain,
                    sts: None,
                    sessions: &mut sessions,
                };
                let policy = PolicyDescriptor {
                    policy_type: "tlsa".into(),
                    ..PolicyDescriptor::none(domain)
                };
                report.failure(&policy, "dnssec-invalid", None, None, failure.to_string());
                hop.record.policy_sessions.append(&mut sessions);
                return Err(Reply::new(451, format!("4.4.3 {failure}; try again later")));
            }
        };
        let sts = match &self.sts {
            Some(policies) => policies.lookup(domain).await,
            None => StsLookup::None,
        };
        let mut sessions = Vec::new();
        let mut report = Reporter {
            reports: self.reports.as_deref(),
            domain,
            sts: sts_descriptor(domain, &sts),
            sessions: &mut sessions,
        };
        if let StsLookup::Failed { reason, result } = &sts {
            tracing::info!(
                session = hop.session,
                "{reason}; delivering as without a policy"
            );
            let announced = PolicyDescriptor {
                policy_type: "sts".into(),
                ..PolicyDescriptor::none(domain)
            };
            report.failure(&announced, result, None, None, reason.clone());
        }
        let enforced = match &sts {
            StsLookup::Policy(policy) if policy.mode == Mode::Enforce => Some(policy),
            _ => None,
        };
        let mut problems = Problems::default();
        let mut tried = 0;
        for host in hosts {
            let policy_held = report.policy_of(&host.tls, &host.name);
            let name = Some(host.name.clone());
            let addresses = match (host.addresses, &host.tls) {
                (_, HostTls::Skip { reason, result }) => {
                    tracing::info!(session = hop.session, mx = %host.name, "{reason}");
                    report.failure(&policy_held, result, name, None, reason.clone());
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
                    report.failure(
                        &policy_held,
                        "validation-failure",
                        name,
                        None,
                        reason.clone(),
                    );
                    problems.secure = Some(reason);
                    continue;
                }
                (Err(failure), _) => {
                    if let DnsFailure::Bogus(_) = failure {
                        let why = failure.to_string();
                        report.failure(&policy_held, "dnssec-invalid", name, None, why);
                    }
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
            let dane = matches!(host.tls, HostTls::Dane(_));
            let unusable_tlsa = host.tls == HostTls::EncryptOnly;
            for ip in addresses {
                if tried == MAX_HOSTS {
                    break;
                }
                if let Err(unfit) = self.guard.check(ip, self.port, is_local) {
                    tracing::info!(session = hop.session, mx = %host.name, %ip, "not delivering to {ip}: {unfit:?}");
                    problems.unfit.get_or_insert(unfit);
                    continue;
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
                    tls: tls.as_deref(),
                    proxy_header: None,
                    names: None,
                    kernel_tls: connector.kernel_tls,
                };
                match hop.open(&target).await {
                    Ok(established) => {
                        report.opened(&policy_held, &established, &sts, unusable_tlsa);
                        hop.record.policy_sessions.append(&mut sessions);
                        return Ok(established);
                    }
                    // DANE or a required policy failed here: RFC 7672 2.2
                    // goes on to the next host.
                    Err(OutboundFailure::Refused { failure, .. }) => {
                        let result = result_type(&failure, dane);
                        let why = failure.to_string();
                        report.failure(&policy_held, result, name.clone(), Some(ip), why);
                        problems.tls = Some(failure);
                    }
                    Err(OutboundFailure::Unreachable(why)) => problems.unreachable.push(why),
                }
            }
        }
        hop.record.policy_sessions.append(&mut sessions);
        Err(problems.reply(connector.connector, domain))
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
    ) -> Result<(OutboundPolicy, Option<Arc<UpstreamTls>>), String> {
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
        // The checks a ticket's session passed: the name, the anchors (the
        // connector's, fixed per plan), the TLSA records.
        let names: Vec<String> = settings.names.iter().map(ToString::to_string).collect();
        let tlsa: Vec<String> = match tls {
            HostTls::Dane(records) => records.iter().map(Tlsa::presentation).collect(),
            _ => Vec::new(),
        };
        let key = format!(
            "{host} {} enforce={} names={names:?} tlsa={tlsa:?}",
            settings.verification, settings.enforce
        );
        let tls = self.host_tls.get_or_build(key, || {
            UpstreamTls::new(settings).map_err(|e| e.to_string())
        })?;
        Ok((policy, Some(tls)))
    }

    /// The domain's MX hosts in the order to try, each with its addresses
    /// and TLS; or why there are none to try.
    async fn hosts(&self, domain: &str) -> Result<Vec<MxHost>, NoHosts> {
        let mx = self
            .resolver
            .mx(domain)
            .await
            .map_err(|failure| match failure {
                DnsFailure::Bogus(_) => NoHosts::Bogus(failure),
                DnsFailure::Temporary(_) => {
                    NoHosts::Reply(Reply::new(451, format!("4.4.3 {failure}; try again later")))
                }
            })?
            .ok_or_else(|| {
                // RFC 3463 X.1.2: the destination system does not exist; as
                // Postfix, a bounce now rather than retries for days.
                NoHosts::Reply(Reply::new(
                    550,
                    format!("5.1.2 Recipient domain {domain} does not exist (NXDOMAIN)"),
                ))
            })?;
        let names = match mx_hosts(domain, &mx.records, random_below) {
            MxHosts::NullMx => {
                return Err(NoHosts::Reply(Reply::new(
                    556,
                    format!("5.1.10 Recipient domain {domain} accepts no mail (null MX)"),
                )))
            }
            MxHosts::Hosts(names) => names,
        };
        let mode = self.dane;
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

/// A random index below `n`, for the order of equal-preference MX hosts
/// (RFC 5321 5.1: spread the load). From the system's random source: a
/// hasher's output would repeat, leaving some orders never drawn.
fn random_below(n: usize) -> usize {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0;
    }
    (u64::from_le_bytes(bytes) % n.max(1) as u64) as usize
}

/// Adds a delivery's sessions to the policy domain's TLS report.
struct Reporter<'a> {
    reports: Option<&'a TlsReports>,
    domain: &'a str,
    /// The MTA-STS policy in force (enforce or testing).
    sts: Option<PolicyDescriptor>,
    /// The same, for the session report.
    sessions: &'a mut Vec<PolicySession>,
}

impl Reporter<'_> {
    fn sts_or_none(&self) -> PolicyDescriptor {
        self.sts
            .clone()
            .unwrap_or_else(|| PolicyDescriptor::none(self.domain))
    }

    /// The policy a host was held to: its TLSA records (DANE first), else
    /// the MTA-STS policy, else none.
    fn policy_of(&self, tls: &HostTls, host: &str) -> PolicyDescriptor {
        // A TLSA policy is one MX host's (RFC 8460 4.3.1: mx-host names it).
        let tlsa = |records: Vec<String>| PolicyDescriptor {
            policy_type: "tlsa".into(),
            policy_string: records,
            policy_domain: self.domain.into(),
            mx_host: vec![host.to_string()],
        };
        match tls {
            HostTls::Dane(records) => tlsa(records.iter().map(Tlsa::presentation).collect()),
            HostTls::EncryptOnly | HostTls::Skip { .. } => tlsa(Vec::new()),
            HostTls::Policy => self.sts_or_none(),
        }
    }

    fn failure(
        &mut self,
        policy: &PolicyDescriptor,
        result_type: &'static str,
        receiving_mx_hostname: Option<String>,
        receiving_ip: Option<IpAddr>,
        reason: String,
    ) {
        self.record(
            policy,
            SessionResult::Failure {
                result_type,
                receiving_mx_hostname,
                receiving_ip,
                sending_mta_ip: None,
                reason,
            },
        );
    }

    fn record(&mut self, policy: &PolicyDescriptor, result: SessionResult) {
        let (outcome, mx_host) = match &result {
            SessionResult::Success => ("success", None),
            SessionResult::Failure {
                result_type,
                receiving_mx_hostname,
                ..
            } => (*result_type, receiving_mx_hostname.clone()),
        };
        self.sessions.push(PolicySession {
            domain: self.domain.to_string(),
            policy_type: policy.policy_type.clone(),
            result: outcome.to_string(),
            mx_host,
        });
        if let Some(reports) = self.reports {
            reports.record(self.domain, policy, result);
        }
    }

    /// A session that opened: a success, unless a testing MTA-STS policy
    /// would have failed it (RFC 8460 reports what enforce would refuse),
    /// the host's TLSA records were all unusable (`tlsa-invalid`, though
    /// RFC 7672 2.2 delivers over unauthenticated TLS), or TLS failed and
    /// the mail went in cleartext.
    fn opened(
        &mut self,
        policy: &PolicyDescriptor,
        established: &Established,
        sts: &StsLookup,
        unusable_tlsa: bool,
    ) {
        if unusable_tlsa {
            return self.failure(
                policy,
                "tlsa-invalid",
                Some(established.hop.facts.host.clone()),
                Some(established.hop.facts.address.ip()),
                "no usable TLSA record (DANE-TA or DANE-EE); delivered with unauthenticated TLS"
                    .into(),
            );
        }
        let testing = matches!(sts, StsLookup::Policy(p) if p.mode == Mode::Testing)
            && policy.policy_type == "sts";
        let failed = match &established.hop.facts.security {
            LegSecurity::Tls { trust, .. } if !testing || *trust == PeerTrust::Verified => None,
            LegSecurity::Tls {
                trust: PeerTrust::Trusted,
                ..
            } => Some("certificate-host-mismatch"),
            LegSecurity::Tls { .. } => Some("certificate-not-trusted"),
            LegSecurity::Plaintext if testing => Some("starttls-not-supported"),
            // Delivered in cleartext after TLS was tried: the failure that
            // made the relay fall back (RFC 8460 4.3.2).
            LegSecurity::Plaintext => established
                .downgrade
                .as_ref()
                .map(|d| downgrade_result_type(d.class)),
        };
        let reason = match (&established.downgrade, testing) {
            (_, true) => "MTA-STS testing policy not met".to_string(),
            (Some(downgrade), false) => downgrade.reason.clone(),
            (None, false) => String::new(),
        };
        match failed {
            Some(result) => self.failure(
                policy,
                result,
                Some(established.hop.facts.host.clone()),
                Some(established.hop.facts.address.ip()),
                reason,
            ),
            None => self.record(policy, SessionResult::Success),
        }
    }
}

/// The result type of the failure behind a fall back to cleartext, by its
/// class ([`tlsrelay_core::report::Downgrade::CLASSES`]).
fn downgrade_result_type(class: &str) -> &'static str {
    match class {
        "certificate untrusted" => "certificate-not-trusted",
        "name mismatch" => "certificate-host-mismatch",
        "handshake failed" | "version too low" => "validation-failure",
        _ => "starttls-not-supported",
    }
}

/// The MTA-STS policy as a report names it.
fn sts_descriptor(domain: &str, sts: &StsLookup) -> Option<PolicyDescriptor> {
    let (strings, mx) = match sts {
        StsLookup::Policy(p) if p.mode != Mode::None => (
            std::iter::once("version: STSv1".to_string())
                .chain(std::iter::once(format!("mode: {}", p.mode)))
                .chain(p.mx.iter().map(|mx| format!("mx: {mx}")))
                .chain(std::iter::once(format!("max_age: {}", p.max_age)))
                .collect(),
            p.mx.clone(),
        ),
        _ => return None,
    };
    Some(PolicyDescriptor {
        policy_type: "sts".into(),
        policy_string: strings,
        policy_domain: domain.into(),
        mx_host: mx,
    })
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
        match (self.unfit, self.unreachable.is_empty()) {
            (Some(Unfit::Myself), true) => {
                return Reply::new(451, format!("4.4.6 mail for {domain} loops back to myself"))
            }
            (Some(Unfit::Private), true) => {
                return Reply::new(
                    451,
                    format!("4.4.6 mail for {domain} would go to a private network address"),
                )
            }
            _ => {}
        }
        if !self.unreachable.is_empty() || self.dns.is_empty() {
            return tlsrelay_core::smtp::forward::unreachable(connector, &self.unreachable);
        }
        Reply::new(
            451,
            format!("4.4.3 {}; try again later", self.dns.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlsrelay_core::smtp::mx::Mx;

    #[test]
    fn every_order_of_four_equal_mx_hosts_is_drawn() {
        let records: Vec<Mx> = ["a", "b", "c", "d"]
            .iter()
            .map(|h| Mx {
                preference: 10,
                exchange: format!("{h}.example."),
            })
            .collect();
        let mut orders = std::collections::HashSet::new();
        // 24 orders; missing one in 2,000 fair draws has odds below 1e-35.
        for _ in 0..2000 {
            match mx_hosts("example", &records, random_below) {
                MxHosts::Hosts(hosts) => orders.insert(hosts),
                MxHosts::NullMx => unreachable!(),
            };
        }
        assert_eq!(orders.len(), 24);
    }
}
