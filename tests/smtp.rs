//! SMTP through the relay on loopback: swaks (the real client) or a raw
//! client in front, a recording SMTP next hop behind, certificates from a
//! test PKI. Each forced-TLS failure must reach the sender as a 4.7.x
//! temporary failure; mail must arrive byte for byte, once.

use std::net::SocketAddr;
use std::sync::Arc;

use tlsrelay_core::report::{Direction, LegSecurity};
use tlsrelay_tests::smtp_client::RawSmtp;
use tlsrelay_tests::smtp_sink::{smtp_sink, Sink, SinkOptions};
use tlsrelay_tests::*;

const MESSAGE: &str = "From: a@sender.test\nTo: x@partner.test\nSubject: through the relay\n\nline one\n.a line that starts with a dot\n..two dots\nlast line\n";

fn sink_tls(pki: &Pki, name: &str, versions: Versions) -> Arc<rustls::ServerConfig> {
    let leaf = pki.leaf(&format!("sink-{name}"), &[name]);
    server_config(&ServerOptions {
        leaf: &leaf,
        versions,
        client_ca: None,
    })
}

async fn sink(tls: Option<Arc<rustls::ServerConfig>>, chunking: bool) -> Sink {
    smtp_sink(SinkOptions {
        tls,
        chunking,
        refuse_marker: "nobody",
        requiretls: false,
    })
    .await
}

/// An SMTP relay config: one smtp listener, `connectors` appended.
fn smtp_config(listener_tls: &str, connectors: &str) -> String {
    format!(
        r#"
ebpf.enabled = false
accepted_domains = ["partner.test", "elsewhere.test", "a.test", "b.test", ".b.test", "x.test"]
[limits]
smtp_timeout_scale = 0.05
handshake_timeout = "5s"

[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
{listener_tls}

{connectors}
"#
    )
}

fn outbound(name: &str, domains: &str, hop: SocketAddr, tls: &str) -> String {
    format!(
        "[[outbound_connectors]]\nname = \"{name}\"\nrecipient_domains = [{domains}]\nnext_hops = [\"{hop}\"]\n{tls}\n"
    )
}

fn required(pki: &Pki, names: &str, extra: &str) -> String {
    format!(
        "tls.policy = \"required\"\ntls.verify = \"name\"\ntls.names = [{names}]\ntls.trust_anchors = {}\n{extra}",
        toml_path(&pki.ca_pem)
    )
}

/// The body as the sink stores it: CRLF line endings.
fn crlf(text: &str) -> Vec<u8> {
    text.replace('\n', "\r\n").into_bytes()
}

#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_on_both_legs_delivers_the_message_byte_identical() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let next = sink(
        Some(sink_tls(&pki, "mx.partner.test", Versions::Both)),
        true,
    )
    .await;
    let conf = smtp_config(
        "tls.mode = \"opportunistic\"",
        &outbound(
            "partner",
            "\"partner.test\"",
            next.addr,
            &required(&pki, "\"mx.partner.test\"", ""),
        ),
    );
    let mut relay = TestRelay::start(&conf, pki.dir()).await;
    let addr = relay.addr("mx");
    let (ok, transcript) = // swaks ends the data with CRLF . CRLF itself.
        swaks_to(addr, &[
            "--tls",
            "--from",
            "a@sender.test",
            "--to",
            "x@partner.test",
            "--data",
            MESSAGE.trim_end(),
        ]).await;
    assert!(ok, "{transcript}");
    assert!(
        transcript.contains("250 2.0.0 Ok: queued as SINK"),
        "the next hop's reply reaches the sender:\n{transcript}"
    );
    let got = next.received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered exactly once");
    assert!(got[0].over_tls);
    assert_eq!(got[0].recipients, vec!["x@partner.test"]);
    assert_eq!(
        got[0].body,
        crlf(MESSAGE),
        "byte-identical after dot-stuffing both ways"
    );
    let report = relay.next_report().await;
    assert!(
        matches!(report.inbound, Some(LegSecurity::Tls { .. })),
        "{report}"
    );
    assert!(
        matches!(
            report.outbound,
            Some(LegSecurity::Tls {
                trust: tlsrelay_core::policy::PeerTrust::Verified,
                ..
            })
        ),
        "{report}"
    );
    assert_eq!(report.transactions.len(), 1, "{report}");
}

