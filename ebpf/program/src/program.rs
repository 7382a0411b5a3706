//! The program proper. Every packet read goes through `bpf_skb_load_bytes`,
//! so the kernel checks bounds at run time and the verifier has nothing to
//! prove about packet pointers; loops have constant bounds. A hello that
//! spans segments (a post-quantum key share alone is 1,216 bytes) is
//! gathered per socket, in TCP sequence, into a bounded buffer and parsed
//! whole; one that cannot be (too large, a segment missing, malformed) is
//! counted as unparsed, never guessed and never taken for plaintext.

// Map statics are named as bpftool shows and the loader pins them.
#![allow(non_upper_case_globals)]

use aya_ebpf::{
    btf_maps::{Array, LruHashMap, PerCpuArray},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{btf_map, cgroup_skb},
    programs::SkBuffContext,
    EbpfContext,
};
use tlsrelay_ebpf_common::*;

#[btf_map]
static connections: LruHashMap<u64, Connection, { MAX_CONNECTIONS as usize }> = LruHashMap::new();
#[btf_map]
static negotiated: PerCpuArray<Negotiated, 1> = PerCpuArray::new();
#[btf_map]
static downgrades: PerCpuArray<Downgrades, 1> = PerCpuArray::new();
#[btf_map]
static parser: PerCpuArray<Parser, 1> = PerCpuArray::new();
/// Written by the relay itself (see `RelayView`).
#[btf_map]
static relay_view: LruHashMap<u64, RelayView, { MAX_CONNECTIONS as usize }> = LruHashMap::new();
/// Ports read as SMTP, set by the loader; 0 entries are unused.
#[btf_map]
static smtp_ports: Array<u16, { MAX_SMTP_PORTS as usize }> = Array::new();
/// Local ports whose sockets are not relay sessions, set by the loader.
#[btf_map]
static ignored_ports: Array<u16, { MAX_IGNORED_PORTS as usize }> = Array::new();
/// Per-CPU room for the start of a plaintext payload.
#[btf_map]
static scratch: PerCpuArray<[u8; WINDOW], 1> = PerCpuArray::new();
/// Hellos being gathered across segments, by socket cookie.
#[btf_map]
static hellos: LruHashMap<u64, HelloBuffer, { MAX_HELLOS_IN_FLIGHT as usize }> = LruHashMap::new();
/// Per-CPU room to build a `hellos` entry in (too large for the stack).
#[btf_map]
static hello_template: PerCpuArray<HelloBuffer, 1> = PerCpuArray::new();

const WINDOW: usize = 512;
const TCP: u8 = 6;
const RECORD_CCS: u8 = 0x14;
const RECORD_ALERT: u8 = 0x15;
const RECORD_HANDSHAKE: u8 = 0x16;
const RECORD_APPLICATION_DATA: u8 = 0x17;
const CLIENT_HELLO: u8 = 1;
const SERVER_HELLO: u8 = 2;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_KEY_SHARE: u16 = 51;
/// Offsets into a gathered record are masked with this (see HELLO_ROOM).
const HELLO_MASK: u32 = MAX_HELLO_RECORD - 1;
/// The first 8 bytes of the random that marks a ServerHello as a
/// HelloRetryRequest (RFC 8446 4.1.3).
const HRR_RANDOM: [u8; 8] = [0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11];

#[cgroup_skb]
pub fn wire_ingress(ctx: SkBuffContext) -> i32 {
    let _ = observe(&ctx, false);
    1 // always let the packet through
}

#[cgroup_skb]
pub fn wire_egress(ctx: SkBuffContext) -> i32 {
    let _ = observe(&ctx, true);
    1
}

#[inline(always)]
fn load<const N: usize>(ctx: &SkBuffContext, offset: u32) -> Result<[u8; N], ()> {
    let mut buf = [0u8; N];
    // SAFETY: the helper writes at most N bytes into buf and checks the
    // packet bounds itself.
    let rc = unsafe { bpf_skb_load_bytes(ctx.as_ptr(), offset, buf.as_mut_ptr().cast(), N as u32) };
    if rc == 0 {
        Ok(buf)
    } else {
        Err(())
    }
}

