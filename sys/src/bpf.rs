//! The eBPF wire counters from userspace: load the program embedded at build
//! time, attach it to a cgroup that holds the relay alone, pin its maps for
//! bpftool and `tlsrelay stats`, record the relay's own view of each socket
//! beside the wire's, and read everything back.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::Ebpf;
use serde::Serialize;
use tlsrelay_ebpf_common as wire;

/// The program, built for bpfel-unknown-none by build.rs (empty when the
/// eBPF toolchain was missing).
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tlsrelay-ebpf"));

/// Where maps are pinned unless configured otherwise.
pub use tlsrelay_core::config::{CgroupChoice, WireSettings, DEFAULT_PIN_DIR};
const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("wire_ingress", CgroupSkbAttachType::Ingress),
    ("wire_egress", CgroupSkbAttachType::Egress),
];
const PINNED: [&str; 5] = [
    wire::MAP_CONNECTIONS,
    wire::MAP_NEGOTIATED,
    wire::MAP_DOWNGRADES,
    wire::MAP_PARSER,
    wire::MAP_RELAY_VIEW,
];
/// Ports read as SMTP besides those of SMTP listeners.
const SMTP_PORTS: [u16; 3] = [25, 587, 2525];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("this tlsrelay was built without its eBPF program (the build lacked nightly rust-src or bpf-linker; `cargo xtask build-ebpf` installs them)")]
    NotBuilt,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {detail}")]
    Aya { what: String, detail: String },
    #[error("no cgroup v2 mount in /proc/self/mountinfo")]
    NoCgroup2,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BpfError {
    let what = what.into();
    move |source| BpfError::Io { what, source }
}

/// An aya error with its whole source chain (aya's own messages often
/// leave the errno to the source).
fn aya_err<E: std::error::Error>(what: impl Into<String>) -> impl FnOnce(E) -> BpfError {
    let what = what.into();
    move |e| {
        let mut detail = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        BpfError::Aya { what, detail }
    }
}

/// A missing piece of the object, which the build guarantees.
fn missing(what: &str) -> BpfError {
    BpfError::Aya {
        what: what.to_string(),
        detail: "missing from the eBPF object".into(),
    }
}

/// The loaded, attached program; detached when dropped (or at exit).
pub struct WireCounters {
    ebpf: Ebpf,
    /// Sockets whose wire record disagreed with the relay's view, checked
    /// as each session ends (a scrape reads this, never walks the maps).
    disagreements: AtomicU64,
    relay_view: Mutex<HashMap<MapData, u64, wire::RelayView>>,
    /// Ports read as SMTP.
    smtp_ports: PortSet,
    /// Local ports that are no sessions.
    ignored_ports: PortSet,
    pub cgroup: PathBuf,
    /// Made by this instance, removed when it ends.
    own_child: bool,
    pub pin_dir: PathBuf,
}

impl Drop for WireCounters {
    /// Leaves the instance's cgroup and removes it (a cgroup can only go
    /// once no task is in it; its sockets may outlive it).
    fn drop(&mut self) {
        if !self.own_child {
            return;
        }
        if let Some(parent) = self.cgroup.parent() {
            let _ = fs::write(parent.join("cgroup.procs"), std::process::id().to_string());
        }
        let _ = fs::remove_dir(&self.cgroup);
    }
}

/// A set of ports in one of the program's arrays (0 marks a free slot).
struct PortSet {
    name: &'static str,
    capacity: u32,
    map: Mutex<(Array<MapData, u16>, Vec<u16>)>,
}

impl PortSet {
    fn take(ebpf: &mut Ebpf, name: &'static str, capacity: u32) -> Result<PortSet, BpfError> {
        let map = ebpf.take_map(name).ok_or_else(|| missing(name))?;
        let array = Array::try_from(map).map_err(aya_err(name))?;
        Ok(PortSet {
            name,
            capacity,
            map: Mutex::new((array, Vec::new())),
        })
    }

