//! The mail edge as a stranger on the Internet meets it: who may relay,
//! SMTP smuggling, and what partner connectors demand. Clients are swaks
//! and a raw socket client, connecting from 127.0.0.2 (a stranger),
//! 127.0.0.3 (the on-premises network) or 127.0.0.1 (the partner); behind
//! the relay two next hops (inside for the accepted domains, outside for
//! the Internet) record every byte they read.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tlsrelay_tests::smtp_client::RawSmtp;
use tlsrelay_tests::smtp_sink::{smtp_sink, Sink, SinkOptions};
use tlsrelay_tests::*;

const PARTNER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const ON_PREMISES: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

async fn sink() -> Sink {
    smtp_sink(SinkOptions {
        tls: None,
        chunking: true,
        refuse_marker: "nobody",
        requiretls: false,
    })
    .await
}

/// The two next hops behind the edge.
struct NextHops {
    inside: Sink,
    outside: Sink,
}

impl NextHops {
    async fn new() -> NextHops {
        NextHops {
            inside: sink().await,
            outside: sink().await,
        }
    }

    /// example.org and its subdomains are accepted and go inside; every
    /// other domain goes outside. `connectors` are the inbound connectors.
    fn config(&self, listen: &str, connectors: &str) -> String {
        format!(
            r#"
ebpf.enabled = false
accepted_domains = ["example.org", ".example.org"]
[limits]
smtp_timeout_scale = 0.05
handshake_timeout = "5s"

[[listeners]]
name = "mx"
address = "{listen}"
protocol = "smtp"
hostname = "mx.example.org"
tls.mode = "opportunistic"

[[outbound_connectors]]
name = "on-premises"
recipient_domains = ["example.org", ".example.org"]
next_hops = ["{inside}"]
tls.policy = "plain"

[[outbound_connectors]]
name = "internet"
recipient_domains = ["*"]
next_hops = ["{outside}"]
tls.policy = "plain"

{connectors}
"#,
            inside = self.inside.addr,
            outside = self.outside.addr,
        )
    }

    fn delivered(&self) -> (usize, usize) {
        (
            self.inside.received.lock().unwrap().len(),
            self.outside.received.lock().unwrap().len(),
        )
    }
}

const ON_PREMISES_RELAYS: &str = "[[inbound_connectors]]\nname = \"on-premises-in\"\nclient_addresses = [\"127.0.0.3/32\"]\nallow_relay = true\n";

async fn swaks_from(from: IpAddr, relay: SocketAddr, args: &[&str]) -> (bool, String) {
    let local = from.to_string();
    let mut all = vec!["--local-interface", local.as_str()];
    all.extend_from_slice(args);
    swaks_to(relay, &all).await
}

/// swaks from `from`, with STARTTLS when `tls`, presenting `cert` if any.
async fn swaks_with_certificate(
    from: IpAddr,
    relay: SocketAddr,
    args: &[&str],
    tls: bool,
    cert: Option<&Leaf>,
) -> (bool, String) {
    let files = cert.map(|c| (c.chain.display().to_string(), c.key.display().to_string()));
    let mut all = args.to_vec();
    if tls {
        all.push("--tls");
    }
    if let Some((chain, key)) = &files {
        all.extend(["--tls-cert", chain.as_str(), "--tls-key", key.as_str()]);
    }
    swaks_from(from, relay, &all).await
}

