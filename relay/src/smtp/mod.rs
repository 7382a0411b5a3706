//! SMTP: the command/reply codec, the client-facing dialogue as a state
//! machine, who may send what (admission), the next-hop dialogue, and the
//! session that joins them.

pub mod address;
pub mod admission;
pub mod client;
pub mod codec;
pub mod server;
pub mod session;
