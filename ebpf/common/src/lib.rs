//! Records shared by the eBPF program (`tlsrelay-ebpf`) and the relay's
//! loader. All `#[repr(C)]` with explicit padding, so the BTF the program is
//! built with describes them field by field and `bpftool map dump` prints
//! the names.
#![no_std]

/// Names the maps are pinned under, in the pin directory.
pub const MAP_CONNECTIONS: &str = "connections";
pub const MAP_NEGOTIATED: &str = "negotiated";
pub const MAP_DOWNGRADES: &str = "downgrades";
pub const MAP_PARSER: &str = "parser";
pub const MAP_RELAY_VIEW: &str = "relay_view";
pub const MAP_SMTP_PORTS: &str = "smtp_ports";
pub const MAP_IGNORED_PORTS: &str = "ignored_ports";

/// Connections remembered at once (LRU: the oldest are forgotten first).
pub const MAX_CONNECTIONS: u32 = 65536;
/// Ports whose plaintext payload is read as SMTP.
pub const MAX_SMTP_PORTS: u32 = 16;
/// Local ports whose sockets are not relay sessions (the metrics endpoint).
pub const MAX_IGNORED_PORTS: u32 = 4;
/// Hellos being reassembled across segments at once (LRU).
pub const MAX_HELLOS_IN_FLIGHT: u32 = 256;
/// The largest hello record (header included) followed across segments.
pub const MAX_HELLO_RECORD: u32 = 8192;
/// Room for a hello record: twice the largest, so that a masked offset plus
/// a masked length always stays inside (what the verifier must see).
pub const HELLO_ROOM: usize = 2 * MAX_HELLO_RECORD as usize;

/// TLS wire versions.
pub const TLS1_0: u16 = 0x0301;
pub const TLS1_1: u16 = 0x0302;
pub const TLS1_2: u16 = 0x0303;
pub const TLS1_3: u16 = 0x0304;

/// `Connection::counted` bits: which global counters this connection has
/// already added to (each connection counts once per counter).
pub const COUNTED_NEGOTIATED: u8 = 1;
pub const COUNTED_VERSION_DOWNGRADE: u8 = 2;
pub const COUNTED_PLAINTEXT_MAIL: u8 = 4;
pub const COUNTED_STRIPPED: u8 = 8;
pub const COUNTED_HANDSHAKE_FAILED: u8 = 16;

/// What the wire showed of one of the relay's sockets, keyed by socket
/// cookie in `connections`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// bpf_ktime_get_ns() of the first and latest segment seen.
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub local_port: u16,
    pub remote_port: u16,
    /// Highest version the ClientHello offered (supported_versions, else
    /// legacy_version); 0 when none was seen.
    pub offered_version: u16,
    /// Version the ServerHello selected; 0 when none was seen.
    pub negotiated_version: u16,
    /// Cipher suite the ServerHello selected.
    pub cipher_suite: u16,
    pub starttls_offered: u8,
    pub starttls_issued: u8,
    pub starttls_accepted: u8,
    /// A MAIL FROM crossed the wire in cleartext.
    pub plaintext_mail: u8,
    /// The first payload was neither TLS nor (on SMTP ports) SMTP before
    /// STARTTLS: a plaintext session.
    pub plaintext: u8,
    /// An alert record before any application data: the handshake failed.
    pub handshake_alert: u8,
    /// The alert's description (e.g. 48 unknown_ca, 70 protocol_version).
    pub alert_description: u8,
    /// Application data (or encrypted handshake) records were seen.
    pub app_data_seen: u8,
    /// A hello that could not be parsed (malformed, larger than
    /// MAX_HELLO_RECORD, or a segment missing): counted, never guessed.
    pub unparsed: u8,
    /// COUNTED_* bits.
    pub counted: u8,
    /// The ServerHello's key_share group (TLS 1.3), e.g. 0x11ec
    /// X25519MLKEM768, 0x001d X25519; 0 when none was seen.
    pub key_share_group: u16,
    /// The first payload was a TLS record: never counted as plaintext.
    pub tls_started: u8,
    /// A hello spanned segments and was reassembled.
    pub reassembled: u8,
}

