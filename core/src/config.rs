//! TOML configuration: parsed with serde, then validated, with every error
//! naming the file, the line and the field so an operator can fix it at once.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{
    InboundMode, KeyExchange, MinVersion, NamePattern, OutboundPolicy, Verification,
};
use crate::smtp::address::DomainPattern;
use crate::upstream::HostPort;

/// The configuration `tlsrelay run` uses when given no file: two loopback
/// listeners in front of a local upstream, one opportunistic, one required.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// The name errors in [`EMBEDDED_DEFAULT`] are reported under.
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded default>";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// A problem located in the file: `file:line: field: message`.
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        field: String,
        message: String,
    },
}

/// Where a config came from, so that later checks (certificate files,
/// cross-references) can point back into it.
#[derive(Clone, Debug)]
pub struct Source {
    pub name: String,
    pub dir: PathBuf,
    text: String,
}

impl Source {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// An error at `span` for `field`.
    pub fn error(
        &self,
        span: Range<usize>,
        field: impl Into<String>,
        message: impl fmt::Display,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.name.clone(),
            line: self.line_of(span.start),
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// Resolves a path from the config relative to the config's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.dir.join(path)
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where generated material is kept: the self-signed certificate,
    /// TLS report results, cached MTA-STS policies, the status socket.
    pub state_dir: Option<PathBuf>,
    /// Run as this user (and its group) once the listeners are bound and
    /// the eBPF program attached; the relay must be started as root. The
    /// state directory is handed to it; the configuration and keys must
    /// be readable by it for reloads.
    #[schemars(with = "Option<String>")]
    pub user: Option<Spanned<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub dataplane: Dataplane,
    #[serde(default)]
    pub ebpf: Ebpf,
    /// Prometheus exposition (`/metrics`), off unless an address is given.
    #[serde(default)]
    pub metrics: MetricsEndpoint,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// The organisation's own mail domains (`example.org`, `.example.org`
    /// for its subdomains): mail for them is accepted from any client,
    /// subject to the inbound connectors. Other domains only from clients
    /// an inbound connector with `allow_relay` admits.
    #[serde(default)]
    #[schemars(with = "Vec<DomainPattern>")]
    pub accepted_domains: Vec<Spanned<DomainPattern>>,
    /// Lets `check` pass a configuration that relays for anyone (a lab).
    #[serde(default)]
    pub open_relay: bool,
    #[serde(default)]
    pub inbound_connectors: Vec<InboundConnector>,
    #[serde(default)]
    pub outbound_connectors: Vec<OutboundConnector>,
    /// The resolver for delivery by MX.
    #[serde(default)]
    pub dns: Dns,
    /// Who the TLS reports (RFC 8460) sent for MX delivery are from.
    #[serde(default)]
    pub tlsrpt: TlsRpt,
    #[serde(skip, default = "Config::no_source")]
    pub source: Source,
}

/// What one relay, and one client of it, may hold, and for how long.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent client connections across all listeners; more are closed.
    #[schemars(with = "usize")]
    pub max_connections: Spanned<usize>,
    /// Concurrent connections from one client address (IPv6: one /64), so
    /// that one stranger cannot take every slot; more are closed (SMTP
    /// listeners answer 421 first). Behind a PROXY protocol balancer, the
    /// address its header names.
    #[schemars(with = "usize")]
    pub max_connections_per_client: Spanned<usize>,
    /// A client's first byte, and each TLS handshake (inbound and outbound),
    /// must come within this.
    #[serde(with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub handshake_timeout: Duration,
    /// A TCP connect to an upstream server or a next hop must complete within
    /// this; then the next server or next hop is tried.
    #[serde(with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub connect_timeout: Duration,
    /// A session with no bytes moving either way for this long is closed.
    #[serde(with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub idle_timeout: Duration,
    /// SMTP timeouts are RFC 5321 4.5.3.2's (5 min per command, 10 min for
    /// the end of data, ...) times this.
    pub smtp_timeout_scale: f64,
    /// On SIGTERM: how long sessions under way may finish before SMTP
    /// clients get 421 4.3.2 and the relay exits.
    #[serde(with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: Spanned::new(0..0, 10_000),
            max_connections_per_client: Spanned::new(0..0, 100),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            smtp_timeout_scale: 1.0,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// How relayed bytes move: kernel TLS, and the splice pump.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Dataplane {
    /// Hand TLS legs to kernel TLS when the kernel supports them (the
    /// benchmark turns it off to compare with userspace rustls).
    pub ktls: bool,
    /// What drives splicing: `io-uring` (falls back to epoll, saying why,
    /// where io_uring is unavailable) or `epoll`.
    pub pump: SpliceEngine,
    /// io_uring worker threads, one ring each; unset: one per core. Read
    /// at start (a reload does not change it).
    #[schemars(with = "Option<usize>")]
    pub workers: Option<Spanned<usize>>,
}

impl Default for Dataplane {
    fn default() -> Self {
        Dataplane {
            ktls: true,
            pump: SpliceEngine::IoUring,
            workers: None,
        }
    }
}

impl Dataplane {
    /// How many io_uring workers to run.
    pub fn workers(&self) -> usize {
        self.workers.as_ref().map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |w| *w.get_ref(),
        )
    }
}

/// Where Prometheus scrapes `/metrics`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsEndpoint {
    /// Bind it to loopback or a management address, not where strangers
    /// reach it.
    #[serde(deserialize_with = "optional_socket_addr")]
    #[schemars(with = "Option<crate::schema::SocketAddrText>")]
    pub address: Option<SocketAddr>,
    /// Only scrapers from these networks are served (default: anyone who
    /// reaches the address); others are closed before a byte is read.
    pub allow_from: Vec<crate::smtp::address::Cidr>,
}

fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    socket_addr(d).map(Some)
}

/// The eBPF wire counters.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Ebpf {
    /// Load them when privileges allow (root, or CAP_BPF + CAP_NET_ADMIN).
    pub enabled: bool,
    /// Where the maps are pinned (bpffs is mounted on /sys/fs/bpf if absent).
    pub pin_dir: PathBuf,
    /// `child` (a child of the relay's cgroup, which it moves into), `own`
    /// (the relay's cgroup as it is, e.g. a systemd service's), or a path.
    pub cgroup: String,
}

impl Default for Ebpf {
    fn default() -> Self {
        Ebpf {
            enabled: true,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            cgroup: "child".into(),
        }
    }
}

