//! The first TLS handshake messages read without terminating TLS: the
//! ClientHello's server name, ALPN protocols and offered versions, for a
//! listener to route on (and to pass the connection through untouched),
//! and the ServerHello's version and cipher, for the session report.
//!
//! [`HelloReader`] is fed the client's bytes record by record and says how
//! many more it needs, so a driver never reads past the hello: whatever
//! follows stays in the socket for the server the hello is replayed to.

use std::fmt;

/// TLS record content type of handshake messages.
const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const HEADER: usize = 5;
/// Largest record a peer may send (2^14 plaintext; a hello is plaintext).
const MAX_RECORD: usize = 16384;
/// A ClientHello larger than this is refused (post-quantum key shares
/// make them a few KiB; 64 KiB is the handshake length field's real use).
pub const MAX_HELLO: usize = 64 * 1024;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_KEY_SHARE: u16 = 51;

/// The SHA-256 of "HelloRetryRequest": a ServerHello with this random is
/// a HelloRetryRequest (RFC 8446 4.1.3).
const HRR_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first byte is not a TLS handshake record.
    #[error("not a TLS handshake")]
    NotTls,
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
}

/// What a ClientHello asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The server name (SNI), lowercased; `None` when absent.
    pub server_name: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// Versions offered (supported_versions, else the legacy version).
    pub versions: Vec<u16>,
}

impl ClientHelloInfo {
    /// The highest version offered (0x0304 for TLS 1.3), ignoring GREASE.
    pub fn highest_version(&self) -> u16 {
        self.versions
            .iter()
            .copied()
            .filter(|v| v & 0x0f0f != 0x0a0a)
            .max()
            .unwrap_or(0)
    }
}

impl fmt::Display for ClientHelloInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sni={}", self.server_name.as_deref().unwrap_or("-"))?;
        if !self.alpn.is_empty() {
            let alpn: Vec<String> = self
                .alpn
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            write!(f, " alpn={}", alpn.join(","))?;
        }
        Ok(())
    }
}

/// How a [`HelloReader`] stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Read exactly this many more bytes and [`HelloReader::feed`] them.
    Need(usize),
    Done(ClientHelloInfo),
}

/// Reassembles a ClientHello from the records that carry it (it may span
/// several, and records may arrive in any split).
#[derive(Debug, Default)]
pub struct HelloReader {
    /// Every byte read so far: replayed to the server unchanged.
    raw: Vec<u8>,
    /// Where the next record starts in `raw`.
    next_record: usize,
    /// Handshake bytes gathered from the record bodies.
    handshake: Vec<u8>,
}

impl HelloReader {
    pub fn new() -> HelloReader {
        HelloReader::default()
    }

    /// The bytes read so far, to replay to the server.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn into_raw(self) -> Vec<u8> {
        self.raw
    }

    /// Bytes from the client (at most what [`Progress::Need`] asked for;
    /// more would be taken as the next record).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.raw.extend_from_slice(bytes);
    }

    /// What is needed next, or the hello once whole.
    pub fn progress(&mut self) -> Result<Progress, HelloError> {
        loop {
            let start = self.next_record;
            if self.raw.len() < start + HEADER {
                // The first byte alone tells TLS from anything else.
                if let Some(&b) = self.raw.get(start) {
                    if b != HANDSHAKE {
                        return Err(if start == 0 {
                            HelloError::NotTls
                        } else {
                            HelloError::Malformed("record between hello records")
                        });
                    }
                }
                return Ok(Progress::Need(start + HEADER - self.raw.len()));
            }
            let h = &self.raw[start..start + HEADER];
            if h[0] != HANDSHAKE {
                return Err(if start == 0 {
                    HelloError::NotTls
                } else {
                    HelloError::Malformed("record between hello records")
                });
            }
            if h[1] != 3 {
                return Err(HelloError::NotTls);
            }
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            if len == 0 || len > MAX_RECORD {
                return Err(HelloError::Malformed("record length"));
            }
            let end = start + HEADER + len;
            if self.raw.len() < end {
                return Ok(Progress::Need(end - self.raw.len()));
            }
            self.handshake
                .extend_from_slice(&self.raw[start + HEADER..end]);
            self.next_record = end;
            if self.handshake.len() >= 4 {
                if self.handshake[0] != CLIENT_HELLO {
                    return Err(HelloError::Malformed(
                        "first handshake message is no ClientHello",
                    ));
                }
                let len = u24(&self.handshake[1..4]);
                if len > MAX_HELLO {
                    return Err(HelloError::TooLarge);
                }
                if self.handshake.len() >= 4 + len {
                    return parse_client_hello(&self.handshake[4..4 + len]).map(Progress::Done);
                }
            }
        }
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// A cursor over a handshake message; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.b.len() < n {
            return Err(HelloError::Malformed(self.what));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HelloError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HelloError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a length prefix of `len_bytes` (1 or 2).
    fn vec(&mut self, len_bytes: usize) -> Result<Reader<'a>, HelloError> {
        let len = match len_bytes {
            1 => usize::from(self.u8()?),
            _ => usize::from(self.u16()?),
        };
        Ok(Reader {
            b: self.take(len)?,
            what: self.what,
        })
    }

    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
}

