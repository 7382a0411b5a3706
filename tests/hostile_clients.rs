//! Slow and hostile clients against a relay on loopback: connections that
//! trickle a byte at a time, TLS handshakes that stall, pipelining floods,
//! lines past the limits. Each is bounded by a limit `tlsrelay check`
//! prints, and a client from another address is served meanwhile.
//! Strangers connect from 127.0.0.3 and 127.0.0.4, the well-behaved
//! client from 127.0.0.2 (any 127/8 address is this host's).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tlsrelay_tests::smtp_client::{tcp_from, RawSmtp};
use tlsrelay_tests::smtp_sink::{smtp_sink, Sink, SinkOptions};
use tlsrelay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PER_CLIENT: usize = 20;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An SMTP listener (command timeout 3 s) and a TCP listener with
/// opportunistic TLS (handshake timeout 2 s) to a plaintext echo.
async fn relay(pki: &Pki) -> (TestRelay, Sink) {
    let sink = smtp_sink(SinkOptions::default()).await;
    let echo = plain_echo().await;
    let conf = format!(
        r#"
ebpf.enabled = false
accepted_domains = ["partner.test"]
[limits]
max_connections_per_client = {PER_CLIENT}
smtp_timeout_scale = 0.01
handshake_timeout = "2s"

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
tls.mode = "off"

[[listeners]]
name = "tcp"
address = "127.0.0.1:0"
upstream = "echo"
tls.mode = "opportunistic"

[[upstreams]]
name = "echo"
address = "{echo}"
tls.policy = "plain"

[[outbound_connectors]]
name = "partner"
recipient_domains = ["partner.test"]
next_hops = ["{}"]
tls.policy = "opportunistic"
"#,
        sink.addr
    );
    (TestRelay::start(&conf, pki.dir()).await, sink)
}

/// The first line the server sends, or what ended the connection.
async fn first_line(tcp: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(patience(), tcp.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'\n' => break,
            Ok(Ok(1)) => line.push(byte[0]),
            Ok(Ok(_)) => return format!("{}<closed>", String::from_utf8_lossy(&line)),
            Ok(Err(e)) => return format!("{}<{e}>", String::from_utf8_lossy(&line)),
            Err(_) => panic!("nothing within the patience"),
        }
    }
    String::from_utf8_lossy(&line).trim_end().to_string()
}

/// Reads until the relay closes; returns everything and how long it took.
async fn until_closed(tcp: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(patience(), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {:?}; got {}",
                patience(),
                String::from_utf8_lossy(&all)
            ),
        }
    }
    (
        String::from_utf8_lossy(&all).into_owned(),
        started.elapsed(),
    )
}

/// Delivers one message from 127.0.0.2 and returns the final reply.
async fn deliver(addr: SocketAddr, subject: &str) -> String {
    let mut smtp = RawSmtp::connect_from(ip("127.0.0.2"), addr).await;
    assert!(smtp.cmd("EHLO good.test").await.starts_with("250"));
    assert!(smtp.cmd("MAIL FROM:<a@good.test>").await.starts_with("250"));
    assert!(smtp
        .cmd("RCPT TO:<x@partner.test>")
        .await
        .starts_with("250"));
    assert!(smtp.cmd("DATA").await.starts_with("354"));
    smtp.cmd(&format!("Subject: {subject}\r\n\r\nhello\r\n."))
        .await
}