impl Ebpf {
    pub fn settings(&self) -> WireSettings {
        WireSettings {
            pin_dir: self.pin_dir.clone(),
            cgroup: match self.cgroup.as_str() {
                "child" => CgroupChoice::Child,
                "own" => CgroupChoice::Own,
                path => CgroupChoice::Path(PathBuf::from(path)),
            },
            smtp_ports: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Smtp,
}
keywords!(Protocol, "protocol", { Tcp => "tcp", Smtp => "smtp" });

/// An address the relay accepts connections on, and what it does with them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Names the listener in reports, logs and metrics; unique.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Where it listens.
    #[serde(deserialize_with = "spanned_socket_addr")]
    #[schemars(with = "crate::schema::SocketAddrText")]
    pub address: Spanned<SocketAddr>,
    /// `tcp` relays a byte stream to an upstream; `smtp` is a mail edge
    /// relaying each transaction through the outbound connectors.
    #[serde(default = "default_protocol")]
    #[schemars(with = "crate::schema::SocketAddrText")]
    pub protocol: Protocol,
    /// Name of the upstream route sessions are relayed to (tcp; smtp
    /// listeners route by recipient through the outbound connectors).
    #[schemars(with = "Option<String>")]
    pub upstream: Option<Spanned<String>>,
    /// TLS toward clients: mode, certificates, client certificates.
    #[serde(default)]
    pub tls: InboundTls,
    /// smtp (required): the name in the greeting, EHLO and the Received
    /// line the relay adds. Required so that an internal host name never
    /// reaches the Internet by default.
    pub hostname: Option<String>,
    /// smtp: the SIZE limit advertised and enforced, on MAIL's SIZE and
    /// on the bytes of the message.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// smtp: a message carrying more `Received:` fields than this is a
    /// mail loop, refused with 554 5.4.6 (Postfix's `hopcount_limit`).
    #[serde(default = "default_max_hops")]
    pub max_hops: u32,
    /// Behind an L4 balancer: every connection starts with a PROXY
    /// protocol header (v1 or v2) naming the real client, and one without
    /// is refused. Needs `proxy_protocol_from`.
    #[serde(default = "spanned_false")]
    #[schemars(with = "bool")]
    pub proxy_protocol: Spanned<bool>,
    /// The balancers' addresses: only connections from these may send a
    /// PROXY protocol header; any other is closed before a byte of it is
    /// read (nginx's `set_real_ip_from`).
    #[serde(default)]
    pub proxy_protocol_from: Vec<crate::smtp::address::Cidr>,
    /// tcp: routes by the name (SNI) and protocols (ALPN) a TLS client
    /// asks for, first match wins; `upstream` takes the rest.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Who may connect, and how fast, decided before a byte is read.
    #[serde(default)]
    pub access: Access,
}

/// Where a listener sends sessions whose ClientHello matches.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Server names (`api.example.com`, `*.example.com`: one label or
    /// more below it); empty: any name, or none.
    #[serde(default)]
    pub sni: Vec<String>,
    /// ALPN protocols (`h2`, `http/1.1`): the client must offer one;
    /// empty: any.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// The upstream pool a matching session goes to.
    #[schemars(with = "String")]
    pub upstream: Spanned<String>,
    /// Pass TLS through untouched: the ClientHello is read (never past
    /// it), replayed to the chosen server, and the session is spliced as
    /// opaque bytes; the server terminates TLS. Otherwise the relay
    /// terminates TLS with its certificates, as without routes.
    #[serde(default)]
    pub passthrough: bool,
}

/// A listener's client access list and new-connection rate.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Only these networks may connect (empty: any).
    #[serde(default)]
    pub allow: Vec<crate::smtp::address::Cidr>,
    /// These may not, whatever `allow` says.
    #[serde(default)]
    pub deny: Vec<crate::smtp::address::Cidr>,
    /// New connections per second from one client address (IPv6: one
    /// /64), with bursts of `burst`; more are closed at accept.
    pub rate: Option<f64>,
    /// New connections one client address may make at once before `rate`
    /// applies (default: a second's worth of `rate`).
    pub burst: Option<u32>,
}

fn default_max_message_size() -> u64 {
    50 * 1024 * 1024
}

fn spanned_false() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

fn default_max_hops() -> u32 {
    crate::smtp::trace::DEFAULT_MAX_HOPS
}

fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid address '{text}', expected ip:port or [ipv6]:port"
        ))
    })
}

fn spanned_socket_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Spanned<SocketAddr>, D::Error> {
    let text = Spanned::<String>::deserialize(d)?;
    let span = text.span();
    let address = text.get_ref().parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid address '{}', expected ip:port or [ipv6]:port",
            text.get_ref()
        ))
    })?;
    Ok(Spanned::new(span, address))
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InboundTls {
    /// `off`, `opportunistic` (TLS when the client starts it; SMTP: STARTTLS
    /// offered), `required` (plaintext refused), `implicit` (TLS from the
    /// first byte).
    #[serde(default = "default_inbound_mode")]
    pub mode: InboundMode,
    /// The lowest TLS version accepted from clients.
    #[serde(default)]
    pub min_version: MinVersion,
    /// Key exchange groups accepted (default: X25519MLKEM768, X25519,
    /// secp256r1, secp384r1).
    #[schemars(with = "Option<Vec<KeyExchange>>")]
    pub groups: Option<Spanned<Vec<KeyExchange>>>,
    /// Chains offered by SNI; empty means the generated self-signed one.
    #[serde(default)]
    pub certificates: Vec<CertificateFiles>,
    /// Client certificates: asked for and checked.
    pub client_auth: Option<ClientAuth>,
    /// Session-ticket keys shared by a fleet (`tlsrelay tickets new`
    /// makes and rotates the file; a change is picked up without a
    /// restart); default: the process's own random keys.
    #[schemars(with = "Option<PathBuf>")]
    pub ticket_keys: Option<Spanned<PathBuf>>,
    /// How long a key of `ticket_keys` seals and opens tickets after it
    /// was made (rotate more often than this).
    #[serde(default = "default_ticket_key_lifetime", with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub ticket_key_lifetime: Duration,
}

fn default_ticket_key_lifetime() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_inbound_mode() -> InboundMode {
    InboundMode::Opportunistic
}