#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tls_failures_reach_the_sender_as_4_7_x() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let other_ca = Pki::new();
    // (next hop, expected reason in the reply)
    let cases = vec![
        (sink(None, true).await, "not offered"),
        (
            sink(
                Some(sink_tls(&pki, "wrong.partner.test", Versions::Both)),
                true,
            )
            .await,
            "name mismatch",
        ),
        (
            sink(
                Some(sink_tls(&other_ca, "mx.partner.test", Versions::Both)),
                true,
            )
            .await,
            "certificate untrusted",
        ),
        (
            sink(
                Some(sink_tls(&pki, "mx.partner.test", Versions::Tls12Only)),
                true,
            )
            .await,
            "version too low",
        ),
    ];
    for (next, reason) in cases {
        let conf = smtp_config(
            "tls.mode = \"opportunistic\"",
            &outbound(
                "partner",
                "\"partner.test\"",
                next.addr,
                &required(&pki, "\"mx.partner.test\"", "tls.min_version = \"1.3\""),
            ),
        );
        let mut relay = TestRelay::start(&conf, pki.dir()).await;
        let addr = relay.addr("mx");
        let (ok, transcript) = swaks_to(
            addr,
            &[
                "--from",
                "a@sender.test",
                "--to",
                "x@partner.test",
                "--data",
                MESSAGE,
            ],
        )
        .await;
        assert!(!ok, "{reason}: {transcript}");
        let refusal = transcript
            .lines()
            .find(|l| l.contains("451 4.7.5"))
            .unwrap_or_else(|| panic!("{reason}: no 451 4.7.5 in\n{transcript}"));
        assert!(refusal.contains(reason), "{reason}: {refusal}");
        assert!(
            next.received.lock().unwrap().is_empty(),
            "nothing delivered"
        );
        let report = relay.next_report().await;
        let t = &report.transactions[0];
        assert!(t.result.is_none(), "{report}");
        // The refusal is on record with the connector that could not
        // deliver (what tlsrelay_smtp_tls_deferrals_total counts).
        assert_eq!(t.connector.as_deref(), Some("partner"), "{report}");
        assert!(
            t.refused.len() == 1 && t.refused[0].starts_with("451 4.7.5"),
            "{report}"
        );
    }
}

#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opportunistic_connector_falls_back_to_plaintext_and_records_it() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let next = sink(None, true).await;
    let conf = smtp_config(
        "tls.mode = \"opportunistic\"",
        &outbound("any", "\"*\"", next.addr, "tls.policy = \"opportunistic\""),
    );
    let mut relay = TestRelay::start(&conf, pki.dir()).await;
    let addr = relay.addr("mx");
    let (ok, transcript) = swaks_to(
        addr,
        &[
            "--from",
            "a@sender.test",
            "--to",
            "x@elsewhere.test",
            "--data",
            MESSAGE,
        ],
    )
    .await;
    assert!(ok, "{transcript}");
    assert_eq!(next.received.lock().unwrap().len(), 1);
    assert!(!next.received.lock().unwrap()[0].over_tls);
    let report = relay.next_report().await;
    let d = report
        .downgraded(Direction::Outbound)
        .expect("downgrade recorded");
    assert!(d.reason.contains("not offered"), "{report}");
}