/// The fields a router needs from a ClientHello body.
pub fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, HelloError> {
    let mut r = Reader {
        b: body,
        what: "ClientHello",
    };
    let legacy_version = r.u16()?;
    r.take(32)?; // random
    r.vec(1)?; // session id
    r.vec(2)?; // cipher suites
    r.vec(1)?; // compression methods
    let mut info = ClientHelloInfo::default();
    if r.is_empty() {
        info.versions = vec![legacy_version];
        return Ok(info);
    }
    let mut extensions = r.vec(2)?;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec(2)?;
        match kind {
            EXT_SERVER_NAME => {
                let mut names = data.vec(2)?;
                while !names.is_empty() {
                    let name_type = names.u8()?;
                    let name = names.vec(2)?;
                    if name_type == 0 && info.server_name.is_none() {
                        let name = std::str::from_utf8(name.b)
                            .map_err(|_| HelloError::Malformed("server name"))?;
                        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
                            return Err(HelloError::Malformed("server name"));
                        }
                        info.server_name = Some(name.trim_end_matches('.').to_ascii_lowercase());
                    }
                }
            }
            EXT_ALPN => {
                let mut protocols = data.vec(2)?;
                while !protocols.is_empty() {
                    let p = protocols.vec(1)?;
                    info.alpn.push(p.b.to_vec());
                }
            }
            EXT_SUPPORTED_VERSIONS => {
                let mut versions = data.vec(1)?;
                while !versions.is_empty() {
                    info.versions.push(versions.u16()?);
                }
            }
            _ => {}
        }
    }
    if info.versions.is_empty() {
        info.versions.push(legacy_version);
    }
    Ok(info)
}

/// What a ServerHello chose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerHelloInfo {
    /// 0x0304 for TLS 1.3 (supported_versions), else the legacy version.
    pub version: u16,
    pub cipher: u16,
    /// TLS 1.3: the key exchange group of its key share (0 when none).
    pub group: u16,
    /// It is a HelloRetryRequest: the client sends another ClientHello.
    pub retry: bool,
}

/// The ServerHello at the start of a server's first handshake record
/// (`record` with its 5-byte header); `None` when it holds none.
pub fn parse_server_hello(record: &[u8]) -> Option<ServerHelloInfo> {
    if record.len() < HEADER + 4 || record[0] != HANDSHAKE || record[HEADER] != SERVER_HELLO {
        return None;
    }
    let len = u24(&record[HEADER + 1..HEADER + 4]);
    let body = record.get(HEADER + 4..HEADER + 4 + len)?;
    let mut r = Reader {
        b: body,
        what: "ServerHello",
    };
    let legacy_version = r.u16().ok()?;
    let random = r.take(32).ok()?;
    r.vec(1).ok()?; // session id
    let cipher = r.u16().ok()?;
    r.u8().ok()?; // compression
    let mut version = legacy_version;
    let mut group = 0;
    if !r.is_empty() {
        let mut extensions = r.vec(2).ok()?;
        while !extensions.is_empty() {
            let kind = extensions.u16().ok()?;
            let mut data = extensions.vec(2).ok()?;
            match kind {
                EXT_SUPPORTED_VERSIONS => version = data.u16().ok()?,
                EXT_KEY_SHARE => group = data.u16().ok()?,
                _ => {}
            }
        }
    }
    Some(ServerHelloInfo {
        version,
        cipher,
        group,
        retry: random == HRR_RANDOM,
    })
}

