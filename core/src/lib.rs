//! tlsrelay's core, free of I/O and of unsafe code: the configuration and
//! its errors ([`config`]), the TLS policy decisions ([`policy`]), the
//! SMTP dialogues as state machines ([`smtp`]), and what a session did
//! ([`report`]), the PROXY protocol header ([`proxy`]), and DANE's
//! decisions over DNS answers ([`dane`]). The runtime (`tlsrelay`) drives these with sockets,
//! rustls and the kernel; tests and fuzz targets drive them in memory.
#![forbid(unsafe_code)]

#[macro_use]
mod keywords;
#[macro_use]
mod schema;

pub mod access;
pub mod config;
pub mod dane;
pub mod mta_sts;
pub mod ocsp;
pub mod policy;
pub mod proxy;
pub mod report;
pub mod smtp;
pub mod tls_hello;
pub mod tlsrpt;
pub mod upstream;

/// Bytes as lowercase hex (TLSA data, digests), as DNS records write them.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
