//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4 load
//! balancer puts before a connection's first byte to say whom it came
//! from, read without consuming a byte past it ([`HeaderReader`] says how
//! many to read next), and written towards upstreams that want one.

use std::net::{IpAddr, SocketAddr};

/// Version 2's twelve-byte signature.
const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's longest header, CRLF included.
const V1_MAX: usize = 107;
/// Both versions' shortest header (`PROXY UNKNOWN\r\n`).
const MIN: usize = 15;
/// Version 2 addresses a relay accepts at most (the TLVs after them are
/// skipped): enough for every TLV a balancer sends in practice.
const V2_MAX_LEN: usize = 1024;

/// Which version to write towards an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}
keywords!(ProxyVersion, "PROXY protocol version", {
    V1 => "v1",
    V2 => "v2",
});

/// What a header said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied connection: the client's address and the one it reached.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (a health check, `LOCAL` or
    /// `UNKNOWN`): the socket's addresses stand.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header (the connection starts with {0:?})")]
    Missing(String),
    #[error("malformed PROXY protocol v1 header: {0}")]
    V1(String),
    #[error("malformed PROXY protocol v2 header: {0}")]
    V2(String),
}

/// Where reading a header stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// Read exactly this many more bytes and feed them.
    Need(usize),
    /// The header; nothing after it has been asked for.
    Done(ProxyHeader),
}

/// Reads a header in steps that never ask for a byte past its end.
#[derive(Default)]
pub struct HeaderReader {
    bytes: Vec<u8>,
}

impl HeaderReader {
    pub fn new() -> HeaderReader {
        HeaderReader::default()
    }

    /// The bytes read (as asked for by the last [`Progress::Need`]).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    /// What to read next, or the header.
    pub fn progress(&self) -> Result<Progress, ProxyError> {
        let b = &self.bytes;
        if b.len() < MIN {
            return Ok(Progress::Need(MIN - b.len()));
        }
        if b.starts_with(SIGNATURE) {
            return v2(b);
        }
        if b.starts_with(b"PROXY ") {
            return match b.windows(2).position(|w| w == b"\r\n") {
                Some(end) if end + 2 == b.len() => v1(&b[..end]).map(Progress::Done),
                Some(_) => Err(ProxyError::V1("bytes after the CRLF".into())),
                None if b.len() >= V1_MAX => Err(ProxyError::V1("no CRLF in 107 bytes".into())),
                None => Ok(Progress::Need(1)),
            };
        }
        let start: String = b.iter().take(8).map(|&c| c as char).collect();
        Err(ProxyError::Missing(start))
    }
}

fn v1(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let bad = |why: &str| ProxyError::V1(why.to_string());
    let line = std::str::from_utf8(line).map_err(|_| bad("not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(ProxyHeader::Local),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| s.parse::<IpAddr>().map_err(|_| bad("bad address"));
            let port = |s: &str| {
                if s.len() > 1 && s.starts_with('0') {
                    return Err(bad("port with a leading zero"));
                }
                s.parse::<u16>().map_err(|_| bad("bad port"))
            };
            let (src, dst) = (ip(src)?, ip(dst)?);
            let v6 = *family == "TCP6";
            if src.is_ipv6() != v6 || dst.is_ipv6() != v6 {
                return Err(bad("address family does not match"));
            }
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(src, port(sport)?),
                destination: SocketAddr::new(dst, port(dport)?),
            })
        }
        _ => Err(bad("expected PROXY TCP4|TCP6 src dst sport dport")),
    }
}

fn v2(b: &[u8]) -> Result<Progress, ProxyError> {
    let bad = |why: &str| ProxyError::V2(why.to_string());
    if b.len() < 16 {
        return Ok(Progress::Need(16 - b.len()));
    }
    let len = u16::from_be_bytes([b[14], b[15]]) as usize;
    if len > V2_MAX_LEN {
        return Err(bad("longer than 1024 bytes"));
    }
    if b.len() < 16 + len {
        return Ok(Progress::Need(16 + len - b.len()));
    }
    if b[12] >> 4 != 2 {
        return Err(bad("version is not 2"));
    }
    let body = &b[16..16 + len];
    let header = match (b[12] & 0x0f, b[13]) {
        // LOCAL: the balancer's own connection, whatever follows.
        (0, _) => ProxyHeader::Local,
        // PROXY over TCP (STREAM) on IPv4 and IPv6.
        (1, 0x11) if len >= 12 => {
            let ip = |o: usize| IpAddr::from([body[o], body[o + 1], body[o + 2], body[o + 3]]);
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        (1, 0x21) if len >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::from(a)
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // UNSPEC or a family the relay does not route (UNIX, UDP).
        (1, 0x00) => ProxyHeader::Local,
        (1, family) => return Err(bad(&format!("unsupported family/protocol {family:#04x}"))),
        (command, _) => return Err(bad(&format!("unknown command {command}"))),
    };
    Ok(Progress::Done(header))
}

/// The header announcing `source` connected to `destination`.
pub fn encode(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    // Mixed families: say both as IPv6 (an IPv4 address as ::ffff:a.b.c.d).
    let (source, destination) = if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    };
    match version {
        ProxyVersion::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY
            let addresses: Vec<u8> = match (source.ip(), destination.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.push(0x11);
                    [s.octets().as_slice(), d.octets().as_slice()].concat()
                }
                (s, d) => {
                    out.push(0x21);
                    [v6_octets(s).as_slice(), v6_octets(d).as_slice()].concat()
                }
            };
            let len = (addresses.len() + 4) as u16;
            out.extend(len.to_be_bytes());
            out.extend(addresses);
            out.extend(source.port().to_be_bytes());
            out.extend(destination.port().to_be_bytes());
            out
        }
    }
}

