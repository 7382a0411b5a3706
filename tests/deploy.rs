//! The shipped deployment files: the example edge configuration validates
//! (with certificates made here in the places it names) and its
//! certificates pass `cert check`; the systemd unit parses cleanly.

use std::path::Path;
use std::process::Command;
use tlsrelay_tests::relay_binary;

use tlsrelay_tests::{LeafSpec, Pki};

fn deploy(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

/// The example configuration beside the certificates it names.
fn edge_config(pki: &Pki, partner: &Pki) -> std::path::PathBuf {
    let dir = pki.dir().join("etc");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let mx = pki.issue(
        "mx",
        &LeafSpec {
            names: vec!["mx.example.org"],
            ..LeafSpec::default()
        },
    );
    let client = pki.issue(
        "client",
        &LeafSpec {
            names: vec!["relay.example.org"],
            ..LeafSpec::default()
        },
    );
    for (from, to) in [
        (&mx.chain, "mx.example.org.pem"),
        (&mx.key, "mx.example.org.key"),
        (&client.chain, "relay-client.pem"),
        (&client.key, "relay-client.key"),
        (&pki.ca_pem, "internal-ca.pem"),
        (&partner.ca_pem, "partner-ca.pem"),
    ] {
        std::fs::copy(from, certs.join(to)).unwrap();
    }
    std::fs::write(certs.join("partner-ca.crl"), partner.crl(&[])).unwrap();
    let config = dir.join("edge.toml");
    std::fs::copy(deploy("edge.toml"), &config).unwrap();
    config
}

/// `tlsrelay check` on `config`: its output, once it passed.
fn check(config: &Path) -> String {
    let out = Command::new(relay_binary())
        .arg("check")
        .arg(config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{text}");
    text
}

#[test]
fn example_edge_config_is_valid_and_its_certificates_check() {
    let (pki, partner) = (Pki::new(), Pki::new());
    let config = edge_config(&pki, &partner);
    let text = check(&config);
    for expected in [
        "listener mx on 0.0.0.0:25 (smtp): inbound TLS opportunistic",
        "inbound connector partner-in: clients 192.0.2.0/24, certificate names mail.partner.example, TLS required, client certificate required",
        "revocation checked against 1 CRL file(s)",
        "accepted domains: example.org, .example.org",
        "relaying to other domains: only sessions of on-premises-in (from 10.0.0.0/24, over TLS); everyone else gets 554 5.7.1 Relay access denied",
        "presents a client certificate",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
    assert!(!text.contains("OPEN RELAY"), "{text}");
    let out = Command::new(relay_binary())
        .args(["cert", "check", "--config"])
        .arg(&config)
        .arg("--trust-anchors")
        .arg(&pki.ca_pem)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("covers mx.example.org (listener mx hostname)"),
        "{text}"
    );
    assert!(
        text.contains("outbound connector on-premises client certificate"),
        "{text}"
    );
}

#[cfg_attr(missing_systemd_analyze, ignore = "needs systemd-analyze")]
#[test]
fn systemd_unit_parses_cleanly() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "systemd-analyze is missing under CI"
        );
        eprintln!("skipped: systemd-analyze not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("tlsrelay.service");
    let text = std::fs::read_to_string(deploy("tlsrelay.service"))
        .unwrap()
        .replace("/usr/local/bin/tlsrelay", relay_binary());
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{complaints}");
    // verify exits 0 on directives it ignores; any complaint is a failure.
    assert!(complaints.trim().is_empty(), "{complaints}");
}

/// The Kubernetes ConfigMap's configuration validates (with certificates
/// where its Secret mounts them) and says what the book says: an MX
/// behind a PROXY protocol balancer.
#[test]
fn kubernetes_configmap_config_is_valid() {
    let pki = Pki::new();
    let leaf = pki.issue(
        "mx",
        &LeafSpec {
            names: vec!["mx.example.org"],
            ..LeafSpec::default()
        },
    );
    let yaml = std::fs::read_to_string(deploy("kubernetes/configmap.yaml")).unwrap();
    let start = yaml.find("tlsrelay.toml: |\n").expect("the config key") + 17;
    let toml: String = yaml[start..]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/etc/tlsrelay/certs/tls.crt", leaf.chain.to_str().unwrap())
        .replace("/etc/tlsrelay/certs/tls.key", leaf.key.to_str().unwrap());
    let config = pki.dir().join("k8s.toml");
    std::fs::write(&config, toml).unwrap();
    let text = check(&config);
    assert!(text.contains("behind a PROXY protocol balancer"), "{text}");
}

/// The edge relay example (pools, health checks, SNI routes, passthrough,
/// fleet ticket keys, access rules) passes `check` beside the files it
/// names, and the plan says what an operator migrating from HAProxy looks
/// for.
#[test]
fn example_edge_relay_config_is_valid() {
    let pki = Pki::new();
    let dir = pki.dir().join("edge-relay");
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    for name in ["www.example.org", "api.example.org"] {
        let leaf = pki.issue(
            name,
            &LeafSpec {
                names: vec![if name.starts_with("www") {
                    "www.example.org"
                } else {
                    "api.example.org"
                }],
                ..LeafSpec::default()
            },
        );
        std::fs::copy(&leaf.chain, certs.join(format!("{name}.pem"))).unwrap();
        std::fs::copy(&leaf.key, certs.join(format!("{name}.key"))).unwrap();
    }
    std::fs::copy(&pki.ca_pem, certs.join("internal-ca.pem")).unwrap();
    let keys = dir.join("tickets.keys");
    let made = Command::new(relay_binary())
        .args(["tickets", "new"])
        .arg(&keys)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let config = dir.join("edge-relay.toml");
    std::fs::copy(deploy("edge-relay.toml"), &config).unwrap();
    let text = check(&config);
    for expected in [
        "SNI api.example.org -> upstream api (TLS terminated here)",
        "SNI *.apps.example.org -> upstream apps (TLS passed through untouched)",
        "upstream web otherwise",
        "session tickets from the fleet's keys in tickets.keys",
        "clients, never from 192.0.2.0/24, at most 50 new connections per second per address (bursts of 100)",
        "upstream web: servers 10.0.1.10:8080, 10.0.1.11:8080, 10.0.1.12:8080 (backup), balance least-connections",
        "upstream api: servers 10.0.2.10:8443 weight 3, 10.0.2.11:8443, balance round-robin; checked every 2s with a TLS handshake",
        "balance hash-sni",
    ] {
        assert!(text.contains(expected), "{expected:?} not in\n{text}");
    }
}
