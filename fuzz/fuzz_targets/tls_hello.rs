//! A client's first bytes, split as they arrive, into the hello reader a
//! router uses: it must never panic, never ask for more than a record's
//! worth at a time (so a driver never reads past the hello), and a hello
//! it accepts must be made only of the bytes it was fed. The server hello
//! parser gets arbitrary records too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::tls_hello::{parse_server_hello, HelloReader, Progress};

fuzz_target!(|data: &[u8]| {
    let Some((&split, wire)) = data.split_first() else {
        return;
    };
    let _ = parse_server_hello(wire);
    let mut reader = HelloReader::new();
    let mut at = 0;
    loop {
        match reader.progress() {
            Ok(Progress::Need(n)) => {
                assert!(n > 0 && n <= 16384 + 5, "asked for {n}");
                let n = n.min(1 + split as usize).min(wire.len() - at);
                if n == 0 {
                    return;
                }
                reader.feed(&wire[at..at + n]);
                at += n;
            }
            Ok(Progress::Done(info)) => {
                assert_eq!(reader.raw(), &wire[..at]);
                if let Some(name) = info.server_name {
                    assert!(name.bytes().all(|b| b.is_ascii_graphic()));
                }
                return;
            }
            Err(_) => return,
        }
    }
});
