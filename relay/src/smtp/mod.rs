//! SMTP: the command/reply codec, the client-facing dialogue as a state
//! machine, the next-hop dialogue, and the session that joins them.

pub mod client;
pub mod codec;
pub mod server;
pub mod session;
