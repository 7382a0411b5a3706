//! The data path on loopback: bulk byte-exact relaying both ways at once,
//! half-close and reset propagation, bad clients, limits and timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use tlsrelay::pump::{PumpEnd, Side};
use tlsrelay_core::report::{Direction, LegSecurity, Outcome};
use tlsrelay_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BULK: usize = 64 * 1024 * 1024;

/// A relay from `listener_tls` to an upstream, TLS on both legs when `tls`.
async fn relay_to(upstream: SocketAddr, tls: bool, pki: &Pki, extra: &str) -> TestRelay {
    let (mode, route) = if tls {
        (
            "implicit",
            format!(
                "tls.policy = \"required\"\ntls.server_name = \"upstream.test\"\ntls.trust_anchors = {}",
                toml_path(&pki.ca_pem)
            ),
        )
    } else {
        ("off", "tls.policy = \"plain\"".to_string())
    };
    let toml = format!(
        r#"
{extra}
[[listeners]]
name = "in"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "{mode}"

[[upstreams]]
name = "up"
address = "{upstream}"
{route}
"#
    );
    TestRelay::start(&toml, pki.dir()).await
}

/// A TLS echo upstream (TLS 1.2 and 1.3) serving upstream.test from `pki`.
async fn tls_upstream(pki: &Pki) -> SocketAddr {
    let leaf = pki.leaf("up", &["upstream.test"]);
    tls_echo(ServerOptions {
        leaf: &leaf,
        versions: Versions::Both,
        client_ca: None,
    })
    .await
}

/// Sends `data` and reads the echo at the same time; returns what came back.
async fn echo_both_ways_at_once<S>(stream: S, data: Vec<u8>) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sender = tokio::spawn(async move {
        for chunk in data.chunks(256 * 1024) {
            writer.write_all(chunk).await.unwrap();
        }
        writer.flush().await.unwrap();
        writer.shutdown().await.unwrap(); // half-close: the echo ends after draining
    });
    let mut back = Vec::with_capacity(BULK);
    tokio::time::timeout(Duration::from_secs(120), reader.read_to_end(&mut back))
        .await
        .expect("bulk echo within two minutes")
        .unwrap();
    sender.await.unwrap();
    back
}

