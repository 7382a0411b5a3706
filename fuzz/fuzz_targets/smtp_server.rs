//! Arbitrary bytes from a client, split arbitrarily, into the server-side
//! state machine, with next-hop replies chosen by the input too: it must
//! never panic, never emit a reply that is not three digits, never pass
//! on a bare CR or LF in a message body (SMTP smuggling), and never pass on
//! more of one message than the size limit, whatever SIZE said.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::smtp::codec::Reply;
use tlsrelay_core::smtp::server::{Event, Server, ServerSettings, StartTls};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let starttls = match mode % 3 {
        0 => StartTls::Offered,
        1 => StartTls::Required,
        _ => StartTls::Unavailable,
    };
    let mut server = Server::new(ServerSettings {
        hostname: "fuzz.test".into(),
        starttls,
        max_message_size: 10_000,
        max_hops: 5,
        command_timeout: std::time::Duration::from_secs(300),
    });
    // The body bytes passed on in the transaction under way.
    let mut body: Vec<u8> = Vec::new();
    for (i, chunk) in rest.chunks(7 + (mode as usize % 50)).enumerate() {
        server.feed(chunk);
        while let Some(event) = server.poll() {
            match &event {
                Event::Body(b) => {
                    body.extend_from_slice(b);
                    assert!(no_bare_line_end(&body), "{body:?}");
                    assert!(body.len() <= 10_000, "{} bytes of one message", body.len());
                }
                Event::EndOfData
                | Event::AbortData(_)
                | Event::Mail { .. }
                | Event::Rset
                | Event::ChunkEnd { last: true } => body.clear(),
                _ => {}
            }
            match event {
                Event::Reply(r) => assert!((200..600).contains(&r.code)),
                Event::Mail { .. }
                | Event::Rcpt { .. }
                | Event::ChunkEnd { .. }
                | Event::EndOfData => {
                    let code = [250, 451, 550][i % 3];
                    server.respond(Reply::new(code, "x"));
                }
                Event::Data => server.respond(Reply::new([354, 451][i % 2], "x")),
                Event::StartTls => server.tls_established(),
                _ => {}
            }
        }
    }
});

/// Every LF follows a CR, and every CR with a byte after it is followed by
/// LF (a CR last may still get its LF).
fn no_bare_line_end(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        b'\r' => bytes.get(i + 1).is_none_or(|&n| n == b'\n'),
        _ => true,
    })
}
