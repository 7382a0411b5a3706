//! Watching and stopping the `tlsrelay` binary: `/metrics` scraped and
//! parsed by a Prometheus text parser after a known mix of sessions, and
//! SIGTERM during an SMTP DATA transfer — the sender gets the next hop's
//! 250 or a 4xx, never a 250 for an undelivered message.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use tlsrelay_tests::relay_binary;

use tlsrelay_tests::blocking::{echo_server, plain_session, tls_session};
use tlsrelay_tests::process::RelayProcess;
use tlsrelay_tests::smtp_sink::{smtp_sink, SinkOptions};
use tlsrelay_tests::{free_port, LeafSpec, Pki};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text")
}

/// Sum of a metric's samples whose labels include all of `want`.
fn total(s: &prometheus_parse::Scrape, metric: &str, want: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .filter(|x| want.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[test]
fn metrics_count_a_known_mix_of_sessions() {
    let pki = Pki::new();
    let leaf = pki.issue(
        "relay",
        &LeafSpec {
            names: vec!["relay.test"],
            valid_days: 20,
            ..LeafSpec::default()
        },
    );
    let upstream = echo_server();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = pki.dir().join("relay.toml");
    let certs = format!(
        "tls.certificates = [{{ chain = {:?}, key = {:?} }}]",
        leaf.chain.to_str().unwrap(),
        leaf.key.to_str().unwrap()
    );
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\n[metrics]\naddress = \"{metrics}\"\n\n[[listeners]]\nname = \"opp\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"opportunistic\"\n{certs}\n\n[[listeners]]\nname = \"req\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"required\"\n{certs}\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(relay_binary(), &config, state.path(), &[], &[]);
    relay.wait_for_log(&format!("metrics on http://{metrics}/metrics"));
    let (opp, req) = (relay.addr("opp"), relay.addr("req"));
    let roots = pki.roots();
    for _ in 0..3 {
        drop(tls_session(opp, &roots).unwrap());
    }
    for _ in 0..2 {
        drop(plain_session(opp).unwrap());
    }
    assert!(plain_session(req).is_err(), "required refuses plaintext");

    // Reports are counted as sessions end; wait for all six.
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let s = scrape(metrics);
        if total(&s, "tlsrelay_sessions_total", &[]) >= 6.0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "sessions not counted: {:?}",
            s.samples
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let sessions = |want: &[(&str, &str)]| total(&s, "tlsrelay_sessions_total", want);
    assert_eq!(sessions(&[]), 6.0);
    assert_eq!(
        sessions(&[
            ("listener", "opp"),
            ("inbound", "TLSv1.3"),
            ("outbound", "plaintext"),
            ("upstream", "echo"),
            ("outcome", "relayed")
        ]),
        3.0
    );
    assert_eq!(
        sessions(&[
            ("listener", "opp"),
            ("inbound", "plaintext"),
            ("outcome", "relayed")
        ]),
        2.0
    );
    assert_eq!(
        sessions(&[("listener", "req"), ("outcome", "refused")]),
        1.0
    );
    assert_eq!(
        total(
            &s,
            "tlsrelay_connections_accepted_total",
            &[("listener", "opp")]
        ),
        5.0
    );
    assert_eq!(
        total(
            &s,
            "tlsrelay_downgrades_total",
            &[("listener", "opp"), ("leg", "inbound")]
        ),
        2.0,
        "each plaintext session on the opportunistic listener is a downgrade"
    );
    assert_eq!(total(&s, "tlsrelay_data_path_sessions_total", &[]), 5.0);
    let tls_legs = total(&s, "tlsrelay_key_exchange_total", &[]);
    assert!(tls_legs > 0.0);
    assert_eq!(
        total(&s, "tlsrelay_tls_handshakes_total", &[("kind", "full")])
            + total(&s, "tlsrelay_tls_handshakes_total", &[("kind", "resumed")]),
        tls_legs,
        "every TLS leg is a full or a resumed handshake"
    );
    assert!(
        s.samples
            .iter()
            .any(|x| x.metric == "tlsrelay_uring_workers_replaced_total"),
        "the worker-replacement counter is exported"
    );
    assert_eq!(total(&s, "tlsrelay_uring_workers_replaced_total", &[]), 0.0);
    assert_eq!(
        total(
            &s,
            "tlsrelay_data_path_bytes_total",
            &[("direction", "client_to_upstream")]
        ),
        5.0 * 4.0,
        "each relayed session moved one 4-byte ping"
    );
    // Each listener's certificate and when it expires: in 20 days (the
    // alert rules fire under 21).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for listener in ["opp", "req"] {
        let expiry = total(
            &s,
            "tlsrelay_certificate_expiry_timestamp_seconds",
            &[("listener", listener), ("certificate", "relay.test")],
        );
        let days = (expiry - now) / 86_400.0;
        assert!(
            (19.9..20.1).contains(&days),
            "{listener}: expires in {days} days"
        );
    }
    // The book's metrics table names every family this relay exposes, and
    // exposes every family it names (the eBPF ones need the program).
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/src/observability.md"),
    )
    .unwrap();
    for family in s.docs.keys() {
        assert!(
            page.contains(&format!("`{family}`")),
            "docs/src/observability.md lacks {family}"
        );
    }
    let named = page
        .split('`')
        .filter(|w| w.starts_with("tlsrelay_") && !w.starts_with("tlsrelay_wire_"))
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    for name in named {
        assert!(
            s.docs.contains_key(name),
            "/metrics lacks {name}, which the book names"
        );
    }
    let handshakes = s
        .samples
        .iter()
        .find(|x| x.metric == "tlsrelay_handshake_seconds_count")
        .map(|x| match x.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            _ => -1.0,
        });
    assert_eq!(
        handshakes,
        Some(5.0),
        "one handshake time per relayed session"
    );
}

