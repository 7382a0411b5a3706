//! Listeners behind an L4 balancer: real HAProxy in front sends a PROXY
//! protocol header (v2 for the TCP listener, v1 for the SMTP one), and the
//! relay judges, logs and reports the client it names: an inbound
//! connector's `client_addresses` match the real client, not the
//! balancer; IPv4 and IPv6 clients; a connection without a header is
//! refused; `send_proxy_protocol` passes the client on to the upstream.
//! And what a stranger gets: a header from anyone but the balancers is
//! never read, and the per-client limit holds for the address a header
//! names.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tlsrelay::report::{Direction, Outcome};
use tlsrelay_tests::smtp_client::{tcp_from, RawSmtp};
use tlsrelay_tests::smtp_sink::{smtp_sink, SinkOptions};
use tlsrelay_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const ON_PREMISES: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy with a frontend per (bind, backend server, send-proxy option).
async fn haproxy(dir: &std::path::Path, fronts: &[(SocketAddr, SocketAddr, &str)]) -> Haproxy {
    let mut config = String::from(
        "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n",
    );
    for (i, (bind, server, send)) in fronts.iter().enumerate() {
        config += &format!(
            "frontend f{i}\n  bind {bind}\n  default_backend b{i}\nbackend b{i}\n  server s {server} {send}\n"
        );
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Listening once its ports are taken: a probe connection would reach
    // the relay as a session of its own.
    for (bind, _, _) in fronts {
        for _ in 0..100 {
            if std::net::TcpListener::bind(bind).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Haproxy(child)
}

/// An upstream that reads a PROXY v1 line, then echoes; each line it got.
async fn header_recording_echo() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(tcp);
                let mut line = String::new();
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                let _ = tx.send(line);
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest).await;
                let _ = reader.into_inner().write_all(&rest).await;
            });
        }
    });
    (addr, rx)
}

#[cfg_attr(missing_haproxy, ignore = "needs haproxy")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_behind_haproxy_is_the_one_judged_reported_and_passed_on() {
    if !have_program("haproxy", "-v", "haproxy") {
        return;
    }
    let pki = Pki::new();
    let (upstream, mut headers) = header_recording_echo().await;
    let sink = smtp_sink(SinkOptions {
        tls: None,
        chunking: true,
        refuse_marker: "nobody",
        requiretls: false,
    })
    .await;
    let toml = format!(
        r#"
ebpf.enabled = false
accepted_domains = ["example.org"]

[[listeners]]
name = "tcp"
address = "127.0.0.1:0"
upstream = "echo"
tls.mode = "off"
proxy_protocol = true

[[upstreams]]
name = "echo"
address = "{upstream}"
tls.policy = "plain"
send_proxy_protocol = "v1"

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
tls.mode = "off"
proxy_protocol = true

[[inbound_connectors]]
name = "on-premises"
client_addresses = ["{ON_PREMISES}/32"]
allow_relay = true

[[outbound_connectors]]
name = "out"
recipient_domains = ["*"]
next_hops = ["{sink}"]
tls.policy = "plain"
"#,
        sink = sink.addr,
    );
    let mut relay = TestRelay::start(&toml, pki.dir()).await;
    let (tcp4, tcp6, smtp) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let dir = tempfile::tempdir().unwrap();
    let _haproxy = haproxy(
        dir.path(),
        &[
            (tcp4, relay.addr("tcp"), "send-proxy-v2"),
            (tcp6, relay.addr("tcp"), "send-proxy-v2"),
            (smtp, relay.addr("mx"), "send-proxy"),
        ],
    )
    .await;

    // TCP, IPv4 and IPv6 clients through HAProxy (v2 headers).
    for (client_ip, front) in [
        (ON_PREMISES, tcp4),
        (IpAddr::from(std::net::Ipv6Addr::LOCALHOST), tcp6),
    ] {
        let mut s = tcp_from(client_ip, front).await;
        assert_eq!(exchange(&mut s, b"ping").await.unwrap(), b"ping");
        let report = relay.next_report().await;
        assert_eq!(report.client.ip(), client_ip, "{report}");
        assert_eq!(
            report.proxied_by.map(|b| b.ip()),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{report}"
        );
        assert!(report
            .to_string()
            .contains(&format!("client={} via=", report.client)));
        // The upstream hears of the real client too (v1 from the relay).
        let header = headers.recv().await.unwrap();
        let family = if client_ip.is_ipv4() { "TCP4" } else { "TCP6" };
        let expected = format!("PROXY {family} {} ", report.client.ip());
        assert!(header.starts_with(&expected), "{header}");
    }

    // SMTP through HAProxy (v1 headers): the on-premises client may relay,
    // a stranger may not, though both arrive from HAProxy's address.
    let mut c = RawSmtp::connect_from(ON_PREMISES, smtp).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    let reply = c.cmd("RCPT TO:<x@elsewhere.example>").await;
    assert!(reply.starts_with("250"), "{reply}");
    c.cmd("QUIT").await;
    let report = relay.next_report().await;
    assert_eq!(report.client.ip(), ON_PREMISES, "{report}");
    let mut c = RawSmtp::connect_from(STRANGER, smtp).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<a@example.org>").await;
    let reply = c.cmd("RCPT TO:<x@elsewhere.example>").await;
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
    c.cmd("QUIT").await;
    let report = relay.next_report().await;
    assert_eq!(report.client.ip(), STRANGER, "{report}");

    // Straight to a PROXY listener, without a header: refused, with why.
    for listener in ["tcp", "mx"] {
        let mut s = TcpStream::connect(relay.addr(listener)).await.unwrap();
        s.write_all(b"EHLO not-a-balancer\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut buf)).await;
        let report = relay.next_report().await;
        match &report.outcome {
            Outcome::Refused {
                leg: Direction::Inbound,
                reason,
                ..
            } => assert!(
                reason.starts_with("PROXY protocol: no PROXY protocol header"),
                "{report}"
            ),
            other => panic!("{listener}: {other:?}"),
        }
    }
}
