//! SMTP commands and replies as bytes (RFC 5321): parsing client command
//! lines, parsing (possibly multi-line) replies, formatting both. No I/O.

use std::fmt;

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets with CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with CRLF.
pub const MAX_TEXT_LINE: usize = 1000;
/// Replies: 512 per line; a generous cap on lines per reply.
pub const MAX_REPLY_LINES: usize = 100;

/// A client command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    /// Reverse path (without brackets; empty for the null sender) and
    /// the parameters as given.
    Mail {
        from: String,
        params: String,
    },
    Rcpt {
        to: String,
        params: String,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    StartTls,
    Vrfy,
    Help,
    /// A verb this relay does not implement (502).
    Unknown(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("line too long")]
    LineTooLong,
    #[error("syntax error in parameters: {0}")]
    Parameters(&'static str),
    #[error("not a command")]
    Empty,
}

/// Parses one command line (without CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, SyntaxError> {
    if line.len() + 2 > MAX_COMMAND_LINE {
        return Err(SyntaxError::LineTooLong);
    }
    // A bare CR or LF inside a line would split it in two at a next hop
    // that ends lines on either: commands smuggled past the relay's checks.
    if line.iter().any(|&b| b.is_ascii_control() && b != b'\t') {
        return Err(SyntaxError::Parameters(
            "control character (bare CR or LF?) in the line",
        ));
    }
    let text = std::str::from_utf8(line).map_err(|_| SyntaxError::Parameters("not UTF-8"))?;
    let text = text.trim_end();
    let (verb, rest) = match text.find(' ') {
        Some(i) => (&text[..i], text[i + 1..].trim_start()),
        None => (text, ""),
    };
    if verb.is_empty() {
        return Err(SyntaxError::Empty);
    }
    let upper = verb.to_ascii_uppercase();
    let no_args = |c: Command| {
        if rest.is_empty() {
            Ok(c)
        } else {
            Err(SyntaxError::Parameters("no parameters allowed"))
        }
    };
    match upper.as_str() {
        "HELO" | "EHLO" => {
            if rest.is_empty() || rest.contains(' ') {
                return Err(SyntaxError::Parameters(
                    "expected a domain or address literal",
                ));
            }
            Ok(if upper == "HELO" {
                Command::Helo(rest.to_string())
            } else {
                Command::Ehlo(rest.to_string())
            })
        }
        "MAIL" => {
            let (from, params) = path_argument(rest, "FROM:")?;
            Ok(Command::Mail { from, params })
        }
        "RCPT" => {
            let (to, params) = path_argument(rest, "TO:")?;
            if to.is_empty() {
                return Err(SyntaxError::Parameters("empty recipient"));
            }
            Ok(Command::Rcpt { to, params })
        }
        "DATA" => no_args(Command::Data),
        "BDAT" => {
            let mut words = rest.split_ascii_whitespace();
            let size = words
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(SyntaxError::Parameters("BDAT needs a chunk size"))?;
            let last = match words.next() {
                None => false,
                Some(w) if w.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Err(SyntaxError::Parameters("expected LAST")),
            };
            if words.next().is_some() {
                return Err(SyntaxError::Parameters("too many parameters"));
            }
            Ok(Command::Bdat { size, last })
        }
        "RSET" => no_args(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "VRFY" => Ok(Command::Vrfy),
        "HELP" => Ok(Command::Help),
        _ => Ok(Command::Unknown(upper)),
    }
}

/// `FROM:<path> params` / `TO:<path> params`. The path is read by RFC
/// 5321's grammar (4.1.2), not by searching for separators: an IPv6
/// address literal's colons and a quoted local part's `:` or `>` stay in
/// the address, and only a leading source route (`<@a,@b:user@c>`,
/// accepted and ignored, RFC 5321 C) is taken off.
fn path_argument(rest: &str, keyword: &str) -> Result<(String, String), SyntaxError> {
    let Some(head) = rest.get(..keyword.len()) else {
        return Err(SyntaxError::Parameters("missing FROM:/TO:"));
    };
    if !head.eq_ignore_ascii_case(keyword) {
        return Err(SyntaxError::Parameters("missing FROM:/TO:"));
    }
    let arg = rest[keyword.len()..].trim_start();
    let Some(inner) = arg.strip_prefix('<') else {
        return Err(SyntaxError::Parameters("path must be in angle brackets"));
    };
    let b = inner.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'@') {
        loop {
            if b.get(i) != Some(&b'@') {
                return Err(SyntaxError::Parameters("bad source route"));
            }
            i = skip_domain(b, i + 1).ok_or(SyntaxError::Parameters("bad source route"))?;
            match b.get(i) {
                Some(b',') => i += 1,
                Some(b':') => {
                    i += 1;
                    break;
                }
                _ => return Err(SyntaxError::Parameters("bad source route")),
            }
        }
    }
    let start = i;
    if b.get(i) == Some(&b'"') {
        i += 1;
        loop {
            match b.get(i) {
                Some(b'\\') if b.get(i + 1).is_some() => i += 2,
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(_) => i += 1,
                None => return Err(SyntaxError::Parameters("unterminated quoted local part")),
            }
        }
    } else {
        while let Some(&c) = b.get(i) {
            if c == b'@' || c == b'>' {
                break;
            }
            if c.is_ascii_whitespace() {
                return Err(SyntaxError::Parameters("whitespace in path"));
            }
            if b"()<[]:;\\,\"".contains(&c) {
                return Err(SyntaxError::Parameters(
                    "special character in local part (quote it)",
                ));
            }
            i += 1;
        }
    }
    if b.get(i) == Some(&b'@') {
        i = skip_domain(b, i + 1).ok_or(SyntaxError::Parameters("bad domain"))?;
    }
    match b.get(i) {
        Some(b'>') => Ok((
            inner[start..i].to_string(),
            inner[i + 1..].trim().to_string(),
        )),
        None => Err(SyntaxError::Parameters("unterminated path")),
        Some(c) if c.is_ascii_whitespace() => Err(SyntaxError::Parameters("whitespace in path")),
        Some(_) => Err(SyntaxError::Parameters("bad character in path")),
    }
}

