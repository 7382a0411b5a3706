//! OCSP stapling: a listener certificate's `ocsp_response` (made here by
//! `openssl ocsp` as the CA) is stapled to handshakes, as `openssl s_client
//! -status` sees; one that is revoked or for another certificate is refused
//! with the file, line and field; `cert info` and `cert check` show it.

use std::process::{Command, Stdio};

use tlsrelay_tests::blocking;

use tlsrelay_tests::*;

fn config(pki: &Pki, leaf: &Leaf, ocsp: &std::path::Path) -> std::path::PathBuf {
    let upstream_port = free_port();
    let path = pki.dir().join(format!(
        "relay-{}.toml",
        ocsp.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &path,
        format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\ntls.mode = \"implicit\"\n[[listeners.tls.certificates]]\nchain = {}\nkey = {}\nocsp_response = {}\n\n[[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{upstream_port}\"\ntls.policy = \"plain\"\n",
            toml_path(&leaf.chain),
            toml_path(&leaf.key),
            toml_path(ocsp)
        ),
    )
    .unwrap();
    path
}

fn tlsrelay(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(relay_binary()).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[cfg_attr(missing_openssl, ignore = "needs openssl")]
#[test]
fn a_good_response_is_stapled_and_shown() {
    if !have_program("openssl", "version", "openssl") {
        return;
    }
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["relay.test"]);
    let good = pki.ocsp_response(&leaf, "good");
    let config = config(&pki, &leaf, &good);

    let (code, text) = tlsrelay(&[
        "cert".as_ref(),
        "info".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("OCSP staple") && text.contains(": good, this update"),
        "{text}"
    );

    let state = tempfile::tempdir().unwrap();
    let mut relay = process::RelayProcess::start(relay_binary(), &config, state.path(), &[], &[]);
    let addr = relay.addr("tls");
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-status",
            "-servername",
            "relay.test",
            "-connect",
        ])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("OCSP Response Status: successful"), "{text}");
    assert!(text.contains("Cert Status: good"), "{text}");
    relay.wait_for_log("session ");
}

#[cfg_attr(missing_openssl, ignore = "needs openssl")]
#[test]
fn revoked_or_foreign_responses_are_refused_with_their_field() {
    if !have_program("openssl", "version", "openssl") {
        return;
    }
    let pki = Pki::new();
    let leaf = pki.leaf("relay", &["relay.test"]);
    let other = pki.leaf("other", &["other.test"]);
    for (response, why) in [
        (
            pki.ocsp_response(&leaf, "revoked"),
            "the certificate's status is revoked",
        ),
        (
            pki.ocsp_response(&other, "good"),
            "no response for this certificate",
        ),
    ] {
        let config = config(&pki, &leaf, &response);
        let (code, text) = tlsrelay(&["check".as_ref(), config.as_os_str()]);
        assert_eq!(code, Some(2), "{text}");
        assert!(
            text.contains(":10: listeners[0].tls.certificates[0].ocsp_response:")
                && text.contains(why),
            "{text}"
        );
        let (code, text) = tlsrelay(&[
            "cert".as_ref(),
            "check".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--trust-anchors".as_ref(),
            pki.ca_pem.as_os_str(),
        ]);
        assert_eq!(code, Some(3), "{text}");
        assert!(
            text.contains("OCSP response refused") && text.contains(why),
            "{text}"
        );
    }
}

/// `cert check --reach` does what a validating peer does: asks the OCSP
/// responder (real `openssl ocsp`) about the certificate and checks the
/// answer's signature, fetches the CA-issuer certificate and checks it is
/// the issuer, and verifies the CRL (which here lists the certificate).
#[cfg_attr(missing_openssl, ignore = "needs openssl")]
#[test]
fn reach_asks_the_responder_checks_the_issuer_and_verifies_the_crl() {
    if !have_program("openssl", "version", "openssl") {
        return;
    }
    let pki = Pki::new();
    let ocsp_port = free_port();
    let ca_port = blocking::http_server(pki.ca_der());
    let crl_port = blocking::http_server(pki.crl(&[77]));
    let leaf = pki.issue(
        "reach",
        &LeafSpec {
            serial: Some(77),
            crl: Some(format!("http://127.0.0.1:{crl_port}/ca.crl")),
            ocsp: Some(format!("http://127.0.0.1:{ocsp_port}/")),
            ca_issuer: Some(format!("http://127.0.0.1:{ca_port}/ca.der")),
            ..LeafSpec::default()
        },
    );
    for (status, verdict) in [
        ("good", "good, signed by the issuer"),
        (
            "revoked",
            "the responder says revoked (signed by the issuer",
        ),
    ] {
        let index = pki.ocsp_index(&leaf, status);
        let key = pki.ca_key_pem();
        let mut responder = Command::new("openssl")
            .args(["ocsp", "-index"])
            .arg(&index)
            .args(["-port", &ocsp_port.to_string(), "-rsigner"])
            .arg(&pki.ca_pem)
            .arg("-rkey")
            .arg(&key)
            .arg("-CA")
            .arg(&pki.ca_pem)
            .args(["-ndays", "7"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Ready once it says so: a probe connection that sends nothing
        // would leave this single-threaded responder waiting on it.
        let mut log = std::io::BufReader::new(responder.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("waiting for OCSP client connections") {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut log, &mut line).unwrap() > 0,
                "openssl ocsp exited"
            );
        }
        let (code, out) = tlsrelay(&[
            "cert".as_ref(),
            "check".as_ref(),
            leaf.chain.as_os_str(),
            "--trust-anchors".as_ref(),
            pki.ca_pem.as_os_str(),
            "--reach".as_ref(),
            "--timeout".as_ref(),
            "5s".as_ref(),
        ]);
        let _ = responder.kill();
        let _ = responder.wait();
        assert_eq!(code, Some(3), "the CRL lists it: {out}");
        assert!(
            out.contains(&format!("OCSP http://127.0.0.1:{ocsp_port}/: {verdict}")),
            "{out}"
        );
        assert!(
            out.contains("CA issuer") && out.contains(": the issuer, CN=tlsrelay test CA"),
            "{out}"
        );
        assert!(
            out.contains("ca.crl: the certificate is REVOKED in it"),
            "{out}"
        );
    }
}