async fn bulk_case(tls: bool) {
    let pki = Pki::new();
    let upstream = if tls {
        tls_upstream(&pki).await
    } else {
        plain_echo().await
    };
    let mut relay = relay_to(upstream, tls, &pki, "").await;
    let data = random_bytes(BULK, 7);
    let back = if tls {
        let stream = tls_connect(relay.addr("in"), "relay.test", &ClientOptions::default())
            .await
            .unwrap();
        echo_both_ways_at_once(stream, data.clone()).await
    } else {
        let stream = TcpStream::connect(relay.addr("in")).await.unwrap();
        echo_both_ways_at_once(stream, data.clone()).await
    };
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ from those sent");
    let report = relay.next_report().await;
    assert_eq!(report.bytes_client_to_upstream, BULK as u64, "{report}");
    assert_eq!(report.bytes_upstream_to_client, BULK as u64, "{report}");
    assert_eq!(
        report.outcome,
        Outcome::Relayed {
            end: PumpEnd::Closed
        },
        "{report}"
    );
    assert_eq!(report.inbound.as_ref().unwrap().is_tls(), tls);
    assert_eq!(report.outbound.as_ref().unwrap().is_tls(), tls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_tls_to_tls() {
    bulk_case(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_plaintext() {
    bulk_case(false).await;
}

/// An upstream that reads until the client's half-close, then answers with
/// the byte count and closes: it only answers if the FIN got through, and
/// the client only hears it if the relay kept the other direction open.
async fn answer_after_eof<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    let reply = format!("got {} bytes", got.len());
    stream.write_all(reply.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_propagates_through_tls_legs() {
    let pki = Pki::new();
    let (upstream, _) = tls_upstream_once(&pki, answer_after_eof).await;
    let mut relay = relay_to(upstream, true, &pki, "").await;
    let mut client = tls_connect(relay.addr("in"), "relay.test", &ClientOptions::default())
        .await
        .unwrap();
    let back = exchange(&mut client, b"twelve bytes").await.unwrap();
    assert_eq!(back, b"got 12 bytes");
    let report = relay.next_report().await;
    assert_eq!(
        report.outcome,
        Outcome::Relayed {
            end: PumpEnd::Closed
        },
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_resets_the_client() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        tcp.read_exact(&mut buf).await.unwrap();
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tcp); // RST
    });
    let mut relay = relay_to(upstream, false, &pki, "").await;
    let mut client = TcpStream::connect(relay.addr("in")).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(patience(), client.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client must see a reset, not a clean end"
    );
    assert_upstream_reset(&relay.next_report().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_resets_the_upstream() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (got_hello, hello_arrived) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 64];
        let mut first = [0u8; 5];
        tcp.read_exact(&mut first).await.unwrap();
        let _ = got_hello.send(());
        let _ = tx.send(tcp.read(&mut buf).await.map_err(|e| e.kind()));
    });
    let mut relay = relay_to(upstream, false, &pki, "").await;
    let mut client = TcpStream::connect(relay.addr("in")).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    // Reset only once the bytes before it went through.
    tokio::time::timeout(patience(), hello_arrived)
        .await
        .unwrap()
        .unwrap();
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let seen = tokio::time::timeout(patience(), rx).await.unwrap().unwrap();
    assert_eq!(seen, Err(std::io::ErrorKind::ConnectionReset));
    let report = relay.next_report().await;
    assert!(
        matches!(
            report.outcome,
            Outcome::Relayed {
                end: PumpEnd::Reset {
                    side: Side::Client,
                    ..
                }
            }
        ),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_implicit_listener_is_refused_and_other_sessions_go_on() {
    let pki = Pki::new();
    let mut relay = relay_to(tls_upstream(&pki).await, true, &pki, "").await;
    // A good session, open across the garbage.
    let mut good = tls_connect(relay.addr("in"), "relay.test", &ClientOptions::default())
        .await
        .unwrap();
    good.write_all(b"before ").await.unwrap();
    let garbage_variants: [Vec<u8>; 4] = [
        random_bytes(4096, 1),
        b"EHLO attacker.example\r\n".to_vec(),
        // A handshake record header announcing more than it carries.
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00],
        // A well-formed record of an unknown content type.
        vec![0x42, 0x03, 0x03, 0x00, 0x02, 0x00, 0x00],
    ];
    for garbage in &garbage_variants {
        let mut bad = TcpStream::connect(relay.addr("in")).await.unwrap();
        let _ = bad.write_all(garbage).await;
        let _ = bad.shutdown().await;
        let mut back = Vec::new();
        let _ = tokio::time::timeout(patience(), bad.read_to_end(&mut back))
            .await
            .expect("relay closes a garbage connection");
        assert!(
            back.is_empty() || back[0] == 0x15,
            "only a TLS alert, got {back:?}"
        );
        let report = relay.next_report().await;
        assert!(
            matches!(
                report.outcome,
                Outcome::Refused {
                    leg: Direction::Inbound,
                    ..
                }
            ),
            "{report}"
        );
    }
    let back = exchange(&mut good, b"and after").await.unwrap();
    assert_eq!(back, b"before and after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_client_on_required_listener_is_refused() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let toml = format!(
        r#"
[[listeners]]
name = "in"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "required"

[[upstreams]]
name = "up"
address = "{upstream}"
tls.policy = "plain"
"#
    );
    let mut relay = TestRelay::start(&toml, pki.dir()).await;
    let mut client = TcpStream::connect(relay.addr("in")).await.unwrap();
    let back = exchange(&mut client, b"MAIL FROM:<a@b.example>\r\n").await;
    assert!(back.map_or(true, |b| b.is_empty()));
    let report = relay.next_report().await;
    match &report.outcome {
        Outcome::Refused {
            leg: Direction::Inbound,
            reason,
            failure: None,
        } => {
            assert!(reason.contains("requires TLS"), "{report}")
        }
        other => panic!("expected an inbound refusal, got {other:?}"),
    }
    assert!(
        report.upstream_addr.is_none(),
        "no upstream connection for a refused client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_extra_clients() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let relay = relay_to(upstream, false, &pki, "[limits]\nmax_connections = 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(relay.addr("in")).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap(); // session established end to end
        held.push(c);
    }
    let mut extra = TcpStream::connect(relay.addr("in")).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(patience(), extra.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the third client is closed");
    drop(held);
    // Capacity returns once sessions end: a client is relayed again as
    // soon as the relay has seen them go.
    let deadline = std::time::Instant::now() + patience();
    loop {
        let mut again = TcpStream::connect(relay.addr("in")).await.unwrap();
        match exchange(&mut again, b"room again").await {
            Ok(back) if back == b"room again" => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no room again: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_time_out() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let mut relay = relay_to(upstream, false, &pki, "[limits]\nidle_timeout = \"300ms\"").await;
    let mut client = TcpStream::connect(relay.addr("in")).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(patience(), client.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the relay closes an idle session");
    let report = relay.next_report().await;
    assert_eq!(
        report.outcome,
        Outcome::Relayed {
            end: PumpEnd::IdleTimeout
        },
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_fails_the_session_cleanly() {
    let pki = Pki::new();
    // A port nobody listens on: bind, note it, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut relay = relay_to(dead, false, &pki, "").await;
    // The relay resets the client (so that no client takes the service's
    // absence for an empty answer); the reset may come before the
    // client's connect completes, before its write, during it, or after:
    // an empty answer or a reset, never data.
    let answer = match TcpStream::connect(relay.addr("in")).await {
        Ok(mut client) => exchange(&mut client, b"anyone?").await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(back) => assert!(back.is_empty(), "{back:?}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    let report = relay.next_report().await;
    match &report.outcome {
        Outcome::Failed { reason } => assert!(reason.contains("unreachable"), "{report}"),
        other => panic!("expected a failed session, got {other:?}"),
    }
}

#[cfg_attr(missing_ipv6, ignore = "needs IPv6 loopback")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_relays() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "IPv6 loopback missing in CI"
        );
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let toml = format!(
        r#"
[[listeners]]
name = "v6"
address = "[::1]:0"
upstream = "up"
tls.mode = "opportunistic"

[[upstreams]]
name = "up"
address = "{upstream}"
tls.policy = "plain"
"#
    );
    let mut relay = TestRelay::start(&toml, pki.dir()).await;
    let addr = relay.addr("v6");
    assert!(addr.is_ipv6());
    let mut tls = tls_connect(addr, "relay.test", &ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(exchange(&mut tls, b"over v6").await.unwrap(), b"over v6");
    let report = relay.next_report().await;
    assert!(report.client.is_ipv6());
    assert!(
        matches!(report.inbound, Some(LegSecurity::Tls { .. })),
        "{report}"
    );
}

/// A listener's accept queue is `limits.max_connections` deep (the kernel
/// caps it at net.core.somaxconn): the runtime's default of 128 overflowed
/// when 256 clients connected at once, each dropped SYN costing its client
/// a one-second retransmission. `ss` shows a listener's queue size.
#[cfg_attr(missing_ss, ignore = "needs ss (iproute2)")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_take_a_burst_of_connections() {
    let ss = std::process::Command::new("ss").arg("-V").output();
    if ss.is_err() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "ss missing in CI"
        );
        eprintln!("skipped: ss (iproute2) not installed");
        return;
    }
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let relay = relay_to(upstream, false, &pki, "[limits]\nmax_connections = 2000\n").await;
    let port = relay.addr("in").port();
    let out = std::process::Command::new("ss")
        .args(["-ltnH", &format!("sport = :{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let queue: u32 = text
        .split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listener line in {text:?}"));
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(queue, 2000.min(somaxconn), "{text}");
}

/// Small writes are copied through the pump's one shared buffer, not
/// spliced; when the destination is full, what it can't take waits in the
/// session's pipe. Every byte must still arrive, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_writes_to_a_stalled_reader_arrive_whole_and_in_order() {
    const MESSAGES: usize = 3000;
    const SIZE: usize = 1000;
    let pki = Pki::new();
    // A tiny receive window: the relay's sends meet a full destination
    // while its reads are still small.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(8).unwrap();
    let upstream = listener.local_addr().unwrap();
    let mut relay = relay_to(upstream, false, &pki, "").await;
    let data = random_bytes(MESSAGES * SIZE, 11);
    let client = TcpStream::connect(relay.addr("in")).await.unwrap();
    client.set_nodelay(true).unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let mut client = client;
        for (i, message) in sent.chunks(SIZE).enumerate() {
            client.write_all(message).await.unwrap();
            if i < 300 {
                // One message per read while the destination fills.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        client.shutdown().await.unwrap();
        client
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut got = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(60), server.read_to_end(&mut got))
        .await
        .expect("all bytes within a minute")
        .unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes reordered, lost or repeated");
    let mut client = writer.await.unwrap();
    server.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    let report = relay.next_report().await;
    assert_eq!(
        report.bytes_client_to_upstream,
        data.len() as u64,
        "{report}"
    );
}

/// A returning client resumes from the ticket the relay issued (stateless
/// tickets, TLS 1.3 and 1.2): no certificate, no signature. The report
/// says which handshakes were resumed, as the client saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_clients_resume_from_tickets() {
    let pki = Pki::new();
    let mut relay = relay_to(tls_upstream(&pki).await, true, &pki, "").await;
    for versions in [Versions::Tls13Only, Versions::Tls12Only] {
        // One config, so one ticket store, for both sessions.
        let config = client_config(&ClientOptions {
            versions,
            ..Default::default()
        });
        let mut resumed = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(relay.addr("in")).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await
                .unwrap();
            assert_eq!(exchange(&mut tls, b"again").await.unwrap(), b"again");
            let report = relay.next_report().await;
            let Some(LegSecurity::Tls { negotiated, .. }) = &report.inbound else {
                panic!("inbound leg not TLS: {report}");
            };
            assert_eq!(
                negotiated.resumed,
                tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                "the report and the client disagree: {report}"
            );
            resumed.push(negotiated.resumed);
        }
        assert_eq!(resumed, [false, true], "{versions:?}: full, then resumed");
    }
}

/// Data and the FIN in one segment (TCP_CORK, then shutdown): the relay
/// gets one wakeup for both and must still see the end after the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_fin_in_one_segment_are_both_relayed() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let relay = relay_to(upstream, false, &pki, "").await;
    for round in 0..50 {
        let mut c = TcpStream::connect(relay.addr("in")).await.unwrap();
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our socket with a live c_int.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&c),
                libc::IPPROTO_TCP,
                libc::TCP_CORK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
        let message = format!("message {round} with its end");
        c.write_all(message.as_bytes()).await.unwrap();
        c.shutdown().await.unwrap(); // the FIN goes out with the corked data
        let mut back = Vec::new();
        tokio::time::timeout(patience(), c.read_to_end(&mut back))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the relay did not pass the end on"))
            .unwrap();
        assert_eq!(back, message.as_bytes());
    }
}

/// A TLS upstream that sends a burst of full records and then resets: the
/// userspace pump takes several records per write, and the reset met
/// while taking them must still reach the client as a reset, after the
/// bytes before it, never as a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_a_burst_of_tls_records_reaches_the_client() {
    const BURST: usize = 1 << 20;
    let pki = Pki::new();
    let (upstream, _) = tls_upstream_once(&pki, |mut tls| async move {
        let mut go = [0u8; 2];
        tls.read_exact(&mut go).await.unwrap();
        tls.write_all(&random_bytes(BURST, 5)).await.unwrap();
        tls.flush().await.unwrap();
        let tcp = tls.get_ref().0;
        socket2::SockRef::from(tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tls); // RST, with the burst still on its way
    })
    .await;
    let mut relay = relay_to(upstream, true, &pki, "").await;
    let mut client = tls_connect(relay.addr("in"), "relay.test", &ClientOptions::default())
        .await
        .unwrap();
    client.write_all(b"go").await.unwrap();
    client.flush().await.unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(patience(), client.read_to_end(&mut got))
        .await
        .expect("the client hears the end");
    assert!(
        end.is_err(),
        "a reset upstream must not end cleanly ({} bytes came)",
        got.len()
    );
    assert!(got.len() <= BURST);
    assert_upstream_reset(&relay.next_report().await);
}

/// The session ended with a reset from the upstream, passed on as one.
fn assert_upstream_reset(report: &tlsrelay_core::report::SessionReport) {
    assert!(
        matches!(
            report.outcome,
            Outcome::Relayed {
                end: PumpEnd::Reset {
                    side: Side::Upstream,
                    ..
                }
            }
        ),
        "{report}"
    );
}
