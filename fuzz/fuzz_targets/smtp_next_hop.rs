//! The next hop's opening dialogue (greeting, EHLO or HELO, STARTTLS, EHLO
//! again over TLS) fed arbitrary replies in arbitrary splits. It must never
//! panic, never go on in plaintext when TLS is wanted, issue STARTTLS only
//! when wanted and offered (once), and send only whole single lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::smtp::next_hop::{HopOpening, Opening, OpeningFailure};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let want_tls = flags & 1 == 1;
    let mut input = rest.chunks(1 + (flags >> 1) as usize % 32);
    let mut opening = HopOpening::new("mx.fuzz.test:25", "relay.fuzz.test", want_tls);
    let mut tls = false;
    for _ in 0..100_000 {
        match opening.poll() {
            Opening::Send(bytes) => {
                assert!(bytes.ends_with(b"\r\n"));
                let line = &bytes[..bytes.len() - 2];
                assert!(!line.iter().any(|&b| b == b'\r' || b == b'\n'));
            }
            Opening::Read(_) => match input.next() {
                Some(chunk) => opening.feed(chunk),
                None => {
                    let _ = opening.io_failed("closed the connection");
                    return;
                }
            },
            Opening::StartTls => {
                assert!(want_tls && !tls, "STARTTLS only when wanted, and once");
                assert!(opening.capabilities().has("STARTTLS"));
                tls = true;
                opening.tls_established();
            }
            Opening::Ready => {
                assert!(!want_tls || tls, "on in plaintext though TLS was wanted");
                return;
            }
            Opening::Failed(OpeningFailure::Tls {
                handshake_begun, ..
            }) => {
                assert!(want_tls);
                assert!(!handshake_begun || tls);
                return;
            }
            Opening::Failed(OpeningFailure::Unavailable(_)) => return,
        }
    }
    panic!("the opening did not settle");
});
