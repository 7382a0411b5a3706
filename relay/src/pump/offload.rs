//! Deciding, per session, whether both legs can go to the splice data plane,
//! and handing TLS legs' keys to the kernel when they can.

use std::io::{self, Read};
use std::os::fd::AsRawFd;

use tokio::io::AsyncWriteExt;

use super::soft_tls::{Handover, SoftTls};
use super::Leg;
use crate::tls::RecordIo;
use tlsrelay_sys::ktls::{self, KtlsCipher, KtlsVersion};

pub(super) use tlsrelay_sys::splice::SpliceLeg;

pub(super) enum Prepared {
    Splice {
        client: SpliceLeg,
        upstream: SpliceLeg,
    },
    /// TLS legs the kernel can't take stay in rustls; `reason` says why.
    Userspace {
        client: Leg,
        upstream: Leg,
        reason: Option<String>,
    },
    /// Keys left rustls but the kernel refused them: the session is lost.
    Failed { detail: String },
}

/// The kTLS view of what a TLS leg negotiated.
fn negotiated(leg: &Leg) -> Option<(Option<KtlsVersion>, Option<KtlsCipher>)> {
    let common: &rustls::CommonState = match leg {
        Leg::Plain(_) | Leg::Kernel(_) | Leg::Soft(_) => return None,
        Leg::TlsServer(s) => s.get_ref().1,
        Leg::TlsClient(s) => s.get_ref().1,
    };
    Some((
        common.protocol_version().and_then(KtlsVersion::of),
        common
            .negotiated_cipher_suite()
            .and_then(|s| KtlsCipher::of(s.suite())),
    ))
}

/// The per-session reason when this kernel has no TLS at all.
pub const NO_KTLS: &str = "no kernel TLS on this host (see the startup banner)";

/// Why a TLS leg can't go to the kernel, if it can't.
fn kernel_refuses(leg: &Leg) -> Option<String> {
    let (version, cipher) = negotiated(leg)?;
    let support = ktls::probe();
    if support.unavailable.is_some() {
        // The whole reason is in the banner's data plane line.
        return Some(NO_KTLS.into());
    }
    match (version, cipher) {
        (Some(v), Some(c)) if support.supports(v, c) => None,
        (Some(v), Some(c)) => Some(format!("kernel TLS does not support {v:?} with {c:?}")),
        _ => Some("negotiated suite has no kernel TLS equivalent".into()),
    }
}

/// Why TLS legs can't go to the kernel, checked before any key leaves
/// rustls (so a refusal leaves them usable): configuration, the kernel's
/// support for what they negotiated, and attaching the TLS ULP.
fn refusal(legs: &[&Leg], ktls_enabled: bool) -> Option<String> {
    if !ktls_enabled {
        return Some("kernel TLS disabled by configuration (dataplane.ktls = false)".to_string());
    }
    legs.iter().find_map(|leg| kernel_refuses(leg)).or_else(|| {
        legs.iter()
            .filter(|leg| matches!(leg, Leg::TlsServer(_) | Leg::TlsClient(_)))
            .find_map(|leg| ktls::attach_ulp(leg.tcp().as_raw_fd()).err())
            .map(|e| format!("{e} (the peer may have closed already)"))
    })
}

/// What became of a TLS leg offered to the kernel.
pub enum Handoff {
    /// Its keys are the kernel's: plaintext in and out.
    Kernel(Leg),
    /// It stays in rustls, for this reason.
    Userspace(Leg, String),
    /// Keys left rustls but the kernel refused them: the leg is lost.
    Lost(String),
}

/// Offers one TLS leg to the kernel right after its handshake, before any
/// application data was read (SMTP's legs: the dialogue then runs on the
/// kernel's plaintext).
pub async fn leg_to_kernel(leg: Leg, ktls_enabled: bool) -> Handoff {
    if let Some(why) = refusal(&[&leg], ktls_enabled) {
        return Handoff::Userspace(leg, why);
    }
    match to_splice_leg(leg).await {
        Ok(leg) => Handoff::Kernel(Leg::Kernel(super::KernelTls::new(leg))),
        Err(detail) => Handoff::Lost(detail),
    }
}

pub(super) async fn prepare(client: Leg, upstream: Leg, ktls_enabled: bool) -> Prepared {
    if client.is_tls() || upstream.is_tls() {
        let refusal = refusal(&[&client, &upstream], ktls_enabled);
        if refusal.is_some() {
            return Prepared::Userspace {
                client,
                upstream,
                reason: refusal,
            };
        }
    }
    let client = match to_splice_leg(client).await {
        Ok(leg) => leg,
        Err(detail) => {
            super::reset_on_close(upstream.tcp());
            return Prepared::Failed { detail };
        }
    };
    match to_splice_leg(upstream).await {
        Ok(upstream) => Prepared::Splice { client, upstream },
        Err(detail) => {
            super::reset_on_close(&client.tcp);
            Prepared::Failed { detail }
        }
    }
}