/// An SMTP relay (plaintext both legs) to an in-process sink, with a short
/// drain time.
async fn smtp_relay(
    dir: &Path,
) -> (
    RelayProcess,
    tlsrelay_tests::smtp_sink::Sink,
    tokio::net::TcpStream,
) {
    let sink = smtp_sink(SinkOptions::default()).await;
    let config = dir.join("smtp.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\naccepted_domains = [\"partner.test\"]\n[limits]\ndrain_timeout = \"1s\"\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\ntls.mode = \"off\"\n\n[[outbound_connectors]]\nname = \"partner\"\nrecipient_domains = [\"partner.test\"]\nnext_hops = [\"{}\"]\ntls.policy = \"opportunistic\"\n",
            sink.addr
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(relay_binary(), &config, dir, &[], &[]);
    let client = tokio::net::TcpStream::connect(relay.addr("mx"))
        .await
        .unwrap();
    (relay, sink, client)
}

/// Sends `line` and returns the complete reply (last line).
async fn command(c: &mut BufReader<tokio::net::TcpStream>, line: &str) -> String {
    if !line.is_empty() {
        c.get_mut().write_all(line.as_bytes()).await.unwrap();
    }
    reply(c).await
}

async fn reply(c: &mut BufReader<tokio::net::TcpStream>) -> String {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), c.read_line(&mut line))
            .await
            .expect("a reply in time")
            .unwrap();
        if n == 0 {
            return format!("{text}<closed>");
        }
        text += &line;
        if line.as_bytes().get(3) != Some(&b'-') {
            return text;
        }
    }
}

/// Greeting, EHLO, MAIL, RCPT, DATA and the first half of a message.
async fn start_message(c: &mut BufReader<tokio::net::TcpStream>) {
    assert!(command(c, "").await.starts_with("220"));
    assert!(command(c, "EHLO sender.test\r\n").await.contains("250 "));
    assert!(command(c, "MAIL FROM:<a@sender.test>\r\n")
        .await
        .starts_with("250"));
    assert!(command(c, "RCPT TO:<x@partner.test>\r\n")
        .await
        .starts_with("250"));
    assert!(command(c, "DATA\r\n").await.starts_with("354"));
    c.get_mut()
        .write_all(b"Subject: drain\r\n\r\nfirst half\r\n")
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_during_data_lets_a_message_finish_within_the_drain_time() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, sink, client) = smtp_relay(dir.path()).await;
    let mut c = BufReader::new(client);
    start_message(&mut c).await;
    relay.signal(libc::SIGTERM);
    relay.wait_for_log("stopped accepting");
    assert!(
        std::net::TcpStream::connect(relay.addr("mx")).is_err(),
        "no new connections once draining"
    );
    let end = command(&mut c, "second half\r\n.\r\n").await;
    assert!(
        end.starts_with("250 2.0.0 Ok: queued as SINK"),
        "the next hop's 250: {end}"
    );
    assert_eq!(sink.received.lock().unwrap().len(), 1, "delivered once");
    assert!(command(&mut c, "QUIT\r\n").await.starts_with("221"));
    let status = tokio::task::spawn_blocking(move || relay.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exits once drained: {status}");
}

