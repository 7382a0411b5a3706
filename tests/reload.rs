//! Certificate rotation under load, through the `tlsrelay` binary: a client
//! loop keeps relaying while the certificate files are swapped (file
//! watch) and a broken pair is put in place (SIGHUP): no connection fails,
//! an established connection keeps its certificate, new ones get the new
//! one, and the broken replacement leaves the last good one serving.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tlsrelay_tests::relay_binary;

use rustls::pki_types::CertificateDer;
use tlsrelay_tests::blocking::{echo, echo_server, tls_session as connect, Tls};
use tlsrelay_tests::process::RelayProcess;
use tlsrelay_tests::{LeafSpec, Pki};

fn served(tls: &Tls) -> CertificateDer<'static> {
    tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn first_cert(path: &Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(path).unwrap()
}

/// Replaces `to` with `from`'s bytes the way deploy tools do: write a
/// temporary file, rename it over.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[test]
fn certificate_swap_under_load_drops_nothing() {
    let pki = Pki::new();
    let dir = pki.dir();
    let spec = LeafSpec {
        names: vec!["relay.test"],
        ..LeafSpec::default()
    };
    let v1 = pki.issue("v1", &spec);
    let v2 = pki.issue("v2", &spec);
    let (crt, key) = (dir.join("served.crt"), dir.join("served.key"));
    replace(&v1.chain, &crt);
    replace(&v1.key, &key);
    let upstream = echo_server();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"implicit\"\ntls.certificates = [{{ chain = \"served.crt\", key = \"served.key\" }}]\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
        ),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut relay = RelayProcess::start(relay_binary(), &config, state.path(), &[], &[]);
    let addr = relay.addr("edge");
    let roots = pki.roots();

    // Established before the swap; must outlive it untouched.
    let mut old = connect(addr, &roots).unwrap();
    assert_eq!(served(&old), first_cert(&v1.chain));

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Result<CertificateDer<'static>, String>>>> = Arc::default();
    let load = {
        let (stop, seen, roots) = (stop.clone(), seen.clone(), roots.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let outcome = connect(addr, &roots).map(|tls| served(&tls));
                seen.lock().unwrap().push(outcome);
            }
        })
    };
    let wait_for = |cert: &CertificateDer<'static>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if seen
                .lock()
                .unwrap()
                .iter()
                .rev()
                .take(3)
                .all(|s| s.as_ref() == Ok(cert))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "new connections never got {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Rotation by file change: the key first, then the certificate, as a
    // careless deploy would (the mismatched moment must not break anything).
    wait_for(&first_cert(&v1.chain), "the first certificate under load");
    replace(&v2.key, &key);
    replace(&v2.chain, &crt);
    wait_for(&first_cert(&v2.chain), "the rotated certificate");
    relay.wait_for_log("configuration reloaded (a watched file changed)");
    echo(&mut old).expect("the established connection goes on");
    assert_eq!(
        served(&old),
        first_cert(&v1.chain),
        "and keeps its certificate"
    );

    // A broken replacement (v1's key with v2's certificate), announced with
    // SIGHUP: refused, v2 keeps serving.
    std::fs::write(&key, std::fs::read(&v1.key).unwrap()).unwrap();
    relay.signal(libc::SIGHUP);
    let refusal = relay.wait_for_log("reload (SIGHUP) failed");
    assert!(
        refusal.contains("does not match the certificate"),
        "{refusal}"
    );
    let before = seen.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < before + 20 {
        assert!(Instant::now() < deadline, "the client loop stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    let seen = seen.lock().unwrap();
    let failed: Vec<&String> = seen.iter().filter_map(|s| s.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        seen.len()
    );
    assert!(
        seen[before..]
            .iter()
            .all(|s| s.as_ref() == Ok(&first_cert(&v2.chain))),
        "after the broken replacement new connections still get v2"
    );
    assert!(seen.len() > 50, "the loop ran ({} connections)", seen.len());
    echo(&mut old).expect("the first connection still relays");
}

#[test]
fn ready_reload_and_stopping_reach_systemd() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let systemd = UnixDatagram::bind(&socket_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "ebpf.enabled = false\n[[listeners]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\ntls.mode = \"opportunistic\"\n[[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:9\"\ntls.policy = \"plain\"\n",
    )
    .unwrap();
    let relay = RelayProcess::start(
        relay_binary(),
        &config,
        dir.path(),
        &[],
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = systemd.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    relay.signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1");
    relay.signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1");
}

#[test]
fn listener_changes_that_need_a_restart_are_logged_and_the_rest_applies() {
    use tlsrelay_tests::blocking::plain_session;
    let dir = tempfile::tempdir().unwrap();
    let upstream = echo_server();
    let listener = |name: &str| {
        format!("[[listeners]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"opportunistic\"\n")
    };
    let tail = format!(
        "[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n"
    );
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!("ebpf.enabled = false\n{}{tail}", listener("a")),
    )
    .unwrap();
    let mut relay = RelayProcess::start(relay_binary(), &config, dir.path(), &[], &[]);
    std::fs::write(
        &config,
        format!("ebpf.enabled = false\n{}{tail}", listener("b")),
    )
    .unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_for_log("listener b is new: starting it needs a restart");
    relay.wait_for_log("listener a was removed: it keeps serving until a restart");
    plain_session(relay.addr("a")).expect("a still relays");
}