impl Default for InboundTls {
    fn default() -> Self {
        InboundTls {
            mode: default_inbound_mode(),
            min_version: MinVersion::default(),
            groups: None,
            certificates: Vec::new(),
            client_auth: None,
            ticket_keys: None,
            ticket_key_lifetime: default_ticket_key_lifetime(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM: the end-entity certificate first, then intermediates.
    #[schemars(with = "PathBuf")]
    pub chain: Spanned<PathBuf>,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    #[schemars(with = "PathBuf")]
    pub key: Spanned<PathBuf>,
    /// Served to clients whose SNI matches no certificate (default: the first).
    #[serde(default)]
    pub default: bool,
    /// DER: an OCSP response for the certificate, stapled to handshakes;
    /// refused unless it is for this certificate, "good" and current.
    #[schemars(with = "Option<PathBuf>")]
    pub ocsp_response: Option<Spanned<PathBuf>>,
}

/// An inbound SMTP connector: rules for sessions from a partner or an
/// on-premises server, matched by client address and/or certificate name.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InboundConnector {
    /// Names the connector in replies, reports and logs; unique.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Sessions from these addresses are this connector's.
    #[serde(default)]
    pub client_addresses: Vec<crate::smtp::address::Cidr>,
    /// Sessions whose client certificate, chained to `trust_anchors`, has
    /// one of these names are this connector's.
    #[serde(default)]
    pub certificate_names: Vec<NamePattern>,
    /// Mail claiming these sender domains must come through this connector
    /// (meeting every condition it sets).
    #[serde(default)]
    #[schemars(with = "Vec<DomainPattern>")]
    pub sender_domains: Vec<Spanned<DomainPattern>>,
    /// `required`: the connector's sessions must have run STARTTLS before
    /// MAIL, or `451 4.7.1`; `opportunistic`: either.
    #[serde(default = "default_connector_tls")]
    pub tls: ConnectorTls,
    /// `none`, `requested` (checked if sent) or `required` (its sessions
    /// must present one chaining to `trust_anchors`).
    #[serde(default = "default_client_certificate")]
    pub client_certificate: crate::smtp::admission::ClientCertificate,
    /// PEM file of the CAs client certificates must chain to.
    #[schemars(with = "Option<PathBuf>")]
    pub trust_anchors: Option<Spanned<PathBuf>>,
    /// Sessions this connector claims, meeting every condition, may send
    /// to any domain (on-premises servers, partners that relay through us).
    #[schemars(with = "Option<bool>")]
    pub allow_relay: Option<Spanned<bool>>,
}

impl InboundConnector {
    /// The connector as the admission rules use it.
    pub fn rules(&self) -> crate::smtp::admission::InboundConnector {
        crate::smtp::admission::InboundConnector {
            name: self.name.get_ref().clone(),
            client_addresses: self.client_addresses.clone(),
            certificate_names: self.certificate_names.clone(),
            sender_domains: self
                .sender_domains
                .iter()
                .map(|d| d.get_ref().clone())
                .collect(),
            tls_required: self.tls == ConnectorTls::Required,
            client_certificate: self.client_certificate,
            allow_relay: self.allow_relay.as_ref().is_some_and(|r| *r.get_ref()),
        }
    }
}

fn default_connector_tls() -> ConnectorTls {
    ConnectorTls::Opportunistic
}

fn default_client_certificate() -> crate::smtp::admission::ClientCertificate {
    crate::smtp::admission::ClientCertificate::None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectorTls {
    Opportunistic,
    Required,
}
keywords!(ConnectorTls, "connector TLS", {
    Opportunistic => "opportunistic",
    Required => "required",
});

/// An outbound SMTP connector: recipient domains, next hops, TLS policy.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboundConnector {
    /// Names the connector in replies, reports, logs and metrics; unique.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// `partner.example`, `.partner.example` (subdomains) or `*` (default).
    pub recipient_domains: Vec<DomainPattern>,
    /// Tried in order; or `"mx"` (`"mx:PORT"`) alone: each recipient
    /// domain's MX hosts.
    #[schemars(with = "Vec<NextHop>")]
    pub next_hops: Vec<Spanned<NextHop>>,
    /// TLS toward the next hop (STARTTLS): policy, verification, names.
    #[serde(default)]
    pub tls: OutboundTls,
    /// DANE (RFC 7672) for MX delivery: `on` (default: verify by TLSA
    /// where the domain publishes it, else the policy above), `only`
    /// (defer unless DANE TLSA exist) or `off`.
    #[schemars(with = "Option<DaneMode>")]
    pub dane: Option<Spanned<DaneMode>>,
    /// MTA-STS (RFC 8461) for MX delivery: honour the policies domains
    /// publish (default true).
    #[schemars(with = "Option<bool>")]
    pub mta_sts: Option<Spanned<bool>>,
    /// MX delivery never connects to loopback or to `dns.private_networks`
    /// (a domain whose MX points inside would reach internal services):
    /// these networks are allowed all the same (an internal MX, a lab).
    /// The relay's own listeners stay refused: that is a mail loop.
    #[serde(default)]
    #[schemars(with = "Vec<crate::smtp::address::Cidr>")]
    pub allow_private_mx: Vec<Spanned<crate::smtp::address::Cidr>>,
    /// How long a next-hop connection a session leaves clean waits idle
    /// for the next session to the same destination (Postfix's
    /// `smtp_connection_cache_time_limit`, default 2 s); "0s": no reuse.
    #[serde(
        with = "duration",
        default = "OutboundConnector::connection_cache_time"
    )]
    #[schemars(with = "crate::schema::DurationText")]
    pub connection_cache_time: Duration,
}

impl OutboundConnector {
    fn connection_cache_time() -> Duration {
        Duration::from_secs(2)
    }

    /// The MX port when the connector delivers by DNS.
    pub fn mx_port(&self) -> Option<u16> {
        match self.next_hops.first().map(Spanned::get_ref) {
            Some(NextHop::Mx { port }) => Some(*port),
            _ => None,
        }
    }

    /// DANE in force: `on` for MX delivery unless set; never without MX
    /// delivery or without TLS (policy plain).
    pub fn dane_mode(&self) -> DaneMode {
        match (&self.dane, self.mx_port()) {
            (_, None) => DaneMode::Off,
            _ if self.tls.policy == OutboundPolicy::Plain => DaneMode::Off,
            (Some(mode), _) => *mode.get_ref(),
            (None, _) => DaneMode::On,
        }
    }

