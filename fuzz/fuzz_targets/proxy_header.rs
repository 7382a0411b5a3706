//! Arbitrary bytes before a connection's first byte, read as a PROXY
//! protocol header the way the listener reads one: only as many bytes as
//! the reader asks for. Errors are fine, panics are not; the reader never
//! asks for nothing; a header it accepts, written again in either version,
//! reads back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tlsrelay_core::proxy::{encode, HeaderReader, Progress, ProxyHeader, ProxyVersion};

fn read(mut data: &[u8]) -> Option<ProxyHeader> {
    let mut reader = HeaderReader::new();
    loop {
        match reader.progress() {
            Ok(Progress::Need(n)) => {
                assert!(n > 0, "asked for no bytes");
                if data.len() < n {
                    return None;
                }
                reader.feed(&data[..n]);
                data = &data[n..];
            }
            Ok(Progress::Done(header)) => return Some(header),
            Err(_) => return None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(ProxyHeader::Proxied {
        source,
        destination,
    }) = read(data)
    {
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let again = read(&encode(version, source, destination));
            let Some(ProxyHeader::Proxied {
                source: s,
                destination: d,
            }) = again
            else {
                panic!("{version:?} header of {source} -> {destination} did not read back");
            };
            // Mixed families are written as IPv6: compare as such.
            let same = |a: std::net::SocketAddr, b: std::net::SocketAddr| {
                let v6 = |x: std::net::SocketAddr| match x.ip() {
                    std::net::IpAddr::V4(v4) => (v4.to_ipv6_mapped(), x.port()),
                    std::net::IpAddr::V6(v6) => (v6, x.port()),
                };
                v6(a) == v6(b)
            };
            assert!(same(s, source) && same(d, destination), "{version:?}");
        }
    }
});
