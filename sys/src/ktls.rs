//! Kernel TLS: probing what the running kernel supports, installing a rustls
//! session's keys on a socket (TLS_TX and TLS_RX), and the control records
//! (alerts, post-handshake messages) that bypass splice.
//!
//! After [`install`], the kernel encrypts what is written to the socket and
//! decrypts what is read from it, so bodies can be spliced without ever
//! entering userspace. See Documentation/networking/tls.rst.

use std::io;
use std::mem::size_of;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};
use serde::Serialize;

mod rekey;
pub use rekey::{
    post_handshake, PostHandshake, Rekey, Role, SecretCapture, TrafficKeys,
    KEY_UPDATE_NOT_REQUESTED,
};

const SOL_TCP: libc::c_int = 6;
const TCP_ULP: libc::c_int = 31;
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// TLS record content types the kernel reports for non-data records.
pub const RECORD_ALERT: u8 = 21;
pub const RECORD_HANDSHAKE: u8 = 22;
pub const RECORD_APPLICATION_DATA: u8 = 23;

/// A cipher the kernel can take over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KtlsCipher {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl KtlsCipher {
    pub const ALL: [KtlsCipher; 3] = [
        KtlsCipher::Aes128Gcm,
        KtlsCipher::Aes256Gcm,
        KtlsCipher::Chacha20Poly1305,
    ];

    fn key_len(self) -> usize {
        match self {
            KtlsCipher::Aes128Gcm => 16,
            KtlsCipher::Aes256Gcm | KtlsCipher::Chacha20Poly1305 => 32,
        }
    }

    /// The kTLS equivalent of a rustls suite, if there is one.
    pub fn of(suite: rustls::CipherSuite) -> Option<KtlsCipher> {
        use rustls::CipherSuite::*;
        match suite {
            TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => Some(KtlsCipher::Aes128Gcm),
            TLS13_AES_256_GCM_SHA384
            | TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
            | TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => Some(KtlsCipher::Aes256Gcm),
            TLS13_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => Some(KtlsCipher::Chacha20Poly1305),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KtlsVersion {
    Tls12,
    Tls13,
}

impl KtlsVersion {
    pub fn of(v: ProtocolVersion) -> Option<KtlsVersion> {
        match v {
            ProtocolVersion::TLSv1_2 => Some(KtlsVersion::Tls12),
            ProtocolVersion::TLSv1_3 => Some(KtlsVersion::Tls13),
            _ => None,
        }
    }

    fn wire(self) -> u16 {
        match self {
            KtlsVersion::Tls12 => TLS_1_2_VERSION,
            KtlsVersion::Tls13 => TLS_1_3_VERSION,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    #[error("kernel lacks TLS ULP: setsockopt(TCP_ULP, \"tls\"): {0}")]
    NoUlp(io::Error),
    #[error("kernel TLS does not support {version:?} with {cipher:?}")]
    Unsupported {
        version: KtlsVersion,
        cipher: KtlsCipher,
    },
    #[error("setsockopt(TCP_ULP, \"tls\"): {0}")]
    Attach(io::Error),
    #[error("no kernel TLS equivalent for {0}")]
    UnknownSuite(String),
    #[error("extracting the session keys from rustls: {0}")]
    Extract(rustls::Error),
    #[error("setsockopt(SOL_TLS, {direction}): {source}")]
    Install {
        direction: &'static str,
        source: io::Error,
    },
}

/// What the running kernel can do, found once at start.
#[derive(Clone, Debug, Serialize)]
pub struct KtlsSupport {
    /// `None` when the TLS ULP is available; else why not.
    pub unavailable: Option<String>,
    /// (version, cipher, TX and RX both accepted).
    pub combinations: Vec<(KtlsVersion, KtlsCipher, bool)>,
    /// TLS 1.3 keys can be replaced on a live socket (Linux 6.14+), so a
    /// peer's KeyUpdate is followed instead of ending the session.
    pub rekey: bool,
}

impl KtlsSupport {
    pub fn supports(&self, version: KtlsVersion, cipher: KtlsCipher) -> bool {
        self.unavailable.is_none()
            && self
                .combinations
                .iter()
                .any(|&(v, c, ok)| v == version && c == cipher && ok)
    }

    /// One line for the startup log and `tlsrelay check`.
    pub fn summary(&self) -> String {
        match &self.unavailable {
            Some(why) => format!("kernel TLS unavailable ({why}); TLS legs use userspace rustls"),
            None => {
                let ok: Vec<String> = self
                    .combinations
                    .iter()
                    .filter(|c| c.2)
                    .map(|(v, c, _)| format!("{v:?}/{c:?}"))
                    .collect();
                let missing: Vec<String> = self
                    .combinations
                    .iter()
                    .filter(|c| !c.2)
                    .map(|(v, c, _)| format!("{v:?}/{c:?}"))
                    .collect();
                let mut s = format!("kernel TLS available for {}", ok.join(", "));
                if !missing.is_empty() {
                    s += &format!("; not for {} (userspace rustls there)", missing.join(", "));
                }
                s += if self.rekey {
                    "; follows TLS 1.3 KeyUpdates"
                } else {
                    "; cannot rekey: a TLS 1.3 KeyUpdate ends the session"
                };
                s
            }
        }
    }
}

/// Probes the kernel once per process: the TLS ULP, then each version and
/// cipher on a throwaway loopback connection.
pub fn probe() -> &'static KtlsSupport {
    static SUPPORT: OnceLock<KtlsSupport> = OnceLock::new();
    SUPPORT.get_or_init(|| match probe_now() {
        Ok(support) => support,
        Err(e) => KtlsSupport {
            unavailable: Some(e.to_string()),
            combinations: Vec::new(),
            rekey: false,
        },
    })
}

fn loopback_pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

fn probe_now() -> Result<KtlsSupport, KtlsError> {
    let (client, _server) = loopback_pair().map_err(KtlsError::NoUlp)?;
    set_ulp(client.as_raw_fd()).map_err(KtlsError::NoUlp)?;
    let mut combinations = Vec::new();
    for version in [KtlsVersion::Tls12, KtlsVersion::Tls13] {
        for cipher in KtlsCipher::ALL {
            let ok = loopback_pair().is_ok_and(|(c, _s)| {
                let info = CryptoInfo::zeroed(version, cipher);
                set_ulp(c.as_raw_fd()).is_ok()
                    && set_crypto(c.as_raw_fd(), TLS_TX, &info).is_ok()
                    && set_crypto(c.as_raw_fd(), TLS_RX, &info).is_ok()
            });
            combinations.push((version, cipher, ok));
        }
    }
    // A second TLS_TX on a TLS 1.3 socket: a rekey (EBUSY before 6.14).
    let rekey = loopback_pair().is_ok_and(|(c, _s)| {
        let info = CryptoInfo::zeroed(KtlsVersion::Tls13, KtlsCipher::Aes128Gcm);
        set_ulp(c.as_raw_fd()).is_ok()
            && set_crypto(c.as_raw_fd(), TLS_TX, &info).is_ok()
            && set_crypto(c.as_raw_fd(), TLS_TX, &info).is_ok()
    });
    Ok(KtlsSupport {
        unavailable: None,
        combinations,
        rekey,
    })
}

fn set_ulp(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: fd is a live socket; the option value is a valid buffer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_TCP,
            TCP_ULP,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct tls12_crypto_info_*` from linux/tls.h, all variants in one
/// layout-compatible shape: the header, then the cipher's fields.
#[repr(C)]
struct CryptoInfo {
    version: u16,
    cipher_type: u16,
    /// iv | key | salt | rec_seq, packed as the cipher's struct lays them out.
    fields: [u8; 52],
    len: usize,
}

impl CryptoInfo {
    fn build(
        version: KtlsVersion,
        cipher: KtlsCipher,
        key: &[u8],
        iv: &[u8],
        seq: u64,
    ) -> CryptoInfo {
        let mut fields = [0u8; 52];
        let seq = seq.to_be_bytes();
        // AES-GCM: iv[8] key[..] salt[4] rec_seq[8]; the 12-byte rustls IV is
        // salt (first 4) + iv (last 8). ChaCha20: iv[12] key[32] rec_seq[8].
        let (cipher_type, parts): (u16, [&[u8]; 4]) = match cipher {
            KtlsCipher::Aes128Gcm => (TLS_CIPHER_AES_GCM_128, [&iv[4..12], key, &iv[..4], &seq]),
            KtlsCipher::Aes256Gcm => (TLS_CIPHER_AES_GCM_256, [&iv[4..12], key, &iv[..4], &seq]),
            KtlsCipher::Chacha20Poly1305 => (TLS_CIPHER_CHACHA20_POLY1305, [iv, key, &[], &seq]),
        };
        let mut at = 0;
        for part in parts {
            fields[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        CryptoInfo {
            version: version.wire(),
            cipher_type,
            fields,
            len: 4 + at,
        }
    }

    fn zeroed(version: KtlsVersion, cipher: KtlsCipher) -> CryptoInfo {
        CryptoInfo::build(version, cipher, &[0; 32][..cipher.key_len()], &[0; 12], 0)
    }

    fn from_secrets(
        version: KtlsVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Option<CryptoInfo> {
        Some(match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => CryptoInfo::build(
                version,
                KtlsCipher::Aes128Gcm,
                key.as_ref(),
                iv.as_ref(),
                seq,
            ),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => CryptoInfo::build(
                version,
                KtlsCipher::Aes256Gcm,
                key.as_ref(),
                iv.as_ref(),
                seq,
            ),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => CryptoInfo::build(
                version,
                KtlsCipher::Chacha20Poly1305,
                key.as_ref(),
                iv.as_ref(),
                seq,
            ),
            _ => return None,
        })
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        // Key material: do not leave it on the stack.
        for b in self.fields.iter_mut() {
            // SAFETY: writing a valid u8 through a valid reference.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

fn set_crypto(fd: RawFd, direction: libc::c_int, info: &CryptoInfo) -> io::Result<()> {
    debug_assert!(info.len <= 4 + 52 && size_of::<u16>() * 2 == 4);
    // SAFETY: the first `info.len` bytes of CryptoInfo are the kernel's
    // struct tls12_crypto_info_* for `info.cipher_type` (repr(C), no padding
    // before `fields`).
    let rc = unsafe {
        libc::setsockopt(
            fd,
            SOL_TLS,
            direction,
            (info as *const CryptoInfo).cast(),
            info.len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attaches the TLS ULP, the step that can fail for reasons of the moment
/// (the kernel only takes established sockets: a peer that already sent its
/// FIN makes it ENOTCONN). Done before the keys leave rustls, so a refusal
/// still leaves the session to userspace rustls; until keys are installed
/// the socket behaves as plain TCP.
pub fn attach_ulp(fd: RawFd) -> Result<(), KtlsError> {
    set_ulp(fd).map_err(KtlsError::Attach)
}

/// Hands a finished rustls session's keys to the kernel (after
/// [`attach_ulp`]): the transmit and receive keys with their record
/// sequence numbers.
pub fn install(
    fd: RawFd,
    version: KtlsVersion,
    secrets: ExtractedSecrets,
) -> Result<(), KtlsError> {
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    let unknown = || KtlsError::UnknownSuite("extracted secrets".into());
    let tx = CryptoInfo::from_secrets(version, tx_seq, &tx).ok_or_else(unknown)?;
    let rx = CryptoInfo::from_secrets(version, rx_seq, &rx).ok_or_else(unknown)?;
    set_crypto(fd, TLS_TX, &tx).map_err(|source| KtlsError::Install {
        direction: "TLS_TX",
        source,
    })?;
    set_crypto(fd, TLS_RX, &rx).map_err(|source| KtlsError::Install {
        direction: "TLS_RX",
        source,
    })
}

/// Reads one record from a kTLS RX socket with its content type (for the
/// records splice refuses: alerts and post-handshake messages).
pub fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8]; // aligned cmsg space
                                 // SAFETY: msghdr is plain data; zeroed is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 8]>() as _;
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = RECORD_APPLICATION_DATA;
    // SAFETY: walking the control buffer the kernel filled, with the libc
    // CMSG macros and the lengths it reported.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((record_type, n as usize))
}

/// Sends a close_notify alert on a kTLS TX socket, the last record before
/// the FIN; `WouldBlock` until the socket polls writable.
///
/// The kernel takes a record even when TCP has room for only part of what
/// it holds: the rest stays in kTLS's own queue, sent when TCP drains, and
/// `sendmsg` still succeeds. A FIN (shutdown) then goes out ahead of it, and
/// close frees it: the peer sees a truncation. Writable means a third of the
/// send buffer is free, room for this record and the one or two kTLS can
/// still hold (it stops taking data while TCP is full), so all of them
/// reach TCP before the caller's FIN.
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call; a zero timeout.
    if unsafe { libc::poll(&mut pfd, 1, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if pfd.revents == 0 {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    // Writable, or failed: the send says which.
    send_record(fd, RECORD_ALERT, &[1, 0]) // warning(1), close_notify(0)
}

/// Sends a fatal internal_error alert on a kTLS TX socket: the session
/// ended for a reason on the relay's side or the other leg's, and the peer
/// must not take what it got for the whole stream.
pub fn send_fatal_alert(fd: RawFd) -> io::Result<()> {
    send_record(fd, RECORD_ALERT, &[2, 80]) // fatal(2), internal_error(80)
}

fn send_record(fd: RawFd, record_type: u8, payload: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: as in recv_record; we build one cmsg in an aligned buffer
    // large enough for CMSG_SPACE(1).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = record_type;
        if libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_layouts_match_linux_tls_h() {
        // struct tls12_crypto_info_aes_gcm_128: 4 + 8 + 16 + 4 + 8 = 40
        let iv: Vec<u8> = (0..12).collect();
        let key = [0xAA; 16];
        let info = CryptoInfo::build(KtlsVersion::Tls13, KtlsCipher::Aes128Gcm, &key, &iv, 0x0102);
        assert_eq!(info.len, 40);
        assert_eq!(info.version, 0x0304);
        assert_eq!(info.cipher_type, 51);
        assert_eq!(&info.fields[..8], &iv[4..]); // explicit iv
        assert_eq!(&info.fields[8..24], &key);
        assert_eq!(&info.fields[24..28], &iv[..4]); // salt
        assert_eq!(&info.fields[28..36], &[0, 0, 0, 0, 0, 0, 1, 2]); // rec_seq, big-endian
                                                                     // aes_gcm_256: 4 + 8 + 32 + 4 + 8 = 56; chacha20: 4 + 12 + 32 + 0 + 8 = 56
        let key = [0xBB; 32];
        assert_eq!(
            CryptoInfo::build(KtlsVersion::Tls12, KtlsCipher::Aes256Gcm, &key, &iv, 0).len,
            56
        );
        let chacha = CryptoInfo::build(
            KtlsVersion::Tls12,
            KtlsCipher::Chacha20Poly1305,
            &key,
            &iv,
            7,
        );
        assert_eq!(chacha.len, 56);
        assert_eq!(&chacha.fields[..12], &iv[..]);
        assert_eq!(chacha.fields[51], 7);
    }

    #[test]
    fn suites_map_to_kernel_ciphers() {
        use rustls::CipherSuite::*;
        assert_eq!(
            KtlsCipher::of(TLS13_AES_256_GCM_SHA384),
            Some(KtlsCipher::Aes256Gcm)
        );
        assert_eq!(
            KtlsCipher::of(TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256),
            Some(KtlsCipher::Chacha20Poly1305)
        );
        assert_eq!(KtlsCipher::of(TLS13_AES_128_CCM_SHA256), None);
    }
}
