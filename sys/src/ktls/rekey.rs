//! TLS 1.3 KeyUpdate on a kernel TLS socket (RFC 8446 4.6.3, 7.2).
//!
//! Since Linux 6.14 a kTLS socket takes new keys while live: TLS_TX and
//! TLS_RX set again. The kernel pauses reading after a peer's KeyUpdate
//! until the next receive key is installed; sending is never paused, so
//! the KeyUpdate message goes out with the old key and the new key follows.
//! rustls's buffered connections hand over keys but not the traffic secrets
//! the next keys derive from, so the secrets are taken from rustls's key
//! log hook during the handshake ([`SecretCapture`]) and each update is
//! derived here.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustls::crypto::tls13::OkmBlock;
use rustls::{KeyLog, SupportedCipherSuite, Tls13CipherSuite};

use super::{send_record, set_crypto, CryptoInfo, KtlsCipher, KtlsVersion, RECORD_HANDSHAKE};
use super::{TLS_RX, TLS_TX};

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// The KeyUpdate message: handshake type 24, length 1,
/// update_not_requested (0).
pub const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

/// The largest record's plaintext.
const MAX_PLAINTEXT: usize = 16 * 1024;

/// How long sending our KeyUpdate may wait for room in a full send buffer
/// before the session is given up.
const SEND_WAIT: Duration = Duration::from_secs(10);

/// Which end of the handshake this relay leg was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// A rustls key log for one connection: keeps its two TLS 1.3 application
/// traffic secrets, logs nothing.
#[derive(Default)]
pub struct SecretCapture {
    client: Mutex<Option<OkmBlock>>,
    server: Mutex<Option<OkmBlock>>,
}

impl std::fmt::Debug for SecretCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretCapture")
    }
}

impl KeyLog for SecretCapture {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            CLIENT_SECRET => &self.client,
            SERVER_SECRET => &self.server,
            _ => return,
        };
        if secret.len() <= OkmBlock::MAX_LEN {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(OkmBlock::new(secret));
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}

impl SecretCapture {
    /// The secrets of a finished TLS 1.3 handshake, for the socket whose
    /// keys the kernel now holds; `None` for TLS 1.2 (no KeyUpdate there)
    /// or a suite the kernel cannot take.
    pub fn take(&self, suite: SupportedCipherSuite, role: Role) -> Option<Rekey> {
        let SupportedCipherSuite::Tls13(suite) = suite else {
            return None;
        };
        let cipher = KtlsCipher::of(suite.common.suite)?;
        let client = self.client.lock().ok()?.take()?;
        let server = self.server.lock().ok()?.take()?;
        let (tx, rx) = match role {
            Role::Client => (client, server),
            Role::Server => (server, client),
        };
        Some(Rekey {
            secrets: Box::new(Mutex::new(TrafficSecrets {
                suite,
                cipher,
                tx,
                rx,
                tx_records: 0,
                tx_record_limit: records_between_updates(suite),
            })),
            update_owed: AtomicBool::new(false),
        })
    }
}

struct TrafficSecrets {
    suite: &'static Tls13CipherSuite,
    cipher: KtlsCipher,
    tx: OkmBlock,
    rx: OkmBlock,
    /// Records sent under the current TX key (an upper bound: every write
    /// counted as whole records), and when to update it.
    tx_records: u64,
    tx_record_limit: u64,
}

