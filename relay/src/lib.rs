//! tlsrelay: a TLS relay for Linux edge hosts.
//!
//! rustls performs handshakes and the opportunistic-or-forced policy in
//! userspace; bytes then move through a data pump. Protocol and policy logic
//! is free of I/O ([`policy`]); sockets live in [`session`], [`pump`] and
//! [`relay`].

pub use tlsrelay_core::{config, policy, report};
pub use tlsrelay_sys::{bpf, ktls, notify};

pub mod cli;
mod cli_cert;
pub mod inspect;
pub mod legs;
pub mod metrics;
pub mod pump;
pub mod relay;
pub mod reload;
pub mod session;
pub mod smtp;
pub mod state;
pub mod tls;