    fn add(&self, port: u16) -> Result<(), BpfError> {
        let fail = |detail: &str| BpfError::Aya {
            what: self.name.into(),
            detail: detail.into(),
        };
        let mut guard = self.map.lock().map_err(|_| fail("lock poisoned"))?;
        let (array, ports) = &mut *guard;
        if port == 0 || ports.contains(&port) {
            return Ok(());
        }
        if ports.len() as u32 >= self.capacity {
            return Err(fail("full"));
        }
        array
            .set(ports.len() as u32, port, 0)
            .map_err(aya_err(self.name))?;
        ports.push(port);
        Ok(())
    }
}

/// Removes instance cgroups of relays that ended without cleaning up
/// (SIGKILL): empty `tlsrelay-<pid>` siblings whose process is gone.
fn remove_stale_children(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("tlsrelay-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir(entry.path()); // fails, harmlessly, unless empty
        }
    }
}

impl WireCounters {
    /// Loads, attaches and pins. Must run before the relay opens its
    /// sockets: a socket belongs to the cgroup of the task that created it.
    pub fn start(settings: &WireSettings) -> Result<WireCounters, BpfError> {
        let mut ebpf = load()?;
        let cgroup = match &settings.cgroup {
            CgroupChoice::Path(p) => p.clone(),
            CgroupChoice::Own => own_cgroup()?,
            CgroupChoice::Child => {
                let own = own_cgroup()?;
                remove_stale_children(&own);
                let child = own.join(format!("tlsrelay-{}", std::process::id()));
                fs::create_dir_all(&child)
                    .map_err(io_err(format!("creating {}", child.display())))?;
                fs::write(child.join("cgroup.procs"), std::process::id().to_string())
                    .map_err(io_err(format!("moving into {}", child.display())))?;
                child
            }
        };
        let own_child = settings.cgroup == CgroupChoice::Child;
        let cgroup_dir =
            fs::File::open(&cgroup).map_err(io_err(format!("opening {}", cgroup.display())))?;
        for (name, attach_type) in PROGRAMS {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| missing(name))?
                .try_into()
                .map_err(aya_err(name))?;
            program.load().map_err(aya_err(format!("loading {name}")))?;
            program
                .attach(&cgroup_dir, attach_type, CgroupAttachMode::Single)
                .map_err(aya_err(format!("attaching {name} to {}", cgroup.display())))?;
        }
        pin_maps(&ebpf, &settings.pin_dir)?;
        let smtp_ports = PortSet::take(&mut ebpf, wire::MAP_SMTP_PORTS, wire::MAX_SMTP_PORTS)?;
        for port in SMTP_PORTS.iter().chain(&settings.smtp_ports) {
            smtp_ports.add(*port)?;
        }
        let ignored_ports =
            PortSet::take(&mut ebpf, wire::MAP_IGNORED_PORTS, wire::MAX_IGNORED_PORTS)?;
        let view = ebpf
            .take_map(wire::MAP_RELAY_VIEW)
            .ok_or_else(|| missing(wire::MAP_RELAY_VIEW))?;
        let relay_view = HashMap::try_from(view).map_err(aya_err("relay_view"))?;
        Ok(WireCounters {
            ebpf,
            disagreements: AtomicU64::new(0),
            relay_view: Mutex::new(relay_view),
            smtp_ports,
            ignored_ports,
            cgroup,
            own_child,
            pin_dir: settings.pin_dir.clone(),
        })
    }

    /// The program leaves sockets on this local port alone (the metrics
    /// endpoint lives in the relay's cgroup but is no relay session).
    pub fn ignore_local_port(&self, port: u16) -> Result<(), BpfError> {
        self.ignored_ports.add(port)
    }

    /// The program reads plaintext on this port as SMTP (a listener bound
    /// to port 0 is known only once bound).
    pub fn read_as_smtp(&self, port: u16) -> Result<(), BpfError> {
        self.smtp_ports.add(port)
    }

    /// The counters and the disagreements counted so far: a few map
    /// reads, whatever the number of connections (what a scrape needs).
    pub fn totals(&self) -> Result<Totals, BpfError> {
        let map = |name: &str| self.ebpf.map(name).ok_or_else(|| missing(name));
        let negotiated =
            PerCpuArray::try_from(map(wire::MAP_NEGOTIATED)?).map_err(aya_err("negotiated"))?;
        let downgrades =
            PerCpuArray::try_from(map(wire::MAP_DOWNGRADES)?).map_err(aya_err("downgrades"))?;
        let parser = PerCpuArray::try_from(map(wire::MAP_PARSER)?).map_err(aya_err("parser"))?;
        let (negotiated, downgrades, parser) = counts(&negotiated, &downgrades, &parser)?;
        Ok(Totals {
            negotiated,
            downgrades,
            parser,
            disagreements: self.disagreements.load(Ordering::Relaxed),
        })
    }

    /// Records the relay's view of a finished session's sockets, for
    /// `tlsrelay stats` to set beside the wire's, and counts each socket
    /// whose wire record disagrees with it (one lookup per socket).
    pub fn record_session(&self, views: &[(u64, wire::RelayView)]) {
        let connections: Option<HashMap<&MapData, u64, wire::Connection>> = self
            .ebpf
            .map(wire::MAP_CONNECTIONS)
            .and_then(|m| HashMap::try_from(m).ok());
        let Ok(mut map) = self.relay_view.lock() else {
            return;
        };
        for (cookie, view) in views {
            let _ = map.insert(cookie, view, 0);
            let seen = connections.as_ref().and_then(|c| c.get(cookie, 0).ok());
            if seen.is_some_and(|c| !disagreements(&c, view).is_empty()) {
                self.disagreements.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The wire's counters summed over CPUs, and the sockets found in
/// disagreement with the relay since start.
#[derive(Debug)]
pub struct Totals {
    pub negotiated: Counts<5>,
    pub downgrades: Counts<4>,
    pub parser: Counts<6>,
    pub disagreements: u64,
}

fn load() -> Result<Ebpf, BpfError> {
    if PROGRAM.is_empty() {
        return Err(BpfError::NotBuilt);
    }
    Ebpf::load(PROGRAM).map_err(aya_err("loading the eBPF object"))
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let base = Path::new("/sys/fs/bpf");
    if !dir.starts_with(base) {
        return Ok(());
    }
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new("/sys/fs/bpf").unwrap();
    // SAFETY: statfs(2) with a valid C string writes into `st`, which we own.
    let statted = unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0;
    if statted && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").unwrap();
    // SAFETY: mount(2) with valid C strings.
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io_err("mounting bpffs on /sys/fs/bpf")(
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<(), BpfError> {
    ensure_bpffs(dir)?;
    fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    for name in PINNED {
        let path = dir.join(name);
        // A previous run's pin: replace it, counters start afresh.
        let _ = fs::remove_file(&path);
        let map = ebpf.map(name).ok_or_else(|| missing(name))?;
        map.pin(&path)
            .map_err(aya_err(format!("pinning {}", path.display())))?;
    }
    Ok(())
}

/// The cgroup v2 directory this process is in.
fn own_cgroup() -> Result<PathBuf, BpfError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading /proc/self/mountinfo"))?;
    let mount = mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or(BpfError::NoCgroup2)?;
    let own =
        fs::read_to_string("/proc/self/cgroup").map_err(io_err("reading /proc/self/cgroup"))?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(BpfError::NoCgroup2)?
        .trim()
        .trim_start_matches('/');
    Ok(mount.join(rel))
}

/// The kernel's cookie for a socket (what `bpf_get_socket_cookie` returns).
pub fn socket_cookie(socket: &impl AsRawFd) -> Option<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cookie)
}

/// Everything the pinned maps hold, joined by socket cookie.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub negotiated: Counts<5>,
    pub downgrades: Counts<4>,
    pub parser: Counts<6>,
    pub connections: Vec<ConnectionView>,
    pub disagreements: usize,
    /// Wire records without a relay view: a session still open, or a
    /// socket that is not this relay's.
    pub unaccounted: usize,
}

/// Named counters summed over CPUs.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct Counts<const N: usize>(pub std::collections::BTreeMap<&'static str, u64>);

#[derive(Debug, Serialize)]
pub struct ConnectionView {
    pub cookie: u64,
    pub local_port: u16,
    pub remote_port: u16,
    pub wire: WireSide,
    pub relay: Option<RelaySide>,
    pub disagreements: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct WireSide {
    pub offered_version: Option<&'static str>,
    pub negotiated_version: Option<&'static str>,
    pub cipher_suite: u16,
    pub plaintext: bool,
    pub plaintext_mail: bool,
    pub starttls: [bool; 3],
    pub handshake_alert: Option<u8>,
    pub unparsed: bool,
    pub reassembled: bool,
    pub key_exchange: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct RelaySide {
    pub leg: &'static str,
    pub negotiated_version: Option<&'static str>,
    pub cipher_suite: u16,
    pub downgraded: bool,
    pub handshake_failed: bool,
    pub tls_off: bool,
    pub refused: bool,
    /// TLS passed through: the relay read the hellos, terminated nothing.
    pub passthrough: bool,
    pub key_exchange: Option<&'static str>,
}

/// TLS 1.3 key exchange groups by code.
pub fn group_name(code: u16) -> Option<&'static str> {
    match code {
        0 => None,
        0x11ec => Some("X25519MLKEM768"),
        0x11eb => Some("SecP256r1MLKEM768"),
        0x001d => Some("X25519"),
        0x0017 => Some("secp256r1"),
        0x0018 => Some("secp384r1"),
        0x0019 => Some("secp521r1"),
        _ => Some("other"),
    }
}

/// What the wire and the relay say differently about one socket.
pub fn disagreements(c: &wire::Connection, r: &wire::RelayView) -> Vec<String> {
    let mut found = Vec::new();
    // A handshake that failed may have shown a ServerHello first.
    let settled = c.unparsed == 0 && r.handshake_failed == 0;
    let name = |v| version_name(v).unwrap_or("plaintext/none");
    if settled && c.negotiated_version != r.negotiated_version {
        found.push(format!(
            "version: wire {}, relay {}",
            name(c.negotiated_version),
            name(r.negotiated_version)
        ));
    }
    if settled && r.negotiated_version != 0 && c.cipher_suite != r.cipher_suite {
        found.push(format!(
            "cipher: wire {:#06x}, relay {:#06x}",
            c.cipher_suite, r.cipher_suite
        ));
    }
    if settled && r.key_share_group != 0 && c.key_share_group != r.key_share_group {
        found.push(format!(
            "key exchange: wire {}, relay {}",
            group_name(c.key_share_group).unwrap_or("none"),
            group_name(r.key_share_group).unwrap_or("none")
        ));
    }
    let wire_failed = c.handshake_alert != 0;
    let relay_failed = r.handshake_failed != 0;
    // After a TLS 1.3 ServerHello every alert is encrypted: a handshake the
    // relay ended there (a certificate DANE or the policy refused) looks
    // complete on the wire.
    let wire_blind = relay_failed && c.negotiated_version == wire::TLS1_3;
    if wire_failed != relay_failed && r.negotiated_version == 0 && !wire_blind {
        found.push(format!(
            "handshake failure: wire {wire_failed}, relay {}",
            r.handshake_failed != 0
        ));
    }
    if c.plaintext != 0 && r.negotiated_version != 0 {
        found.push(format!(
            "wire: plaintext, relay: {}",
            name(r.negotiated_version)
        ));
    }
    let unrecorded = r.negotiated_version == 0
        && r.downgraded == 0
        && r.tls_off == 0
        && r.handshake_failed == 0
        && r.refused == 0;
    if unrecorded && c.plaintext_mail != 0 && c.starttls_offered != 0 {
        found.push(
            "wire: STARTTLS offered, mail in cleartext (stripped); relay recorded no downgrade"
                .into(),
        );
    } else if unrecorded && c.plaintext != 0 {
        found.push("wire: plaintext; relay recorded no downgrade".into());
    }
    found
}

pub fn version_name(v: u16) -> Option<&'static str> {
    match v {
        0 => None,
        wire::TLS1_0 => Some("TLSv1.0"),
        wire::TLS1_1 => Some("TLSv1.1"),
        wire::TLS1_2 => Some("TLSv1.2"),
        wire::TLS1_3 => Some("TLSv1.3"),
        _ => Some("unknown"),
    }
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map, BpfError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(aya_err(format!("opening {}", path.display())))?;
    Map::from_map_data(data).map_err(aya_err(format!("reading {}", path.display())))
}

/// Sums the per-CPU copies of a counter record.
fn sum<T: aya::Pod + Default + wire::Accumulate>(values: &aya::maps::PerCpuValues<T>) -> T {
    let mut total = T::default();
    for v in values.iter() {
        total.accumulate(v);
    }
    total
}

/// A counter record, summed over its per-CPU copies.
fn counters<T: aya::Pod + Default + wire::Accumulate, M: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<M, T>,
    name: &str,
) -> Result<T, BpfError> {
    Ok(sum(&array.get(&0, 0).map_err(aya_err(name.to_string()))?))
}