fn v6(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(v6_ip(addr.ip())), addr.port())
}

fn v6_ip(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    v6_ip(ip).octets()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` as the reader asks, never more; the header and the
    /// bytes left unread.
    fn read(wire: &[u8]) -> (Result<ProxyHeader, ProxyError>, &[u8]) {
        let mut reader = HeaderReader::new();
        let mut at = 0;
        loop {
            match reader.progress() {
                Ok(Progress::Need(n)) if at + n <= wire.len() => {
                    reader.feed(&wire[at..at + n]);
                    at += n;
                }
                Ok(Progress::Need(_)) => {
                    return (Err(ProxyError::V1("truncated".into())), &wire[at..])
                }
                Ok(Progress::Done(h)) => return (Ok(h), &wire[at..]),
                Err(e) => return (Err(e), &wire[at..]),
            }
        }
    }

    #[test]
    fn v1_headers_and_nothing_read_past_them() {
        let (h, rest) = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\nEHLO x\r\n");
        assert_eq!(
            h.unwrap(),
            ProxyHeader::Proxied {
                source: "192.0.2.7:56324".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap()
            }
        );
        assert_eq!(rest, b"EHLO x\r\n");
        let (h, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n");
        assert!(matches!(h.unwrap(), ProxyHeader::Proxied { source, .. } if source.ip().is_ipv6()));
        let (h, rest) = read(b"PROXY UNKNOWN\r\n\x16\x03\x01");
        assert_eq!(h.unwrap(), ProxyHeader::Local);
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[test]
    fn v2_headers_round_trip_and_stop_at_their_length() {
        for (src, dst) in [
            ("192.0.2.7:56324", "198.51.100.1:25"),
            ("[2001:db8::7]:4000", "[2001:db8::1]:443"),
        ] {
            let (source, destination) = (src.parse().unwrap(), dst.parse().unwrap());
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut wire = encode(version, source, destination);
                wire.extend(b"\x16\x03\x01 after");
                let (h, rest) = read(&wire);
                assert_eq!(
                    h.unwrap(),
                    ProxyHeader::Proxied {
                        source,
                        destination
                    },
                    "{version:?}"
                );
                assert_eq!(rest, b"\x16\x03\x01 after");
            }
        }
        // LOCAL (a health check) with a TLV after the addresses.
        let mut local = SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0x00, 0x03, 0x04, 0x00, 0x00]);
        assert_eq!(read(&local).0.unwrap(), ProxyHeader::Local);
    }

    #[test]
    fn garbage_and_truncation_are_refused() {
        assert!(matches!(
            read(b"EHLO mail.example.org\r\n").0,
            Err(ProxyError::Missing(_))
        ));
        assert!(matches!(
            read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh").0,
            Err(ProxyError::Missing(_))
        ));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n"[..],
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 70000 2\r\n",
        ] {
            assert!(matches!(read(bad).0, Err(ProxyError::V1(_))), "{bad:?}");
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(read(&long).0, Err(ProxyError::V1(_))));
        let mut v2 = encode(
            ProxyVersion::V2,
            "192.0.2.7:1".parse().unwrap(),
            "192.0.2.8:2".parse().unwrap(),
        );
        v2[12] = 0x31; // version 3
        assert!(matches!(read(&v2).0, Err(ProxyError::V2(_))));
        v2[12] = 0x21;
        v2[14] = 0xff; // 65 KB of addresses
        assert!(matches!(read(&v2).0, Err(ProxyError::V2(_))));
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let wire = encode(
            ProxyVersion::V1,
            "192.0.2.7:1".parse().unwrap(),
            "[2001:db8::1]:2".parse().unwrap(),
        );
        assert_eq!(
            wire,
            b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 1 2\r\n".to_vec()
        );
    }
}
