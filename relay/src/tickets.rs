//! Session-ticket keys shared by a fleet (HAProxy's `tls-ticket-keys`,
//! nginx's `ssl_session_ticket_key`): every relay reads the same key file,
//! so a client that resumes on another relay than the one that issued its
//! ticket skips the full handshake. The newest key seals new tickets; every
//! key still within its lifetime opens them, so a rotation (`tlsrelay
//! tickets new FILE`, the file distributed, the relays reload it when it
//! changes) drops no resumption; a key past its lifetime opens nothing.
//!
//! The file: one key per line, `<created, Unix seconds> <base64 of 16
//! bytes of name and 32 of AES-256-GCM key>`; `#` starts a comment.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

const NAME_LEN: usize = 16;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {why}")]
    Invalid {
        file: String,
        line: usize,
        why: String,
    },
    #[error("{file}: no key")]
    Empty { file: String },
}

struct TicketKey {
    name: [u8; NAME_LEN],
    created: i64,
    key: LessSafeKey,
}

/// The keys of one file, as rustls's ticketer.
pub struct FleetTickets {
    keys: Vec<TicketKey>,
    lifetime: Duration,
    file: PathBuf,
}

impl std::fmt::Debug for FleetTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FleetTickets({}, {} keys)",
            self.file.display(),
            self.keys.len()
        )
    }
}

impl FleetTickets {
    /// Reads `file`; `lifetime` is how long a key seals and opens tickets
    /// after it was made.
    pub fn load(file: &Path, lifetime: Duration) -> Result<FleetTickets, TicketKeyError> {
        let text = std::fs::read_to_string(file).map_err(|source| TicketKeyError::Read {
            file: file.display().to_string(),
            source,
        })?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let invalid = |why: &str| TicketKeyError::Invalid {
                file: file.display().to_string(),
                line: n + 1,
                why: why.to_string(),
            };
            let (created, key) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| invalid("expected '<created> <base64 key>'"))?;
            let created: i64 = created
                .parse()
                .map_err(|_| invalid("the creation time is not Unix seconds"))?;
            let bytes =
                base64_decode(key.trim()).ok_or_else(|| invalid("the key is not base64"))?;
            if bytes.len() != NAME_LEN + KEY_LEN {
                return Err(invalid("a key is 48 bytes (16 of name, 32 of AES-256 key)"));
            }
            let mut name = [0u8; NAME_LEN];
            name.copy_from_slice(&bytes[..NAME_LEN]);
            let unbound = UnboundKey::new(&AES_256_GCM, &bytes[NAME_LEN..])
                .map_err(|_| invalid("not an AES-256 key"))?;
            keys.push(TicketKey {
                name,
                created,
                key: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err(TicketKeyError::Empty {
                file: file.display().to_string(),
            });
        }
        // Newest first; of keys made in the same second, the one written
        // later (`tickets new` appends).
        keys.reverse();
        keys.sort_by_key(|k| std::cmp::Reverse(k.created));
        Ok(FleetTickets {
            keys,
            lifetime,
            file: file.to_path_buf(),
        })
    }

    fn valid(&self, key: &TicketKey, now: i64) -> bool {
        key.created <= now + 60 && now - key.created <= self.lifetime.as_secs() as i64
    }

    /// The newest key's age, for the banner and check: `None` when every
    /// key is past its lifetime.
    pub fn newest_age(&self, now: i64) -> Option<i64> {
        self.keys
            .iter()
            .find(|k| self.valid(k, now))
            .map(|k| now - k.created)
    }
}

