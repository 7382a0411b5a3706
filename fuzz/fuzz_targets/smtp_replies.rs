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
        // Control characters go out as spaces (a relayed reply must not
        // carry a bare CR or LF to the sender); other text round-trips.
        let bytes = reply.to_bytes();
        let lines = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty());
        assert!(lines.clone().all(|l| l.ends_with(b"\r")));
        assert!(lines.clone().all(|l| !l[..l.len() - 1].contains(&b'\r')));
        assert_eq!(lines.count(), reply.lines.len().max(1));
        if reply.lines.iter().all(|l| !l.chars().any(char::is_control)) {
            assert_eq!(again.next_reply().ok().flatten(), Some(reply));
        }
    }
});
