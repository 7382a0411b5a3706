//! tlsrelay's runtime: the core's policy and SMTP machines
//! ([`tlsrelay_core`]) and the kernel interfaces ([`tlsrelay_sys`]) driven
//! with tokio, rustls and sockets.
//!
//! A [`plan::Plan`] is built from the config; [`listeners::Listeners`]
//! binds it and runs one task per session: `session` (bulk TCP) or
//! `smtp::session`, both setting up their legs through `legs` and, for
//! TCP, handing them to the data [`pump`]. `cli` is the binary's edge.

// Unsafe code lives in tlsrelay-sys, each block with why it is sound.
#![deny(unsafe_code)]

mod accept;
mod access;
pub mod cli;
pub mod config_reference;
mod dns;
mod http_client;
mod inspect;
mod legs;
pub mod listeners;
mod metrics;
mod names;
pub mod plan;
mod privileges;
pub mod pump;
mod reload;
mod revocation;
mod session;
mod smtp;
mod state;
mod status;
mod sts_policies;
mod tickets;
mod tls;
mod tls_reports;
pub mod upstreams;
mod wire_view;

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
