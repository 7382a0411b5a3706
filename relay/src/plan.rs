//! Turns a validated [`Config`] into the plan the listeners serve:
//! certificates loaded, rustls configs built, routes and connectors
//! resolved, and the plan's own description (what `check` and the banner
//! print is what was built).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use crate::access::ClientAccess;
use crate::dns::DnsResolver;
use crate::legs::ProxySources;
use crate::names::UpstreamNames;
use crate::pump::SpliceEngine;
use crate::session::{ListenerPlan, RoutePlan, RouteRule, Timeouts};
use crate::smtp::client::{MailConnector, NextHopPlan, NextHops};
use crate::smtp::dns_route::MxRoute;
use crate::smtp::idle_hops::IdleHops;
use crate::smtp::session::SmtpListenerPlan;
use crate::sts_policies::StsPolicies;
use crate::tls::{
    self, ClientAuth, ClientAuthSettings, ListenerTls, ListenerTlsSettings, SelfSigned,
    UpstreamTls, UpstreamTlsSettings,
};
use crate::tls_reports::sender::{MailOut, ReportSender};
use crate::tls_reports::TlsReports;
use crate::upstreams::{PoolSettings, Pools};
use tlsrelay_core::config::NextHop;
use tlsrelay_core::config::{
    CertificateFiles, ClientAuthMode, Config, ConfigError, Listener, Protocol, Source, Upstream,
};
use tlsrelay_core::policy::{InboundMode, KeyExchange, NamePattern, OutboundPolicy, Verification};
use tlsrelay_core::smtp::address::DomainPattern;
use tlsrelay_core::smtp::forward::{ConnectorRoute, Routing};
use tlsrelay_core::smtp::mx::MxGuard;
use tlsrelay_core::smtp::next_hop::SmtpTimeouts;
use tlsrelay_core::smtp::server::StartTls;
use tlsrelay_core::upstream::{HealthRules, Pool};

/// Where listeners without configured certificates get theirs.
pub enum SelfSignedSource {
    /// Generated once into the state directory and reused.
    StateDir(PathBuf),
    /// Generated in memory (for `check`, which must not write files).
    Ephemeral,
}

/// Everything needed to serve, built and checked before binding.
/// What a listener's sessions are.
#[derive(Clone)]
pub enum Listening {
    Tcp(Arc<ListenerPlan>),
    Smtp(Arc<SmtpListenerPlan>),
}

impl Listening {
    pub(crate) fn name(&self) -> &str {
        match self {
            Listening::Tcp(p) => &p.name,
            Listening::Smtp(p) => &p.name,
        }
    }

    /// Connections come from these PROXY protocol balancers.
    pub(crate) fn proxy_sources(&self) -> Option<&ProxySources> {
        match self {
            Listening::Tcp(p) => p.proxy_protocol.as_ref(),
            Listening::Smtp(p) => p.proxy_protocol.as_ref(),
        }
    }

    /// Who may connect, and how fast.
    pub(crate) fn access(&self) -> &ClientAccess {
        match self {
            Listening::Tcp(p) => &p.access,
            Listening::Smtp(p) => &p.access,
        }
    }

    /// Starts the health checks of the pools this listener's sessions use.
    pub(crate) fn start_checks(&self) {
        if let Listening::Tcp(p) = self {
            for route in p
                .default_route
                .iter()
                .chain(p.routes.iter().map(|r| &r.route))
            {
                route.pool.ensure_checking();
            }
        }
    }

    /// The certificates it serves: name and expiry (Unix seconds).
    pub(crate) fn certificate_expiries(&self) -> &[(String, i64)] {
        let tls = match self {
            Listening::Tcp(p) => p.tls.as_ref(),
            Listening::Smtp(p) => p.tls.as_ref(),
        };
        tls.map_or(&[], |t| t.expiries())
    }

    /// How long a client has for its first bytes (a PROXY header too).
    pub(crate) fn handshake_timeout(&self) -> std::time::Duration {
        match self {
            Listening::Tcp(p) => p.timeouts.handshake,
            Listening::Smtp(p) => p.timeouts.handshake,
        }
    }
}

/// The SMTP connectors, built once and shared by the SMTP listeners.
struct SmtpShared {
    connectors: Vec<Arc<MailConnector>>,
    routing: Arc<Routing>,
    /// Each inbound connector's client certificate anchors (by index).
    connector_anchors: Vec<Option<Arc<rustls::RootCertStore>>>,
    /// Sends the TLS reports MX delivery gathers (with a state directory).
    report_sender: Option<ReportSender>,
}

/// What the MX connectors of one configuration share: one resolver, the
/// trust anchors TLS reports are sent with, one report store.
struct MxShared<'a> {
    resolver: Option<DnsResolver>,
    anchors_for_reports: Option<Arc<rustls::RootCertStore>>,
    reports: Arc<TlsReports>,
    state_dir: Option<&'a std::path::Path>,
}