#[tokio::test]
async fn sigterm_during_a_stalled_data_gives_421_and_delivers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut relay, sink, client) = smtp_relay(dir.path()).await;
    let mut c = BufReader::new(client);
    start_message(&mut c).await;
    relay.signal(libc::SIGTERM);
    // The sender stalls past the 1 s drain time.
    let answer = reply(&mut c).await;
    assert!(
        answer.starts_with("421 4.3.2"),
        "a temporary failure, so the sender retries: {answer}"
    );
    // The relay hung up on the next hop without an end of data.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sink.received.lock().unwrap().is_empty(),
        "nothing half-received was delivered"
    );
    relay.wait_for_log("drain time is up");
    let status = tokio::task::spawn_blocking(move || relay.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = echo_server();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!("ebpf.enabled = false\n[[listeners]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"opportunistic\"\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"),
    )
    .unwrap();
    let mut relay = RelayProcess::start(
        relay_binary(),
        &config,
        dir.path(),
        &["--log-format", "json"],
        &[],
    );
    drop(plain_session(relay.addr("edge")).unwrap());
    let line = relay.wait_for_log("\"message\":\"session ");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
    assert_eq!(v["level"], "INFO");
    assert!(
        v["message"].as_str().unwrap().contains("listener=edge"),
        "{v}"
    );
}

/// Piped logs are plain text (no colour escapes), and `--json-reports FILE`
/// puts the machine-readable reports in the file, not among the log lines.
#[test]
fn piped_logs_are_plain_and_json_reports_go_to_their_file() {
    let upstream = echo_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"plain\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"off\"\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let reports = dir.path().join("reports.jsonl");
    let mut relay = RelayProcess::start(
        relay_binary(),
        &config,
        dir.path(),
        &["--json-reports", reports.to_str().unwrap()],
        &[],
    );
    let mut s = std::net::TcpStream::connect(relay.addr("plain")).unwrap();
    s.write_all(b"ping").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"ping");
    relay.wait_for_log("session 1 listener=plain");
    let log = relay.log();
    for line in &log {
        assert!(
            !line.contains('\x1b'),
            "escape bytes in a piped log: {line:?}"
        );
        assert!(!line.starts_with('{'), "JSON among the log lines: {line}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&reports).unwrap_or_default();
        if text.ends_with('\n') || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let report: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(report["listener"], "plain");
    assert_eq!(report["bytes_client_to_upstream"], 4);
}

/// A listener out of descriptors (EMFILE) backs off instead of spinning on
/// accept: the relay, run with 64 open files, is sent more connections
/// than it can take (each session holds its client's and its upstream's
/// sockets, the upstream holding them open); while accept keeps failing it
/// says so in the log and uses next to no CPU.
#[test]
fn accept_failures_back_off_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("tlsrelay-64-files");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -n 64\nexec {} \"$@\"\n", relay_binary()),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // An upstream that takes every connection and holds it.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in upstream.incoming().flatten() {
            held.push(conn);
        }
    });
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"up\"\naddress = \"{upstream_addr}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let mut relay = RelayProcess::start(wrapper.to_str().unwrap(), &config, &state, &[], &[]);
    let listener = relay.addr("in");
    // Each client sends a byte, so its session is under way and holds
    // descriptors: 100 of them run the relay out.
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| {
            let mut c = TcpStream::connect(listener).ok()?;
            c.write_all(b"x").ok()?;
            Some(c)
        })
        .collect();
    relay.wait_for_log("accept failed");
    let cpu = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        // utime and stime, fields 14 and 15 of stat(5), in clock ticks.
        (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
    };
    let pid = relay.child.id();
    let before = cpu(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu(pid) - before;
    drop(held);
    let _ = relay.child.kill();
    assert!(
        used < 0.5,
        "the relay used {used:.2} s of CPU in 2 s while accept failed"
    );
}