async fn to_splice_leg(leg: Leg) -> Result<SpliceLeg, String> {
    match leg {
        Leg::Plain(tcp) => Ok(SpliceLeg {
            tcp,
            ktls: false,
            leftover: Vec::new(),
            peer_closed: false,
            rekey: None,
        }),
        Leg::TlsServer(s) => {
            let (io, conn) = s.into_inner();
            hand_to_kernel(io, conn.into()).await
        }
        Leg::TlsClient(s) => {
            let (io, conn) = s.into_inner();
            hand_to_kernel(io, conn.into()).await
        }
        Leg::Kernel(k) => Ok(k.into_splice_leg()),
        Leg::Soft(_) => Err("a leg whose records this process protects cannot be spliced".into()),
    }
}

/// Completes whatever rustls has half-seen or still has to send, keeps the
/// plaintext it already decrypted, and takes its keys: what the kernel, or
/// this process's own record layer, continues from.
async fn hand_over(io: RecordIo, mut conn: rustls::Connection) -> Result<Handover, String> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| format!("taking TLS from rustls: {what}: {e}");
    let capture = io.secret_capture();
    let (mut tcp, partial) = io.into_parts().await.map_err(|e| fail("reading", &e))?;
    if let Some(rest) = partial {
        let mut rest = &rest[..];
        while !rest.is_empty() {
            conn.read_tls(&mut rest)
                .map_err(|e| fail("buffering", &e))?;
            conn.process_new_packets()
                .map_err(|e| fail("processing", &e))?;
        }
    }
    // TLS 1.3 session tickets, or the last handshake flight: out before the
    // record sequence leaves rustls.
    let mut pending = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut pending)
            .map_err(|e| fail("flushing", &e))?;
    }
    tcp.write_all(&pending)
        .await
        .map_err(|e| fail("flushing", &e))?;
    let mut leftover = Vec::new();
    let mut peer_closed = false;
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => {
                peer_closed = true;
                break;
            }
            Ok(n) => leftover.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                peer_closed = true;
                break;
            }
            Err(e) => return Err(fail("draining", &e)),
        }
    }
    let version = conn
        .protocol_version()
        .ok_or_else(|| fail("version", &"none negotiated"))?;
    let role = match &conn {
        rustls::Connection::Client(_) => ktls::Role::Client,
        rustls::Connection::Server(_) => ktls::Role::Server,
    };
    let rekey = capture
        .zip(conn.negotiated_cipher_suite())
        .and_then(|(capture, suite)| capture.take(suite, role));
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| fail("extracting keys", &e))?;
    Ok(Handover {
        tcp,
        version,
        secrets,
        leftover,
        peer_closed,
        rekey,
    })
}

/// Hands a leg's keys to the kernel: plaintext in and out of the socket.
async fn hand_to_kernel(io: RecordIo, conn: rustls::Connection) -> Result<SpliceLeg, String> {
    let h = hand_over(io, conn).await?;
    let version = KtlsVersion::of(h.version).ok_or_else(|| {
        format!(
            "handing TLS to the kernel: {:?} is not TLS 1.2 or 1.3",
            h.version
        )
    })?;
    ktls::install(h.tcp.as_raw_fd(), version, h.secrets)
        .map_err(|e| format!("handing TLS to the kernel: installing: {e}"))?;
    Ok(SpliceLeg {
        tcp: h.tcp,
        ktls: true,
        leftover: h.leftover,
        peer_closed: h.peer_closed,
        // A kernel that cannot rekey refuses a second key (EBUSY): there a
        // KeyUpdate ends the session instead, and the relay sends none.
        rekey: h.rekey.filter(|_| ktls::probe().rekey),
    })
}

/// Whether the record layer can carry `leg`: a suite it has, and for TLS
/// 1.3 the traffic secrets KeyUpdates derive from.
fn soft_takes(leg: &Leg) -> bool {
    let (common, captured): (&rustls::CommonState, bool) = match leg {
        Leg::TlsServer(s) => (s.get_ref().1, s.get_ref().0.secret_capture().is_some()),
        Leg::TlsClient(s) => (s.get_ref().1, s.get_ref().0.secret_capture().is_some()),
        _ => return false,
    };
    let suite = common.negotiated_cipher_suite().map(|s| s.suite());
    let tls13 = common.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    suite.and_then(KtlsCipher::of).is_some() && (captured || !tls13)
}

/// A TLS leg the kernel did not take, its records protected from here on
/// by this process's record layer instead of rustls's buffers. A leg
/// whose suite that layer lacks stays in rustls; a failed handover loses
/// the leg (its keys may have left rustls).
pub(super) async fn to_soft(mut leg: Leg) -> Result<Leg, String> {
    if !soft_takes(&leg) {
        leg.stay_in_userspace();
        return Ok(leg);
    }
    let (io, conn): (RecordIo, rustls::Connection) = match leg {
        Leg::TlsServer(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
        Leg::TlsClient(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
        other => {
            leg = other;
            leg.stay_in_userspace();
            return Ok(leg);
        }
    };
    let h = hand_over(io, conn).await?;
    SoftTls::new(h)
        .map(|soft| Leg::Soft(Box::new(soft)))
        .map_err(|e| format!("record layer: {e}"))
}
