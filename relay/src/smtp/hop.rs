//! An open next-hop connection: set up through the shared leg setup
//! ([`crate::legs`]) with the opening dialogue
//! ([`tlsrelay_core::smtp::next_hop::HopOpening`]) driven on the socket, then bytes
//! written and replies read for the session's [`tlsrelay_core::smtp::forward`] machine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::legs::{open_outbound, Greeter, GreeterFailure, LegTimeouts, OutboundFailure, Target};
use crate::pump::Leg;
use tlsrelay_core::policy::OutboundPolicy;
use tlsrelay_core::report::{Downgrade, LegSecurity, PolicySession, SocketRecord};
use tlsrelay_core::smtp::codec::{Capabilities, Reply, ReplyParser};
use tlsrelay_core::smtp::next_hop::{HopOpening, Opening, OpeningFailure, SmtpTimeouts, Wait};

/// What a connector asks of every next hop it opens: its name (for
/// replies and logs), its TLS policy, and whether the kernel may take
/// the TLS.
#[derive(Clone, Copy)]
pub struct HopPolicy<'a> {
    pub connector: &'a str,
    pub policy: OutboundPolicy,
    pub kernel_tls: bool,
}

/// How long a reused connection has to answer its RSET (Postfix's
/// `smtp_rset_timeout`): a connection that slow is closed and a new one
/// opened.
const RSET_TIMEOUT: Duration = Duration::from_secs(20);

/// An open next-hop session, ready for a transaction.
pub struct HopConnection {
    leg: Leg,
    replies: ReplyParser,
    timeouts: SmtpTimeouts,
    /// Bytes sent and not yet written: a command, a trace header and a
    /// short message leave in one write when the reply is awaited.
    unwritten: Vec<u8>,
    pub facts: HopFacts,
}

/// Pieces smaller than this are gathered for one write (commands, the
/// trace header, a short message); a larger piece is written at once, so
/// a large message's bytes are not copied once more on their way.
const GATHER_BELOW: usize = 4 << 10;

/// What a next-hop connection was opened as: kept with it, so a session
/// that reuses it reports the same.
#[derive(Clone, Debug)]
pub struct HopFacts {
    pub host: String,
    pub address: SocketAddr,
    pub security: LegSecurity,
    /// The extensions its EHLO reply (after STARTTLS, if any) offered.
    pub capabilities: Capabilities,
    /// The kernel holds the leg's TLS keys.
    pub kernel_tls: bool,
    pub opened: Instant,
}

/// What setting up a next hop gives besides the connection.
pub struct Established {
    pub hop: HopConnection,
    pub downgrade: Option<Downgrade>,
    /// Why a TLS leg stayed in rustls, when it was offered to the kernel.
    pub userspace_reason: Option<String>,
}

impl HopConnection {
    /// Reads one reply within `wait`'s timeout.
    pub async fn reply(&mut self, wait: Wait) -> std::io::Result<Reply> {
        self.write_unwritten().await?;
        self.leg.flush().await?;
        let limit = self.timeouts.of(wait);
        read_reply(&mut self.leg, &mut self.replies, limit).await
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        // Message data in bulk is written as it comes, not copied first.
        if bytes.len() >= GATHER_BELOW {
            self.write_unwritten().await?;
            return self.leg.write_all(bytes).await;
        }
        self.unwritten.extend_from_slice(bytes);
        if self.unwritten.len() >= GATHER_BELOW {
            self.write_unwritten().await?;
        }
        Ok(())
    }

    /// Writes what [`HopConnection::send`] holds.
    pub async fn write_unwritten(&mut self) -> std::io::Result<()> {
        if !self.unwritten.is_empty() {
            self.leg.write_all(&self.unwritten).await?;
            self.unwritten.clear();
        }
        Ok(())
    }

    /// The socket chunk bytes can be spliced into (see
    /// [`Leg::splice_socket`]), once everything sent before has been
    /// written ([`HopConnection::write_unwritten`]).
    pub fn splice_socket(&self) -> Option<&TcpStream> {
        self.unwritten
            .is_empty()
            .then(|| self.leg.splice_socket())
            .flatten()
    }

    /// An idle connection made ready for a new transaction: RSET clears
    /// whatever the last session left open and proves the next hop still
    /// there (Postfix's `smtp_rset_timeout` probe). False: close it.
    pub async fn reset(&mut self) -> bool {
        let probe = async {
            self.send(b"RSET\r\n").await?;
            self.reply(Wait::Command).await
        };
        matches!(timeout(RSET_TIMEOUT, probe).await, Ok(Ok(reply)) if reply.code == 250)
    }

