//! Delivery to the Internet by MX, against an authoritative DNS server
//! (nsd) serving a DNSSEC-signed zone made per test, with the relay's
//! resolver pointed at it and trusting its key; MX hosts are SMTP sinks
//! on loopback addresses (127.0.0.x) on one port per test.

use std::net::SocketAddr;

use tlsrelay_core::policy::PeerTrust;
use tlsrelay_core::report::{LegSecurity, SessionReport};
use tlsrelay_tests::dns::{have_dns_tools, tlsa_data, SignedDns, Zones};
use tlsrelay_tests::smtp_client::RawSmtp;
use tlsrelay_tests::smtp_sink::{smtp_sink_at, Sink, SinkOptions};
use tlsrelay_tests::*;

/// An MX host on `ip` and the test's port, offering STARTTLS with `leaf`
/// when given.
async fn mx_host(ip: &str, port: u16, leaf: Option<&Leaf>) -> Sink {
    let tls = leaf.map(|leaf| {
        server_config(&ServerOptions {
            leaf,
            versions: Versions::Both,
            client_ca: None,
        })
    });
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    smtp_sink_at(
        addr,
        SinkOptions {
            tls,
            chunking: true,
            refuse_marker: "nobody",
            requiretls: false,
        },
    )
    .await
}

/// A relay that delivers everything from 127.0.0.1 by MX on `port`,
/// resolving through `dns`; `extra` goes into the connector.
async fn relay(dns: &SignedDns, port: u16, extra: &str, dir: &std::path::Path) -> TestRelay {
    TestRelay::start(&config(dns, port, extra), dir).await
}

fn config(dns: &SignedDns, port: u16, extra: &str) -> String {
    format!(
        r#"
ebpf.enabled = false
[limits]
smtp_timeout_scale = 0.05
handshake_timeout = "5s"

[dns]
nameservers = ["{dns}"]
trust_anchors = {anchors}

[[listeners]]
name = "edge"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.example.org"
tls.mode = "opportunistic"

[[inbound_connectors]]
name = "apps"
client_addresses = ["127.0.0.1/32"]
allow_relay = true

[[outbound_connectors]]
name = "internet"
recipient_domains = ["*"]
next_hops = ["mx:{port}"]
# This loopback Internet's hosts live in 127/8.
allow_private_mx = ["127.0.0.0/8"]
{extra}
"#,
        dns = dns.addr,
        anchors = toml_path(&dns.anchors),
    )
}

/// One message to `to`; the reply to each RCPT, and to the end of data
/// when a recipient was accepted.
async fn send(relay: &TestRelay, to: &[&str]) -> Vec<String> {
    send_to(relay.addr("edge"), to).await
}

async fn send_to(relay: SocketAddr, to: &[&str]) -> Vec<String> {
    let mut c = RawSmtp::connect(relay).await;
    c.cmd("EHLO app.example.org").await;
    assert!(c
        .cmd("MAIL FROM:<app@example.org>")
        .await
        .starts_with("250"));
    let mut replies = Vec::new();
    for rcpt in to {
        replies.push(c.cmd(&format!("RCPT TO:<{rcpt}>")).await);
    }
    if replies.iter().any(|r| r.starts_with("250")) {
        assert!(c.cmd("DATA").await.starts_with("354"));
        replies.push(c.cmd("Subject: by MX\r\n\r\nhello\r\n.").await);
    }
    c.cmd("QUIT").await;
    replies
}

fn received(sink: &Sink) -> usize {
    sink.received.lock().unwrap().len()
}

/// The outbound leg's security in the session's one transaction.
fn outbound(report: &SessionReport) -> (String, Option<LegSecurity>) {
    let t = &report.transactions[0];
    (t.next_hop.clone().unwrap_or_default(), t.outbound.clone())
}

fn trust(security: &Option<LegSecurity>) -> Option<PeerTrust> {
    match security {
        Some(LegSecurity::Tls { trust, .. }) => Some(*trust),
        _ => None,
    }
}

