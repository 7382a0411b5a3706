//! A raw SMTP client for tests: writes exactly the bytes it is given (so it
//! can send what no well-behaved client would), reads whole replies, and
//! can connect from a chosen loopback address to play a stranger.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::patience;

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TCP connection to `addr` from `local` (e.g. 127.0.0.2: any 127/8
/// address is this host's).
pub async fn tcp_from(local: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = match local {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(local, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

pub struct RawSmtp {
    io: BufReader<Box<dyn Io>>,
}

impl RawSmtp {
    /// Connects and reads the 220 greeting.
    pub async fn connect(addr: SocketAddr) -> RawSmtp {
        Self::greeted(TcpStream::connect(addr).await.unwrap()).await
    }

    /// Connects from `local` (e.g. 127.0.0.2: any 127/8 address is this
    /// host's) and reads the greeting.
    pub async fn connect_from(local: IpAddr, addr: SocketAddr) -> RawSmtp {
        Self::greeted(tcp_from(local, addr).await).await
    }

    /// Reads the greeting on a connection the caller opened (and perhaps
    /// sent a PROXY protocol header on).
    pub async fn from_stream(tcp: TcpStream) -> RawSmtp {
        Self::greeted(tcp).await
    }

    async fn greeted(tcp: TcpStream) -> RawSmtp {
        // A command line and the chunk after it go out at once, as an MTA's
        // would, not 40 ms apart behind Nagle and a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let mut raw = RawSmtp {
            io: BufReader::new(Box::new(tcp)),
        };
        let greeting = raw.reply().await;
        assert!(greeting.starts_with("220"), "{greeting}");
        raw
    }

    /// One whole (possibly multi-line) reply.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(patience(), self.io.read_line(&mut line))
                .await
                .expect("a reply within the patience")
                .unwrap();
            assert!(n > 0, "connection closed; so far: {all}");
            all += &line;
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// Sends `line` with CRLF and returns the reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// STARTTLS (any server certificate accepted: the relay's policy is
    /// under test, not its identity), then the session goes on over TLS.
    pub async fn starttls(&mut self) {
        let reply = self.cmd("STARTTLS").await;
        assert!(reply.starts_with("220"), "{reply}");
        let plain = std::mem::replace(
            &mut self.io,
            BufReader::new(Box::new(tokio::io::duplex(1).0)),
        );
        let connector = tokio_rustls::TlsConnector::from(crate::client_config(
            &crate::ClientOptions::default(),
        ));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, plain.into_inner()).await.unwrap();
        self.io = BufReader::new(Box::new(tls));
    }
}
