//! The `tlsrelay` binary as an operator meets it: exit codes, messages,
//! the startup banner, relaying, and the self-signed certificate kept in
//! the state directory across restarts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tlsrelay_tests::{patience, relay_binary};

fn tlsrelay(args: &[&str]) -> std::process::Output {
    Command::new(relay_binary()).args(args).output().unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_prints_the_effective_policy_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "relay.toml",
        r#"
dataplane.workers = 3

[[listeners]]
name = "partners"
address = "127.0.0.1:0"
upstream = "mx"
tls.mode = "required"
tls.min_version = "1.3"

[[upstreams]]
name = "mx"
address = "mx.partner.example:25"
tls.policy = "required"
tls.verify = "name"
tls.names = ["*.partner.example"]
"#,
    );
    let out = tlsrelay(&["check", &file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("data plane: "), "{stdout}");
    // Which pump runs, and why.
    assert!(
        stdout
            .contains("splice via io_uring, 3 workers (dataplane.pump = \"epoll\" for the other)")
            || stdout.contains("splice via epoll (io_uring unavailable: "),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "listener partners on 127.0.0.1:0 (tcp): inbound TLS required, minimum TLSv1.3"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream mx at mx.partner.example:25: outbound TLS required, verify name [*.partner.example]"),
        "{stdout}"
    );
}

#[test]
fn check_rejects_an_invalid_file_with_exit_2_and_the_location() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.toml",
        "[[listeners]]\nname = \"a\"\naddress = \"127.0.0.1:0\"\nupstream = \"u\"\ntls.mode = \"opportunstic\"\n",
    );
    let out = tlsrelay(&["check", &file]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{file}:5: listeners[0].tls.mode: unknown mode 'opportunstic', expected one of off, opportunistic, required, implicit"
        )),
        "{stderr}"
    );
    let missing = tlsrelay(&["check", "/nonexistent/relay.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/relay.toml: cannot read")
    );
    let run = tlsrelay(&["run", "--config", &file]);
    assert_eq!(
        run.status.code(),
        Some(2),
        "run refuses an invalid config too"
    );
}

#[test]
fn every_subcommand_has_help() {
    for sub in [&["--help"][..], &["run", "--help"], &["check", "--help"]] {
        let out = tlsrelay(sub);
        assert_eq!(out.status.code(), Some(0), "{sub:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: tlsrelay"),
            "{sub:?}"
        );
    }
    let run_help = String::from_utf8_lossy(&tlsrelay(&["run", "--help"]).stdout).to_string();
    assert!(
        run_help.contains("--config") && run_help.contains("--state-dir"),
        "{run_help}"
    );
}

/// The subcommands `tlsrelay --help` lists.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(tlsrelay(&["--help"]).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Each subcommand the help lists has its man page, named in tlsrelay(8),
/// and the shells' completion scripts offer it; tlsrelay.toml(5) has the
/// configuration's tables.
#[test]
fn man_pages_and_completions_cover_every_subcommand() {
    let subs = subcommands();
    assert!(
        subs.len() >= 8 && subs.contains(&"run".to_string()),
        "{subs:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = tlsrelay(&["man", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let main = std::fs::read_to_string(dir.path().join("tlsrelay.8")).unwrap();
    assert!(main.contains(".TH tlsrelay 8"), "{main}");
    for sub in &subs {
        let page = dir.path().join(format!("tlsrelay-{sub}.8"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.contains(&format!("tlsrelay {sub}")),
            "{}",
            page.display()
        );
        assert!(
            main.contains(&format!("tlsrelay\\-{sub}(8)")),
            "tlsrelay.8 lacks {sub}"
        );
    }
    let config = std::fs::read_to_string(dir.path().join("tlsrelay.toml.5")).unwrap();
    for table in ["[[listeners]]", "[limits]", "[[outbound_connectors]]"] {
        assert!(
            config.contains(&format!(".SH {table}")),
            "tlsrelay.toml.5 lacks {table}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = tlsrelay(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        for sub in &subs {
            assert!(
                script.contains(sub.as_str()),
                "{shell} completion lacks {sub}"
            );
        }
    }
}

/// A running `tlsrelay run` and the addresses it printed.
struct Running {
    child: Child,
    listeners: Vec<(String, SocketAddr)>,
    banner: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_relay(config: &str, state: &Path) -> Running {
    run_relay_with(Command::new(relay_binary()), config, state)
}

fn run_relay_with(mut command: Command, config: &str, state: &Path) -> Running {
    let mut child = command
        .args(["run", "--config", config, "--state-dir"])
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut listeners = Vec::new();
    let mut banner = String::new();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("tlsrelay exited during startup: {err}");
        };
        banner += &line;
        banner.push('\n');
        if let Some(rest) = line.trim().strip_prefix("listener ") {
            if let Some((name, addr)) = rest.split_once(" listening on ") {
                listeners.push((name.to_string(), addr.parse().unwrap()));
            }
        }
        if line.trim().starts_with("state directory") {
            break;
        }
    }
    // Keep draining the log so the relay never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Running {
        child,
        listeners,
        banner,
    }
}

