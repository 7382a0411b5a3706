//! SMTP on sockets: the state machines of [`tlsrelay_core::smtp`] driven by
//! `client` (next hops: the shared leg setup, the opening dialogue,
//! replies) and `session` (one SMTP session end to end).

pub mod client;
pub mod dns_route;
pub mod hop;
pub mod idle_hops;
pub mod session;
