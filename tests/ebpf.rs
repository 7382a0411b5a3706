//! The eBPF wire counters on the host kernel (root needed; CI runs as
//! root). Parser cases go through BPF_PROG_TEST_RUN with crafted packets;
//! a scripted mix goes through the real relay binary, and the pinned
//! counters must match the mix and the relay's own reports exactly.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use tlsrelay_ebpf_common as wire;
use tlsrelay_sys::bpf::Detached;
use tlsrelay_tests::*;

/// Whether eBPF can be tested here; in CI a missing prerequisite fails.
fn ebpf_here() -> bool {
    let root = is_root();
    let why = if !root {
        Some("not root".to_string())
    } else {
        Detached::load().err().map(|e| e.to_string())
    };
    match why {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("eBPF tests need root and a loadable program in CI: {why}")
        }
        Some(why) => {
            eprintln!("skipped: eBPF unavailable here ({why})");
            false
        }
    }
}

fn tcp_header(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // seq
    h.extend_from_slice(&1u32.to_be_bytes()); // ack
    h.extend_from_slice(&[5 << 4, 0x18]); // data offset 5 words; PSH|ACK
    h.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
    h
}

fn ipv4(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = (20 + 20 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1]);
    p.extend(tcp_header(sport, dport));
    p.extend_from_slice(payload);
    p
}