/// How many records one key may protect before the relay updates it: the
/// suite's confidentiality limit (2^24 records for AES-GCM, RFC 9147
/// 4.5.3 / rustls; none for ChaCha20-Poly1305). The kTLS tests lower it with
/// TLSRELAY_REKEY_AFTER_RECORDS so updates happen within a test's bytes.
fn records_between_updates(suite: &Tls13CipherSuite) -> u64 {
    static OVERRIDE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    OVERRIDE
        .get_or_init(|| {
            std::env::var("TLSRELAY_REKEY_AFTER_RECORDS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(suite.common.confidentiality_limit)
}

impl TrafficSecrets {
    /// HKDF-Expand-Label(secret, label, "", len) (RFC 8446 7.1).
    fn expand_label(&self, secret: &OkmBlock, label: &[u8], out: &mut [u8]) {
        let expander = self.suite.hkdf_provider.expander_for_okm(secret);
        let len = (out.len() as u16).to_be_bytes();
        let label_len = [(b"tls13 ".len() + label.len()) as u8];
        expander
            .expand_slice(&[&len, &label_len, b"tls13 ", label, &[0]], out)
            .expect("key, IV and secret lengths are within HKDF's limit");
    }

    /// application_traffic_secret_N+1 (RFC 8446 7.2).
    fn next(&self, secret: &OkmBlock) -> OkmBlock {
        let mut out = [0u8; OkmBlock::MAX_LEN];
        let len = self.suite.common.hash_provider.output_len();
        self.expand_label(secret, b"traffic upd", &mut out[..len]);
        let next = OkmBlock::new(&out[..len]);
        out.fill(0);
        next
    }

    /// The kernel's view of a secret's key and IV, record sequence 0.
    fn crypto_info(&self, secret: &OkmBlock) -> CryptoInfo {
        let mut key = [0u8; 32];
        let key = &mut key[..self.cipher.key_len()];
        let mut iv = [0u8; 12];
        self.expand_label(secret, b"key", key);
        self.expand_label(secret, b"iv", &mut iv);
        let info = CryptoInfo::build(KtlsVersion::Tls13, self.cipher, key, &iv, 0);
        key.fill(0);
        iv.fill(0);
        info
    }
}

/// A kernel TLS socket's TLS 1.3 traffic secrets, so it can follow and
/// make KeyUpdates. Shared by the two directions of a pump: the one
/// reading the socket follows the peer, the one writing it updates ours.
pub struct Rekey {
    /// Boxed: pumps move legs around by value.
    secrets: Box<Mutex<TrafficSecrets>>,
    /// The peer asked for our KeyUpdate: it goes out before our next
    /// application data (RFC 8446 4.6.3), one for however many requests
    /// came meanwhile. Answering each at once would send a storm's worth
    /// back to back, and rustls and BoringSSL end a session after 32
    /// KeyUpdates without data between them.
    update_owed: AtomicBool,
}

impl Rekey {
    /// The peer's KeyUpdate has been read from `fd`: its next key goes on
    /// RX; when it asked for ours, ours is owed.
    pub fn follow_peer(&self, fd: RawFd, update_requested: bool) -> io::Result<()> {
        let mut s = self.lock();
        let next = s.next(&s.rx);
        set_crypto(fd, TLS_RX, &s.crypto_info(&next))?;
        s.rx = next;
        if update_requested {
            self.update_owed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Before application data is written to `fd`: the KeyUpdate the peer
    /// asked for, if one is owed.
    pub fn before_write(&self, fd: RawFd) -> io::Result<()> {
        // A load first: the common case is nothing owed, without a locked
        // instruction per write.
        if self.update_owed.load(Ordering::Relaxed)
            && self.update_owed.swap(false, Ordering::AcqRel)
        {
            update_tx(&mut self.lock(), fd)?;
        }
        Ok(())
    }

    /// Counts `bytes` written to `fd` (through the kernel's encryption)
    /// and sends our own KeyUpdate, not asking the peer for one, when the
    /// key has protected its share of records.
    pub fn wrote(&self, fd: RawFd, bytes: usize) -> io::Result<()> {
        let mut s = self.lock();
        s.tx_records += bytes.div_ceil(MAX_PLAINTEXT).max(1) as u64;
        if s.tx_records >= s.tx_record_limit {
            update_tx(&mut s, fd)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TrafficSecrets> {
        self.secrets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The key and IV of a traffic secret, for a record layer in this process
/// (a leg the kernel could not take follows KeyUpdates the same way).
pub struct TrafficKeys {
    key: [u8; 32],
    len: usize,
    pub iv: [u8; 12],
}

impl TrafficKeys {
    pub fn key(&self) -> &[u8] {
        &self.key[..self.len]
    }
}

impl Drop for TrafficKeys {
    fn drop(&mut self) {
        self.key.fill(0);
        self.iv.fill(0);
    }
}

impl TrafficSecrets {
    fn keys(&self, secret: &OkmBlock) -> TrafficKeys {
        let mut keys = TrafficKeys {
            key: [0; 32],
            len: self.cipher.key_len(),
            iv: [0; 12],
        };
        let len = keys.len;
        self.expand_label(secret, b"key", &mut keys.key[..len]);
        self.expand_label(secret, b"iv", &mut keys.iv);
        keys
    }
}

impl Rekey {
    /// The peer's KeyUpdate was read by a record layer in this process: the
    /// keys its next records use. When it asked for ours, ours is owed.
    pub fn next_rx_keys(&self, update_requested: bool) -> TrafficKeys {
        let mut s = self.lock();
        s.rx = s.next(&s.rx);
        if update_requested {
            self.update_owed.store(true, Ordering::Release);
        }
        s.keys(&s.rx)
    }

    /// Whether our KeyUpdate is owed before our next data; clears it.
    pub fn take_owed_update(&self) -> bool {
        self.update_owed.load(Ordering::Relaxed) && self.update_owed.swap(false, Ordering::AcqRel)
    }

    /// Counts `records` sealed under our key: whether it has protected its
    /// share and our KeyUpdate should go out.
    pub fn sealed(&self, records: u64) -> bool {
        let mut s = self.lock();
        s.tx_records += records;
        s.tx_records >= s.tx_record_limit
    }

    /// Our next keys, once our KeyUpdate was sealed under the current one.
    pub fn next_tx_keys(&self) -> TrafficKeys {
        let mut s = self.lock();
        s.tx = s.next(&s.tx);
        s.tx_records = 0;
        s.keys(&s.tx)
    }
}

fn update_tx(s: &mut TrafficSecrets, fd: RawFd) -> io::Result<()> {
    send_waiting(fd, RECORD_HANDSHAKE, &KEY_UPDATE_NOT_REQUESTED)?;
    let next = s.next(&s.tx);
    set_crypto(fd, TLS_TX, &s.crypto_info(&next))?;
    s.tx = next;
    s.tx_records = 0;
    Ok(())
}

/// Sends a record on a non-blocking socket, waiting (a bounded time) for
/// room: a KeyUpdate cannot be put off to a readiness callback, because the
/// key change must follow it directly.
fn send_waiting(fd: RawFd, record_type: u8, payload: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + SEND_WAIT;
    loop {
        match send_record(fd, record_type, payload) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no room to send a TLS KeyUpdate",
                    ));
                }
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for at most `left`.
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            }
            other => return other,
        }
    }
}

/// What a post-handshake handshake record holds for the relay.
#[derive(Debug, PartialEq, Eq)]
pub enum PostHandshake {
    /// Only session tickets: nothing to do.
    Tickets,
    /// Ends with a KeyUpdate (it must be a record's last message).
    KeyUpdate { update_requested: bool },
}

/// Parses the handshake messages of one post-handshake record.
pub fn post_handshake(mut body: &[u8]) -> io::Result<PostHandshake> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    if body.is_empty() {
        return Err(bad("empty handshake record"));
    }
    while let [kind, a, b, c, rest @ ..] = body {
        let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
        if rest.len() < len {
            return Err(bad("handshake message cut at the record's end"));
        }
        let (message, after) = rest.split_at(len);
        match (kind, message) {
            (4, _) => {} // NewSessionTicket: only useful for resuming later
            (24, [request @ (0 | 1)]) if after.is_empty() => {
                return Ok(PostHandshake::KeyUpdate {
                    update_requested: *request == 1,
                })
            }
            (24, [0 | 1]) => return Err(bad("KeyUpdate not at the end of its record")),
            (24, _) => return Err(bad("malformed KeyUpdate")),
            (kind, _) => {
                return Err(bad(&format!(
                    "unexpected handshake message {kind} after the handshake"
                )))
            }
        }
        body = after;
    }
    if body.is_empty() {
        Ok(PostHandshake::Tickets)
    } else {
        Err(bad("handshake message header cut at the record's end"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_handshake_records() {
        assert_eq!(
            post_handshake(&[4, 0, 0, 2, 9, 9]).unwrap(),
            PostHandshake::Tickets
        );
        assert_eq!(
            post_handshake(&[4, 0, 0, 1, 9, 24, 0, 0, 1, 1]).unwrap(),
            PostHandshake::KeyUpdate {
                update_requested: true
            }
        );
        assert_eq!(
            post_handshake(&KEY_UPDATE_NOT_REQUESTED).unwrap(),
            PostHandshake::KeyUpdate {
                update_requested: false
            }
        );
        for bad in [
            &[][..],
            &[24, 0, 0, 1, 0, 4, 0, 0, 0],
            &[24, 0, 0, 1, 2],
            &[24, 0, 0, 2, 0, 0],
            &[4, 0, 0, 9, 1],
            &[4, 0],
            &[20, 0, 0, 0],
        ] {
            assert!(post_handshake(bad).is_err(), "{bad:?}");
        }
    }

    /// RFC 8448 3 (simple 1-RTT handshake): the server's application
    /// traffic secret and the key and IV derived from it.
    #[test]
    fn derivation_matches_rfc_8448() {
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        let SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            unreachable!()
        };
        let s = TrafficSecrets {
            suite,
            cipher: KtlsCipher::Aes128Gcm,
            tx: OkmBlock::new(&hex(
                "a1 1a f9 f0 55 31 f8 56 ad 47 11 6b 45 a9 50 32 82 04 b4 f4
                 4b fb 6b 3a 4b 4f 1f 3f cb 63 16 43",
            )),
            rx: OkmBlock::new(&[0; 32]),
            tx_records: 0,
            tx_record_limit: 1,
        };
        let info = s.crypto_info(&s.tx);
        // server_application key 9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56,
        // iv cf 78 2b 88 dd 83 54 9a ad f1 e9 84: the kernel's layout is
        // iv[4..12] | key | iv[..4] | seq.
        assert_eq!(&info.fields[..8], &hex("dd 83 54 9a ad f1 e9 84")[..]);
        assert_eq!(
            &info.fields[8..24],
            &hex("9f 02 28 3b 6c 9c 07 ef c2 6b b9 f2 ac 92 e3 56")[..]
        );
        assert_eq!(&info.fields[24..28], &hex("cf 78 2b 88")[..]);
        // The next secret derives with the same expansion ("traffic upd"):
        // the kTLS VM tests check it against rustls and OpenSSL peers.
        assert_ne!(s.next(&s.tx).as_ref(), s.tx.as_ref());
    }
}