    /// QUIT and close, waiting at most two seconds.
    pub async fn quit(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            if self.send(b"QUIT\r\n").await.is_ok() {
                let _ = self.reply(Wait::Command).await;
            }
            let _ = self.leg.shutdown().await;
        })
        .await;
    }
}

async fn read_reply<S: AsyncRead + Unpin>(
    stream: &mut S,
    replies: &mut ReplyParser,
    limit: Duration,
) -> std::io::Result<Reply> {
    let mut buf = [0u8; 4096];
    loop {
        match replies.next_reply() {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
        let n = timeout(limit, stream.read(&mut buf)).await.map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "next hop timed out")
        })??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        replies.feed(&buf[..n]);
    }
}

/// The opening dialogue as the leg setup's [`Greeter`].
struct SmtpGreeter<'a> {
    label: String,
    hostname: &'a str,
    timeouts: SmtpTimeouts,
    opening: Option<HopOpening>,
}

impl SmtpGreeter<'_> {
    /// Drives the opening on `stream` until it needs TLS, is ready, or fails.
    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<(), GreeterFailure> {
        let opening = self.opening.as_mut().expect("started before driven");
        let mut buf = [0u8; 4096];
        let failed = loop {
            match opening.poll() {
                Opening::Send(bytes) => {
                    let written = async {
                        stream.write_all(&bytes).await?;
                        stream.flush().await
                    };
                    if let Err(e) = written.await {
                        break opening.io_failed(crate::legs::io_class(&e));
                    }
                }
                Opening::Read(wait) => {
                    match timeout(self.timeouts.of(wait), stream.read(&mut buf)).await {
                        Ok(Ok(0)) => break opening.io_failed("connection closed"),
                        Ok(Ok(n)) => opening.feed(&buf[..n]),
                        Ok(Err(e)) => break opening.io_failed(crate::legs::io_class(&e)),
                        Err(_) => break opening.io_failed("timed out"),
                    }
                }
                Opening::StartTls | Opening::Ready => return Ok(()),
                Opening::Failed(failure) => break failure,
            }
        };
        Err(match failed {
            OpeningFailure::Unavailable(why) => GreeterFailure::Unavailable(why),
            OpeningFailure::Tls {
                failure,
                handshake_begun,
            } => GreeterFailure::Tls {
                failure,
                handshake_begun,
            },
        })
    }
}

impl Greeter for SmtpGreeter<'_> {
    async fn before_tls(
        &mut self,
        tcp: &mut TcpStream,
        want_tls: bool,
    ) -> Result<(), GreeterFailure> {
        self.opening = Some(HopOpening::new(&self.label, self.hostname, want_tls));
        self.drive(tcp).await
    }

    async fn after_tls(&mut self, leg: &mut Leg) -> Result<(), GreeterFailure> {
        if let Some(opening) = self.opening.as_mut() {
            opening.tls_established();
        }
        self.drive(leg).await
    }
}

/// Where a session's report learns what setting up next hops did.
pub struct OutboundRecord<'a> {
    /// Every socket opened.
    pub sockets: &'a mut Vec<SocketRecord>,
    /// Every MX host tried or ruled out under a delivery policy.
    pub policy_sessions: &'a mut Vec<PolicySession>,
}

/// What opening any next hop of a session needs.
pub struct HopSetup<'a> {
    pub session: u64,
    pub hostname: &'a str,
    pub timeouts: SmtpTimeouts,
    pub record: OutboundRecord<'a>,
}

impl HopSetup<'_> {
    /// Connects `target` and drives the opening dialogue on it.
    pub async fn open(&mut self, target: &Target<'_>) -> Result<Established, OutboundFailure> {
        let leg_timeouts = LegTimeouts {
            connect: self.timeouts.connect,
            handshake: self.timeouts.handshake,
        };
        let mut greeter = SmtpGreeter {
            label: target.address.to_string(),
            hostname: self.hostname,
            timeouts: self.timeouts,
            opening: None,
        };
        let opened = open_outbound(target, &mut greeter, leg_timeouts, self.record.sockets).await?;
        let opening = greeter.opening.expect("a greeted connection");
        let facts = HopFacts {
            host: target.name.to_string(),
            address: opened.address,
            security: opened.security,
            capabilities: opening.capabilities().clone(),
            kernel_tls: matches!(opened.leg, Leg::Kernel(_)),
            opened: Instant::now(),
        };
        Ok(Established {
            userspace_reason: opened.userspace_reason,
            hop: HopConnection {
                leg: opened.leg,
                replies: opening.into_replies(),
                timeouts: self.timeouts,
                unwritten: Vec::new(),
                facts,
            },
            downgrade: opened.downgrade,
        })
    }
}