fn ipv6(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[6, 64]);
    p.extend_from_slice(&[0; 15]);
    p.push(1); // ::1
    p.extend_from_slice(&[0; 15]);
    p.push(1);
    p.extend(tcp_header(sport, dport));
    p.extend_from_slice(payload);
    p
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A real ClientHello record from rustls offering `versions`.
fn client_hello(versions: Versions) -> Vec<u8> {
    let config = client_config(&ClientOptions {
        versions,
        ..Default::default()
    });
    let mut conn = rustls::ClientConnection::new(config, "relay.test".try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// The server's first flight answering `hello` (its first record is the
/// ServerHello, or a HelloRetryRequest when `secp256r1_only`).
fn server_flight(pki: &Pki, hello: &[u8], versions: Versions, secp256r1_only: bool) -> Vec<u8> {
    let leaf = pki.leaf("server", &["relay.test"]);
    let mut provider = (*provider()).clone();
    if secp256r1_only {
        provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP256R1];
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match versions {
        Versions::Tls12Only => &[&rustls::version::TLS12],
        Versions::Tls13Only => &[&rustls::version::TLS13],
        Versions::Both => rustls::ALL_VERSIONS,
    };
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(leaf.certs(), leaf.private_key())
        .unwrap();
    let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
    conn.read_tls(&mut &hello[..]).unwrap();
    conn.process_new_packets().unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Runs one packet; returns the record it made (each test run is its own
/// socket, so its own cookie).
fn run_one(prog: &mut Detached, egress: bool, packet: &[u8]) -> Option<wire::Connection> {
    let before: Vec<u64> = prog
        .connections()
        .unwrap()
        .iter()
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(
        prog.run(egress, packet).unwrap(),
        1,
        "the program always passes packets"
    );
    prog.connections()
        .unwrap()
        .into_iter()
        .find(|(c, _)| !before.contains(c))
        .map(|(_, conn)| conn)
}

/// The three counter records, summed over CPUs.
fn counters(p: &Detached) -> (wire::Negotiated, wire::Downgrades, wire::Parser) {
    (
        p.counters(wire::MAP_NEGOTIATED).unwrap(),
        p.counters(wire::MAP_DOWNGRADES).unwrap(),
        p.counters(wire::MAP_PARSER).unwrap(),
    )
}

#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[test]
fn parser_cases_with_prog_test_run() {
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let mut prog = Detached::load().unwrap();

    // ClientHello with supported_versions (1.3 and 1.2): the highest counts.
    let ch13 = client_hello(Versions::Both);
    let c = run_one(&mut prog, false, &ipv4(40000, 4430, &ch13)).unwrap();
    assert_eq!(c.offered_version, wire::TLS1_3);
    assert_eq!(
        (c.local_port, c.remote_port),
        (4430, 40000),
        "ingress: local is the destination"
    );
    // Without supported_versions (a TLS 1.2-only client): legacy_version.
    let ch12 = client_hello(Versions::Tls12Only);
    let c = run_one(&mut prog, true, &ipv4(40001, 443, &ch12)).unwrap();
    assert_eq!(c.offered_version, wire::TLS1_2);
    assert_eq!(
        (c.local_port, c.remote_port),
        (40001, 443),
        "egress: local is the source"
    );
    // The same over IPv6.
    let c = run_one(&mut prog, false, &ipv6(40002, 4430, &ch13)).unwrap();
    assert_eq!(c.offered_version, wire::TLS1_3);

    // ServerHello for 1.3 (supported_versions) and for 1.2 (legacy only).
    let sh13 = server_flight(&pki, &ch13, Versions::Both, false);
    let c = run_one(&mut prog, true, &ipv4(4430, 40000, &sh13)).unwrap();
    assert_eq!(c.negotiated_version, wire::TLS1_3);
    assert_eq!(c.cipher_suite, 0x1302, "TLS13_AES_256_GCM_SHA384");
    let sh12 = server_flight(&pki, &ch12, Versions::Both, false);
    let c = run_one(&mut prog, true, &ipv4(4430, 40001, &sh12)).unwrap();
    assert_eq!(c.negotiated_version, wire::TLS1_2);
    let (n, _, p) = counters(&prog);
    assert_eq!((n.tls1_3, n.tls1_2, p.server_hellos), (1, 1, 2));

    // A HelloRetryRequest is not the ServerHello that settles the version.
    let hrr = server_flight(&pki, &ch13, Versions::Tls13Only, true);
    let c = run_one(&mut prog, true, &ipv4(4430, 40003, &hrr)).unwrap();
    assert_eq!(c.negotiated_version, 0);
    let (n, _, p) = counters(&prog);
    assert_eq!(
        (n.tls1_3, p.hello_retry_requests, p.server_hellos),
        (1, 1, 2)
    );

    // The first segment of a hello split across segments: the rest is
    // awaited (each test run is its own socket, so it never comes here;
    // tests below send real split hellos), nothing guessed, no plaintext.
    let c = run_one(
        &mut prog,
        false,
        &ipv4(40004, 4430, &ch13[..ch13.len() / 2]),
    )
    .unwrap();
    assert_eq!(
        (c.offered_version, c.unparsed, c.plaintext, c.tls_started),
        (0, 0, 0, 1)
    );
    // A hello record larger than the program follows: unparsed.
    let big = [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
    let c = run_one(&mut prog, false, &ipv4(40012, 4430, &big)).unwrap();
    assert_eq!((c.offered_version, c.unparsed, c.plaintext), (0, 1, 0));
    // Malformed: a record header announcing a hello, with junk inside.
    let mut junk = vec![0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x00, 0x04];
    junk.extend_from_slice(&[0xff; 4]);
    let c = run_one(&mut prog, false, &ipv4(40005, 4430, &junk)).unwrap();
    assert_eq!((c.offered_version, c.unparsed), (0, 1));
    let (_, _, p) = counters(&prog);
    assert_eq!(p.unparsed, 2);
    // A ServerHello's key_share names the group (TLS 1.3).
    let c = run_one(&mut prog, true, &ipv4(4430, 40013, &sh13)).unwrap();
    assert_ne!(c.key_share_group, 0, "the ServerHello's key_share group");

    // An alert before any application data: the handshake failed.
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 48];
    let c = run_one(&mut prog, false, &ipv4(40006, 4430, &alert)).unwrap();
    assert_eq!((c.handshake_alert, c.alert_description), (1, 48));
    let (_, d, _) = counters(&prog);
    assert_eq!(d.handshake_failed, 1);

    // Plaintext on a TCP port: a plaintext connection.
    let c = run_one(
        &mut prog,
        false,
        &ipv4(40007, 4430, b"hello in the clear\n"),
    )
    .unwrap();
    assert_eq!(c.plaintext, 1);
    let (n, _, _) = counters(&prog);
    assert_eq!(n.plaintext, 1);

    // SMTP verbs on port 25.
    let ehlo = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-starttls\r\n250 8BITMIME\r\n";
    let c = run_one(&mut prog, true, &ipv4(25, 40008, ehlo)).unwrap();
    assert_eq!((c.starttls_offered, c.plaintext), (1, 0));
    // Postfix's EHLO reply, STARTTLS past the first 128 bytes.
    let postfix = b"250-mail.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 STARTTLS\r\n";
    assert!(postfix.len() > 150);
    let c = run_one(&mut prog, true, &ipv4(25, 40014, postfix)).unwrap();
    assert_eq!(
        c.starttls_offered,
        1,
        "STARTTLS at byte {}",
        postfix.len() - 14
    );
    let c = run_one(&mut prog, false, &ipv4(40009, 25, b"STARTTLS\r\n")).unwrap();
    assert_eq!(c.starttls_issued, 1);
    let c = run_one(
        &mut prog,
        false,
        &ipv4(40010, 25, b"MAIL FROM:<a@partner.example>\r\n"),
    )
    .unwrap();
    assert_eq!((c.plaintext_mail, c.plaintext), (1, 1));
    let (n, d, _) = counters(&prog);
    assert_eq!((d.plaintext, n.plaintext), (1, 2));
    // The same MAIL FROM on a non-SMTP port is just plaintext.
    let c = run_one(
        &mut prog,
        false,
        &ipv4(40011, 8080, b"MAIL FROM:<a@partner.example>\r\n"),
    )
    .unwrap();
    assert_eq!((c.plaintext_mail, c.plaintext), (0, 1));

    // Not TCP: ignored, no record.
    let mut udp = ipv4(53, 53, b"dns");
    udp[9] = 17;
    assert!(run_one(&mut prog, false, &udp).is_none());
}

/// A small deterministic generator (failures reproduce from the seed).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `base` damaged the ways a hostile or broken peer could: bytes flipped,
/// cut short, length fields (record, handshake, anywhere) made up, bytes
/// inserted, or all random.
fn mutate(base: &[u8], rng: &mut XorShift) -> Vec<u8> {
    let mut p = base.to_vec();
    for _ in 0..1 + rng.below(3) {
        if p.is_empty() {
            p.push(rng.next() as u8);
        }
        match rng.below(7) {
            0 => {
                let at = rng.below(p.len());
                p[at] = rng.next() as u8;
            }
            1 => p.truncate(rng.below(p.len() + 1)),
            2 if p.len() >= 5 => {
                let len = rng.below(0x4400) as u16;
                p[3..5].copy_from_slice(&len.to_be_bytes());
            }
            3 if p.len() >= 9 => {
                let len = rng.next() as u32 & 0xffffff;
                p[6..9].copy_from_slice(&len.to_be_bytes()[1..]);
            }
            4 if p.len() >= 2 => {
                let at = rng.below(p.len() - 1);
                let len = rng.below(0x10000) as u16;
                p[at..at + 2].copy_from_slice(&len.to_be_bytes());
            }
            5 => {
                let at = rng.below(p.len() + 1);
                let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                p.splice(at..at, junk);
            }
            6 => p = (0..rng.below(1500)).map(|_| rng.next() as u8).collect(),
            _ => {}
        }
    }
    p
}

/// Whether `value` appears in `p` as two big-endian bytes.
fn carries(p: &[u8], value: u16) -> bool {
    p.windows(2).any(|w| w == value.to_be_bytes())
}

fn contains_ci(p: &[u8], word: &[u8]) -> bool {
    p.windows(word.len()).any(|w| w.eq_ignore_ascii_case(word))
}

/// Generated packets through the program with BPF_PROG_TEST_RUN: real
/// hellos, alerts, SMTP lines and plaintext, mutated, on IPv4 and IPv6
/// with their headers damaged too. Every packet is passed (no verifier or
/// runtime surprise on any input), and every counter and record moves
/// only as that packet says (each test run is its own socket: a record
/// starts empty, so no version downgrade can ever count).
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[test]
fn generated_packets_pass_and_move_only_what_they_say() {
    if !ebpf_here() {
        return;
    }
    const PACKETS: usize = 20_000;
    let pki = Pki::new();
    let mut prog = Detached::load().unwrap();
    let ch13 = client_hello(Versions::Both);
    let ch12 = client_hello(Versions::Tls12Only);
    let seeds: Vec<Vec<u8>> = vec![
        server_flight(&pki, &ch13, Versions::Both, false),
        server_flight(&pki, &ch12, Versions::Both, false),
        server_flight(&pki, &ch13, Versions::Tls13Only, true),
        ch13,
        ch12,
        vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40],
        b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n".to_vec(),
        b"STARTTLS\r\n".to_vec(),
        b"220 2.0.0 Ready to start TLS\r\n".to_vec(),
        b"MAIL FROM:<a@partner.example>\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
    ];
    let mut rng = XorShift(0x7e57_5eed_0bad_f00d);
    let (mut recorded, mut hellos) = (0, 0);
    for i in 0..PACKETS {
        let payload = match rng.below(8) {
            0 => seeds[rng.below(seeds.len())].clone(),
            _ => mutate(&seeds[rng.below(seeds.len())], &mut rng),
        };
        let ports = [25, 587, 2525, 443, 4430, 40000 + rng.below(20000) as u16];
        let (local, remote) = (ports[rng.below(6)], ports[rng.below(6)]);
        let egress = rng.below(2) == 1;
        let (sport, dport) = if egress {
            (local, remote)
        } else {
            (remote, local)
        };
        let mut packet = if rng.below(4) == 0 {
            ipv6(sport, dport, &payload)
        } else {
            ipv4(sport, dport, &payload)
        };
        // One MTU's worth, as segments arrive (the test runner takes a
        // page at most).
        packet.truncate(1500);
        let l4 = if packet[0] >> 4 == 6 { 40 } else { 20 };
        match rng.below(12) {
            0 => packet[0] = (rng.next() as u8 & 0xf0) | (packet[0] & 0x0f),
            1 if l4 == 20 => packet[0] = 0x40 | (rng.next() as u8 & 0x0f),
            2 => packet[l4 + 12] = rng.next() as u8,
            3 => packet[if l4 == 20 { 9 } else { 6 }] = rng.next() as u8,
            // Cut short, but a whole IP header stays: the kernel hands the
            // program nothing shorter (and its test runner refuses it).
            4 => packet.truncate(l4 + rng.below(packet.len() - l4 + 1)),
            _ => {}
        }

        let before = counters(&prog);
        let verdict = prog
            .run(egress, &packet)
            .unwrap_or_else(|e| panic!("packet {i} ({} bytes): {e}", packet.len()));
        assert_eq!(verdict, 1, "packet {i} dropped: {packet:02x?}");
        let after = counters(&prog);
        let records = prog.take_connections().unwrap();
        let why = || format!("packet {i}: {packet:02x?}");

        // What the packet says, read here independently.
        let version = packet.first().map(|b| b >> 4);
        let (l4, proto) = match version {
            Some(4) if packet.len() > 9 => (((packet[0] & 0x0f) as usize) * 4, packet[9]),
            Some(6) if packet.len() > 6 => (40, packet[6]),
            _ => (0, 0),
        };
        let tcp_ok = proto == 6 && packet.len() >= l4 + 13;
        let payload_at = if tcp_ok {
            l4 + (packet[l4 + 12] >> 4) as usize * 4
        } else {
            0
        };
        if !tcp_ok || payload_at >= packet.len() {
            assert!(
                records.is_empty(),
                "no record without a TCP payload: {}",
                why()
            );
            assert_eq!(before, after, "no counter without a TCP payload: {}", why());
            continue;
        }
        let p = &packet[payload_at..];
        assert_eq!(records.len(), 1, "one record per segment: {}", why());
        recorded += 1;
        let (_, c) = records[0];
        let (n0, d0, p0) = before;
        let (n1, d1, p1) = after;
        assert_eq!(p1.segments, p0.segments + 1, "{}", why());
        assert_eq!(
            p1.reassembled,
            p0.reassembled,
            "nothing to reassemble: {}",
            why()
        );
        assert_eq!(
            d1.version,
            d0.version,
            "a fresh socket offered nothing: {}",
            why()
        );
        let record_type = matches!(p[0], 0x14..=0x17);
        let handshake = p.len() > 5 && p[0] == 0x16 && p[1] == 3;
        let moved = |a: u64, b: u64| {
            assert!(
                b == a || b == a + 1,
                "a counter moved by more than one: {}",
                why()
            );
            b == a + 1
        };
        if moved(p0.client_hellos, p1.client_hellos) {
            assert!(handshake && p[5] == 1, "a client hello counted: {}", why());
            hellos += 1;
        }
        if moved(p0.server_hellos, p1.server_hellos)
            | moved(p0.hello_retry_requests, p1.hello_retry_requests)
        {
            assert!(handshake && p[5] == 2, "a server hello counted: {}", why());
        }
        if moved(p0.unparsed, p1.unparsed) {
            assert!(record_type, "unparsed is for TLS records: {}", why());
            assert_eq!(c.plaintext, 0, "{}", why());
        }
        if c.offered_version != 0 {
            assert!(
                handshake && p[5] == 1 && carries(p, c.offered_version),
                "{}",
                why()
            );
        }
        for value in [c.negotiated_version, c.cipher_suite, c.key_share_group] {
            if value != 0 {
                assert!(
                    handshake && p[5] == 2 && carries(p, value),
                    "{value:#x}: {}",
                    why()
                );
            }
        }
        let versions = [
            (n0.tls1_0, n1.tls1_0, wire::TLS1_0),
            (n0.tls1_1, n1.tls1_1, wire::TLS1_1),
            (n0.tls1_2, n1.tls1_2, wire::TLS1_2),
            (n0.tls1_3, n1.tls1_3, wire::TLS1_3),
        ];
        for (a, b, v) in versions {
            if moved(a, b) {
                assert_eq!(c.negotiated_version, v, "{}", why());
            }
        }
        if moved(n0.plaintext, n1.plaintext) {
            assert!(
                !(record_type && p.len() >= 5 && p[1] == 3),
                "TLS counted as plaintext: {}",
                why()
            );
            assert_eq!(c.plaintext, 1, "{}", why());
        }
        if moved(d0.handshake_failed, d1.handshake_failed) {
            assert!(p[0] == 0x15 && c.handshake_alert == 1, "{}", why());
        }
        if moved(d0.plaintext, d1.plaintext) {
            assert!(
                contains_ci(p, b"MAIL FROM") && c.plaintext_mail == 1,
                "{}",
                why()
            );
            assert!(
                [25, 587, 2525].contains(&c.local_port) || [25, 587, 2525].contains(&c.remote_port),
                "{}",
                why()
            );
        }
        if moved(d0.stripped, d1.stripped) {
            assert!(
                contains_ci(p, b"STARTTLS") && contains_ci(p, b"MAIL FROM"),
                "{}",
                why()
            );
        }
        let port = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
        let (sport, dport) = (port(l4), port(l4 + 2));
        let expected = if egress {
            (sport, dport)
        } else {
            (dport, sport)
        };
        assert_eq!((c.local_port, c.remote_port), expected, "{}", why());
    }
    eprintln!("{PACKETS} packets, {recorded} with a TCP payload, {hellos} parsed client hellos");
    assert!(
        recorded > PACKETS / 2 && hellos > 100,
        "the generator reaches the parser"
    );
}

struct RelayProcess {
    child: std::process::Child,
    listeners: std::collections::HashMap<String, SocketAddr>,
    reports: std::sync::mpsc::Receiver<String>,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_relay(config: &Path, state: &Path) -> RelayProcess {
    // JSON reports alone on stdout; the banner and logs on stderr.
    let mut child = Command::new(relay_binary())
        .args(["run", "--json-reports", "-", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut listeners = std::collections::HashMap::new();
    let mut banner = String::new();
    for line in logs.by_ref() {
        let line = line.unwrap();
        banner += &line;
        banner.push('\n');
        if let Some((name, addr)) = line
            .trim()
            .strip_prefix("listener ")
            .and_then(|r| r.split_once(" listening on "))
        {
            listeners.insert(name.to_string(), addr.parse().unwrap());
        }
        if line.trim().starts_with("state directory") {
            break;
        }
    }
    assert!(
        banner.contains("eBPF wire counters on the sockets of cgroup"),
        "{banner}"
    );
    std::thread::spawn(move || logs.for_each(drop));
    let (tx, reports) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        // Every line: one that is not JSON fails the test where it is parsed.
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    RelayProcess {
        child,
        listeners,
        reports,
    }
}

#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_a_scripted_mix_and_the_relay() {
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let plain_upstream = plain_echo().await;
    let old_leaf = pki.leaf("old", &["old.test"]);
    let old_upstream = tls_echo(ServerOptions {
        leaf: &old_leaf,
        versions: Versions::Tls12Only,
        client_ca: None,
    })
    .await;
    let pin_dir = format!("/sys/fs/bpf/tlsrelay-test-{}", std::process::id());
    let config = pki.dir().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            r#"
ebpf.pin_dir = "{pin_dir}"

[[listeners]]
name = "tls"
address = "127.0.0.1:0"
upstream = "plain"
tls.mode = "implicit"

[[listeners]]
name = "opp"
address = "127.0.0.1:0"
upstream = "plain"
tls.mode = "opportunistic"

[[listeners]]
name = "to-old"
address = "127.0.0.1:0"
upstream = "old"
tls.mode = "implicit"

[[upstreams]]
name = "plain"
address = "{plain_upstream}"
tls.policy = "plain"

[[upstreams]]
name = "old"
address = "{old_upstream}"
tls.policy = "required"
tls.server_name = "old.test"
tls.trust_anchors = {}
"#,
            toml_path(&pki.ca_pem)
        ),
    )
    .unwrap();
    let relay = start_relay(&config, &pki.dir().join("state"));
    let msg = b"counted on the wire";
    let tls = |versions| ClientOptions {
        versions,
        ..Default::default()
    };
    let mut sessions = 0;
    for _ in 0..3 {
        let mut s = tls_connect(
            relay.listeners["tls"],
            "relay.test",
            &tls(Versions::Tls13Only),
        )
        .await
        .unwrap();
        assert_eq!(exchange(&mut s, msg).await.unwrap(), msg);
        sessions += 1;
    }
    for _ in 0..2 {
        let mut s = tls_connect(
            relay.listeners["tls"],
            "relay.test",
            &tls(Versions::Tls12Only),
        )
        .await
        .unwrap();
        assert_eq!(exchange(&mut s, msg).await.unwrap(), msg);
        sessions += 1;
    }
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(relay.listeners["opp"])
            .await
            .unwrap();
        assert_eq!(exchange(&mut s, msg).await.unwrap(), msg);
        sessions += 1;
    }
    // A TLS 1.2 client that does not trust the relay's certificate aborts
    // the handshake with an alert.
    let strict = Pki::new();
    let aborted = tls_connect(
        relay.listeners["tls"],
        "relay.test",
        &ClientOptions {
            versions: Versions::Tls12Only,
            trust: Some(&strict),
            ..Default::default()
        },
    )
    .await;
    assert!(aborted.is_err());
    sessions += 1;
    // The relay offers TLS 1.3 to an upstream that only speaks 1.2.
    let mut s = tls_connect(
        relay.listeners["to-old"],
        "relay.test",
        &tls(Versions::Tls13Only),
    )
    .await
    .unwrap();
    assert_eq!(exchange(&mut s, msg).await.unwrap(), msg);
    sessions += 1;

    // The relay's own view of the same sessions, from its JSON reports.
    let mut reports = Vec::new();
    for _ in 0..sessions {
        let line = relay
            .reports
            .recv_timeout(patience())
            .expect("a report per session");
        reports.push(line);
    }
    let mut relay_view = std::collections::BTreeMap::<&str, u64>::new();
    for r in &reports {
        for leg in ["inbound", "outbound"] {
            let security = extract(r, leg);
            *relay_view.entry(security).or_default() += 1;
        }
    }

    let out = Command::new(relay_binary())
        .args(["stats", "--json", "--pin-dir", &pin_dir])
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stats flagged disagreements:\n{stats}"
    );
    let count = |section: &str, name: &str| -> u64 {
        let section = &stats[stats.find(&format!("\"{section}\"")).unwrap()..];
        let at = section.find(&format!("\"{name}\": ")).unwrap() + name.len() + 4;
        section[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // The mix, leg by leg: 3 x (1.3 in, plain out), 2 x (1.2 in, plain out),
    // 2 x (plain in, plain out), 1 x 1.2 handshake that the client aborted
    // after the relay's ServerHello, 1 x (1.3 in, 1.2 out: a downgrade).
    assert_eq!(count("negotiated", "tls1_3"), 4, "{stats}");
    assert_eq!(count("negotiated", "tls1_2"), 4, "{stats}");
    assert_eq!(count("negotiated", "plaintext"), 9, "{stats}");
    assert_eq!(count("downgrades", "version"), 1, "{stats}");
    assert_eq!(count("downgrades", "handshake_failed"), 1, "{stats}");
    assert_eq!(count("downgrades", "plaintext"), 0, "{stats}");
    assert_eq!(count("downgrades", "stripped"), 0, "{stats}");
    assert_eq!(count("parser", "unparsed"), 0, "{stats}");
    assert!(stats.contains("\"disagreements\": 0"), "{stats}");
    // And the relay's reports say the same, leg by leg.
    assert_eq!(relay_view.get("TLSv1.3"), Some(&4), "{relay_view:?}");
    assert_eq!(
        relay_view.get("TLSv1.2"),
        Some(&3),
        "{relay_view:?} (the aborted leg has no report version)"
    );
    assert_eq!(relay_view.get("plaintext"), Some(&9), "{relay_view:?}");

    // bpftool prints the records with their field names.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned", &format!("{pin_dir}/connections")])
        .output()
        .expect("bpftool installed (CI installs it)");
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "offered_version",
        "negotiated_version",
        "cipher_suite",
        "starttls_offered",
        "handshake_alert",
    ] {
        assert!(
            dump.contains(field),
            "bpftool output lacks {field}:\n{dump}"
        );
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// The `security` (or version) of a leg in a JSON report line.
fn extract<'a>(report: &'a str, leg: &str) -> &'a str {
    let Some(at) = report.find(&format!("\"{leg}\":")) else {
        return "none";
    };
    let rest = &report[at..];
    if rest.starts_with(&format!("\"{leg}\":null")) {
        return "none";
    }
    if rest.starts_with(&format!("\"{leg}\":{{\"security\":\"plaintext\"")) {
        return "plaintext";
    }
    let v = rest
        .find("\"version\":\"")
        .map(|i| &rest[i + 11..])
        .unwrap_or("");
    &v[..v.find('"').unwrap_or(0)]
}

/// `tlsrelay stats --json` for a pin directory, and its exit code.
fn stats(pin_dir: &str) -> (serde_json::Value, Option<i32>) {
    let out = Command::new(relay_binary())
        .args(["stats", "--json", "--pin-dir", pin_dir])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "stats --json: {e}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (json, out.status.code())
}

/// `stats` once the relay's views and the wire's have caught up with the
/// sessions just ended (a relay records its view as a session ends, the
/// wire as packets pass): polled until `settled` holds, at most patience().
/// The caller's assertions say what is wrong if it never does.
async fn settled_stats(
    pin_dir: &str,
    settled: impl Fn(&serde_json::Value) -> bool,
) -> (serde_json::Value, Option<i32>) {
    let deadline = std::time::Instant::now() + patience();
    loop {
        let (stats, code) = stats(pin_dir);
        if (code == Some(0) && settled(&stats)) || std::time::Instant::now() > deadline {
            return (stats, code);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn unique_pin_dir(what: &str) -> String {
    format!("/sys/fs/bpf/tlsrelay-test-{what}-{}", std::process::id())
}

/// A TCP connection whose segments carry at most `mss` bytes.
async fn connect_with_mss(addr: SocketAddr, mss: u32) -> tokio::net::TcpStream {
    use std::os::fd::AsRawFd;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    // SAFETY: setsockopt with a valid fd and a u32 of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_MAXSEG {mss}: {}",
        std::io::Error::last_os_error()
    );
    socket.connect(addr).await.unwrap()
}

/// Hellos that span segments, from 88-byte segments up to 1460, with the
/// post-quantum key share (1,216 bytes) and ALPN lists that bring the
/// hello to about 4 KB: each is gathered and parsed, none is plaintext,
/// and the wire agrees with the relay on version, suite and group.
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_hellos_are_gathered_at_any_segment_size() {
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let pin_dir = unique_pin_dir("split");
    let config = pki.dir().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.pin_dir = \"{pin_dir}\"\n\n[[listeners]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\nupstream = \"plain\"\ntls.mode = \"implicit\"\n\n[[upstreams]]\nname = \"plain\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let relay = start_relay(&config, &pki.dir().join("state"));
    let alpn = |bytes: usize| -> Vec<Vec<u8>> {
        (0..bytes / 32)
            .map(|i| format!("protocol-{i:04}-padding-for-size").into_bytes())
            .collect()
    };
    let mut sessions = 0;
    for mss in [88, 200, 536, 1460] {
        for alpn_bytes in [0, 2600] {
            let tcp = connect_with_mss(relay.listeners["tls"], mss).await;
            let connector =
                tokio_rustls::TlsConnector::from(post_quantum_client_config(alpn(alpn_bytes)));
            let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
            let mut tls = tokio::time::timeout(patience(), connector.connect(name, tcp))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("mss {mss}, alpn {alpn_bytes}: {e}"));
            let group = tls
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name());
            assert_eq!(
                group,
                Some(rustls::NamedGroup::X25519MLKEM768),
                "the relay takes the hybrid"
            );
            let msg = b"through a hello in pieces";
            assert_eq!(exchange(&mut tls, msg).await.unwrap(), msg);
            sessions += 1;
        }
    }
    for _ in 0..sessions {
        let report = relay
            .reports
            .recv_timeout(patience())
            .expect("a report per session");
        assert!(report.contains("\"group\":\"X25519MLKEM768\""), "{report}");
    }
    let (stats, code) = stats(&pin_dir);
    assert_eq!(code, Some(0), "no disagreement:\n{stats:#}");
    assert_eq!(stats["negotiated"]["tls1_3"], sessions, "{stats:#}");
    assert_eq!(
        stats["negotiated"]["plaintext"], sessions,
        "only the plain upstream legs: {stats:#}"
    );
    assert_eq!(stats["parser"]["unparsed"], 0, "{stats:#}");
    assert!(
        stats["parser"]["reassembled"].as_u64().unwrap() >= 4,
        "the small segments made hellos span segments: {stats:#}"
    );
    let client_legs: Vec<&serde_json::Value> = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["relay"]["leg"] == "client")
        .collect();
    assert_eq!(client_legs.len(), sessions as usize, "{stats:#}");
    for c in client_legs {
        assert_eq!(c["wire"]["negotiated_version"], "TLSv1.3", "{c:#}");
        assert_eq!(c["wire"]["plaintext"], false, "{c:#}");
        assert_eq!(c["wire"]["key_exchange"], "X25519MLKEM768", "{c:#}");
        assert_eq!(c["relay"]["key_exchange"], "X25519MLKEM768", "{c:#}");
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// The relay's own metrics scrapes are no sessions, and two relays on one
/// host each count only their own: each lives in its own cgroup, which it
/// removes when it stops.
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_relays_sessions_are_counted() {
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let mut relays = Vec::new();
    for name in ["one", "two"] {
        let pin_dir = unique_pin_dir(name);
        let config = pki.dir().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "ebpf.pin_dir = \"{pin_dir}\"\n[metrics]\naddress = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"plain\"\naddress = \"127.0.0.1:0\"\nupstream = \"plain\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"plain\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
            ),
        )
        .unwrap();
        let out = Command::new(relay_binary())
            .args(["run", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(pki.dir().join(format!("state-{name}")))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        relays.push((pin_dir, out));
    }
    let mut banners = Vec::new();
    let mut addresses = Vec::new();
    for (_, child) in relays.iter_mut() {
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut listener, mut metrics, mut cgroup) = (None, None, None);
        let mut banner = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            banner += &line;
            banner.push('\n');
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("listener plain listening on ") {
                listener = Some(rest.parse::<SocketAddr>().unwrap());
            }
            if let Some(rest) = t.strip_prefix("metrics on http://") {
                metrics = Some(
                    rest.trim_end_matches("/metrics")
                        .parse::<SocketAddr>()
                        .unwrap(),
                );
            }
            if let Some(rest) = t.strip_prefix("eBPF wire counters on the sockets of cgroup ") {
                cgroup = Some(rest.split(", maps pinned").next().unwrap().to_string());
            }
            if t.starts_with("state directory") {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        addresses.push((listener.unwrap(), metrics.unwrap()));
        banners.push((
            cgroup.unwrap_or_else(|| panic!("no cgroup in\n{banner}")),
            child.id(),
        ));
    }
    for (cgroup, pid) in &banners {
        assert!(
            cgroup.ends_with(&format!("/tlsrelay-{pid}")),
            "an instance cgroup: {cgroup}"
        );
        assert!(Path::new(cgroup).is_dir());
    }
    assert_ne!(banners[0].0, banners[1].0);
    // One session through relay one, two through relay two; relay one's
    // metrics scraped twice.
    let msg = b"whose session is this";
    for (i, (listener, _)) in addresses.iter().enumerate() {
        for _ in 0..=i {
            let mut s = tokio::net::TcpStream::connect(listener).await.unwrap();
            assert_eq!(exchange(&mut s, msg).await.unwrap(), msg);
        }
    }
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addresses[0].1)
            .await
            .unwrap();
        let reply = exchange(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&reply).contains("tlsrelay_sessions_total"));
    }
    for (i, (pin_dir, _)) in relays.iter().enumerate() {
        let legs = 2 * (i as u64 + 1); // client and upstream per session
        let (stats, code) = settled_stats(pin_dir, |s| {
            s["connections"].as_array().map(Vec::len) == Some(legs as usize)
                && s["unaccounted"] == 0
        })
        .await;
        assert_eq!(code, Some(0), "{stats:#}");
        assert_eq!(
            stats["negotiated"]["plaintext"], legs,
            "relay {i}: {stats:#}"
        );
        assert_eq!(
            stats["connections"].as_array().unwrap().len() as u64,
            legs,
            "{stats:#}"
        );
        assert_eq!(
            stats["unaccounted"], 0,
            "every socket has a relay view: {stats:#}"
        );
    }
    // SIGTERM: each relay leaves and removes its cgroup.
    for ((pin_dir, child), (cgroup, pid)) in relays.iter_mut().zip(&banners) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(*pid as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}");
        assert!(!Path::new(cgroup).exists(), "{cgroup} removed at exit");
        let _ = std::fs::remove_dir_all(pin_dir);
    }
}

