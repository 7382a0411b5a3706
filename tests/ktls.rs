//! Kernel TLS and the splice data plane.
//!
//! These tests run twice in CI: on the host, whose kernel has no TLS ULP, so
//! they assert the userspace fallback and its reason; and inside the kTLS VM
//! (`cargo xtask vmtest`, which sets TLSRELAY_EXPECT_KTLS=1), where they
//! assert that the kernel did the TLS — from the session reports and from
//! /proc/net/tls_stat, so a silent fallback fails them.

use std::net::SocketAddr;
use std::time::Duration;

use rustls::CipherSuite;
use tlsrelay::pump::{DataPath, PumpEnd, Side};
use tlsrelay_core::report::{LegSecurity, Outcome, SessionReport};
use tlsrelay_sys::ktls;
use tlsrelay_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// MiB relayed each way per version × cipher (at least 64 in CI).
fn bulk_bytes() -> usize {
    std::env::var("TLSRELAY_BULK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
        * 1024
        * 1024
}

/// Whether kTLS is usable here; fails when it must be and is not.
fn ktls_here() -> bool {
    let support = ktls::probe();
    if ktls_expected() {
        assert!(
            support.unavailable.is_none(),
            "kTLS expected (TLSRELAY_EXPECT_KTLS=1) but: {}",
            support.summary()
        );
    }
    support.unavailable.is_none()
}

fn relay_toml(mode: &str, upstream: SocketAddr, route: &str) -> String {
    relay_toml_with(mode, upstream, route, "io-uring")
}

fn relay_toml_with(mode: &str, upstream: SocketAddr, route: &str, pump: &str) -> String {
    format!(
        r#"
dataplane.pump = "{pump}"

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
    )
}

/// A relay terminating TLS (implicit) in front of a plaintext echo.
async fn terminating_relay(pki: &Pki) -> TestRelay {
    let upstream = plain_echo().await;
    let toml = relay_toml("implicit", upstream, "tls.policy = \"plain\"");
    TestRelay::start(&toml, pki.dir()).await
}

fn required_route(pki: &Pki) -> String {
    format!(
        "tls.policy = \"required\"\ntls.server_name = \"upstream.test\"\ntls.trust_anchors = {}",
        toml_path(&pki.ca_pem)
    )
}

/// The splice path the default engine takes here (io_uring unless the
/// kernel refuses it; CI's kernels have it).
fn splice_path() -> DataPath {
    match tlsrelay::pump::io_uring_available() {
        Ok(()) => DataPath::SpliceIoUring,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "io_uring unavailable in CI: {e}"
            );
            DataPath::SpliceEpoll
        }
    }
}

/// Asserts which data path a session took, given what the kernel can do.
fn assert_path(report: &SessionReport, ktls_legs: &[Side]) {
    assert_path_with(report, ktls_legs, splice_path())
}

fn assert_path_with(report: &SessionReport, ktls_legs: &[Side], splice: DataPath) {
    if ktls_here() {
        assert_eq!(report.data_path, Some(splice), "{report}");
        assert_eq!(report.ktls, ktls_legs, "{report}");
    } else if ktls_legs.is_empty() {
        assert_eq!(report.data_path, Some(splice), "{report}");
    } else {
        assert_eq!(report.data_path, Some(DataPath::Userspace), "{report}");
        let reason = report.path_reason.as_deref().unwrap_or_default();
        assert_eq!(
            reason, "no kernel TLS on this host (see the startup banner)",
            "{report}"
        );
    }
}

#[test]
fn probe_reports_what_the_kernel_can_do() {
    let support = ktls::probe();
    println!("{}", support.summary());
    rekey_here();
    if ktls_here() {
        for version in [ktls::KtlsVersion::Tls12, ktls::KtlsVersion::Tls13] {
            for cipher in ktls::KtlsCipher::ALL {
                assert!(
                    support.supports(version, cipher),
                    "{version:?} {cipher:?}: {}",
                    support.summary()
                );
            }
        }
    } else {
        let why = support.unavailable.as_deref().unwrap();
        assert!(why.contains("kernel lacks TLS ULP"), "{why}");
    }
}

const CASES: [(Versions, CipherSuite); 6] = [
    (Versions::Tls13Only, CipherSuite::TLS13_AES_128_GCM_SHA256),
    (Versions::Tls13Only, CipherSuite::TLS13_AES_256_GCM_SHA384),
    (
        Versions::Tls13Only,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    ),
    (
        Versions::Tls12Only,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ),
    (
        Versions::Tls12Only,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    ),
    (
        Versions::Tls12Only,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ),
];

