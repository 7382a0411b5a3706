//! SMTP as state machines: the command/reply codec, the client-facing
//! dialogue (`server`), the next hop's opening dialogue (`next_hop`), the
//! relaying between them (`forward`), and who may send what (`admission`,
//! `address`). The runtime's `smtp` module drives them on sockets.

pub mod address;
pub mod admission;
pub mod codec;
pub mod forward;
pub mod mx;
pub mod next_hop;
pub mod server;

#[cfg(test)]
mod pair_tests;