impl MxShared<'_> {
    /// An MX connector's route: its TLS, DANE and MTA-STS settings on the
    /// shared resolver and report store.
    fn route(
        &mut self,
        config: &Config,
        c: &tlsrelay_core::config::OutboundConnector,
        port: u16,
        prefix: &str,
        system_roots: &mut SystemRoots,
    ) -> Result<NextHops, ConfigError> {
        let span = c.next_hops[0].span();
        let tls = outbound_tls_settings(
            &config.source,
            prefix,
            &c.tls,
            None,
            span.clone(),
            system_roots,
        )?;
        let resolver = match &self.resolver {
            Some(r) => Clone::clone(r),
            None => self
                .resolver
                .insert(dns_resolver(config, span.clone())?)
                .clone(),
        };
        if let Some(roots) = tls.as_ref().and_then(|t| t.roots.clone()) {
            self.anchors_for_reports.get_or_insert(roots);
        }
        let sts = match &tls {
            Some(settings) if c.honours_mta_sts() => {
                let roots = match &settings.roots {
                    Some(roots) => roots.clone(),
                    None => return Err(config.source.error(span, format!("{prefix}.trust_anchors"), "MTA-STS verifies certificates: the system store is unavailable, set trust_anchors (or mta_sts = false)")),
                };
                Some(Arc::new(StsPolicies::new(
                    resolver.clone(),
                    roots,
                    self.state_dir.map(|d| d.join("mta-sts")),
                    config.limits.connect_timeout,
                )))
            }
            _ => None,
        };
        Ok(NextHops::Mx(Box::new(MxRoute {
            port,
            dane: c.dane_mode(),
            tls,
            resolver,
            sts,
            reports: Some(self.reports.clone()),
            guard: MxGuard {
                own_listeners: config
                    .listeners
                    .iter()
                    .map(|l| *l.address.get_ref())
                    .collect(),
                private: config.dns.private_networks(),
                allowed: c.allow_private_mx.iter().map(|a| *a.get_ref()).collect(),
            },
            host_tls: Default::default(),
        })))
    }
}

/// Each inbound connector's trust anchors for client certificates.
fn connector_anchors(
    config: &Config,
) -> Result<Vec<Option<Arc<rustls::RootCertStore>>>, ConfigError> {
    let src = &config.source;
    let mut connector_anchors = Vec::new();
    for (i, c) in config.inbound_connectors.iter().enumerate() {
        let roots = match &c.trust_anchors {
            None => None,
            Some(path) => Some(Arc::new(
                tls::load_roots(&src.resolve(path.get_ref())).map_err(|e| {
                    src.error(
                        path.span(),
                        format!("inbound_connectors[{i}].trust_anchors"),
                        e,
                    )
                })?,
            )),
        };
        connector_anchors.push(roots);
    }
    Ok(connector_anchors)
}

/// The TLS report sender, when MX delivery has a state directory to keep
/// results in and trust anchors to post them with.
fn report_sender(
    config: &Config,
    state_dir: Option<&std::path::Path>,
    mx: MxShared<'_>,
    mail: MailOut,
) -> Option<ReportSender> {
    match (state_dir, mx.resolver, mx.anchors_for_reports) {
        (Some(dir), Some(resolver), Some(roots)) => Some(ReportSender {
            mail,
            dir: dir.join("tlsrpt"),
            resolver,
            roots,
            organization: config
                .tlsrpt
                .organization
                .clone()
                .unwrap_or_else(tls::hostname),
            contact: config.tlsrpt.contact.clone().unwrap_or_else(|| {
                let organization = config.tlsrpt.organization.clone();
                format!("postmaster@{}", organization.unwrap_or_else(tls::hostname))
            }),
        }),
        _ => None,
    }
}

/// A connector's fixed next hops, each with the TLS it is verified with.
fn fixed_hops(
    src: &tlsrelay_core::config::Source,
    c: &tlsrelay_core::config::OutboundConnector,
    prefix: &str,
    system_roots: &mut SystemRoots,
) -> Result<Vec<NextHopPlan>, ConfigError> {
    let mut next_hops = Vec::new();
    for hop in &c.next_hops {
        let NextHop::Fixed(address) = hop.get_ref().clone() else {
            continue;
        };
        let tls = outbound_tls(src, prefix, &c.tls, &address.host, hop.span(), system_roots)?;
        next_hops.push(NextHopPlan { address, tls });
    }
    Ok(next_hops)
}

