//! SMTP: the command/reply codec, the client-facing dialogue, the next
//! hop's opening dialogue and the relaying between them as state machines
//! free of I/O (`codec`, `server`, `next_hop`, `forward`), who may send what
//! (`admission`, `address`), and the I/O that drives them (`client`: next
//! hops on sockets; `session`: one SMTP session end to end).

pub mod address;
pub mod admission;
pub mod client;
pub mod codec;
pub mod forward;
pub mod next_hop;
pub mod server;
pub mod session;

#[cfg(test)]
mod pair_tests;
