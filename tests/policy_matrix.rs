//! The policy model end to end on loopback: every inbound mode against
//! plaintext and TLS clients, every outbound policy × verification level
//! against good and bad upstream certificates, client certificates, and
//! version limits. Each case asserts what the client saw and what the
//! session report says.

use std::net::SocketAddr;

use tlsrelay_core::policy::PeerTrust;
use tlsrelay_core::report::{Direction, LegSecurity, Outcome, SessionReport};
use tlsrelay_tests::*;
use tokio::net::TcpStream;

const MSG: &[u8] = b"hello through the relay\n";

fn trust_of(leg: &Option<LegSecurity>) -> Option<PeerTrust> {
    match leg {
        Some(LegSecurity::Tls { trust, .. }) => Some(*trust),
        _ => None,
    }
}

fn refused_kind(report: &SessionReport, leg: Direction) -> Option<&'static str> {
    match &report.outcome {
        Outcome::Refused {
            leg: l,
            failure: Some(f),
            ..
        } if *l == leg => Some(f.kind()),
        _ => None,
    }
}

/// A refused client gets nothing of the upstream's: at most a TLS alert
/// record, then the connection closes.
fn assert_refused_by_relay(result: &std::io::Result<Vec<u8>>, case: &str) {
    if let Ok(bytes) = result {
        assert!(
            bytes.is_empty() || (bytes[0] == 0x15 && bytes.len() == 7),
            "expected nothing or one TLS alert record: {case}"
        );
    }
}

fn relay_toml(mode: &str, upstream: SocketAddr, route_tls: &str) -> String {
    format!(
        r#"
[limits]
handshake_timeout = "3s"

[[listeners]]
name = "in"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "{mode}"

[[upstreams]]
name = "up"
address = "{upstream}"
{route_tls}
"#
    )
}

/// What a client does against a listener.
#[derive(Clone, Copy, Debug)]
enum Client {
    Plaintext,
    Tls,
}

/// What should happen to the session.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Echoed back; inbound TLS or not; inbound downgrade recorded or not.
    Relayed { tls: bool, downgrade: bool },
    /// The client's handshake or exchange fails and the report refuses the
    /// session on the inbound leg.
    Refused,
    /// The relay passes TLS bytes through as plaintext (`off`): the client's
    /// handshake fails against the plaintext upstream.
    OpaquePassThrough,
}