/// One socket as the wire and the relay saw it.
fn connection_view(
    cookie: u64,
    c: &wire::Connection,
    relay: Option<wire::RelayView>,
    disagreements: Vec<String>,
) -> ConnectionView {
    ConnectionView {
        cookie,
        local_port: c.local_port,
        remote_port: c.remote_port,
        wire: WireSide {
            offered_version: version_name(c.offered_version),
            negotiated_version: version_name(c.negotiated_version),
            cipher_suite: c.cipher_suite,
            plaintext: c.plaintext != 0,
            plaintext_mail: c.plaintext_mail != 0,
            starttls: [
                c.starttls_offered != 0,
                c.starttls_issued != 0,
                c.starttls_accepted != 0,
            ],
            handshake_alert: (c.handshake_alert != 0).then_some(c.alert_description),
            unparsed: c.unparsed != 0,
            reassembled: c.reassembled != 0,
            key_exchange: group_name(c.key_share_group),
        },
        relay: relay.map(|r| RelaySide {
            leg: if r.leg == wire::LEG_CLIENT {
                "client"
            } else {
                "upstream"
            },
            negotiated_version: version_name(r.negotiated_version),
            cipher_suite: r.cipher_suite,
            downgraded: r.downgraded != 0,
            handshake_failed: r.handshake_failed != 0,
            tls_off: r.tls_off != 0,
            refused: r.refused != 0,
            passthrough: r.passthrough != 0,
            key_exchange: group_name(r.key_share_group),
        }),
        disagreements,
    }
}