/// Past a domain (a name, UTF-8 labels included, or an address literal
/// `[…]`) starting at `i`: where it ends, or `None` if there is none.
fn skip_domain(b: &[u8], i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'[') {
        let close = b[i..].iter().position(|&c| c == b']')?;
        let literal = &b[i + 1..i + close];
        if literal.is_empty()
            || literal
                .iter()
                .any(|c| c.is_ascii_whitespace() || b"[\\".contains(c))
        {
            return None;
        }
        return Some(i + close + 1);
    }
    let end = i + b[i..]
        .iter()
        .position(|&c| !(c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c >= 0x80))
        .unwrap_or(b.len() - i);
    (end > i).then_some(end)
}

/// The domain of a mailbox (`user@Domain.Example` -> `domain.example`).
pub fn domain_of(mailbox: &str) -> Option<String> {
    mailbox
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase())
        .filter(|d| !d.is_empty())
}

/// A reply: code, optional enhanced status, text lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            lines: vec![text.into()],
        }
    }

    pub fn multi(code: u16, lines: Vec<String>) -> Reply {
        Reply { code, lines }
    }

    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// The reply on the wire, CRLF-terminated lines. Control characters
    /// in the text go out as spaces: a next hop's reply is relayed to the
    /// sender, and a bare LF in it (the parser ends lines at CRLF only)
    /// would start a reply line of the next hop's choosing there.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let n = self.lines.len().max(1);
        for i in 0..n {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let text = self.lines.get(i).map_or("", String::as_str);
            out.extend_from_slice(format!("{:03}{sep}", self.code).as_bytes());
            for c in text.chars() {
                let c = if c.is_control() { ' ' } else { c };
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// The first line's text (for logs and reasons).
    pub fn text(&self) -> &str {
        self.lines.first().map_or("", String::as_str)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply line too long")]
    TooLong,
    #[error("reply has too many lines")]
    TooManyLines,
}

/// Assembles replies from bytes as they arrive.
#[derive(Default, Debug)]
pub struct ReplyParser {
    buf: Vec<u8>,
    lines: Vec<String>,
    code: Option<u16>,
}

impl ReplyParser {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a complete reply.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete reply, if the bytes hold one.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        loop {
            let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                if self.buf.len() > MAX_COMMAND_LINE {
                    return Err(ReplyError::TooLong);
                }
                return Ok(None);
            };
            let raw: Vec<u8> = self.buf.drain(..end + 2).take(end).collect();
            let malformed = || ReplyError::Malformed(String::from_utf8_lossy(&raw).into_owned());
            if raw.len() < 3 || !raw[..3].iter().all(u8::is_ascii_digit) {
                return Err(malformed());
            }
            let code = raw[..3]
                .iter()
                .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
            // RFC 5321 4.2: replies are 2yz to 5yz.
            if !(200..600).contains(&code) || self.code.is_some_and(|c| c != code) {
                return Err(malformed());
            }
            self.code = Some(code);
            // Slice bytes, not text: byte 4 may fall inside a character.
            let sep = raw.get(3).copied().unwrap_or(b' ');
            let text = String::from_utf8_lossy(raw.get(4..).unwrap_or_default());
            self.lines.push(text.to_string());
            if self.lines.len() > MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
            match sep {
                b'-' => continue,
                b' ' => {
                    self.code = None;
                    return Ok(Some(Reply {
                        code,
                        lines: std::mem::take(&mut self.lines),
                    }));
                }
                _ => return Err(malformed()),
            }
        }
    }
}