/// Where hello bytes are read from: the packet, or a gathered record.
trait Bytes {
    fn load<const N: usize>(&self, offset: u32) -> Result<[u8; N], ()>;
}

struct Packet<'a>(&'a SkBuffContext);

impl Bytes for Packet<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: u32) -> Result<[u8; N], ()> {
        load(self.0, offset)
    }
}

struct Gathered<'a>(&'a HelloBuffer);

impl Bytes for Gathered<'_> {
    #[inline(always)]
    fn load<const N: usize>(&self, offset: u32) -> Result<[u8; N], ()> {
        if offset >= self.0.need || self.0.need - offset < N as u32 {
            return Err(());
        }
        let at = (offset & HELLO_MASK) as usize;
        let mut out = [0u8; N];
        let mut i = 0;
        while i < N {
            out[i] = *self.0.bytes.get(at + i).unwrap_or(&0);
            i += 1;
        }
        Ok(out)
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn per_cpu<T>(map: &PerCpuArray<T, 1>) -> Option<&mut T> {
    // SAFETY: a per-CPU slot is only touched by this CPU while we run.
    map.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

// One function per field: inlined, LLVM folds a match over fields into a
// computed address whose bounds the verifier cannot follow.
#[inline(never)]
fn count_tls1_0(n: &mut Negotiated) {
    n.tls1_0 += 1;
}
#[inline(never)]
fn count_tls1_1(n: &mut Negotiated) {
    n.tls1_1 += 1;
}
#[inline(never)]
fn count_tls1_2(n: &mut Negotiated) {
    n.tls1_2 += 1;
}
#[inline(never)]
fn count_tls1_3(n: &mut Negotiated) {
    n.tls1_3 += 1;
}

/// Adds to a global counter once per connection.
#[inline(always)]
fn once<T>(conn: &mut Connection, bit: u8, map: &PerCpuArray<T, 1>, add: impl FnOnce(&mut T)) {
    if conn.counted & bit == 0 {
        conn.counted |= bit;
        if let Some(counters) = per_cpu(map) {
            add(counters);
        }
    }
}

fn observe(ctx: &SkBuffContext, egress: bool) -> Result<(), ()> {
    let first: [u8; 1] = load(ctx, 0)?;
    let (l4, proto) = match first[0] >> 4 {
        4 => {
            let p: [u8; 1] = load(ctx, 9)?;
            (((first[0] & 0x0f) as u32) * 4, p[0])
        }
        6 => {
            let nh: [u8; 1] = load(ctx, 6)?;
            (40, nh[0]) // extension headers are not followed
        }
        _ => return Ok(()),
    };
    if proto != TCP {
        return Ok(());
    }
    let tcp: [u8; 13] = load(ctx, l4)?;
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let payload = l4 + ((tcp[12] >> 4) as u32) * 4;
    let len = ctx.len();
    if payload >= len {
        return Ok(()); // no payload: SYN, ACK, FIN
    }
    let payload_len = len - payload;
    let (sport, dport) = (be16([tcp[0], tcp[1]]), be16([tcp[2], tcp[3]]));
    let (local, remote) = if egress {
        (sport, dport)
    } else {
        (dport, sport)
    };
    if is_ignored_port(local) {
        return Ok(()); // e.g. the metrics endpoint: not a relay session
    }

    // SAFETY: plain helper calls on our context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let now = unsafe { bpf_ktime_get_ns() };
    if connections.get_ptr_mut(&cookie).is_none() {
        let fresh = Connection {
            first_seen_ns: now,
            local_port: local,
            remote_port: remote,
            ..Default::default()
        };
        let _ = connections.insert(&cookie, &fresh, 0);
    }
    let conn = match connections.get_ptr_mut(&cookie) {
        // SAFETY: the LRU value stays valid while this program runs.
        Some(p) => unsafe { &mut *p },
        None => return Err(()),
    };
    conn.last_seen_ns = now;
    if let Some(p) = per_cpu(&parser) {
        p.segments += 1;
    }

    let segment = Segment {
        payload,
        payload_len,
        seq,
        egress,
        cookie,
    };
    if let Some(p) = hellos.get_ptr_mut(&cookie) {
        // SAFETY: the LRU value stays valid while this program runs.
        let buf = unsafe { &mut *p };
        if (buf.egress != 0) == egress {
            return gather(ctx, conn, buf, &segment);
        }
    }
    let head: [u8; 1] = load(ctx, payload)?;
    let is_record = matches!(
        head[0],
        RECORD_CCS | RECORD_ALERT | RECORD_HANDSHAKE | RECORD_APPLICATION_DATA
    );
    if is_record && payload_len >= 5 {
        let h: [u8; 5] = load(ctx, payload)?;
        if h[1] == 3 {
            conn.tls_started = 1;
            return tls_record(ctx, conn, &segment, h);
        }
    }
    if is_record && conn.tls_started == 0 && conn.plaintext == 0 && payload_len < 5 {
        // A record header cut short: TLS, but nothing to read yet.
        conn.tls_started = 1;
        return unparsed(conn);
    }
    plaintext(ctx, conn, payload, payload_len, local, remote)
}

/// Where a segment's payload is and what follows it.
struct Segment {
    payload: u32,
    payload_len: u32,
    seq: u32,
    egress: bool,
    cookie: u64,
}

fn is_ignored_port(port: u16) -> bool {
    for i in 0..MAX_IGNORED_PORTS {
        match ignored_ports.get(i) {
            Some(&p) if p != 0 && p == port => return true,
            _ => {}
        }
    }
    false
}

/// Starts gathering a hello record that does not fit in its segment.
fn start_gathering(
    ctx: &SkBuffContext,
    conn: &mut Connection,
    segment: &Segment,
    need: u32,
) -> Result<(), ()> {
    if need > MAX_HELLO_RECORD {
        return unparsed(conn);
    }
    let template = match hello_template.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, used only while we run.
        Some(p) => unsafe { &mut *p },
        None => return Err(()),
    };
    template.next_seq = segment.seq;
    template.need = need;
    template.filled = 0;
    template.egress = segment.egress as u32;
    if hellos.insert(&segment.cookie, template, 0).is_err() {
        return unparsed(conn);
    }
    match hellos.get_ptr_mut(&segment.cookie) {
        // SAFETY: the LRU value stays valid while this program runs.
        Some(p) => gather(ctx, conn, unsafe { &mut *p }, segment),
        None => unparsed(conn),
    }
}

/// Adds a segment to a hello being gathered, in sequence; parses it once
/// whole. A retransmitted segment adds only what is new; a gap ends the
/// attempt as unparsed.
fn gather(
    ctx: &SkBuffContext,
    conn: &mut Connection,
    buf: &mut HelloBuffer,
    segment: &Segment,
) -> Result<(), ()> {
    let cookie = segment.cookie;
    let (mut payload, mut payload_len) = (segment.payload, segment.payload_len);
    let ahead = segment.seq.wrapping_sub(buf.next_seq) as i32;
    if ahead > 0 {
        let _ = hellos.remove(&cookie);
        return unparsed(conn); // a segment is missing
    }
    let seen = (-ahead) as u32;
    if seen >= payload_len {
        return Ok(()); // a retransmission of bytes already here
    }
    payload += seen;
    payload_len -= seen;
    let want = buf.need - buf.filled;
    let n = if payload_len < want {
        payload_len
    } else {
        want
    };
    if n == 0 {
        return Ok(());
    }
    let at = buf.filled & HELLO_MASK;
    // 1..=MAX_HELLO_RECORD in a form the verifier can bound (n >= 1).
    let len = (n.wrapping_sub(1) & HELLO_MASK) + 1;
    // SAFETY: at < MAX_HELLO_RECORD and len <= MAX_HELLO_RECORD, so at + len
    // <= HELLO_ROOM: the helper writes inside the map value; it checks the
    // packet bounds itself.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            payload,
            buf.bytes.as_mut_ptr().add(at as usize).cast(),
            len,
        )
    };
    if rc != 0 {
        let _ = hellos.remove(&cookie);
        return unparsed(conn);
    }
    buf.filled += len;
    buf.next_seq = buf.next_seq.wrapping_add(len);
    if buf.filled < buf.need {
        return Ok(());
    }
    conn.reassembled = 1;
    if let Some(p) = per_cpu(&parser) {
        p.reassembled += 1;
    }
    let record = Gathered(buf);
    let parsed = match record.load::<1>(5) {
        Ok([CLIENT_HELLO]) => client_hello(&record, conn, 5),
        Ok([SERVER_HELLO]) => server_hello(&record, conn, 5),
        _ => Err(()),
    };
    let _ = hellos.remove(&cookie);
    if parsed.is_err() {
        return unparsed(conn);
    }
    Ok(())
}

