//! Who may send what through the mail edge: the organisation's accepted
//! domains, the inbound connectors' conditions, and who may relay to other
//! domains. Pure decisions on facts the session gathers (client address,
//! TLS, the client certificate and which connectors' anchors it chains to),
//! so every rule is a table test.
//!
//! The rules, as the book states them (docs/src/mail-edge.md):
//! - A connector *claims* a session when the client address is in its
//!   `client_addresses` or the client certificate chains to its anchors and
//!   carries one of its `certificate_names`; it claims a transaction whose
//!   sender domain is among its `sender_domains`.
//! - Whatever claimed, every condition the connector sets must hold
//!   (address, TLS, certificate present / trusted / named), or MAIL gets
//!   `451 4.7.1` naming the unmet one: the sender keeps the message.
//! - A recipient in an accepted domain is accepted from anyone (subject to
//!   the above); any other recipient only from a session claimed by a
//!   connector with `allow_relay` whose conditions all hold. Everyone else
//!   gets `554 5.7.1 Relay access denied` at RCPT, before any next hop is
//!   contacted.

use std::fmt;
use std::net::IpAddr;

use super::address::{Cidr, DomainPattern};
use super::codec::{domain_of, Reply};
use crate::policy::{NamePattern, PeerTrust};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCertificate {
    None,
    Requested,
    Required,
}
keywords!(ClientCertificate, "client certificate requirement", {
    None => "none",
    Requested => "requested",
    Required => "required",
});

/// Rules for sessions from a partner or an on-premises server.
#[derive(Clone, Debug)]
pub struct InboundConnector {
    pub name: String,
    /// Claims sessions from these ranges; when set, a claimed session must
    /// come from one of them.
    pub client_addresses: Vec<Cidr>,
    /// Claims sessions whose certificate (chained to this connector's
    /// anchors) carries one of these names; when set, a claimed session
    /// must present such a certificate.
    pub certificate_names: Vec<NamePattern>,
    /// Claims transactions whose sender is in these domains.
    pub sender_domains: Vec<DomainPattern>,
    pub tls_required: bool,
    pub client_certificate: ClientCertificate,
    /// A claimed session meeting every condition may send to any domain.
    pub allow_relay: bool,
}

/// What the relay knows about the sending client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub tls: bool,
    /// The TLS in use, as trace headers give it (`TLSv1.3 with cipher …`).
    pub tls_used: Option<String>,
    pub certificate: Option<PresentedCertificate>,
}

impl Client {
    pub fn new(ip: IpAddr) -> Client {
        Client {
            ip,
            tls: false,
            tls_used: None,
            certificate: None,
        }
    }
}

/// The client certificate of a TLS session (its key was proven in the
/// handshake; its chain is judged per connector).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentedCertificate {
    pub names: Vec<String>,
    /// Indexes of the connectors whose trust anchors the chain verifies to.
    pub trusted_by: Vec<usize>,
}

/// Why a claimed session does not meet its connector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmet {
    Address(IpAddr),
    Tls,
    NoCertificate,
    UntrustedCertificate,
    CertificateName(Vec<String>),
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Address(ip) => write!(f, "client address {ip} is not one of its addresses"),
            Unmet::Tls => f.write_str("TLS is required (issue STARTTLS first)"),
            Unmet::NoCertificate => f.write_str("a client certificate is required"),
            Unmet::UntrustedCertificate => {
                f.write_str("the client certificate is not issued by its trust anchors")
            }
            Unmet::CertificateName(names) => write!(
                f,
                "the client certificate's names ({}) are not among its certificate names",
                names.join(", ")
            ),
        }
    }
}

/// What made a connector apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Address,
    Certificate,
    SenderDomain(String),
}

impl fmt::Display for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Claim::Address => f.write_str("client address"),
            Claim::Certificate => f.write_str("client certificate"),
            Claim::SenderDomain(d) => write!(f, "sender domain {d}"),
        }
    }
}