async fn run_client(kind: Client, addr: SocketAddr) -> std::io::Result<Vec<u8>> {
    match kind {
        Client::Plaintext => exchange(&mut TcpStream::connect(addr).await?, MSG).await,
        Client::Tls => {
            let mut tls = tls_connect(addr, "relay.test", &ClientOptions::default()).await?;
            exchange(&mut tls, MSG).await
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_modes_against_plaintext_and_tls_clients() {
    let upstream = plain_echo().await;
    let cases = [
        (
            "off",
            Client::Plaintext,
            Expect::Relayed {
                tls: false,
                downgrade: false,
            },
        ),
        ("off", Client::Tls, Expect::OpaquePassThrough),
        (
            "opportunistic",
            Client::Plaintext,
            Expect::Relayed {
                tls: false,
                downgrade: true,
            },
        ),
        (
            "opportunistic",
            Client::Tls,
            Expect::Relayed {
                tls: true,
                downgrade: false,
            },
        ),
        ("required", Client::Plaintext, Expect::Refused),
        (
            "required",
            Client::Tls,
            Expect::Relayed {
                tls: true,
                downgrade: false,
            },
        ),
        ("implicit", Client::Plaintext, Expect::Refused),
        (
            "implicit",
            Client::Tls,
            Expect::Relayed {
                tls: true,
                downgrade: false,
            },
        ),
    ];
    for (mode, client, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = TestRelay::start(
            &relay_toml(mode, upstream, "tls.policy = \"plain\""),
            dir.path(),
        )
        .await;
        eprintln!("case: mode {mode}, {client:?} client");
        let result = run_client(client, relay.addr("in")).await;
        let report = relay.next_report().await;
        let case = format!("mode {mode}, {client:?} client: {result:?}\n{report}");
        match expect {
            Expect::Relayed { tls, downgrade } => {
                assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
                assert!(matches!(report.outcome, Outcome::Relayed { .. }), "{case}");
                assert_eq!(report.inbound.as_ref().unwrap().is_tls(), tls, "{case}");
                assert_eq!(
                    report.downgraded(Direction::Inbound).is_some(),
                    downgrade,
                    "{case}"
                );
                assert_eq!(report.bytes_client_to_upstream, MSG.len() as u64, "{case}");
                assert_eq!(report.bytes_upstream_to_client, MSG.len() as u64, "{case}");
            }
            Expect::Refused => {
                assert_refused_by_relay(&result, &case);
                assert!(
                    matches!(
                        report.outcome,
                        Outcome::Refused {
                            leg: Direction::Inbound,
                            ..
                        }
                    ),
                    "{case}"
                );
                assert_eq!(report.bytes_client_to_upstream, 0, "{case}");
                assert!(
                    report.upstream_addr.is_none(),
                    "refused before connecting upstream: {case}"
                );
            }
            Expect::OpaquePassThrough => {
                assert!(result.is_err(), "{case}");
                assert_eq!(report.inbound, Some(LegSecurity::Plaintext), "{case}");
                assert!(report.bytes_client_to_upstream > 0, "{case}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_listener_refuses_plaintext_as_not_tls() {
    let upstream = plain_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = TestRelay::start(&relay_toml("implicit", upstream, ""), dir.path()).await;
    let _ = run_client(Client::Plaintext, relay.addr("in")).await;
    let report = relay.next_report().await;
    assert_eq!(
        refused_kind(&report, Direction::Inbound),
        Some("not offered"),
        "{report}"
    );
}

/// The upstream certificates the outbound matrix runs against.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Peer {
    Plain,
    Good,
    WrongName,
    Expired,
    SelfSigned,
    Wildcard,
}

/// What the outbound leg should end up as.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Out {
    Tls(PeerTrust),
    /// Plaintext after a failed TLS attempt, downgrade recorded with this kind.
    Downgraded(&'static str),
    Plain,
    /// Refused on the outbound leg for this reason kind.
    Refused(&'static str),
}

fn expected(policy: &str, verify: &str, peer: Peer) -> Out {
    use Out::*;
    use PeerTrust::*;
    // What the relay can establish about each peer, whatever it enforces.
    let assessed = match peer {
        Peer::Good | Peer::Wildcard => Verified,
        Peer::WrongName => Trusted,
        Peer::Expired | Peer::SelfSigned => Untrusted,
        Peer::Plain => Anonymous,
    };
    match (policy, peer) {
        ("plain", _) => Plain,
        ("opportunistic", Peer::Plain) => Downgraded("not offered"),
        ("opportunistic", _) => Tls(assessed),
        ("required", Peer::Plain) => Refused("not offered"),
        ("required", _) => match (verify, peer) {
            ("encryption-only", _) => Tls(assessed),
            ("certificate", Peer::Expired | Peer::SelfSigned) => Refused("certificate untrusted"),
            ("certificate", _) => Tls(assessed),
            ("name", Peer::Expired | Peer::SelfSigned) => Refused("certificate untrusted"),
            ("name", Peer::WrongName) => Refused("name mismatch"),
            ("name", _) => Tls(assessed),
            _ => unreachable!(),
        },
        _ => unreachable!(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_policy_by_verification_level_by_peer_certificate() {
    let pki = Pki::new();
    let mut peers = Vec::new();
    for (peer, leaf) in [
        (Peer::Good, Some(pki.leaf("good", &["upstream.test"]))),
        (Peer::WrongName, Some(pki.leaf("wrong", &["other.test"]))),
        (
            Peer::Expired,
            Some(pki.leaf_of_kind("expired", &["upstream.test"], LeafKind::Expired)),
        ),
        (
            Peer::SelfSigned,
            Some(pki.leaf_of_kind("self", &["upstream.test"], LeafKind::SelfSigned)),
        ),
        (Peer::Wildcard, Some(pki.leaf("wild", &["*.test"]))),
        (Peer::Plain, None),
    ] {
        let addr = match &leaf {
            Some(leaf) => {
                tls_echo(ServerOptions {
                    leaf,
                    versions: Versions::Both,
                    client_ca: None,
                })
                .await
            }
            None => plain_echo().await,
        };
        peers.push((peer, addr));
    }
    let mut checked = 0;
    for policy in ["plain", "opportunistic", "required"] {
        for verify in ["encryption-only", "certificate", "name"] {
            if policy == "plain" && verify != "encryption-only" {
                continue; // plain takes no verification level (config rejects it)
            }
            for &(peer, addr) in &peers {
                if policy == "plain" && peer != Peer::Plain {
                    continue; // a plaintext route to a TLS server relays opaque bytes
                }
                let route = if policy == "plain" {
                    "tls.policy = \"plain\"".to_string()
                } else {
                    format!(
                        "tls.policy = \"{policy}\"\ntls.verify = \"{verify}\"\ntls.names = [\"upstream.test\"]\ntls.server_name = \"upstream.test\"\ntls.trust_anchors = {}",
                        toml_path(&pki.ca_pem)
                    )
                };
                let mut relay = TestRelay::start(&relay_toml("off", addr, &route), pki.dir()).await;
                let result = run_client(Client::Plaintext, relay.addr("in")).await;
                let report = relay.next_report().await;
                let want = expected(policy, verify, peer);
                let case =
                    format!("{policy}/{verify}/{peer:?} expected {want:?}: {result:?}\n{report}");
                match want {
                    Out::Tls(trust) => {
                        assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
                        assert_eq!(trust_of(&report.outbound), Some(trust), "{case}");
                        assert!(report.downgrades.is_empty(), "{case}");
                    }
                    Out::Plain => {
                        assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
                        assert_eq!(report.outbound, Some(LegSecurity::Plaintext), "{case}");
                        assert!(report.downgrades.is_empty(), "{case}");
                    }
                    Out::Downgraded(kind) => {
                        assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
                        assert_eq!(report.outbound, Some(LegSecurity::Plaintext), "{case}");
                        let d = report.downgraded(Direction::Outbound).expect(&case);
                        assert!(d.reason.contains(kind), "{case}");
                    }
                    Out::Refused(kind) => {
                        assert!(result.map_or(true, |b| b.is_empty()), "{case}");
                        assert_eq!(
                            refused_kind(&report, Direction::Outbound),
                            Some(kind),
                            "{case}"
                        );
                        assert_eq!(report.bytes_client_to_upstream, 0, "{case}");
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 1 + 3 * 6 * 2, "every combination ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_upstream_certificates_are_refused_when_crls_are_configured() {
    let pki = Pki::new();
    let spec = |serial| LeafSpec {
        names: vec!["mx.partner.test"],
        serial: Some(serial),
        ..LeafSpec::default()
    };
    let (revoked, good) = (
        pki.issue("revoked", &spec(1001)),
        pki.issue("good", &spec(1002)),
    );
    let crl = pki.dir().join("partner.crl");
    std::fs::write(&crl, pki.crl(&[1001])).unwrap();
    let anchors = toml_path(&pki.ca_pem);
    let route = |crls: &str| {
        format!(
            "tls.policy = \"required\"\ntls.verify = \"name\"\ntls.names = [\"mx.partner.test\"]\ntls.trust_anchors = {anchors}\n{crls}"
        )
    };
    let with_crl = format!("tls.crls = [{}]", toml_path(&crl));
    for (leaf, crls, relayed) in [
        (&revoked, with_crl.as_str(), false),
        (&good, with_crl.as_str(), true),
        // Without CRLs nothing is checked: the revoked one passes.
        (&revoked, "", true),
    ] {
        let upstream = tls_echo(ServerOptions {
            leaf,
            versions: Versions::Both,
            client_ca: None,
        })
        .await;
        let conf = relay_toml("off", upstream, &route(crls));
        let mut relay = TestRelay::start(&conf, pki.dir()).await;
        let result = run_client(Client::Plaintext, relay.addr("in")).await;
        let report = relay.next_report().await;
        let case = format!("{:?} crls={crls:?}: {report}", leaf.chain);
        if relayed {
            assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
            assert_eq!(
                trust_of(&report.outbound),
                Some(PeerTrust::Verified),
                "{case}"
            );
        } else {
            assert_refused_by_relay(&result, &case);
            assert_eq!(
                refused_kind(&report, Direction::Outbound),
                Some("certificate untrusted"),
                "{case}"
            );
            assert!(
                format!("{:?}", report.outcome).contains("Revoked"),
                "{case}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_patterns_accept_wildcards_and_default_to_the_host() {
    let pki = Pki::new();
    let leaf = pki.leaf("mx", &["mx1.partner.test"]);
    let upstream = tls_echo(ServerOptions {
        leaf: &leaf,
        versions: Versions::Both,
        client_ca: None,
    })
    .await;
    let anchors = toml_path(&pki.ca_pem);
    // (names setting, server_name setting, expect verified)
    let cases = [
        ("tls.names = [\"*.partner.test\"]", "", true),
        (
            "tls.names = [\"mx1.partner.test\", \"backup.partner.test\"]",
            "",
            true,
        ),
        (
            "tls.names = [\"*.other.test\"]",
            "tls.server_name = \"mx1.partner.test\"",
            false,
        ),
        // Default pattern: the server name when set...
        ("", "tls.server_name = \"mx1.partner.test\"", true),
        // ...else the host connected to, here an IP the certificate lacks.
        ("", "", false),
    ];
    for (names, sni, ok) in cases {
        let route = format!(
            "tls.policy = \"required\"\ntls.verify = \"name\"\ntls.trust_anchors = {anchors}\n{sni}\n{names}"
        );
        let mut relay = TestRelay::start(&relay_toml("off", upstream, &route), pki.dir()).await;
        let result = run_client(Client::Plaintext, relay.addr("in")).await;
        let report = relay.next_report().await;
        let case = format!("{names:?} {sni:?}: {report}");
        if ok {
            assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
            assert_eq!(
                trust_of(&report.outbound),
                Some(PeerTrust::Verified),
                "{case}"
            );
        } else {
            assert_eq!(
                refused_kind(&report, Direction::Outbound),
                Some("name mismatch"),
                "{case}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_client_certificates() {
    let pki = Pki::new();
    let upstream = plain_echo().await;
    let right = pki.leaf("right", &["mail.partner.test"]);
    let sibling = pki.leaf("sibling", &["mx.partner.test"]);
    let wrong = pki.leaf("wrong", &["mail.intruder.test"]);
    let other_ca = Pki::new();
    let outsider = other_ca.leaf("outsider", &["mail.partner.test"]);
    let toml = |mode: &str, names: &str| {
        format!(
            r#"
[[listeners]]
name = "in"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "implicit"
tls.client_auth.mode = "{mode}"
tls.client_auth.trust_anchors = {}
tls.client_auth.names = [{names}]

[[upstreams]]
name = "up"
address = "{upstream}"
tls.policy = "plain"
"#,
            toml_path(&pki.ca_pem)
        )
    };
    // (client auth mode, allowed names, client cert, expected trust or refusal)
    let cases: [(&str, &str, Option<&Leaf>, Option<PeerTrust>); 7] = [
        ("required", "\"mail.partner.test\"", None, None),
        ("required", "\"mail.partner.test\"", Some(&wrong), None),
        ("required", "\"mail.partner.test\"", Some(&outsider), None),
        (
            "required",
            "\"mail.partner.test\"",
            Some(&right),
            Some(PeerTrust::Verified),
        ),
        (
            "required",
            "\"*.partner.test\"",
            Some(&sibling),
            Some(PeerTrust::Verified),
        ),
        ("required", "", Some(&wrong), Some(PeerTrust::Trusted)),
        (
            "optional",
            "\"mail.partner.test\"",
            None,
            Some(PeerTrust::Anonymous),
        ),
    ];
    for (mode, names, cert, want) in cases {
        let mut relay = TestRelay::start(&toml(mode, names), pki.dir()).await;
        let opts = ClientOptions {
            client_cert: cert,
            ..Default::default()
        };
        let result = match tls_connect(relay.addr("in"), "relay.test", &opts).await {
            Ok(mut tls) => exchange(&mut tls, MSG).await,
            Err(e) => Err(e),
        };
        let report = relay.next_report().await;
        let case = format!(
            "{mode} [{names}] {:?}: {result:?}\n{report}",
            cert.map(|c| &c.chain)
        );
        match want {
            Some(trust) => {
                assert_eq!(result.as_deref().ok(), Some(MSG), "{case}");
                assert_eq!(trust_of(&report.inbound), Some(trust), "{case}");
            }
            None => {
                assert_refused_by_relay(&result, &case);
                assert!(
                    refused_kind(&report, Direction::Inbound).is_some(),
                    "{case}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_client_certificate_is_presented() {
    let pki = Pki::new();
    let server = pki.leaf("server", &["upstream.test"]);
    let ours = pki.leaf("relay-client", &["relay.example"]);
    let upstream = tls_echo(ServerOptions {
        leaf: &server,
        versions: Versions::Both,
        client_ca: Some(&pki),
    })
    .await;
    for present in [true, false] {
        let mut route = format!(
            "tls.policy = \"required\"\ntls.verify = \"name\"\ntls.server_name = \"upstream.test\"\ntls.names = [\"upstream.test\"]\ntls.trust_anchors = {}\n",
            toml_path(&pki.ca_pem)
        );
        if present {
            route += &format!(
                "tls.client_certificate = {{ chain = {}, key = {} }}\n",
                toml_path(&ours.chain),
                toml_path(&ours.key)
            );
        }
        let mut relay = TestRelay::start(&relay_toml("off", upstream, &route), pki.dir()).await;
        let result = run_client(Client::Plaintext, relay.addr("in")).await;
        let report = relay.next_report().await;
        if present {
            assert_eq!(result.as_deref().ok(), Some(MSG), "{report}");
            assert_eq!(
                trust_of(&report.outbound),
                Some(PeerTrust::Verified),
                "{report}"
            );
        } else {
            // TLS 1.3: the server rejects the missing certificate after the
            // client's handshake completes, so the data never comes back.
            assert!(result.map_or(true, |b| b.is_empty()), "{report}");
            assert_ne!(
                report.bytes_upstream_to_client,
                MSG.len() as u64,
                "{report}"
            );
        }
    }
}

fn version_of(leg: &Option<LegSecurity>) -> Option<String> {
    match leg {
        Some(LegSecurity::Tls { negotiated, .. }) => Some(negotiated.version.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_and_tls13_only_peers() {
    let pki = Pki::new();
    let leaf = pki.leaf("up", &["upstream.test"]);
    let up12 = tls_echo(ServerOptions {
        leaf: &leaf,
        versions: Versions::Tls12Only,
        client_ca: None,
    })
    .await;
    let up13 = tls_echo(ServerOptions {
        leaf: &leaf,
        versions: Versions::Tls13Only,
        client_ca: None,
    })
    .await;
    let anchors = toml_path(&pki.ca_pem);
    let toml = |listener_min: &str, upstream: SocketAddr, route_min: &str| {
        format!(
            r#"
[[listeners]]
name = "in"
address = "127.0.0.1:0"
upstream = "up"
tls.mode = "implicit"
tls.min_version = "{listener_min}"

[[upstreams]]
name = "up"
address = "{upstream}"
tls.policy = "required"
tls.server_name = "upstream.test"
tls.trust_anchors = {anchors}
tls.min_version = "{route_min}"
"#
        )
    };
    // (listener min, client versions, upstream, route min, expected inbound, outbound, refusal kind)
    let cases = [
        (
            "1.2",
            Versions::Tls12Only,
            up13,
            "1.2",
            Some("TLSv1.2"),
            Some("TLSv1.3"),
            None,
        ),
        (
            "1.2",
            Versions::Tls13Only,
            up12,
            "1.2",
            Some("TLSv1.3"),
            Some("TLSv1.2"),
            None,
        ),
        (
            "1.3",
            Versions::Tls12Only,
            up13,
            "1.2",
            None,
            None,
            Some((Direction::Inbound, "version too low")),
        ),
        (
            "1.2",
            Versions::Both,
            up12,
            "1.3",
            Some("TLSv1.3"),
            None,
            Some((Direction::Outbound, "version too low")),
        ),
    ];
    for (lmin, client, upstream, rmin, want_in, want_out, refusal) in cases {
        let mut relay = TestRelay::start(&toml(lmin, upstream, rmin), pki.dir()).await;
        let opts = ClientOptions {
            versions: client,
            ..Default::default()
        };
        let result = match tls_connect(relay.addr("in"), "relay.test", &opts).await {
            Ok(mut tls) => exchange(&mut tls, MSG).await,
            Err(e) => Err(e),
        };
        let report = relay.next_report().await;
        let case = format!("listener {lmin} client {client:?} route {rmin}: {result:?}\n{report}");
        assert_eq!(version_of(&report.inbound).as_deref(), want_in, "{case}");
        assert_eq!(version_of(&report.outbound).as_deref(), want_out, "{case}");
        match refusal {
            None => assert_eq!(result.as_deref().ok(), Some(MSG), "{case}"),
            Some((leg, kind)) => {
                assert!(result.map_or(true, |b| b.is_empty()), "{case}");
                assert_eq!(refused_kind(&report, leg), Some(kind), "{case}");
            }
        }
    }
}

fn group_of(leg: &Option<LegSecurity>) -> Option<String> {
    match leg {
        Some(LegSecurity::Tls { negotiated, .. }) => negotiated.group.clone(),
        _ => None,
    }
}

/// The post-quantum hybrid X25519MLKEM768 is the relay's first choice on
/// both legs: a client that offers it gets it, an upstream gets it offered
/// first (rustls's default server, which ranks it last, takes it); the
/// group is in the report and the TLS line; `tls.groups` changes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_quantum_key_exchange_is_preferred_on_both_legs() {
    let pki = Pki::new();
    let leaf = pki.leaf("up", &["upstream.test"]);
    let upstream = tls_echo(ServerOptions {
        leaf: &leaf,
        versions: Versions::Both,
        client_ca: None,
    })
    .await;
    let toml = |listener_groups: &str, route_groups: &str| {
        format!(
            "[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"up\"\ntls.mode = \"implicit\"\n{listener_groups}\n\n[[upstreams]]\nname = \"up\"\naddress = \"{upstream}\"\ntls.policy = \"required\"\ntls.server_name = \"upstream.test\"\ntls.trust_anchors = {}\n{route_groups}\n",
            toml_path(&pki.ca_pem)
        )
    };
    // (listener groups, route groups, expected inbound group, outbound group)
    let cases = [
        ("", "", "X25519MLKEM768", "X25519MLKEM768"),
        (
            "tls.groups = [\"X25519\", \"secp256r1\"]",
            "tls.groups = [\"secp384r1\"]",
            "X25519",
            "secp384r1",
        ),
    ];
    for (listener_groups, route_groups, inbound, outbound) in cases {
        let mut relay = TestRelay::start(&toml(listener_groups, route_groups), pki.dir()).await;
        let tcp = TcpStream::connect(relay.addr("in")).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(post_quantum_client_config(Vec::new()));
        let name = rustls::pki_types::ServerName::try_from("relay.test").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(exchange(&mut tls, MSG).await.unwrap(), MSG);
        let report = relay.next_report().await;
        assert_eq!(
            group_of(&report.inbound).as_deref(),
            Some(inbound),
            "{report}"
        );
        assert_eq!(
            group_of(&report.outbound).as_deref(),
            Some(outbound),
            "{report}"
        );
        assert!(
            report
                .to_string()
                .contains(&format!("TLSv1.3 TLS13_AES_256_GCM_SHA384 {inbound} (")),
            "{report}"
        );
    }
}