fn tls_record(
    ctx: &SkBuffContext,
    conn: &mut Connection,
    segment: &Segment,
    h: [u8; 5],
) -> Result<(), ()> {
    let (payload, payload_len) = (segment.payload, segment.payload_len);
    let record_len = be16([h[3], h[4]]) as u32;
    match h[0] {
        RECORD_APPLICATION_DATA => conn.app_data_seen = 1,
        RECORD_ALERT if conn.app_data_seen == 0 => {
            conn.handshake_alert = 1;
            if let Ok(a) = load::<2>(ctx, payload + 5) {
                conn.alert_description = a[1];
            }
            once(conn, COUNTED_HANDSHAKE_FAILED, &downgrades, |d| {
                d.handshake_failed += 1
            });
        }
        RECORD_HANDSHAKE => {
            let Ok(t) = load::<1>(ctx, payload + 5) else {
                return unparsed(conn);
            };
            if t[0] != CLIENT_HELLO && t[0] != SERVER_HELLO {
                return Ok(());
            }
            if payload_len < 5 + record_len {
                // The rest is in later segments.
                return start_gathering(ctx, conn, segment, 5 + record_len);
            }
            let packet = Packet(ctx);
            let parsed = if t[0] == CLIENT_HELLO {
                client_hello(&packet, conn, payload + 5)
            } else {
                server_hello(&packet, conn, payload + 5)
            };
            if parsed.is_err() {
                return unparsed(conn);
            }
        }
        _ => {}
    }
    Ok(())
}

