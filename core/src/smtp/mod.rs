//! SMTP as state machines: the command/reply codec, the client-facing
//! dialogue (`server`), the next hop's opening dialogue (`next_hop`), the
//! relaying between them (`forward`), who may send what (`admission`,
//! `address`), how long a client may take (`clock`), MAIL parameters
//! (`params`) and trace headers (`trace`). The runtime's `smtp` module drives them on sockets.

pub mod address;
pub mod admission;
pub mod clock;
pub mod codec;
pub mod forward;
pub mod mx;
pub mod next_hop;
pub mod params;
pub mod server;
pub mod trace;

#[cfg(test)]
mod pair_tests;
