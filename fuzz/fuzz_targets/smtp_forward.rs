//! The relaying machine between a client and next hops, everything chosen
//! by the input: the client's bytes and their split, whether a next hop
//! opens and with CHUNKING, and each reply it gives (or a failure). It must
//! never panic, never talk to a next hop that is not open, answer every
//! client command that awaits a reply exactly once, and never tell the
//! client a message was accepted (2xx at end of data) unless the next hop
//! said 2xx to it.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::report::LegSecurity;
use tlsrelay_core::smtp::admission::{Admission, Client};
use tlsrelay_core::smtp::codec::{Capabilities, Reply, ReplyParser};
use tlsrelay_core::smtp::forward::{Action, ConnectorRoute, Forwarder, OpenedHop, Routing, Stamp};
use tlsrelay_core::smtp::next_hop::Wait;
use tlsrelay_core::smtp::server::{Event, Server, ServerSettings, StartTls};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    // Client bytes up to the first 0xff; next-hop behaviour after it.
    let cut = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
    let (client, mut hop) = (&rest[..cut], rest.get(cut + 1..).unwrap_or(&[]));
    let routing = Arc::new(Routing {
        admission: Arc::new(Admission {
            accepted_domains: vec!["a.test".parse().unwrap(), ".b.test".parse().unwrap()],
            connectors: Vec::new(),
        }),
        routes: vec![
            (vec!["a.test".parse().unwrap()], 0),
            (vec!["*".parse().unwrap()], 1),
        ],
        connectors: vec![ConnectorRoute::fixed("zero"), ConnectorRoute::fixed("one")],
    });
    let mut server = Server::new(ServerSettings {
        hostname: "fuzz.test".into(),
        starttls: StartTls::Offered,
        max_message_size: 10_000,
        max_hops: 5,
        command_timeout: std::time::Duration::from_secs(300),
    });
    let mut forwarder = Forwarder::new(
        routing,
        Client::new(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Stamp {
            by: "fuzz.test".into(),
            session: 1,
        },
    );
    let mut open = false;
    // The kind of the last wait and whether the next hop's answer was 2xx.
    let mut last_wait = None;
    let mut hop_accepted = false;
    for chunk in client.chunks(1 + split as usize % 64) {
        server.feed(chunk);
        while let Some(event) = server.poll() {
            let end_of_message = matches!(event, Event::EndOfData | Event::ChunkEnd { last: true });
            match event {
                Event::Reply(r) => {
                    assert!((200..600).contains(&r.code));
                    one_line_per_line(&r);
                }
                Event::StartTls => {
                    server.tls_established();
                    forwarder.tls_started();
                }
                Event::Quit | Event::Close => forwarder.end(),
                event => forwarder.client_event(event, 1_796_617_861),
            }
            let mut responses = 0;
            while let Some(action) = forwarder.poll() {
                match action {
                    Action::Respond(reply) => {
                        responses += 1;
                        if end_of_message && reply.is_positive() {
                            assert!(
                                hop_accepted
                                    && matches!(last_wait, Some(Wait::DataEnd | Wait::DataBlock)),
                                "2xx at end of data the next hop did not give: {reply}"
                            );
                        }
                        server.respond(reply);
                    }
                    Action::Write(r) => one_line_per_line(&r),
                    Action::Open { .. } => {
                        let (byte, tail) = hop.split_first().unwrap_or((&0, &[]));
                        hop = tail;
                        if byte % 4 == 0 {
                            forwarder.hop_unavailable(Reply::new(451, "4.4.1 down"));
                        } else {
                            open = true;
                            let offered = [
                                "CHUNKING",
                                "REQUIRETLS",
                                "SMTPUTF8",
                                "SIZE",
                                "8BITMIME",
                                "PIPELINING",
                            ];
                            forwarder.hop_opened(OpenedHop {
                                name: "mx".into(),
                                security: LegSecurity::Plaintext,
                                offers: Capabilities {
                                    keywords: offered
                                        .iter()
                                        .enumerate()
                                        .filter(|(i, _)| byte & (2 << i) != 0)
                                        .map(|(_, k)| (k.to_string(), String::new()))
                                        .collect(),
                                },
                                reused: byte & 0x80 != 0,
                            });
                        }
                    }
                    Action::Send(_) => assert!(open, "sent to a next hop that is not open"),
                    Action::Await(wait) => {
                        assert!(open, "awaited a next hop that is not open");
                        last_wait = Some(wait);
                        hop_accepted = false;
                        match next_reply(&mut hop) {
                            Some(reply) => {
                                hop_accepted = reply.is_positive();
                                forwarder.hop_reply(reply)
                            }
                            None => forwarder.hop_failed("lost"),
                        }
                    }
                    Action::Close { .. } | Action::Release(_) => open = false,
                }
            }
            assert!(responses <= 1, "{responses} replies to one command");
        }
    }
});

/// A reply from the input: a code byte and a text up to the next newline;
/// none when the input is used up or the byte says the connection broke.
fn next_reply(hop: &mut &[u8]) -> Option<Reply> {
    let (&code, tail) = hop.split_first()?;
    let end = tail.iter().position(|&b| b == b'\n').unwrap_or(tail.len());
    let text = format!(
        "{} {}\r\n",
        [250, 251, 354, 421, 451, 452, 550, 554][code as usize % 8],
        String::from_utf8_lossy(&tail[..end]).replace('\r', "")
    );
    *hop = tail.get(end + 1..).unwrap_or(&[]);
    if code >= 0xf0 {
        return None;
    }
    let mut parser = ReplyParser::default();
    parser.feed(text.as_bytes());
    parser.next_reply().ok().flatten()
}

/// What the client is sent: CR and LF only as line ends, however the next
/// hop's replies looked.
fn one_line_per_line(reply: &Reply) {
    let bytes = reply.to_bytes();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "{line:?}");
        assert!(!line[..line.len() - 2]
            .iter()
            .any(|&b| b == b'\r' || b == b'\n'));
    }
}