impl InboundConnector {
    fn certificate_checked(&self) -> bool {
        self.client_certificate == ClientCertificate::Required || !self.certificate_names.is_empty()
    }

    fn names_match(&self, names: &[String]) -> bool {
        self.certificate_names.is_empty()
            || NamePattern::any_matches(&self.certificate_names, names.iter().map(String::as_str))
    }

    /// Whether this connector (index `me`) claims the session itself.
    fn claims_session(&self, me: usize, client: &Client) -> Option<Claim> {
        if self.client_addresses.iter().any(|c| c.contains(client.ip)) {
            return Some(Claim::Address);
        }
        let cert = client.certificate.as_ref()?;
        (!self.certificate_names.is_empty()
            && cert.trusted_by.contains(&me)
            && self.names_match(&cert.names))
        .then_some(Claim::Certificate)
    }

    /// The first condition the session fails, in the order an operator
    /// would check them.
    pub fn unmet(&self, me: usize, client: &Client) -> Option<Unmet> {
        if !self.client_addresses.is_empty()
            && !self.client_addresses.iter().any(|c| c.contains(client.ip))
        {
            return Some(Unmet::Address(client.ip));
        }
        let certificate = self.certificate_checked();
        if (self.tls_required || certificate) && !client.tls {
            return Some(Unmet::Tls);
        }
        if !certificate {
            return None;
        }
        let Some(cert) = &client.certificate else {
            return Some(Unmet::NoCertificate);
        };
        if !cert.trusted_by.contains(&me) {
            return Some(Unmet::UntrustedCertificate);
        }
        if !self.names_match(&cert.names) {
            return Some(Unmet::CertificateName(cert.names.clone()));
        }
        None
    }

    /// A relay connector that any client could satisfy.
    pub fn relays_for_anyone(&self) -> bool {
        let by_address = !self.client_addresses.is_empty()
            && !self.client_addresses.iter().any(Cidr::is_everything);
        let by_certificate = self.client_certificate == ClientCertificate::Required
            && !self.certificate_names.is_empty();
        self.allow_relay && !by_address && !by_certificate
    }
}

/// The accepted domains and the inbound connectors of a mail edge.
#[derive(Clone, Debug, Default)]
pub struct Admission {
    pub accepted_domains: Vec<DomainPattern>,
    pub connectors: Vec<InboundConnector>,
}

impl Admission {
    /// The organisation's first own domain named exactly: whose
    /// postmaster a bare `<postmaster>` reaches.
    pub fn own_domain(&self) -> Option<&str> {
        self.accepted_domains.iter().find_map(|d| match d {
            DomainPattern::Exact(domain) => Some(domain.as_str()),
            _ => None,
        })
    }

