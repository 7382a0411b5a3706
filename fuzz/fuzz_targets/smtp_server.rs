//! Arbitrary bytes from a client, split arbitrarily, into the server-side
//! state machine, with next-hop replies chosen by the input too: it must
//! never panic and never emit a reply that is not three digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay::smtp::codec::Reply;
use tlsrelay::smtp::server::{Event, Server, ServerSettings, StartTls};

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
    });
    for (i, chunk) in rest.chunks(7 + (mode as usize % 50)).enumerate() {
        server.feed(chunk);
        while let Some(event) = server.poll() {
            match event {
                Event::Reply(r) => assert!((200..600).contains(&r.code)),
                Event::Mail { .. } | Event::Rcpt { .. } | Event::ChunkEnd { .. } | Event::EndOfData => {
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
