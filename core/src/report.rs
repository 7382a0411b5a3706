//! What a session did, for logs, tests and (later) the eBPF cross-check:
//! one [`SessionReport`] per connection, and the Postfix-style TLS lines
//! operators grep for.

use std::fmt;
use std::net::SocketAddr;

use serde::Serialize;

use crate::policy::{PeerTrust, TlsFailure};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

/// How one leg was secured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "security", rename_all = "kebab-case")]
pub enum LegSecurity {
    Plaintext,
    Tls {
        #[serde(flatten)]
        negotiated: Negotiated,
        trust: PeerTrust,
        /// Inbound: the SNI the client asked for. Outbound: the server name.
        server_name: Option<String>,
        /// The peer certificate's names, when it presented one.
        peer_names: Vec<String>,
    },
}

impl LegSecurity {
    pub fn is_tls(&self) -> bool {
        matches!(self, LegSecurity::Tls { .. })
    }
}

impl fmt::Display for LegSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LegSecurity::Plaintext => f.write_str("plaintext"),
            LegSecurity::Tls {
                negotiated, trust, ..
            } => {
                write!(f, "{} {}", negotiated.version, negotiated.cipher)?;
                if let Some(group) = &negotiated.group {
                    write!(f, " {group}")?;
                }
                if negotiated.resumed {
                    f.write_str(" resumed")?;
                }
                write!(f, " ({trust})")
            }
        }
    }
}

/// An outbound socket of the session, and what the relay made of it: each
/// gets a relay view for the wire cross-check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketRecord {
    pub cookie: u64,
    pub leg: Direction,
    /// None: plaintext, or a handshake that did not complete.
    pub negotiated: Option<Negotiated>,
    pub downgraded: bool,
    pub handshake_failed: bool,
    /// TLS off on this leg by configuration (plaintext is no downgrade).
    pub tls_off: bool,
}

/// A session that went on with less security than it could have had.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Downgrade {
    pub leg: Direction,
    /// What happened, with the detail (a peer's reply, a library's error).
    pub reason: String,
    /// One of a fixed few names for `reason` ([`Downgrade::CLASSES`]): the
    /// metric label, so peer text cannot grow the number of series.
    pub class: &'static str,
}

impl Downgrade {
    /// Every `class` a downgrade can have.
    pub const CLASSES: [&'static str; 8] = [
        "no tls",
        "no starttls",
        "not offered",
        "handshake failed",
        "certificate untrusted",
        "name mismatch",
        "version too low",
        "tls 1.2",
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Bytes were relayed; `end` says how the relaying ended.
    Relayed { end: PumpEnd },
    /// Policy refused the session on one leg.
    Refused {
        leg: Direction,
        reason: String,
        failure: Option<TlsFailure>,
    },
    /// The session could not be set up (upstream unreachable, client gone).
    Failed { reason: String },
}

/// What was negotiated on a leg.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Negotiated {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// The rustls suite name, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// The same two as on the wire (0x0304, 0x1302), for the eBPF join.
    pub version_code: u16,
    pub cipher_code: u16,
    /// The key exchange group, e.g. `X25519MLKEM768` (post-quantum hybrid)
    /// or `X25519`, and its code (0x11ec, 0x001d).
    pub group: Option<String>,
    pub group_code: u16,
    /// The session was resumed (a TLS 1.3 ticket or a TLS 1.2 session),
    /// not a full handshake.
    pub resumed: bool,
}

impl Negotiated {
    /// As a trace header records it, in Postfix's words: `TLSv1.3 with
    /// cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519MLKEM768`.
    pub fn trace_words(&self) -> String {
        let mut words = format!("{} with cipher {}", self.version, self.cipher);
        if let Some(group) = &self.group {
            words += &format!(" key-exchange {group}");
        }
        words
    }
}

/// How the bytes went through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataPath {
    /// rustls in this process encrypts and decrypts; tokio moves the bytes.
    Userspace,
    /// socket -> pipe -> socket with IORING_OP_SPLICE on an io_uring worker;
    /// TLS legs are kernel TLS.
    SpliceIoUring,
    /// socket -> pipe -> socket with splice(2) on the runtime's epoll.
    SpliceEpoll,
}