impl SmtpShared {
    fn build(
        config: &Config,
        system_roots: &mut SystemRoots,
        state_dir: Option<&std::path::Path>,
    ) -> Result<SmtpShared, ConfigError> {
        let src = &config.source;
        let mut outbound = Vec::new();
        let mut routes = Vec::new();
        let mut mx = MxShared {
            resolver: None,
            anchors_for_reports: None,
            reports: TlsReports::shared(state_dir.map(|d| d.join("tlsrpt"))),
            state_dir,
        };
        for (i, c) in config.outbound_connectors.iter().enumerate() {
            let prefix = format!("outbound_connectors[{i}].tls");
            let hops = match c.mx_port() {
                Some(port) => mx.route(config, c, port, &prefix, system_roots)?,
                None => NextHops::Fixed(fixed_hops(src, c, &prefix, system_roots)?),
            };
            outbound.push(Arc::new(MailConnector {
                name: c.name.get_ref().clone(),
                hops,
                policy: c.tls.policy,
                kernel_tls: config.dataplane.ktls,
                idle: (!c.connection_cache_time.is_zero())
                    .then(|| Arc::new(IdleHops::new(c.connection_cache_time))),
            }));
            routes.push((c.recipient_domains.clone(), i));
        }
        let connector_anchors = connector_anchors(config)?;
        let routing = Routing {
            admission: Arc::new(config.admission()),
            routes,
            connectors: outbound
                .iter()
                .map(|c| ConnectorRoute {
                    name: c.name.clone(),
                    per_domain: matches!(c.hops, NextHops::Mx(_)),
                })
                .collect(),
        };
        let routing = Arc::new(routing);
        let limits = &config.limits;
        let mail = MailOut {
            routing: routing.clone(),
            connectors: outbound.clone(),
            hostname: config
                .listeners
                .iter()
                .find_map(|l| l.hostname.clone())
                .unwrap_or_else(tls::hostname),
            timeouts: SmtpTimeouts::rfc5321(
                limits.smtp_timeout_scale,
                limits.connect_timeout,
                limits.handshake_timeout,
            ),
        };
        let report_sender = report_sender(config, state_dir, mx, mail);
        Ok(SmtpShared {
            connectors: outbound,
            routing,
            connector_anchors,
            report_sender,
        })
    }

    /// Client certificates are asked for (naming the connectors' CAs) when
    /// an inbound connector has anchors, never demanded in the handshake:
    /// the connectors' rules judge them afterwards.
    fn client_auth(&self) -> Option<ClientAuth> {
        let hints: Vec<_> = self
            .connector_anchors
            .iter()
            .flatten()
            .flat_map(|roots| roots.subjects())
            .collect();
        (!hints.is_empty()).then_some(ClientAuth::Deferred { hints })
    }

    fn listener(
        &self,
        config: &Config,
        l: &Listener,
        tls: Option<ListenerTls>,
    ) -> SmtpListenerPlan {
        let limits = &config.limits;
        SmtpListenerPlan {
            name: l.name.get_ref().clone(),
            hostname: l
                .hostname
                .clone()
                .expect("validated: smtp listeners have a hostname"),
            starttls: match l.tls.mode {
                InboundMode::Off | InboundMode::Implicit => StartTls::Unavailable,
                InboundMode::Opportunistic => StartTls::Offered,
                InboundMode::Required => StartTls::Required,
            },
            implicit_tls: l.tls.mode == InboundMode::Implicit,
            proxy_protocol: proxy_sources(l),
            kernel_tls: config.dataplane.ktls,
            tls,
            routing: self.routing.clone(),
            connector_anchors: self.connector_anchors.clone(),
            connectors: self.connectors.clone(),
            timeouts: SmtpTimeouts::rfc5321(
                limits.smtp_timeout_scale,
                limits.connect_timeout,
                limits.handshake_timeout,
            ),
            max_message_size: l.max_message_size,
            max_hops: l.max_hops,
            access: ClientAccess::new(&l.access),
        }
    }
}

/// The balancers a listener believes PROXY protocol headers from.
fn proxy_sources(l: &Listener) -> Option<ProxySources> {
    l.proxy_protocol
        .get_ref()
        .then(|| ProxySources(l.proxy_protocol_from.clone()))
}

/// How many client connections the listeners take: in all, and from one
/// client address. Changed by a restart, not a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_client: usize,
}

impl ConnectionLimits {
    pub fn of(config: &Config) -> ConnectionLimits {
        ConnectionLimits {
            total: *config.limits.max_connections.get_ref(),
            per_client: *config.limits.max_connections_per_client.get_ref(),
        }
    }
}

pub struct Plan {
    pub listeners: Vec<(SocketAddr, Listening)>,
    pub limits: ConnectionLimits,
    /// Human-readable effective policy, one entry per listener and route.
    pub description: Vec<String>,
    /// Sends TLS reports (RFC 8460) for MX delivery, when there is any.
    pub report_sender: Option<ReportSender>,
    /// The upstream pools (shared with the plans built before and after
    /// this one from the same registry).
    pub pools: Pools,
}

impl Plan {
    /// A plan with pools of its own.
    pub fn build(config: &Config, self_signed: SelfSignedSource) -> Result<Plan, ConfigError> {
        Self::build_with(config, self_signed, &Pools::default())
    }

