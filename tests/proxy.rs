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

use tlsrelay_core::report::{Direction, Outcome};
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
proxy_protocol_from = ["127.0.0.1/32", "::1/128"]

[[upstreams]]
name = "echo"
address = "{upstream}"
tls.policy = "plain"
send_proxy_protocol = "v1"

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
tls.mode = "off"
proxy_protocol = true
proxy_protocol_from = ["127.0.0.1/32"]

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
        let _ = tokio::time::timeout(patience(), s.read_to_end(&mut buf)).await;
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

/// An SMTP listener behind balancers at 127.0.0.1 only, with an
/// on-premises connector for 10.0.0.0/24 that may relay, and a sink.
async fn mx_behind_balancer(pki: &Pki, per_client: usize) -> (TestRelay, smtp_sink_mod::Sink) {
    let sink = smtp_sink(SinkOptions::default()).await;
    let toml = format!(
        r#"
ebpf.enabled = false
accepted_domains = ["example.org"]
[limits]
max_connections_per_client = {per_client}

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
tls.mode = "off"
proxy_protocol = true
proxy_protocol_from = ["127.0.0.1/32"]

[[inbound_connectors]]
name = "on-premises"
client_addresses = ["10.0.0.0/24"]
allow_relay = true

[[outbound_connectors]]
name = "out"
recipient_domains = ["*"]
next_hops = ["{sink}"]
tls.policy = "plain"
"#,
        sink = sink.addr,
    );
    (TestRelay::start(&toml, pki.dir()).await, sink)
}

use tlsrelay_tests::smtp_sink as smtp_sink_mod;

/// Everything the relay sends until it closes (or patience() passes).
async fn all_until_closed(s: &mut TcpStream) -> Result<Vec<u8>, std::io::ErrorKind> {
    let mut buf = Vec::new();
    match tokio::time::timeout(patience(), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => panic!("still open: {}", String::from_utf8_lossy(&buf)),
    }
}

/// A stranger connecting straight to the listener sends a header naming an
/// on-premises address (v1 and v2, IPv4 and IPv4-mapped IPv6), then a
/// whole relay attempt: the connection is closed before a byte is read,
/// nothing is relayed, and no session exists for it. The same header from
/// the balancer's address is believed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_header_from_anyone_but_the_balancers_is_never_read() {
    use tlsrelay_core::proxy::{encode, ProxyVersion};
    let pki = Pki::new();
    let (mut relay, sink) = mx_behind_balancer(&pki, 100).await;
    let mx = relay.addr("mx");
    let forged_source: SocketAddr = "10.0.0.5:40000".parse().unwrap();
    let attempt = b"EHLO evil.test\r\nMAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@evil.test>\r\nDATA\r\nSubject: spam\r\n\r\nspam\r\n.\r\nQUIT\r\n";
    let headers = [
        b"PROXY TCP4 10.0.0.5 127.0.0.61 40000 2611\r\n".to_vec(),
        encode(ProxyVersion::V2, forged_source, mx),
        encode(
            ProxyVersion::V2,
            "[::ffff:10.0.0.5]:40000".parse().unwrap(),
            "[::1]:25".parse().unwrap(),
        ),
    ];
    for header in &headers {
        let mut s = tcp_from("127.0.0.63".parse().unwrap(), mx).await;
        // The header and the attempt may meet a closed socket already.
        let _ = s.write_all(&[header.as_slice(), attempt].concat()).await;
        match all_until_closed(&mut s).await {
            Ok(said) => assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said)),
            Err(kind) => assert_eq!(kind, std::io::ErrorKind::ConnectionReset),
        }
    }
    assert!(sink.received.lock().unwrap().is_empty(), "nothing relayed");
    // From the balancer, the header names the client that may relay.
    let mut s = TcpStream::connect(mx).await.unwrap();
    s.write_all(&encode(ProxyVersion::V2, forged_source, mx))
        .await
        .unwrap();
    let mut c = RawSmtp::from_stream(s).await;
    c.cmd("EHLO onprem.test").await;
    assert!(c
        .cmd("MAIL FROM:<ceo@example.org>")
        .await
        .starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<x@elsewhere.example>")
        .await
        .starts_with("250"));
    c.cmd("QUIT").await;
    // The strangers' connections made no session: the first report is
    // the balancer's.
    let report = relay.next_report().await;
    assert_eq!(report.client, forged_source, "{report}");
    assert_eq!(
        report.proxied_by.map(|b| b.ip()),
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    );
}

/// Behind the balancer, the per-client limit counts the address each
/// header names: one address cannot take every slot, and another is still
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_client_limit_holds_for_the_address_a_header_names() {
    use tlsrelay_core::proxy::{encode, ProxyVersion};
    let pki = Pki::new();
    let (relay, _sink) = mx_behind_balancer(&pki, 3).await;
    let mx = relay.addr("mx");
    let greeting = |client: &'static str| async move {
        let mut s = TcpStream::connect(mx).await.unwrap();
        let source: SocketAddr = client.parse().unwrap();
        s.write_all(&encode(ProxyVersion::V1, source, mx))
            .await
            .unwrap();
        let mut line = String::new();
        let mut r = BufReader::new(s);
        tokio::time::timeout(patience(), r.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        (line, r)
    };
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let (line, conn) = greeting("192.0.2.9:1000").await;
        if line.starts_with("220") {
            held.push(conn);
        } else {
            assert!(
                line.starts_with("421 4.7.0") && line.contains("from your address"),
                "{line}"
            );
            refused += 1;
        }
    }
    assert_eq!((held.len(), refused), (3, 3));
    let (line, _other) = greeting("192.0.2.10:1000").await;
    assert!(line.starts_with("220"), "another client is served: {line}");
    drop(held);
}