    /// The connectors that claim the session or this sender, each with
    /// what claimed it.
    fn claims<'a>(
        &'a self,
        client: &'a Client,
        sender_domain: Option<&'a str>,
    ) -> impl Iterator<Item = (usize, &'a InboundConnector, Claim)> + 'a {
        self.connectors
            .iter()
            .enumerate()
            .filter_map(move |(i, c)| {
                let claim = c.claims_session(i, client).or_else(|| {
                    let d = sender_domain?;
                    DomainPattern::any_matches(&c.sender_domains, d)
                        .then(|| Claim::SenderDomain(d.to_string()))
                })?;
                Some((i, c, claim))
            })
    }

    /// At MAIL: every connector that claims the session or the sender's
    /// domain must have all its conditions met; otherwise a 4.7.1 so the
    /// sender keeps the message and retries.
    pub fn check_sender(&self, client: &Client, from: &str) -> Result<(), Reply> {
        let domain = domain_of(from);
        for (i, c, claim) in self.claims(client, domain.as_deref()) {
            if let Some(unmet) = c.unmet(i, client) {
                return Err(Reply::new(
                    451,
                    format!("4.7.1 Connector {} ({claim}): {unmet}", c.name),
                ));
            }
        }
        Ok(())
    }

    /// The trust word for a client certificate the connectors judged:
    /// Verified when a connector's anchors and certificate names vouch for
    /// it, Trusted when only anchors do, Untrusted when none.
    pub fn certificate_trust(&self, cert: &PresentedCertificate) -> PeerTrust {
        let named = cert.trusted_by.iter().any(|&i| {
            self.connectors
                .get(i)
                .is_some_and(|c| !c.certificate_names.is_empty() && c.names_match(&cert.names))
        });
        match (cert.trusted_by.is_empty(), named) {
            (true, _) => PeerTrust::Untrusted,
            (false, true) => PeerTrust::Verified,
            (false, false) => PeerTrust::Trusted,
        }
    }

    /// The connector that lets this session relay to any domain, if any.
    pub fn relay_connector(&self, client: &Client) -> Option<&InboundConnector> {
        self.connectors.iter().enumerate().find_map(|(i, c)| {
            (c.allow_relay && c.claims_session(i, client).is_some() && c.unmet(i, client).is_none())
                .then_some(c)
        })
    }

    /// At RCPT, before any next hop hears of it: the recipient's domain,
    /// or the refusal.
    pub fn check_recipient(&self, client: &Client, to: &str) -> Result<String, Reply> {
        let Some(domain) = domain_of(to) else {
            return Err(Reply::new(550, "5.1.3 Recipient address needs a domain"));
        };
        if self.relay_connector(client).is_some()
            || DomainPattern::any_matches(&self.accepted_domains, &domain) && !sender_routed(to)
        {
            return Ok(domain);
        }
        Err(Reply::new(
            554,
            format!("5.7.1 <{to}>: Relay access denied"),
        ))
    }

    /// Who may relay, for `check` and the banner.
    pub fn describe(&self) -> Vec<String> {
        let accepted = if self.accepted_domains.is_empty() {
            "none".to_string()
        } else {
            join(&self.accepted_domains)
        };
        let relays: Vec<String> = self
            .connectors
            .iter()
            .filter(|c| c.allow_relay)
            .map(|c| {
                let mut who = Vec::new();
                if !c.client_addresses.is_empty() {
                    who.push(format!("from {}", join(&c.client_addresses)));
                }
                if c.certificate_checked() {
                    who.push(if c.certificate_names.is_empty() {
                        "with a certificate from its anchors".to_string()
                    } else {
                        format!("with a certificate named {}", join(&c.certificate_names))
                    });
                } else if c.tls_required {
                    who.push("over TLS".into());
                }
                format!("{} ({})", c.name, who.join(", "))
            })
            .collect();
        let mut lines = vec![format!(
            "accepted domains: {accepted} (mail for them is accepted from any client, subject to the inbound connectors)"
        )];
        lines.push(if relays.is_empty() {
            "relaying to other domains: nobody (554 5.7.1 Relay access denied)".to_string()
        } else {
            format!(
                "relaying to other domains: only sessions of {}; everyone else gets 554 5.7.1 Relay access denied",
                relays.join("; ")
            )
        });
        if let Some(c) = self.connectors.iter().find(|c| c.relays_for_anyone()) {
            lines.push(format!(
                "WARNING: OPEN RELAY: connector {} lets any client relay to any domain (open_relay = true)",
                c.name
            ));
        }
        if self.accepted_domains.contains(&DomainPattern::Any) {
            lines.push(
                "WARNING: OPEN RELAY: accepted_domains has '*': mail for every domain is accepted from anyone (open_relay = true)"
                    .into(),
            );
        }
        lines
    }
}