    /// A plan whose upstreams take their pools from `pools`: a reload
    /// keeps each unchanged pool's health and sessions.
    pub fn build_with(
        config: &Config,
        self_signed: SelfSignedSource,
        pools: &Pools,
    ) -> Result<Plan, ConfigError> {
        let src = &config.source;
        let timeouts = Timeouts {
            handshake: config.limits.handshake_timeout,
            connect: config.limits.connect_timeout,
            idle: config.limits.idle_timeout,
        };
        let mut system_roots = None;
        let mut routes = Vec::new();
        let names = UpstreamNames::new(&config.dns.nameservers);
        for (i, up) in config.upstreams.iter().enumerate() {
            routes.push(Arc::new(route_plan(
                src,
                i,
                up,
                &mut system_roots,
                pools,
                config.limits.connect_timeout,
                &names,
            )?));
        }
        let mut description = Vec::new();
        let mut generated = None;
        let mut listeners = Vec::new();
        let state_dir = match &self_signed {
            SelfSignedSource::StateDir(dir) => Some(dir.as_path()),
            SelfSignedSource::Ephemeral => None,
        };
        let smtp = SmtpShared::build(config, &mut system_roots, state_dir)?;
        for (i, l) in config.listeners.iter().enumerate() {
            let client_auth = match l.protocol {
                Protocol::Tcp => None,
                Protocol::Smtp => smtp.client_auth(),
            };
            let tls = match l.tls.mode {
                InboundMode::Off => None,
                _ => Some(listener_tls(
                    src,
                    i,
                    l,
                    &self_signed,
                    &mut generated,
                    client_auth,
                )?),
            };
            description.push(describe_listener(l, config.upstream_of(l)));
            let listening = match l.protocol {
                Protocol::Tcp => {
                    Listening::Tcp(Arc::new(tcp_listener(config, l, tls, &routes, timeouts)))
                }
                Protocol::Smtp => Listening::Smtp(Arc::new(smtp.listener(config, l, tls))),
            };
            listeners.push((*l.address.get_ref(), listening));
        }
        description.extend(describe_connectors_and_routes(config, &smtp, &routes));
        Ok(Plan {
            listeners,
            limits: ConnectionLimits::of(config),
            description,
            report_sender: smtp.report_sender,
            pools: pools.clone(),
        })
    }
}

/// A TCP listener's plan: its TLS, its routes to the upstreams' plans,
/// its access rules and data plane.
fn tcp_listener(
    config: &Config,
    l: &Listener,
    tls: Option<ListenerTls>,
    routes: &[Arc<RoutePlan>],
    timeouts: Timeouts,
) -> ListenerPlan {
    let route_named = |name: &str| {
        routes
            .iter()
            .find(|r| r.name == name)
            .expect("validated: every route's upstream exists")
            .clone()
    };
    ListenerPlan {
        name: l.name.get_ref().clone(),
        mode: l.tls.mode,
        tls,
        default_route: l.upstream.as_ref().map(|u| route_named(u.get_ref())),
        routes: l
            .routes
            .iter()
            .map(|r| RouteRule {
                sni: r.sni.iter().map(|n| n.to_ascii_lowercase()).collect(),
                alpn: r.alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
                route: route_named(r.upstream.get_ref()),
                passthrough: r.passthrough,
            })
            .collect(),
        access: ClientAccess::new(&l.access),
        timeouts,
        ktls: config.dataplane.ktls,
        engine: config.dataplane.pump,
        proxy_protocol: proxy_sources(l),
    }
}

/// The plan's lines after the listeners': who may relay, the connectors,
/// the routes (as built), the data plane.
fn describe_connectors_and_routes(
    config: &Config,
    smtp: &SmtpShared,
    routes: &[Arc<RoutePlan>],
) -> Vec<String> {
    let mut out = Vec::new();
    if config
        .listeners
        .iter()
        .any(|l| l.protocol == Protocol::Smtp)
    {
        out.extend(smtp.routing.admission.describe());
    }
    out.extend(
        config
            .inbound_connectors
            .iter()
            .map(describe_inbound_connector),
    );
    out.extend(
        smtp.routing
            .routes
            .iter()
            .map(|(domains, i)| describe_outbound_connector(&smtp.connectors[*i], domains)),
    );
    out.extend(routes.iter().map(|r| {
        describe_route(
            r,
            config
                .upstreams
                .iter()
                .find(|u| *u.name.get_ref() == r.name),
        )
    }));
    out.push(describe_limits(config));
    out.push(describe_dataplane(config));
    out
}

fn load_key_pair(
    src: &Source,
    field: String,
    files: &CertificateFiles,
) -> Result<Arc<rustls::sign::CertifiedKey>, ConfigError> {
    let key = tls::load_certified_key(
        &src.resolve(files.chain.get_ref()),
        &src.resolve(files.key.get_ref()),
    )
    .map_err(|e| src.error(files.chain.span(), field.clone(), e))?;
    let Some(ocsp) = &files.ocsp_response else {
        return Ok(key);
    };
    let path = src.resolve(ocsp.get_ref());
    let staple = tls::load_ocsp_staple(&path, &key.cert)
        .map_err(|e| src.error(ocsp.span(), format!("{field}.ocsp_response"), e))?;
    let mut key = Arc::unwrap_or_clone(key);
    key.ocsp = Some(staple);
    Ok(Arc::new(key))
}