    /// Whether MTA-STS policies are honoured: for MX delivery unless off.
    pub fn honours_mta_sts(&self) -> bool {
        self.mx_port().is_some() && self.mta_sts.as_ref().is_none_or(|on| *on.get_ref())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaneMode {
    Off,
    On,
    Only,
}
keywords!(DaneMode, "DANE mode", {
    Off => "off",
    On => "on",
    Only => "only",
});

/// Where an outbound connector sends: a fixed `host:port`, or each
/// recipient domain's MX hosts on `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    Fixed(HostPort),
    Mx { port: u16 },
}

impl std::str::FromStr for NextHop {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("mx") {
            Some("") => Ok(NextHop::Mx { port: 25 }),
            Some(port) if port.starts_with(':') => match port[1..].parse() {
                Ok(port) if port != 0 => Ok(NextHop::Mx { port }),
                _ => Err(format!("invalid MX port in '{s}'")),
            },
            _ => s.parse().map(NextHop::Fixed),
        }
    }
}

string_schema!(
    NextHop,
    "NextHop",
    "A next hop: \"host:port\" (a fixed host), or \"mx\" / \"mx:PORT\" (each recipient domain's MX hosts)."
);

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::Fixed(address) => address.fmt(f),
            NextHop::Mx { port: 25 } => f.write_str("mx"),
            NextHop::Mx { port } => write!(f, "mx:{port}"),
        }
    }
}

/// The sender of TLS reports.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsRpt {
    /// `organization-name`; default this machine's host name.
    pub organization: Option<String>,
    /// `contact-info`; default `postmaster@` the organization.
    pub contact: Option<String>,
}

/// The resolver MX delivery, DANE and MTA-STS use (validating), and the
/// one upstream server names use (cached by TTL, not validating).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Name servers (`ip:port`); default those in /etc/resolv.conf.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// DNSSEC trust anchors: a file of DNSKEY records; default the IANA
    /// root keys.
    #[schemars(with = "Option<PathBuf>")]
    pub trust_anchors: Option<Spanned<PathBuf>>,
    /// Networks MX delivery does not connect to unless a connector's
    /// `allow_private_mx` says so (besides loopback, always refused);
    /// default: RFC 1918, shared (100.64/10), link-local, this-network
    /// (0/8), unique-local and link-local IPv6.
    pub private_networks: Option<Vec<crate::smtp::address::Cidr>>,
}

/// [`Dns::private_networks`] unless configured.
pub const DEFAULT_PRIVATE_NETWORKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "fe80::/10",
];