#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_goes_to_the_mx_hosts_in_preference_order() {
    if !have_dns_tools() {
        return;
    }
    let dns = SignedDns::start(&Zones {
        signed: "pref IN MX 10 mx1.pref.test.\npref IN MX 20 mx2.pref.test.\n\
                 mx1.pref IN A 127.0.0.2\nmx2.pref IN A 127.0.0.3\n\
                 implicit IN A 127.0.0.4\n\
                 nullmx IN MX 0 .\n\
                 other IN MX 10 mx.other.test.\nmx.other IN A 127.0.0.5\n",
        unsigned: &[],
        tamper: &[],
    });
    let pki = Pki::new();
    let port = free_port();
    // mx1 (preference 10) is down: nothing listens on 127.0.0.2.
    let mx2 = mx_host("127.0.0.3", port, None).await;
    let implicit = mx_host("127.0.0.4", port, None).await;
    let other = mx_host("127.0.0.5", port, None).await;
    let mut relay = relay(&dns, port, "", pki.dir()).await;

    let replies = send(&relay, &["a@pref.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    assert_eq!(received(&mx2), 1);
    let (hop, _) = outbound(&relay.next_report().await);
    assert_eq!(hop, format!("mx2.pref.test[127.0.0.3:{port}]"));

    // No MX: the domain's own address (RFC 5321 5.1).
    let replies = send(&relay, &["b@implicit.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    assert_eq!(received(&implicit), 1);
    relay.next_report().await;

    // A null MX refuses the domain for good, and so does a domain that
    // does not exist (NXDOMAIN, as Postfix); an unanswerable domain (nsd is
    // not authoritative for it: REFUSED) is deferred.
    let replies = send(
        &relay,
        &["c@nullmx.test", "d@nowhere.example", "e@nosuch.test"],
    )
    .await;
    assert_eq!(
        replies,
        [
            "556 5.1.10 Recipient domain nullmx.test accepts no mail (null MX)\r\n",
            "451 4.4.3 DNS lookup failed for nowhere.example. MX; try again later\r\n",
            "550 5.1.2 Recipient domain nosuch.test does not exist (NXDOMAIN)\r\n",
        ]
    );
    relay.next_report().await;

    // A domain DNS cannot be asked about (it would also name report and
    // policy cache files) is refused at RCPT.
    let replies = send(&relay, &["d@../../tmp/x", "d@x..y"]).await;
    assert!(
        replies[0].starts_with("501 5.5.4"),
        "not even an address: {replies:?}"
    );
    assert!(replies[1].starts_with("501 5.1.3"), "{replies:?}");
    relay.next_report().await;

    // Two domains in one transaction: the second is 452, sent next.
    let replies = send(&relay, &["e@pref.test", "f@other.test"]).await;
    assert!(replies[0].starts_with("250"), "{replies:?}");
    assert!(replies[1].starts_with("452 4.5.3"), "{replies:?}");
    assert!(replies[2].starts_with("250"), "{replies:?}");
    assert_eq!((received(&mx2), received(&other)), (2, 0));
    let replies = send(&relay, &["f@other.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    assert_eq!(received(&other), 1);
    assert_eq!(
        other.received.lock().unwrap()[0].recipients,
        ["f@other.test"]
    );
}

/// A wildcard MX in a signed zone (`*.wild.test`) serves every name under
/// it: one label and two labels below, each DNSSEC-proven (the answer is
/// synthesized, its proof an NSEC that no closer name exists). Where that
/// NSEC does not verify (`*.forged.test`, its type list altered after
/// signing), the expansion is not proven: deferred as bogus.
#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_wildcard_mx_delivers_at_any_depth() {
    if !have_dns_tools() {
        return;
    }
    let port = free_port();
    let dns = SignedDns::start(&Zones {
        signed: "*.wild IN MX 10 mx.wild.test.\nmx.wild IN A 127.0.0.20\n\
                 *.forged IN MX 10 mx.forged.test.\nmx.forged IN A 127.0.0.20\n",
        unsigned: &[],
        tamper: &[(
            "NSEC\tmx.forged.test. MX RRSIG NSEC",
            "NSEC\tmx.forged.test. MX TXT RRSIG NSEC",
        )],
    });
    let pki = Pki::new();
    let sink = mx_host("127.0.0.20", port, None).await;
    let mut relay = relay(&dns, port, "", pki.dir()).await;
    for to in ["u@a.wild.test", "v@b.c.wild.test"] {
        let replies = send(&relay, &[to]).await;
        assert!(
            replies.len() == 2 && replies[1].starts_with("250"),
            "{to}: {replies:?}"
        );
        relay.next_report().await;
    }
    assert_eq!(received(&sink), 2);
    let replies = send(&relay, &["w@a.forged.test"]).await;
    assert_eq!(
        replies,
        ["451 4.4.3 DNSSEC validation failed for a.forged.test. MX; try again later\r\n"]
    );
}

fn resumed(security: &Option<LegSecurity>) -> Option<bool> {
    match security {
        Some(LegSecurity::Tls { negotiated, .. }) => Some(negotiated.resumed),
        _ => None,
    }
}

/// A returning delivery to an MX host resumes its TLS session, as Postfix
/// does with its session cache; a ticket is kept per host and the checks
/// it passed, so one from a verified-by-name session is not offered to the
/// same host once DANE holds it, which starts over with a full handshake.
#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_deliveries_resume_the_mx_hosts_tls_session() {
    if !have_dns_tools() {
        return;
    }
    let pki = Pki::new();
    let port = free_port();
    let leaf = pki.leaf("mx", &["mx.resume.test", "mx.dane.test"]);
    // One sink, two names: plain TLS for resume.test, DANE for dane.test.
    let zone = dane_zone("resume", port, "").replace("127.0.0.2", "127.0.0.19")
        + &dane_zone("dane", port, &format!("3 1 1 {}", tlsa_data(&leaf, 1, 1)))
            .replace("127.0.0.2", "127.0.0.19");
    let dns = SignedDns::start(&Zones {
        signed: &zone,
        unsigned: &[],
        tamper: &[],
    });
    let sink = mx_host("127.0.0.19", port, Some(&leaf)).await;
    // Each delivery on a connection of its own (no reuse), so each has a
    // handshake to resume.
    let anchors = format!(
        "tls.trust_anchors = {}\nconnection_cache_time = \"0s\"",
        toml_path(&pki.ca_pem)
    );
    let mut relay = relay(&dns, port, &anchors, pki.dir()).await;
    for (to, want) in [
        ("a@resume.test", false),
        ("b@resume.test", true),
        ("c@resume.test", true),
        ("d@dane.test", false),
        ("e@dane.test", true),
    ] {
        let replies = send(&relay, &[to]).await;
        assert!(replies[1].starts_with("250"), "{to}: {replies:?}");
        let report = relay.next_report().await;
        let (_, security) = outbound(&report);
        assert_eq!(resumed(&security), Some(want), "{to}: {report}");
        assert_eq!(
            trust(&security),
            Some(PeerTrust::Verified),
            "{to}: {report}"
        );
    }
    assert_eq!(received(&sink), 5);
    drop(relay);

    // With reuse, a domain's connection carries that domain's mail only,
    // though both domains' MX is the same host.
    let anchors = anchors.replace("\"0s\"", "\"1m\"");
    let mut relay2 = crate::relay(&dns, port, &anchors, pki.dir()).await;
    for (to, reused) in [
        ("a@resume.test", false),
        ("b@resume.test", true),
        ("d@dane.test", false),
        ("e@dane.test", true),
    ] {
        let replies = send(&relay2, &[to]).await;
        assert!(replies[1].starts_with("250"), "{to}: {replies:?}");
        let report = relay2.next_report().await;
        assert_eq!(report.transactions[0].reused, reused, "{to}: {report}");
        let (_, security) = outbound(&report);
        assert_eq!(
            trust(&security),
            Some(PeerTrust::Verified),
            "{to}: {report}"
        );
    }
    assert_eq!(received(&sink), 9);
}

/// The zone for the DANE tests: `name` has one MX host on 127.0.0.2 whose
/// TLSA record is `tlsa` (none when empty).
fn dane_zone(name: &str, port: u16, tlsa: &str) -> String {
    let mut zone = format!("{name} IN MX 10 mx.{name}.test.\nmx.{name} IN A 127.0.0.2\n");
    if !tlsa.is_empty() {
        zone += &format!("_{port}._tcp.mx.{name} IN TLSA {tlsa}\n");
    }
    zone
}

#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ee_authenticates_the_mx_host_whatever_its_name_and_issuer() {
    if !have_dns_tools() {
        return;
    }
    let pki = Pki::new();
    // A certificate for another name, from a CA the relay does not trust:
    // DANE-EE(3) pins the key and ignores both.
    let leaf = pki.leaf("mx-ee", &["unrelated.example"]);
    let port = free_port();
    let tlsa = format!("3 1 1 {}", tlsa_data(&leaf, 1, 1));
    let dns = SignedDns::start(&Zones {
        signed: &dane_zone("dane", port, &tlsa),
        unsigned: &[],
        tamper: &[],
    });
    let mx = mx_host("127.0.0.2", port, Some(&leaf)).await;
    let mut relay = relay(&dns, port, "", pki.dir()).await;
    let replies = send(&relay, &["a@dane.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    assert_eq!(received(&mx), 1);
    assert!(mx.received.lock().unwrap()[0].over_tls);
    let report = relay.next_report().await;
    let (hop, security) = outbound(&report);
    assert_eq!(hop, format!("mx.dane.test[127.0.0.2:{port}]"));
    assert_eq!(trust(&security), Some(PeerTrust::Verified));
    assert_eq!(
        report.policy_sessions,
        [tlsrelay_core::report::PolicySession {
            domain: "dane.test".into(),
            policy_type: "tlsa".into(),
            result: "success".into(),
            mx_host: None,
        }]
    );

    // The binary as an operator runs it: `check` describes the route, and
    // the log line names the record that matched.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, config(&dns, port, "")).unwrap();
    let check = std::process::Command::new(relay_binary())
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains(&format!("via each domain's MX hosts on port {port}"))
            && check.contains("DANE where TLSA records are DNSSEC-proven"),
        "{check}"
    );
    let mut process = process::RelayProcess::start(relay_binary(), &file, dir.path(), &[], &[]);
    let replies = send_to(process.addr("edge"), &["b@dane.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    let line = process.wait_for_log("DANE TLSA 3 1 1 matched");
    assert!(
        line.contains(&format!(
            "Verified TLS connection established to mx.dane.test[127.0.0.2]:{port}"
        )),
        "{line}"
    );
    let _ = process.child.kill();
    assert_eq!(received(&mx), 2);
}

#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_ta_anchors_the_chain_and_checks_the_mx_name() {
    if !have_dns_tools() {
        return;
    }
    let pki = Pki::new();
    // The chain sent includes the CA, which the TLSA record names (2 0 1).
    let named = pki.leaf("mx-ta", &["mx.ta.test"]);
    let misnamed = pki.leaf("mx-ta-wrong", &["unrelated.example"]);
    for leaf in [&named, &misnamed] {
        let mut chain = std::fs::read(&leaf.chain).unwrap();
        chain.extend(std::fs::read(&pki.ca_pem).unwrap());
        std::fs::write(&leaf.chain, chain).unwrap();
    }
    let ca = tlsrelay_core::hex(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &pki.ca_der()).as_ref(),
    );
    let port = free_port();
    let tlsa = format!("2 0 1 {ca}");
    let zone = dane_zone("ta", port, &tlsa)
        + &dane_zone("ta2", port, &tlsa).replace("127.0.0.2", "127.0.0.3");
    let dns = SignedDns::start(&Zones {
        signed: &zone,
        unsigned: &[],
        tamper: &[],
    });
    let good = mx_host("127.0.0.2", port, Some(&named)).await;
    let wrong = mx_host("127.0.0.3", port, Some(&misnamed)).await;
    let mut relay = relay(&dns, port, "", pki.dir()).await;

    let replies = send(&relay, &["a@ta.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    let (_, security) = outbound(&relay.next_report().await);
    assert_eq!(trust(&security), Some(PeerTrust::Verified));

    // The same anchor, but the certificate names neither mx.ta2.test nor ta2.test.
    let replies = send(&relay, &["b@ta2.test"]).await;
    assert!(replies[0].starts_with("451 4.7.5"), "{replies:?}");
    assert!(
        replies[0].contains("no DANE TLSA record matched"),
        "{replies:?}"
    );
    assert_eq!((received(&good), received(&wrong)), (1, 0));
}

#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_failures_defer_and_insecure_zones_fall_back_to_the_policy() {
    if !have_dns_tools() {
        return;
    }
    let pki = Pki::new();
    let leaf = pki.leaf("mx", &["mx.example"]);
    let port = free_port();
    let good = format!("3 1 1 {}", tlsa_data(&leaf, 1, 1));
    let wrong = format!("3 0 1 {}", "ab".repeat(32));
    // mismatch: a proven record that matches nothing; bogus: a record
    // changed after signing; nothing: no TLSA (securely denied);
    // insecure.test: unsigned, delegated without DS, with a TLSA record
    // that must not be used (it matches nothing).
    let zone = dane_zone("mismatch", port, &wrong)
        + &dane_zone("bogus", port, &good).replace("127.0.0.2", "127.0.0.3")
        + &dane_zone("nothing", port, "").replace("127.0.0.2", "127.0.0.4");
    let good_data = tlsa_data(&leaf, 1, 1);
    let insecure = format!(
        "@ IN MX 10 mx.insecure.test.\nmx IN A 127.0.0.5\n_{port}._tcp.mx IN TLSA {wrong}\n"
    );
    let dns = SignedDns::start(&Zones {
        signed: &zone,
        unsigned: &[("insecure", &insecure)],
        tamper: &[(&good_data[..16], "0000000000000000")],
    });
    let mismatch = mx_host("127.0.0.2", port, Some(&leaf)).await;
    let bogus = mx_host("127.0.0.3", port, Some(&leaf)).await;
    let nothing = mx_host("127.0.0.4", port, Some(&leaf)).await;
    let plain = mx_host("127.0.0.5", port, Some(&leaf)).await;
    let relay_on = relay(&dns, port, "", pki.dir()).await;

    let replies = send(&relay_on, &["a@mismatch.test"]).await;
    assert!(replies[0].starts_with("451 4.7.5"), "{replies:?}");
    assert!(replies[0].contains("TLSA 3 0 1"), "{replies:?}");
    let replies = send(&relay_on, &["b@bogus.test"]).await;
    assert!(replies[0].starts_with("451 4.7.5"), "{replies:?}");
    assert!(
        replies[0].contains("DNSSEC validation failed"),
        "{replies:?}"
    );
    assert_eq!(
        bogus.connections(),
        0,
        "a bogus TLSA answer: not even connected"
    );
    for to in ["c@nothing.test", "d@insecure.test"] {
        let replies = send(&relay_on, &[to]).await;
        assert!(replies[1].starts_with("250"), "{to}: {replies:?}");
    }
    assert_eq!(
        (received(&mismatch), received(&nothing), received(&plain)),
        (0, 1, 1)
    );

    // dane = "only": no proven TLSA, no delivery.
    let relay_only = relay(&dns, port, "dane = \"only\"", pki.dir()).await;
    for to in ["e@nothing.test", "f@insecure.test"] {
        let replies = send(&relay_only, &[to]).await;
        assert!(replies[0].starts_with("451 4.7.5"), "{to}: {replies:?}");
        assert!(replies[0].contains("DANE is required"), "{to}: {replies:?}");
    }
    assert_eq!((nothing.connections(), plain.connections()), (1, 1));
}

/// MTA-STS: four domains, each with its policy host on its own address.
/// sts.test lists only mx.sts.test, but its preferred MX is a rogue
/// plaintext host; badcert.test's MX has a certificate for another name;
/// testing.test has the same under a testing policy; nofetch.test
/// announces a policy no server serves.
struct StsWorld {
    dns: SignedDns,
    nginx: Option<tlsrelay_tests::https::Nginx>,
    rogue: Sink,
    good: Sink,
    badcert: Sink,
    testing: Sink,
    nofetch: Sink,
    port: u16,
    pki: Pki,
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

impl StsWorld {
    /// Policy hosts listen on 127.`net`.0.20-22:443: one `net` per test,
    /// as tests run in parallel.
    async fn new(net: u8) -> StsWorld {
        let policy_ip = |last: u8| format!("127.{net}.0.{last}");
        let pki = Pki::new();
        let port = free_port();
        let mut zone = String::new();
        for (domain, mxs, policy_ip) in [
            ("sts", "10 rogue.sts.test.|20 mx.sts.test.", policy_ip(20)),
            ("badcert", "10 mx.badcert.test.", policy_ip(21)),
            ("testing", "10 mx.testing.test.", policy_ip(22)),
            ("nofetch", "10 mx.nofetch.test.", policy_ip(23)),
        ] {
            for mx in mxs.split('|') {
                zone += &format!("{domain} IN MX {mx}\n");
            }
            zone += &format!(
                "_mta-sts.{domain} IN TXT \"v=STSv1; id=1;\"\nmta-sts.{domain} IN A {policy_ip}\n"
            );
        }
        zone += "rogue.sts IN A 127.0.0.2\nmx.sts IN A 127.0.0.3\nmx.badcert IN A 127.0.0.4\nmx.testing IN A 127.0.0.5\nmx.nofetch IN A 127.0.0.6\n";
        let dns = SignedDns::start(&Zones {
            signed: &zone,
            unsigned: &[],
            tamper: &[],
        });
        let mx_leaf = pki.leaf("mx-sts", &["mx.sts.test"]);
        let wrong = pki.leaf("mx-wrong", &["other.example"]);
        let sites: Vec<(String, Leaf, String)> = ["sts", "badcert", "testing"]
            .iter()
            .zip([policy_ip(20), policy_ip(21), policy_ip(22)])
            .map(|(domain, ip)| {
                let mode = if *domain == "testing" {
                    "testing"
                } else {
                    "enforce"
                };
                let leaf = pki.leaf(
                    &format!("policy-{domain}"),
                    &[&format!("mta-sts.{domain}.test")],
                );
                (
                    ip.to_string(),
                    leaf,
                    policy(mode, &format!("mx.{domain}.test")),
                )
            })
            .collect();
        let files: Vec<[(&str, &str); 1]> = sites
            .iter()
            .map(|(_, _, text)| [("/.well-known/mta-sts.txt", text.as_str())])
            .collect();
        let nginx = tlsrelay_tests::https::Nginx::start(
            &sites
                .iter()
                .zip(&files)
                .map(|((ip, leaf, _), files)| tlsrelay_tests::https::Site { ip, leaf, files })
                .collect::<Vec<_>>(),
        );
        StsWorld {
            rogue: mx_host("127.0.0.2", port, None).await,
            good: mx_host("127.0.0.3", port, Some(&mx_leaf)).await,
            badcert: mx_host("127.0.0.4", port, Some(&wrong)).await,
            testing: mx_host("127.0.0.5", port, Some(&wrong)).await,
            nofetch: mx_host("127.0.0.6", port, None).await,
            dns,
            nginx: Some(nginx),
            port,
            pki,
        }
    }

    fn config(&self) -> String {
        config(
            &self.dns,
            self.port,
            &format!("tls.trust_anchors = {}", toml_path(&self.pki.ca_pem)),
        )
    }
}

#[cfg_attr(
    any(missing_dns_tools, missing_nginx),
    ignore = "needs nsd and ldnsutils and nginx and root"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_mta_sts_policy_keeps_mail_off_unlisted_and_unverified_hosts() {
    if !have_dns_tools() || !tlsrelay_tests::https::can_serve_https() {
        return;
    }
    let world = StsWorld::new(1).await;
    let mut relay = TestRelay::start(&world.config(), world.pki.dir()).await;

    // The rogue MX is preferred but not in the policy: skipped.
    let replies = send(&relay, &["a@sts.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    let (hop, security) = outbound(&relay.next_report().await);
    assert_eq!(hop, format!("mx.sts.test[127.0.0.3:{}]", world.port));
    assert_eq!(trust(&security), Some(PeerTrust::Verified));
    assert_eq!((received(&world.rogue), received(&world.good)), (0, 1));

    // Enforce: a certificate for another name is no delivery.
    let replies = send(&relay, &["b@badcert.test"]).await;
    assert!(replies[0].starts_with("451 4.7.5"), "{replies:?}");
    assert!(replies[0].contains("name"), "{replies:?}");
    assert_eq!(received(&world.badcert), 0);

    // Testing: the same certificate is only reported; a policy that
    // cannot be fetched is as none.
    for (to, sink) in [
        ("c@testing.test", &world.testing),
        ("d@nofetch.test", &world.nofetch),
    ] {
        let replies = send(&relay, &[to]).await;
        assert!(replies[1].starts_with("250"), "{to}: {replies:?}");
        assert_eq!(received(sink), 1, "{to}");
    }
}

#[cfg_attr(
    any(missing_dns_tools, missing_nginx),
    ignore = "needs nsd and ldnsutils and nginx and root"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_policies_are_cached_in_the_state_directory_across_restarts() {
    if !have_dns_tools() || !tlsrelay_tests::https::can_serve_https() {
        return;
    }
    let mut world = StsWorld::new(2).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, world.config()).unwrap();
    let state = dir.path().join("state");
    let mut first = process::RelayProcess::start(relay_binary(), &file, &state, &[], &[]);
    let replies = send_to(first.addr("edge"), &["a@sts.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    let _ = first.child.kill();
    let _ = first.child.wait();
    let cached = std::fs::read_to_string(state.join("mta-sts/sts.test")).unwrap();
    assert!(cached.starts_with("id 1\nfetched "), "{cached}");

    // The policy host goes away; the TXT id is unchanged: the cached
    // policy still keeps mail off the rogue MX after a restart.
    world.nginx = None;
    let second = process::RelayProcess::start(relay_binary(), &file, &state, &[], &[]);
    let replies = send_to(second.addr("edge"), &["b@sts.test"]).await;
    assert!(replies[1].starts_with("250"), "{replies:?}");
    assert_eq!((received(&world.rogue), received(&world.good)), (0, 2));
    assert!(
        !second
            .log()
            .iter()
            .any(|l| l.contains("delivering as without a policy")),
        "no fetch was tried: {:?}",
        second.log()
    );
}

/// A TLS-RPT collector: HTTPS on `ip`:443, keeping each POST's
/// Content-Type and body, answering 200 with a body and closing without
/// close_notify, as many servers do (the answer is whole at its
/// Content-Length).
async fn report_collector(
    ip: &str,
    leaf: &Leaf,
) -> std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let posts = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&ServerOptions {
        leaf,
        versions: Versions::Both,
        client_ca: None,
    }));
    let listener = tokio::net::TcpListener::bind(format!("{ip}:443"))
        .await
        .unwrap();
    let kept = posts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            let (head_end, length) = loop {
                let n = tls.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break (0, 0);
                }
                request.extend_from_slice(&buf[..n]);
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    break (end + 4, length);
                }
            };
            while request.len() < head_end + length {
                let n = tls.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&request[..head_end]).to_string();
            let content_type = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-type")
                        .then(|| value.trim().to_string())
                })
                .unwrap_or_default();
            kept.lock()
                .unwrap()
                .push((content_type, request[head_end..].to_vec()));
            let body = "{\"stored\": true}";
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(answer.as_bytes()).await;
            let _ = tls.flush().await;
            drop(tls.into_inner().0); // FIN without close_notify
        }
    });
    posts
}