fn listener_tls(
    src: &Source,
    i: usize,
    l: &Listener,
    self_signed: &SelfSignedSource,
    generated: &mut Option<Arc<rustls::sign::CertifiedKey>>,
    connector_auth: Option<ClientAuth>,
) -> Result<ListenerTls, ConfigError> {
    let mut certificates = Vec::new();
    for (j, files) in l.tls.certificates.iter().enumerate() {
        certificates.push(load_key_pair(
            src,
            format!("listeners[{i}].tls.certificates[{j}]"),
            files,
        )?);
    }
    if certificates.is_empty() {
        let key = match generated {
            Some(key) => key.clone(),
            None => {
                let key = match self_signed {
                    SelfSignedSource::StateDir(dir) => SelfSigned::in_dir(dir).load_or_generate(),
                    SelfSignedSource::Ephemeral => SelfSigned::ephemeral(),
                }
                .map_err(|e| src.error(l.name.span(), format!("listeners[{i}].tls"), e))?;
                generated.insert(key).clone()
            }
        };
        certificates.push(key);
    }
    let client_auth = match &l.tls.client_auth {
        None => connector_auth,
        Some(auth) => Some(ClientAuth::Enforced(ClientAuthSettings {
            required: auth.mode == ClientAuthMode::Required,
            roots: tls::load_roots(&src.resolve(auth.trust_anchors.get_ref())).map_err(|e| {
                src.error(
                    auth.trust_anchors.span(),
                    format!("listeners[{i}].tls.client_auth.trust_anchors"),
                    e,
                )
            })?,
            names: auth.names.clone(),
        })),
    };
    let settings = ListenerTlsSettings {
        min_version: l.tls.min_version,
        groups: l
            .tls
            .groups
            .as_ref()
            .map_or_else(|| KeyExchange::PREFERRED.to_vec(), |g| g.get_ref().clone()),
        default_certificate: l
            .tls
            .certificates
            .iter()
            .position(|c| c.default)
            .unwrap_or(0),
        certificates,
        client_auth,
        tickets: match &l.tls.ticket_keys {
            None => None,
            Some(path) => Some(
                crate::tickets::fleet_ticketer(
                    &src.resolve(path.get_ref()),
                    l.tls.ticket_key_lifetime,
                )
                .map_err(|e| {
                    src.error(path.span(), format!("listeners[{i}].tls.ticket_keys"), e)
                })?,
            ),
        },
    };
    ListenerTls::new(settings)
        .map_err(|e| src.error(l.name.span(), format!("listeners[{i}].tls"), e))
}

fn route_plan(
    src: &Source,
    i: usize,
    up: &Upstream,
    system_roots: &mut SystemRoots,
    pools: &Pools,
    connect_timeout: std::time::Duration,
    names: &UpstreamNames,
) -> Result<RoutePlan, ConfigError> {
    let specs = up.server_specs();
    let mut servers = Vec::new();
    for spec in &specs {
        let tls = outbound_tls(
            src,
            &format!("upstreams[{i}].tls"),
            &up.tls,
            &spec.address.host,
            up.servers_span(),
            system_roots,
        )?;
        servers.push(tls.map(Arc::new));
    }
    let rules = HealthRules {
        rise: up.check.as_ref().map_or(2, |c| c.rise),
        fall: up.check.as_ref().map_or(3, |c| c.fall),
        // A lone server without checks has nowhere else to send its
        // sessions: ejecting it would only refuse them.
        eject_after: match (specs.len(), &up.check) {
            (1, None) => 0,
            _ => up.eject_after,
        },
    };
    let pool = pools.get_or_create(
        up.name.get_ref(),
        Pool::new(specs, up.balance, rules),
        PoolSettings {
            check: up.check.clone(),
            eject_time: up.eject_time,
            connect_timeout,
            names: names.clone(),
        },
    );
    pool.use_tls(servers.clone());
    Ok(RoutePlan {
        name: up.name.get_ref().clone(),
        pool,
        servers,
        policy: up.tls.policy,
        send_proxy: up.send_proxy_protocol,
    })
}

/// The system trust store, loaded once when first needed.
type SystemRoots = Option<Result<Arc<rustls::RootCertStore>, String>>;