/// Whether the SNI `name` matches a route's `pattern`: the name exactly,
/// or `*.suffix` for any name one or more labels below `suffix`.
pub fn sni_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a client library would write it.
    pub(crate) fn client_hello(sni: Option<&str>, alpn: &[&str], versions: &[u16]) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            ext.extend(EXT_SERVER_NAME.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend(p.as_bytes());
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            ext.extend(EXT_ALPN.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        if !versions.is_empty() {
            let mut data = vec![(versions.len() * 2) as u8];
            for v in versions {
                data.extend(v.to_be_bytes());
            }
            ext.extend(EXT_SUPPORTED_VERSIONS.to_be_bytes());
            ext.extend((data.len() as u16).to_be_bytes());
            ext.extend(data);
        }
        // A large key share, as a post-quantum hybrid makes them.
        ext.extend(51u16.to_be_bytes());
        ext.extend(1200u16.to_be_bytes());
        ext.extend(vec![7u8; 1200]);
        let mut body = vec![3, 3];
        body.extend([1u8; 32]);
        body.push(0);
        body.extend([0, 2, 0x13, 0x01]);
        body.extend([1, 0]);
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        hs
    }

    /// Handshake bytes in records of at most `per_record` bytes.
    pub(crate) fn records(handshake: &[u8], per_record: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in handshake.chunks(per_record) {
            out.extend([HANDSHAKE, 3, 1]);
            out.extend((piece.len() as u16).to_be_bytes());
            out.extend(piece);
        }
        out
    }

    /// Feeds `wire` to a reader exactly as a driver would (never more than
    /// asked), in pieces of at most `split`; the result and what was read.
    fn read(wire: &[u8], split: usize) -> (Result<ClientHelloInfo, HelloError>, usize) {
        let mut reader = HelloReader::new();
        let mut at = 0;
        loop {
            match reader.progress() {
                Ok(Progress::Done(info)) => return (Ok(info), at),
                Err(e) => return (Err(e), at),
                Ok(Progress::Need(n)) => {
                    let n = n.min(split).min(wire.len() - at);
                    if n == 0 {
                        return (Err(HelloError::Malformed("ran out")), at);
                    }
                    reader.feed(&wire[at..at + n]);
                    at += n;
                }
            }
        }
    }

    #[test]
    fn sni_alpn_and_versions_from_a_hello_in_any_split_and_nothing_more_is_read() {
        let hello = client_hello(
            Some("API.Example.com."),
            &["h2", "http/1.1"],
            &[0x0a0a, 0x0304, 0x0303],
        );
        let want = ClientHelloInfo {
            server_name: Some("api.example.com".into()),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            versions: vec![0x0a0a, 0x0304, 0x0303],
        };
        for per_record in [hello.len(), 1000, 300, 7] {
            let mut wire = records(&hello, per_record);
            let hello_len = wire.len();
            wire.extend(b"application bytes that follow");
            for split in [1, 3, 5, 64, usize::MAX] {
                let (got, read) = read(&wire, split);
                assert_eq!(
                    got.as_ref(),
                    Ok(&want),
                    "records of {per_record}, reads of {split}"
                );
                assert_eq!(read, hello_len, "read past the hello");
            }
        }
        assert_eq!(want.highest_version(), 0x0304, "GREASE ignored");
    }

    #[test]
    fn hellos_without_sni_or_extensions_and_things_that_are_not_hellos() {
        let hello = client_hello(None, &[], &[]);
        let (got, _) = read(&records(&hello, hello.len()), usize::MAX);
        assert_eq!(got.unwrap().server_name, None);
        assert_eq!(read(b"GET / HTTP/1.1\r\n", 64).0, Err(HelloError::NotTls));
        assert_eq!(
            read(b"\x16\x02\x01\x00\x05hello", 64).0,
            Err(HelloError::NotTls)
        );
        let not_hello = records(&[2, 0, 0, 1, 0], 100);
        assert!(matches!(
            read(&not_hello, 64).0,
            Err(HelloError::Malformed(_))
        ));
        // Claims 16 MiB of hello.
        let huge = records(&[1, 0xff, 0xff, 0xff, 0], 100);
        assert_eq!(read(&huge, 64).0, Err(HelloError::TooLarge));
        // A name with a control character.
        let bad = client_hello(Some("a\u{7}b"), &[], &[]);
        assert!(matches!(
            read(&records(&bad, 5000), 64).0,
            Err(HelloError::Malformed(_))
        ));
    }

    #[test]
    fn server_hellos_give_the_version_and_cipher_chosen() {
        let mut body = vec![3, 3];
        body.extend([9u8; 32]);
        body.push(0);
        body.extend([0x13, 0x02, 0]);
        let ext = [0u8, 43, 0, 2, 3, 4, 0, 51, 0, 4, 0, 0x1d, 0, 0];
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![SERVER_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(&body);
        let record = records(&hs, hs.len());
        assert_eq!(
            parse_server_hello(&record),
            Some(ServerHelloInfo {
                version: 0x0304,
                cipher: 0x1302,
                group: 0x001d,
                retry: false
            })
        );
        body[2..34].copy_from_slice(&HRR_RANDOM);
        let mut hs = vec![SERVER_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(&body);
        assert!(parse_server_hello(&records(&hs, hs.len())).unwrap().retry);
        assert_eq!(parse_server_hello(b"\x15\x03\x03\x00\x02\x02\x28"), None);
    }

    #[test]
    fn sni_patterns_match_exact_names_and_wildcards_below_them() {
        assert!(sni_matches("api.example.com", "api.example.com"));
        assert!(sni_matches("API.example.com", "api.example.com"));
        assert!(sni_matches("*.example.com", "a.example.com"));
        assert!(sni_matches("*.example.com", "a.b.example.com"));
        assert!(!sni_matches("*.example.com", "example.com"));
        assert!(!sni_matches("*.example.com", "badexample.com"));
        assert!(!sni_matches("api.example.com", "x.api.example.com"));
    }
}