impl rustls::server::ProducesTickets for FleetTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime.as_secs().min(u64::from(u32::MAX)) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let now = crate::unix_now();
        let key = self.keys.iter().find(|k| self.valid(k, now))?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut sealed,
            )
            .ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN + 16 {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let now = crate::unix_now();
        let key = self
            .keys
            .iter()
            .find(|k| k.name == name && self.valid(k, now))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(&key.name), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// The ticketer a listener with `tls.ticket_keys` uses.
pub fn fleet_ticketer(
    file: &Path,
    lifetime: Duration,
) -> Result<Arc<dyn rustls::server::ProducesTickets>, TicketKeyError> {
    let tickets = FleetTickets::load(file, lifetime)?;
    if tickets.newest_age(crate::unix_now()).is_none() {
        tracing::warn!(
            "{}: every key is older than {lifetime:?}: no session tickets until `tlsrelay tickets new` adds one",
            file.display()
        );
    }
    Ok(Arc::new(tickets))
}

#[derive(Debug, clap::Subcommand)]
pub enum TicketsCommand {
    /// Adds a new key to FILE (made if missing) and removes keys past
    /// their lifetime; the new key seals tickets once the relays reload
    /// the file (they watch it). Distribute the file to every relay.
    New {
        file: PathBuf,
        /// Keys older than this are removed (the relays' ticket_key_lifetime).
        #[arg(long, default_value = "24h", value_parser = tlsrelay_core::config::parse_duration)]
        lifetime: Duration,
    },
}

pub fn run(command: TicketsCommand) -> std::process::ExitCode {
    match command {
        TicketsCommand::New { file, lifetime } => match new_key(&file, lifetime) {
            Ok(kept) => {
                println!(
                    "{}: new key added; {kept} older key(s) kept (within {lifetime:?})",
                    file.display()
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tlsrelay: {}: {e}", file.display());
                std::process::ExitCode::from(1)
            }
        },
    }
}

/// Appends a fresh key to `file`, drops those past `lifetime`; how many
/// older ones remain.
fn new_key(file: &Path, lifetime: Duration) -> std::io::Result<usize> {
    let now = crate::unix_now();
    let existing = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| {
            let created = l
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<i64>().ok());
            created.is_some_and(|c| now - c <= lifetime.as_secs() as i64)
        })
        .map(str::to_string)
        .collect();
    let kept = lines.len();
    let mut key = [0u8; NAME_LEN + KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    lines.push(format!("{now} {}", base64_encode(&key)));
    let text = format!(
        "# tlsrelay session-ticket keys: <created> <base64 name+key>; the newest seals.\n{}\n",
        lines.join("\n")
    );
    crate::state::replace_file(file, text.as_bytes())?;
    Ok(kept)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|&c| c != b'=') {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn base64_round_trips() {
        for n in 0..50 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&bytes)).unwrap(), bytes);
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
    }

    #[test]
    fn the_newest_key_seals_every_valid_one_opens_an_expired_one_opens_nothing() {
        let dir = tempfile_dir();
        let file = dir.join("keys");
        let day = Duration::from_secs(86_400);
        new_key(&file, day).unwrap();
        let first = FleetTickets::load(&file, day).unwrap();
        let ticket = first.encrypt(b"session state").unwrap();
        assert_eq!(first.decrypt(&ticket).unwrap(), b"session state");
        // Rotated: the old key still opens, the new one seals.
        new_key(&file, day).unwrap();
        let rotated = FleetTickets::load(&file, day).unwrap();
        assert_eq!(rotated.keys.len(), 2);
        assert_eq!(rotated.decrypt(&ticket).unwrap(), b"session state");
        let newer = rotated.encrypt(b"x").unwrap();
        assert_ne!(
            newer[..NAME_LEN],
            ticket[..NAME_LEN],
            "sealed with the new key"
        );
        // Tampered: nothing.
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(rotated.decrypt(&bad), None);
        // A key made two days ago is past a one-day lifetime.
        let old = format!(
            "{} {}\n",
            crate::unix_now() - 2 * 86_400,
            base64_encode(&[7u8; 48])
        );
        std::fs::write(&file, old).unwrap();
        let expired = FleetTickets::load(&file, day).unwrap();
        assert_eq!(expired.encrypt(b"x"), None, "no valid key: no tickets");
        assert_eq!(expired.newest_age(crate::unix_now()), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tlsrelay-tickets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
