//! Interop with real Postfix 3.7 on loopback: Postfix as the next hop at
//! each TLS level, and Postfix as the sending server whose queue must keep
//! a message the relay refuses with 4.7.x until the next hop is fixed.

use tlsrelay_core::report::LegSecurity;
use tlsrelay_tests::postfix::{have_postfix, Postfix, PostfixSetup};
use tlsrelay_tests::*;

/// A complete message (Postfix adds only trace headers on top of it), with
/// a line that needs dot-stuffing.
const BODY: &str = "From: a@sender.test\nTo: x@partner.test\nDate: Sun, 29 Nov 2026 06:00:00 +0000\nMessage-Id: <interop@sender.test>\nSubject: interop\n\nfirst line\n.dot line\nlast line";

fn relay_config(pki: &Pki, relay_cert: &Leaf, next_hop: u16, connector_tls: &str) -> String {
    format!(
        r#"
ebpf.enabled = false
accepted_domains = ["partner.test"]
[limits]
smtp_timeout_scale = 0.1

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
tls.mode = "opportunistic"
tls.certificates = [{{ chain = {chain}, key = {key} }}]

[[outbound_connectors]]
name = "partner"
recipient_domains = ["partner.test"]
next_hops = ["127.0.0.1:{next_hop}"]
{connector_tls}
tls.trust_anchors = {ca}
tls.names = ["sink.partner.test"]
"#,
        chain = toml_path(&relay_cert.chain),
        key = toml_path(&relay_cert.key),
        ca = toml_path(&pki.ca_pem),
    )
}

#[cfg_attr(
    any(missing_swaks, missing_postfix),
    ignore = "needs swaks and postfix and root"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_next_hop_at_each_tls_level() {
    if !have_swaks() || !have_postfix() {
        return;
    }
    let pki = Pki::new();
    let relay_cert = pki.leaf("relay", &["relay.test"]);
    let sink_cert = pki.leaf("sink", &["sink.partner.test"]);
    // (smtpd_tls_security_level, connector policy, TLS expected on the leg)
    for (level, policy, tls) in [
        ("none", "tls.policy = \"opportunistic\"", false),
        (
            "may",
            "tls.policy = \"required\"\ntls.verify = \"name\"",
            true,
        ),
        (
            "encrypt",
            "tls.policy = \"required\"\ntls.verify = \"name\"",
            true,
        ),
    ] {
        let receiver = Postfix::start(PostfixSetup {
            hostname: "sink.partner.test",
            mailbox_domains: "partner.test",
            smtpd_tls: (level, Some((&sink_cert.chain, &sink_cert.key))),
            relayhost: None,
        });
        let mut relay = TestRelay::start(
            &relay_config(&pki, &relay_cert, receiver.port, policy),
            pki.dir(),
        )
        .await;
        let (ok, transcript) = swaks_to(
            relay.addr("mx"),
            &[
                "--tls",
                "--from",
                "a@sender.test",
                "--to",
                "x@partner.test",
                "--data",
                BODY,
            ],
        )
        .await;
        assert!(ok, "{level}: {transcript}");
        assert!(
            transcript.contains("queued as"),
            "Postfix's own reply reaches the sender:\n{transcript}"
        );
        let got = receiver.wait_delivered(1);
        assert_eq!(got.len(), 1, "{level}: delivered once\n{}", receiver.log());
        assert!(
            got[0].ends_with(&format!("{BODY}\n")),
            "{level}: message intact:\n{}",
            got[0]
        );
        // Postfix's own Received line says how the relay reached it.
        assert_eq!(
            got[0].contains("(Postfix) with ESMTPS"),
            tls,
            "{level}: {}",
            got[0]
        );
        assert!(
            got[0].contains("by relay.test (tlsrelay) with ESMTPS"),
            "the relay's trace line, below Postfix's: {}",
            got[0]
        );
        let report = relay.next_report().await;
        assert_eq!(
            matches!(report.outbound, Some(LegSecurity::Tls { .. })),
            tls,
            "{report}"
        );
    }
}

#[cfg_attr(
    any(missing_swaks, missing_postfix),
    ignore = "needs swaks and postfix and root"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_sender_keeps_the_message_queued_until_forced_tls_works() {
    if !have_swaks() || !have_postfix() {
        return;
    }
    // The sender's own TLS level towards the relay: the relay offers
    // STARTTLS with a certificate from the test CA named relay.test.
    for level in ["may", "encrypt", "verify"] {
        sender_round(level).await;
    }
}