#[test]
fn run_relays_and_keeps_its_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                let _ = s.write_all(&buf);
            });
        }
    });
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            r#"
ebpf.enabled = false

[[listeners]]
name = "plain"
address = "127.0.0.1:0"
upstream = "echo"
tls.mode = "opportunistic"

[[upstreams]]
name = "echo"
address = "{upstream}"
tls.policy = "plain"
"#
        ),
    );
    let relay = run_relay(&config, &state);
    assert_eq!(relay.listeners.len(), 1);
    let mut client = TcpStream::connect(relay.listeners[0].1).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    client.write_all(b"through the binary").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"through the binary");

    let cert_path = state.join("self-signed.crt");
    let first =
        std::fs::read(&cert_path).expect("self-signed certificate generated on first start");
    drop(relay);
    let _again = run_relay(&config, &state);
    assert_eq!(
        std::fs::read(&cert_path).unwrap(),
        first,
        "reused, not regenerated"
    );
    let key_mode = std::fs::metadata(state.join("self-signed.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        key_mode.permissions().mode() & 0o777,
        0o600,
        "private key readable by owner only"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A reader that stops reading must stall the sender, not grow the relay:
/// memory per connection is bounded whatever the transfer size.
#[test]
fn slow_reader_applies_backpressure_not_buffering() {
    const TOTAL: usize = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = sink.local_addr().unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = sink.accept().unwrap();
        release_rx.recv().unwrap(); // hold off reading until told
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            match s.read(&mut buf).unwrap() {
                0 => break total,
                n => total += n,
            }
        }
    });
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"sink\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"sink\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    );
    let relay = run_relay(&config, &dir.path().join("state"));
    let pid = relay.child.id();
    let baseline = rss_kib(pid);
    let addr = relay.listeners[0].1;
    let written = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    let writer = std::thread::spawn(move || {
        let mut c = TcpStream::connect(addr).unwrap();
        let chunk = vec![0x5Au8; 64 << 10];
        for _ in 0..TOTAL / chunk.len() {
            c.write_all(&chunk).unwrap();
            progress.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
        c.shutdown(std::net::Shutdown::Write).unwrap();
    });
    // The writer is stalled once every buffer on the way is full: its
    // count stops moving (or it finished, which the assert below refuses).
    let mut last = usize::MAX;
    let deadline = std::time::Instant::now() + patience();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        if (now == last && now > 0) || writer.is_finished() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never stalled"
        );
        last = now;
    }
    let stalled = rss_kib(pid);
    assert!(
        !writer.is_finished(),
        "the sender should be stalled while nobody reads"
    );
    assert!(
        stalled < baseline + 16 * 1024,
        "relay RSS grew from {baseline} KiB to {stalled} KiB with a stalled reader"
    );
    release_tx.send(()).unwrap();
    writer.join().unwrap();
    assert_eq!(
        reader.join().unwrap(),
        TOTAL,
        "every byte arrives once the reader reads"
    );
}

