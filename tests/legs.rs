//! TCP sessions and SMTP next hops set up their legs through one path
//! (`tlsrelay::legs`), so they record the same things the same way: a
//! peer that settles for TLS 1.2 is a version downgrade on either, and a
//! client that never finishes its TLS handshake ends the session with the
//! same outcome on a TCP listener and an SMTPS listener.

use std::net::SocketAddr;
use std::time::Duration;

use tlsrelay_core::policy::TlsFailure;
use tlsrelay_core::report::{Direction, LegSecurity, Outcome, SessionReport};
use tlsrelay_tests::smtp_client::RawSmtp;
use tlsrelay_tests::smtp_sink::{smtp_sink, SinkOptions};
use tlsrelay_tests::*;
use tokio::io::AsyncReadExt;

fn negotiated_version(security: &Option<LegSecurity>) -> Option<String> {
    match security {
        Some(LegSecurity::Tls { negotiated, .. }) => Some(negotiated.version.clone()),
        _ => None,
    }
}

/// A TCP listener `tcp` to `upstream` and an SMTP listener `mx` to
/// `next_hop`, both listeners in `mode` and both outbound legs under `tls`.
fn tcp_and_smtp(
    mode: &str,
    upstream: SocketAddr,
    next_hop: SocketAddr,
    tls: &str,
    extra: &str,
) -> String {
    format!(
        r#"
ebpf.enabled = false
accepted_domains = ["example.org"]
{extra}
[[listeners]]
name = "tcp"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "{mode}"

[[upstreams]]
name = "up"
address = "{upstream}"
{tls}

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
tls.mode = "{mode}"

[[outbound_connectors]]
name = "inside"
recipient_domains = ["example.org"]
next_hops = ["{next_hop}"]
{tls}
"#
    )
}

/// The outbound leg's downgrade and its socket's record.
fn outbound_downgrade(report: &SessionReport) -> (String, bool) {
    let reason = report
        .downgraded(Direction::Outbound)
        .unwrap_or_else(|| panic!("no outbound downgrade: {report}"))
        .reason
        .clone();
    let sockets: Vec<_> = report
        .sockets
        .iter()
        .filter(|s| s.leg == Direction::Outbound)
        .collect();
    assert_eq!(sockets.len(), 1, "{report}");
    (reason, sockets[0].downgraded)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_peer_is_a_version_downgrade_for_tcp_and_smtp_alike() {
    let pki = Pki::new();
    let leaf = pki.leaf("up", &["upstream.test"]);
    let tls12 = ServerOptions {
        leaf: &leaf,
        versions: Versions::Tls12Only,
        client_ca: None,
    };
    let upstream = tls_echo(ServerOptions { ..tls12 }).await;
    let next_hop = smtp_sink(SinkOptions {
        tls: Some(server_config(&tls12)),
        chunking: true,
        refuse_marker: "nobody",
        requiretls: false,
    })
    .await;
    let tls = format!(
        "tls.policy = \"required\"\ntls.verify = \"name\"\ntls.names = [\"upstream.test\"]\ntls.trust_anchors = {}",
        toml_path(&pki.ca_pem)
    );
    let toml = tcp_and_smtp("off", upstream, next_hop.addr, &tls, "");
    let mut relay = TestRelay::start(&toml, pki.dir()).await;

    let mut tcp = tokio::net::TcpStream::connect(relay.addr("tcp"))
        .await
        .unwrap();
    assert_eq!(exchange(&mut tcp, b"ping").await.unwrap(), b"ping");
    drop(tcp);
    let tcp_report = relay.next_report().await;

    let mut c = RawSmtp::connect(relay.addr("mx")).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@sender.test>").await;
    assert!(c.cmd("RCPT TO:<u@example.org>").await.starts_with("250"));
    c.cmd("QUIT").await;
    let smtp_report = relay.next_report().await;

    for report in [&tcp_report, &smtp_report] {
        assert_eq!(
            negotiated_version(&report.outbound).as_deref(),
            Some("TLSv1.2"),
            "{report}"
        );
        assert_eq!(
            outbound_downgrade(report),
            (
                "version: upstream negotiated TLSv1.2, TLSv1.3 was offered".to_string(),
                true
            ),
            "{report}"
        );
    }
}

/// Connects and says nothing until the relay ends the session.
async fn silent_client(addr: SocketAddr) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_client_ends_the_same_way_on_tcp_and_smtps_listeners() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let sink = smtp_sink(SinkOptions {
        tls: None,
        chunking: true,
        refuse_marker: "nobody",
        requiretls: false,
    })
    .await;
    let toml = tcp_and_smtp(
        "implicit",
        upstream,
        sink.addr,
        "tls.policy = \"plain\"",
        "[limits]\nhandshake_timeout = \"1s\"\n",
    );
    let mut relay = TestRelay::start(&toml, pki.dir()).await;
    let mut outcomes = Vec::new();
    for listener in ["tcp", "mx"] {
        silent_client(relay.addr(listener)).await;
        let report = relay.next_report().await;
        assert_eq!(report.inbound, None, "{report}");
        outcomes.push(report.outcome);
    }
    let expected = Outcome::Refused {
        leg: Direction::Inbound,
        reason: "TLS handshake failed: timed out".into(),
        failure: Some(TlsFailure::HandshakeFailed("timed out".into())),
    };
    assert_eq!(outcomes, [expected.clone(), expected]);
}