#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_tls_listener_says_530_before_starttls() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let next = sink(None, true).await;
    let conf = smtp_config(
        "tls.mode = \"required\"",
        &outbound("any", "\"*\"", next.addr, "tls.policy = \"plain\""),
    );
    let relay = TestRelay::start(&conf, pki.dir()).await;
    let addr = relay.addr("mx");
    let (ok, transcript) = swaks_to(
        addr,
        &["--from", "a@sender.test", "--to", "x@elsewhere.test"],
    )
    .await;
    assert!(!ok);
    assert!(
        transcript.contains("530 5.7.0 Must issue a STARTTLS command first"),
        "{transcript}"
    );
    // With STARTTLS it goes through, pipelined.
    let (ok, transcript) = swaks_to(
        addr,
        &[
            "--tls",
            "--pipeline",
            "--from",
            "a@sender.test",
            "--to",
            "x@elsewhere.test",
        ],
    )
    .await;
    assert!(ok, "{transcript}");
    assert_eq!(next.received.lock().unwrap().len(), 1);
}

#[cfg_attr(missing_swaks, ignore = "needs swaks")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_connector_checks_client_certificates_and_sender_domains() {
    if !have_swaks() {
        return;
    }
    let pki = Pki::new();
    let next = sink(None, true).await;
    let right = pki.leaf("partner-right", &["mail.partner.test"]);
    let wrong = pki.leaf("partner-wrong", &["mail.intruder.test"]);
    let conf = smtp_config(
        "tls.mode = \"opportunistic\"",
        &format!(
            "{}\n[[inbound_connectors]]\nname = \"partner\"\ncertificate_names = [\"mail.partner.test\"]\nsender_domains = [\"partner.test\"]\ntls = \"required\"\nclient_certificate = \"requested\"\ntrust_anchors = {}\n",
            outbound("any", "\"*\"", next.addr, "tls.policy = \"plain\""),
            toml_path(&pki.ca_pem)
        ),
    );
    let relay = TestRelay::start(&conf, pki.dir()).await;
    let addr = relay.addr("mx");
    for (cert, accept) in [(None, false), (Some(&wrong), false), (Some(&right), true)] {
        let label = cert.map(|c| c.chain.display().to_string());
        let mut args = vec![
            "--tls",
            "--from",
            "boss@partner.test",
            "--to",
            "x@elsewhere.test",
        ];
        let files = cert.map(|c| (c.chain.display().to_string(), c.key.display().to_string()));
        if let Some((chain, key)) = &files {
            args.extend(["--tls-cert", chain.as_str(), "--tls-key", key.as_str()]);
        }
        let (ok, transcript) = swaks_to(addr, &args).await;
        assert_eq!(ok, accept, "{label:?}: {transcript}");
        if !accept {
            assert!(transcript.contains("451 4.7.1"), "{label:?}: {transcript}");
        }
    }
    assert_eq!(
        next.received.lock().unwrap().len(),
        1,
        "only the partner with the right certificate got through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_of_another_connector_get_452_and_go_in_a_second_transaction() {
    let pki = Pki::new();
    let a = sink(None, true).await;
    let b = sink(None, true).await;
    let conf = smtp_config(
        "tls.mode = \"off\"",
        &format!(
            "{}{}",
            outbound("a", "\"a.test\"", a.addr, "tls.policy = \"plain\""),
            outbound(
                "b",
                "\"b.test\", \".b.test\"",
                b.addr,
                "tls.policy = \"plain\""
            )
        ),
    );
    let relay = TestRelay::start(&conf, pki.dir()).await;
    let mut c = RawSmtp::connect(relay.addr("mx")).await;
    assert!(c.cmd("EHLO client.test").await.contains("CHUNKING"));
    assert!(c.cmd("MAIL FROM:<s@sender.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<one@a.test>").await.starts_with("250 2.1.5"));
    assert!(c
        .cmd("RCPT TO:<two@x.b.test>")
        .await
        .starts_with("452 4.5.3"));
    assert!(
        c.cmd("RCPT TO:<nobody@a.test>")
            .await
            .starts_with("550 5.1.1"),
        "the next hop's refusal"
    );
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c
        .cmd("Subject: first\r\n\r\nfor a\r\n.")
        .await
        .contains("queued as SINK"));
    // The second transaction goes to the other next hop.
    assert!(c.cmd("MAIL FROM:<s@sender.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<two@x.b.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c
        .cmd("Subject: second\r\n\r\nfor b\r\n.")
        .await
        .contains("queued as SINK"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let (ra, rb) = (
        a.received.lock().unwrap().clone(),
        b.received.lock().unwrap().clone(),
    );
    assert_eq!((ra.len(), rb.len()), (1, 1));
    assert_eq!(ra[0].recipients, vec!["one@a.test"]);
    assert_eq!(rb[0].recipients, vec!["two@x.b.test"]);
    assert_eq!(rb[0].body, b"Subject: second\r\n\r\nfor b\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_is_relayed_as_bdat_or_converted_to_data() {
    let pki = Pki::new();
    for chunking in [true, false] {
        let next = sink(None, chunking).await;
        let conf = smtp_config(
            "tls.mode = \"off\"",
            &outbound("any", "\"*\"", next.addr, "tls.policy = \"plain\""),
        );
        let relay = TestRelay::start(&conf, pki.dir()).await;
        let mut c = RawSmtp::connect(relay.addr("mx")).await;
        c.cmd("EHLO client.test").await;
        c.cmd("MAIL FROM:<s@sender.test>").await;
        assert!(c.cmd("RCPT TO:<r@x.test>").await.starts_with("250"));
        let part1 = b"Subject: chunks\r\n\r\n.dot first\r\n";
        let part2 = b"..two\r\nno final newline";
        c.send(format!("BDAT {}\r\n", part1.len()).as_bytes()).await;
        c.send(part1).await;
        assert!(c.reply().await.starts_with("250"));
        c.send(format!("BDAT {} LAST\r\n", part2.len()).as_bytes())
            .await;
        c.send(part2).await;
        assert!(
            c.reply().await.contains("queued as SINK"),
            "chunking={chunking}"
        );
        c.cmd("QUIT").await;
        let got = next.received.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].via_bdat, chunking);
        let mut want = [&part1[..], &part2[..]].concat();
        if !chunking {
            want.extend_from_slice(b"\r\n"); // DATA needs the last line ended
        }
        assert_eq!(got[0].body, want, "chunking={chunking}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_pipelined_after_starttls_is_not_executed() {
    let pki = Pki::new();
    let next = sink(None, true).await;
    let conf = smtp_config(
        "tls.mode = \"opportunistic\"",
        &outbound("any", "\"*\"", next.addr, "tls.policy = \"plain\""),
    );
    let relay = TestRelay::start(&conf, pki.dir()).await;
    let mut c = RawSmtp::connect(relay.addr("mx")).await;
    c.cmd("EHLO client.test").await;
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        .await;
    assert!(c.reply().await.starts_with("503 5.5.1"));
    // The injected MAIL was discarded: RCPT now is out of sequence.
    assert!(c.cmd("RCPT TO:<r@x.test>").await.starts_with("503"));
    assert!(next.received.lock().unwrap().is_empty());
}

/// BDAT between plain TCP legs is spliced socket -> pipe -> socket, its
/// copy (tee) scanned first: chunks of any size and boundary arrive
/// byte-identical, the report says splice and counts the bytes, and a bare
/// LF in a spliced chunk still refuses the message before any byte of it
/// from the bare one on reaches the next hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_chunks_between_plain_legs_are_spliced_and_still_scanned() {
    let hop = sink(None, true).await;
    let config = smtp_config(
        "tls.mode = \"off\"",
        &outbound(
            "partner",
            "\"partner.test\"",
            hop.addr,
            "tls.policy = \"plain\"",
        ),
    );
    let pki = Pki::new();
    let mut relay = TestRelay::start(&config, pki.dir()).await;
    let mut c = RawSmtp::connect(relay.addr("mx")).await;
    assert!(c.cmd("EHLO client.test").await.contains("CHUNKING"));
    let body: Vec<u8> = (0..40_000)
        .flat_map(|i| format!("line {i} of the body, long enough to span chunks\r\n").into_bytes())
        .collect();
    assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@partner.test>").await.starts_with("250"));
    let chunks: Vec<&[u8]> = body.chunks(300_007).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = if i + 1 == chunks.len() { " LAST" } else { "" };
        c.send(format!("BDAT {}{last}\r\n", chunk.len()).as_bytes())
            .await;
        // Let the relay meet the chunk on its socket, not in its buffer.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        c.send(chunk).await;
        let reply = c.reply().await;
        assert!(reply.starts_with("250"), "chunk {i}: {reply}");
    }
    // A bare LF in the middle of a large chunk.
    assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@partner.test>").await.starts_with("250"));
    let mut smuggled = body[..200_000].to_vec();
    smuggled[150_000] = b'\n';
    smuggled[149_999] = b'x';
    c.send(format!("BDAT {} LAST\r\n", smuggled.len()).as_bytes())
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    c.send(&smuggled).await;
    let reply = c.reply().await;
    assert!(reply.starts_with("554 5.6.0 Bare LF"), "{reply}");
    assert!(
        c.cmd("NOOP").await.starts_with("250"),
        "the session goes on"
    );
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let report = relay.next_report().await;
    let received = hop.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "only the clean message: {report}");
    assert!(received[0].body == body, "byte-identical");
    assert_eq!(
        report.data_path,
        Some(tlsrelay::pump::DataPath::SpliceEpoll),
        "{report}"
    );
    assert!(
        report.bytes_client_to_upstream >= body.len() as u64 - 300_007,
        "most chunk bytes spliced: {report}"
    );
    // Nothing from the bare LF on reached the next hop.
    let wire = hop.wire();
    let at = wire
        .windows(20)
        .rposition(|w| w == &smuggled[149_980..150_000])
        .expect("the clean prefix went");
    assert!(!wire[at..]
        .windows(10)
        .any(|w| w == &smuggled[150_001..150_011]));
}

