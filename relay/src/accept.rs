//! Accepting on a listening socket (the relay's listeners, the metrics
//! endpoint) without spinning when the process is out of descriptors.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

/// The next connection on `socket`. A failed accept (EMFILE and friends:
/// the condition persists until a descriptor is freed) is logged and
/// retried after a pause instead of in a spinning loop.
pub async fn backing_off(socket: &TcpListener, listener: &str) -> (TcpStream, SocketAddr) {
    loop {
        match socket.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(listener, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