/// The client TLS for one upstream host under an outbound policy (`None`
/// for `plain`).
/// The resolver MX delivery uses, from the config's `[dns]`; errors point
/// at the trust anchors or else at the `"mx"` that needs the resolver.
fn dns_resolver(config: &Config, mx: std::ops::Range<usize>) -> Result<DnsResolver, ConfigError> {
    let src = &config.source;
    let anchors = config.dns.trust_anchors.as_ref();
    let anchors_path = anchors.map(|p| src.resolve(p.get_ref()));
    DnsResolver::new(&config.dns.nameservers, anchors_path.as_deref()).map_err(|e| match anchors {
        Some(path) => src.error(path.span(), "dns.trust_anchors", e),
        None => src.error(mx, "dns.nameservers", e),
    })
}

fn outbound_tls(
    src: &Source,
    prefix: &str,
    t: &tlsrelay_core::config::OutboundTls,
    host: &str,
    span: std::ops::Range<usize>,
    system_roots: &mut SystemRoots,
) -> Result<Option<UpstreamTls>, ConfigError> {
    let Some(settings) =
        outbound_tls_settings(src, prefix, t, Some(host), span.clone(), system_roots)?
    else {
        return Ok(None);
    };
    UpstreamTls::new(settings)
        .map(Some)
        .map_err(|e| src.error(span, format!("{prefix}.policy"), e))
}

/// An outbound policy's TLS settings, files loaded; `host` is the next
/// hop (none for MX delivery: each host's name is filled in per
/// connection).
fn outbound_tls_settings(
    src: &Source,
    prefix: &str,
    t: &tlsrelay_core::config::OutboundTls,
    host: Option<&str>,
    span: std::ops::Range<usize>,
    system_roots: &mut SystemRoots,
) -> Result<Option<UpstreamTlsSettings>, ConfigError> {
    if t.policy == OutboundPolicy::Plain {
        return Ok(None);
    }
    let field = |f: &str| format!("{prefix}.{f}");
    let verification = t.verification();
    let roots = match &t.trust_anchors {
        Some(path) => Some(Arc::new(
            tls::load_roots(&src.resolve(path.get_ref()))
                .map_err(|e| src.error(path.span(), field("trust_anchors"), e))?,
        )),
        None => {
            let system = system_roots.get_or_insert_with(|| {
                tls::system_roots().map(Arc::new).map_err(|e| e.to_string())
            });
            match (system, verification) {
                (Ok(roots), _) => Some(roots.clone()),
                // Without anchors an encryption-only route still works; its
                // peers are reported Untrusted.
                (Err(_), Verification::EncryptionOnly) => None,
                (Err(e), _) => return Err(src.error(span, field("trust_anchors"), e.clone())),
            }
        }
    };
    let sni = t
        .server_name
        .clone()
        .or(host.map(str::to_string))
        .unwrap_or_else(|| "localhost".into());
    let names = match host {
        _ if !t.names.is_empty() => t.names.clone(),
        Some(_) => vec![default_name_pattern(&sni)],
        None => Vec::new(),
    };
    let server_name = ServerName::try_from(sni.clone())
        .map_err(|e| src.error(span.clone(), field("server_name"), format!("'{sni}': {e}")))?;
    let client_certificate = t
        .client_certificate
        .as_ref()
        .map(|files| load_key_pair(src, field("client_certificate"), files))
        .transpose()?;
    let mut crls = Vec::new();
    for path in &t.crls {
        crls.extend(
            tls::load_crls(&src.resolve(path.get_ref()))
                .map_err(|e| src.error(path.span(), field("crls"), e))?,
        );
    }
    let anchors_from = t
        .trust_anchors
        .as_ref()
        .map_or("system".to_string(), |p| p.get_ref().display().to_string());
    Ok(Some(UpstreamTlsSettings {
        anchors_from,
        crls: Arc::new(crls),
        verification,
        enforce: t.policy == OutboundPolicy::Required,
        names,
        roots,
        min_version: t.min_version,
        groups: t
            .groups
            .as_ref()
            .map_or_else(|| KeyExchange::PREFERRED.to_vec(), |g| g.get_ref().clone()),
        server_name,
        client_certificate,
        dane: None,
    }))
}

/// The name a route's certificate must carry when none is configured: the
/// server name, which defaults to the host connected to (an IP address
/// matches an IP SAN).
fn default_name_pattern(host: &str) -> NamePattern {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => NamePattern::Exact(ip.to_string()),
        Err(_) => host
            .parse()
            .unwrap_or_else(|_| NamePattern::Exact(host.to_ascii_lowercase())),
    }
}