async fn sender_round(level: &str) {
    let pki = Pki::new();
    let relay_cert = pki.leaf("relay", &["relay.test"]);
    let sink_cert = pki.leaf("sink", &["sink.partner.test"]);
    // The next hop does not offer STARTTLS yet.
    let receiver = Postfix::start(PostfixSetup {
        hostname: "sink.partner.test",
        mailbox_domains: "partner.test",
        smtpd_tls: ("none", Some((&sink_cert.chain, &sink_cert.key))),
        relayhost: None,
    });
    let relay = TestRelay::start(
        &relay_config(
            &pki,
            &relay_cert,
            receiver.port,
            "tls.policy = \"required\"\ntls.verify = \"name\"",
        ),
        pki.dir(),
    )
    .await;
    let relayhost = format!("[127.0.0.1]:{}", relay.addr("mx").port());
    let sender = Postfix::start(PostfixSetup {
        hostname: "out.sender.test",
        mailbox_domains: "",
        smtpd_tls: ("none", None),
        relayhost: Some((relayhost, level, &pki.ca_pem)),
    });
    let sender_addr: std::net::SocketAddr = ([127, 0, 0, 1], sender.port).into();
    let (ok, transcript) = swaks_to(
        sender_addr,
        &[
            "--from",
            "a@sender.test",
            "--to",
            "x@partner.test",
            "--data",
            BODY,
        ],
    )
    .await;
    assert!(ok, "{level}: the sending Postfix queued it: {transcript}");
    // The relay refuses with 4.7.5; Postfix keeps the message. The event
    // is the sending Postfix's own delivery record for the attempt: the
    // queue file itself moves between the deferred and active queues at
    // each retry, so a look at one directory can miss it.
    let deferral = sender.wait_for_log_line("the deferral", |line| {
        line.contains("to=<x@partner.test>") && line.contains("status=deferred")
    });
    assert!(
        deferral.contains("4.7.5"),
        "the sender saw the relay's 4.7.5: {deferral}"
    );
    assert!(
        deferral.contains("not offered"),
        "with the reason: {deferral}"
    );
    let queued = sender.mailq();
    assert!(queued.contains("x@partner.test"), "still queued: {queued}");
    assert!(receiver.delivered().is_empty());
    // Fix the next hop; the queued message now goes through, once, over TLS.
    receiver.reconfigure("smtpd_tls_security_level = may");
    sender.flush();
    let got = receiver.wait_delivered(1);
    assert_eq!(
        got.len(),
        1,
        "delivered after the fix:\n{}\n{}",
        sender.log(),
        receiver.log()
    );
    assert!(got[0].contains("(Postfix) with ESMTPS"), "{}", got[0]);
    // And the sender's leg to the relay was TLS at its level (postlogd
    // writes the log after the fact: waited for, not read once).
    let established = sender.wait_for_log_line("the sender's TLS line", |line| {
        line.contains("TLS connection established to 127.0.0.1")
    });
    if level == "verify" {
        assert!(
            established.contains("Verified TLS connection established"),
            "{established}"
        );
    }
    assert!(got[0].ends_with(&format!("{BODY}\n")), "{}", got[0]);
    sender.wait_queue_empty();
    assert_eq!(receiver.delivered().len(), 1, "delivered once");
}

/// REQUIRETLS (RFC 8689) end to end: a message marked REQUIRETLS goes to a
/// verified next hop that offers REQUIRETLS (the test sink), and is
/// refused with 550 5.7.30 where the verified next hop is Postfix 3.7,
/// which does not offer it; nothing reaches Postfix.
#[cfg_attr(missing_postfix, ignore = "needs postfix and root")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requiretls_goes_only_to_a_verified_next_hop_that_offers_it() {
    if !have_postfix() {
        return;
    }
    use tlsrelay_tests::smtp_client::RawSmtp;
    use tlsrelay_tests::smtp_sink::{smtp_sink, SinkOptions};
    let pki = Pki::new();
    let relay_cert = pki.leaf("relay", &["relay.test"]);
    let sink_cert = pki.leaf("sink", &["sink.partner.test"]);
    let postfix = Postfix::start(PostfixSetup {
        hostname: "sink.partner.test",
        mailbox_domains: "partner.test",
        smtpd_tls: ("may", Some((&sink_cert.chain, &sink_cert.key))),
        relayhost: None,
    });
    let sink = smtp_sink(SinkOptions {
        tls: Some(server_config(&ServerOptions {
            leaf: &sink_cert,
            versions: Versions::Both,
            client_ca: None,
        })),
        chunking: true,
        refuse_marker: "nobody",
        requiretls: true,
    })
    .await;
    let verified = "tls.policy = \"required\"\ntls.verify = \"name\"";
    for (port, offers) in [(sink.addr.port(), true), (postfix.port, false)] {
        let mut relay =
            TestRelay::start(&relay_config(&pki, &relay_cert, port, verified), pki.dir()).await;
        let mut c = RawSmtp::connect(relay.addr("mx")).await;
        c.cmd("EHLO client.test").await;
        c.starttls().await;
        assert!(c.cmd("EHLO client.test").await.contains("250 REQUIRETLS"));
        let reply = c.cmd("MAIL FROM:<a@sender.test> REQUIRETLS").await;
        assert!(reply.starts_with("250"), "{reply}");
        let reply = c.cmd("RCPT TO:<x@partner.test>").await;
        if offers {
            assert!(reply.starts_with("250"), "{reply}");
            assert!(c.cmd("DATA").await.starts_with("354"));
            let end = c.cmd("Subject: r\r\n\r\nsecret\r\n.").await;
            assert!(end.starts_with("250"), "{end}");
            let got = sink.received.lock().unwrap().clone();
            assert_eq!(got.len(), 1);
            assert!(got[0].over_tls);
            let wire = String::from_utf8_lossy(&sink.wire()).into_owned();
            assert!(
                wire.contains("MAIL FROM:<a@sender.test> REQUIRETLS"),
                "{wire}"
            );
        } else {
            assert!(
                reply.starts_with("550 5.7.30 REQUIRETLS support required")
                    && reply.contains("it does not offer REQUIRETLS"),
                "{reply}"
            );
        }
        c.cmd("QUIT").await;
        let report = relay.next_report().await;
        let t = &report.transactions[0];
        if offers {
            assert_eq!(t.recipients, ["x@partner.test"], "{report}");
        } else {
            assert!(t.recipients.is_empty(), "{report}");
            assert!(t.refused[0].starts_with("550 5.7.30"), "{report}");
            assert_eq!(t.result, None, "never got to DATA: {report}");
        }
    }
    assert!(postfix.delivered().is_empty(), "nothing reached Postfix");
}