/// Base64 (RFC 4648) to bytes, line breaks skipped.
fn unbase64(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets: Vec<u32> = text
        .bytes()
        .filter_map(|b| ALPHABET.iter().position(|&a| a == b).map(|p| p as u32))
        .collect();
    let mut out = Vec::new();
    for chunk in sextets.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, s)| n | s << (18 - 6 * i));
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

fn schema() -> jsonschema::Validator {
    let text = include_str!("data/tlsrpt-report.schema.json");
    jsonschema::validator_for(&serde_json::from_str(text).unwrap()).unwrap()
}

/// Each RFC 8460 result type, provoked once by a domain built for it.
#[cfg_attr(
    any(missing_dns_tools, missing_nginx),
    ignore = "needs nsd and ldnsutils and nginx and root"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tls_rpt_result_type_is_reported_and_sent_gzipped_to_the_rua() {
    if !have_dns_tools() || !tlsrelay_tests::https::can_serve_https() {
        return;
    }
    let pki = Pki::new();
    let stranger = Pki::new();
    let port = free_port();
    let leaf = pki.leaf("mx", &["mx.example"]);
    let good_tlsa = format!("3 1 1 {}", tlsa_data(&leaf, 1, 1));
    let bogus_tlsa = format!("3 0 1 {}", tlsa_data(&leaf, 0, 1));
    let unusable_tlsa = format!("1 1 1 {}", tlsa_data(&leaf, 1, 1));
    // Domain, MX address, TLSA, MTA-STS policy host address.
    let domains = [
        ("nostarttls", "127.0.0.7", good_tlsa.as_str(), ""),
        (
            "mismatch",
            "127.0.0.8",
            "3 0 1 abababababababababababababababababababababababababababababababab",
            "",
        ),
        ("bogus", "127.0.0.9", bogus_tlsa.as_str(), ""),
        ("strict", "127.0.0.10", "", ""),
        ("sts", "127.0.0.3", "", "127.3.0.20"),
        ("badcert", "127.0.0.4", "", "127.3.0.21"),
        ("expired", "127.0.0.11", "", "127.3.0.24"),
        ("untrusted", "127.0.0.12", "", "127.3.0.25"),
        ("nofetch", "127.0.0.6", "", "127.3.0.23"),
        ("invalid", "127.0.0.13", "", "127.3.0.26"),
        ("webpki", "127.0.0.14", "", "127.3.0.27"),
        // DANE and an enforced policy that does not list the MX: DANE
        // takes precedence (RFC 8461 2), so the mail goes.
        ("both", "127.0.0.15", good_tlsa.as_str(), "127.3.0.28"),
        // Only a PKIX-EE record, unusable for SMTP: delivered over
        // unauthenticated TLS (RFC 7672 2.2), reported tlsa-invalid.
        ("unusable", "127.0.0.16", unusable_tlsa.as_str(), ""),
        // No policy and no STARTTLS: delivered in cleartext, reported.
        ("cleartext", "127.0.0.17", "", ""),
        // The MX answer fails validation: deferred, reported.
        ("bogusmx", "127.0.0.18", "", ""),
    ];
    let mut zone = "sts IN MX 5 rogue.sts.test.\nrogue.sts IN A 127.0.0.2\n\
                    reports IN A 127.3.0.30\ncollector IN A 127.3.0.31\n\
                    down IN A 127.3.0.32\n\
                    _smtp._tls.down IN TXT \"v=TLSRPTv1; rua=https://down.test/v1/tlsrpt\"\n"
        .to_string();
    for (domain, ip, tlsa, policy_ip) in domains {
        zone += &dane_zone(domain, port, tlsa).replace("127.0.0.2", ip);
        // One domain takes its report by mail, the others by HTTPS.
        let rua = match domain {
            "nostarttls" => "mailto:tlsrpt@collector.test",
            _ => "https://reports.test/v1/tlsrpt",
        };
        zone += &format!("_smtp._tls.{domain} IN TXT \"v=TLSRPTv1; rua={rua}\"\n");
        if !policy_ip.is_empty() {
            zone += &format!(
                "_mta-sts.{domain} IN TXT \"v=STSv1; id=1;\"\nmta-sts.{domain} IN A {policy_ip}\n"
            );
        }
    }
    let dns = SignedDns::start(&Zones {
        signed: &zone,
        unsigned: &[],
        tamper: &[
            (&bogus_tlsa[6..22], "0000000000000000"),
            ("mx.bogusmx.test.", "mx.bogusmy.test."),
        ],
    });
    let expired_leaf = pki.issue(
        "mx-expired",
        &LeafSpec {
            names: vec!["mx.expired.test"],
            valid_days: -2,
            ..LeafSpec::default()
        },
    );
    let _sinks = [
        mx_host("127.0.0.7", port, None).await,
        mx_host("127.0.0.8", port, Some(&leaf)).await,
        mx_host("127.0.0.9", port, Some(&leaf)).await,
        mx_host("127.0.0.10", port, Some(&leaf)).await,
        mx_host("127.0.0.2", port, None).await,
        mx_host(
            "127.0.0.3",
            port,
            Some(&pki.leaf("mx-sts", &["mx.sts.test"])),
        )
        .await,
        mx_host("127.0.0.4", port, Some(&leaf)).await,
        mx_host("127.0.0.11", port, Some(&expired_leaf)).await,
        mx_host(
            "127.0.0.12",
            port,
            Some(&stranger.leaf("mx-u", &["mx.untrusted.test"])),
        )
        .await,
        mx_host("127.0.0.6", port, None).await,
        mx_host("127.0.0.13", port, None).await,
        mx_host("127.0.0.14", port, None).await,
        mx_host("127.0.0.15", port, Some(&leaf)).await,
        mx_host("127.0.0.16", port, Some(&leaf)).await,
        mx_host("127.0.0.17", port, None).await,
        mx_host("127.0.0.18", port, None).await,
    ];
    let policy_leaf = |d: &str| pki.leaf(&format!("policy-{d}"), &[&format!("mta-sts.{d}.test")]);
    let sites = [
        (
            "127.3.0.20",
            policy_leaf("sts"),
            policy("enforce", "mx.sts.test"),
        ),
        (
            "127.3.0.21",
            policy_leaf("badcert"),
            policy("enforce", "mx.badcert.test"),
        ),
        (
            "127.3.0.24",
            policy_leaf("expired"),
            policy("enforce", "mx.expired.test"),
        ),
        (
            "127.3.0.25",
            policy_leaf("untrusted"),
            policy("enforce", "mx.untrusted.test"),
        ),
        (
            "127.3.0.26",
            policy_leaf("invalid"),
            "<html>not a policy</html>".to_string(),
        ),
        (
            "127.3.0.27",
            pki.leaf("policy-webpki", &["elsewhere.example"]),
            policy("enforce", "mx.webpki.test"),
        ),
        (
            "127.3.0.28",
            policy_leaf("both"),
            policy("enforce", "mx.elsewhere.test"),
        ),
    ];
    let files: Vec<[(&str, &str); 1]> = sites
        .iter()
        .map(|(_, _, text)| [("/.well-known/mta-sts.txt", text.as_str())])
        .collect();
    let _nginx = tlsrelay_tests::https::Nginx::start(
        &sites
            .iter()
            .zip(&files)
            .map(|((ip, leaf, _), files)| tlsrelay_tests::https::Site { ip, leaf, files })
            .collect::<Vec<_>>(),
    );
    let posts = report_collector("127.3.0.30", &pki.leaf("reports", &["reports.test"])).await;
    let mailbox = mx_host("127.3.0.31", port, None).await;

    let anchors = format!("tls.trust_anchors = {}", toml_path(&pki.ca_pem));
    let strict = format!(
        "{anchors}\n\n[[outbound_connectors]]\nname = \"strict\"\nrecipient_domains = [\"strict.test\"]\nnext_hops = [\"mx:{port}\"]\nallow_private_mx = [\"127.0.0.0/8\"]\ndane = \"only\"\n{anchors}\n"
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let toml = config(&dns, port, &strict).replace(
        "[[listeners]]",
        &format!("[tlsrpt]\norganization = \"relay.example.org\"\ncontact = \"mailto:tlsrpt@example.org\"\n\n[metrics]\naddress = \"{metrics}\"\n\n[[listeners]]"),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, toml).unwrap();
    let state = dir.path().join("state");
    let relay = process::RelayProcess::start(relay_binary(), &file, &state, &[], &[]);
    let mut replies = std::collections::HashMap::new();
    for (domain, ..) in domains {
        let reply = send_to(relay.addr("edge"), &[&format!("postmaster@{domain}.test")]).await;
        replies.insert(domain, reply);
    }
    for delivered in ["unusable", "cleartext"] {
        assert!(replies[delivered][0].starts_with("250"), "{replies:?}");
    }
    assert!(
        replies["bogusmx"][0].starts_with("451 4.4.3 DNSSEC validation failed"),
        "{replies:?}"
    );
    // Metrics count the same sessions, by policy type and result.
    let scrape = || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(&metrics).unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        tcp.read_to_string(&mut text).unwrap();
        text
    };
    // A session is counted when it ends, after the reply the sender saw:
    // wait for every count.
    let want = [
        "tlsrelay_mx_policy_sessions_total{policy_type=\"sts\",result=\"sts-webpki-invalid\"} 1",
        // The bogus TLSA answer and the bogus MX answer.
        "tlsrelay_mx_policy_sessions_total{policy_type=\"tlsa\",result=\"dnssec-invalid\"} 2",
        // A DANE-EE record that matches nothing, and a PKIX-EE one alone.
        "tlsrelay_mx_policy_sessions_total{policy_type=\"tlsa\",result=\"tlsa-invalid\"} 2",
        // No policy (none published, or its fetch failed) and a cleartext
        // MX: cleartext, nofetch, invalid, webpki.
        "tlsrelay_mx_policy_sessions_total{policy_type=\"no-policy-found\",result=\"starttls-not-supported\"} 4",
        "tlsrelay_mx_policy_sessions_total{policy_type=\"tlsa\",result=\"dane-required\"} 1",
        "tlsrelay_mx_policy_sessions_total{policy_type=\"sts\",result=\"success\"} 1",
        "tlsrelay_mx_policy_sessions_total{policy_type=\"sts\",result=\"validation-failure\"} 1",
    ];
    let deadline = std::time::Instant::now() + patience();
    loop {
        let text = scrape();
        let missing: Vec<&str> = want.into_iter().filter(|l| !text.contains(l)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{missing:#?} not in:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // What is pending, as the domains will get it.
    let show = std::process::Command::new(relay_binary())
        .args(["tlsrpt", "show", "--json", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let reports: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let validator = schema();
    let mut seen = std::collections::BTreeSet::new();
    for report in reports.as_array().unwrap() {
        let errors: Vec<String> = validator
            .iter_errors(report)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?} in {report:#}");
        for policy in report["policies"].as_array().unwrap() {
            for detail in policy["failure-details"].as_array().unwrap() {
                seen.insert(detail["result-type"].as_str().unwrap().to_string());
            }
        }
    }
    let all: std::collections::BTreeSet<String> = tlsrelay_core::tlsrpt::RESULT_TYPES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seen, all, "every result type, once each domain");
    let both = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policies"][0]["policy"]["policy-domain"] == "both.test")
        .unwrap();
    assert_eq!(both["policies"].as_array().unwrap().len(), 1, "{both:#}");
    assert_eq!(
        both["policies"][0]["policy"]["policy-type"], "tlsa",
        "{both:#}"
    );
    assert_eq!(
        both["policies"][0]["summary"]["total-successful-session-count"],
        1
    );
    let sts = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["policies"][0]["policy"]["policy-domain"] == "sts.test")
        .unwrap();
    assert_eq!(sts["policies"][0]["policy"]["policy-type"], "sts");
    assert_eq!(
        sts["policies"][0]["summary"]["total-successful-session-count"],
        1
    );
    assert_eq!(sts["policies"][0]["policy"]["mx-host"][0], "mx.sts.test");
    // Each scenario's one policy, and its one session's result.
    let only = |domain: &str| {
        let report = reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["policies"][0]["policy"]["policy-domain"] == domain)
            .unwrap_or_else(|| panic!("no report for {domain}: {reports:#}"));
        let policies = report["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 1, "{report:#}");
        let result = policies[0]["failure-details"][0]["result-type"]
            .as_str()
            .unwrap_or("success")
            .to_string();
        (policies[0]["policy"].clone(), result)
    };
    let (policy, result) = only("unusable.test");
    assert_eq!(
        (policy["policy-type"].as_str(), result.as_str()),
        (Some("tlsa"), "tlsa-invalid")
    );
    assert_eq!(policy["mx-host"][0], "mx.unusable.test", "{policy:#}");
    let (policy, result) = only("cleartext.test");
    assert_eq!(
        (policy["policy-type"].as_str(), result.as_str()),
        (Some("no-policy-found"), "starttls-not-supported")
    );
    let (_, result) = only("bogusmx.test");
    assert_eq!(result, "dnssec-invalid");
    let (policy, _) = only("nostarttls.test");
    assert_eq!(policy["mx-host"][0], "mx.nostarttls.test", "{policy:#}");

    // A report for down.test, whose rua host takes connections and drops
    // them (a collector that is down).
    let (down_tries, down_report) = {
        let listener = tokio::net::TcpListener::bind("127.3.0.32:443")
            .await
            .unwrap();
        let tries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = tries.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(tcp);
            }
        });
        let day = std::fs::read_dir(state.join("tlsrpt"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let down = day.join("down.test.json");
        std::fs::copy(day.join("cleartext.test.json"), &down).unwrap();
        (tries, down)
    };
    let tlsrpt_send = || {
        std::process::Command::new(relay_binary())
            .args(["tlsrpt", "send", "--include-today", "--config"])
            .arg(&file)
            .arg("--state-dir")
            .arg(&state)
            .output()
            .unwrap()
    };
    let tries = || down_tries.load(std::sync::atomic::Ordering::SeqCst);

    // Sent now (today included), gzipped, to each domain's rua; down.test
    // failed (exit status 1) and waits an hour for its next attempt.
    let sent = tlsrpt_send();
    let out = String::from_utf8_lossy(&sent.stdout);
    assert_eq!(
        sent.status.code(),
        Some(1),
        "{out}{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    for line in out.lines() {
        assert!(
            line.contains(": sent to ") || line.contains(" down.test: not sent: "),
            "{out}"
        );
    }
    assert!(out.contains("; tried again after "), "{out}");
    assert_eq!(tries(), 1, "{out}");
    assert!(down_report.with_extension("retry").exists());
    let report_posts = posts;
    let posts = report_posts.lock().unwrap().clone();
    assert_eq!(posts.len(), domains.len() - 1, "{out}");
    let mail = mailbox.received.lock().unwrap().clone();
    assert_eq!(mail.len(), 1, "{out}");
    assert_eq!(mail[0].recipients, ["tlsrpt@collector.test"]);
    let message = String::from_utf8(mail[0].body.clone()).unwrap();
    assert!(
        message.contains("Subject: Report Domain: nostarttls.test Submitter: relay.example.org")
            && message.contains("TLS-Report-Domain: nostarttls.test\r\n")
            && message.contains("Content-Type: multipart/report; report-type=\"tlsrpt\""),
        "{message}"
    );
    let attachment = message
        .split("filename=\"relay.example.org!nostarttls.test!")
        .nth(1)
        .and_then(|rest| rest.split("\r\n\r\n").nth(1))
        .and_then(|rest| rest.split("\r\n--").next())
        .unwrap();
    let mailed = ("application/tlsrpt+gzip".to_string(), unbase64(attachment));
    for (content_type, body) in posts.into_iter().chain([mailed]) {
        assert_eq!(content_type, "application/tlsrpt+gzip");
        let mut json = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut json)
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert!(validator.is_valid(&report), "{report:#}");
        assert_eq!(report["organization-name"], "relay.example.org");
        assert_eq!(report["contact-info"], "mailto:tlsrpt@example.org");
    }
    let again = std::process::Command::new(relay_binary())
        .args(["tlsrpt", "show", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    // Sent reports are no longer pending; the report mail's own delivery
    // to collector.test is a session of a report of its own.
    let pending: Vec<String> = String::from_utf8_lossy(&again.stdout)
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    // down.test waits for its next attempt.
    assert_eq!(pending, ["collector.test", "down.test"]);
    // Exactly once: a second run sends none of those the collector took
    // (and closed on without close_notify); collector.test publishes no rua.
    // down.test is not tried again before its backoff has passed.
    let resent = tlsrpt_send();
    let out = String::from_utf8_lossy(&resent.stdout);
    assert!(resent.status.success(), "{out}");
    assert!(
        out.contains("down.test: not sent: 1 attempt(s) failed; next after "),
        "{out}"
    );
    assert_eq!(tries(), 1, "not tried while waiting: {out}");
    let posts = report_posts.lock().unwrap().clone();
    let again: Vec<String> = posts[domains.len() - 1..]
        .iter()
        .map(|(_, body)| {
            let mut json = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut json)
                .unwrap();
            let report: serde_json::Value = serde_json::from_slice(&json).unwrap();
            report["policies"][0]["policy"]["policy-domain"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(again, Vec::<String>::new(), "{out}");
    assert!(out.contains("collector.test: not sent: no rua"), "{out}");

    // A day later (the retry record says so: first failure 25 h ago, its
    // backoff over), the last attempt fails and the report is dropped.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    std::fs::write(
        down_report.with_extension("retry"),
        format!(
            "{{\"first_failure\": {}, \"failures\": 4, \"next_attempt\": {}}}",
            now - 25 * 3600,
            now - 1
        ),
    )
    .unwrap();
    let last = tlsrpt_send();
    let out = String::from_utf8_lossy(&last.stdout);
    assert_eq!(last.status.code(), Some(1), "{out}");
    assert!(
        out.contains("given up 24 h after the first failed attempt"),
        "{out}"
    );
    assert_eq!(tries(), 2, "{out}");
    assert!(!down_report.exists() && !down_report.with_extension("retry").exists());
}

/// MX delivery never connects to the relay itself (a domain whose MX is
/// the relay made it relay to itself until the per-client limit), nor to
/// loopback or private networks a connector does not allow: 451 4.4.6,
/// Postfix's words, without a connection.
#[cfg_attr(missing_dns_tools, ignore = "needs nsd and ldnsutils")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_delivery_never_loops_back_or_reaches_private_networks() {
    if !have_dns_tools() {
        return;
    }
    let dns = SignedDns::start(&Zones {
        signed: "loop IN MX 10 mx.loop.test.\nmx.loop IN A 127.0.0.1\n\
                 inner IN MX 10 mx.inner.test.\nmx.inner IN A 10.1.2.3\n\
                 lab IN MX 10 mx.lab.test.\nmx.lab IN A 127.0.0.9\n",
        unsigned: &[],
        tamper: &[],
    });
    let pki = Pki::new();
    let port = free_port();
    let lab = mx_host("127.0.0.9", port, None).await;
    // The relay's own listener is where loop.test's MX points.
    let own = config(&dns, port, "").replace(
        "address = \"127.0.0.1:0\"",
        &format!("address = \"127.0.0.1:{port}\""),
    );
    let mut relay = TestRelay::start(&own, pki.dir()).await;
    let replies = send(&relay, &["x@loop.test"]).await;
    assert_eq!(
        replies,
        ["451 4.4.6 mail for loop.test loops back to myself\r\n"]
    );
    let report = relay.next_report().await;
    assert!(report.transactions[0].next_hop.is_none(), "{report}");
    let replies = send(&relay, &["x@inner.test"]).await;
    assert_eq!(
        replies,
        ["451 4.4.6 mail for inner.test would go to a private network address\r\n"]
    );
    relay.next_report().await;
    let replies = send(&relay, &["x@lab.test"]).await;
    assert!(replies[1].starts_with("250"), "allowed: {replies:?}");
    assert_eq!(received(&lab), 1);
    relay.next_report().await;
    // Without allow_private_mx, loopback is the relay's own host.
    let strict = config(&dns, port, "").replace("allow_private_mx = [\"127.0.0.0/8\"]\n", "");
    let relay = TestRelay::start(&strict, pki.dir()).await;
    let replies = send(&relay, &["x@lab.test"]).await;
    assert_eq!(
        replies,
        ["451 4.4.6 mail for lab.test loops back to myself\r\n"]
    );
    assert_eq!(received(&lab), 1, "nothing more reached it");
}