/// Without privileges the relay runs on and says once that the eBPF
/// counters are off.
#[cfg_attr(missing_root, ignore = "needs root")]
#[test]
fn unprivileged_relay_runs_without_wire_counters() {
    if !tlsrelay_tests::is_root() {
        eprintln!("skipped: needs root to drop to nobody");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in echo.incoming().flatten() {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let _ = s.write_all(&buf);
        }
    });
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut as_nobody = Command::new("setpriv");
    as_nobody.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        relay_binary(),
    ]);
    let relay = run_relay_with(as_nobody, &config, &state);
    assert!(
        relay.banner.contains("eBPF wire counters off:"),
        "{}",
        relay.banner
    );
    let mut c = TcpStream::connect(relay.listeners[0].1).unwrap();
    c.write_all(b"still relayed").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"still relayed");
}

/// An idle TLS session costs the relay little: buffers come when bytes
/// flow and go when they stop, and a TCP session's task is not sized for
/// an SMTP session. Was 38.8 KiB per idle TLS connection (HAProxy: 18).
#[test]
fn idle_tls_sessions_hold_little_memory() {
    const SESSIONS: usize = 600;
    // The sessions' client ends and the echo server's, all in this process.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a live struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    assert!(
        limit.rlim_cur >= 2 * 700,
        "open-file limit {}",
        limit.rlim_cur
    );
    let pki = tlsrelay_tests::Pki::new();
    let leaf = pki.leaf("relay", &["relay.test"]);
    let dir = tempfile::tempdir().unwrap();
    let upstream = tlsrelay_tests::blocking::echo_server();
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "ebpf.enabled = false\n[limits]\nmax_connections_per_client = 1000\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"implicit\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n",
            leaf.chain.display().to_string(),
            leaf.key.display().to_string(),
        ),
    );
    let relay = run_relay(&config, &dir.path().join("state"));
    let addr = relay.listeners[0].1;
    let roots = pki.roots();
    let open = |n: usize| -> Vec<tlsrelay_tests::blocking::Tls> {
        (0..n)
            .map(|_| tlsrelay_tests::blocking::tls_session(addr, &roots).unwrap())
            .collect()
    };
    // Warm the allocator and the runtime, then measure what more sessions add.
    let warm = open(50);
    std::thread::sleep(Duration::from_millis(300));
    let before = rss_kib(relay.child.id());
    let mut held = open(SESSIONS);
    // Idle sessions give their buffers back after an idle second: the
    // figure falls to its floor, waited for rather than slept past.
    let deadline = std::time::Instant::now() + patience();
    let per_session = loop {
        std::thread::sleep(Duration::from_millis(250));
        let per_session = (rss_kib(relay.child.id()) - before) as f64 / SESSIONS as f64;
        if per_session < 24.0 || std::time::Instant::now() > deadline {
            break per_session;
        }
    };
    eprintln!("{per_session:.1} KiB per idle TLS session");
    assert!(
        per_session < 24.0,
        "{per_session:.1} KiB per idle TLS session"
    );
    // Idle, not dead: they still relay.
    for tls in held.iter_mut().step_by(100) {
        tlsrelay_tests::blocking::echo(tls).unwrap();
    }
    drop(warm);
}