/// Sends `data` and reads the echo at the same time, then checks both the
/// bytes and the clean TLS end (read_to_end fails without close_notify).
async fn bulk_echo<S>(stream: S, data: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let back = try_bulk_echo(stream, data)
        .await
        .expect("clean end of stream (close_notify) from the relay");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "relayed bytes differ");
}

/// What came back for `data` sent (then close_notify and FIN), read until
/// the relay's clean end; the read's error otherwise.
async fn try_bulk_echo<S>(stream: S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let to_send = data.to_vec();
    let sender = tokio::spawn(async move {
        for chunk in to_send.chunks(256 * 1024) {
            writer.write_all(chunk).await?;
        }
        writer.shutdown().await // close_notify + FIN
    });
    let mut back = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(600), reader.read_to_end(&mut back))
        .await
        .expect("bulk echo finished in time")?;
    sender.await.unwrap()?;
    Ok(back)
}

/// The relay's close_notify follows the last byte to a slow reader: with
/// the client's receive window at 8 KiB, each of the relay's TLS sockets is
/// near full when its source ends, where the kernel can hold a record back
/// after TCP took part of it, and a FIN sent then overtakes that record.
/// Several rounds on each pump, each ending in the client's clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_notify_follows_the_last_byte_to_a_slow_reader() {
    let pki = Pki::new();
    let leaf = pki.leaf("up", &["upstream.test"]);
    let upstream = tls_echo_with_suite(
        ServerOptions {
            leaf: &leaf,
            versions: Versions::Both,
            client_ca: None,
        },
        None,
    )
    .await;
    let connector = tokio_rustls::TlsConnector::from(client_config(&ClientOptions::default()));
    for pump in ["io-uring", "epoll"] {
        let toml = relay_toml_with("implicit", upstream, &required_route(&pki), pump);
        let mut relay = TestRelay::start(&toml, pki.dir()).await;
        for round in 0..8u64 {
            // More than the relay's send buffer (autotuned to a few MiB on
            // loopback), so it fills.
            let data = random_bytes((8 << 20) + round as usize * 7919, round);
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(8 * 1024).unwrap();
            let tcp = socket.connect(relay.addr("in")).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
            let stream = connector.connect(name, tcp).await.unwrap();
            let back = try_bulk_echo(stream, &data)
                .await
                .unwrap_or_else(|e| panic!("{pump} round {round}: no clean end: {e}"));
            assert!(back == data, "{pump} round {round}: relayed bytes differ");
            let report = relay.next_report().await;
            assert_eq!(
                report.outcome,
                Outcome::Relayed {
                    end: PumpEnd::Closed
                },
                "{pump} round {round}: {report}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_tls_every_version_and_cipher_byte_exact() {
    every_version_and_cipher("io-uring", splice_path(), bulk_bytes()).await;
}

/// The same matrix on the epoll splice pump, with less data: the engines
/// share everything but the loop that drives splice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_tls_every_version_and_cipher_on_epoll() {
    every_version_and_cipher("epoll", DataPath::SpliceEpoll, 4 << 20).await;
}

async fn every_version_and_cipher(pump: &str, splice: DataPath, bytes: usize) {
    let pki = Pki::new();
    let leaf = pki.leaf("up", &["upstream.test"]);
    let data = random_bytes(bytes, 11);
    for (versions, suite) in CASES {
        let upstream = tls_echo_with_suite(
            ServerOptions {
                leaf: &leaf,
                versions,
                client_ca: None,
            },
            Some(suite),
        )
        .await;
        let toml = relay_toml_with("implicit", upstream, &required_route(&pki), pump);
        let mut relay = TestRelay::start(&toml, pki.dir()).await;
        let before = tls_stat();
        let opts = ClientOptions {
            versions,
            suite: Some(suite),
            ..Default::default()
        };
        let stream = tls_connect(relay.addr("in"), "relay.test", &opts)
            .await
            .unwrap();
        // The relay's report says how the session ended when the stream
        // did not end cleanly.
        let echoed = try_bulk_echo(stream, &data).await;
        let report = relay.next_report().await;
        let case = format!("{versions:?} {suite:?}: {report}");
        let back = echoed.unwrap_or_else(|e| {
            panic!("{case}: no clean end of stream (close_notify) from the relay: {e}")
        });
        assert!(back == data, "{case}: relayed bytes differ");
        for leg in [&report.inbound, &report.outbound] {
            match leg {
                Some(LegSecurity::Tls { negotiated, .. }) => {
                    assert_eq!(negotiated.cipher, suite.as_str().unwrap(), "{case}")
                }
                other => panic!("{case}: leg not TLS: {other:?}"),
            }
        }
        assert_eq!(
            report.outcome,
            Outcome::Relayed {
                end: PumpEnd::Closed
            },
            "{case}"
        );
        assert_eq!(report.bytes_client_to_upstream, data.len() as u64, "{case}");
        assert_eq!(report.bytes_upstream_to_client, data.len() as u64, "{case}");
        assert_path_with(&report, &[Side::Client, Side::Upstream], splice);
        if ktls_here() {
            let after = tls_stat();
            for counter in ["TlsTxSw", "TlsRxSw"] {
                let rose = after[counter] - before.get(counter).copied().unwrap_or(0);
                assert!(
                    rose >= 2,
                    "{case}: {counter} rose by {rose}, expected both legs"
                );
            }
            assert_eq!(
                after.get("TlsDecryptError").copied().unwrap_or(0),
                0,
                "{case}"
            );
        }
        println!("ok: {case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_puts_one_leg_in_the_kernel() {
    let pki = Pki::new();
    let mut relay = terminating_relay(&pki).await;
    let stream = tls_connect(relay.addr("in"), "relay.test", &ClientOptions::default())
        .await
        .unwrap();
    bulk_echo(stream, &random_bytes(4 << 20, 3)).await;
    let report = relay.next_report().await;
    assert_path(&report, &[Side::Client]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_both_legs_splice_on_any_kernel() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let mut relay = TestRelay::start(
        &relay_toml("off", upstream, "tls.policy = \"plain\""),
        pki.dir(),
    )
    .await;
    let stream = tokio::net::TcpStream::connect(relay.addr("in"))
        .await
        .unwrap();
    bulk_echo(stream, &random_bytes(8 << 20, 5)).await;
    let report = relay.next_report().await;
    assert_eq!(report.data_path, Some(splice_path()), "{report}");
    assert!(report.ktls.is_empty(), "{report}");
}

/// An upstream that reads slowly and checks every byte: the relay's kTLS TX
/// socket fills, splices into it come up short, and any record the kernel
/// got wrong fails rustls's decryption here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_behind_ktls_gets_exact_bytes() {
    let pki = Pki::new();
    let data = random_bytes(16 << 20, 9);
    let expected = data.clone();
    let (upstream, receiver) = tls_upstream_once(&pki, |mut tls| async move {
        let mut got = Vec::with_capacity(expected.len());
        let mut buf = vec![0u8; 7919]; // odd sizes, slowly
        loop {
            let n = tls.read(&mut buf).await.expect("every record decrypts");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() % (1 << 20) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(got == expected, "upstream received different bytes");
        tls.shutdown().await.unwrap();
    })
    .await;
    let mut relay = TestRelay::start(
        &relay_toml("off", upstream, &required_route(&pki)),
        pki.dir(),
    )
    .await;
    let mut client = tokio::net::TcpStream::connect(relay.addr("in"))
        .await
        .unwrap();
    client.write_all(&data).await.unwrap();
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    receiver.await.unwrap();
    let report = relay.next_report().await;
    assert_path(&report, &[Side::Upstream]);
    assert_eq!(
        report.outcome,
        Outcome::Relayed {
            end: PumpEnd::Closed
        },
        "{report}"
    );
}

/// Whether this kernel can rekey kTLS (Linux 6.14+); vmtest says which
/// kernel it booted (TLSRELAY_EXPECT_REKEY), so a wrong probe fails.
fn rekey_here() -> bool {
    let support = ktls::probe();
    if let Ok(expected) = std::env::var("TLSRELAY_EXPECT_REKEY") {
        assert_eq!(support.rekey, expected == "1", "{}", support.summary());
    }
    support.rekey
}

/// Peers that send a TLS 1.3 KeyUpdate (asking for one back) before every
/// 64 KiB they write, over the bulk size each way: the client, and in the
/// bridge the upstream too. Userspace rustls follows them; kernel TLS that
/// can rekey follows them too, byte-exact, with the kernel's rekey
/// counters rising by every update each way; kernel TLS that cannot ends
/// the session at the first one with a fatal alert to each TLS peer, so
/// neither takes the cut for a clean end.
async fn key_update_storm(bridge: bool) {
    const EVERY: usize = 64 * 1024;
    let pki = Pki::new();
    let (upstream, route, upstream_sessions) = if bridge {
        let (addr, sessions) = key_updating_tls_echo(&pki, EVERY).await;
        (addr, required_route(&pki), Some(sessions))
    } else {
        (
            plain_echo().await,
            "tls.policy = \"plain\"".to_string(),
            None,
        )
    };
    let mut relay = TestRelay::start(&relay_toml("implicit", upstream, &route), pki.dir()).await;
    let before = tls_stat();
    let opts = ClientOptions {
        versions: Versions::Tls13Only,
        ..Default::default()
    };
    let tls = tls_connect(relay.addr("in"), "relay.test", &opts)
        .await
        .unwrap();
    let data = random_bytes(bulk_bytes(), 5);
    let updates_each_way = (data.len() / EVERY - 1) as u64;
    let result = try_bulk_echo(KeyUpdating::new(tls, EVERY), &data).await;
    let report = relay.next_report().await;
    let legs: &[Side] = if bridge {
        &[Side::Client, Side::Upstream]
    } else {
        &[Side::Client]
    };
    if ktls_here() && !rekey_here() {
        let err = result.expect_err("a session cut at a KeyUpdate");
        assert_cut(&err, &report);
        match &report.outcome {
            Outcome::Relayed {
                end: PumpEnd::Reset { detail, .. },
            } => assert!(detail.contains("KeyUpdate"), "{report}"),
            other => panic!("expected the end at a KeyUpdate, got {other:?}"),
        }
        if let Some(mut sessions) = upstream_sessions {
            let upstream = sessions.recv().await.unwrap();
            let err = upstream.expect_err("upstream session cut");
            assert_cut(&err, &report);
        }
        return;
    }
    let back = result.expect("relayed through every KeyUpdate");
    assert!(back == data, "relayed bytes differ ({report})");
    assert_eq!(
        report.outcome,
        Outcome::Relayed {
            end: PumpEnd::Closed
        },
        "{report}"
    );
    if let Some(mut sessions) = upstream_sessions {
        let updates = sessions.recv().await.unwrap().unwrap() as u64;
        assert!(updates >= updates_each_way, "upstream sent {updates}");
    }
    assert_path(&report, legs);
    if ktls_here() {
        let after = tls_stat();
        let rose = |c: &str| after[c] - before.get(c).copied().unwrap_or(0);
        // Every peer update followed. Requests are answered with one update
        // before the relay's next data, however many came meanwhile (RFC
        // 8446 4.6.3; rustls gives up after 32 updates without data
        // between), so the relay sends fewer, but some on every leg.
        let expected = updates_each_way * legs.len() as u64;
        assert!(
            rose("TlsRxRekeyOk") >= expected,
            "TlsRxRekeyOk rose by {}, expected {expected}: {report}",
            rose("TlsRxRekeyOk")
        );
        assert!(
            rose("TlsTxRekeyOk") >= legs.len() as u64,
            "TlsTxRekeyOk rose by {}: {report}",
            rose("TlsTxRekeyOk")
        );
        for counter in ["TlsRxRekeyError", "TlsTxRekeyError", "TlsDecryptError"] {
            assert_eq!(rose(counter), 0, "{counter}: {report}");
        }
    }
}

/// A TLS peer's view of a session the relay cut: the relay's fatal alert,
/// or the reset that follows it when the peer, busy writing, had not read
/// the alert before the reset arrived (a reset discards what the relay
/// could not yet send). Never a clean end.
fn assert_cut(err: &std::io::Error, report: &SessionReport) {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    let alert = err.to_string().contains("InternalError");
    let reset = matches!(err.kind(), ConnectionReset | BrokenPipe);
    assert!(alert || reset, "{err}: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_storm_on_tls_termination() {
    key_update_storm(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_storm_on_a_tls_bridge() {
    key_update_storm(true).await;
}

/// OpenSSL's s_client as the TLS client (as the issue's peers: OpenSSL
/// 3.0), sending lines through the relay to a plain echo with a KeyUpdate
/// after each, alternately `k` (update_not_requested) and `K` (requested):
/// every line comes back, and on a kernel that rekeys the kernel's
/// counters show each update followed and each request answered. Where the
/// kernel cannot rekey, the first update ends the session and s_client
/// reports the relay's alert instead of a clean end.
#[cfg_attr(missing_openssl, ignore = "needs openssl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_key_updates_of_both_kinds() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    if !have_program("openssl", "version", "openssl") {
        assert!(!ktls_expected(), "openssl missing in the kTLS VM");
        return;
    }
    const LINES: usize = 40;
    let pki = Pki::new();
    let mut relay = terminating_relay(&pki).await;
    let before = tls_stat();
    let mut s_client = tokio::process::Command::new("openssl")
        .args(["s_client", "-brief", "-tls1_3", "-connect"])
        .arg(relay.addr("in").to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = s_client.stdin.take().unwrap();
    let mut stdout = BufReader::new(s_client.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(s_client.stderr.take().unwrap()).lines();
    let follows = !ktls_here() || rekey_here();
    let mut echoed = 0;
    for i in 0..LINES {
        // s_client takes a command from a read that starts with its letter:
        // a line at a time, each waited for.
        let line = format!("line {i} through the relay");
        if stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .is_err()
        {
            break; // s_client has exited
        }
        let back = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(l) = stdout.next_line().await.unwrap() {
                if l == line {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !back {
            break;
        }
        echoed += 1;
        let command = if i % 2 == 0 { "k\n" } else { "K\n" };
        if stdin.write_all(command.as_bytes()).await.is_err() {
            break;
        }
        // s_client says KEYUPDATE on stderr once it has sent it.
        while let Some(l) = stderr.next_line().await.unwrap() {
            if l.contains("KEYUPDATE") {
                break;
            }
        }
    }
    let _ = stdin.write_all(b"Q\n").await;
    let mut errors = String::new();
    while let Ok(Ok(Some(l))) =
        tokio::time::timeout(Duration::from_secs(10), stderr.next_line()).await
    {
        errors += &l;
        errors.push('\n');
    }
    let _ = s_client.wait().await;
    let report = relay.next_report().await;
    if !follows {
        assert_eq!(echoed, 1, "only the line before the first update: {report}");
        assert!(errors.contains("internal error"), "{errors}\n{report}");
        return;
    }
    assert_eq!(echoed, LINES, "{errors}\n{report}");
    assert_eq!(
        report.outcome,
        Outcome::Relayed {
            end: PumpEnd::Closed
        },
        "{report}"
    );
    assert_path(&report, &[Side::Client]);
    if ktls_here() {
        let after = tls_stat();
        let rose = |c: &str| after[c] - before.get(c).copied().unwrap_or(0);
        assert!(rose("TlsRxRekeyOk") >= LINES as u64, "{after:?}");
        assert!(rose("TlsTxRekeyOk") >= LINES as u64 / 2, "{after:?}");
        assert_eq!(rose("TlsRxRekeyError"), 0);
    }
}

/// A message body of about `size` bytes (exactly `size` when it is short):
/// lines of 0 to 200 octets ending in CRLF, many starting with a dot.
fn mail_body(size: usize, seed: u64) -> Vec<u8> {
    if size < 3 {
        return b"x".repeat(size);
    }
    let noise = random_bytes(size, seed);
    let mut body = Vec::with_capacity(size + 256);
    let mut i = 0;
    while body.len() < size {
        let len = noise[i % noise.len()] as usize % 200;
        if noise[(i + 1) % noise.len()].is_multiple_of(3) {
            body.push(b'.');
        }
        body.extend((0..len).map(|k| b'a' + noise[(i + k) % noise.len()] % 26));
        body.extend_from_slice(b"\r\n");
        i += len + 2;
    }
    body
}

fn dot_stuffed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 50);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    out
}

/// SMTP with STARTTLS on both legs: on a kTLS kernel the session's two
/// sockets are kernel TLS from the end of each handshake (tls_stat rises,
/// the report says so), and messages from 1 byte to the bulk size, by DATA
/// (the end marker split across reads) and by BDAT (chunk boundaries in
/// mid-line), arrive byte-identical and once, also at a next hop without
/// CHUNKING (BDAT converted to DATA). Elsewhere the report says why not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_with_starttls_on_both_legs_runs_on_kernel_tls() {
    use tlsrelay_tests::smtp_client::RawSmtp;
    use tlsrelay_tests::smtp_sink::{smtp_sink, SinkOptions};
    let pki = Pki::new();
    let sink_leaf = pki.leaf("sink", &["sink.test"]);
    let relay_leaf = pki.leaf("relay", &["relay.test"]);
    let sizes = [1, 1000, 16 * 1024 + 7, (1 << 20) + 3, bulk_bytes()];
    for chunking in [true, false] {
        let sink = smtp_sink(SinkOptions {
            tls: Some(server_config(&ServerOptions {
                leaf: &sink_leaf,
                versions: Versions::Both,
                client_ca: None,
            })),
            chunking,
            refuse_marker: "nobody",
            requiretls: false,
        })
        .await;
        let toml = format!(
            "accepted_domains = [\"example.org\"]\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\nmax_message_size = {}\ntls.mode = \"opportunistic\"\ntls.certificates = [{{ chain = {}, key = {} }}]\n\n[[outbound_connectors]]\nname = \"sink\"\nrecipient_domains = [\"example.org\"]\nnext_hops = [\"{}\"]\ntls.policy = \"required\"\ntls.verify = \"encryption-only\"\n",
            bulk_bytes() * 2,
            toml_path(&relay_leaf.chain),
            toml_path(&relay_leaf.key),
            sink.addr
        );
        let mut relay = TestRelay::start(&toml, pki.dir()).await;
        let before = tls_stat();
        let mut c = RawSmtp::connect(relay.addr("mx")).await;
        assert!(c.cmd("EHLO client.test").await.contains("STARTTLS"));
        c.starttls().await;
        assert!(c.cmd("EHLO client.test").await.contains("CHUNKING"));
        let mut sent = Vec::new();
        for (n, &size) in sizes.iter().enumerate() {
            for bdat in [false, true] {
                let body = mail_body(size, n as u64 * 2 + u64::from(bdat));
                assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
                let rcpt = c.cmd("RCPT TO:<x@example.org>").await;
                assert!(rcpt.starts_with("250"), "{rcpt}");
                if bdat {
                    // Odd chunk sizes: boundaries fall in mid-line.
                    let chunks: Vec<&[u8]> = body.chunks(7919).collect();
                    for (i, chunk) in chunks.iter().enumerate() {
                        let last = if i + 1 == chunks.len() { " LAST" } else { "" };
                        c.send(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes())
                            .await;
                        c.send(chunk).await;
                        let reply = c.reply().await;
                        assert!(reply.starts_with("250"), "{size} BDAT: {reply}");
                    }
                } else {
                    assert!(c.cmd("DATA").await.starts_with("354"));
                    let mut stuffed = dot_stuffed(&body);
                    if !stuffed.ends_with(b"\r\n") {
                        stuffed.extend_from_slice(b"\r\n");
                    }
                    // CRLF . CRLF in three reads.
                    let (most, end) = stuffed.split_at(stuffed.len() - 2);
                    c.send(most).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    c.send(&[end, b"."].concat()).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    c.send(b"\r\n").await;
                    let reply = c.reply().await;
                    assert!(reply.starts_with("250"), "{size} DATA: {reply}");
                }
                // DATA (and BDAT converted to DATA) ends the content in CRLF.
                let mut want = body;
                let converted_or_data = !(bdat && chunking);
                if converted_or_data && !want.ends_with(b"\r\n") {
                    want.extend_from_slice(b"\r\n");
                }
                sent.push((want, bdat && chunking));
            }
        }
        assert!(c.cmd("QUIT").await.starts_with("221"));
        let report = relay.next_report().await;
        let received = sink.received.lock().unwrap().clone();
        assert_eq!(received.len(), sent.len(), "once each: {report}");
        for (got, (want, via_bdat)) in received.iter().zip(&sent) {
            assert!(
                got.body == *want,
                "{} bytes differ (chunking {chunking})",
                want.len()
            );
            assert_eq!(got.via_bdat, *via_bdat, "{} bytes: {report}", want.len());
        }
        if ktls_here() {
            assert_eq!(report.ktls, [Side::Client, Side::Upstream], "{report}");
            // BDAT relayed as BDAT between kernel TLS sockets is spliced.
            let path = if chunking {
                DataPath::SpliceEpoll
            } else {
                DataPath::Userspace
            };
            assert_eq!(report.data_path, Some(path), "{report}");
            let after = tls_stat();
            for counter in ["TlsTxSw", "TlsRxSw"] {
                let rose = after[counter] - before.get(counter).copied().unwrap_or(0);
                assert!(
                    rose >= 2,
                    "{counter} rose by {rose}, expected both legs: {report}"
                );
            }
            assert_eq!(after.get("TlsDecryptError").copied().unwrap_or(0), 0);
        } else {
            assert!(report.ktls.is_empty(), "{report}");
            assert_eq!(
                report.path_reason.as_deref(),
                Some("no kernel TLS on this host (see the startup banner)"),
                "{report}"
            );
        }
        println!("ok: SMTP on kernel TLS, next hop chunking {chunking}");
    }
}
