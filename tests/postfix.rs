//! Interop with real Postfix 3.7 on loopback: Postfix as the next hop at
//! each TLS level, and Postfix as the sending server whose queue must keep
//! a message the relay refuses with 4.7.x until the next hop is fixed.

use tlsrelay::report::LegSecurity;
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
        assert_eq!(got[0].contains("with ESMTPS"), tls, "{level}: {}", got[0]);
        let report = relay.next_report().await;
        assert_eq!(
            matches!(report.outbound, Some(LegSecurity::Tls { .. })),
            tls,
            "{report}"
        );
    }
}

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
    // The relay refuses with 4.7.5; Postfix keeps the message.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sender.deferred() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not deferred:\n{}",
            sender.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let log = sender.log();
    assert!(
        log.contains("4.7.5"),
        "the sender saw the relay's 4.7.5:\n{log}"
    );
    assert!(log.contains("not offered"), "with the reason:\n{log}");
    assert!(
        sender.mailq().contains("x@partner.test"),
        "{}",
        sender.mailq()
    );
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
    assert!(got[0].contains("with ESMTPS"), "{}", got[0]);
    // And the sender's leg to the relay was TLS at its level.
    let log = sender.log();
    assert!(
        log.contains("TLS connection established to 127.0.0.1"),
        "{level}:\n{log}"
    );
    if level == "verify" {
        assert!(log.contains("Verified TLS connection established"), "{log}");
    }
    assert!(got[0].ends_with(&format!("{BODY}\n")), "{}", got[0]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(sender.deferred(), 0, "left the queue");
    assert_eq!(receiver.delivered().len(), 1, "delivered once");
}