/// An EHLO reply's capabilities (keywords upper-cased, with parameters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub keywords: Vec<(String, String)>,
}

impl Capabilities {
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        Capabilities {
            keywords: reply
                .lines
                .iter()
                .skip(1)
                .map(|l| match l.split_once(' ') {
                    Some((k, v)) => (k.to_ascii_uppercase(), v.to_string()),
                    None => (l.to_ascii_uppercase(), String::new()),
                })
                .collect(),
        }
    }

    pub fn has(&self, keyword: &str) -> bool {
        self.keywords.iter().any(|(k, _)| k == keyword)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A next hop's reply with a bare LF inside a line: relayed, it must
    /// stay one reply line, not become two for the sender.
    #[test]
    fn a_relayed_reply_cannot_smuggle_a_line() {
        let mut parser = ReplyParser::default();
        parser.feed(b"550 5.1.1 no such user\n250 2.1.5 Ok\r\n");
        let reply = parser.next_reply().unwrap().unwrap();
        assert_eq!(reply.code, 550);
        assert_eq!(
            reply.to_bytes(),
            b"550 5.1.1 no such user 250 2.1.5 Ok\r\n".to_vec()
        );
        let multi = Reply::multi(250, vec!["a\rb".into(), "c\u{7f}d\te".into()]);
        assert_eq!(multi.to_bytes(), b"250-a b\r\n250 c d e\r\n".to_vec());
    }

    #[test]
    fn commands_parse_case_insensitively_with_paths_and_params() {
        assert_eq!(
            parse_command(b"mail from:<Alice@Example.org> SIZE=100 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: "Alice@Example.org".into(),
                params: "SIZE=100 BODY=8BITMIME".into()
            })
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<>"),
            Ok(Command::Mail {
                from: String::new(),
                params: String::new()
            })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<@relay.example:bob@partner.example>"),
            Ok(Command::Rcpt {
                to: "bob@partner.example".into(),
                params: String::new()
            })
        );
        assert_eq!(
            parse_command(b"BDAT 1000 LAST"),
            Ok(Command::Bdat {
                size: 1000,
                last: true
            })
        );
        assert_eq!(
            parse_command(b"bdat 0"),
            Ok(Command::Bdat {
                size: 0,
                last: false
            })
        );
        assert_eq!(parse_command(b"StartTLS"), Ok(Command::StartTls));
        assert_eq!(
            parse_command(b"EHLO client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(
            parse_command(b"AUTH PLAIN x"),
            Ok(Command::Unknown("AUTH".into()))
        );
    }

    /// Paths are read by the grammar: what a next hop gets is the whole
    /// address the client gave, never a piece cut at a colon.
    #[test]
    fn paths_keep_address_literals_and_quoted_local_parts_whole() {
        let path = |line: &str| match parse_command(line.as_bytes()) {
            Ok(Command::Mail { from, params }) => Ok((from, params)),
            Ok(Command::Rcpt { to, params }) => Ok((to, params)),
            other => Err(format!("{other:?}")),
        };
        for (line, want, params) in [
            (
                "MAIL FROM:<alice@[IPv6:2001:db8::1]>",
                "alice@[IPv6:2001:db8::1]",
                "",
            ),
            (
                "MAIL FROM:<alice@[192.0.2.1]> SIZE=5",
                "alice@[192.0.2.1]",
                "SIZE=5",
            ),
            (
                "RCPT TO:<\"x:victim\"@evil.test>",
                "\"x:victim\"@evil.test",
                "",
            ),
            ("RCPT TO:<\"a>b\"@evil.test>", "\"a>b\"@evil.test", ""),
            ("RCPT TO:<\"a\\\"b\"@x.test>", "\"a\\\"b\"@x.test", ""),
            ("RCPT TO:<@a.test,@[10.0.0.1]:bob@x.test>", "bob@x.test", ""),
            ("RCPT TO:<postmaster>", "postmaster", ""),
            (
                "RCPT TO:<bob@example.org> <victim@evil.test>",
                "bob@example.org",
                "<victim@evil.test>",
            ),
            (
                "MAIL FROM:<用户@例子.广告> SMTPUTF8",
                "用户@例子.广告",
                "SMTPUTF8",
            ),
        ] {
            assert_eq!(
                path(line),
                Ok((want.to_string(), params.to_string())),
                "{line}"
            );
        }
        for line in [
            "RCPT TO:<x:victim@evil.test>",
            "RCPT TO:<@a.test:>",
            "RCPT TO:<@:bob@x.test>",
            "RCPT TO:<a b@x.test>",
            "RCPT TO:<bob@x.test",
            "RCPT TO:<\"open@x.test>",
            "RCPT TO:<bob@[]>",
            "RCPT TO:<bob@x_y.test>",
            "MAIL FROM:<a@b@c>",
        ] {
            assert!(path(line).is_err(), "{line}: {:?}", path(line));
        }
    }

    #[test]
    fn bad_commands_are_syntax_errors() {
        assert!(matches!(
            parse_command(b"MAIL FROM:alice@example.org"),
            Err(SyntaxError::Parameters(_))
        ));
        assert!(matches!(
            parse_command(b"RCPT TO:<>"),
            Err(SyntaxError::Parameters(_))
        ));
        assert!(matches!(
            parse_command(b"BDAT lots"),
            Err(SyntaxError::Parameters(_))
        ));
        assert!(matches!(
            parse_command(b"DATA now"),
            Err(SyntaxError::Parameters(_))
        ));
        assert!(matches!(
            parse_command(b"EHLO"),
            Err(SyntaxError::Parameters(_))
        ));
        assert_eq!(parse_command(&[b'A'; 511]), Err(SyntaxError::LineTooLong));
        assert_eq!(parse_command(b""), Err(SyntaxError::Empty));
    }

    #[test]
    fn replies_round_trip_including_multiline() {
        let ehlo = Reply::multi(
            250,
            vec!["mx.example".into(), "PIPELINING".into(), "STARTTLS".into()],
        );
        let bytes = ehlo.to_bytes();
        assert_eq!(
            bytes,
            b"250-mx.example\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
        );
        let mut p = ReplyParser::default();
        p.feed(&bytes[..10]);
        assert_eq!(p.next_reply(), Ok(None));
        p.feed(&bytes[10..]);
        assert_eq!(p.next_reply(), Ok(Some(ehlo.clone())));
        assert!(Capabilities::from_ehlo(&ehlo).has("STARTTLS"));
        assert!(!Capabilities::from_ehlo(&ehlo).has("CHUNKING"));
        let mut p = ReplyParser::default();
        p.feed(b"250-a\r\n251 b\r\n");
        assert!(p.next_reply().is_err(), "codes must agree across lines");
        let mut p = ReplyParser::default();
        p.feed(b"hello\r\n");
        assert!(p.next_reply().is_err());
        // Found by the fuzzer: a multi-byte character across byte 4.
        let mut p = ReplyParser::default();
        p.feed(b"888\xc3\xc7\xc7 x\r\n");
        assert!(p.next_reply().is_err());
        let mut p = ReplyParser::default();
        p.feed("250 caf\u{e9}\r\n".as_bytes());
        assert_eq!(p.next_reply().unwrap().unwrap().text(), "caf\u{e9}");
    }

    #[test]
    fn domains_are_lowercased() {
        assert_eq!(
            domain_of("Bob@Partner.Example."),
            Some("partner.example".into())
        );
        assert_eq!(domain_of("postmaster"), None);
    }
}