impl DataPath {
    pub fn is_splice(self) -> bool {
        self != DataPath::Userspace
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataPath::Userspace => "userspace",
            DataPath::SpliceIoUring => "splice/io_uring",
            DataPath::SpliceEpoll => "splice/epoll",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Client,
    Upstream,
}

/// How the relaying ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "end", rename_all = "kebab-case")]
pub enum PumpEnd {
    /// Both sides closed (FIN or close_notify) and everything was delivered.
    Closed,
    /// One side reset (or failed); the other was reset in turn.
    Reset { side: Side, detail: String },
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// The legs could not be handed to the data plane (kTLS setup failed
    /// after the keys left rustls); both were reset.
    SetupFailed { detail: String },
}

/// One mail transaction as relayed.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Transaction {
    pub from: String,
    pub recipients: Vec<String>,
    pub connector: Option<String>,
    pub next_hop: Option<String>,
    pub outbound: Option<LegSecurity>,
    /// It went over an idle connection an earlier session left to the
    /// next hop (no new connection, no handshake).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
    /// The reply the sender got at the end (the next hop's, or the relay's
    /// own refusal of the sender).
    pub result: Option<String>,
    /// Recipients the relay itself refused, with the reply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

/// One MX host tried (or ruled out before connecting) under a delivery
/// policy, as the domain's TLS report counts it (RFC 8460).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PolicySession {
    pub domain: String,
    /// `tlsa`, `sts` or `no-policy-found`.
    pub policy_type: String,
    /// `success` or an RFC 8460 result type.
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mx_host: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SessionReport {
    pub id: u64,
    pub listener: String,
    /// The client: the socket's peer, or on a PROXY protocol listener the
    /// address the header names.
    pub client: SocketAddr,
    /// The balancer that sent the PROXY protocol header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxied_by: Option<SocketAddr>,
    pub upstream: String,
    pub upstream_addr: Option<SocketAddr>,
    /// Socket cookies (SO_COOKIE), the key the eBPF records use.
    pub client_cookie: Option<u64>,
    /// Every outbound socket the session opened (the upstream, a TLS
    /// attempt before a plaintext retry, SMTP next hops) as the relay saw it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sockets: Vec<SocketRecord>,
    /// Delivery by MX: each host tried or ruled out under DANE, MTA-STS
    /// or no policy, with its TLS-RPT result.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_sessions: Vec<PolicySession>,
    /// Legs whose TLS is off by configuration.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_off: Vec<Direction>,
    pub inbound: Option<LegSecurity>,
    pub outbound: Option<LegSecurity>,
    /// The outbound leg is a connection an earlier session left idle (SMTP
    /// connection reuse): no new connection or handshake of this session.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub outbound_reused: bool,
    pub downgrades: Vec<Downgrade>,
    pub outcome: Outcome,
    pub data_path: Option<DataPath>,
    /// Legs whose TLS the kernel handled.
    pub ktls: Vec<Side>,
    /// Why TLS legs stayed in userspace rustls, when they did.
    pub path_reason: Option<String>,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    /// SMTP: each mail transaction, where it went and how it ended.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub transactions: Vec<Transaction>,
    /// What the client's TLS hello asked for, when a listener with routes
    /// read it before choosing one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello: Option<HelloSeen>,
    /// TLS passed through untouched: the relay terminated nothing, and
    /// read what the server's hello chose.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Passthrough>,
    /// From accept until both legs were ready to relay.
    pub setup_ms: f64,
    pub duration_ms: f64,
}

/// A ClientHello as a router read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HelloSeen {
    pub server_name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Versions offered (`TLSv1.3`, `TLSv1.2`, …), GREASE left out.
    pub offered: Vec<String>,
}