/// TLS carried through a listener and an upstream that are both plaintext
/// by configuration is what the relay cannot see and the wire can: both
/// sockets disagree, `stats` says so (exit 3), and the metric counts the
/// same two sockets as the session ends, without a scrape walking the map.
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_the_relay_cannot_see_is_counted_as_disagreement() {
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let leaf = pki.leaf("hidden", &["hidden.test"]);
    let hidden = tls_echo(ServerOptions {
        leaf: &leaf,
        versions: Versions::Tls13Only,
        client_ca: None,
    })
    .await;
    let pin_dir = unique_pin_dir("blind");
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = pki.dir().join("blind.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.pin_dir = \"{pin_dir}\"\n[metrics]\naddress = \"{metrics}\"\n\n[[listeners]]\nname = \"blind\"\naddress = \"127.0.0.1:0\"\nupstream = \"hidden\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"hidden\"\naddress = \"{hidden}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let relay = start_relay(&config, &pki.dir().join("state"));
    let scrape = || async {
        let mut s = tokio::net::TcpStream::connect(&metrics).await.unwrap();
        let reply = exchange(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&reply).to_string()
    };
    assert!(
        scrape()
            .await
            .contains("\ntlsrelay_wire_disagreements_total 0\n"),
        "none before any session"
    );
    let msg = b"end to end, past a blind relay";
    let mut s = tls_connect(relay.listeners["blind"], "hidden.test", &Default::default())
        .await
        .unwrap();
    assert_eq!(exchange(&mut s, msg).await.unwrap(), msg);
    // The JSON report is written after the session's views were recorded.
    let report = relay.reports.recv_timeout(patience()).expect("a report");
    assert_eq!(extract(&report, "inbound"), "plaintext", "{report}");
    let text = scrape().await;
    assert!(
        text.contains("\ntlsrelay_wire_disagreements_total 2\n"),
        "{text}"
    );
    let (stats, code) = stats(&pin_dir);
    assert_eq!(code, Some(3), "{stats:#}");
    let disagreeing: Vec<_> = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["disagreements"].as_array().is_some_and(|d| !d.is_empty()))
        .collect();
    assert_eq!(disagreeing.len(), 2, "{stats:#}");
    for c in disagreeing {
        assert!(
            c["disagreements"][0]
                .as_str()
                .is_some_and(|d| d.starts_with("version: wire TLSv1.3, relay plaintext")),
            "{c:#}"
        );
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// SMTP: the client leg of a sender that ignores STARTTLS is a downgrade
/// on the wire (stripped) and in the relay's view alike; every next-hop
/// socket has a relay view that agrees with the wire.
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_legs_agree_with_the_wire() {
    use tlsrelay_tests::smtp_client::RawSmtp;
    use tlsrelay_tests::smtp_sink::{smtp_sink, SinkOptions};
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let sink_leaf = pki.leaf("sink", &["mx.partner.test"]);
    let sink = smtp_sink(SinkOptions {
        tls: Some(server_config(&ServerOptions {
            leaf: &sink_leaf,
            versions: Versions::Both,
            client_ca: None,
        })),
        chunking: true,
        refuse_marker: "nobody",
        requiretls: false,
    })
    .await;
    let pin_dir = unique_pin_dir("smtp");
    let config = pki.dir().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.pin_dir = \"{pin_dir}\"\naccepted_domains = [\"partner.test\"]\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\ntls.mode = \"opportunistic\"\n\n[[outbound_connectors]]\nname = \"partner\"\nrecipient_domains = [\"partner.test\"]\nnext_hops = [\"{}\"]\ntls.policy = \"required\"\ntls.verify = \"encryption-only\"\n",
            sink.addr
        ),
    )
    .unwrap();
    let relay = start_relay(&config, &pki.dir().join("state"));
    let mut c = RawSmtp::connect(relay.listeners["mx"]).await;
    assert!(c.cmd("EHLO client.test").await.contains("STARTTLS"));
    assert!(c.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@partner.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c
        .cmd("Subject: s\r\n\r\nbody\r\n.")
        .await
        .starts_with("250"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let report = relay.reports.recv_timeout(patience()).expect("a report");
    let report: serde_json::Value = serde_json::from_str(&report).expect("stdout is JSON only");
    assert_eq!(
        report["downgrades"][0]["reason"], "client did not use STARTTLS",
        "{report}"
    );
    assert_eq!(sink.received.lock().unwrap().len(), 1);
    let (stats, code) = settled_stats(&pin_dir, |s| {
        s["unaccounted"] == 0 && s["downgrades"]["stripped"] == 1
    })
    .await;
    assert_eq!(code, Some(0), "no disagreement:\n{stats:#}");
    assert_eq!(stats["downgrades"]["stripped"], 1, "{stats:#}");
    assert_eq!(stats["unaccounted"], 0, "{stats:#}");
    let conns = stats["connections"].as_array().unwrap();
    let leg = |name: &str| {
        conns
            .iter()
            .find(|c| c["relay"]["leg"] == name)
            .unwrap_or_else(|| panic!("no {name} leg with a relay view: {stats:#}"))
    };
    let client = leg("client");
    assert_eq!(client["relay"]["downgraded"], true, "{client:#}");
    assert_eq!(client["wire"]["plaintext_mail"], true, "{client:#}");
    let next_hop = leg("upstream");
    assert_eq!(
        next_hop["relay"]["negotiated_version"], "TLSv1.3",
        "{next_hop:#}"
    );
    assert_eq!(
        next_hop["wire"]["negotiated_version"], "TLSv1.3",
        "{next_hop:#}"
    );
    assert_eq!(next_hop["wire"]["plaintext"], false, "{next_hop:#}");
    drop(relay);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// Delivery by MX under DANE: a host whose TLSA record matches and one
/// whose record matches nothing (the relay refuses it after the
/// handshake); the wire and the relay agree on every socket.
#[cfg_attr(
    any(missing_dns_tools, missing_ebpf),
    ignore = "needs nsd and ldnsutils and root and the eBPF toolchain"
)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_delivery_under_dane_agrees_with_the_wire() {
    use tlsrelay_tests::dns::{have_dns_tools, tlsa_data, SignedDns, Zones};
    use tlsrelay_tests::smtp_client::RawSmtp;
    use tlsrelay_tests::smtp_sink::{smtp_sink_at, SinkOptions};
    if !ebpf_here() || !have_dns_tools() {
        return;
    }
    let pki = Pki::new();
    let leaf = pki.leaf("mx", &["mx.example"]);
    let port = tlsrelay_tests::free_port();
    let dns = SignedDns::start(&Zones {
        signed: &format!(
            "good IN MX 10 mx.good.test.\nmx.good IN A 127.4.0.2\n_{port}._tcp.mx.good IN TLSA 3 1 1 {}\n\
             bad IN MX 10 mx.bad.test.\nmx.bad IN A 127.4.0.3\n_{port}._tcp.mx.bad IN TLSA 3 1 1 {}\n",
            tlsa_data(&leaf, 1, 1),
            "cd".repeat(32)
        ),
        unsigned: &[],
        tamper: &[],
    });
    let mut sinks = Vec::new();
    for ip in ["127.4.0.2", "127.4.0.3"] {
        let opts = SinkOptions {
            tls: Some(server_config(&ServerOptions {
                leaf: &leaf,
                versions: Versions::Both,
                client_ca: None,
            })),
            chunking: true,
            refuse_marker: "nobody",
            requiretls: false,
        };
        sinks.push(smtp_sink_at(format!("{ip}:{port}").parse().unwrap(), opts).await);
    }
    let pin_dir = unique_pin_dir("mx");
    let config = pki.dir().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.pin_dir = \"{pin_dir}\"\n[dns]\nnameservers = [\"{}\"]\ntrust_anchors = {:?}\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"relay.test\"\ntls.mode = \"off\"\n\n[[inbound_connectors]]\nname = \"apps\"\nclient_addresses = [\"127.0.0.1/32\"]\nallow_relay = true\n\n[[outbound_connectors]]\nname = \"internet\"\nrecipient_domains = [\"*\"]\nnext_hops = [\"mx:{port}\"]\nallow_private_mx = [\"127.0.0.0/8\"]\n",
            dns.addr,
            dns.anchors.display().to_string()
        ),
    )
    .unwrap();
    let relay = start_relay(&config, &pki.dir().join("state"));
    for (to, want) in [("x@good.test", "250"), ("y@bad.test", "451 4.7.5")] {
        let mut c = RawSmtp::connect(relay.listeners["mx"]).await;
        c.cmd("EHLO app.test").await;
        assert!(c.cmd("MAIL FROM:<a@app.test>").await.starts_with("250"));
        let reply = c.cmd(&format!("RCPT TO:<{to}>")).await;
        assert!(reply.starts_with(want), "{to}: {reply}");
        if want == "250" {
            assert!(c.cmd("DATA").await.starts_with("354"));
            assert!(c
                .cmd("Subject: s\r\n\r\nbody\r\n.")
                .await
                .starts_with("250"));
        }
        c.cmd("QUIT").await;
        let report = relay.reports.recv_timeout(patience()).expect("a report");
        let report: serde_json::Value = serde_json::from_str(&report).unwrap();
        assert_eq!(
            report["policy_sessions"][0]["policy_type"], "tlsa",
            "{report}"
        );
    }
    assert_eq!(sinks[0].received.lock().unwrap().len(), 1);
    assert_eq!(sinks[1].received.lock().unwrap().len(), 0);
    let (stats, code) = settled_stats(&pin_dir, |s| {
        s["unaccounted"] == 0
            && s["connections"]
                .as_array()
                .is_some_and(|c| c.iter().filter(|c| c["relay"]["leg"] == "upstream").count() == 2)
    })
    .await;
    assert_eq!(code, Some(0), "no disagreement:\n{stats:#}");
    assert_eq!(stats["unaccounted"], 0, "{stats:#}");
    let upstreams: Vec<&serde_json::Value> = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["relay"]["leg"] == "upstream")
        .collect();
    assert_eq!(upstreams.len(), 2, "{stats:#}");
    for leg in upstreams {
        assert_eq!(leg["wire"]["negotiated_version"], "TLSv1.3", "{leg:#}");
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// TLS passed through untouched: the relay read the hellos and nothing
/// more, and its view of both sockets (the ServerHello's version, cipher
/// and key exchange) agrees with what the program saw on the wire.
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_sessions_agree_with_the_wire() {
    if !ebpf_here() {
        return;
    }
    let pki = Pki::new();
    let backend = pki.leaf("backend", &["pass.example.test"]);
    let server = tls_echo(ServerOptions {
        leaf: &backend,
        versions: Versions::Both,
        client_ca: None,
    })
    .await;
    let pin_dir = unique_pin_dir("passthrough");
    let config = pki.dir().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.pin_dir = \"{pin_dir}\"\n\n[[listeners]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\ntls.mode = \"implicit\"\n\n[[listeners.routes]]\nsni = [\"pass.example.test\"]\nupstream = \"backend\"\npassthrough = true\n\n[[upstreams]]\nname = \"backend\"\naddress = \"{server}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let relay = start_relay(&config, &pki.dir().join("state"));
    let opts = ClientOptions {
        trust: Some(&pki),
        ..ClientOptions::default()
    };
    let mut tls = tls_connect(relay.listeners["edge"], "pass.example.test", &opts)
        .await
        .unwrap();
    assert_eq!(exchange(&mut tls, b"through").await.unwrap(), b"through");
    let report = relay.reports.recv_timeout(patience()).expect("a report");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["passthrough"]["version"], "TLSv1.3", "{report}");
    let (stats, code) = settled_stats(&pin_dir, |s| {
        s["unaccounted"] == 0 && s["connections"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    assert_eq!(code, Some(0), "no disagreement:\n{stats:#}");
    for conn in stats["connections"].as_array().unwrap() {
        assert_eq!(conn["relay"]["passthrough"], true, "{conn:#}");
        assert_eq!(conn["relay"]["negotiated_version"], "TLSv1.3", "{conn:#}");
        assert_eq!(conn["wire"]["negotiated_version"], "TLSv1.3", "{conn:#}");
        assert_eq!(
            conn["relay"]["key_exchange"], conn["wire"]["key_exchange"],
            "{conn:#}"
        );
    }
    drop(relay);
    let _ = std::fs::remove_dir_all(&pin_dir);
}
