//! TLS record protection after the handshake, on the keys rustls hands over
//! (the same keys kernel TLS takes): a record is opened in place in the
//! buffer it was read into, and sealed straight into the buffer it is sent
//! from. Sans-IO: bytes in, bytes and content types out.
//!
//! Why not rustls's own record layer once the handshake is done: rustls
//! reads 4 KiB at a time into its deframer, copies each decrypted record
//! into a fresh `Vec`, and the reader copies it out again; on a host
//! without kernel TLS that was the relay's largest cost per GB after the
//! socket calls and the AES itself.

use std::ops::Range;

use aws_lc_rs::aead::{
    self, Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// A record header: type, legacy version, length.
pub const HEADER: usize = 5;
/// The largest plaintext a record may hold (RFC 8446 5.1, RFC 5246 6.2.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// The largest record payload a peer may send (plaintext plus expansion,
/// RFC 8446 5.2: 2^14 + 256).
pub const MAX_PAYLOAD: usize = MAX_PLAINTEXT + 256;
/// The largest whole record.
pub const MAX_RECORD: usize = HEADER + MAX_PAYLOAD;

const TAG: usize = 16;
/// TLS 1.2 AES-GCM's explicit nonce, sent before each record's ciphertext.
const EXPLICIT: usize = 8;

pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a TLS record (type {0}, version {1:#06x})")]
    NotARecord(u8, u16),
    #[error("record of {0} bytes is over the limit")]
    Overflow(usize),
    #[error("record failed authentication (bad_record_mac)")]
    BadMac,
    #[error("record holds no content type")]
    NoContentType,
    #[error("cipher suite {0:?} has no record layer here")]
    Unsupported(String),
    #[error("record sequence number exhausted")]
    SequenceExhausted,
}

/// Which record format the keys protect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Tls13,
    /// TLS 1.2 AES-GCM: an explicit 8-byte nonce per record.
    Tls12Gcm,
    /// TLS 1.2 ChaCha20-Poly1305: the nonce is the IV and the sequence.
    Tls12Chacha,
}

/// One direction's key, IV and record sequence.
struct Keys {
    format: Format,
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new(
        version: ProtocolVersion,
        (seq, secrets): (u64, ConnectionTrafficSecrets),
    ) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => {
                return Err(RecordError::Unsupported(
                    "an AEAD other than AES-GCM or ChaCha20".into(),
                ))
            }
        };
        let format = match version {
            ProtocolVersion::TLSv1_3 => Format::Tls13,
            ProtocolVersion::TLSv1_2 if alg == &CHACHA20_POLY1305 => Format::Tls12Chacha,
            ProtocolVersion::TLSv1_2 => Format::Tls12Gcm,
            other => return Err(RecordError::Unsupported(format!("{other:?}"))),
        };
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::Unsupported("IV length".into()))?;
        Ok(Keys {
            format,
            key: less_safe_key(alg, key.as_ref())?,
            iv,
            seq,
        })
    }

    /// The nonce for the current sequence number: the IV XOR the sequence
    /// (RFC 8446 5.3; RFC 7905; for AES-GCM in TLS 1.2 the salt and the
    /// explicit part rustls derived, which is what goes on the wire).
    fn nonce(&self) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn next_seq(&mut self) -> Result<u64, RecordError> {
        let seq = self.seq;
        self.seq = seq.checked_add(1).ok_or(RecordError::SequenceExhausted)?;
        Ok(seq)
    }

    /// New traffic keys (a TLS 1.3 KeyUpdate): the sequence starts again.
    fn rekey(&mut self, key: &[u8], iv: [u8; 12]) -> Result<(), RecordError> {
        self.key = less_safe_key(self.key.algorithm(), key)?;
        self.iv = iv;
        self.seq = 0;
        Ok(())
    }
}

fn less_safe_key(alg: &'static aead::Algorithm, key: &[u8]) -> Result<LessSafeKey, RecordError> {
    UnboundKey::new(alg, key)
        .map(LessSafeKey::new)
        .map_err(|_| RecordError::Unsupported("key length".into()))
}