/// One message per session, as a busy sender's MTA sends: the relay's
/// STARTTLS next hop is connected once and reused (RSET, then the next
/// transaction) by the sessions that follow within the connector's
/// `connection_cache_time`, and QUIT once idle past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_reuse_the_idle_next_hop_connection_after_rset() {
    let pki = Pki::new();
    let next = sink(
        Some(sink_tls(&pki, "mx.partner.test", Versions::Both)),
        true,
    )
    .await;
    let tls = required(
        &pki,
        "\"mx.partner.test\"",
        "connection_cache_time = \"1m\"\n",
    );
    let conf = smtp_config(
        "tls.mode = \"off\"",
        &outbound("partner", "\"partner.test\"", next.addr, &tls),
    );
    let mut relay = TestRelay::start(&conf, pki.dir()).await;
    for i in 0..3 {
        let mut c = RawSmtp::connect(relay.addr("mx")).await;
        c.cmd("EHLO client.test").await;
        assert!(c.cmd("MAIL FROM:<s@sender.test>").await.starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@partner.test>").await.starts_with("250"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        let reply = c
            .cmd(&format!("Subject: {i}\r\n\r\nmessage {i}\r\n."))
            .await;
        assert!(reply.contains("queued as SINK"), "{reply}");
        assert!(c.cmd("QUIT").await.starts_with("221"));
        let report = relay.next_report().await;
        let t = &report.transactions[0];
        assert_eq!(t.reused, i > 0, "session {i}: {report}");
        assert_eq!(report.outbound_reused, i > 0, "{report}");
        assert!(
            matches!(report.outbound, Some(LegSecurity::Tls { .. })),
            "a reused connection reports the TLS it was opened with: {report}"
        );
        assert!(t
            .next_hop
            .as_deref()
            .unwrap()
            .contains(&next.addr.to_string()));
    }
    assert_eq!(next.connections(), 1, "one connection for three sessions");
    let wire = String::from_utf8_lossy(&next.wire()).into_owned();
    assert_eq!(
        wire.matches("RSET\r\nMAIL FROM:<s@sender.test>").count(),
        2,
        "{wire}"
    );
    assert!(!wire.contains("QUIT"), "still idle, not closed: {wire}");
    let got = next.received.lock().unwrap().clone();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|r| r.over_tls), "{got:?}");
    drop(relay);
}