impl Dns {
    /// The private networks in force.
    pub fn private_networks(&self) -> Vec<crate::smtp::address::Cidr> {
        self.private_networks.clone().unwrap_or_else(|| {
            DEFAULT_PRIVATE_NETWORKS
                .iter()
                .map(|n| n.parse().expect("valid built-in network"))
                .collect()
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuthMode {
    Optional,
    Required,
}
keywords!(ClientAuthMode, "client certificate mode", {
    Optional => "optional",
    Required => "required",
});

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// `optional` (checked when sent) or `required` (the handshake fails
    /// without one).
    pub mode: ClientAuthMode,
    /// PEM file of the CAs client certificates must chain to.
    #[schemars(with = "PathBuf")]
    pub trust_anchors: Spanned<PathBuf>,
    /// Accepted certificate names; empty accepts any name the CAs vouch for.
    #[serde(default)]
    pub names: Vec<NamePattern>,
}

/// A pool of servers a TCP listener relays to.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Names the upstream; listeners and routes refer to it; unique.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// One server: `host:port`; the host may be a name or an IP address
    /// (`[v6]:port`). Or `servers` for a pool.
    #[schemars(with = "Option<HostPort>")]
    pub address: Option<Spanned<HostPort>>,
    /// A pool: `"host:port"` or `{ address = "host:port", weight = 3,
    /// backup = true }` each, tried in the order `balance` says; a
    /// session whose connect is refused, reset or times out moves to the
    /// next before a byte reached its client.
    #[serde(default)]
    #[schemars(with = "Vec<ServerEntry>")]
    pub servers: Vec<Spanned<ServerEntry>>,
    /// `round-robin` (weighted, the default), `least-connections`,
    /// `first`, `hash-client` or `hash-sni` (sticky, consistent).
    #[serde(default = "default_balance")]
    pub balance: crate::upstream::Balance,
    /// Active health checks; without them a server ejected after
    /// `eject_after` failed connects is tried again after `eject_time`.
    pub check: Option<HealthCheck>,
    /// Consecutive failed connects of real sessions that eject a server
    /// (0: never).
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// Without active checks: how long an ejected server is left alone
    /// before it is tried again.
    #[serde(default = "default_eject_time", with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub eject_time: Duration,
    /// TLS toward the servers: policy, verification, names.
    #[serde(default)]
    pub tls: OutboundTls,
    /// Start each upstream connection with a PROXY protocol header (`v1`
    /// or `v2`) naming the client and the address it reached.
    pub send_proxy_protocol: Option<crate::proxy::ProxyVersion>,
}

/// A pool's server: its address, or the address with a weight and a
/// backup flag.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ServerEntry {
    Address(HostPort),
    Detailed {
        /// The server's host and port.
        address: HostPort,
        /// Its share of sessions against the others' weights.
        #[serde(default = "default_weight")]
        weight: u32,
        /// Used only while no other server is up.
        #[serde(default)]
        backup: bool,
    },
}

impl ServerEntry {
    pub fn spec(&self) -> crate::upstream::ServerSpec {
        match self {
            ServerEntry::Address(address) => crate::upstream::ServerSpec {
                address: address.clone(),
                weight: 1,
                backup: false,
            },
            ServerEntry::Detailed {
                address,
                weight,
                backup,
            } => crate::upstream::ServerSpec {
                address: address.clone(),
                weight: *weight,
                backup: *backup,
            },
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn default_balance() -> crate::upstream::Balance {
    crate::upstream::Balance::RoundRobin
}

fn default_eject_after() -> u32 {
    3
}

fn default_eject_time() -> Duration {
    Duration::from_secs(10)
}

/// An active health check of each server of a pool.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Between checks of one server (each jittered by up to a tenth).
    #[serde(default = "default_check_interval", with = "duration")]
    #[schemars(with = "crate::schema::DurationText")]
    pub interval: Duration,
    /// For one check (connect, handshake, send, expect); default the
    /// connect timeout.
    #[serde(default, with = "optional_duration")]
    #[schemars(with = "Option<crate::schema::DurationText>")]
    pub timeout: Option<Duration>,
    /// Consecutive passed checks that bring a down server back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failed checks that take a server down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Also run the TLS handshake the upstream's `tls` section sets up,
    /// with its verification (policy opportunistic or required).
    #[serde(default)]
    pub tls: bool,
    /// Sent after connecting (and the handshake); `\r\n` as written.
    pub send: Option<String>,
    /// What the server's first bytes must start with (e.g. `220` for an
    /// SMTP banner).
    pub expect: Option<String>,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_rise() -> u32 {
    2
}

fn default_fall() -> u32 {
    3
}

impl Upstream {
    /// Its servers, whether given as `address` or `servers`.
    pub fn server_specs(&self) -> Vec<crate::upstream::ServerSpec> {
        match &self.address {
            Some(address) => vec![crate::upstream::ServerSpec {
                address: address.get_ref().clone(),
                weight: 1,
                backup: false,
            }],
            None => self.servers.iter().map(|s| s.get_ref().spec()).collect(),
        }
    }

    /// Where errors about its servers point.
    pub fn servers_span(&self) -> Range<usize> {
        match (&self.address, self.servers.first()) {
            (Some(a), _) => a.span(),
            (None, Some(s)) => s.span(),
            (None, None) => self.name.span(),
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutboundTls {
    /// `plain` (never TLS), `opportunistic` (TLS when it works, else
    /// plaintext recorded as a downgrade), `required` (TLS with the
    /// verification enforced, or refused).
    #[serde(default = "default_outbound_policy")]
    pub policy: OutboundPolicy,
    /// Default: `encryption-only` when opportunistic, `name` when required.
    #[schemars(with = "Option<Verification>")]
    pub verify: Option<Spanned<Verification>>,
    /// Names accepted under `verify = "name"`; default the server name.
    #[serde(default)]
    pub names: Vec<NamePattern>,
    /// PEM file of trusted roots; default the system store.
    #[schemars(with = "Option<PathBuf>")]
    pub trust_anchors: Option<Spanned<PathBuf>>,
    /// Certificate revocation lists (PEM or DER files) the peer's chain is
    /// checked against under `verify = "certificate"` or `"name"`.
    #[serde(default)]
    #[schemars(with = "Vec<PathBuf>")]
    pub crls: Vec<Spanned<PathBuf>>,
    /// The lowest TLS version accepted from the peer.
    #[serde(default)]
    pub min_version: MinVersion,
    /// Key exchange groups offered, most preferred first (default:
    /// X25519MLKEM768, X25519, secp256r1, secp384r1).
    #[schemars(with = "Option<Vec<KeyExchange>>")]
    pub groups: Option<Spanned<Vec<KeyExchange>>>,
    /// SNI to send; default the upstream host when it is a name.
    pub server_name: Option<String>,
    /// A client certificate to present to the upstream.
    pub client_certificate: Option<CertificateFiles>,
}

impl Default for OutboundTls {
    fn default() -> Self {
        OutboundTls {
            policy: default_outbound_policy(),
            verify: None,
            names: Vec::new(),
            trust_anchors: None,
            crls: Vec::new(),
            min_version: MinVersion::default(),
            groups: None,
            server_name: None,
            client_certificate: None,
        }
    }
}

fn default_outbound_policy() -> OutboundPolicy {
    OutboundPolicy::Opportunistic
}

/// An empty key exchange list would fail every handshake.
fn no_empty_groups(
    src: &Source,
    groups: &Option<Spanned<Vec<KeyExchange>>>,
    field: &str,
) -> Result<(), ConfigError> {
    match groups {
        Some(g) if g.get_ref().is_empty() => Err(src.error(
            g.span(),
            field,
            "needs at least one key exchange group (X25519MLKEM768, X25519, secp256r1, secp384r1)",
        )),
        _ => Ok(()),
    }
}

impl OutboundTls {
    /// A verification level only means something when TLS is tried.
    fn check_verify(&self, src: &Source, field: &str) -> Result<(), ConfigError> {
        match &self.verify {
            Some(v) if self.policy == OutboundPolicy::Plain => Err(src.error(
                v.span(),
                field,
                "a verification level needs policy opportunistic or required, not plain",
            )),
            _ => Ok(()),
        }
    }

    /// The verification level in force, after defaults.
    pub fn verification(&self) -> Verification {
        self.verify
            .as_ref()
            .map(|v| *v.get_ref())
            .unwrap_or(match self.policy {
                OutboundPolicy::Required => Verification::Name,
                OutboundPolicy::Plain | OutboundPolicy::Opportunistic => {
                    Verification::EncryptionOnly
                }
            })
    }
}

macro_rules! deserialize_from_str {
    ($($ty:ty),+) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )+};
}
deserialize_from_str!(
    NextHop,
    crate::smtp::address::Cidr,
    crate::smtp::address::DomainPattern
);

/// A duration as the config writes it (`10s`, `500ms`, `5m`, `1h`) or a
/// number of seconds (`2`, `0.5`): for command-line options too.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(seconds) = text.trim().parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(Duration::from_secs_f64(seconds));
        }
    }
    duration::parse(text).ok_or_else(|| {
        format!("invalid duration '{text}', expected e.g. \"500ms\", \"10s\", \"5m\", \"1h\" or seconds")
    })
}

/// An optional duration, written as [`duration`]'s.
mod optional_duration {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// Durations as `"10s"`, `"500ms"`, `"5m"`, `"1h"` or a number of seconds.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Seconds(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid duration '{t}', expected e.g. \"500ms\", \"10s\", \"5m\", \"1h\""
                ))
            }),
        }
    }

    /// Written back the way an operator would write it (`"5m"`, `"500ms"`):
    /// how defaults appear in the configuration's schema.
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&text(*d))
    }

    pub fn text(d: Duration) -> String {
        let (ms, secs) = (d.as_millis(), d.as_secs());
        if d.subsec_millis() != 0 {
            format!("{ms}ms")
        } else if secs != 0 && secs % 3600 == 0 {
            format!("{}h", secs / 3600)
        } else if secs != 0 && secs % 60 == 0 {
            format!("{}m", secs / 60)
        } else {
            format!("{secs}s")
        }
    }

    pub fn parse(text: &str) -> Option<Duration> {
        let digits = text.trim().find(|c: char| !c.is_ascii_digit())?;
        let (n, unit) = text.trim().split_at(digits);
        let n: u64 = n.parse().ok()?;
        Some(match unit.trim() {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        })
    }
}