/// TLS 1.2's additional data: sequence, type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&[3, 3]);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// The length of the whole record whose header starts `bytes`, once five
/// bytes are there; what a record layer may receive is checked here.
pub fn record_len(bytes: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(header) = bytes.get(..HEADER) else {
        return Ok(None);
    };
    let version = u16::from_be_bytes([header[1], header[2]]);
    if !(20..=24).contains(&header[0]) || header[1] != 3 {
        return Err(RecordError::NotARecord(header[0], version));
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > MAX_PAYLOAD + EXPLICIT {
        return Err(RecordError::Overflow(len));
    }
    Ok(Some(HEADER + len))
}

/// Opens the records a peer sends.
pub struct Opener {
    keys: Keys,
}

impl Opener {
    pub fn new(
        version: ProtocolVersion,
        rx: (u64, ConnectionTrafficSecrets),
    ) -> Result<Opener, RecordError> {
        Ok(Opener {
            keys: Keys::new(version, rx)?,
        })
    }

    /// Opens one whole record (`record_len` bytes, header first) in place:
    /// its content type, and where its plaintext now is within `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, Range<usize>), RecordError> {
        let outer_type = record[0];
        let nonce = self.keys.nonce();
        let seq = self.keys.next_seq()?;
        let (header, payload) = record.split_at_mut(HEADER);
        let opened = match self.keys.format {
            Format::Tls13 => {
                if outer_type != CONTENT_APPLICATION_DATA {
                    return Err(RecordError::NotARecord(outer_type, 0x0303));
                }
                let nonce = Nonce::assume_unique_for_key(nonce);
                let plain = self
                    .keys
                    .key
                    .open_in_place(nonce, Aad::from(&header[..]), payload)
                    .map_err(|_| RecordError::BadMac)?;
                // The inner plaintext: content, its type, zero padding.
                let Some(end) = plain.iter().rposition(|&b| b != 0) else {
                    return Err(RecordError::NoContentType);
                };
                if end > MAX_PLAINTEXT {
                    return Err(RecordError::Overflow(end));
                }
                (plain[end], HEADER..HEADER + end)
            }
            Format::Tls12Gcm => {
                if payload.len() < EXPLICIT + TAG {
                    return Err(RecordError::BadMac);
                }
                let mut n = [0u8; 12];
                n[..4].copy_from_slice(&self.keys.iv[..4]);
                n[4..].copy_from_slice(&payload[..EXPLICIT]);
                let len = payload.len() - EXPLICIT - TAG;
                let aad = tls12_aad(seq, outer_type, len);
                self.keys
                    .key
                    .open_in_place(
                        Nonce::assume_unique_for_key(n),
                        Aad::from(aad),
                        &mut payload[EXPLICIT..],
                    )
                    .map_err(|_| RecordError::BadMac)?;
                let start = HEADER + EXPLICIT;
                (outer_type, start..start + len)
            }
            Format::Tls12Chacha => {
                if payload.len() < TAG {
                    return Err(RecordError::BadMac);
                }
                let len = payload.len() - TAG;
                let aad = tls12_aad(seq, outer_type, len);
                self.keys
                    .key
                    .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), payload)
                    .map_err(|_| RecordError::BadMac)?;
                (outer_type, HEADER..HEADER + len)
            }
        };
        if opened.1.len() > MAX_PLAINTEXT {
            return Err(RecordError::Overflow(opened.1.len()));
        }
        Ok(opened)
    }

    /// The peer's next traffic keys (after its KeyUpdate).
    pub fn rekey(&mut self, key: &[u8], iv: [u8; 12]) -> Result<(), RecordError> {
        self.keys.rekey(key, iv)
    }
}

/// Seals the records the relay sends.
pub struct Sealer {
    keys: Keys,
}

impl Sealer {
    pub fn new(
        version: ProtocolVersion,
        tx: (u64, ConnectionTrafficSecrets),
    ) -> Result<Sealer, RecordError> {
        Ok(Sealer {
            keys: Keys::new(version, tx)?,
        })
    }