/// `check` describes the plan as built, so what it prints is what is
/// enforced: the names a connector's next hops must carry when none are
/// configured (each hop's own), and a route's server name.
#[test]
fn check_describes_the_names_each_next_hop_is_verified_against() {
    let dir = tempfile::tempdir().unwrap();
    let anchors = tlsrelay_tests::Pki::new();
    let file = write(
        dir.path(),
        "relay.toml",
        &format!(
            r#"
ebpf.enabled = false
accepted_domains = ["example.org"]
[[listeners]]
name = "mx"
address = "127.0.0.1:0"
protocol = "smtp"
hostname = "relay.test"
tls.mode = "off"
[[listeners]]
name = "t"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "off"
[[upstreams]]
name = "up"
address = "backend.example:443"
tls.policy = "required"
tls.server_name = "api.example"
tls.trust_anchors = {anchors}
[[outbound_connectors]]
name = "inside"
recipient_domains = ["example.org"]
next_hops = ["mx1.example.org:25", "192.0.2.7:25"]
tls.policy = "required"
tls.verify = "name"
tls.trust_anchors = {anchors}
"#,
            anchors = tlsrelay_tests::toml_path(&anchors.ca_pem),
        ),
    );
    let out = tlsrelay(&["check", &file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let line = |start: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(start))
            .unwrap_or_else(|| panic!("no '{start}' line: {stdout}"))
            .to_string()
    };
    let connector = line("outbound connector inside");
    assert!(
        connector.contains("verify name [mx1.example.org]")
            && connector.contains("; 192.0.2.7:25, verify name [192.0.2.7]"),
        "{connector}"
    );
    assert!(
        line("upstream up").contains("verify name [api.example]"),
        "{stdout}"
    );
}

/// An SMTP listener's limits are printed by `check`, so an operator knows
/// what a stranger can make it hold (the embedded default's mx listener).
#[test]
fn check_prints_an_smtp_listeners_limits() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../core/src/default.toml");
    let out = tlsrelay(&["check", default]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mx = stdout
        .lines()
        .find(|l| l.contains("listener mx on"))
        .unwrap_or_else(|| panic!("no mx listener in:\n{stdout}"));
    assert!(
        mx.ends_with("limits: messages of 52428800 bytes, 1000 recipients per transaction, lines of 1000 octets"),
        "{mx}"
    );
    // What bounds a slow or hostile client (tests/hostile_clients.rs).
    let limits = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("limits:"))
        .unwrap_or_else(|| panic!("no limits line in:\n{stdout}"));
    for bound in [
        "1000 connections in all, 100 per client address",
        "TLS handshake (and a TCP client's first byte) within 10s",
        "SMTP clients: 300s of waiting per command (in all, not per read)",
        "message data at 500 bytes/s or faster",
        "421 after 20 errors",
        "past 100 commands that move no mail",
    ] {
        assert!(limits.contains(bound), "{bound:?} not in {limits}");
    }
}