/// A passed-through session's TLS as its ServerHello said (the relay
/// verified nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Passthrough {
    /// `TLSv1.3`, …; `None` when no ServerHello was seen.
    pub version: Option<String>,
    pub version_code: u16,
    pub cipher_code: u16,
    pub group_code: u16,
}

/// A TLS version's name, as reports give it.
pub fn version_name(code: u16) -> Option<&'static str> {
    match code {
        0x0301 => Some("TLSv1.0"),
        0x0302 => Some("TLSv1.1"),
        0x0303 => Some("TLSv1.2"),
        0x0304 => Some("TLSv1.3"),
        _ => None,
    }
}

impl SessionReport {
    pub fn new(id: u64, listener: &str, client: SocketAddr, upstream: &str) -> SessionReport {
        SessionReport {
            id,
            listener: listener.to_string(),
            client,
            proxied_by: None,
            upstream: upstream.to_string(),
            upstream_addr: None,
            client_cookie: None,
            sockets: Vec::new(),
            policy_sessions: Vec::new(),
            tls_off: Vec::new(),
            inbound: None,
            outbound: None,
            outbound_reused: false,
            hello: None,
            passthrough: None,
            downgrades: Vec::new(),
            outcome: Outcome::Failed {
                reason: "session did not finish".into(),
            },
            data_path: None,
            ktls: Vec::new(),
            path_reason: None,
            bytes_client_to_upstream: 0,
            bytes_upstream_to_client: 0,
            transactions: Vec::new(),
            setup_ms: 0.0,
            duration_ms: 0.0,
        }
    }

    pub fn downgraded(&self, leg: Direction) -> Option<&Downgrade> {
        self.downgrades.iter().find(|d| d.leg == leg)
    }

    /// The TLS failure that refused the session on `leg`, if any.
    pub fn tls_failure(&self, leg: Direction) -> Option<&TlsFailure> {
        match &self.outcome {
            Outcome::Refused {
                leg: l,
                failure: Some(f),
                ..
            } if *l == leg => Some(f),
            _ => None,
        }
    }
}

impl fmt::Display for SessionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let leg = |l: &Option<LegSecurity>| l.as_ref().map_or("-".to_string(), |s| s.to_string());
        write!(
            f,
            "session {} listener={} client={}",
            self.id, self.listener, self.client,
        )?;
        if let Some(balancer) = self.proxied_by {
            write!(f, " via={balancer}")?;
        }
        write!(
            f,
            " inbound={} upstream={}",
            leg(&self.inbound),
            self.upstream
        )?;
        if let Some(addr) = self.upstream_addr {
            // Postfix's form: name[address]:port, IPv6 without brackets.
            write!(f, "[{}]:{}", addr.ip(), addr.port())?;
        }
        write!(f, " outbound={}", leg(&self.outbound))?;
        if let Some(name) = self.hello.as_ref().and_then(|h| h.server_name.as_ref()) {
            write!(f, " sni={name}")?;
        }
        if let Some(p) = &self.passthrough {
            write!(
                f,
                " passthrough={}",
                p.version.as_deref().unwrap_or("no-serverhello")
            )?;
        }
        for d in &self.downgrades {
            write!(f, " downgrade({})=\"{}\"", d.leg, d.reason)?;
        }
        write_outcome(f, &self.outcome)?;
        if let Some(path) = self.data_path {
            write!(f, " path={path}")?;
            match self.ktls.as_slice() {
                [] => {}
                [one] => write!(f, " ktls={one:?}")?,
                _ => write!(f, " ktls=both")?,
            }
            if let Some(reason) = &self.path_reason {
                write!(f, " (userspace: {reason})")?;
            }
        }
        for t in &self.transactions {
            write!(
                f,
                " mail(from=<{}> to={} via={} result=\"{}\"",
                t.from,
                t.recipients.len(),
                t.next_hop.as_deref().unwrap_or("-"),
                t.result.as_deref().unwrap_or("-")
            )?;
            for r in &t.refused {
                write!(f, " refused=\"{r}\"")?;
            }
            f.write_str(")")?;
        }
        write!(
            f,
            " bytes={}/{} setup={:.1}ms duration={:.1}ms",
            self.bytes_client_to_upstream,
            self.bytes_upstream_to_client,
            self.setup_ms,
            self.duration_ms
        )
    }
}