    /// Appends one record of content type `typ` holding `plaintext` (at
    /// most [`MAX_PLAINTEXT`] bytes) to `out`.
    pub fn seal(
        &mut self,
        typ: u8,
        plaintext: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        debug_assert!(plaintext.len() <= MAX_PLAINTEXT);
        let nonce = self.keys.nonce();
        let seq = self.keys.next_seq()?;
        let start = out.len();
        let (outer_type, payload_len) = match self.keys.format {
            Format::Tls13 => (CONTENT_APPLICATION_DATA, plaintext.len() + 1 + TAG),
            Format::Tls12Gcm => (typ, EXPLICIT + plaintext.len() + TAG),
            Format::Tls12Chacha => (typ, plaintext.len() + TAG),
        };
        out.reserve(HEADER + payload_len);
        out.push(outer_type);
        out.extend_from_slice(&[3, 3]);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        let aad_tls12 = tls12_aad(seq, typ, plaintext.len());
        let (body, aad): (usize, &[u8]) = match self.keys.format {
            Format::Tls13 => {
                out.extend_from_slice(plaintext);
                out.push(typ);
                (start + HEADER, &[])
            }
            Format::Tls12Gcm => {
                out.extend_from_slice(&nonce[4..]);
                out.extend_from_slice(plaintext);
                (start + HEADER + EXPLICIT, &aad_tls12)
            }
            Format::Tls12Chacha => {
                out.extend_from_slice(plaintext);
                (start + HEADER, &aad_tls12)
            }
        };
        let header: [u8; HEADER] = out[start..start + HEADER]
            .try_into()
            .expect("five header bytes");
        let aad = match self.keys.format {
            Format::Tls13 => Aad::from(&header[..]),
            _ => Aad::from(aad),
        };
        let tag = self
            .keys
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, &mut out[body..])
            .map_err(|_| RecordError::Unsupported("sealing".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Our next traffic keys (after our KeyUpdate went out).
    pub fn rekey(&mut self, key: &[u8], iv: [u8; 12]) -> Result<(), RecordError> {
        self.keys.rekey(key, iv)
    }
}

#[cfg(test)]
mod tests {
    //! Against rustls itself: an in-memory handshake per version and
    //! suite, its keys extracted on both ends, then records sealed by
    //! rustls opened here and records sealed here read by rustls.

    use super::*;
    use rustls::crypto::aws_lc_rs::cipher_suite;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::{ClientConnection, ServerConnection, SupportedCipherSuite};
    use std::io::{Read, Write};
    use std::sync::Arc;

    fn configs(
        suite: SupportedCipherSuite,
    ) -> (Arc<rustls::ClientConfig>, Arc<rustls::ServerConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["records.test".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::aws_lc_rs::default_provider()
        });
        let version = match suite {
            SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
            SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        server.send_tls13_tickets = 0;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(client), Arc::new(server))
    }

    fn shuttle(from: &mut dyn FnMut(&mut Vec<u8>), to: &mut dyn FnMut(&[u8])) {
        let mut bytes = Vec::new();
        from(&mut bytes);
        if !bytes.is_empty() {
            to(&bytes);
        }
    }

    /// A finished handshake in memory.
    fn handshake(suite: SupportedCipherSuite) -> (ClientConnection, ServerConnection) {
        let (cc, sc) = configs(suite);
        let mut client =
            ClientConnection::new(cc, ServerName::try_from("records.test").unwrap()).unwrap();
        let mut server = ServerConnection::new(sc).unwrap();
        for _ in 0..10 {
            shuttle(
                &mut |out| {
                    while client.wants_write() {
                        client.write_tls(out).unwrap();
                    }
                },
                &mut |mut bytes| {
                    server.read_tls(&mut bytes).unwrap();
                    server.process_new_packets().unwrap();
                },
            );
            shuttle(
                &mut |out| {
                    while server.wants_write() {
                        server.write_tls(out).unwrap();
                    }
                },
                &mut |mut bytes| {
                    client.read_tls(&mut bytes).unwrap();
                    client.process_new_packets().unwrap();
                },
            );
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        (client, server)
    }

    fn suites() -> Vec<SupportedCipherSuite> {
        vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
    }

    /// Opens every record of `wire`; the application data, concatenated.
    fn open_all(opener: &mut Opener, mut wire: Vec<u8>) -> Result<Vec<u8>, RecordError> {
        let mut plain = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let len = record_len(&wire[at..])?.expect("a whole header");
            let record = &mut wire[at..at + len];
            let (typ, range) = opener.open(record)?;
            assert_eq!(typ, CONTENT_APPLICATION_DATA);
            plain.extend_from_slice(&record[range]);
            at += len;
        }
        Ok(plain)
    }

    #[test]
    fn records_interoperate_with_rustls_both_ways_for_every_suite() {
        for suite in suites() {
            let (mut client, server) = handshake(suite);
            let version = client.protocol_version().unwrap();
            // rustls (client) seals, this layer (taking the server's keys)
            // opens; then this layer seals and rustls opens.
            let message: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
            client.writer().write_all(&message).unwrap();
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let secrets = server.dangerous_extract_secrets().unwrap();
            let mut opener = Opener::new(version, secrets.rx).unwrap();
            let mut sealer = Sealer::new(version, secrets.tx).unwrap();
            assert_eq!(open_all(&mut opener, wire).unwrap(), message, "{suite:?}");

            let mut wire = Vec::new();
            for chunk in message.chunks(MAX_PLAINTEXT) {
                sealer
                    .seal(CONTENT_APPLICATION_DATA, chunk, &mut wire)
                    .unwrap();
            }
            let mut got = Vec::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                client.process_new_packets().unwrap();
                let mut buf = [0u8; 65536];
                while let Ok(n) = client.reader().read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
            }
            assert_eq!(got, message, "{suite:?}");
        }
    }