/// A connection idle past `connection_cache_time` is QUIT; one the next
/// hop dropped while idle (its own timeout's 421) costs the next session
/// nothing: its RSET fails and a new connection carries the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_next_hop_is_quit_in_time_and_a_dead_one_replaced() {
    let pki = Pki::new();
    // A next hop that answers the first connection's RSET with 421 and
    // hangs up, as a server whose idle timer fired does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hop = listener.local_addr().unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = heard.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let (tcp, _) = listener.accept().await.unwrap();
            let log = log.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
                let mut s = BufReader::new(tcp);
                s.get_mut().write_all(b"220 hop ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                    log.lock().unwrap().push(format!("{n} {}", line.trim_end()));
                    let reply: &[u8] = match line.get(..4).unwrap_or("") {
                        "RSET" if n == 0 => b"421 4.4.2 hop idle timeout\r\n",
                        "DATA" => b"354 go\r\n",
                        "QUIT" => b"221 bye\r\n",
                        _ if line == ".\r\n" => b"250 2.0.0 queued\r\n",
                        "EHLO" | "MAIL" | "RCPT" | "RSET" => b"250 ok\r\n",
                        _ => b"",
                    };
                    s.get_mut().write_all(reply).await.unwrap();
                    if reply.starts_with(b"421") || reply.starts_with(b"221") {
                        return;
                    }
                    line.clear();
                }
            });
        }
    });
    let conf = smtp_config(
        "tls.mode = \"off\"",
        &outbound(
            "partner",
            "\"partner.test\"",
            hop,
            "tls.policy = \"plain\"\nconnection_cache_time = \"1m\"\n",
        ),
    );
    let mut relay = TestRelay::start(&conf, pki.dir()).await;
    let addr = relay.addr("mx");
    let send = |i: usize| async move {
        let mut c = RawSmtp::connect(addr).await;
        c.cmd("EHLO client.test").await;
        assert!(c.cmd("MAIL FROM:<s@sender.test>").await.starts_with("250"));
        assert!(c.cmd("RCPT TO:<x@partner.test>").await.starts_with("250"));
        assert!(c.cmd("DATA").await.starts_with("354"));
        let reply = c.cmd(&format!("message {i}\r\n.")).await;
        assert!(reply.starts_with("250 2.0.0 queued"), "{reply}");
        c.cmd("QUIT").await;
    };
    send(0).await;
    assert!(!relay.next_report().await.transactions[0].reused);
    send(1).await;
    let report = relay.next_report().await;
    assert!(!report.transactions[0].reused, "a new connection: {report}");
    let heard = heard.lock().unwrap().clone();
    assert!(heard.contains(&"0 RSET".to_string()), "{heard:?}");
    assert!(
        heard.contains(&"1 MAIL FROM:<s@sender.test>".to_string()),
        "{heard:?}"
    );
    drop(relay);

    // With the default idle time (2 s) the parked connection gets QUIT.
    let next = sink(None, false).await;
    let conf = smtp_config(
        "tls.mode = \"off\"",
        &outbound(
            "partner",
            "\"partner.test\"",
            next.addr,
            "tls.policy = \"plain\"",
        ),
    );
    let mut relay = TestRelay::start(&conf, pki.dir()).await;
    let mut c = RawSmtp::connect(relay.addr("mx")).await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<s@sender.test>").await;
    c.cmd("RCPT TO:<x@partner.test>").await;
    assert!(c.cmd("QUIT").await.starts_with("221"));
    relay.next_report().await;
    let parked = std::time::Instant::now();
    let deadline = parked + patience();
    while !String::from_utf8_lossy(&next.wire()).contains("QUIT") {
        assert!(std::time::Instant::now() < deadline, "never QUIT");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        parked.elapsed() >= std::time::Duration::from_millis(1900),
        "kept idle for its time first: {:?}",
        parked.elapsed()
    );
    drop(relay);
}