/// The fields of a /proc status file line, e.g. "Uid:" -> its values.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Started as root with `user = "nobody"`, the relay binds, attaches its
/// eBPF program and generates its certificate as root, then every thread
/// runs as nobody with CAP_SYS_RESOURCE alone (no_new_privs set); it
/// still relays, its metrics still read the wire counters, its state
/// directory is nobody's and a reload reads it as nobody.
#[cfg_attr(missing_ebpf, ignore = "needs root and the eBPF toolchain")]
#[test]
fn started_as_root_it_serves_as_its_user_with_one_capability() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    let upstream = tlsrelay_tests::blocking::echo_server();
    let metrics = format!("127.0.0.1:{}", tlsrelay_tests::free_port());
    let pin_dir = format!("/sys/fs/bpf/tlsrelay-test-user-{}", std::process::id());
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "user = \"nobody\"\nebpf.pin_dir = \"{pin_dir}\"\n[metrics]\naddress = \"{metrics}\"\n\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"opportunistic\"\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut relay = tlsrelay_tests::process::RelayProcess::start(
        relay_binary(),
        Path::new(&config),
        &state,
        &[],
        &[],
    );
    let banner = relay.log().join("\n");
    // CAP_SYS_RESOURCE (bit 24) is kept where the relay had it: some
    // containers' root lacks it.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let had = u64::from_str_radix(&status_field(&own, "CapPrm:"), 16).unwrap() & (1 << 24);
    let (kept, mask) = match had {
        0 => ("none", "0000000000000000"),
        _ => (
            "CAP_SYS_RESOURCE (splice pipes past fs.pipe-user-pages-soft)",
            "0000000001000000",
        ),
    };
    assert!(
        banner.contains(&format!(
            "privileges: running as user nobody (uid 65534, gid 65534); capabilities kept: {kept}"
        )),
        "{banner}"
    );
    assert!(banner.contains("eBPF wire counters on"), "{banner}");
    let pid = relay.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert_eq!(status_field(&status, "Uid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(&status, "Gid:"), "65534 65534 65534 65534");
    assert_eq!(status_field(&status, "Groups:"), "65534");
    assert_eq!(status_field(&status, "CapEff:"), mask);
    assert_eq!(status_field(&status, "CapPrm:"), mask);
    assert_eq!(status_field(&status, "CapInh:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapAmb:"), "0000000000000000");
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    // Relay a session first, so the runtime's threads all exist.
    let mut c = TcpStream::connect(relay.addr("in")).unwrap();
    c.write_all(b"as nobody").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"as nobody");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let name = status_field(&status, "Name:");
        assert_eq!(
            status_field(&status, "Uid:"),
            "65534 65534 65534 65534",
            "{name}"
        );
        let eff = u64::from_str_radix(&status_field(&status, "CapEff:"), 16).unwrap();
        assert_eq!(eff & !(1 << 24), 0, "thread {name} has {eff:x}");
    }
    // The wire counters, read through the maps held since start.
    let scrape = {
        let mut s = TcpStream::connect(&metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    assert!(
        scrape.contains("tlsrelay_wire_negotiated_total{version=\"plaintext\"}"),
        "{scrape}"
    );
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o700));
    let key = std::fs::metadata(state.join("self-signed.key")).unwrap();
    assert_eq!((key.uid(), key.mode() & 0o777), (65534, 0o600));
    // A reload reads the configuration and the state directory as nobody.
    relay.signal(libc::SIGHUP);
    relay.wait_for_log("configuration reloaded");
    let _ = relay.child.kill();
    let _ = relay.child.wait();
    let _ = std::fs::remove_dir_all(&pin_dir);
}

/// A state file replaced by a symlink to someone else's file is replaced,
/// not written through: the generated private key never lands in the
/// file the link points at.
#[test]
fn generated_state_files_replace_symlinks_instead_of_following_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let bait = dir.path().join("attackers-file");
    std::fs::write(&bait, b"").unwrap();
    std::fs::set_permissions(&bait, std::fs::Permissions::from_mode(0o666)).unwrap();
    std::os::unix::fs::symlink(&bait, state.join("self-signed.key")).unwrap();
    let upstream = tlsrelay_tests::blocking::echo_server();
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"implicit\"\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    );
    let _relay = run_relay(&config, &state);
    assert_eq!(
        std::fs::read(&bait).unwrap(),
        b"",
        "nothing written through the link"
    );
    let key = std::fs::symlink_metadata(state.join("self-signed.key")).unwrap();
    assert!(
        key.file_type().is_file(),
        "the link was replaced by the key"
    );
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

/// `check` warns about private keys others can read and a state directory
/// others can write.
#[test]
fn check_warns_about_readable_keys_and_a_writable_state_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = tlsrelay_tests::Pki::new();
    let leaf = pki.leaf("relay", &["relay.test"]);
    std::fs::set_permissions(&leaf.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = write(
        dir.path(),
        "relay.toml",
        &format!(
            "state_dir = {:?}\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\ntls.mode = \"implicit\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n\n[[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:9\"\ntls.policy = \"plain\"\n",
            state.display().to_string(),
            leaf.chain.display().to_string(),
            leaf.key.display().to_string(),
        ),
    );
    let out = tlsrelay(&["check", &file]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "warning: private key {} is readable by anyone (mode 0644)",
            leaf.key.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "warning: state directory {} can be written by others (mode 0777)",
            state.display()
        )),
        "{stdout}"
    );
}