    #[test]
    fn a_tampered_record_is_bad_record_mac_and_a_replay_fails_too() {
        for suite in suites() {
            let (mut client, server) = handshake(suite);
            let version = client.protocol_version().unwrap();
            client.writer().write_all(b"hello").unwrap();
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let secrets = server.dangerous_extract_secrets().unwrap();
            let mut opener = Opener::new(version, secrets.rx).unwrap();
            let mut tampered = wire.clone();
            let last = tampered.len() - 1;
            tampered[last] ^= 1;
            assert_eq!(
                open_all(&mut opener, tampered),
                Err(RecordError::BadMac),
                "{suite:?}"
            );
            // The sequence moved on: the genuine record is now out of turn.
            assert_eq!(open_all(&mut opener, wire), Err(RecordError::BadMac));
        }
    }

    #[test]
    fn headers_are_checked_before_any_crypto() {
        assert_eq!(record_len(&[23, 3]), Ok(None));
        assert_eq!(record_len(&[23, 3, 3, 0, 20]), Ok(Some(25)));
        assert_eq!(
            record_len(b"GET / HTTP/1.1"),
            Err(RecordError::NotARecord(b'G', 0x4554))
        );
        assert_eq!(
            record_len(&[23, 3, 3, 0xff, 0xff]),
            Err(RecordError::Overflow(0xffff))
        );
    }

    #[test]
    fn tls13_padding_and_inner_type_are_read_from_the_end() {
        let (client, server) = handshake(cipher_suite::TLS13_AES_128_GCM_SHA256);
        let mut sealer = Sealer::new(
            ProtocolVersion::TLSv1_3,
            server.dangerous_extract_secrets().unwrap().tx,
        )
        .unwrap();
        let mut opener = Opener::new(
            ProtocolVersion::TLSv1_3,
            client.dangerous_extract_secrets().unwrap().rx,
        )
        .unwrap();
        // A KeyUpdate: the outer type hides the inner one.
        let mut wire = Vec::new();
        sealer
            .seal(CONTENT_HANDSHAKE, &[24, 0, 0, 1, 1], &mut wire)
            .unwrap();
        assert_eq!(wire[0], CONTENT_APPLICATION_DATA);
        let (typ, range) = opener.open(&mut wire).unwrap();
        assert_eq!(
            (typ, &wire[range]),
            (CONTENT_HANDSHAKE, &[24, 0, 0, 1, 1][..])
        );
        // Padded by hand (as another TLS stack may): content, type, zeros.
        let mut padded = vec![CONTENT_APPLICATION_DATA, 3, 3, 0, 0];
        padded.extend_from_slice(b"hi");
        padded.push(CONTENT_APPLICATION_DATA);
        padded.extend_from_slice(&[0; 40]);
        let mut all_zero = vec![CONTENT_APPLICATION_DATA, 3, 3, 0, 0];
        all_zero.extend_from_slice(&[0; 8]);
        for record in [&mut padded, &mut all_zero] {
            let len = (record.len() - HEADER + TAG) as u16;
            record[3..5].copy_from_slice(&len.to_be_bytes());
            let header: [u8; HEADER] = record[..HEADER].try_into().unwrap();
            let nonce = sealer.keys.nonce();
            sealer.keys.seq += 1;
            let tag = sealer
                .keys
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&header[..]),
                    &mut record[HEADER..],
                )
                .unwrap();
            record.extend_from_slice(tag.as_ref());
        }
        let (typ, range) = opener.open(&mut padded).unwrap();
        assert_eq!(
            (typ, &padded[range]),
            (CONTENT_APPLICATION_DATA, &b"hi"[..])
        );
        assert_eq!(opener.open(&mut all_zero), Err(RecordError::NoContentType));
    }
}