/// The metrics listener is no way in for a stranger who reaches it: a
/// request head trickled a byte at a time is cut at its deadline (not
/// each read's), connections past a few are closed unread, scrapers from
/// outside `allow_from` are not served, and meanwhile the relay's own
/// listener relays.
#[test]
fn the_metrics_listener_bounds_what_a_stranger_holds() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = echo_server();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\n[metrics]\naddress = \"{metrics}\"\nallow_from = [\"127.0.0.1/32\"]\n\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"up\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(relay_binary(), &config, &dir.path().join("state"), &[], &[]);
    // Whether the relay has closed `t` (EOF or reset), without waiting.
    let closed = |t: &TcpStream| {
        t.set_nonblocking(true).unwrap();
        let seen = t.peek(&mut [0u8; 1]);
        t.set_nonblocking(false).unwrap();
        !matches!(seen, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    // Held open, sending nothing: eight are kept, the rest closed unread.
    let held: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(metrics).unwrap())
        .collect();
    let deadline = Instant::now() + tlsrelay_tests::patience();
    loop {
        let n = held.iter().filter(|t| closed(t)).count();
        if n == 40 - 8 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} of 40 closed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The relay's own listener is untouched.
    let mut c = TcpStream::connect(relay.addr("in")).unwrap();
    c.write_all(b"still relayed").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"still relayed");
    drop(held);

    // A request head trickled at 2.5 bytes/s (18 s for all of it) is cut
    // at the 5 s deadline for the whole head.
    let head = b"GET /metrics HTTP/1.1\r\nHost: a.relay.test\r\n\r\n";
    let mut t = loop {
        // Once the dropped ones are gone, a new connection is kept.
        let t = TcpStream::connect(metrics).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if !closed(&t) {
            break t;
        }
    };
    let started = Instant::now();
    let mut sent = 0;
    for b in head {
        if closed(&t) || t.write_all(&[*b]).is_err() {
            break;
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(400));
    }
    let cut = started.elapsed();
    assert!(
        sent < head.len() && cut < Duration::from_secs(12),
        "{sent} of {} bytes sent over {cut:?}",
        head.len()
    );

    // Another address of this host is not among allow_from.
    let stranger =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    stranger
        .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    stranger.connect(&metrics.into()).unwrap();
    let mut stranger: TcpStream = stranger.into();
    let _ = stranger.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stranger.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // A scrape from an allowed address is served and counts the refusals.
    let s = scrape(metrics);
    let refused = |limit| {
        total(
            &s,
            "tlsrelay_connections_refused_total",
            &[("listener", "metrics"), ("limit", limit)],
        )
    };
    assert!(refused("total") >= 32.0, "{:?}", s.samples);
    assert_eq!(refused("allow-from"), 1.0, "{:?}", s.samples);
}

/// The relay's splice pipes now, from /metrics: (in use, pooled).
fn splice_pipes(metrics: SocketAddr) -> (u64, u64) {
    let mut s = TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let value = |state: &str| {
        let prefix = format!("tlsrelay_splice_pipes{{state=\"{state}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
            .parse()
            .unwrap()
    };
    (value("in_use"), value("pooled"))
}

/// Idle sessions hold no splice pipe: 100 sessions each move 256 KiB
/// both ways (spliced, not copied) and go quiet, staying open; then no
/// pipe is in use, and the empty ones wait in the pool for the next
/// sessions, which reuse them and still relay every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_hold_no_pipe() {
    let upstream = tlsrelay_tests::plain_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "limits.max_connections_per_client = 1000\n[metrics]\naddress = \"{metrics}\"\n\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let relay = RelayProcess::start(relay_binary(), &config, &dir.path().join("state"), &[], &[]);
    let addr = relay.addr("in");
    let round = move |seed: u64| async move {
        let mut open = Vec::new();
        for i in 0..100 {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut data = tlsrelay_tests::random_bytes(256 * 1024, seed + i);
            data[0] = b'x'; // not a TLS handshake byte: the echo refuses TLS
            let (mut reader, mut writer) = stream.into_split();
            let sent = data.clone();
            let sender = tokio::spawn(async move {
                writer.write_all(&sent).await.unwrap();
                writer
            });
            let mut back = vec![0u8; data.len()];
            tokio::time::timeout(
                tlsrelay_tests::patience(),
                tokio::io::AsyncReadExt::read_exact(&mut reader, &mut back),
            )
            .await
            .expect("the echo within patience")
            .unwrap();
            assert!(back == data, "session {i}: bytes differ");
            open.push(reader.reunite(sender.await.unwrap()).unwrap());
        }
        open
    };
    // Each direction gives its pipe back once it finds its source empty.
    let settled = || async {
        let deadline = std::time::Instant::now() + tlsrelay_tests::patience();
        loop {
            let (in_use, pooled) = splice_pipes(metrics);
            if in_use == 0 || std::time::Instant::now() > deadline {
                break (in_use, pooled);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let first = round(0).await;
    let (in_use, pooled) = settled().await;
    assert_eq!(in_use, 0, "100 idle sessions hold pipes");
    assert!((1..200).contains(&pooled), "{pooled} pooled");
    // The next hundred take pooled pipes (no more are made than a
    // session or two in flight at once need): every byte still right.
    let second = round(1000).await;
    let (in_use, pooled_after) = settled().await;
    assert_eq!(in_use, 0, "200 idle sessions hold pipes");
    assert!(pooled_after <= pooled + 4, "{pooled} -> {pooled_after}");
    drop((first, second, relay));
}