/// A still-open connection has nothing to read yet (no EOF, no reply).
fn still_open(tcp: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(tcp.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_a_second_clients_are_capped_per_address_and_cut_per_command() {
    let pki = Pki::new();
    let (relay, sink) = relay(&pki).await;
    let mx = relay.addr("mx");

    // A stranger opens 30 connections: 20 are greeted, 10 told 421.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        let mut tcp = tcp_from(ip("127.0.0.3"), mx).await;
        let line = first_line(&mut tcp).await;
        if line.starts_with("220") {
            held.push(tcp);
        } else {
            assert!(
                line.starts_with("421 4.7.0 relay.test Too many connections from your address"),
                "{line}"
            );
            refused += 1;
        }
    }
    assert_eq!((held.len(), refused), (PER_CLIENT, 30 - PER_CLIENT));

    // Each greeted one trickles a command line, a byte every half second:
    // a timeout per read would never fire.
    let trickling = Instant::now();
    let mut trickles = tokio::task::JoinSet::new();
    for mut tcp in held {
        trickles.spawn(async move {
            let (mut r, mut w) = tcp.split();
            let write = async {
                while w.write_all(b"X").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            };
            let mut got = Vec::new();
            let read = r.read_to_end(&mut got);
            tokio::select! {
                _ = write => {}
                _ = read => {}
            }
            // The reply, if the write side did not see the close first.
            let _ = tokio::time::timeout(Duration::from_millis(200), r.read_to_end(&mut got)).await;
            String::from_utf8_lossy(&got).into_owned()
        });
    }

    // Meanwhile another address is served at once, while every stranger
    // still holds its slot.
    let reply = deliver(mx, "while strangers trickle").await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(
        trickles.try_join_next().map(|r| r.unwrap()),
        None,
        "delivered while the strangers still hold their slots"
    );
    assert_eq!(sink.received.lock().unwrap().len(), 1);

    // The strangers are cut when their command's 3 s of waiting are used
    // up: 421, then the close.
    while let Some(got) = tokio::time::timeout(patience(), trickles.join_next())
        .await
        .expect("every stranger cut within the patience")
    {
        let got = got.unwrap();
        assert!(
            got.is_empty() || got.starts_with("421 4.4.2 Timeout"),
            "{got:?}"
        );
    }
    let cut = trickling.elapsed();
    assert!(
        cut > Duration::from_millis(2500) && cut < Duration::from_secs(10),
        "cut after {cut:?}"
    );

    // Their slots are free again.
    let mut tcp = tcp_from(ip("127.0.0.3"), mx).await;
    assert!(first_line(&mut tcp).await.starts_with("220"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_data_slower_than_the_minimum_rate_is_cut_and_not_delivered() {
    let pki = Pki::new();
    let (relay, sink) = relay(&pki).await;
    let mut smtp = RawSmtp::connect_from(ip("127.0.0.3"), relay.addr("mx")).await;
    assert!(smtp.cmd("EHLO slow.test").await.starts_with("250"));
    assert!(smtp.cmd("MAIL FROM:<a@slow.test>").await.starts_with("250"));
    assert!(smtp
        .cmd("RCPT TO:<x@partner.test>")
        .await
        .starts_with("250"));
    assert!(smtp.cmd("DATA").await.starts_with("354"));
    let started = Instant::now();
    let mut reply = String::new();
    for _ in 0..40 {
        smtp.send(b"y").await;
        let wait = tokio::time::timeout(Duration::from_millis(500), smtp.reply());
        if let Ok(r) = wait.await {
            reply = r;
            break;
        }
    }
    assert!(reply.starts_with("421 4.4.2"), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The next hop got nothing: the transaction was abandoned, the sender
    // keeps the message.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(sink.received.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_capped_per_address_and_cut_at_the_handshake_timeout() {
    let pki = Pki::new();
    let (relay, _sink) = relay(&pki).await;
    let tcp_listener = relay.addr("tcp");
    // The start of a ClientHello record, then nothing more.
    let hello_start = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03";
    let mut stalled = Vec::new();
    for _ in 0..25 {
        let mut tcp = tcp_from(ip("127.0.0.4"), tcp_listener).await;
        tcp.write_all(hello_start).await.unwrap();
        stalled.push(tcp);
    }
    let stalling = Instant::now();
    // The five over the limit are closed at once; the others stay open.
    let deadline = Instant::now() + patience();
    loop {
        let open: Vec<_> = stalled.iter().map(still_open).collect();
        let n = open.iter().filter(|&&o| o).count();
        assert!(n >= PER_CLIENT, "20 held, 5 closed at accept: {open:?}");
        if n == PER_CLIENT {
            break;
        }
        assert!(Instant::now() < deadline, "{n} still open: {open:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A TLS client from another address is served meanwhile.
    let good = tcp_from(ip("127.0.0.2"), tcp_listener).await;
    let connector = tokio_rustls::TlsConnector::from(client_config(&ClientOptions::default()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, good).await.unwrap();
    let back = exchange(&mut tls, b"through while others stall")
        .await
        .unwrap();
    assert_eq!(back, b"through while others stall");
    assert!(stalled.iter().filter(|t| still_open(t)).count() == PER_CLIENT);

    // The stalled handshakes end at the 2 s handshake timeout.
    for tcp in &mut stalled {
        until_closed(tcp).await;
    }
    let cut = stalling.elapsed();
    assert!(
        cut > Duration::from_millis(1500) && cut < Duration::from_secs(10),
        "cut after {cut:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_trickled_a_byte_at_a_time_is_cut_at_the_handshake_timeout() {
    let pki = Pki::new();
    let (relay, _sink) = relay(&pki).await;
    // A whole, valid ClientHello from a real client, sent 10 bytes per
    // 100 ms: the handshake timeout covers the handshake, not each read.
    let (mut client_side, mut capture) = tokio::io::duplex(1 << 16);
    let connector = tokio_rustls::TlsConnector::from(client_config(&ClientOptions::default()));
    tokio::spawn(async move {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let _ = connector.connect(name, &mut client_side).await;
    });
    let mut hello = vec![0u8; 5];
    capture.read_exact(&mut hello).await.unwrap();
    let len = u16::from_be_bytes([hello[3], hello[4]]) as usize;
    hello.resize(5 + len, 0);
    capture.read_exact(&mut hello[5..]).await.unwrap();
    assert!(
        hello.len() > 200,
        "{} bytes: more than 2 s at 100 B/s",
        hello.len()
    );

    let mut tcp = tcp_from(ip("127.0.0.3"), relay.addr("tcp")).await;
    let started = Instant::now();
    for piece in hello.chunks(10) {
        if tcp.write_all(piece).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !still_open(&tcp) {
            break;
        }
    }
    until_closed(&mut tcp).await;
    let cut = started.elapsed();
    assert!(
        cut > Duration::from_millis(1500) && cut < Duration::from_secs(6),
        "cut after {cut:?}, hello of {} bytes",
        hello.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_flood_of_commands_that_move_no_mail_is_closed() {
    let pki = Pki::new();
    let (mut relay, sink) = relay(&pki).await;
    let mx = relay.addr("mx");
    let mut tcp = tcp_from(ip("127.0.0.3"), mx).await;
    assert!(first_line(&mut tcp).await.starts_with("220"));
    // A megabyte of NOOPs and RSETs, written without reading a reply.
    let flood: Vec<u8> = b"EHLO flood.test\r\n"
        .iter()
        .chain(b"NOOP\r\nRSET\r\n".repeat(80_000).iter())
        .copied()
        .collect();
    let (mut r, mut w) = tcp.split();
    let write = async {
        let _ = w.write_all(&flood).await;
    };
    let mut replies = Vec::new();
    let read = async {
        // Read only after the writer is stuck or done: a client that does
        // not read while it writes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tokio::time::timeout(patience(), r.read_to_end(&mut replies)).await;
    };
    tokio::join!(write, read);
    let text = String::from_utf8_lossy(&replies);
    let codes: Vec<&str> = text
        .lines()
        .filter(|l| l.as_bytes().get(3) == Some(&b' '))
        .map(|l| &l[..3])
        .collect();
    assert_eq!(codes.len(), 121, "EHLO and 119 answered, then 421: {text}");
    assert_eq!(codes.last(), Some(&"421"));
    assert!(
        text.ends_with("421 4.7.0 Too many errors, closing\r\n"),
        "{text}"
    );

    let report = relay.next_report().await;
    assert!(report.transactions.is_empty());
    // Other clients: unaffected.
    let reply = deliver(mx, "after a flood").await;
    assert!(reply.starts_with("250"), "{reply}");
    assert_eq!(sink.received.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_megabyte_line_is_refused_once_and_the_session_goes_on() {
    let pki = Pki::new();
    let (relay, _sink) = relay(&pki).await;
    let mut smtp = RawSmtp::connect_from(ip("127.0.0.3"), relay.addr("mx")).await;
    let mut line = vec![b'A'; 4 << 20];
    line.extend_from_slice(b"\r\n");
    smtp.send(&line).await;
    assert!(smtp.reply().await.starts_with("500 5.5.6 Line too long"));
    // The rest of the line was dropped, not parsed as commands, and the
    // next command is answered.
    assert!(smtp.cmd("NOOP").await.starts_with("250"));
    // A command line of exactly 512 octets (RFC 5321 4.5.3.1.4) with its
    // CRLF is taken; one longer is refused.
    let at_limit = format!("NOOP {}", "n".repeat(512 - 7));
    assert!(smtp.cmd(&at_limit).await.starts_with("250"), "512 octets");
    let over = format!("NOOP {}", "n".repeat(512 - 6));
    assert!(smtp.cmd(&over).await.starts_with("500"), "513 octets");
}

/// The relay's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Strangers that start a big BDAT chunk (spliced to a next hop with
/// CHUNKING) and stall in the middle of it hold little of the relay's
/// memory each: the spliced copy is scanned a piece at a time, not a
/// pipe's worth at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bdat_chunks_hold_little_memory() {
    const SESSIONS: usize = 150;
    let sink = smtp_sink(SinkOptions {
        chunking: true,
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\naccepted_domains = [\"partner.test\"]\n[limits]\nmax_connections_per_client = 1000\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\ntls.mode = \"off\"\n\n[[outbound_connectors]]\nname = \"partner\"\nrecipient_domains = [\"partner.test\"]\nnext_hops = [\"{}\"]\ntls.policy = \"plain\"\n",
            sink.addr
        ),
    )
    .unwrap();
    let relay =
        process::RelayProcess::start(relay_binary(), &config, &dir.path().join("state"), &[], &[]);
    let mx = relay.addr("mx");
    let piece = b"a line of a big chunk, stalled half way\r\n".repeat(2000);
    let stall = |n: usize| {
        let piece = piece.clone();
        async move {
            let mut held = Vec::new();
            for _ in 0..n {
                let mut c = RawSmtp::connect_from(ip("127.0.0.3"), mx).await;
                assert!(c.cmd("EHLO big.test").await.contains("CHUNKING"));
                assert!(c.cmd("MAIL FROM:<a@big.test>").await.starts_with("250"));
                assert!(c.cmd("RCPT TO:<x@partner.test>").await.starts_with("250"));
                c.send(b"BDAT 10000000 LAST\r\n").await;
                c.send(&piece).await;
                held.push(c);
            }
            held
        }
    };
    let pid = relay.child.id();
    let _warm = stall(20).await;
    // Each stalled chunk's bytes reached the next hop (spliced on).
    let settled = |want: usize| {
        let wire = sink.wire.clone();
        async move {
            let deadline = Instant::now() + patience();
            while wire.lock().unwrap().len() < want * piece_len() {
                assert!(Instant::now() < deadline, "chunks not spliced on");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    fn piece_len() -> usize {
        "a line of a big chunk, stalled half way\r\n".len() * 2000
    }
    settled(20).await;
    let before = rss_kib(pid);
    let _stalled = stall(SESSIONS).await;
    settled(20 + SESSIONS).await;
    let per_session = (rss_kib(pid).saturating_sub(before)) as f64 / SESSIONS as f64;
    eprintln!("{per_session:.1} KiB per session stalled in a spliced BDAT chunk");
    assert!(
        per_session < 96.0,
        "{per_session:.1} KiB per session stalled in a BDAT chunk"
    );
}
