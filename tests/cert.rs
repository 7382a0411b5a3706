//! `tlsrelay cert info` and `tlsrelay cert check` against certificates made
//! here: RSA 2048 and ECDSA P-256, with and without revocation endpoints,
//! expired, near expiry, the wrong name; `--reach` against a loopback HTTP
//! server serving a CRL and a port nobody listens on.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use tlsrelay_tests::relay_binary;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tlsrelay_tests::blocking::http_server;
use tlsrelay_tests::{KeyKind, Leaf, LeafSpec, Pki};

fn tlsrelay(args: &[&str]) -> (Option<i32>, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(relay_binary()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr)
    );
    (status.code(), text)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn info_json(leaf: &Leaf) -> serde_json::Value {
    let (code, out) = tlsrelay(&["cert", "info", "--json", path(&leaf.chain)]);
    assert_eq!(code, Some(0), "{out}");
    let all: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    all[0]["certificate"].clone()
}

fn colon_hex_sha256(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn info_reports_what_partners_ask_for_rsa_with_endpoints() {
    let pki = Pki::new();
    let leaf = pki.issue(
        "rsa",
        &LeafSpec {
            names: vec!["mx.relay.test", "relay.test"],
            key: KeyKind::Rsa2048,
            organisation: Some("Example Org"),
            unit: Some("Mail Edge"),
            crl: Some("http://crl.relay.test/ca.crl".into()),
            ocsp: Some("http://ocsp.relay.test".into()),
            ca_issuer: Some("http://ca.relay.test/ca.der".into()),
            ..LeafSpec::default()
        },
    );
    let c = info_json(&leaf);
    assert_eq!(c["key"], "RSA 2048");
    assert_eq!(c["subject_cn"], "mx.relay.test");
    assert_eq!(c["organisation"], "Example Org");
    assert_eq!(c["organisational_unit"], "Mail Edge");
    assert_eq!(
        c["san"],
        serde_json::json!(["DNS:mx.relay.test", "DNS:relay.test"])
    );
    assert!(
        c["root_issuer"]
            .as_str()
            .unwrap()
            .contains("tlsrelay test CA"),
        "{c}"
    );
    assert_eq!(
        c["crl_urls"],
        serde_json::json!(["http://crl.relay.test/ca.crl"])
    );
    assert_eq!(
        c["ocsp_urls"],
        serde_json::json!(["http://ocsp.relay.test"])
    );
    assert_eq!(
        c["ca_issuer_urls"],
        serde_json::json!(["http://ca.relay.test/ca.der"])
    );
    let der = CertificateDer::from_pem_file(&leaf.chain).unwrap();
    assert_eq!(c["sha256_fingerprint"], colon_hex_sha256(&der));
    assert_ne!(c["public_key_sha256"], c["sha256_fingerprint"]);
}

#[test]
fn info_for_ecdsa_without_endpoints_as_markdown() {
    let pki = Pki::new();
    let leaf = pki.issue("ec", &LeafSpec::default());
    let c = info_json(&leaf);
    assert_eq!(c["key"], "ECDSA P-256");
    assert_eq!(c["crl_urls"], serde_json::json!([]));
    assert_eq!(c["ocsp_urls"], serde_json::json!([]));
    let (code, md) = tlsrelay(&["cert", "info", "--markdown", path(&leaf.chain)]);
    assert_eq!(code, Some(0), "{md}");
    assert!(md.contains("| Key | ECDSA P-256 |"), "{md}");
    assert!(md.contains("| CRL distribution points | - |"), "{md}");
    assert!(
        md.contains("| Certificate name (CN) | mx.relay.test |"),
        "{md}"
    );
}

/// A config with an SMTP listener named mx.relay.test serving `leaf`.
fn config(dir: &Path, leaf: &Leaf) -> String {
    let file = dir.join(format!(
        "relay-{}.toml",
        leaf.chain.file_stem().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &file,
        format!(
            "accepted_domains = [\"relay.test\"]\n\n[[listeners]]\nname = \"mx\"\naddress = \"127.0.0.1:0\"\nprotocol = \"smtp\"\nhostname = \"mx.relay.test\"\ntls.mode = \"opportunistic\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n\n[[outbound_connectors]]\nname = \"any\"\nrecipient_domains = [\"*\"]\nnext_hops = [\"127.0.0.1:25\"]\n",
            path(&leaf.chain),
            path(&leaf.key)
        ),
    )
    .unwrap();
    file.display().to_string()
}

fn check_config(pki: &Pki, leaf: &Leaf) -> (Option<i32>, String) {
    let conf = config(pki.dir(), leaf);
    tlsrelay(&[
        "cert",
        "check",
        "--config",
        &conf,
        "--trust-anchors",
        path(&pki.ca_pem),
    ])
}

#[test]
fn check_passes_a_good_chain_for_the_listener_name() {
    let pki = Pki::new();
    let leaf = pki.issue("good", &LeafSpec::default());
    let (code, out) = check_config(&pki, &leaf);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("key ECDSA P-256"), "{out}");
    assert!(out.contains("chains to a trusted root"), "{out}");
    assert!(
        out.contains("covers mx.relay.test (listener mx hostname)"),
        "{out}"
    );
    assert!(out.contains("matches the certificate"), "{out}");
    assert!(out.contains("all checks passed"), "{out}");
}

#[test]
fn check_warns_under_30_days_and_fails_expired_wrong_name_untrusted() {
    let pki = Pki::new();
    let soon = pki.issue(
        "soon",
        &LeafSpec {
            valid_days: 10,
            ..LeafSpec::default()
        },
    );
    let (code, out) = check_config(&pki, &soon);
    assert_eq!(code, Some(0), "a warning does not fail: {out}");
    assert!(out.contains("WARNING  expires in"), "{out}");
    assert!(out.contains("passed with warnings"), "{out}");

    let expired = pki.issue(
        "expired",
        &LeafSpec {
            valid_days: -5,
            ..LeafSpec::default()
        },
    );
    let (code, out) = check_config(&pki, &expired);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("ERROR    expired on"), "{out}");

    let wrong = pki.issue(
        "wrong",
        &LeafSpec {
            names: vec!["other.relay.test"],
            ..LeafSpec::default()
        },
    );
    let (code, out) = check_config(&pki, &wrong);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains("does not cover mx.relay.test (listener mx hostname)"),
        "{out}"
    );

    // Another CA's anchors: the chain does not validate.
    let other = Pki::new();
    let good = pki.issue("good", &LeafSpec::default());
    let (code, out) = tlsrelay(&[
        "cert",
        "check",
        path(&good.chain),
        "--trust-anchors",
        path(&other.ca_pem),
    ]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("does not chain to a trusted root"), "{out}");

    // A key from another certificate.
    let (code, out) = tlsrelay(&[
        "cert",
        "check",
        path(&good.chain),
        "--key",
        path(&wrong.key),
        "--trust-anchors",
        path(&pki.ca_pem),
    ]);
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains("does not match the certificate"), "{out}");
}