/// A hello record being gathered across segments (keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HelloBuffer {
    /// The TCP sequence number of the next byte expected.
    pub next_seq: u32,
    /// The whole record's length (header included), and how much is here.
    pub need: u32,
    pub filled: u32,
    /// 1 when the hello travels egress.
    pub egress: u32,
    pub bytes: [u8; HELLO_ROOM],
}

/// Connections by negotiated version (a per-CPU array of one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub plaintext: u64,
    pub tls1_0: u64,
    pub tls1_1: u64,
    pub tls1_2: u64,
    pub tls1_3: u64,
}

/// Downgrades by kind (a per-CPU array of one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Downgrades {
    /// Negotiated below the client's highest offer.
    pub version: u64,
    /// A mail transaction (MAIL FROM) in cleartext.
    pub plaintext: u64,
    /// A STARTTLS-capable peer whose session went on in cleartext.
    pub stripped: u64,
    /// An alert before the handshake completed.
    pub handshake_failed: u64,
}

/// How much the parser saw (a per-CPU array of one element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parser {
    pub segments: u64,
    pub client_hellos: u64,
    pub server_hellos: u64,
    pub hello_retry_requests: u64,
    /// Hellos that could not be parsed: counted, not guessed.
    pub unparsed: u64,
    /// Hellos that spanned segments and were reassembled.
    pub reassembled: u64,
}

/// The relay's own view of a socket, written by the relay when a session
/// ends, keyed by socket cookie in `relay_view`, so `tlsrelay stats` (and
/// bpftool) can set it beside what the wire showed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayView {
    /// Wire version the relay negotiated on this leg; 0 for plaintext.
    pub negotiated_version: u16,
    pub cipher_suite: u16,
    /// 1 client-facing leg, 2 upstream-facing leg.
    pub leg: u8,
    /// The relay recorded a downgrade on this leg.
    pub downgraded: u8,
    /// The relay saw this leg's handshake fail.
    pub handshake_failed: u8,
    /// TLS is off on this leg by configuration: plaintext is no downgrade.
    pub tls_off: u8,
    /// The key exchange group the relay negotiated (TLS 1.3 codes).
    pub key_share_group: u16,
    /// The relay refused this leg by policy (e.g. plaintext on a listener
    /// that requires TLS): its plaintext is no unrecorded downgrade.
    pub refused: u8,
    /// The relay passed this session's TLS through untouched: its version
    /// and cipher are the ServerHello's, read on the way.
    pub passthrough: u8,
}

/// Summing the per-CPU copies of a counter record.
pub trait Accumulate {
    fn accumulate(&mut self, other: &Self);
}

impl Accumulate for Negotiated {
    fn accumulate(&mut self, o: &Self) {
        self.plaintext += o.plaintext;
        self.tls1_0 += o.tls1_0;
        self.tls1_1 += o.tls1_1;
        self.tls1_2 += o.tls1_2;
        self.tls1_3 += o.tls1_3;
    }
}

impl Accumulate for Downgrades {
    fn accumulate(&mut self, o: &Self) {
        self.version += o.version;
        self.plaintext += o.plaintext;
        self.stripped += o.stripped;
        self.handshake_failed += o.handshake_failed;
    }
}

impl Accumulate for Parser {
    fn accumulate(&mut self, o: &Self) {
        self.segments += o.segments;
        self.client_hellos += o.client_hellos;
        self.server_hellos += o.server_hellos;
        self.hello_retry_requests += o.hello_retry_requests;
        self.unparsed += o.unparsed;
        self.reassembled += o.reassembled;
    }
}

pub const LEG_CLIENT: u8 = 1;
pub const LEG_UPSTREAM: u8 = 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding fields.
    unsafe impl aya::Pod for super::Connection {}
    unsafe impl aya::Pod for super::Negotiated {}
    unsafe impl aya::Pod for super::Downgrades {}
    unsafe impl aya::Pod for super::Parser {}
    unsafe impl aya::Pod for super::RelayView {}
}
