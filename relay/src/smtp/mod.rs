//! SMTP on sockets: the state machines of [`tlsrelay_core::smtp`] (re-exported
//! here) driven by `client` (next hops: the shared leg setup, the opening
//! dialogue, replies) and `session` (one SMTP session end to end).

pub use tlsrelay_core::smtp::{address, admission, codec, forward, mx, next_hop, server};

pub mod client;
pub mod dns_route;
pub mod hop;
pub mod idle_hops;
pub mod session;