#[test]
fn reach_fetches_the_crl_and_flags_a_closed_port() {
    let pki = Pki::new();
    let crl = pki.crl(&[]);
    let port = http_server(crl.clone());
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let leaf = pki.issue(
        "reach",
        &LeafSpec {
            crl: Some(format!("http://127.0.0.1:{port}/ca.crl")),
            ocsp: Some(format!("http://127.0.0.1:{closed_port}/")),
            ..LeafSpec::default()
        },
    );
    let (code, out) = tlsrelay(&[
        "cert",
        "check",
        path(&leaf.chain),
        "--trust-anchors",
        path(&pki.ca_pem),
        "--reach",
        "--timeout",
        "2s",
    ]);
    assert_eq!(code, Some(3), "an unreachable endpoint fails: {out}");
    assert!(
        out.contains(&format!(
            "CRL http://127.0.0.1:{port}/ca.crl: signed by the issuer, next update"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "OCSP http://127.0.0.1:{closed_port}/: UNREACHABLE"
        )),
        "{out}"
    );

    // Without --reach the endpoints are listed, not tried.
    let (code, out) = tlsrelay(&[
        "cert",
        "check",
        path(&leaf.chain),
        "--trust-anchors",
        path(&pki.ca_pem),
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("endpoints (try them with --reach)"), "{out}");
}

/// `dns records`: MX for each accepted domain, and a TLSA 3 1 1 record
/// whose digest is what openssl computes for the served key (and the next
/// one), the MTA-STS and TLS-RPT records and the policy.
#[test]
fn dns_records_publish_what_peers_check() {
    let pki = Pki::new();
    let served = pki.issue(
        "mx",
        &LeafSpec {
            names: vec!["mx.example.org"],
            ..LeafSpec::default()
        },
    );
    let next = pki.issue(
        "mx-next",
        &LeafSpec {
            names: vec!["mx.example.org"],
            ..LeafSpec::default()
        },
    );
    let config = pki.dir().join("edge.toml");
    std::fs::write(
        &config,
        format!(
            "accepted_domains = [\"example.org\", \".example.org\"]\n[[listeners]]\nname = \"mx\"\naddress = \"0.0.0.0:25\"\nprotocol = \"smtp\"\nhostname = \"mx.example.org\"\n[[listeners.tls.certificates]]\nchain = {}\nkey = {}\n[[outbound_connectors]]\nname = \"in\"\nrecipient_domains = [\"example.org\"]\nnext_hops = [\"10.0.0.5:25\"]\n",
            tlsrelay_tests::toml_path(&served.chain),
            tlsrelay_tests::toml_path(&served.key)
        ),
    )
    .unwrap();
    let (code, out) = tlsrelay(&[
        "dns",
        "records",
        "--config",
        path(&config),
        "--next",
        path(&next.chain),
        "--sts-mode",
        "enforce",
    ]);
    assert_eq!(code, Some(0), "{out}");
    let openssl_digest = |chain: &Path| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform DER | openssl dgst -sha256 -r",
                chain.display()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert!(
        out.contains("example.org. IN MX 10 mx.example.org."),
        "{out}"
    );
    assert!(
        !out.contains(".example.org. IN MX 10"),
        "patterns are no zone names: {out}"
    );
    for chain in [&served.chain, &next.chain] {
        let record = format!(
            "_25._tcp.mx.example.org. IN TLSA 3 1 1 {}",
            openssl_digest(chain)
        );
        assert!(out.contains(&record), "{record} in:\n{out}");
    }
    assert!(
        out.contains("_mta-sts.example.org. IN TXT \"v=STSv1; id="),
        "{out}"
    );
    assert!(
        out.contains(
            "_smtp._tls.example.org. IN TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@example.org\""
        ),
        "{out}"
    );
    assert!(
        out.contains("; mode: enforce\n; mx: mx.example.org\n; max_age: 604800"),
        "{out}"
    );
}
