//! Delivery to the Internet by MX, against an authoritative DNS server
//! (nsd) serving a DNSSEC-signed zone made per test, with the relay's
//! resolver pointed at it and trusting its key; MX hosts are SMTP sinks
//! on loopback addresses (127.0.0.x) on one port per test.

use std::net::SocketAddr;

use tlsrelay::policy::PeerTrust;
use tlsrelay::report::{LegSecurity, SessionReport};
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

    // A null MX refuses the domain for good; an unanswerable domain
    // (nsd is not authoritative for it: REFUSED) is deferred.
    let replies = send(&relay, &["c@nullmx.test", "d@nowhere.example"]).await;
    assert_eq!(
        replies,
        [
            "556 5.1.10 Recipient domain nullmx.test accepts no mail (null MX)\r\n",
            "451 4.4.3 DNS lookup failed for nowhere.example. MX; try again later\r\n",
        ]
    );
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

/// The zone for the DANE tests: `name` has one MX host on 127.0.0.2 whose
/// TLSA record is `tlsa` (none when empty).
fn dane_zone(name: &str, port: u16, tlsa: &str) -> String {
    let mut zone = format!("{name} IN MX 10 mx.{name}.test.\nmx.{name} IN A 127.0.0.2\n");
    if !tlsa.is_empty() {
        zone += &format!("_{port}._tcp.mx.{name} IN TLSA {tlsa}\n");
    }
    zone
}

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
    let (hop, security) = outbound(&relay.next_report().await);
    assert_eq!(hop, format!("mx.dane.test[127.0.0.2:{port}]"));
    assert_eq!(trust(&security), Some(PeerTrust::Verified));

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
    let ca = tlsrelay_tests::dns::hex(
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
    async fn new() -> StsWorld {
        let pki = Pki::new();
        let port = free_port();
        let mut zone = String::new();
        for (domain, mxs, policy_ip) in [
            ("sts", "10 rogue.sts.test.|20 mx.sts.test.", "127.0.0.20"),
            ("badcert", "10 mx.badcert.test.", "127.0.0.21"),
            ("testing", "10 mx.testing.test.", "127.0.0.22"),
            ("nofetch", "10 mx.nofetch.test.", "127.0.0.23"),
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
            .zip(["127.0.0.20", "127.0.0.21", "127.0.0.22"])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enforced_mta_sts_policy_keeps_mail_off_unlisted_and_unverified_hosts() {
    if !have_dns_tools() || !tlsrelay_tests::https::can_serve_https() {
        return;
    }
    let world = StsWorld::new().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_policies_are_cached_in_the_state_directory_across_restarts() {
    if !have_dns_tools() || !tlsrelay_tests::https::can_serve_https() {
        return;
    }
    let mut world = StsWorld::new().await;
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