fn unparsed(conn: &mut Connection) -> Result<(), ()> {
    conn.unparsed = 1;
    if let Some(p) = per_cpu(&parser) {
        p.unparsed += 1;
    }
    Ok(())
}

/// Skips legacy_version, random, session_id; returns the offset after it.
#[inline(always)]
fn after_session_id<B: Bytes>(b: &B, hs: u32) -> Result<u32, ()> {
    let sid: [u8; 1] = b.load(hs + 4 + 2 + 32)?;
    Ok(hs + 4 + 2 + 32 + 1 + sid[0] as u32)
}

/// Finds extension `kind` in `[off, end)`; returns the offset of its body
/// and its length.
#[inline(always)]
fn find_extension<B: Bytes>(
    b: &B,
    mut off: u32,
    end: u32,
    kind: u16,
) -> Result<Option<(u32, u32)>, ()> {
    for _ in 0..32 {
        if off + 4 > end {
            break;
        }
        let e: [u8; 4] = b.load(off)?;
        let len = be16([e[2], e[3]]) as u32;
        if be16([e[0], e[1]]) == kind {
            return Ok(Some((off + 4, len)));
        }
        off += 4 + len;
    }
    Ok(None)
}

fn client_hello<B: Bytes>(b: &B, conn: &mut Connection, hs: u32) -> Result<(), ()> {
    let legacy = be16(b.load(hs + 4)?);
    let mut off = after_session_id(b, hs)?;
    let suites: [u8; 2] = b.load(off)?;
    off += 2 + be16(suites) as u32;
    let compression: [u8; 1] = b.load(off)?;
    off += 1 + compression[0] as u32;
    let mut best = legacy;
    if let Ok(ext) = b.load::<2>(off) {
        let end = off + 2 + be16(ext) as u32;
        if let Some((body, _)) = find_extension(b, off + 2, end, EXT_SUPPORTED_VERSIONS)? {
            let n: [u8; 1] = b.load(body)?;
            let count = (n[0] / 2) as u32;
            let mut max = 0u16;
            for i in 0..16u32 {
                if i >= count {
                    break;
                }
                let v = be16(b.load(body + 1 + 2 * i)?);
                let grease = v & 0x0f0f == 0x0a0a;
                if !grease && v > max {
                    max = v;
                }
            }
            if max != 0 {
                best = max;
            }
        }
    }
    if best > conn.offered_version {
        conn.offered_version = best;
    }
    if let Some(p) = per_cpu(&parser) {
        p.client_hellos += 1;
    }
    Ok(())
}