/// The log line's `outcome=` field.
fn write_outcome(f: &mut fmt::Formatter<'_>, outcome: &Outcome) -> fmt::Result {
    match outcome {
        Outcome::Relayed { end } => {
            let end = match end {
                PumpEnd::Closed => "closed".to_string(),
                PumpEnd::IdleTimeout => "idle timeout".to_string(),
                PumpEnd::Reset { side, detail } => format!("reset by {side:?}: {detail}"),
                PumpEnd::SetupFailed { detail } => format!("data plane setup failed: {detail}"),
            };
            write!(f, " outcome=relayed ({end})")?;
        }
        Outcome::Refused { leg, reason, .. } => write!(f, " outcome=refused ({leg}: {reason})")?,
        Outcome::Failed { reason } => write!(f, " outcome=failed ({reason})")?,
    }
    Ok(())
}

/// `Trusted TLS connection established from unknown[192.0.2.7]: TLSv1.3 with
/// cipher TLS13_AES_256_GCM_SHA384`, as Postfix's smtpd logs it.
pub fn inbound_tls_line(client: SocketAddr, negotiated: &Negotiated, trust: PeerTrust) -> String {
    format!(
        "{trust} TLS connection established from unknown[{}]: {} with cipher {}{}",
        client.ip(),
        negotiated.version,
        negotiated.cipher,
        key_exchange(negotiated)
    )
}

/// Postfix's ` key-exchange X25519MLKEM768` suffix, when known.
fn key_exchange(negotiated: &Negotiated) -> String {
    negotiated
        .group
        .as_ref()
        .map_or(String::new(), |g| format!(" key-exchange {g}"))
}

/// `Verified TLS connection established to mx.partner.example[192.0.2.1]:25:
/// TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384`, as Postfix's smtp logs it.
pub fn outbound_tls_line(
    host: &str,
    addr: SocketAddr,
    negotiated: &Negotiated,
    trust: PeerTrust,
) -> String {
    format!(
        "{trust} TLS connection established to {host}[{}]:{}: {} with cipher {}{}",
        addr.ip(),
        addr.port(),
        negotiated.version,
        negotiated.cipher,
        key_exchange(negotiated)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tls_failure_kind_is_a_downgrade_class() {
        use crate::policy::TlsFailure::*;
        for failure in [
            NotOffered(String::new()),
            HandshakeFailed(String::new()),
            Untrusted(String::new()),
            NameMismatch(String::new()),
            VersionTooLow(String::new()),
        ] {
            assert!(Downgrade::CLASSES.contains(&failure.kind()), "{failure:?}");
        }
    }

    #[test]
    fn an_ipv6_upstream_prints_as_postfix_does() {
        let mut r = SessionReport::new(1, "l", "[::1]:5000".parse().unwrap(), "local");
        r.upstream_addr = Some("[::1]:4432".parse().unwrap());
        let line = r.to_string();
        assert!(line.contains(" upstream=local[::1]:4432 "), "{line}");
    }

    #[test]
    fn postfix_style_lines() {
        let n = Negotiated {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            version_code: 0x0304,
            cipher_code: 0x1302,
            group: Some("X25519MLKEM768".into()),
            group_code: 0x11ec,
            resumed: false,
        };
        assert_eq!(
            outbound_tls_line(
                "mx.partner.example",
                "192.0.2.1:25".parse().unwrap(),
                &n,
                PeerTrust::Verified
            ),
            "Verified TLS connection established to mx.partner.example[192.0.2.1]:25: TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519MLKEM768"
        );
        assert_eq!(
            inbound_tls_line("[2001:db8::7]:4000".parse().unwrap(), &n, PeerTrust::Anonymous),
            "Anonymous TLS connection established from unknown[2001:db8::7]: TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519MLKEM768"
        );
    }
}