impl Config {
    fn no_source() -> Source {
        Source {
            name: String::new(),
            dir: PathBuf::new(),
            text: String::new(),
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &path.display().to_string(), dir)
    }

    /// The configuration's JSON Schema, from these types and their doc
    /// comments: what editors validate against and the reference is made of.
    pub fn schema() -> schemars::Schema {
        schemars::schema_for!(Config)
    }

    /// The embedded default; paths in it are relative to the working directory.
    pub fn embedded_default() -> Config {
        Self::parse(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_NAME, PathBuf::from("."))
            .expect("the embedded default config is valid")
    }

    /// Parses and validates `text`, reporting errors under the name `file`.
    pub fn parse(text: &str, file: &str, dir: PathBuf) -> Result<Config, ConfigError> {
        let source = Source {
            name: file.to_string(),
            dir,
            text: text.to_string(),
        };
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| source.error(e.span().unwrap_or(0..0), "(syntax)", e.message()))?;
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // Spanned<T> wraps values in a private field; keep it out of the path.
            let path = e.path().to_string();
            let field = path
                .split_once(".$__")
                .map_or(path.as_str(), |(head, _)| head)
                .to_string();
            let inner = e.into_inner();
            source.error(inner.span().unwrap_or(0..0), field, inner.message())
        })?;
        config.source = source;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: names unique, references resolve, settings
    /// that only make sense together.
    fn validate(&self) -> Result<(), ConfigError> {
        let src = &self.source;
        if self.listeners.is_empty() {
            return Err(src.error(0..0, "listeners", "no listeners configured"));
        }
        if let Some(w) = &self.dataplane.workers {
            if !(1..=1024).contains(w.get_ref()) {
                return Err(src.error(w.span(), "dataplane.workers", "must be between 1 and 1024"));
            }
        }
        for (limit, field) in [
            (&self.limits.max_connections, "limits.max_connections"),
            (
                &self.limits.max_connections_per_client,
                "limits.max_connections_per_client",
            ),
        ] {
            if *limit.get_ref() == 0 {
                return Err(src.error(limit.span(), field, "must be at least 1"));
            }
        }
        self.validate_routes()?;
        self.validate_listeners()?;
        self.validate_admission()
    }

    /// Upstreams and connectors: unique names, TLS settings that fit their
    /// policy, somewhere to send, anchors for client certificates.
    fn validate_routes(&self) -> Result<(), ConfigError> {
        let src = &self.source;
        let mut upstream_names = HashSet::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            if !upstream_names.insert(up.name.get_ref().as_str()) {
                return Err(src.error(
                    up.name.span(),
                    format!("upstreams[{i}].name"),
                    format!("duplicate upstream name '{}'", up.name.get_ref()),
                ));
            }
            up.tls
                .check_verify(src, &format!("upstreams[{i}].tls.verify"))?;
            no_empty_groups(src, &up.tls.groups, &format!("upstreams[{i}].tls.groups"))?;
            self.check_servers(i, up)?;
        }
        let mut connector_names = HashSet::new();
        for (i, c) in self.outbound_connectors.iter().enumerate() {
            if !connector_names.insert(c.name.get_ref().as_str()) {
                return Err(src.error(
                    c.name.span(),
                    format!("outbound_connectors[{i}].name"),
                    format!("duplicate connector name '{}'", c.name.get_ref()),
                ));
            }
            c.tls
                .check_verify(src, &format!("outbound_connectors[{i}].tls.verify"))?;
            no_empty_groups(
                src,
                &c.tls.groups,
                &format!("outbound_connectors[{i}].tls.groups"),
            )?;
            if c.next_hops.is_empty() || c.recipient_domains.is_empty() {
                return Err(src.error(
                    c.name.span(),
                    format!("outbound_connectors[{i}]"),
                    "needs recipient_domains and at least one next hop",
                ));
            }
            if c.mx_port().is_some() && c.next_hops.len() > 1 {
                return Err(src.error(
                    c.next_hops[1].span(),
                    format!("outbound_connectors[{i}].next_hops"),
                    "\"mx\" routes by DNS and stands alone; put fixed next hops in another connector",
                ));
            }
            self.check_mx_only(i, c)?;
        }
        for (i, c) in self.inbound_connectors.iter().enumerate() {
            let wants_cert = c.client_certificate
                != crate::smtp::admission::ClientCertificate::None
                || !c.certificate_names.is_empty();
            if wants_cert && c.trust_anchors.is_none() {
                return Err(src.error(
                    c.name.span(),
                    format!("inbound_connectors[{i}].trust_anchors"),
                    "client certificates need trust_anchors",
                ));
            }
        }
        Ok(())
    }

    /// Settings that only MX delivery uses are refused on a connector with
    /// fixed next hops, where they would silently do nothing.
    fn check_mx_only(&self, i: usize, c: &OutboundConnector) -> Result<(), ConfigError> {
        let src = &self.source;
        if c.mx_port().is_some() {
            return Ok(());
        }
        if let Some(sts) = &c.mta_sts {
            return Err(src.error(
                sts.span(),
                format!("outbound_connectors[{i}].mta_sts"),
                "MTA-STS needs next_hops = [\"mx\"]: policies list a domain's MX hosts",
            ));
        }
        if let Some(allowed) = c.allow_private_mx.first() {
            return Err(src.error(
                allowed.span(),
                format!("outbound_connectors[{i}].allow_private_mx"),
                "only MX delivery (next_hops = [\"mx\"]) is kept from private networks; fixed next hops go where they say",
            ));
        }
        if let Some(dane) = &c.dane {
            return Err(src.error(
                dane.span(),
                format!("outbound_connectors[{i}].dane"),
                "DANE needs next_hops = [\"mx\"]: TLSA records are looked up for MX hosts",
            ));
        }
        Ok(())
    }

    /// An upstream has servers (`address` or `servers`, not both), with
    /// usable weights, and health checks that can run.
    fn check_servers(&self, i: usize, up: &Upstream) -> Result<(), ConfigError> {
        let src = &self.source;
        let field = |f: &str| format!("upstreams[{i}].{f}");
        match (&up.address, up.servers.is_empty()) {
            (Some(a), false) => {
                return Err(src.error(
                    a.span(),
                    field("address"),
                    "give address (one server) or servers (a pool), not both",
                ))
            }
            (None, true) => {
                return Err(src.error(
                    up.name.span(),
                    format!("upstreams[{i}]"),
                    "needs address = \"host:port\" or servers = [...]",
                ))
            }
            _ => {}
        }
        let mut seen = HashSet::new();
        for (j, server) in up.servers.iter().enumerate() {
            let spec = server.get_ref().spec();
            if !(1..=256).contains(&spec.weight) {
                return Err(src.error(
                    server.span(),
                    field(&format!("servers[{j}].weight")),
                    "must be between 1 and 256",
                ));
            }
            if !seen.insert(spec.address.to_string()) {
                return Err(src.error(
                    server.span(),
                    field(&format!("servers[{j}]")),
                    format!("{} is listed twice", spec.address),
                ));
            }
        }
        if up.server_specs().iter().all(|s| s.backup) {
            return Err(src.error(
                up.servers_span(),
                field("servers"),
                "every server is a backup: a backup serves only while the others are down",
            ));
        }
        if let Some(check) = &up.check {
            let bad = |what: &str| {
                Err(src.error(
                    up.name.span(),
                    field(&format!("check.{what}")),
                    "must be at least 1",
                ))
            };
            if check.rise == 0 {
                return bad("rise");
            }
            if check.fall == 0 {
                return bad("fall");
            }
            if check.interval.is_zero() {
                return Err(src.error(
                    up.name.span(),
                    field("check.interval"),
                    "must be more than 0",
                ));
            }
            if check.tls && up.tls.policy == OutboundPolicy::Plain {
                return Err(src.error(
                    up.name.span(),
                    field("check.tls"),
                    "a TLS check needs tls.policy opportunistic or required, not plain",
                ));
            }
        }
        Ok(())
    }

    /// Listeners: unique names and addresses, an upstream for TCP and
    /// connectors for SMTP, TLS settings that fit the mode.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let src = &self.source;
        let upstream_names: HashSet<&str> = self
            .upstreams
            .iter()
            .map(|u| u.name.get_ref().as_str())
            .collect();
        let mut listener_names = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            if !listener_names.insert(l.name.get_ref().as_str()) {
                return Err(src.error(
                    l.name.span(),
                    format!("listeners[{i}].name"),
                    format!("duplicate listener name '{}'", l.name.get_ref()),
                ));
            }
            let address = *l.address.get_ref();
            if address.port() != 0 && !addresses.insert(address) {
                return Err(src.error(
                    l.address.span(),
                    format!("listeners[{i}].address"),
                    format!("address {address} is used by another listener"),
                ));
            }
            self.check_listener_route(i, l, &upstream_names)?;
            let defaults = l.tls.certificates.iter().filter(|c| c.default).count();
            if defaults > 1 {
                return Err(src.error(
                    l.name.span(),
                    format!("listeners[{i}].tls.certificates"),
                    "more than one certificate marked default",
                ));
            }
            no_empty_groups(src, &l.tls.groups, &format!("listeners[{i}].tls.groups"))?;
            if l.tls.mode == InboundMode::Off && l.tls.client_auth.is_some() {
                return Err(src.error(
                    l.name.span(),
                    format!("listeners[{i}].tls.client_auth"),
                    "client certificates need TLS, but tls.mode is off",
                ));
            }
            self.check_proxy_sources(i, l)?;
            if l.protocol == Protocol::Smtp && l.hostname.as_deref().is_none_or(str::is_empty) {
                return Err(src.error(
                    l.name.span(),
                    format!("listeners[{i}].hostname"),
                    "an smtp listener needs a hostname: the name in its greeting, EHLO reply and Received lines (this machine's own name could be an internal one)",
                ));
            }
        }
        Ok(())
    }

    /// A PROXY protocol header is believed from the listed balancers
    /// only: without the list, anyone could name any client address (and
    /// take an inbound connector's right to relay).
    fn check_proxy_sources(&self, i: usize, l: &Listener) -> Result<(), ConfigError> {
        let src = &self.source;
        let field = format!("listeners[{i}].proxy_protocol_from");
        match (*l.proxy_protocol.get_ref(), l.proxy_protocol_from.is_empty()) {
            (true, true) => Err(src.error(
                l.proxy_protocol.span(),
                field,
                "proxy_protocol = true needs the balancers' addresses (e.g. [\"10.0.0.0/24\"]): a header from anyone else would let them name any client",
            )),
            (false, false) => Err(src.error(
                l.name.span(),
                field,
                "is only meaningful with proxy_protocol = true",
            )),
            _ if l.proxy_protocol_from.iter().any(|c| c.is_everything()) => Err(src.error(
                l.proxy_protocol.span(),
                field,
                "every address may not send a PROXY protocol header: name the balancers",
            )),
            _ => Ok(()),
        }
    }

    /// A TCP listener's upstream exists; an SMTP listener has connectors
    /// and no upstream.
    fn check_listener_route(
        &self,
        i: usize,
        l: &Listener,
        upstream_names: &HashSet<&str>,
    ) -> Result<(), ConfigError> {
        let src = &self.source;
        self.check_routes(i, l, upstream_names)?;
        match (l.protocol, &l.upstream) {
            (Protocol::Tcp, None) if !l.routes.is_empty() => Ok(()),
            (Protocol::Tcp, None) => Err(src.error(
                l.name.span(),
                format!("listeners[{i}]"),
                "missing field `upstream`",
            )),
            (Protocol::Tcp, Some(up)) if !upstream_names.contains(up.get_ref().as_str()) => {
                Err(src.error(
                    up.span(),
                    format!("listeners[{i}].upstream"),
                    format!(
                        "no upstream named '{}' (defined: {})",
                        up.get_ref(),
                        self.upstreams
                            .iter()
                            .map(|u| u.name.get_ref().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ))
            }
            (Protocol::Smtp, Some(up)) => Err(src.error(
                up.span(),
                format!("listeners[{i}].upstream"),
                "smtp listeners route by recipient through outbound_connectors, not an upstream",
            )),
            (Protocol::Smtp, None) if self.outbound_connectors.is_empty() => Err(src.error(
                l.name.span(),
                format!("listeners[{i}]"),
                "an smtp listener needs at least one [[outbound_connectors]]",
            )),
            _ => Ok(()),
        }
    }

    /// A listener's routes name upstreams that exist, on a TCP listener
    /// that reads TLS; its access rates are usable.
    fn check_routes(
        &self,
        i: usize,
        l: &Listener,
        upstream_names: &HashSet<&str>,
    ) -> Result<(), ConfigError> {
        let src = &self.source;
        for (j, route) in l.routes.iter().enumerate() {
            let field = format!("listeners[{i}].routes[{j}]");
            if l.protocol == Protocol::Smtp {
                return Err(src.error(
                    route.upstream.span(),
                    field,
                    "smtp listeners route by recipient through outbound_connectors",
                ));
            }
            if l.tls.mode == InboundMode::Off {
                return Err(src.error(
                    route.upstream.span(),
                    field,
                    "routes read the client's TLS hello: tls.mode off sees none",
                ));
            }
            if !upstream_names.contains(route.upstream.get_ref().as_str()) {
                return Err(src.error(
                    route.upstream.span(),
                    format!("{field}.upstream"),
                    format!("no upstream named '{}'", route.upstream.get_ref()),
                ));
            }
            for name in &route.sni {
                let bare = name.strip_prefix("*.").unwrap_or(name);
                if bare.is_empty()
                    || bare.contains('*')
                    || !bare.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Err(src.error(
                        route.upstream.span(),
                        format!("{field}.sni"),
                        format!("'{name}' is not a server name or *.suffix"),
                    ));
                }
            }
        }
        let access = &l.access;
        if access.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err(src.error(
                l.name.span(),
                format!("listeners[{i}].access.rate"),
                "must be more than 0 per second",
            ));
        }
        if access.burst == Some(0) {
            return Err(src.error(
                l.name.span(),
                format!("listeners[{i}].access.burst"),
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The accepted domains and inbound connectors as rules.
    pub fn admission(&self) -> crate::smtp::admission::Admission {
        crate::smtp::admission::Admission {
            accepted_domains: self
                .accepted_domains
                .iter()
                .map(|d| d.get_ref().clone())
                .collect(),
            connectors: self
                .inbound_connectors
                .iter()
                .map(InboundConnector::rules)
                .collect(),
        }
    }

    /// What SMTP listeners would accept: nothing, or mail for anyone.
    fn validate_admission(&self) -> Result<(), ConfigError> {
        let src = &self.source;
        let lab = "; open_relay = true allows it (for a lab, never on the Internet)";
        for (i, d) in self.accepted_domains.iter().enumerate() {
            if *d.get_ref() == DomainPattern::Any && !self.open_relay {
                return Err(src.error(
                    d.span(),
                    format!("accepted_domains[{i}]"),
                    format!("'*' accepts mail for every domain from anyone: an open relay{lab}"),
                ));
            }
        }
        for (i, c) in self.inbound_connectors.iter().enumerate() {
            for (j, d) in c.sender_domains.iter().enumerate() {
                if *d.get_ref() == DomainPattern::Any {
                    return Err(src.error(
                        d.span(),
                        format!("inbound_connectors[{i}].sender_domains[{j}]"),
                        "'*' would claim every sender; name the partner's domains",
                    ));
                }
            }
            let rules = c.rules();
            if let (true, Some(relay)) = (rules.relays_for_anyone(), &c.allow_relay) {
                if !self.open_relay {
                    return Err(src.error(
                        relay.span(),
                        format!("inbound_connectors[{i}].allow_relay"),
                        format!(
                            "lets any client relay to any domain (an open relay): limit it with client_addresses, or with client_certificate = \"required\" and certificate_names{lab}"
                        ),
                    ));
                }
            }
        }
        let admits = !self.accepted_domains.is_empty()
            || self
                .inbound_connectors
                .iter()
                .any(|c| c.rules().allow_relay);
        if let (false, Some((i, l))) = (
            admits,
            self.listeners
                .iter()
                .enumerate()
                .find(|(_, l)| l.protocol == Protocol::Smtp),
        ) {
            return Err(src.error(
                l.name.span(),
                format!("listeners[{i}]"),
                "an smtp listener needs accepted_domains or an inbound connector with allow_relay = true: as configured it refuses every recipient",
            ));
        }
        Ok(())
    }

    /// The upstream a tcp listener relays to (validated to exist).
    pub fn upstream_of(&self, listener: &Listener) -> Option<&Upstream> {
        let name = listener.upstream.as_ref()?;
        self.upstreams
            .iter()
            .find(|u| u.name.get_ref() == name.get_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert!(!c.listeners.is_empty());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(duration::parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(duration::parse("10s"), Some(Duration::from_secs(10)));
        assert_eq!(duration::parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(duration::parse("s"), None);
        assert_eq!(duration::parse("10"), None);
        assert_eq!(duration::parse("10d"), None);
    }

    #[test]
    fn host_port_parses_names_and_v6() {
        assert_eq!(
            "mx.example:25".parse::<HostPort>().unwrap(),
            HostPort {
                host: "mx.example".into(),
                port: 25
            }
        );
        assert_eq!("[::1]:25".parse::<HostPort>().unwrap().host, "::1");
        assert!("::1:25".parse::<HostPort>().is_err());
        assert!("mx.example".parse::<HostPort>().is_err());
        assert!("mx.example:0".parse::<HostPort>().is_err());
    }
}

/// What drives the splice data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceEngine {
    IoUring,
    Epoll,
}
keywords!(SpliceEngine, "pump", {
    IoUring => "io-uring",
    Epoll => "epoll",
});

/// Where the eBPF maps are pinned unless the config says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tlsrelay";

/// Which cgroup the program watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupChoice {
    /// A child of the relay's own cgroup made for this instance
    /// (`tlsrelay-<pid>`), which the relay moves into and removes at exit:
    /// only this relay's sockets are seen, not a neighbour's, not another
    /// relay's.
    Child,
    /// The relay's own cgroup as it is (under systemd, the service's).
    Own,
    /// A given cgroup v2 directory.
    Path(PathBuf),
}

#[derive(Clone, Debug)]
pub struct WireSettings {
    pub pin_dir: PathBuf,
    pub cgroup: CgroupChoice,
    pub smtp_ports: Vec<u16>,
}