/// Reads the pinned maps (no running relay needed) and joins the wire's
/// records with the relay's, flagging each disagreement.
pub fn snapshot(dir: &Path) -> Result<Snapshot, BpfError> {
    let typed = |name: &str| open_pinned(dir, name);
    let negotiated =
        PerCpuArray::try_from(typed(wire::MAP_NEGOTIATED)?).map_err(aya_err("negotiated"))?;
    let downgrades =
        PerCpuArray::try_from(typed(wire::MAP_DOWNGRADES)?).map_err(aya_err("downgrades"))?;
    let parser = PerCpuArray::try_from(typed(wire::MAP_PARSER)?).map_err(aya_err("parser"))?;
    let conns: HashMap<MapData, u64, wire::Connection> =
        HashMap::try_from(typed(wire::MAP_CONNECTIONS)?).map_err(aya_err("connections"))?;
    let views: HashMap<MapData, u64, wire::RelayView> =
        HashMap::try_from(typed(wire::MAP_RELAY_VIEW)?).map_err(aya_err("relay_view"))?;
    join(&negotiated, &downgrades, &parser, &conns, &views)
}

/// The snapshot from the maps themselves, however they were opened.
fn join<M: std::borrow::Borrow<MapData>, V: std::borrow::Borrow<MapData>>(
    negotiated: &PerCpuArray<M, wire::Negotiated>,
    downgrades: &PerCpuArray<M, wire::Downgrades>,
    parser: &PerCpuArray<M, wire::Parser>,
    conns: &HashMap<M, u64, wire::Connection>,
    views: &HashMap<V, u64, wire::RelayView>,
) -> Result<Snapshot, BpfError> {
    let (negotiated, downgrades, parser) = counts(negotiated, downgrades, parser)?;
    let mut connections = Vec::new();
    for entry in conns.iter() {
        let (cookie, c) = entry.map_err(aya_err("connections"))?;
        let relay = views.get(&cookie, 0).ok();
        let disagreements = relay
            .as_ref()
            .map_or_else(Vec::new, |r| disagreements(&c, r));
        connections.push(connection_view(cookie, &c, relay, disagreements));
    }
    connections.sort_by_key(|c| c.cookie);
    let disagreements = connections.iter().map(|c| c.disagreements.len()).sum();
    let unaccounted = connections.iter().filter(|c| c.relay.is_none()).count();
    Ok(Snapshot {
        negotiated,
        downgrades,
        parser,
        connections,
        disagreements,
        unaccounted,
    })
}