fn server_hello<B: Bytes>(b: &B, conn: &mut Connection, hs: u32) -> Result<(), ()> {
    let legacy = be16(b.load(hs + 4)?);
    let random: [u8; 8] = b.load(hs + 6)?;
    if random == HRR_RANDOM {
        if let Some(p) = per_cpu(&parser) {
            p.hello_retry_requests += 1;
        }
        return Ok(()); // not the ServerHello that settles the version
    }
    let mut off = after_session_id(b, hs)?;
    let suite = be16(b.load(off)?);
    off += 2 + 1; // cipher suite, compression method
    let mut version = legacy;
    if let Ok(ext) = b.load::<2>(off) {
        let end = off + 2 + be16(ext) as u32;
        if let Some((body, 2)) = find_extension(b, off + 2, end, EXT_SUPPORTED_VERSIONS)? {
            version = be16(b.load(body)?);
        }
        if let Some((body, len)) = find_extension(b, off + 2, end, EXT_KEY_SHARE)? {
            if len >= 2 {
                conn.key_share_group = be16(b.load(body)?);
            }
        }
    }
    conn.negotiated_version = version;
    conn.cipher_suite = suite;
    if let Some(p) = per_cpu(&parser) {
        p.server_hellos += 1;
    }
    once(conn, COUNTED_NEGOTIATED, &negotiated, |n| match version {
        TLS1_0 => count_tls1_0(n),
        TLS1_1 => count_tls1_1(n),
        TLS1_2 => count_tls1_2(n),
        TLS1_3 => count_tls1_3(n),
        _ => {}
    });
    if conn.offered_version > version {
        once(conn, COUNTED_VERSION_DOWNGRADE, &downgrades, |d| {
            d.version += 1
        });
    }
    Ok(())
}

fn is_smtp_port(port: u16) -> bool {
    for i in 0..MAX_SMTP_PORTS {
        match smtp_ports.get(i) {
            Some(&p) if p != 0 && p == port => return true,
            _ => {}
        }
    }
    false
}

#[inline(always)]
fn upper(b: u8) -> u8 {
    if b.is_ascii_lowercase() {
        b - 32
    } else {
        b
    }
}