#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_may_send_to_accepted_domains_but_not_relay() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let hops = NextHops::new().await;
    let relay = TestRelay::start(&hops.config("127.0.0.1:0", ON_PREMISES_RELAYS), pki.dir()).await;
    let mx = relay.addr("mx");

    let (ok, transcript) = swaks_from(
        STRANGER,
        mx,
        &[
            "--ehlo",
            "spammer.test",
            "--from",
            "spam@spammer.test",
            "--to",
            "ceo@example.org",
        ],
    )
    .await;
    assert!(ok, "mail for an accepted domain is accepted: {transcript}");
    assert_eq!(hops.delivered(), (1, 0));

    let (ok, transcript) = swaks_from(
        STRANGER,
        mx,
        &[
            "--ehlo",
            "spammer.test",
            "--from",
            "spam@spammer.test",
            "--to",
            "victim@gmail.example",
        ],
    )
    .await;
    assert!(!ok, "{transcript}");
    assert!(
        transcript.contains("554 5.7.1 <victim@gmail.example>: Relay access denied"),
        "{transcript}"
    );
    assert_eq!(hops.outside.connections(), 0, "no next hop heard of it");
    assert_eq!(hops.delivered(), (1, 0));

    // The on-premises network may relay anywhere.
    let (ok, transcript) = swaks_from(
        ON_PREMISES,
        mx,
        &[
            "--from",
            "app@example.org",
            "--to",
            "customer@gmail.example",
        ],
    )
    .await;
    assert!(ok, "{transcript}");
    assert_eq!(hops.delivered(), (1, 1));
    assert_eq!(
        hops.outside.received.lock().unwrap()[0].recipients,
        vec!["customer@gmail.example"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_recipients_of_both_kinds_are_judged_one_by_one() {
    let pki = Pki::new();
    let hops = NextHops::new().await;
    let relay = TestRelay::start(&hops.config("127.0.0.1:0", ON_PREMISES_RELAYS), pki.dir()).await;
    let mut c = RawSmtp::connect_from(STRANGER, relay.addr("mx")).await;
    assert!(c.cmd("EHLO spammer.test").await.contains("PIPELINING"));
    c.send(
        b"MAIL FROM:<spam@spammer.test>\r\nRCPT TO:<ceo@example.org>\r\nRCPT TO:<victim@gmail.example>\r\nRCPT TO:<victim%gmail.example@example.org>\r\nRCPT TO:<sales@eu.Example.Org>\r\nDATA\r\n",
    )
    .await;
    let mut replies = Vec::new();
    for _ in 0..6 {
        replies.push(c.reply().await);
    }
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        codes,
        ["250", "250", "554", "554", "250", "354"],
        "{replies:#?}"
    );
    assert!(replies[2].starts_with("554 5.7.1 <victim@gmail.example>: Relay access denied"));
    assert!(c
        .cmd("Subject: pipelined\r\n\r\nhello\r\n.")
        .await
        .contains("queued as SINK"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let inside = hops.inside.received.lock().unwrap().clone();
    assert_eq!(inside.len(), 1);
    assert_eq!(
        inside[0].recipients,
        ["ceo@example.org", "sales@eu.Example.Org"]
    );
    assert_eq!(hops.outside.connections(), 0);
    let wire = String::from_utf8_lossy(&hops.inside.wire()).into_owned();
    assert!(
        !wire.contains("gmail"),
        "refused recipients never reach a next hop: {wire}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_are_judged_by_their_address() {
    let pki = Pki::new();
    for (range, may_relay) in [("::1/128", true), ("2001:db8::/32", false)] {
        let hops = NextHops::new().await;
        let connector = format!(
            "[[inbound_connectors]]\nname = \"on-premises-in\"\nclient_addresses = [\"{range}\"]\nallow_relay = true\n"
        );
        let relay = TestRelay::start(&hops.config("[::1]:0", &connector), pki.dir()).await;
        let mut c = RawSmtp::connect(relay.addr("mx")).await;
        c.cmd("EHLO client.test").await;
        assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
        let foreign = c.cmd("RCPT TO:<x@gmail.example>").await;
        assert_eq!(foreign.starts_with("250"), may_relay, "{range}: {foreign}");
        if !may_relay {
            assert!(foreign.starts_with("554 5.7.1"), "{foreign}");
            assert_eq!(hops.outside.connections(), 0);
            assert!(c.cmd("RSET").await.starts_with("250"));
            assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
            assert!(
                c.cmd("RCPT TO:<x@example.org>").await.starts_with("250"),
                "{range}"
            );
        }
        assert!(c.cmd("DATA").await.starts_with("354"));
        assert!(c.cmd("Subject: v6\r\n\r\nx\r\n.").await.starts_with("250"));
        let want = if may_relay { (0, 1) } else { (1, 0) };
        assert_eq!(hops.delivered(), want, "{range}");
    }
}

/// A partner that may relay is identified by its certificate alone (no
/// address): chained to its anchors and named as configured.
#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_certificate_may_relay_and_nothing_else_does() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let other_ca = Pki::new();
    let right = pki.leaf("relay-partner", &["relay.partner.test"]);
    let wrong_name = pki.leaf("other-name", &["mail.intruder.test"]);
    let forged = other_ca.leaf("forged", &["relay.partner.test"]);
    let hops = NextHops::new().await;
    let connector = format!(
        "[[inbound_connectors]]\nname = \"partner-relay\"\ncertificate_names = [\"relay.partner.test\"]\nclient_certificate = \"required\"\ntrust_anchors = {}\nallow_relay = true\n",
        toml_path(&pki.ca_pem)
    );
    let mut relay = TestRelay::start(&hops.config("127.0.0.1:0", &connector), pki.dir()).await;
    let mx = relay.addr("mx");
    for (label, cert, relayed) in [
        ("right certificate", Some(&right), true),
        ("no certificate", None, false),
        ("wrong name", Some(&wrong_name), false),
        ("right name from another CA", Some(&forged), false),
    ] {
        let args = ["--from", "a@partner.test", "--to", "x@gmail.example"];
        let (ok, transcript) = swaks_with_certificate(STRANGER, mx, &args, true, cert).await;
        assert_eq!(ok, relayed, "{label}: {transcript}");
        if !relayed {
            assert!(transcript.contains("554 5.7.1"), "{label}: {transcript}");
        }
        let report = relay.next_report().await;
        let trust = match &report.inbound {
            Some(tlsrelay_core::report::LegSecurity::Tls { trust, .. }) => *trust,
            other => panic!("{label}: STARTTLS must succeed whatever the certificate: {other:?}"),
        };
        use tlsrelay_core::policy::PeerTrust;
        let want = match label {
            "right certificate" => PeerTrust::Verified,
            "no certificate" => PeerTrust::Anonymous,
            "wrong name" => PeerTrust::Trusted,
            _ => PeerTrust::Untrusted,
        };
        assert_eq!(trust, want, "{label}");
    }
    assert_eq!(hops.delivered(), (0, 1));
    assert_eq!(hops.outside.connections(), 1);
}

/// Issue 11's partner table: every condition holds whatever claimed the
/// session (its address, its certificate, or a sender in its domain), or
/// MAIL gets 451 4.7.1 naming the unmet one.
#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_connector_conditions_hold_whatever_claims_the_session() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let other_ca = Pki::new();
    let right = pki.leaf("partner-right", &["mail.partner.test"]);
    let wrong_name = pki.leaf("partner-wrong", &["mail.intruder.test"]);
    let forged = other_ca.leaf("partner-forged", &["mail.partner.test"]);
    let hops = NextHops::new().await;
    let connector = format!(
        "[[inbound_connectors]]\nname = \"partner-in\"\nclient_addresses = [\"127.0.0.1/32\"]\ncertificate_names = [\"mail.partner.test\"]\nsender_domains = [\"partner.test\"]\ntls = \"required\"\nclient_certificate = \"required\"\ntrust_anchors = {}\n",
        toml_path(&pki.ca_pem)
    );
    let relay = TestRelay::start(&hops.config("127.0.0.1:0", &connector), pki.dir()).await;
    let mx = relay.addr("mx");
    // (case, client address, TLS, certificate, sender, None = delivered /
    // Some(what the 451 names))
    let cases = [
        ("right address + right certificate", PARTNER, true, Some(&right), "boss@partner.test", None),
        (
            "right certificate + wrong address",
            STRANGER,
            true,
            Some(&right),
            "boss@partner.test",
            Some("(client certificate): client address 127.0.0.2 is not one of its addresses"),
        ),
        (
            "right certificate + wrong address, another sender",
            STRANGER,
            true,
            Some(&right),
            "someone@elsewhere.test",
            Some("(client certificate): client address 127.0.0.2 is not one of its addresses"),
        ),
        (
            "right address + no TLS",
            PARTNER,
            false,
            None,
            "boss@partner.test",
            Some("(client address): TLS is required (issue STARTTLS first)"),
        ),
        (
            "right address + no TLS, another sender",
            PARTNER,
            false,
            None,
            "bounces@elsewhere.test",
            Some("(client address): TLS is required (issue STARTTLS first)"),
        ),
        (
            "right address + TLS without a certificate",
            PARTNER,
            true,
            None,
            "boss@partner.test",
            Some("(client address): a client certificate is required"),
        ),
        (
            "wrong-name certificate",
            PARTNER,
            true,
            Some(&wrong_name),
            "boss@partner.test",
            Some("(client address): the client certificate's names (mail.intruder.test) are not among its certificate names"),
        ),
        (
            "certificate from another CA",
            PARTNER,
            true,
            Some(&forged),
            "boss@partner.test",
            Some("(client address): the client certificate is not issued by its trust anchors"),
        ),
        (
            "partner domain from elsewhere",
            STRANGER,
            true,
            None,
            "boss@partner.test",
            Some("(sender domain partner.test): client address 127.0.0.2 is not one of its addresses"),
        ),
        ("a stranger's own mail", STRANGER, false, None, "someone@elsewhere.test", None),
    ];
    let mut delivered = 0;
    for (label, from, tls, cert, sender, refusal) in cases {
        let args = ["--from", sender, "--to", "ceo@example.org"];
        let (ok, transcript) = swaks_with_certificate(from, mx, &args, tls, cert).await;
        match refusal {
            None => {
                assert!(ok, "{label}: {transcript}");
                delivered += 1;
            }
            Some(unmet) => {
                assert!(!ok, "{label}: {transcript}");
                let want = format!("451 4.7.1 Connector partner-in {unmet}");
                assert!(
                    transcript.contains(&want),
                    "{label}: want {want} in\n{transcript}"
                );
            }
        }
        assert_eq!(hops.delivered(), (delivered, 0), "{label}");
    }
}

/// Where a bare CR or LF sits (`None`: every line ends in CRLF).
fn first_bare(bytes: &[u8]) -> Option<usize> {
    bytes.iter().enumerate().position(|(i, &b)| match b {
        b'\n' => i == 0 || bytes[i - 1] != b'\r',
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        _ => false,
    })
}

/// Every smuggling variant, with a forged second message pipelined inside
/// it: the sender gets 554 5.6.0 at the relay's own end of data, the next
/// hop reads no bare CR or LF and none of the forged commands, and a clean
/// message afterwards in the same session is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_smuggling_never_reaches_a_next_hop() {
    let pki = Pki::new();
    let hops = NextHops::new().await;
    let relay = TestRelay::start(&hops.config("127.0.0.1:0", ON_PREMISES_RELAYS), pki.dir()).await;
    let variants: [&[u8]; 6] = [
        b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
    ];
    for variant in variants {
        let label = format!("{:?}", String::from_utf8_lossy(variant));
        let mut c = RawSmtp::connect_from(STRANGER, relay.addr("mx")).await;
        c.cmd("EHLO client.test").await;
        let mut data =
            b"MAIL FROM:<news@sender.test>\r\nRCPT TO:<ceo@example.org>\r\nDATA\r\n".to_vec();
        c.send(&data).await;
        for want in ["250", "250", "354"] {
            let reply = c.reply().await;
            assert!(reply.starts_with(want), "{label}: {reply}");
        }
        data = b"Subject: newsletter\r\n\r\nhello".to_vec();
        data.extend_from_slice(variant);
        data.extend_from_slice(
            b"MAIL FROM:<ceo@partner.test>\r\nRCPT TO:<finance@example.org>\r\nDATA\r\nSubject: forged\r\n\r\npay\r\n.\r\n",
        );
        c.send(&data).await;
        let refusal = c.reply().await;
        assert!(refusal.starts_with("554 5.6.0 Bare"), "{label}: {refusal}");
        // The session goes on: a clean message is delivered.
        assert!(
            c.cmd("MAIL FROM:<news@sender.test>")
                .await
                .starts_with("250"),
            "{label}"
        );
        assert!(
            c.cmd("RCPT TO:<ceo@example.org>").await.starts_with("250"),
            "{label}"
        );
        assert!(c.cmd("DATA").await.starts_with("354"), "{label}");
        assert!(
            c.cmd("Subject: clean\r\n\r\nhello\r\n.")
                .await
                .starts_with("250"),
            "{label}"
        );
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    let wire = hops.inside.wire();
    assert_eq!(
        first_bare(&wire),
        None,
        "{}",
        String::from_utf8_lossy(&wire)
    );
    let text = String::from_utf8_lossy(&wire);
    assert!(
        !text.contains("forged") && !text.contains("partner.test"),
        "{text}"
    );
    let inside = hops.inside.received.lock().unwrap().clone();
    assert_eq!(inside.len(), variants.len(), "only the clean messages");
    assert!(inside
        .iter()
        .all(|m| m.body == b"Subject: clean\r\n\r\nhello\r\n"));
    assert_eq!(hops.outside.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_line_ends_in_bdat_and_in_commands_are_refused_too() {
    let pki = Pki::new();
    let hops = NextHops::new().await;
    let relay = TestRelay::start(&hops.config("127.0.0.1:0", ON_PREMISES_RELAYS), pki.dir()).await;
    let mut c = RawSmtp::connect_from(STRANGER, relay.addr("mx")).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<news@sender.test>").await;
    assert!(c.cmd("RCPT TO:<ceo@example.org>").await.starts_with("250"));
    let chunk = b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<ceo@partner.test>\r\n";
    c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes())
        .await;
    c.send(chunk).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("554 5.6.0 Bare LF"), "{reply}");
    // A bare LF inside a command line would be two commands to a lenient
    // next hop: the second one a relay the relay never judged.
    assert!(c
        .cmd("MAIL FROM:<news@sender.test>")
        .await
        .starts_with("250"));
    c.send(b"RCPT TO:<ceo@example.org> X\nRCPT TO:<victim@gmail.example>\r\n")
        .await;
    let reply = c.reply().await;
    assert!(reply.starts_with("501 5.5.4"), "{reply}");
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let wire = hops.inside.wire();
    assert_eq!(
        first_bare(&wire),
        None,
        "{}",
        String::from_utf8_lossy(&wire)
    );
    assert!(!String::from_utf8_lossy(&wire).contains("partner.test"));
    assert_eq!(hops.delivered(), (0, 0));
    assert_eq!(hops.outside.connections(), 0);
}

/// What the session report says: a cleartext transaction on a listener
/// that offers STARTTLS is an inbound downgrade; the relay's own refusals
/// are in the transactions; a failed STARTTLS is not "plaintext".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_record_cleartext_mail_refusals_and_failed_starttls() {
    use tlsrelay_core::report::{Direction, Outcome};
    let pki = Pki::new();
    let hops = NextHops::new().await;
    let partner = "[[inbound_connectors]]\nname = \"partner-in\"\nclient_addresses = [\"127.0.0.1/32\"]\ntls = \"required\"\n";
    let mut relay = TestRelay::start(&hops.config("127.0.0.1:0", partner), pki.dir()).await;
    let mx = relay.addr("mx");

    let mut c = RawSmtp::connect_from(STRANGER, mx).await;
    assert!(c.cmd("EHLO client.test").await.contains("STARTTLS"));
    assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<x@gmail.example>")
        .await
        .starts_with("554 5.7.1"));
    assert!(c.cmd("RCPT TO:<ceo@example.org>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: s\r\n\r\nx\r\n.").await.starts_with("250"));
    c.cmd("QUIT").await;
    let report = relay.next_report().await;
    let d = report
        .downgraded(Direction::Inbound)
        .expect("downgrade recorded");
    assert_eq!(d.reason, "client did not use STARTTLS", "{report}");
    assert_eq!(report.transactions.len(), 1, "{report}");
    assert_eq!(
        report.transactions[0].refused,
        ["554 5.7.1 <x@gmail.example>: Relay access denied"]
    );
    assert!(report
        .to_string()
        .contains("downgrade(inbound)=\"client did not use STARTTLS\""));

    // The partner's address without TLS: the 451 is in the report.
    let mut c = RawSmtp::connect_from(PARTNER, mx).await;
    c.cmd("EHLO partner.test").await;
    assert!(c
        .cmd("MAIL FROM:<boss@partner.test>")
        .await
        .starts_with("451 4.7.1"));
    c.cmd("QUIT").await;
    let report = relay.next_report().await;
    let result = report.transactions[0].result.clone().unwrap_or_default();
    assert!(
        result.starts_with("451 4.7.1 Connector partner-in (client address): TLS is required"),
        "{report}"
    );
    assert!(
        report.to_string().contains("result=\"451 4.7.1"),
        "{report}"
    );

    // STARTTLS accepted, then garbage instead of a ClientHello.
    let mut c = RawSmtp::connect_from(STRANGER, mx).await;
    c.cmd("EHLO client.test").await;
    assert!(c.cmd("STARTTLS").await.starts_with("220"));
    c.send(b"this is not TLS\r\n").await;
    let report = relay.next_report().await;
    assert_eq!(
        report.inbound, None,
        "a failed STARTTLS is not plaintext: {report}"
    );
    assert!(
        matches!(
            &report.outcome,
            Outcome::Refused {
                leg: Direction::Inbound,
                ..
            }
        ),
        "{report}"
    );
    assert!(report.downgraded(Direction::Inbound).is_none(), "{report}");
    assert_eq!(hops.delivered(), (1, 0));
}