/// The three counter records, summed over CPUs and named.
#[allow(clippy::type_complexity)]
fn counts<M: std::borrow::Borrow<MapData>>(
    negotiated: &PerCpuArray<M, wire::Negotiated>,
    downgrades: &PerCpuArray<M, wire::Downgrades>,
    parser: &PerCpuArray<M, wire::Parser>,
) -> Result<(Counts<5>, Counts<4>, Counts<6>), BpfError> {
    let n: wire::Negotiated = counters(negotiated, wire::MAP_NEGOTIATED)?;
    let d: wire::Downgrades = counters(downgrades, wire::MAP_DOWNGRADES)?;
    let p: wire::Parser = counters(parser, wire::MAP_PARSER)?;
    let named = |pairs: &[(&'static str, u64)]| pairs.iter().copied().collect();
    Ok((
        Counts(named(&[
            ("plaintext", n.plaintext),
            ("tls1_0", n.tls1_0),
            ("tls1_1", n.tls1_1),
            ("tls1_2", n.tls1_2),
            ("tls1_3", n.tls1_3),
        ])),
        Counts(named(&[
            ("version", d.version),
            ("plaintext", d.plaintext),
            ("stripped", d.stripped),
            ("handshake_failed", d.handshake_failed),
        ])),
        Counts(named(&[
            ("segments", p.segments),
            ("client_hellos", p.client_hellos),
            ("server_hellos", p.server_hellos),
            ("hello_retry_requests", p.hello_retry_requests),
            ("unparsed", p.unparsed),
            ("reassembled", p.reassembled),
        ])),
    ))
}

/// The program loaded but not attached, for running crafted packets
/// through it with BPF_PROG_TEST_RUN (the parser tests).
pub struct Detached {
    ebpf: Ebpf,
}

impl Detached {
    pub fn load() -> Result<Detached, BpfError> {
        let mut ebpf = load()?;
        for (name, _) in PROGRAMS {
            let program: &mut CgroupSkb = ebpf
                .program_mut(name)
                .unwrap()
                .try_into()
                .map_err(aya_err(name))?;
            program.load().map_err(aya_err(format!("loading {name}")))?;
        }
        let mut ports: Array<_, u16> = Array::try_from(ebpf.map_mut(wire::MAP_SMTP_PORTS).unwrap())
            .map_err(aya_err("smtp_ports"))?;
        for (i, port) in SMTP_PORTS.iter().enumerate() {
            ports
                .set(i as u32, port, 0)
                .map_err(aya_err("smtp_ports"))?;
        }
        Ok(Detached { ebpf })
    }

    /// Runs one IP packet (as an L2 frame, as the kernel's test runner
    /// wants) through the ingress or egress program.
    pub fn run(&mut self, egress: bool, ip_packet: &[u8]) -> Result<u32, BpfError> {
        use aya::programs::{TestRun, TestRunOptions};
        let name = if egress {
            "wire_egress"
        } else {
            "wire_ingress"
        };
        let program: &CgroupSkb = self
            .ebpf
            .program(name)
            .unwrap()
            .try_into()
            .map_err(aya_err(name))?;
        let ethertype: [u8; 2] = if ip_packet.first().is_some_and(|b| b >> 4 == 6) {
            [0x86, 0xdd]
        } else {
            [0x08, 0x00]
        };
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ethertype);
        frame.extend_from_slice(ip_packet);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        let result = program
            .test_run(opts)
            .map_err(aya_err("BPF_PROG_TEST_RUN"))?;
        Ok(result.return_value)
    }

    /// The per-connection records (each test run is its own socket).
    pub fn connections(&self) -> Result<Vec<(u64, wire::Connection)>, BpfError> {
        let map: HashMap<&MapData, u64, wire::Connection> =
            HashMap::try_from(self.ebpf.map(wire::MAP_CONNECTIONS).unwrap())
                .map_err(aya_err("connections"))?;
        map.iter()
            .map(|e| e.map_err(aya_err("connections")))
            .collect()
    }

    /// The per-connection records, removed from the map: a run of
    /// generated packets looks at each packet's record alone.
    pub fn take_connections(&mut self) -> Result<Vec<(u64, wire::Connection)>, BpfError> {
        let mut map: HashMap<&mut MapData, u64, wire::Connection> =
            HashMap::try_from(self.ebpf.map_mut(wire::MAP_CONNECTIONS).unwrap())
                .map_err(aya_err("connections"))?;
        let all = map
            .iter()
            .map(|e| e.map_err(aya_err("connections")))
            .collect::<Result<Vec<_>, _>>()?;
        for (cookie, _) in &all {
            map.remove(cookie).map_err(aya_err("connections"))?;
        }
        Ok(all)
    }

    /// One of the counter records, summed over CPUs.
    pub fn counters<T: aya::Pod + Default + wire::Accumulate>(
        &self,
        name: &str,
    ) -> Result<T, BpfError> {
        let array: PerCpuArray<&MapData, T> = PerCpuArray::try_from(self.ebpf.map(name).unwrap())
            .map_err(aya_err(name.to_string()))?;
        Ok(sum(&array.get(&0, 0).map_err(aya_err(name.to_string()))?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls13() -> (wire::Connection, wire::RelayView) {
        let c = wire::Connection {
            offered_version: wire::TLS1_3,
            negotiated_version: wire::TLS1_3,
            cipher_suite: 0x1302,
            key_share_group: 0x11ec,
            tls_started: 1,
            ..Default::default()
        };
        let r = wire::RelayView {
            negotiated_version: wire::TLS1_3,
            cipher_suite: 0x1302,
            key_share_group: 0x11ec,
            leg: wire::LEG_CLIENT,
            ..Default::default()
        };
        (c, r)
    }

    #[test]
    fn agreeing_records_have_no_disagreement() {
        let (c, r) = tls13();
        assert!(disagreements(&c, &r).is_empty());
    }

    /// Each contradiction issue 12 lists, as stats reports it.
    #[test]
    fn every_contradiction_is_flagged() {
        let (mut c, r) = tls13();
        c.key_share_group = 0x001d;
        assert_eq!(
            disagreements(&c, &r),
            ["key exchange: wire X25519, relay X25519MLKEM768"]
        );
        // A split hello taken for plaintext (the old program's mistake).
        let (_, r) = tls13();
        let c = wire::Connection {
            plaintext: 1,
            unparsed: 1,
            ..Default::default()
        };
        assert_eq!(disagreements(&c, &r), ["wire: plaintext, relay: TLSv1.3"]);
        // STARTTLS stripped on the wire, no downgrade in the relay's view.
        let c = wire::Connection {
            starttls_offered: 1,
            plaintext_mail: 1,
            plaintext: 1,
            ..Default::default()
        };
        let quiet = wire::RelayView::default();
        assert_eq!(
            disagreements(&c, &quiet),
            ["wire: STARTTLS offered, mail in cleartext (stripped); relay recorded no downgrade"]
        );
        let recorded = wire::RelayView {
            downgraded: 1,
            ..Default::default()
        };
        assert!(disagreements(&c, &recorded).is_empty());
        // Plaintext on the wire: a downgrade unless TLS is off by design.
        let c = wire::Connection {
            plaintext: 1,
            ..Default::default()
        };
        assert_eq!(
            disagreements(&c, &quiet),
            ["wire: plaintext; relay recorded no downgrade"]
        );
        let off = wire::RelayView {
            tls_off: 1,
            ..Default::default()
        };
        assert!(disagreements(&c, &off).is_empty());
        // Plaintext the relay refused (a listener that requires TLS).
        let refused = wire::RelayView {
            refused: 1,
            ..Default::default()
        };
        assert!(disagreements(&c, &refused).is_empty());
        // A TLS 1.3 certificate the relay refused: its alert is encrypted,
        // the wire saw a ServerHello and nothing after.
        let c = wire::Connection {
            negotiated_version: wire::TLS1_3,
            ..Default::default()
        };
        let failed = wire::RelayView {
            handshake_failed: 1,
            ..Default::default()
        };
        assert!(disagreements(&c, &failed).is_empty());
        // Before TLS 1.3's encryption, a failure the wire missed is flagged.
        let c = wire::Connection::default();
        assert_eq!(
            disagreements(&c, &failed),
            ["handshake failure: wire false, relay true"]
        );
    }
}