/// Sender-specified routing in a local part (`user%other@`, `user!other@`,
/// `"user@other"@`): a next hop may forward it elsewhere, so only relay
/// clients may use it (Postfix's `allow_untrusted_routing = no`).
fn sender_routed(to: &str) -> bool {
    let local = to.rsplit_once('@').map_or(to, |(l, _)| l);
    local.contains(['%', '!', '@'])
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTNER: usize = 0;
    const ONPREM: usize = 1;

    fn admission() -> Admission {
        Admission {
            accepted_domains: vec![
                "example.org".parse().unwrap(),
                ".example.org".parse().unwrap(),
            ],
            connectors: vec![
                InboundConnector {
                    name: "partner-in".into(),
                    client_addresses: vec!["192.0.2.0/24".parse().unwrap()],
                    certificate_names: vec!["mail.partner.example".parse().unwrap()],
                    sender_domains: vec!["partner.example".parse().unwrap()],
                    tls_required: true,
                    client_certificate: ClientCertificate::Required,
                    allow_relay: false,
                },
                InboundConnector {
                    name: "on-premises".into(),
                    client_addresses: vec![
                        "10.0.0.0/24".parse().unwrap(),
                        "2001:db8:1::/48".parse().unwrap(),
                    ],
                    certificate_names: Vec::new(),
                    sender_domains: Vec::new(),
                    tls_required: true,
                    client_certificate: ClientCertificate::None,
                    allow_relay: true,
                },
            ],
        }
    }

    fn client(ip: &str, tls: bool, cert: Option<(&str, &[usize])>) -> Client {
        Client {
            ip: ip.parse().unwrap(),
            tls,
            tls_used: None,
            certificate: cert.map(|(name, trusted_by)| PresentedCertificate {
                names: vec![name.to_string()],
                trusted_by: trusted_by.to_vec(),
            }),
        }
    }

    fn code<T>(r: Result<T, Reply>) -> u16 {
        r.map_or_else(|r| r.code, |_| 250)
    }

    #[test]
    fn strangers_may_send_to_accepted_domains_only() {
        let a = admission();
        let stranger = client("198.51.100.7", false, None);
        assert_eq!(code(a.check_sender(&stranger, "spam@spammer.test")), 250);
        assert_eq!(code(a.check_recipient(&stranger, "ceo@example.org")), 250);
        assert_eq!(
            code(a.check_recipient(&stranger, "x@sales.Example.Org.")),
            250
        );
        let denied = a
            .check_recipient(&stranger, "victim@gmail.example")
            .unwrap_err();
        assert_eq!(
            denied.to_string(),
            "554 5.7.1 <victim@gmail.example>: Relay access denied"
        );
        for routed in [
            "victim%gmail.example@example.org",
            "gmail.example!victim@example.org",
            "\"victim@gmail.example\"@example.org",
        ] {
            assert_eq!(code(a.check_recipient(&stranger, routed)), 554, "{routed}");
        }
        assert_eq!(code(a.check_recipient(&stranger, "x@notexample.org")), 554);
        assert_eq!(code(a.check_recipient(&stranger, "postmaster")), 550);
    }

    #[test]
    fn relay_connectors_relay_only_when_every_condition_holds() {
        let a = admission();
        let onprem = client("10.0.0.25", true, None);
        assert_eq!(
            a.relay_connector(&onprem).map(|c| c.name.as_str()),
            Some("on-premises")
        );
        assert_eq!(
            code(a.check_recipient(&onprem, "victim%x@gmail.example")),
            250
        );
        let onprem6 = client("2001:db8:1::25", true, None);
        assert_eq!(code(a.check_recipient(&onprem6, "x@gmail.example")), 250);
        // Its TLS requirement: MAIL is deferred, and it may not relay.
        let plain = client("10.0.0.25", false, None);
        let refusal = a.check_sender(&plain, "app@example.org").unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "451 4.7.1 Connector on-premises (client address): TLS is required (issue STARTTLS first)"
        );
        assert_eq!(code(a.check_recipient(&plain, "x@gmail.example")), 554);
        // The partner may send to us, not through us.
        let partner = client(
            "192.0.2.9",
            true,
            Some(("mail.partner.example", &[PARTNER])),
        );
        assert_eq!(code(a.check_sender(&partner, "boss@partner.example")), 250);
        assert_eq!(code(a.check_recipient(&partner, "x@example.org")), 250);
        assert_eq!(code(a.check_recipient(&partner, "x@gmail.example")), 554);
    }

    /// Issue 11's partner table: each combination and the condition named.
    #[test]
    fn partner_conditions_hold_whatever_claimed_the_session() {
        let a = admission();
        let right_cert = Some(("mail.partner.example", &[PARTNER][..]));
        let cases: &[(&str, Client, &str, Option<&str>)] = &[
            ("right address + right cert", client("192.0.2.9", true, right_cert), "boss@partner.example", None),
            (
                "right cert + wrong address",
                client("198.51.100.7", true, right_cert),
                "anyone@elsewhere.test",
                Some("451 4.7.1 Connector partner-in (client certificate): client address 198.51.100.7 is not one of its addresses"),
            ),
            (
                "right address + no TLS",
                client("192.0.2.9", false, None),
                "boss@partner.example",
                Some("451 4.7.1 Connector partner-in (client address): TLS is required (issue STARTTLS first)"),
            ),
            (
                "right address + TLS without a certificate",
                client("192.0.2.9", true, None),
                "bounce@elsewhere.test",
                Some("451 4.7.1 Connector partner-in (client address): a client certificate is required"),
            ),
            (
                "wrong-name certificate",
                client("192.0.2.9", true, Some(("mail.intruder.test", &[PARTNER]))),
                "boss@partner.example",
                Some("451 4.7.1 Connector partner-in (client address): the client certificate's names (mail.intruder.test) are not among its certificate names"),
            ),
            (
                "certificate from another CA",
                client("192.0.2.9", true, Some(("mail.partner.example", &[]))),
                "boss@partner.example",
                Some("451 4.7.1 Connector partner-in (client address): the client certificate is not issued by its trust anchors"),
            ),
            (
                "partner domain from elsewhere",
                client("198.51.100.7", true, None),
                "boss@Partner.Example",
                Some("451 4.7.1 Connector partner-in (sender domain partner.example): client address 198.51.100.7 is not one of its addresses"),
            ),
            (
                "partner name from another CA, elsewhere: no claim by certificate",
                client("198.51.100.7", true, Some(("mail.partner.example", &[]))),
                "someone@elsewhere.test",
                None,
            ),
            (
                "on-premises server without TLS, claiming the partner's domain",
                client("10.0.0.25", true, None),
                "boss@partner.example",
                Some("451 4.7.1 Connector partner-in (sender domain partner.example): client address 10.0.0.25 is not one of its addresses"),
            ),
        ];
        for (label, c, from, want) in cases {
            let got = a.check_sender(c, from).err().map(|r| r.to_string());
            assert_eq!(got.as_deref(), *want, "{label}");
        }
    }

    #[test]
    fn a_requested_certificate_without_names_is_no_condition() {
        let mut a = admission();
        a.connectors[ONPREM].client_certificate = ClientCertificate::Requested;
        let onprem = client("10.0.0.25", true, None);
        assert_eq!(code(a.check_sender(&onprem, "a@example.org")), 250);
        a.connectors[ONPREM].client_certificate = ClientCertificate::Required;
        assert_eq!(code(a.check_sender(&onprem, "a@example.org")), 451);
    }

    #[test]
    fn relay_for_anyone_is_recognised() {
        let mut c = admission().connectors[ONPREM].clone();
        assert!(!c.relays_for_anyone());
        c.client_addresses = vec!["0.0.0.0/0".parse().unwrap()];
        assert!(c.relays_for_anyone());
        c.client_addresses.clear();
        assert!(c.relays_for_anyone());
        c.client_certificate = ClientCertificate::Required;
        assert!(c.relays_for_anyone(), "any certificate from the anchors");
        c.certificate_names = vec!["relay.partner.example".parse().unwrap()];
        assert!(!c.relays_for_anyone());
        c.allow_relay = false;
        c.client_certificate = ClientCertificate::None;
        c.certificate_names.clear();
        assert!(!c.relays_for_anyone());
    }
}