fn describe_listener(l: &Listener, up: Option<&Upstream>) -> String {
    let mut s = format!(
        "listener {} on {} ({}): inbound TLS {}",
        l.name.get_ref(),
        l.address.get_ref(),
        l.protocol,
        l.tls.mode
    );
    if l.tls.mode != InboundMode::Off {
        s += &describe_inbound_tls(&l.tls);
    }
    if *l.proxy_protocol.get_ref() {
        let from: Vec<String> = l
            .proxy_protocol_from
            .iter()
            .map(ToString::to_string)
            .collect();
        s += &format!(
            ", behind a PROXY protocol balancer at {} (clients are who its header names; connections from elsewhere are closed)",
            from.join(", ")
        );
    }
    for route in &l.routes {
        let names = if route.sni.is_empty() {
            "any name".to_string()
        } else {
            route.sni.join(" | ")
        };
        let alpn = if route.alpn.is_empty() {
            String::new()
        } else {
            format!(" offering ALPN {}", route.alpn.join(" | "))
        };
        s += &format!(
            "; SNI {names}{alpn} -> upstream {} ({})",
            route.upstream.get_ref(),
            if route.passthrough {
                "TLS passed through untouched"
            } else {
                "TLS terminated here"
            }
        );
    }
    s += &describe_access(&l.access);
    match (up, l.protocol) {
        (Some(up), _) => {
            s += &format!(" -> upstream {}", up.name.get_ref());
            if !l.routes.is_empty() {
                s += " otherwise";
            }
            if let Some(version) = up.send_proxy_protocol {
                s += &format!(", PROXY protocol {version} header sent");
            }
            s
        }
        (None, Protocol::Tcp) => format!("{s}; no route for other names: refused"),
        (None, Protocol::Smtp) => format!(
            "{s} -> outbound connectors by recipient domain; limits: messages of {} bytes, {} recipients per transaction, lines of {} octets",
            l.max_message_size,
            tlsrelay_core::smtp::forward::MAX_RECIPIENTS,
            tlsrelay_core::smtp::codec::MAX_TEXT_LINE
        ),
    }
}

/// A TLS listener's minimum version, certificates, tickets and client
/// certificates, for [`describe_listener`].
fn describe_inbound_tls(tls: &tlsrelay_core::config::InboundTls) -> String {
    let mut s = String::new();
    s += &format!(", minimum {}", tls.min_version);
    if tls.certificates.is_empty() {
        s += ", self-signed certificate from the state directory";
    } else {
        let chains: Vec<String> = tls
            .certificates
            .iter()
            .map(|c| c.chain.get_ref().display().to_string())
            .collect();
        s += &format!(", certificates {} (by SNI)", chains.join(", "));
    }
    if let Some(keys) = &tls.ticket_keys {
        s += &format!(
            ", session tickets from the fleet's keys in {} (each valid {:?})",
            keys.get_ref().display(),
            tls.ticket_key_lifetime
        );
    }
    if let Some(auth) = &tls.client_auth {
        let names: Vec<String> = auth.names.iter().map(ToString::to_string).collect();
        s += &format!(
            ", client certificate {} from {} named {}",
            auth.mode,
            auth.trust_anchors.get_ref().display(),
            if names.is_empty() {
                "anything".to_string()
            } else {
                names.join(" | ")
            }
        );
    }
    s
}

/// A listener's access lists and rate, for [`describe_listener`] (empty
/// when it has none).
fn describe_access(access: &tlsrelay_core::config::Access) -> String {
    let mut s = String::new();
    if access.allow.is_empty() && access.deny.is_empty() && access.rate.is_none() {
        return s;
    }
    let list = |v: &[tlsrelay_core::smtp::address::Cidr]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    s += "; clients";
    if !access.allow.is_empty() {
        s += &format!(" from {} only", list(&access.allow));
    }
    if !access.deny.is_empty() {
        s += &format!(", never from {}", list(&access.deny));
    }
    if let Some(rate) = access.rate {
        s += &format!(
            ", at most {rate} new connections per second per address (bursts of {})",
            ClientAccess::burst_of(access)
        );
    }
    s
}

fn describe_inbound_connector(c: &tlsrelay_core::config::InboundConnector) -> String {
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "any".to_string()
        } else {
            v.join(", ")
        }
    };
    format!(
        "inbound connector {}: clients {}, certificate names {}, TLS {}, client certificate {}, sender domains {}, relay to any domain {}",
        c.name.get_ref(),
        list(c.client_addresses.iter().map(ToString::to_string).collect()),
        list(c.certificate_names.iter().map(ToString::to_string).collect()),
        c.tls,
        c.client_certificate,
        list(c.sender_domains.iter().map(|d| d.get_ref().to_string()).collect()),
        if c.rules().allow_relay { "yes" } else { "no" },
    )
}

fn describe_outbound_connector(c: &MailConnector, domains: &[DomainPattern]) -> String {
    let domains: Vec<String> = domains.iter().map(ToString::to_string).collect();
    let next_hops = match &c.hops {
        NextHops::Fixed(hops) => hops,
        NextHops::Mx(route) => {
            return format!(
                "outbound connector {}: recipients {} via each domain's MX hosts on port {} (null MX 556 5.1.10, NXDOMAIN 550 5.1.2, DNS failure 451 4.4.3): {}",
                c.name,
                domains.join(", "),
                route.port,
                route.describe(c.policy)
            )
        }
    };
    let hops: Vec<String> = next_hops.iter().map(|h| h.address.to_string()).collect();
    let mut s = format!(
        "outbound connector {}: recipients {} via {}: TLS {}",
        c.name,
        domains.join(", "),
        hops.join(", then "),
        c.policy
    );
    let mut described: Option<&str> = None;
    for hop in next_hops {
        let Some(tls) = &hop.tls else { continue };
        match described {
            None => s += tls.description(),
            Some(first) if first != tls.description() => {
                s += &format!("; {}{}", hop.address, tls.description());
            }
            Some(_) => {}
        }
        described.get_or_insert(tls.description());
    }
    if c.policy == OutboundPolicy::Required {
        s += ", 451 4.7.5 when TLS cannot be had";
    }
    s
}

