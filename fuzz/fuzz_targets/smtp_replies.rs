//! Arbitrary bytes from a next hop into the reply parser and command
//! parser: errors are fine, panics are not; a parsed reply reformats to
//! bytes that parse back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::smtp::codec::{parse_command, ReplyParser};

fuzz_target!(|data: &[u8]| {
    let _ = parse_command(data);
    let mut parser = ReplyParser::default();
    parser.feed(data);
    while let Ok(Some(reply)) = parser.next_reply() {
        let mut again = ReplyParser::default();
        again.feed(&reply.to_bytes());
        if reply.lines.iter().all(|l| !l.contains('\r') && !l.contains('\n')) {
            assert_eq!(again.next_reply().ok().flatten(), Some(reply));
        }
    }
});
