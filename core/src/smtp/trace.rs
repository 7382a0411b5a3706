//! Trace headers (RFC 5321 4.4): the `Received:` line the relay puts on
//! every message it passes on, and the count of those already there, by
//! which a mail loop is stopped (Postfix's `hopcount_limit`).

use std::net::IpAddr;

/// Received lines a message may carry before it is refused as looping.
pub const DEFAULT_MAX_HOPS: u32 = 50;

/// Counts the `Received:` header fields of a message as its bytes pass,
/// split however they are; stops looking at the end of the header section
/// (the first empty line).
#[derive(Clone, Debug)]
pub struct HopCounter {
    in_headers: bool,
    /// The first bytes of the line under way (enough for "Received:").
    start: [u8; 9],
    start_len: usize,
    /// The line under way started with a CR (an empty line if LF follows).
    line_len: usize,
    received: u32,
}

impl Default for HopCounter {
    fn default() -> Self {
        HopCounter {
            in_headers: true,
            start: [0; 9],
            start_len: 0,
            line_len: 0,
            received: 0,
        }
    }
}

impl HopCounter {
    /// Received fields seen so far.
    pub fn received(&self) -> u32 {
        self.received
    }

    /// The next bytes of the message.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if !self.in_headers {
                return;
            }
            if b == b'\n' {
                // "\r\n" alone, or "\n" alone: the header section is over.
                let empty = self.line_len == 0 || (self.line_len == 1 && self.start[0] == b'\r');
                if empty {
                    self.in_headers = false;
                }
                self.line_len = 0;
                self.start_len = 0;
                continue;
            }
            if self.start_len < self.start.len() {
                self.start[self.start_len] = b;
                self.start_len += 1;
                if self.start_len == self.start.len()
                    && self.start.eq_ignore_ascii_case(b"received:")
                {
                    self.received += 1;
                }
            }
            self.line_len += 1;
        }
    }
}

/// What the relay knows of a message's arrival, for its Received line.
#[derive(Clone, Debug)]
pub struct Arrival<'a> {
    /// The client's HELO/EHLO name.
    pub helo: Option<&'a str>,
    pub client: IpAddr,
    /// `TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519`
    /// when the client's leg is TLS.
    pub tls: Option<&'a str>,
    /// EHLO (ESMTP) rather than HELO.
    pub esmtp: bool,
    /// The relay's own name.
    pub by: &'a str,
    /// The session, as the relay's log and reports number it.
    pub id: u64,
    /// The one recipient, when there is only one (as Postfix writes it).
    pub recipient: Option<&'a str>,
    /// Unix seconds.
    pub at: i64,
}

impl Arrival<'_> {
    /// The `Received:` header field, folded, CRLF-terminated:
    ///
    /// ```text
    /// Received: from client.example ([192.0.2.1])
    ///     (using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519)
    ///     by mx.example.org (tlsrelay) with ESMTPS id 4
    ///     for <bob@example.org>; Mon, 07 Dec 2026 04:31:01 +0000
    /// ```
    pub fn received(&self) -> Vec<u8> {
        let helo = self.helo.map(printable).unwrap_or_else(|| "unknown".into());
        let ip = match self.client {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => format!("IPv6:{v6}"),
            },
        };
        let protocol = match (self.esmtp, self.tls.is_some()) {
            (false, false) => "SMTP",
            (false, true) => "SMTPS",
            (true, false) => "ESMTP",
            (true, true) => "ESMTPS",
        };
        let mut out = format!("Received: from {helo} ([{ip}])\r\n");
        if let Some(tls) = self.tls {
            out += &format!("\t(using {})\r\n", printable(tls));
        }
        out += &format!(
            "\tby {} (tlsrelay) with {protocol} id {}",
            printable(self.by),
            self.id
        );
        if let Some(rcpt) = self.recipient {
            out += &format!("\r\n\tfor <{}>", printable(rcpt));
        }
        out += &format!("; {}\r\n", crate::tlsrpt::rfc5322_date(self.at));
        out.into_bytes()
    }
}

/// Client-supplied text made safe inside a header: printable ASCII only,
/// no comment delimiters, at most 255 characters.
fn printable(text: &str) -> String {
    text.chars()
        .take(255)
        .map(|c| match c {
            '(' | ')' | '\\' | ';' => '?',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(message: &[u8], split: usize) -> u32 {
        let mut c = HopCounter::default();
        for piece in message.chunks(split.max(1)) {
            c.feed(piece);
        }
        c.received()
    }

    #[test]
    fn received_fields_in_the_header_section_are_counted_however_split() {
        let message = b"Received: from a\r\n\tby b; date\r\nRECEIVED:from c\r\nX-Received: no\r\nSubject: Received: no\r\n\r\nReceived: in the body, not counted\r\n";
        for split in [1, 2, 3, 7, 9, 10, 64, message.len()] {
            assert_eq!(count(message, split), 2, "split {split}");
        }
        // A message with no header section.
        assert_eq!(count(b"\r\nReceived: x\r\n", 1), 0);
        // Bare LF line ends too.
        assert_eq!(count(b"Received: a\nReceived: b\n\nReceived: c\n", 1), 2);
    }

    #[test]
    fn the_received_line_is_one_folded_field_with_the_tls_used() {
        let arrival = Arrival {
            helo: Some("client.example"),
            client: "192.0.2.1".parse().unwrap(),
            tls: Some("TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519"),
            esmtp: true,
            by: "mx.example.org",
            id: 4,
            recipient: Some("bob@example.org"),
            at: 1_796_617_861,
        };
        let text = String::from_utf8(arrival.received()).unwrap();
        assert_eq!(
            text,
            "Received: from client.example ([192.0.2.1])\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384 key-exchange X25519)\r\n\tby mx.example.org (tlsrelay) with ESMTPS id 4\r\n\tfor <bob@example.org>; Mon, 07 Dec 2026 04:31:01 +0000\r\n"
        );
        assert_eq!(count(text.as_bytes(), 1), 1, "it counts as one hop");
        // A hostile HELO cannot end the comment or the field.
        let hostile = Arrival {
            helo: Some("x) by evil (y;\u{7f}"),
            client: "2001:db8::1".parse().unwrap(),
            tls: None,
            esmtp: false,
            recipient: None,
            ..arrival
        };
        let text = String::from_utf8(hostile.received()).unwrap();
        assert!(
            text.starts_with("Received: from x? by evil ?y?? ([IPv6:2001:db8::1])\r\n\tby mx.example.org (tlsrelay) with SMTP id 4; "),
            "{text}"
        );
        assert_eq!(text.matches("\r\n").count(), 2);
    }
}