/// What bounds a client: what a stranger can hold and for how long.
fn describe_limits(config: &Config) -> String {
    let l = &config.limits;
    let mut s = format!(
        "limits: {} connections in all, {} per client address (IPv6: per /64), 421 past either on SMTP listeners; TLS handshake (and a TCP client's first byte) within {:?}; upstreams connected within {:?}; TCP sessions idle for {:?} closed",
        l.max_connections.get_ref(),
        l.max_connections_per_client.get_ref(),
        l.handshake_timeout,
        l.connect_timeout,
        l.idle_timeout,
    );
    if config
        .listeners
        .iter()
        .any(|l| l.protocol == Protocol::Smtp)
    {
        let command = std::time::Duration::from_secs_f64(300.0 * l.smtp_timeout_scale);
        s += &format!(
            "; SMTP clients: {command:?} of waiting per command (in all, not per read), message data at {} bytes/s or faster past that, replies read within {command:?}, 421 after {} errors, and past {} commands that move no mail (NOOP, RSET, VRFY, HELP, EHLO) since the last message each counts as an error",
            tlsrelay_core::smtp::clock::MIN_DATA_RATE,
            tlsrelay_core::smtp::server::MAX_ERRORS,
            tlsrelay_core::smtp::server::MAX_JUNK_COMMANDS,
        );
    }
    s
}

/// What the data plane will do on this machine: the kTLS probe's result and
/// the splice engine.
fn describe_dataplane(config: &Config) -> String {
    let ktls = if config.dataplane.ktls {
        tlsrelay_sys::ktls::probe().summary()
    } else {
        "kernel TLS disabled (dataplane.ktls = false); TLS legs use userspace rustls".to_string()
    };
    let engine = match (config.dataplane.pump, crate::pump::io_uring_available()) {
        (SpliceEngine::IoUring, Ok(())) => {
            format!(
                "splice via io_uring, {} workers (dataplane.pump = \"epoll\" for the other)",
                config.dataplane.workers()
            )
        }
        (SpliceEngine::IoUring, Err(e)) => format!("splice via epoll (io_uring unavailable: {e})"),
        (SpliceEngine::Epoll, _) => "splice via epoll (dataplane.pump = \"epoll\")".to_string(),
    };
    format!("data plane: {ktls}; {engine}")
}

fn describe_route(route: &RoutePlan, up: Option<&Upstream>) -> String {
    let pool = &route.pool;
    let servers: Vec<String> = pool
        .view()
        .servers
        .iter()
        .map(|s| {
            let mut text = s.address.clone();
            if s.weight != 1 {
                text += &format!(" weight {}", s.weight);
            }
            if s.backup {
                text += " (backup)";
            }
            text
        })
        .collect();
    let mut s = match servers.len() {
        1 => format!("upstream {} at {}", route.name, servers[0]),
        _ => format!(
            "upstream {}: servers {}, balance {}",
            route.name,
            servers.join(", "),
            pool.balance()
        ),
    };
    let pooled = servers.len() > 1 || up.is_some_and(|u| u.check.is_some());
    if let Some(up) = up.filter(|_| pooled) {
        match &up.check {
            Some(c) => {
                s += &format!(
                    "; checked every {:?}{}{} (up after {} good, down after {} failed)",
                    c.interval,
                    if c.tls {
                        " with a TLS handshake"
                    } else {
                        " by connecting"
                    },
                    c.expect
                        .as_ref()
                        .map_or(String::new(), |e| format!(", expecting {e:?}")),
                    c.rise,
                    c.fall
                )
            }
            None => s += "; no active checks",
        }
        if up.eject_after > 0 {
            s += &format!(
                "; a server is ejected after {} failed connects{}",
                up.eject_after,
                if up.check.is_none() {
                    format!(" for {:?}", up.eject_time)
                } else {
                    String::new()
                }
            );
        }
        if servers.len() > 1 {
            s += "; a session whose connect fails moves to the next server";
        }
    }
    s += &format!(": outbound TLS {}", route.policy);
    if let Some(tls) = route.servers.iter().flatten().next() {
        s += tls.description();
        if route.policy == OutboundPolicy::Opportunistic {
            s += ", falls back to plaintext when TLS fails";
        }
    }
    s
}