/// Whether the `n` bytes in the window hold `word` at `at` (ASCII case
/// ignored). Bytes past `n` are another packet's: a segment "MAIL FR" is
/// not a MAIL FROM because the last one left "OM" behind.
#[inline(always)]
fn starts_with_ci(buf: &[u8; WINDOW], n: usize, at: usize, word: &[u8]) -> bool {
    let mut i = 0;
    while i < word.len() {
        if at + i >= n || at + i >= WINDOW || upper(buf[at + i]) != word[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Copies the start of the payload (up to WINDOW bytes) into the per-CPU
/// window; returns how many bytes it holds.
#[inline(always)]
fn fill_window(
    ctx: &SkBuffContext,
    payload: u32,
    payload_len: u32,
    buf: &mut [u8; WINDOW],
) -> usize {
    let ptr = buf.as_mut_ptr().cast();
    // 1..=WINDOW, in a form the verifier can bound whatever LLVM does with
    // a separate zero check (payload_len is at least 1 here).
    let len = if payload_len >= WINDOW as u32 {
        WINDOW as u32
    } else {
        (payload_len.wrapping_sub(1) & (WINDOW as u32 - 1)) + 1
    };
    // SAFETY: writes at most len <= WINDOW bytes into buf; the helper checks
    // the packet bounds.
    if unsafe { bpf_skb_load_bytes(ctx.as_ptr(), payload, ptr, len) } == 0 {
        len as usize
    } else {
        0
    }
}

fn plaintext(
    ctx: &SkBuffContext,
    conn: &mut Connection,
    payload: u32,
    payload_len: u32,
    local: u16,
    remote: u16,
) -> Result<(), ()> {
    if conn.tls_started != 0 || conn.offered_version != 0 || conn.negotiated_version != 0 {
        return Ok(()); // after TLS started, the wire carries records only
    }
    if !is_smtp_port(local) && !is_smtp_port(remote) {
        conn.plaintext = 1;
        once(conn, COUNTED_NEGOTIATED, &negotiated, |n| n.plaintext += 1);
        return Ok(());
    }
    let buf = match scratch.get_ptr_mut(0) {
        // SAFETY: this CPU's scratch slot, used only while we run.
        Some(p) => unsafe { &mut *p },
        None => return Err(()),
    };
    let n = fill_window(ctx, payload, payload_len, buf);
    if n == 0 {
        return Ok(());
    }
    if starts_with_ci(buf, n, 0, b"STARTTLS") {
        conn.starttls_issued = 1;
    } else if starts_with_ci(buf, n, 0, b"220") && conn.starttls_issued != 0 {
        conn.starttls_accepted = 1;
    } else if starts_with_ci(buf, n, 0, b"MAIL FROM") {
        conn.plaintext_mail = 1;
        conn.plaintext = 1;
        once(conn, COUNTED_PLAINTEXT_MAIL, &downgrades, |d| {
            d.plaintext += 1
        });
        once(conn, COUNTED_NEGOTIATED, &negotiated, |c| c.plaintext += 1);
        if conn.starttls_offered != 0 {
            once(conn, COUNTED_STRIPPED, &downgrades, |d| d.stripped += 1);
        }
    } else if starts_with_ci(buf, n, 0, b"250") {
        // EHLO reply: look for the STARTTLS capability on any line, with
        // one or two branches per position so the verifier's jump history
        // stays short (letters compare case-insensitively under & 0xDF).
        const CONTINUED: u32 = u32::from_le_bytes(*b"250-");
        const STARTTLS: u64 = u64::from_le_bytes(*b"STARTTLS");
        const CASE: u64 = 0xDFDF_DFDF_DFDF_DFDF;
        let mut i = 0usize;
        while i < WINDOW - 12 {
            if i + 12 > n {
                break;
            }
            let w = u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
            let word = u64::from_le_bytes([
                buf[i + 4],
                buf[i + 5],
                buf[i + 6],
                buf[i + 7],
                buf[i + 8],
                buf[i + 9],
                buf[i + 10],
                buf[i + 11],
            ]);
            // "250-" and "250 " differ only in bits 0x0D of the fourth byte.
            if (w | 0x0D00_0000) == (CONTINUED | 0x0D00_0000) && (word & CASE) == STARTTLS {
                let sep = buf[i + 3];
                if sep == b'-' || sep == b' ' {
                    conn.starttls_offered = 1;
                    break;
                }
            }
            i += 1;
        }
    }
    Ok(())
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Only GPL-compatible programs may call GPL-only helpers; this one calls
/// none, but declares GPL as kernel-side BPF code customarily does.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
